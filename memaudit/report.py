"""Reports a privacy reviewer reads in a minute: report.md (readable on a code-hosting site) and a printable,
self-contained report.html (one column, figures embedded, a page break between sections), from any mix of run
directories.

The order is the reader's: the key findings first (what was measured and on what; the verdict against the
`--fail-above` limits when a risk run set any; one sentence per probe; the figures at a glance), then one section
per probe (its figures, the explanation a number needs, and the evidence: the most reproduced samples with the
model's continuation beside the true one, the memorization map of whole-document runs, ROC curves on a log
false-positive axis), then the settings and provenance of every run. Labels, units and number formats come from
the one table in `memaudit.labels`.

A report is built as a list of blocks and rendered twice. Every string in a block is data and is escaped by the
renderer: training text can hold HTML, script or Markdown, and it must show as text. Markup comes only from the
renderers themselves.

Run kinds are read from config.json's "command" (extract, mia, memorization, capacity, exposure, risk, ...);
a model directory written by `memaudit train` (training_log.csv / train_config.json) is the kind "train".
Several runs of one kind are compared side by side, labelled by `labels` or by the model's directory name.
"""
from __future__ import annotations

import base64
import difflib
import html
import math
import os
import re
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from safetensors import safe_open

from . import checks
from .capacity.laws import LAWS, mia_law
from .errors import MemauditError
from .figures import png_bytes, pyplot
from .labels import attack_label, heading, label, number, percent, value
from .membership import mia_headline
from .memorization import escape_text
from .metrics import roc_curve
from .rundir import Owned, check_output, read_json, read_summary
from .settings import settings_from
from .version import __version__

# Headline fields per kind, in display order (dotted paths into summary.json); missing ones are skipped.
HEADLINE = {
    "extract": ["n_samples", "n_exact", "exact_rate", "mean_token_match", "mean_match_prefix", "mean_rouge_l",
                "mean_rouge_l_text", "np_discoverable_rate", "documents.n_documents",
                "documents.documents_with_exact", "documents.mean_exact_fraction",
                "documents.reproduced_token_fraction", "decoding", "prefix", "suffix"],
    "memorization": ["n_samples", "total_mem_u_bits", "mem_u_bits_per_token", "fraction_samples_with_mem_u",
                     "mem_u_bits.mean", "bits_model_per_byte", "bits_reference_per_byte", "reference"],
    "exposure": ["n_canaries", "mean_exposure_bits", "max_exposure_bits", "max_possible_exposure_bits",
                 "mean_control_exposure_bits", "n_controls", "methods"],
    "risk": ["mode", "params", "train_sequences", "capacity_bits", "data_bits", "data_to_capacity_ratio", "regime",
             "predicted_mia_f1", "mia_law"],
}
# The figures of the at-a-glance table at the top: (kind, key), one column each when any run has it.
GLANCE = [("extract", "exact_rate"), ("extract", "mean_rouge_l"), ("mia", "loss_auc"),
          ("mia", "loss_tpr_at_1pct_fpr"), ("memorization", "mem_u_bits_per_token"), ("exposure", "max_exposure_bits")]
KIND_TITLES = {"train": "Trained models", "extract": "Extraction", "mia": "Membership inference",
               "memorization": "Unintended memorization", "capacity": "Capacity", "exposure": "Canary exposure",
               "risk": "Pre-release risk"}
KIND_ORDER = ["risk", "extract", "mia", "memorization", "exposure", "capacity", "train"]
# Metrics drawn side by side when several runs of a kind are compared.
COMPARE_METRICS = {"extract": ["exact_rate", "mean_token_match", "mean_rouge_l"],
                   "mia": ["loss_auc", "best_auc"],
                   "memorization": ["mem_u_bits_per_token", "fraction_samples_with_mem_u"],
                   "exposure": ["mean_exposure_bits"]}
DOCUMENT_COLUMNS = ("id", "n_tokens", "n_windows", "exact_fraction", "reproduced_tokens", "longest_reproduced_run",
                    "mean_rouge_l")
MEM_DOCUMENT_COLUMNS = ("id", "n_tokens", "n_windows", "mem_u_bits", "mem_u_bits_per_token", "max_window_mem_u_bits",
                        "windows_with_mem_u")
MAX_CELL = 300  # characters of a value shown per table cell
MAX_TEXT = 600  # characters of sample text shown per continuation or passage
MAX_COLUMNS = 7  # wider tables are transposed (runs become columns), so none scrolls sideways at 1280 px
DIVERGENCE = "‖"  # marks where the model's continuation first departs from the true one

AUC_NOTE = ("AUC is the probability that a random member scores higher than a random non-member: 0.5 is chance, "
            "1 means every member scores above every non-member.")
TPR_NOTE = ("True positives at 1% false positives: the share of members an attack catches when it may wrongly flag "
            "only 1 in 100 non-members, how the field reads the attack on the samples it is sure about (Carlini et "
            "al. 2022); the ROC curves below use a log false-positive axis for that reason.")
EXTRACT_NOTE = ("A continuation is reproduced verbatim when decoding from the true prompt returns every true "
                "continuation token (k-extractability, Carlini et al. 2023); ROUGE-L (0 to 1) credits partial "
                "overlap.")
PAIRS_NOTE = (f"Highlighted: stretches of two or more words the model reproduced; {DIVERGENCE} marks where its "
              "continuation first departs from the true one.")


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
    documents: pd.DataFrame | None = None  # documents.parquet of a whole-document extract run


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
    documents = _read_table(path / "documents.parquet", pd.read_parquet)
    model = _model_path(config)
    return Run(path, kind, label or (_model_label(str(model)) if model else path.name), config, summary, samples,
               sorted(path.glob("*.png")), documents=documents)


def _model_path(config: dict) -> str | None:
    inputs = config.get("inputs") if isinstance(config.get("inputs"), dict) else {}
    settings = config.get("settings") if isinstance(config.get("settings"), dict) else {}
    model = inputs.get("model") or inputs.get("model_dir") or settings.get("model")
    return str(model) if model else None


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
        keys = [k for k in keys if not k.startswith("documents.") or _whole_documents(run)]
        return {k: _get(run.summary, k) for k in keys if _get(run.summary, k) is not None}
    flat = {k: v for k, v in _scalars(run.summary).items() if k not in ("schema_version", "command")}
    return dict(list(flat.items())[:14])


def _whole_documents(run: Run) -> bool:
    """An extract or memorization run that read several windows of some document (its documents table says more
    than a window per document)."""
    docs = run.documents
    return docs is not None and "n_windows" in docs.columns and bool((docs["n_windows"] > 1).any())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------- blocks and renderers

Part = tuple  # (text, style): style "" plain, "b" bold, "code", "mark" reproduced text, "div" the divergence point


@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | meta | p | note | verdict | findings | table | figure | code | passage
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)  # table cells: a value, or a list of parts
    png: bytes = b""
    name: str = ""  # figure file name in the report's figures/
    parts: list[Part] = field(default_factory=list)  # p, note, meta, verdict, a passage's title
    items: list[list[Part]] = field(default_factory=list)  # findings: one list of parts per finding; passage text
    status: str = ""  # verdict: pass | fail | none
    anchor: str = ""  # h2: the id of the section it opens
    css: str = ""  # table: "pairs" for the continuation tables


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


