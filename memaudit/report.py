"""Reports: one Markdown file and one self-contained HTML file (figures embedded) from any mix of run directories.

A report is built as a list of blocks (headings, paragraphs, tables, figures, code) and then rendered twice. Every
string in a block is treated as data and escaped by the renderer: training text can hold HTML, script or Markdown,
and it must show as text. Markup comes only from the renderers themselves.

Run kinds are read from config.json's "command" (extract, mia, memorization, capacity, exposure, risk, ...);
a model directory written by `memaudit train` (training_log.csv / train_config.json) is the kind "train".
Several runs of one kind are compared in one table, one row per run, labelled by `labels` or by the model's
directory name.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from safetensors import safe_open

from . import checks
from .errors import MemauditError
from .figures import png_bytes, pyplot
from .membership import mia_headline
from .rundir import Owned, check_output, read_json, read_summary
from .settings import settings_from

# Headline fields per kind, in display order (dotted paths into summary.json); missing ones are skipped.
HEADLINE = {
    "extract": ["n_samples", "exact_rate", "n_exact", "mean_token_match", "mean_match_prefix", "mean_rouge_l",
                "mean_rouge_l_text", "decoding", "prefix", "suffix", "np_discoverable_rate"],
    "memorization": ["n_samples", "total_mem_u_bits", "mem_u_bits_per_token", "fraction_samples_with_mem_u",
                     "mem_u_bits.mean", "bits_model_per_byte", "bits_reference_per_byte", "reference"],
    "exposure": ["n_canaries", "mean_exposure_bits", "max_exposure_bits", "max_possible_exposure_bits",
                 "mean_control_exposure_bits", "n_controls", "methods"],
    "risk": ["mode", "params", "train_sequences", "capacity_bits", "data_bits", "data_to_capacity_ratio", "regime",
             "predicted_mia_f1", "mia_law", "verdict"],
}
# Columns that say how memorized a sample is, best first, for the "most memorized samples" tables.
SAMPLE_RANKING = {
    "extract": [("exact", "rouge_l"), ("rouge_l",), ("token_match",)],
    "memorization": [("mem_u_bits",)],
    "exposure": [("exposure",)],
    "mia": [("score_loss",)],
}
TEXT_COLUMNS = ("target", "generated", "text", "prefix_text", "suffix_text")
MAX_CELL = 300  # characters of sample text shown per table cell


@dataclass
class Run:
    path: Path
    kind: str
    label: str
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    samples: pd.DataFrame | None = None
    figures: list[Path] = field(default_factory=list)
    training_log: pd.DataFrame | None = None


def _model_label(model_path: str) -> str:
    """A readable name for a model directory: its name, with the parent's when the name is generic."""
    p = Path(model_path)
    if p.name in ("model", "release", "final", "checkpoint", "") and p.parent.name:
        return f"{p.parent.name}/{p.name}" if p.name == "release" else p.parent.name
    return p.name


def _read_table(path: Path, reader) -> pd.DataFrame | None:
    """A run's table if it has one; a damaged file is one clear error line, not a traceback."""
    if not path.exists():
        return None
    try:
        return reader(path)
    except Exception as exc:  # pandas/pyarrow raise many types for a damaged file
        raise MemauditError(f"unreadable {path}: {str(exc).splitlines()[0][:200]}") from None


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
    """Read one run directory (or a trained model directory) into a Run."""
    path = Path(path)
    if not path.is_dir():
        raise MemauditError(f"not a run directory: {path}")
    if (path / "training_log.csv").is_file() or (path / "train_config.json").is_file():
        cfg = read_json(path / "train_config.json") if (path / "train_config.json").is_file() else {}
        log = _read_table(path / "training_log.csv", pd.read_csv)
        summary = _train_summary(cfg, log, path)
        return Run(path, "train", label or _model_label(str(path)), {"command": "train", "settings": cfg},
                   summary, None, sorted(path.glob("*.png")), log)
    if not (path / "config.json").is_file():
        raise MemauditError(f"{path} is neither a run directory (no config.json) nor a trained model directory "
                            "(no training_log.csv)")
    config = read_json(path / "config.json")
    kind = str(config.get("command") or "unknown")
    if kind == "unknown" and config.get("architectures"):
        raise MemauditError(f"{path} is a model directory without a training log: pass its run directories instead")
    if kind == "unknown":
        raise MemauditError(f"{path}: its config.json names no memaudit command: not a run directory")
    summary = read_summary(path)
    samples = _read_table(path / "samples.parquet", pd.read_parquet)
    inputs = config.get("inputs") if isinstance(config.get("inputs"), dict) else {}
    settings = config.get("settings") if isinstance(config.get("settings"), dict) else {}
    model = inputs.get("model") or inputs.get("model_dir") or settings.get("model")
    return Run(path, kind, label or (_model_label(str(model)) if model else path.name), config, summary, samples,
               sorted(path.glob("*.png")))


