"""Auditing a book: the README's walkthrough, run for real (issue: whole-document audits).

The "book" is 36 long chapters of real text that every Python installation carries: the standard library's longest
docstrings (at least 2,000 characters each, memaudit.corpus.stdlib_source_docstrings), shuffled with seed 0. A tiny
GPT-2 is trained on 12 of them (packed rows, the default: every token of every chapter is trained on) until it
reproduces them; the other 24 are unseen text from the same source. Then, with the command line exactly as the
README shows it:
- `extract --stride 32` on the trained chapters and on the unseen ones (every window of 32 + 32 tokens, one
  starting every 32 tokens, so the suffixes tile each chapter after its first 32 tokens): documents.parquet,
  the documents block of summary.json, the memorization map;
- `mia --window 128 --stride 64 --collection` with the trained chapters as the suspect set and the unseen ones as
  the known-unseen set: dataset inference's p-value;
- the same collection test on two halves of the unseen chapters, over 10 seeds (each seed its own split): a test
  that holds its level gives p > 0.05 in about 95% of them.

Run:  python reports/book/reproduce.py   (about 20 minutes on 2 idle CPU cores; the work folder is runs/book)
Writes walkthrough.md (every command with its real output), results.json and memorization_map.png here.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from memaudit.corpus import stdlib_source_docstrings
from memaudit.data import write_documents

HERE = Path(__file__).resolve().parent
N_TRAINED, N_UNSEEN = 12, 24  # chapters; each side of the collection test needs >= 10
SEEDS = range(10)
TRAIN = ["--config", "tiny", "--seq-len", "128", "--epochs", "200", "--lr", "3e-3", "--vocab-size", "1024",
         "--val-fraction", "0", "--device", "cpu"]
MIA = ["--window", "128", "--stride", "64", "--collection", "--device", "cpu"]


def make_book(work: Path) -> tuple[Path, Path]:
    """The trained chapters and the unseen ones, as .jsonl files in `work`."""
    chapters = stdlib_source_docstrings(min_chars=2000)
    random.Random(0).shuffle(chapters)
    if len(chapters) < N_TRAINED + N_UNSEEN:
        sys.exit(f"this Python's standard library has {len(chapters)} docstrings of 2,000+ characters; "
                 f"the walkthrough needs {N_TRAINED + N_UNSEEN}")
    return (write_documents(work / "chapters.jsonl", chapters[:N_TRAINED]),
            write_documents(work / "unseen.jsonl", chapters[N_TRAINED:N_TRAINED + N_UNSEEN]))


class Transcript:
    """Runs memaudit commands as a user types them and keeps each command with its output."""

    def __init__(self, root: Path):
        self.root = root  # commands are shown relative to it
        self.parts: list[str] = []

    def run(self, *args: object, show: bool = True, ok: tuple[int, ...] = (0,)) -> str:
        argv = ["memaudit", *map(str, args)]
        res = subprocess.run([sys.executable, "-m", "memaudit", *argv[1:]], capture_output=True, text=True,
                             cwd=self.root)
        if res.returncode not in ok:
            sys.exit(f"{shlex.join(argv)} failed ({res.returncode}):\n{res.stderr}")
        if show:
            self.parts.append(f"$ {shlex.join(argv)}\n{res.stdout.strip()}")
        return res.stdout

    def markdown(self) -> str:
        return "\n\n".join(f"```\n{p}\n```" for p in self.parts)


def unseen_halves(unseen: Path, seed: int, work: Path) -> tuple[Path, Path]:
    """Two halves of the unseen chapters, split at random by `seed`."""
    docs = pd.read_json(unseen, lines=True)
    order = random.Random(seed).sample(range(len(docs)), len(docs))
    half = len(docs) // 2
    folder = work / f"halves-{seed}"
    folder.mkdir(exist_ok=True)
    return (write_documents(folder / "a.jsonl", docs.text.iloc[order[:half]].tolist()),
            write_documents(folder / "b.jsonl", docs.text.iloc[order[half:]].tolist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/book"), help="work folder (models and runs)")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    chapters, unseen = make_book(work)
    t = Transcript(work)
    trained = work / "train-output.txt"  # the training command's transcript, kept with the model it wrote
    if not (work / "model" / "config.json").exists() or not trained.exists():
        trained.write_text(t.run("train", "--data", "chapters.jsonl", "--out", "model", "--overwrite", *TRAIN,
                                 show=False))
    t.parts.append(f"$ {shlex.join(['memaudit', 'train', '--data', 'chapters.jsonl', '--out', 'model', *TRAIN])}\n"
                   + trained.read_text().strip())
    for name in ("chapters", "unseen"):
        t.run("extract", "model", "--data", f"{name}.jsonl", "--stride", "32", "--out", f"extract-{name}",
              "--overwrite", "--device", "cpu")
    t.run("mia", "model", "--members", "chapters.jsonl", "--nonmembers", "unseen.jsonl", *MIA, "--out", "mia",
          "--overwrite")
    halves = []
    for seed in SEEDS:
        a, b = unseen_halves(unseen, seed, work)
        t.run("mia", "model", "--members", a.relative_to(work), "--nonmembers", b.relative_to(work), *MIA,
              "--seed", seed, "--out", f"halves-{seed}/mia", "--overwrite", show=seed == 0)
        halves.append(json.loads((work / f"halves-{seed}/mia/summary.json").read_text())["collection"]["p_value"])
    write_results(work, t, halves)


def write_results(work: Path, t: Transcript, halves: list[float]) -> None:
    docs = {name: json.loads((work / f"extract-{name}/summary.json").read_text())["documents"]
            for name in ("chapters", "unseen")}
    collection = json.loads((work / "mia/summary.json").read_text())["collection"]
    table = pd.read_parquet(work / "extract-chapters/documents.parquet").sort_values("exact_fraction")
    results = {"documents": docs, "collection_p_value": collection["p_value"], "unseen_halves_p_values": halves,
               "unseen_halves_above_0.05": sum(p > 0.05 for p in halves)}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    shutil.copyfile(work / "extract-chapters/memorization_map.png", HERE / "memorization_map.png")
    (HERE / "walkthrough.md").write_text(
        "# Auditing a book: the walkthrough's real output\n\n"
        "Written by `python reports/book/reproduce.py` (the work folder is `runs/book`).\n\n" + t.markdown()
        + "\n\nThe least reproduced trained chapters (`extract-chapters/documents.parquet`):\n\n```\n"
        + table.head(5).to_string(index=False) + "\n```\n\n"
        + f"Two halves of the unseen chapters, 10 seeds: p = {', '.join(f'{p:.3g}' for p in halves)} "
        + f"({results['unseen_halves_above_0.05']} of 10 above 0.05).\n\n![memorization map](memorization_map.png)\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