def _md_inline(parts: Sequence[Part]) -> str:
    """Parts as Markdown: data escaped; bold and code of data through <b>/<code> (no emphasis-flanking rules)."""
    out = []
    for text, style in parts:
        core = str(text).strip()
        lead, trail = (" " if text[:1].isspace() else ""), (" " if text[-1:].isspace() else "")
        if style == "div":
            out.append(DIVERGENCE)
        elif style == "b" and core:
            out.append(f"{lead}**{md_escape(core)}**{trail}")
        elif style in ("mark", "code") and core:
            tag = "b" if style == "mark" else "code"
            out.append(f"{lead}<{tag}>{md_escape(core)}</{tag}>{trail}")
        else:
            out.append(md_escape(text))
    return "".join(out)


def _md_cell(c: Any) -> str:
    return _md_inline(c) if isinstance(c, list) else md_escape(fmt(c))


def _md_block(b: Block) -> str:
    if b.kind in ("h1", "h2", "h3"):
        return "#" * int(b.kind[1]) + " " + md_escape(b.text)
    if b.kind in ("p", "note", "meta"):
        return _md_inline(b.parts) if b.parts else md_escape(b.text)
    if b.kind == "verdict":
        return "> " + _md_inline(b.parts)
    if b.kind == "findings":
        return "\n".join("- " + _md_inline(item) for item in b.items)
    if b.kind == "table":
        lines = ["| " + " | ".join(md_escape(h) for h in b.headers) + " |", "|" + "---|" * len(b.headers)]
        return "\n".join(lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows])
    if b.kind == "figure":
        return f"![{md_escape(b.text)}](figures/{b.name})\n\n{md_escape(b.text)}"
    if b.kind == "passage":
        return _md_inline(b.parts) + "\n\n" + "\n".join("> " + _md_inline(p) for p in b.items)
    if b.kind == "code":
        fence = _fence(b.text)
        return f"{fence}text\n{b.text}\n{fence}"
    return ""


def render_markdown(blocks: Sequence[Block]) -> str:
    return "\n\n".join(s for s in (_md_block(b) for b in blocks) if s) + "\n"


_CSS = """
:root{--fail:#b42318;--pass:#1a7f37;--line:#d0d7de}
*{box-sizing:border-box}
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:62rem;
margin:1.2rem auto 3rem;padding:0 1.25rem;color:#1f2328;hyphens:none}
h1{font-size:1.55rem;margin:0 0 .1em}h2{font-size:1.3rem;margin:1.6em 0 .5em;padding-bottom:.2em;
border-bottom:1px solid var(--line)}h3{font-size:1.05rem;margin:1.4em 0 .4em}
p,li,td,th,figcaption,h1,h2,h3{overflow-wrap:break-word}
.meta{color:#59636e;font-size:.88rem;margin:0 0 .4em}
.note{color:#3d444d;font-size:.92rem;border-left:3px solid #c8d1dc;padding:.1em 0 .1em .75em}
.verdict{font-size:1.1rem;padding:.55em .8em;border-left:6px solid #8c959f;background:#f6f8fa;margin:.6em 0}
.verdict.fail{border-color:var(--fail);background:#ffebe9}.verdict.pass{border-color:var(--pass);background:#dafbe1}
ul.findings{padding-left:1.2em;margin:.5em 0}ul.findings li{margin:.3em 0}
table{border-collapse:collapse;margin:.7em 0;max-width:100%;font-size:.9rem}
th,td{border:1px solid var(--line);padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}tr:nth-child(even) td{background:#fbfbfc}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
table.pairs{table-layout:fixed;width:100%}table.pairs th:first-child{width:11rem}
table.pairs td{font-size:.88rem}
td.fail{color:var(--fail);font-weight:700}td.pass{color:var(--pass);font-weight:700}
mark{background:#ffe08a;color:inherit;padding:0}
.div{color:var(--fail);font-weight:700;padding:0 .1em}
.passage{border:1px solid var(--line);border-radius:4px;padding:.5em .8em;margin:.7em 0}
.passage p{margin:.2em 0}.passage .text{font-size:.9rem;white-space:pre-wrap}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#59636e;font-size:.88rem}
code{font-size:.86em;background:#f2f3f5;padding:0 .2em;border-radius:3px;overflow-wrap:anywhere}
pre{background:#f6f8fa;padding:.8em;font-size:.8em;white-space:pre-wrap;overflow-wrap:anywhere}
td.value{overflow-wrap:anywhere}
@media print{body{max-width:none;margin:0;padding:0;font-size:10.5pt}section{break-before:page}
section:first-of-type{break-before:auto}h2,h3{break-after:avoid}
table,figure,.passage,.verdict,tr{break-inside:avoid}figure img{max-height:22cm}}
"""
_NUMERIC = re.compile(r"^[<>\-+]?[0-9][0-9.,×⁻⁰¹²³⁴⁵⁶⁷⁸⁹ /%()]*$")


def _html_inline(parts: Sequence[Part]) -> str:
    tags = {"b": "strong", "code": "code", "mark": "mark"}
    out = []
    for text, style in parts:
        if style == "div":
            out.append(f'<span class="div" title="first divergence">{DIVERGENCE}</span>')
        elif style in tags:
            out.append(f"<{tags[style]}>{html.escape(str(text))}</{tags[style]}>")
        else:
            out.append(html.escape(str(text)))
    return "".join(out)


def _html_cell(c: Any, wrap: bool) -> str:
    if isinstance(c, list):
        return f"<td>{_html_inline(c)}</td>"
    text = fmt(c)
    cls = "num" if _NUMERIC.match(text) else "fail" if text == "FAIL" else "pass" if text == "pass" else ""
    cls = "value" if wrap else cls  # settings: paths and hashes wrap anywhere, every value left-aligned
    return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"