def _train_summary(cfg: dict, log: pd.DataFrame | None, path: Path) -> dict:
    out: dict[str, Any] = {k: cfg[k] for k in ("objective", "config", "family", "epochs", "steps", "seq_len",
                                                "canaries", "canary_repeats", "goldfish_k", "goldfish_mode",
                                                "sink_fraction", "sink_density") if k in cfg}
    if out.get("objective") != "goldfish":
        out.pop("goldfish_k", None), out.pop("goldfish_mode", None)
    if out.get("objective") != "sinks":
        out.pop("sink_fraction", None), out.pop("sink_density", None)
    if not cfg.get("canaries"):
        out.pop("canaries", None), out.pop("canary_repeats", None)
    if "train_ids" in cfg:
        out["train_documents"] = len(cfg["train_ids"])
    if log is not None and len(log):
        last = log.iloc[-1]
        for col in ("train_loss", "val_loss"):
            if col in log.columns and pd.notna(last[col]):
                out[f"final_{col}"] = float(last[col])
    try:
        total = 0
        for f in path.glob("*.safetensors"):
            with safe_open(str(f), "np") as fh:
                for k in fh.keys():
                    total += int(math.prod(fh.get_slice(k).get_shape()))
        if total:
            out["parameters_stored"] = total
    except Exception:  # parameter count is optional decoration
        pass
    return out


def _get(d: dict, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _scalars(d: dict, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Flatten a summary to dotted scalar fields (numbers, strings, booleans), two levels deep."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth < 1:
            out |= _scalars(v, key + ".", depth + 1)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def headline(run: Run) -> dict[str, Any]:
    """The figures that go in the run kind's comparison table, in order."""
    if run.kind == "mia":
        return mia_headline(run.summary)
    if run.kind == "train":
        return dict(run.summary)
    keys = HEADLINE.get(run.kind)
    if keys:
        return {k: _get(run.summary, k) for k in keys if _get(run.summary, k) is not None}
    flat = _scalars(run.summary)
    return dict(list(flat.items())[:14])


def mia_auc_table(runs: Sequence[Run]) -> tuple[list[str], list[list[Any]]]:
    """AUC of every attack (columns) for every MIA run (rows)."""
    attacks: list[str] = []
    for r in runs:
        for a in (r.summary.get("attacks") or {}):
            if a not in attacks:
                attacks.append(a)
    rows = [[r.label] + [(r.summary.get("attacks") or {}).get(a, {}).get("auc") for a in attacks] for r in runs]
    return ["run"] + attacks, rows


def top_samples(run: Run, n: int = 5) -> tuple[list[str], list[list[Any]]] | None:
    """The n most memorized samples of a run, by the kind's ranking columns; None when there is nothing to rank."""
    if run.kind == "memorization" and isinstance(run.summary.get("top_samples"), list) and run.summary["top_samples"]:
        rows = run.summary["top_samples"][:n]
        cols = [c for c in ("id", "mem_u_bits", "bits_model", "bits_reference", "n_tokens", "text") if c in rows[0]]
        return cols, [[r.get(c) for c in cols] for r in rows]
    df = run.samples
    if df is None or df.empty:
        return None
    for keys in SAMPLE_RANKING.get(run.kind, []):
        if all(k in df.columns for k in keys):
            sub = df[df["member"]] if run.kind == "mia" and "member" in df.columns else df
            top = sub.sort_values(list(keys), ascending=False, kind="stable").head(n)
            cols = [c for c in ("id",) + tuple(keys) if c in top.columns]
            extra = [c for c in ("token_match", "match_prefix", "rouge_l_text", "secret", "member", "n_tokens")
                     if c in top.columns and c not in cols]
            texts = [c for c in TEXT_COLUMNS if c in top.columns]
            cols = cols + extra + texts
            return cols, top[cols].values.tolist()
    return None


# ---------------------------------------------------------------- blocks and renderers

@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | p | table | figure | code | verdict
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    png: bytes = b""
    name: str = ""  # figure file name in the report's figures/


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits, lists joined, None as an empty cell."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    s = str(v)
    return s if len(s) <= MAX_CELL else s[:MAX_CELL] + f"... [{len(s) - MAX_CELL} more characters]"


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]|~])")  # inline Markdown syntax (< > & become entities first)
# a line start that would open a heading, a list item or an ordered list item
_MD_LINE_START = re.compile(r"^(\s*)(#|[+\-](?=\s|$)|\d+(?=[.)](?:\s|$)))")


