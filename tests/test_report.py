"""Reports: data is escaped (never markup), runs of a kind compared side by side, missing fields tolerated."""
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from memaudit.report import md_escape, report
from memaudit.rundir import RunDir

EVIL = "<script>alert(1)</script> | **bold** [link](http://x) `tick` & <img src=x onerror=alert(2)>"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _figure(run, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    run.save_figure(fig, name)


def _extract_run(root: Path, model_name: str, exact_rate: float, text: str = EVIL,
                 figures: tuple[str, ...] = ("rouge_l.png",)) -> Path:
    run = RunDir(root / f"extract-{model_name}", "extract", {"prefix": 32, "suffix": 32},
                 inputs={"model": str(root / model_name), "data": "train.jsonl"})
    run.write_samples(pd.DataFrame({"id": ["a", "b", "c"], "exact": [True, False, False],
                                    "rouge_l": [1.0, 0.2, 0.5], "token_match": [1.0, 0.1, 0.4],
                                    "target": [text, "plain", "other"], "generated": [text, "x", "y"]}))
    run.write_summary({"n_samples": 3, "exact_rate": exact_rate, "n_exact": 1, "mean_rouge_l": 0.57})
    for name in figures:
        _figure(run, name)
    return run.path


def test_script_in_training_data_is_text_not_markup(tmp_path):
    run = _extract_run(tmp_path, "standard", 0.33)
    res = report(run_dirs=[run], out=tmp_path / "rep")
    page = Path(res.html).read_text()
    parser = _Tags()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert "script" not in tags  # the report itself has no script, so any would come from data
    assert all("onerror" not in attrs for _, attrs in parser.tags)
    assert [a["src"][:22] for t, a in parser.tags if t == "img"] == ["data:image/png;base64,"] * 1
    assert any("<script>alert(1)</script>" in t for t in parser.text)  # shown, as text, intact
    md = Path(res.markdown).read_text()
    assert "<script>" not in md and "<img" not in md and "&lt;script&gt;" in md
    import re

    lines = md.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("| a |"))
    header = lines[row - 2] if lines[row - 1].startswith("|---") else lines[row - 3]
    cells = lambda line: re.split(r"(?<!\\)\|", line)  # noqa: E731 (split on unescaped pipes only)
    assert len(cells(lines[row])) == len(cells(header))  # the data's pipe did not add a column
    assert (tmp_path / "rep" / "figures").is_dir() and any((tmp_path / "rep" / "figures").iterdir())


def test_md_escape_neutralizes_markdown_and_html():
    s = md_escape("a|b <i>x</i> *y* [z](u)\nnext")
    assert "<" not in s and "\n" not in s and "\\|" in s and "\\*y\\*" in s and "\\[z\\]" in s
    assert md_escape("# not a heading") == "\\# not a heading" and md_escape("1. x") == "1\\. x"


def test_runs_of_a_kind_in_one_table_with_labels(tmp_path, run_cli):
    runs = [_extract_run(tmp_path, name, rate, "doc") for name, rate in
            (("standard", 0.8), ("goldfish", 0.0), ("sinks", 0.1))]
    res = report(run_dirs=runs, out=tmp_path / "rep")
    md = Path(res.markdown).read_text()
    table = [line for line in md.splitlines() if line.startswith("| standard |") or line.startswith("| goldfish |")
             or line.startswith("| sinks |")]
    assert len(table) >= 3 and " 0.8 " in md
    assert (tmp_path / "rep" / "figures" / "compare-extract.png").is_file()
    r = run_cli("report", *runs, "--out", tmp_path / "r2", "--label", "A", "--label", "B", "--label", "C")
    assert r.returncode == 0, r.stderr
    md2 = (tmp_path / "r2" / "report.md").read_text()
    assert "| A |" in md2 and "| B |" in md2 and "| C |" in md2


def test_missing_optional_files_and_fields(tmp_path, run_cli):
    run = RunDir(tmp_path / "odd", "capacity", {})  # no summary, no samples, no figures
    model = tmp_path / "model"
    model.mkdir()
    (model / "training_log.csv").write_text("epoch,step,train_loss\n1,5,3.2\n2,10,2.9\n")  # no val_loss column
    res = report(run_dirs=[run.path, model], out=tmp_path / "rep")
    assert "training-curves" in Path(res.markdown).read_text()
    r = run_cli("report", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.strip() == f"error: not a run directory: {tmp_path / 'nope'}"
    r = run_cli("report", run.path, "--label", "a", "--label", "b")
    assert r.returncode == 2 and "one label per run directory" in r.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (Debian package chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    """Every embedded figure decodes in a real browser and the data's <script> stays text there too."""
    import re

    from PIL import Image

    runs = [_extract_run(tmp_path, name, rate, figures=("rouge_l.png", "match_prefix.png"))
            for name, rate in (("standard", 0.9), ("goldfish", 0.0))]
    res = report(run_dirs=runs, out=tmp_path / "rep")
    page = Path(res.html).read_text()
    n_figures = page.count("<img ")
    assert n_figures >= 3
    # a probe appended after the report (not part of it) writes what the browser made of the page into the DOM
    probe = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-probe', JSON.stringify("
             "{imgs: [...document.images].map(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect()"
             ".height > 0), scripts: document.scripts.length, alerted: window.__alerted || 0,"
             " text: document.body.innerText.includes('<script>alert(1)<\\/script>')})))</script>")
    guard = "<script>window.alert = () => { window.__alerted = (window.__alerted || 0) + 1 };</script>"
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + guard, 1) + probe)
    chrome = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
              "--virtual-time-budget=5000"]
    dom = subprocess.run(chrome + ["--dump-dom", probed.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the browser did not run the page's load event"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["imgs"] == [True] * n_figures  # every figure decoded and laid out with a height
    assert result["scripts"] == 2 and result["alerted"] == 0  # only the probe's two scripts; data ran nothing
    assert result["text"]  # the training sample's markup is shown as text
    shot = tmp_path / "shot.png"
    subprocess.run(chrome + [f"--screenshot={shot}", "--window-size=1000,1600", Path(res.html).resolve().as_uri()],
                   capture_output=True, timeout=120)
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    # the embedded matplotlib figure draws its default blue line (#1f77b4): present only if the image rendered
    assert any(abs(r - 0x1f) < 12 and abs(g - 0x77) < 12 and abs(b - 0xb4) < 12 for _, (r, g, b) in colors)