def _html_block(b: Block) -> str:
    e = html.escape
    if b.kind in ("h1", "h3"):
        return f"<{b.kind}>{e(b.text)}</{b.kind}>"
    if b.kind in ("p", "note", "meta"):
        cls = f' class="{b.kind}"' if b.kind != "p" else ""
        return f"<p{cls}>{_html_inline(b.parts) if b.parts else e(b.text)}</p>"
    if b.kind == "verdict":
        return f'<p class="verdict {e(b.status)}">{_html_inline(b.parts)}</p>'
    if b.kind == "findings":
        return '<ul class="findings">' + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>"
    if b.kind == "table":
        head = "".join(f"<th>{e(str(h))}</th>" for h in b.headers)
        wrap = b.css == "settings"
        body = "".join("<tr>" + "".join(_html_cell(c, wrap) for c in row) + "</tr>" for row in b.rows)
        cls = f' class="{e(b.css)}"' if b.css else ""
        return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if b.kind == "figure":
        data = base64.b64encode(b.png).decode("ascii")
        return (f'<figure><img alt="{e(b.text)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(b.text)}</figcaption></figure>")
    if b.kind == "passage":
        text = "".join(f'<p class="text">{_html_inline(p)}</p>' for p in b.items)
        return f'<div class="passage"><p>{_html_inline(b.parts)}</p>{text}</div>'
    if b.kind == "code":
        return f"<pre>{e(b.text)}</pre>"
    return ""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained page: each h2 opens a <section> (a page of its own when printed)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><header>"]
    opened = "header"
    for b in blocks:
        if b.kind == "h2":
            out.append(f"</{opened}>")
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            out.append(f"<section{anchor}><h2>{html.escape(b.text)}</h2>")
            opened = "section"
        else:
            out.append(_html_block(b))
    out.append(f"</{opened}></body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------- figures (matplotlib Figure objects)

def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def _panels(n: int, width: float = 4.3, height: float = 3.4, cols: int = 3):
    """A grid of n axes, at most `cols` a row; the unused ones hidden."""
    plt = pyplot()
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


def compare_figure(kind: str, runs: list[Run]):
    """Bars of the kind's comparison metrics, one bar per run, value labels inside the frame."""
    metrics = [m for m in COMPARE_METRICS.get(kind, []) if any(_is_number(headline(r).get(m)) for r in runs)]
    if len(runs) < 2 or not metrics:
        return None
    fig, axes = _panels(len(metrics), width=3.9, height=3.5, cols=len(metrics))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, m in zip(axes, metrics):
        lab = label(m)
        raw = [headline(r).get(m) for r in runs]
        scale = 100.0 if lab.kind == "rate" else 1.0
        vals = [float(v) * scale if _is_number(v) else np.nan for v in raw]
        ax.bar(range(len(runs)), vals, color=colors)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([_wrap(r.label, 12) for r in runs], fontsize=7.5)
        ax.set_xlabel("run", fontsize=8)
        ax.set_ylabel(_wrap(f"{lab.text} (%)" if scale == 100 else heading(m), 30), fontsize=8)
        top = max([v for v in vals if not np.isnan(v)] + [0.0]) or 1.0
        ax.set_ylim(0, (100.0 if scale == 100 else top) * 1.18)
        for i, (v, r) in enumerate(zip(vals, raw)):
            if not np.isnan(v):
                ax.text(i, v + ax.get_ylim()[1] * 0.015, value(m, r), ha="center", va="bottom", fontsize=7.5)
        ax.set_title(_wrap(lab.text, 34), fontsize=9)
    fig.tight_layout()
    return fig


def training_figure(runs: list[Run]) -> tuple[Any, bool] | None:
    """Training loss per epoch of every model (and validation loss, dashed, where it was logged)."""
    logs = [(r.label, r.training_log) for r in runs if r.training_log is not None and len(r.training_log)
            and "train_loss" in r.training_log.columns]
    if not logs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    validation = False
    for i, (name, log) in enumerate(logs):
        x = log["epoch"] if "epoch" in log.columns else range(len(log))
        ax.plot(x, log["train_loss"], color=f"C{i % 10}", label=f"{name}, training")
        if "val_loss" in log.columns and log["val_loss"].notna().any():
            ax.plot(x, log["val_loss"], color=f"C{i % 10}", ls="--", label=f"{name}, validation")
            validation = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training loss" + (" and validation loss" if validation else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, validation


def reach_figure(runs: list[Run]):
    """Per extract run, the share of samples whose first x continuation tokens come back right, x = 0..suffix."""
    runs = [r for r in runs if r.samples is not None and "match_prefix" in r.samples.columns and len(r.samples)]
    if not runs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, r in enumerate(runs):
        S = int(r.summary.get("suffix") or r.samples["match_prefix"].max())
        mp = r.samples["match_prefix"].to_numpy(dtype=float)
        x = np.arange(S + 1)
        ax.plot(x, [100.0 * float((mp >= k).mean()) for k in x], color=f"C{i % 10}", label=r.label,
                drawstyle="steps-post")
    ax.set_xlabel("continuation tokens right before the first divergence (at least)")
    ax.set_ylabel("samples (%)")
    ax.set_ylim(-2, 104)
    ax.set_title("How far each model follows the true continuation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _score_columns(run: Run) -> list[str]:
    cols = [f"score_{c}" for c in (run.summary.get("columns") or [])]
    return [c for c in cols if c in run.samples.columns] or [c for c in run.samples.columns if c.startswith("score_")]


def _mia_runs(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.samples is not None and "member" in r.samples.columns
            and r.samples["member"].nunique() == 2 and _score_columns(r)]


def roc_figure(runs: list[Run]):
    """ROC curves of every attack, one panel per run, on a log false-positive axis (as the field reads low FPR)."""
    runs = _mia_runs(runs)
    if not runs:
        return None
    fig, axes = _panels(len(runs), width=4.6, height=3.8, cols=2)
    for ax, r in zip(axes, runs):
        member = r.samples["member"].to_numpy(dtype=bool)
        lo = 1.0 / max(2, int((~member).sum()))
        for i, col in enumerate(_score_columns(r)):
            s = r.samples[col].to_numpy(dtype=float)
            ok = ~np.isnan(s)
            if len(set(member[ok])) < 2:
                continue
            fpr, tpr, _ = roc_curve(s[ok], member[ok])
            auc = ((r.summary.get("attacks") or {}).get(col[6:]) or {}).get("auc")
            name = attack_label(col[6:]) + (f", AUC {auc:.3f}" if _is_number(auc) else "")
            ax.plot(np.maximum(fpr, lo / 2), tpr, drawstyle="steps-post", color=f"C{i % 10}", label=name, lw=1.2)
        x = np.logspace(math.log10(lo / 2), 0, 60)
        ax.plot(x, x, "k:", lw=0.8, label="chance")
        ax.axvline(0.01, color="0.6", lw=0.7, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(lo / 2, 1)
        ax.set_ylim(0, 1.03)
        ax.set_xlabel("false positive rate (log scale)")
        ax.set_ylabel("true positive rate")
        ax.set_title(r.label, fontsize=10)
        ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    return fig


def score_figure(runs: list[Run]):
    """The loss attack's score for members and non-members, one panel per run."""
    runs = _mia_runs(runs)
    if not runs:
        return None
    fig, axes = _panels(len(runs), width=4.6, height=3.2, cols=2)
    for ax, r in zip(axes, runs):
        cols = _score_columns(r)
        col = "score_loss" if "score_loss" in cols else cols[0]
        s = r.samples[col].to_numpy(dtype=float)
        member = r.samples["member"].to_numpy(dtype=bool)
        ok = ~np.isnan(s)
        bins = np.histogram_bin_edges(s[ok], bins=30)
        ax.hist(s[ok & member], bins=bins, alpha=0.65, color="C3", label="members")
        ax.hist(s[ok & ~member], bins=bins, alpha=0.65, color="C0", label="non-members")
        what = ("mean log-likelihood per token (nats)" if col == "score_loss"
                else f"{attack_label(col[6:])} score")
        ax.set_xlabel(f"{what}, higher = member", fontsize=8.5)
        ax.set_ylabel("samples")
        ax.set_title(r.label, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def mem_u_figure(runs: list[Run]):
    """The distribution of unintended memorization per sample, one outline per run."""
    runs = [r for r in runs if r.samples is not None and "mem_u_bits" in r.samples.columns and len(r.samples)]
    if not runs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    every = np.concatenate([r.samples["mem_u_bits"].to_numpy(dtype=float) for r in runs])
    bins = np.histogram_bin_edges(every, bins=min(40, max(8, len(every) // 6)))
    for i, r in enumerate(runs):
        ax.hist(r.samples["mem_u_bits"].to_numpy(dtype=float), bins=bins, histtype="step", lw=1.6,
                color=f"C{i % 10}", label=r.label)
    ax.set_xlabel("unintended memorization per sample (bits)")
    ax.set_ylabel("samples")
    ax.set_title("Unintended memorization per sample")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def law_figure(run: Run):
    """The MIA law's predicted F1 against training sequences per parameter, with this model's point."""
    pred = run.summary.get("prediction") or {}
    constants = LAWS.get(str(run.summary.get("mia_law")))
    params, seqs = pred.get("params"), pred.get("train_sequences")
    if not constants or not _is_number(params) or not _is_number(seqs) or params <= 0 or seqs <= 0:
        return None
    plt = pyplot()
    ratio = seqs / params
    x = np.logspace(min(math.log10(ratio), -3) - 0.5, max(math.log10(ratio), 0) + 0.5, 300)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(x, np.minimum(1.0, mia_law(x, **constants)), color="C0", label=f"law {run.summary['mia_law']}")
    ax.scatter([ratio], [min(1.0, float(mia_law(ratio, **constants)))], color="C3", zorder=3,
               label=f"this model: N/P = {number(ratio)}")
    ax.axhline(0.5, color="k", ls=":", lw=0.8, label="chance (F1 0.5)")
    ax.set_xscale("log")
    ax.set_ylim(0.45, 1.05)
    ax.set_xlabel("training sequences per parameter, N/P (log scale)")
    ax.set_ylabel("predicted loss-attack F1")
    ax.set_title("The MIA scaling law (Morris et al. 2025)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _figure_block(fig: Any, caption: str, name: str) -> list[Block]:
    return [Block("figure", text=caption, png=png_bytes(fig), name=name)] if fig is not None else []


def _run_figures(r: Run, names: Sequence[str] | None = None) -> list[Block]:
    """A run's own PNG files (all, or those named), embedded as they are."""
    files = [f for f in r.figures if names is None or f.name in names]
    return [Block("figure", text=f"{r.label}: {f.stem.replace('_', ' ')}", png=f.read_bytes(),
                  name=f"{_safe_name(r.kind)}-{_safe_name(r.label)}-{_safe_name(f.name)}") for f in files]


# ---------------------------------------------------------------- tables

def _fit_table(headers: list[str], rows: list[list[Any]], css: str = "", corner: str = "") -> list[Block]:
    """A table that fits 1280 px: one with more than MAX_COLUMNS columns is transposed (its rows become columns,
    `corner` names the first column), and split when still too wide."""
    if len(headers) <= MAX_COLUMNS:
        return [Block("table", headers=headers, rows=rows, css=css)]
    out = []
    for start in range(0, len(rows), MAX_COLUMNS - 1):
        chunk = rows[start:start + MAX_COLUMNS - 1]
        out.append(Block("table", headers=[corner] + [str(r[0]) for r in chunk], css=css,
                         rows=[[h] + [r[i] for r in chunk] for i, h in enumerate(headers) if i > 0]))
    return out


def _headline_table(group: list[Run]) -> list[Block]:
    heads = [headline(r) for r in group]
    cols: list[str] = []
    for h in heads:
        cols += [c for c in h if c not in cols]
    if not cols:
        return [Block("p", text="No figures: these runs have no summary.json (a run that did not finish writes "
                                "none; --resume finishes it).")]
    rows = [[r.label] + [value(c, h.get(c)) for c in cols] for r, h in zip(group, heads)]
    return _fit_table(["run"] + [heading(c) for c in cols], rows, corner="figure")


def _glance(runs: list[Run]) -> list[Block]:
    """One row per label (model), one column per headline figure any run has: the demo's table."""
    order: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    for r in runs:
        for kind, key in GLANCE:
            v = headline(r).get(key) if r.kind == kind else None
            if v is None:
                continue
            if key == "exact_rate" and _is_number(r.summary.get("n_exact")) and _is_number(r.summary.get("n_samples")):
                text = f"{r.summary['n_exact']:,}/{r.summary['n_samples']:,} ({percent(v)})"
            else:
                text = value(key, v)
            cells.setdefault(r.label, {})[key] = text
            order += [r.label] if r.label not in order else []
    keys = [k for _, k in GLANCE if any(k in c for c in cells.values())]
    if len(order) < 2:  # one model: the findings above say it all
        return []
    headers = ["run"] + [heading(k) for k in keys]
    return _fit_table(headers, [[name] + [cells[name].get(k, "") for k in keys] for name in order], corner="figure")


# ---------------------------------------------------------------- key findings

def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _scope(runs: list[Run], kinds: list[str]) -> list[Part]:
    """What was measured, on which models and which data."""
    probes = [KIND_TITLES.get(k, k).lower() for k in kinds if k not in ("train", "risk")]
    models: dict[str, str] = {}  # label -> the model measured (a sinks model's release, not its training folder)
    for r in sorted(runs, key=lambda r: r.kind == "train"):
        path = str(r.path) if r.kind == "train" else _model_path(r.config)
        if path and r.label not in models and path not in models.values():
            models[r.label] = path
    models = {name: models[name] for name in dict.fromkeys(r.label for r in runs) if name in models}
    parts: list[Part] = [("What was measured: ", "b"),
                         (_join(probes) if probes else "nothing yet; a prediction from the planned size", "")]
    if models:
        parts.append((f", on {len(models)} model{'s' if len(models) > 1 else ''}: ", ""))
        for i, (name, path) in enumerate(models.items()):
            parts += [(("; " if i else "") + f"{name} ", ""), (path, "code")]
    data = _data_files(runs)
    if data:
        parts.append(("; data: ", ""))
        for i, (path, role) in enumerate(data.items()):
            parts += [("; " if i else "", ""), (path, "code"), (f" ({role})", "")]
    return parts + [(".", "")]


def _data_files(runs: list[Run]) -> dict[str, str]:
    roles: dict[str, str] = {}
    rank = {"probed": 0, "trained on": 1, "never trained on": 1}

    def note(path: Any, role: str) -> None:
        if path and rank[role] >= rank.get(roles.get(str(path), "probed"), 0):
            roles[str(path)] = role

    for r in runs:
        inputs = r.config.get("inputs") if isinstance(r.config.get("inputs"), dict) else {}
        settings = r.config.get("settings") if isinstance(r.config.get("settings"), dict) else {}
        if r.kind == "train":
            note(settings.get("data"), "trained on")
        note(inputs.get("members"), "trained on")
        note(inputs.get("nonmembers"), "never trained on")
        note(inputs.get("data"), "trained on" if r.kind == "risk" else "probed")
    return dict(sorted(roles.items(), key=lambda kv: ["trained on", "never trained on", "probed"].index(kv[1])))


def _extract_finding(group: list[Run]) -> list[Part] | None:
    def verbatim(r: Run) -> str | None:
        s = r.summary
        if not _is_number(s.get("exact_rate")):
            return None
        return f"{s.get('n_exact', 0):,} of {s.get('n_samples', 0):,} ({percent(s['exact_rate'])})"

    def documents(r: Run) -> str:
        docs = r.summary.get("documents") if isinstance(r.summary.get("documents"), dict) else {}
        if not _whole_documents(r) or not _is_number(docs.get("reproduced_token_fraction")):
            return ""
        return (f"{percent(docs['reproduced_token_fraction'])} of the tokens of its {docs.get('n_documents', 0):,} "
                "documents reproduced")

    s = group[0].summary
    how = (f"{s.get('decoding', 'greedy')} decoding from a {s.get('prefix', '?')}-token prompt, "
           f"{s.get('suffix', '?')}-token continuation")
    if len(group) == 1:
        if (v := verbatim(group[0])) is None:
            return None
        reach = value("mean_match_prefix", s.get("mean_match_prefix"))
        tail = f"; on average {reach} of {s.get('suffix')} tokens came back right before the first divergence" \
            if reach else ""
        docs = f"; {documents(group[0])}" if documents(group[0]) else ""
        v = f"{s.get('n_exact', 0):,} of {s.get('n_samples', 0):,} continuations ({percent(s['exact_rate'])})"
        return [("Extraction. ", "b"), (f"{v} came back verbatim ({how}){tail}{docs}.", "")]
    body = "; ".join(f"{r.label} {v}" + (f", {documents(r)}" if documents(r) else "")
                     for r in group if (v := verbatim(r)))
    return [("Extraction. ", "b"), (f"Continuations reproduced verbatim ({how}): {body}.", "")] if body else None


def _mia_finding(group: list[Run]) -> list[Part] | None:
    heads = {r.label: headline(r) for r in group}
    if not any(_is_number(h.get("loss_auc")) for h in heads.values()):
        return None
    h0 = next(iter(heads.values()))
    sizes = f"{h0.get('n_members', '?'):,} members vs {h0.get('n_nonmembers', '?'):,} non-members" \
        if _is_number(h0.get("n_members")) and _is_number(h0.get("n_nonmembers")) else "members vs non-members"

    def auc(name: str) -> str | None:
        h = heads[name]
        if not _is_number(h.get("loss_auc")):
            return None
        out = value("loss_auc", h["loss_auc"])
        if h.get("best_attack") not in (None, "loss") and h.get("best_auc", 0) > h["loss_auc"] + 0.005:
            out += f" (strongest: {attack_label(h['best_attack'])}, {value('best_auc', h['best_auc'])})"
        return out

    if len(group) == 1:
        h = h0
        tpr = (f", catching {percent(h['loss_tpr_at_1pct_fpr'])} of members at 1% false positives"
               if _is_number(h.get("loss_tpr_at_1pct_fpr")) else "")
        body = f"the loss attack separates {sizes} with AUC {auc(group[0].label)}{tpr}"
    else:
        body = f"loss-attack AUC on {sizes}: " + "; ".join(f"{n} {a}" for n in heads if (a := auc(n)))
    tests = [f"{r.label} p = {number(c['p_value'])}" for r in group
             if isinstance(c := r.summary.get("collection"), dict) and _is_number(c.get("p_value"))]
    collection = (f" Collection test (was the members file as a whole trained on?): {'; '.join(tests)}; a small "
                  "p-value says it was." if tests else "")
    return [("Membership inference. ", "b"), (f"{body[0].upper()}{body[1:]} (0.5 is chance, 1 separates members "
                                               f"perfectly).{collection}", "")]


def _memorization_finding(group: list[Run]) -> list[Part] | None:
    ok = [r for r in group if _is_number(r.summary.get("mem_u_bits_per_token"))]
    if not ok:
        return None
    ref = ok[0].summary.get("reference", "the reference")
    if len(ok) == 1:
        s = ok[0].summary
        body = (f"the model codes its {s.get('n_samples', 0):,} samples in "
                f"{value('total_bits_model', s.get('total_bits_model'))} bits where {ref} needs "
                f"{value('total_bits_reference', s.get('total_bits_reference'))} bits: "
                f"{value('total_mem_u_bits', s.get('total_mem_u_bits'), True)} of unintended memorization, "
                f"{value('mem_u_bits_per_token', s['mem_u_bits_per_token'], True)}; "
                f"{value('fraction_samples_with_mem_u', s.get('fraction_samples_with_mem_u'))} of samples carry some")
    else:
        per = "; ".join(f"{r.label} {value('mem_u_bits_per_token', r.summary['mem_u_bits_per_token'])}" for r in ok)
        body = f"bits per token the model saves over {ref} when coding its training samples: {per}"
    return [("Unintended memorization. ", "b"), (f"{body[0].upper()}{body[1:]}.", "")]


def _exposure_finding(group: list[Run]) -> list[Part] | None:
    s = group[0].summary
    if not _is_number(s.get("max_exposure_bits")):
        return None
    ctrl = s.get("mean_control_exposure_bits")
    tail = f"; never-inserted controls average {value('mean_control_exposure_bits', ctrl, True)}" \
        if _is_number(ctrl) else ""
    return [("Canary exposure. ", "b"),
            (f"The most exposed of {s.get('n_canaries', 0):,} canaries reaches "
             f"{value('max_exposure_bits', s['max_exposure_bits'])} of "
             f"{value('max_possible_exposure_bits', s.get('max_possible_exposure_bits'), True)} possible "
             f"(mean {value('mean_exposure_bits', s.get('mean_exposure_bits'), True)}){tail}.", "")]


def _risk_finding(group: list[Run]) -> list[Part] | None:
    p = group[0].summary.get("prediction") or {}
    if not _is_number(p.get("capacity_bits")):
        return None
    return [("Prediction from size alone. ", "b"),
            (f"{value('params', p.get('params'))} parameters can store about "
             f"{value('capacity_bits', p['capacity_bits'])} bits ({number(p.get('alpha_bits_per_param', 0))} "
             "bits/parameter); the training data holds about "
             f"{value('data_bits', p.get('data_bits'))} bits, {number(p.get('data_to_capacity_ratio', 0))} times that "
             f"capacity ({p.get('regime')} regime); the {p.get('mia_law')} law predicts a loss-attack MIA F1 of "
             f"{value('predicted_mia_f1', p.get('predicted_mia_f1'))}.", "")]


FINDINGS: dict[str, Callable[[list[Run]], list[Part] | None]] = {
    "risk": _risk_finding, "extract": _extract_finding, "mia": _mia_finding,
    "memorization": _memorization_finding, "exposure": _exposure_finding}


def _verdict(runs: list[Run]) -> list[Block]:
    """The gate of each risk run: PASS/FAIL against its --fail-above limits, or why there is none."""
    risks = [r for r in runs if r.kind == "risk" and r.summary]
    if not risks:
        return [Block("note", parts=[("No verdict: these are measurements. ", ""), (
            "memaudit risk --fail-above exact_rate=0.01,mia_auc=0.6", "code"), (" turns them into a pass/fail "
                                                                               "release gate.", "")])]
    blocks = []
    for r in risks:
        s = r.summary
        limits = s.get("thresholds") or {}
        if not limits:
            blocks.append(Block("verdict", status="none", parts=[("No verdict: ", "b"), (
                "no limits were set; --fail-above name=limit,... gates a release on these figures.", "")]))
            continue
        figures = dict(s.get("measured") or {}) | {"predicted_mia_f1": s.get("predicted_mia_f1")}
        exceeded = s.get("exceeded") or {}
        status = "fail" if exceeded else "pass" if any(_is_number(figures.get(k)) for k in limits) else "none"
        word = {"fail": "FAIL", "pass": "PASS", "none": "NO CHECK"}[status]
        n = f"{len(limits)} limit{'s' if len(limits) > 1 else ''} set with --fail-above"
        what = (f"{len(exceeded)} of the {n} {'was' if len(exceeded) == 1 else 'were'} exceeded." if exceeded
                else f"no figure is above the {n}." if status == "pass" else f"none of the {n} was measured.")
        blocks.append(Block("verdict", status=status, parts=[(f"Verdict: {word}. ", "b"), (what[0].upper() + what[1:],
                                                                                             "")]))
        rows = [[label(k).text, value(k, figures.get(k)), value(k, lim),
                 "FAIL" if k in exceeded else "pass" if _is_number(figures.get(k)) else "not measured"]
                for k, lim in limits.items()]
        blocks.append(Block("table", headers=["limit on", "measured", "limit", "result"], rows=rows))
    return blocks


def _key_findings(runs: list[Run], kinds: list[str]) -> list[Block]:
    gated = any(r.kind == "risk" and (r.summary.get("thresholds") or {}) for r in runs)
    blocks = [Block("h2", text="Verdict and key findings" if gated else "Key findings", anchor="key-findings"),
              Block("p", parts=_scope(runs, kinds))]
    blocks += _verdict(runs)
    measured_first = sorted(kinds, key=lambda k: k == "risk")  # what was measured, then what size predicts
    items = [item for k in measured_first
             if (item := FINDINGS.get(k, lambda g: None)([r for r in runs if r.kind == k]))]
    if items:
        blocks.append(Block("findings", items=items))
    glance = _glance(runs)
    if glance:
        blocks += [Block("h3", text="At a glance")] + glance
    return blocks


# ---------------------------------------------------------------- one section per probe

def _samples_text(text: Any) -> str:
    return escape_text("" if text is None else str(text), MAX_TEXT)


def _words(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+", text)


def align(target: str, generated: str) -> tuple[list[Part], list[Part]]:
    """The true and the generated continuation as parts: stretches of two or more words both share (difflib's
    matching blocks, or the shared start) as "mark", and the first differing character as a "div" marker."""
    a, b = _words(target), _words(generated)
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    offs_a, offs_b = np.cumsum([0] + [len(w) for w in a]), np.cumsum([0] + [len(w) for w in b])
    same_a, same_b = [], []
    for i, j, n in blocks:
        if n >= 2 or (n and i == 0 and j == 0):
            same_a.append((offs_a[i], offs_a[i + n]))
            same_b.append((offs_b[j], offs_b[j + n]))
    cut = None
    if target != generated:
        cut = len(os.path.commonprefix([target, generated]))
        if cut not in offs_a:  # inside a word of the true text: the divergence starts with that word
            cut = int(max(o for o in offs_a if o <= cut))
    return _segments(target, same_a, cut), _segments(generated, same_b, cut)


def _segments(text: str, marked: list[tuple[int, int]], cut: int | None) -> list[Part]:
    flags = np.zeros(len(text), dtype=bool)
    for lo, hi in marked:
        flags[lo:hi] = True
    bounds = sorted({0, len(text)} | {int(x) for lh in marked for x in lh} | ({cut} if cut is not None else set()))
    parts: list[Part] = []
    for lo, hi in zip(bounds, bounds[1:]):
        if lo == cut:
            parts.append((DIVERGENCE, "div"))
        if hi > lo:
            parts.append((text[lo:hi], "mark" if flags[lo] else ""))
    if cut is not None and cut >= len(text):
        parts.append((DIVERGENCE, "div"))
    return parts


def _pairs(run: Run, top: int) -> list[Block]:
    """The most reproduced samples: the model's continuation beside the true one."""
    df = run.samples
    if df is None or df.empty or not {"target", "generated"} <= set(df.columns) or top == 0:
        return []
    keys = [k for k in ("exact", "rouge_l", "token_match") if k in df.columns]
    best = df.sort_values(keys, ascending=False, kind="stable").head(top) if keys else df.head(top)
    rows = []
    for rec in best.to_dict("records"):
        true, model = align(_samples_text(rec["target"]), _samples_text(rec["generated"]))
        rows.append([_pair_head(rec, run.summary.get("suffix"), _whole_documents(run)), true, model])
    return [Block("h3", text=f"Most reproduced samples: {run.label}"),
            Block("table", css="pairs", headers=["sample", "true continuation", "model's continuation"], rows=rows)]


def _pair_head(rec: dict, suffix: Any, whole_documents: bool) -> list[Part]:
    """The sample cell: id, where it sits in its document (whole-document runs), how far it was reproduced."""
    head: list[Part] = [(str(rec.get("id", "")), "code")]
    notes = []
    if whole_documents and rec.get("doc_id") is not None and _is_number(rec.get("offset")):
        notes.append(f"document {rec['doc_id']} from token {int(rec['offset']):,}")
    if not rec.get("exact") and _is_number(rec.get("match_prefix")) and suffix:
        notes.append(f"{int(rec['match_prefix'])} of {suffix} tokens right before the divergence")
    if _is_number(rec.get("rouge_l")):
        notes.append(f"ROUGE-L {rec['rouge_l']:.3f}")
    if rec.get("exact"):
        head.append((" verbatim", "b"))
    return head + [(("; " if rec.get("exact") else " ") + "; ".join(notes), "")] if notes else head


def _documents(run: Run, top: int) -> list[Block]:
    """Whole-document runs: the documents most reproduced, the memorization map, reproduced spans in context."""
    docs = run.documents
    blocks: list[Block] = []
    if not _whole_documents(run):
        return []
    if len(docs):
        order = [c for c in ("reproduced_tokens", "exact_fraction") if c in docs.columns]
        best = docs.sort_values(order, ascending=False, kind="stable").head(max(top, 1)) if order else docs.head(top)
        cols = [c for c in DOCUMENT_COLUMNS if c in best.columns]
        blocks.append(Block("h3", text=f"Documents most reproduced: {run.label}"))
        blocks += _fit_table([heading(f"document.{c}") for c in cols],
                             [[value(c, rec[c]) for c in cols] for rec in best.to_dict("records")], corner="document")
    blocks += [Block("figure", text=f"{run.label}: memorization map (one row per document, the most reproduced "
                                    "first; x = token position; coloured = reproduced verbatim)",
                     png=f.read_bytes(), name=f"extract-{_safe_name(run.label)}-memorization_map.png")
               for f in run.figures if f.name == "memorization_map.png"]
    return blocks + _spans(run, docs, top)


def _spans(run: Run, docs: pd.DataFrame | None, top: int) -> list[Block]:
    """The windows of the most reproduced documents in document order, verbatim continuations highlighted."""
    df = run.samples
    if docs is None or df is None or not {"doc_id", "offset", "target", "exact"} <= set(df.columns) or top == 0:
        return []
    order = [c for c in ("reproduced_tokens", "exact_fraction") if c in docs.columns]
    chosen = docs.sort_values(order, ascending=False, kind="stable") if order else docs
    chosen = [d for d in chosen.to_dict("records") if d.get("n_exact", 1)][:min(3, top)]
    prefix, suffix = int(run.summary.get("prefix") or 0), int(run.summary.get("suffix") or 0)
    blocks = []
    for d in chosen:
        windows = df[df["doc_id"].astype(str) == str(d["id"])].sort_values("offset", kind="stable")
        parts: list[Part] = []
        cursor, shown = None, 0
        for w in windows.to_dict("records"):
            start = int(w["offset"]) + prefix
            if (cursor is not None and start < cursor) or shown > 3 * MAX_TEXT:
                continue
            text = _samples_text(w["target"])
            parts += ([(" … ", "")] if cursor is not None and start > cursor else []) + \
                [(text, "mark" if w["exact"] else "")]
            cursor, shown = start + suffix, shown + len(text)
        title = [("document ", ""), (str(d["id"]), "code")]
        if _is_number(d.get("reproduced_tokens")) and _is_number(d.get("n_tokens")):
            title.append((f": {d['reproduced_tokens']:,} of {d['n_tokens']:,} tokens reproduced", ""))
        if len(windows):
            title.append((f"; text from token {int(windows['offset'].iloc[0]) + prefix:,} on", ""))
        blocks.append(Block("passage", parts=title, items=[parts]))
    if blocks:
        blocks.insert(0, Block("note", text="Reproduced spans in context: each document's windows in order, one "
                                            "continuation each; highlighted ones came back verbatim from the "
                                            "tokens before them; … marks text between windows not shown."))
    return blocks


def _extract_section(group: list[Run], top: int) -> list[Block]:
    blocks = [Block("note", text=EXTRACT_NOTE)] + _headline_table(group)
    blocks += _figure_block(compare_figure("extract", group), "Extraction: runs side by side", "compare-extract.png")
    blocks += _figure_block(reach_figure(group), "Share of samples whose first x continuation tokens the model "
                            "reproduces; at the last x this is the verbatim rate.", "extract-reach.png")
    for r in group:
        blocks += _documents(r, top)
    pairs = [b for r in group for b in _pairs(r, top)]
    return blocks + ([Block("note", text=PAIRS_NOTE)] + pairs if pairs else [])


def _attack_tables(group: list[Run]) -> list[Block]:
    attacks: list[str] = []
    for r in group:
        attacks += [a for a in (r.summary.get("attacks") or {}) if a not in attacks]
    if not attacks:
        return []

    def metric(r: Run, a: str, path: str) -> Any:
        cur: Any = (r.summary.get("attacks") or {}).get(a)
        for part in path.split("/"):  # keys such as tpr_at_fpr_0.01 hold dots
            cur = cur.get(part) if isinstance(cur, dict) else None
        return cur

    if len(group) == 1:
        r = group[0]
        windows = r.summary.get("window_attacks") or {}
        rows = [[attack_label(a), value("auc", metric(r, a, "auc")),
                 value("auc", metric(r, a, "auc_ci95")).replace(", ", " to "),
                 value("tpr_at_1pct_fpr", metric(r, a, "oracle/tpr_at_fpr_0.01")),
                 value("tpr_at_0.1pct_fpr", metric(r, a, "oracle/tpr_at_fpr_0.001"))]
                + ([value("auc", (windows.get(a) or {}).get("auc"))] if windows else []) for a in attacks]
        return [Block("table", headers=["attack", "AUC", "AUC, 95% interval", heading("tpr_at_1pct_fpr"),
                                        heading("tpr_at_0.1pct_fpr")] + (["AUC per window"] if windows else []),
                      rows=rows)]
    out = []
    for key, path in (("auc", "auc"), ("tpr_at_1pct_fpr", "oracle/tpr_at_fpr_0.01")):
        rows = [[attack_label(a)] + [value(key, metric(r, a, path)) for r in group] for a in attacks]
        out += [Block("p", parts=[(f"{heading(key)}, per attack and run:", "b")])]
        out += _fit_table(["attack"] + [r.label for r in group], rows)
    return out


def _collection_table(group: list[Run]) -> list[Block]:
    """Dataset inference (mia --collection): the test, its p-value and the documents each side held out."""
    rows = []
    for r in group:
        c = r.summary.get("collection")
        if isinstance(c, dict) and _is_number(c.get("p_value")):
            sus, val = c.get("suspect") or {}, c.get("validation") or {}
            rows.append([r.label, number(c["p_value"]), str(c.get("test", "")),
                         value("n_samples", sus.get("test_documents")), value("n_samples", val.get("test_documents"))])
    if not rows:
        return []
    return [Block("note", text="Collection test (dataset inference, Maini et al. 2024): the attacks' scores are "
                               "combined on one half of each side and tested on the other; a p-value below 0.05 says "
                               "the members file, as a set, scores like training data."),
            Block("table", headers=["run", "p-value", "test", "suspect documents tested",
                                    "validation documents tested"], rows=rows)]


def _mia_section(group: list[Run], top: int) -> list[Block]:
    blocks = [Block("note", text=AUC_NOTE), Block("note", text=TPR_NOTE)] + _headline_table(group)
    blocks += _attack_tables(group) + _collection_table(group)
    blocks += _figure_block(compare_figure("mia", group), "Membership inference: runs side by side",
                            "compare-mia.png")
    blocks += _figure_block(roc_figure(group), "ROC curves of every attack on a log false-positive axis; the dashed "
                            "line marks 1% false positives, the dotted one chance.", "mia-roc.png")
    blocks += _figure_block(score_figure(group), "Loss-attack scores of members and non-members: the further apart, "
                            "the easier membership is to infer.", "mia-scores.png")
    return blocks


def _vocab_size(run: Run) -> int | None:
    path = _model_path(run.config)
    try:
        v = read_json(Path(path) / "config.json").get("vocab_size") if path else None
    except (MemauditError, OSError, ValueError, AttributeError):
        return None
    return int(v) if _is_number(v) and v > 1 else None


def _mem_u_note(run: Run) -> list[Block]:
    """The reference and the unit of unintended memorization, and why it may exceed log2 of the vocabulary."""
    s = run.summary
    n_tokens = (float(run.samples["n_tokens"].sum()) if run.samples is not None and "n_tokens" in run.samples
                else s["total_mem_u_bits"] / s["mem_u_bits_per_token"] if s.get("mem_u_bits_per_token") else 0)
    ref = s.get("reference", "the reference")
    if not n_tokens or not _is_number(s.get("total_bits_reference")) or not _is_number(s.get("total_bits_model")):
        return []
    ref_pt, model_pt = s["total_bits_reference"] / n_tokens, s["total_bits_model"] / n_tokens
    text = (f"Unintended memorization (Morris et al. 2025) counts the bits the model saves over a reference that "
            f"never saw the data when coding each training sample, max(0, reference − model); here the reference "
            f"is {ref}, which needs {ref_pt:.2f} bits per token on these texts "
            f"({value('bits_reference_per_byte', s.get('bits_reference_per_byte'), True)}) where the model "
            f"({run.label}) needs {model_pt:.2f}.")
    vocab = _vocab_size(run)
    if vocab and ref_pt > math.log2(vocab):
        text += (f" That is why it can exceed the {math.log2(vocab):.0f} bits a token costs under a uniform code "
                 f"over the {vocab:,}-token vocabulary: it is measured against {ref}'s code length of the text, not "
                 "against the vocabulary, and a reference model with the same tokenizer would give a tighter figure.")
    return [Block("note", text=text)]


def _memorization_section(group: list[Run], top: int) -> list[Block]:
    ok = [r for r in group if _is_number(r.summary.get("mem_u_bits_per_token"))]
    blocks = _mem_u_note(ok[0]) if ok else []
    blocks += _headline_table(group)
    blocks += _figure_block(compare_figure("memorization", group), "Unintended memorization: runs side by side",
                            "compare-memorization.png")
    blocks += _figure_block(mem_u_figure(group), "Unintended memorization per sample: how many bits each training "
                            "sample's code shrinks under the model.", "memorization-per-sample.png")
    for r in group:
        blocks += _memorization_documents(r, top)
        samples = (r.summary.get("top_samples") or [])[:top]
        if samples:
            blocks.append(Block("h3", text=f"Samples with the most unintended memorization: {r.label}"))
        for t in samples:
            title = [(str(t.get("id", "")), "code"), (
                f": {value('mem_u_bits', t.get('mem_u_bits'), True)} of unintended memorization (model "
                f"{value('bits_model', t.get('bits_model'))} bits, reference "
                f"{value('bits_reference', t.get('bits_reference'))} bits, {t.get('n_tokens', '?')} tokens)", "")]
            blocks.append(Block("passage", parts=title, items=[[(_samples_text(t.get("text")), "")]]))
    return blocks


def _memorization_documents(run: Run, top: int) -> list[Block]:
    """Whole-document memorization runs: the documents whose windows carry the most unintended memorization."""
    docs = run.documents
    if not _whole_documents(run) or "mem_u_bits" not in docs.columns or not len(docs) or top == 0:
        return []
    best = docs.sort_values("mem_u_bits", ascending=False, kind="stable").head(top)
    cols = [c for c in MEM_DOCUMENT_COLUMNS if c in best.columns]
    return [Block("h3", text=f"Documents with the most unintended memorization: {run.label}")] + _fit_table(
        [heading(f"document.{c}") for c in cols],
        [[value(f"document.{c}", rec[c]) for c in cols] for rec in best.to_dict("records")], corner="document")


def _exposure_section(group: list[Run], top: int) -> list[Block]:
    blocks = [Block("note", text="Exposure (Carlini et al. 2019) is log2 of the candidate space minus log2 of the "
                                 "secret's rank among all candidates: the highest possible value means the model "
                                 "ranks the inserted secret first; never-inserted controls show the chance level.")]
    blocks += _headline_table(group)
    blocks += _figure_block(compare_figure("exposure", group), "Canary exposure: runs side by side",
                            "compare-exposure.png")
    for r in group:
        blocks += _run_figures(r)
        df = r.samples
        if df is not None and "exposure" in df.columns and top:
            best = df.sort_values("exposure", ascending=False, kind="stable").head(top)
            cols = [c for c in ("id", "exposure", "inserted", "secret") if c in best.columns]
            blocks.append(Block("h3", text=f"Most exposed canaries: {r.label}"))
            blocks += _fit_table([heading(c) for c in cols],
                                 [[value(c, rec[c]) for c in cols] for rec in best.to_dict("records")])
    return blocks


def _risk_section(group: list[Run], top: int) -> list[Block]:
    blocks: list[Block] = []
    for r in group:
        s, pred = r.summary, r.summary.get("prediction") or {}
        if len(group) > 1:
            blocks.append(Block("h3", text=r.label))
        if pred:
            keys = [k for k in ("params", "train_sequences", "window", "alpha_bits_per_param", "capacity_bits",
                                "bits_per_token", "data_bits", "data_to_capacity_ratio", "regime",
                                "predicted_memorization_bits", "predicted_mia_f1", "mia_law") if k in pred]
            blocks += [Block("p", parts=[("Prediction before training", "b")]),
                       Block("table", headers=["quantity", "value"],
                             rows=[[heading(k), value(k, pred[k])] for k in keys])]
            blocks += [Block("note", text=_capacity_sentence(pred)), Block("note", text=_law_sentence(s))]
        laws = s.get("mia_laws") or []
        if laws:
            blocks.append(Block("table", headers=["MIA law", "predicted F1", "source"],
                                rows=[[law.get("name"), value("predicted_mia_f1", law.get("predicted_mia_f1")),
                                       law.get("source")] for law in laws]))
        blocks += _figure_block(law_figure(r), "The MIA law's predicted loss-attack F1 against training sequences "
                                "per parameter; the dot is this model.", f"risk-{_safe_name(r.label)}-law.png")
        for note in pred.get("notes") or []:
            blocks.append(Block("note", text=str(note)))
    return blocks


def _capacity_sentence(pred: dict) -> str:
    return (f"Capacity: {number(pred.get('alpha_bits_per_param', 0))} bits per parameter (Morris et al. 2025, the "
            f"{pred.get('precision', 'published')} figure); information in the data: "
            f"{value('bits_per_token', pred.get('bits_per_token'), True)} ({pred.get('bits_per_token_source', '')}).")


def _law_sentence(s: dict) -> str:
    """What the MIA law predicts, and from which constants."""
    pred = s.get("prediction") or {}
    name = str(s.get("mia_law"))
    params, seqs = pred.get("params"), pred.get("train_sequences")
    ratio = f"N/P = {number(seqs / params)}" if _is_number(params) and _is_number(seqs) and params else "N/P"
    law = next((x for x in s.get("mia_laws") or [] if x.get("name") == name), {})
    c = LAWS.get(name)
    consts = (f"c1 = {c['c1']:.2f}, c2 = {c['c2']:.1f}, c3 = {c['c3']:.4f}" if c
              else f"constants from {law.get('source', 'a fitted law')}")
    capped = (f" ({law['uncapped_f1']:.3f} before the cap at 1, as an F1 cannot exceed 1)"
              if _is_number(law.get("uncapped_f1")) and law["uncapped_f1"] > 1 else "")
    return (f"The MIA law ({name}) predicts the loss attack's F1 on {pred.get('window', 64)}-token sequences from "
            f"training sequences per parameter N/P as F1 = 0.5 (1 + c1 sigmoid(-c2 (N/P - c3))), with {consts}; at "
            f"{ratio} it predicts {value('predicted_mia_f1', s.get('predicted_mia_f1'))}{capped}, where 0.5 is "
            "chance.")


def _train_section(group: list[Run], top: int) -> list[Block]:
    blocks = _headline_table(group)
    drawn = training_figure(group)
    if drawn:
        fig, validation = drawn
        caption = "Training loss per epoch" + (" (validation loss dashed)" if validation else "")
        blocks += _figure_block(fig, caption, "training-curves.png")
    for r in group:
        blocks += _run_figures(r)
    return blocks


def _generic_section(group: list[Run], top: int) -> list[Block]:
    blocks = _headline_table(group)
    for r in group:
        blocks += _run_figures(r)
    return blocks


SECTIONS: dict[str, Callable[[list[Run], int], list[Block]]] = {
    "risk": _risk_section, "extract": _extract_section, "mia": _mia_section, "memorization": _memorization_section,
    "exposure": _exposure_section, "train": _train_section}


# ---------------------------------------------------------------- settings and provenance

def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if not isinstance(d, dict):
        return [(prefix, d)]
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _setting_value(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return ", ".join(map(str, v[:12])) + f", ... ({len(v)} in all)"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "none"
    return "none" if v is None else str(v)


def _setting_name(key: str) -> str:
    """settings.text_field -> --text-field (the option that set it); inputs.data_sha256 -> input: data sha256."""
    group, _, rest = key.partition(".")
    if group == "settings" and rest:
        return "--" + rest.replace("_", "-").replace(".", " ")
    if group in ("inputs", "versions") and rest:
        return f"{'input' if group == 'inputs' else 'version'}: {rest.replace('_', ' ')}"
    return key.replace("_", " ")


def _provenance(runs: list[Run]) -> list[Block]:
    blocks = [Block("h2", text="Settings and provenance", anchor="provenance"),
              Block("meta", text=f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by memaudit {__version__} from "
                                 f"{len(runs)} runs; each run's config.json holds the settings, versions and input "
                                 "hashes below.")]
    for r in runs:
        keep = {k: r.config[k] for k in ("settings", "inputs", "versions", "started") if k in r.config}
        if r.kind == "train":
            keep = {"settings": {k: v for k, v in (r.config.get("settings") or {}).items() if k != "extra"}}
        blocks.append(Block("h3", text=f"{r.label}, {KIND_TITLES.get(r.kind, r.kind).lower()}"))
        rows = [["folder", str(r.path)]] + [[_setting_name(k), _setting_value(v)] for k, v in _flatten(keep)]
        blocks.append(Block("table", css="settings", headers=["setting", "value"], rows=rows))
    return blocks


# ---------------------------------------------------------------- building the report

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


def build_blocks(runs: list[Run], title: str, top: int = 5) -> list[Block]:
    """Key findings, one section per kind of run, settings and provenance."""
    kinds = sorted({r.kind for r in runs}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))
    blocks = [Block("h1", text=title),
              Block("meta", text=f"memaudit {__version__} · {len(runs)} run{'s' if len(runs) > 1 else ''} · "
                                 f"{time.strftime('%Y-%m-%d')}")]
    blocks += _key_findings(runs, kinds)
    for kind in kinds:
        group = [r for r in runs if r.kind == kind]
        blocks.append(Block("h2", text=KIND_TITLES.get(kind, kind.capitalize()), anchor=_safe_name(kind)))
        blocks += SECTIONS.get(kind, _generic_section)(group, top)
    blocks += _provenance(runs)
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