def md_escape(text: str) -> str:
    """Text safe in Markdown (and in a Markdown table cell): HTML-significant characters as entities,
    Markdown punctuation backslash-escaped, line breaks as spaces."""
    s = html.escape(str(text), quote=True)
    s = _MD_SPECIAL.sub(r"\\\1", s)
    s = re.sub(r"[\r\n\t]+", " ", s)
    return _MD_LINE_START.sub(lambda m: m.group(1) + (m.group(2) + "\\" if m.group(2)[0].isdigit()
                                                     else "\\" + m.group(2)), s)


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]],
                   cell: Callable[[Any], str] = fmt) -> str:
    """A Markdown table: every header and cell (formatted by `cell`) escaped, so data cannot break the table."""
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md_escape(cell(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + md_escape(b.text))
        elif b.kind == "p":
            out.append(md_escape(b.text))
        elif b.kind == "verdict":
            out.append("**" + md_escape(b.text) + "**")
        elif b.kind == "table":
            out.append(markdown_table(b.headers, b.rows))
        elif b.kind == "figure":
            out.append(f"![{md_escape(b.text)}](figures/{b.name})")
        elif b.kind == "code":
            fence = _fence(b.text)
            out.append(f"{fence}text\n{b.text}\n{fence}")
        out.append("")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}h2{margin-top:2em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:1em 0;font-size:.9em;display:block;overflow-x:auto}
th,td{border:1px solid #d0d0d0;padding:.3em .6em;text-align:left;vertical-align:top;max-width:420px;
overflow-wrap:anywhere}th{background:#f4f4f6;overflow-wrap:normal;white-space:nowrap}tr:nth-child(even) td{background:#fafafa}td:first-child{white-space:nowrap}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.8em;white-space:pre-wrap;overflow-wrap:anywhere}
.verdict{font-weight:bold;font-size:1.1em;padding:.6em;border-left:4px solid #444;background:#f4f4f6}
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "verdict":
            out.append(f'<p class="verdict">{e(b.text)}</p>')
        elif b.kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<figure><img alt="{e(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b.text)}</figcaption></figure>")
        elif b.kind == "code":
            out.append(f"<pre>{e(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------- building the report

KIND_TITLES = {"train": "Trained models", "extract": "Extraction", "mia": "Membership inference",
               "memorization": "Unintended memorization", "capacity": "Capacity", "exposure": "Canary exposure",
               "risk": "Pre-release risk"}
KIND_ORDER = ["risk", "train", "extract", "mia", "memorization", "exposure", "capacity"]
# Metrics drawn side by side when several runs of a kind are compared.
COMPARE_METRICS = {"extract": ["exact_rate", "mean_token_match", "mean_rouge_l"],
                   "mia": ["loss_auc", "best_auc"],
                   "memorization": ["mem_u_bits_per_token", "fraction_samples_with_mem_u"],
                   "exposure": ["mean_exposure_bits"]}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:60] or "run"


def _unique_labels(runs: list[Run]) -> None:
    seen: dict[tuple[str, str], int] = {}
    for r in runs:
        key = (r.kind, r.label)
        seen[key] = seen.get(key, 0) + 1
    for r in runs:
        if seen[(r.kind, r.label)] > 1:
            r.label = f"{r.label} ({r.path.name})"


def _comparison_figure(kind: str, runs: list[Run]) -> bytes | None:
    metrics = [m for m in COMPARE_METRICS.get(kind, []) if any(isinstance(headline(r).get(m), (int, float))
                                                               for r in runs)]
    if len(runs) < 2 or not metrics:
        return None

    plt = pyplot()

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes[0], metrics):
        vals = [headline(r).get(m) for r in runs]
        vals = [float(v) if isinstance(v, (int, float)) else np.nan for v in vals]
        ax.bar(range(len(runs)), vals, color=[colors[i % len(colors)] for i in range(len(runs))])
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([r.label for r in runs], rotation=20, ha="right", fontsize=8)
        ax.set_title(m, fontsize=9)
        for i, v in enumerate(vals):
            if not np.isnan(v):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"{KIND_TITLES.get(kind, kind)}: runs compared", fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)


def _training_figure(runs: list[Run]) -> bytes | None:
    logs = [(r.label, r.training_log) for r in runs if r.training_log is not None and len(r.training_log)]
    if not logs:
        return None

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, (label, log) in enumerate(logs):
        x = log["epoch"] if "epoch" in log.columns else range(len(log))
        color = f"C{i % 10}"
        if "train_loss" in log.columns:
            ax.plot(x, log["train_loss"], color=color, label=f"{label} train")
        if "val_loss" in log.columns and log["val_loss"].notna().any():
            ax.plot(x, log["val_loss"], color=color, ls="--", label=f"{label} validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def _settings_text(run: Run) -> str:
    cfg = run.config
    keep = {k: cfg[k] for k in ("command", "settings", "inputs", "versions", "started") if k in cfg}
    return json.dumps(keep, indent=2, default=str, ensure_ascii=False)


def _risk_blocks(run: Run) -> list[Block]:
    s = run.summary
    blocks: list[Block] = []
    if s.get("verdict"):
        blocks.append(Block("verdict", text=str(s["verdict"])))
    pred = s.get("prediction") or {}
    if pred:
        blocks.append(Block("h3", text="Prediction (before training)"))
        blocks.append(Block("table", headers=["quantity", "value"],
                            rows=[[k, v] for k, v in _scalars(pred).items()]))
    laws = s.get("mia_laws") or []
    if laws:
        blocks.append(Block("table", headers=["MIA law", "predicted F1", "source"],
                            rows=[[l.get("name"), l.get("predicted_mia_f1"), l.get("source")] for l in laws]))
    measured = s.get("measured") or {}
    if measured:
        blocks.append(Block("h3", text="Measured (after training)"))
        blocks.append(Block("table", headers=["figure", "value", "threshold", "over?"],
                            rows=[[k, v, (s.get("thresholds") or {}).get(k),
                                   k in (s.get("exceeded") or {})] for k, v in measured.items()]))
    return blocks


def build_blocks(runs: list[Run], title: str, top: int = 5) -> list[Block]:
    blocks = [Block("h1", text=title),
              Block("p", text=f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by memaudit from "
                              f"{len(runs)} run(s): " + ", ".join(f"{r.label} [{r.kind}]" for r in runs) + ".")]
    kinds = sorted({r.kind for r in runs}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))
    # the headline table: one row per run for each kind
    blocks.append(Block("h2", text="Headline"))
    for kind in kinds:
        group = [r for r in runs if r.kind == kind]
        heads = [headline(r) for r in group]
        cols: list[str] = []
        for h in heads:
            cols += [c for c in h if c not in cols]
        blocks.append(Block("h3", text=KIND_TITLES.get(kind, kind)))
        if cols:
            blocks.append(Block("table", headers=["run"] + cols, rows=[[r.label] + [h.get(c) for c in cols]
                                                                       for r, h in zip(group, heads)]))
        else:
            blocks.append(Block("p", text="No headline figures: these runs have no summary.json (a run that did not "
                                          "finish writes none; --resume finishes it)."))
    # per kind: comparisons, figures, samples
    for kind in kinds:
        group = [r for r in runs if r.kind == kind]
        blocks.append(Block("h2", text=KIND_TITLES.get(kind, kind)))
        if kind == "risk":
            for r in group:
                if len(group) > 1:
                    blocks.append(Block("h3", text=r.label))
                blocks += _risk_blocks(r)
        if kind == "mia":
            headers, rows = mia_auc_table(group)
            if len(headers) > 1:
                blocks.append(Block("p", text="ROC AUC of every attack (higher score = member; 0.5 = chance)."))
                blocks.append(Block("table", headers=headers, rows=rows))
        cmp_png = _comparison_figure(kind, group)
        if cmp_png:
            blocks.append(Block("figure", text=f"{KIND_TITLES.get(kind, kind)}: runs side by side",
                                png=cmp_png, name=f"compare-{_safe_name(kind)}.png"))
        if kind == "train":
            png = _training_figure(group)
            if png:
                blocks.append(Block("figure", text="Training and validation loss per epoch", png=png,
                                    name="training-curves.png"))
        for r in group:
            for f in r.figures:
                blocks.append(Block("figure", text=f"{r.label}: {f.stem}", png=f.read_bytes(),
                                    name=f"{_safe_name(kind)}-{_safe_name(r.label)}-{_safe_name(f.name)}"))
        for r in group:
            ts = top_samples(r, top)
            if ts:
                blocks.append(Block("h3", text=f"Most memorized samples: {r.label}"))
                blocks.append(Block("table", headers=ts[0], rows=ts[1]))
    blocks.append(Block("h2", text="Settings and versions"))
    for r in runs:
        blocks.append(Block("h3", text=f"{r.label} [{r.kind}]: {r.path}"))
        blocks.append(Block("code", text=_settings_text(r)))
    return _unique_figure_names(blocks)


def _unique_figure_names(blocks: list[Block]) -> list[Block]:
    seen: set[str] = set()
    for b in blocks:
        if b.kind == "figure":
            base, n = b.name, 1
            while b.name in seen:
                n += 1
                b.name = f"{Path(base).stem}-{n}.png"
            seen.add(b.name)
    return blocks


@dataclass(kw_only=True)
class ReportSettings:
    """Every option of `memaudit report`."""
    run_dirs: Sequence[str | os.PathLike]  # run directories and/or trained model directories
    out: str | os.PathLike = "reports/report"  # folder for report.md, report.html and figures/
    labels: Sequence[str] | None = None  # one per run directory, in order; default: the model's directory name
    title: str = "memaudit report"
    top: int = 5  # most memorized samples listed per run

    def validate(self) -> None:
        if not self.run_dirs:
            raise MemauditError("give at least one run directory")
        if self.labels and len(self.labels) != len(self.run_dirs):
            raise MemauditError(f"--label was given {len(self.labels)} times for {len(self.run_dirs)} run "
                                "directories: give one label per run directory, in the same order")
        checks.integer("--top", self.top, low=0)


@dataclass
class ReportResult:
    path: Path  # the report folder
    markdown: Path
    html: Path
    figures: int
    runs: list[tuple[str, str, str]]  # (label, kind, run directory) per run, in order


def report(settings: ReportSettings | None = None, /, **options: Any) -> ReportResult:
    """Write OUT/report.md, OUT/report.html (self-contained) and OUT/figures/*.png from run directories."""
    s = settings_from(ReportSettings, settings, options)
    s.validate()
    out = Path(s.out)
    check_output(out, "report", inputs=s.run_dirs, reuse=True)
    runs = _load_runs(s)
    blocks = build_blocks(runs, s.title, s.top)
    owned = Owned(out, "report", inputs=s.run_dirs, reuse=True)
    if (out / "figures").is_dir():  # the previous report's figures (a folder this command owns)
        shutil.rmtree(out / "figures")
    for b in blocks:
        if b.kind == "figure":
            owned.write_bytes(f"figures/{b.name}", b.png)
    owned.write_bytes("report.md", render_markdown(blocks).encode("utf-8"))
    owned.write_bytes("report.html", render_html(blocks, s.title).encode("utf-8"))
    return ReportResult(path=out, markdown=out / "report.md", html=out / "report.html",
                        figures=sum(b.kind == "figure" for b in blocks),
                        runs=[(r.label, r.kind, str(r.path)) for r in runs])


def _load_runs(s: ReportSettings) -> list[Run]:
    runs = [load_run(d, s.labels[i] if s.labels else None) for i, d in enumerate(s.run_dirs)]
    if s.labels:
        kinds_labels = [(r.kind, r.label) for r in runs]
        if dup := next((kl for i, kl in enumerate(kinds_labels) if kl in kinds_labels[:i]), None):
            raise MemauditError(f"--label {dup[1]!r} names two {dup[0]} runs: give runs of a kind distinct labels")
    else:
        _unique_labels(runs)
    return runs
