"""Reports: key findings first, human labels and readable numbers, the evidence, every figure labelled, data
escaped (never markup), and in a real headless Chromium at 1280 px: the findings in the first screen, nothing
wider than the viewport, no word broken, every image decoded."""
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memaudit import labels, report as report_module
from memaudit.report import (COMPARE_METRICS, GLANCE, HEADLINE, MAX_COLUMNS, align, build_blocks, load_run,
                             md_escape, report)
from memaudit.rundir import RunDir

EVIL = "<script>alert(1)</script> | **bold** [link](http://x) `tick` & <img src=x onerror=alert(2)>"
ROOT = Path(__file__).resolve().parents[1]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _figure(run, name):
    from memaudit.figures import pyplot

    fig, ax = pyplot().subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    run.save_figure(fig, name)


def _extract_run(root: Path, model_name: str, exact_rate: float, text: str = EVIL,
                 figures: tuple[str, ...] = ("rouge_l.png",)) -> Path:
    run = RunDir(root / f"extract-{model_name}", "extract", {"prefix": 32, "suffix": 32},
                 inputs={"model": str(root / model_name), "data": "train.jsonl"})
    run.write_samples(pd.DataFrame({"id": ["a", "b", "c"], "exact": [True, False, False],
                                    "rouge_l": [1.0, 0.2, 0.5], "token_match": [1.0, 0.1, 0.4],
                                    "match_prefix": [32, 1, 6], "target": [text, "plain words here", "other"],
                                    "generated": [text, "plain x", "y"]}))
    run.write_summary({"n_samples": 3, "exact_rate": exact_rate, "n_exact": 1, "mean_rouge_l": 0.57,
                       "prefix": 32, "suffix": 32, "decoding": "greedy"})
    for name in figures:
        _figure(run, name)
    return run.path


def _documents_run(root: Path) -> Path:
    """A whole-document extract run (stride 32): two documents, the first reproduced in its first two windows."""
    run = RunDir(root / "extract-docs", "extract", {"prefix": 32, "suffix": 32, "stride": 32},
                 inputs={"model": str(root / "standard"), "data": "books.jsonl"})
    rows = []
    for doc, exact in (("book-1", [True, True, False]), ("book-2", [False, False, False])):
        for w, ex in enumerate(exact):
            target = f" {doc} window {w} continuation text"
            rows.append({"id": f"{doc}@{32 * w}", "doc_id": doc, "offset": 32 * w, "exact": ex,
                         "rouge_l": 1.0 if ex else 0.1, "token_match": 1.0 if ex else 0.0, "match_prefix": 32 * ex,
                         "target": target, "generated": target if ex else " something else"})
    run.write_samples(pd.DataFrame(rows))
    run.write_samples(pd.DataFrame({"id": ["book-1", "book-2"], "n_tokens": [128, 128], "n_windows": [3, 3],
                                    "n_exact": [2, 0], "exact_fraction": [2 / 3, 0.0], "reproduced_tokens": [64, 0],
                                    "longest_reproduced_run": [64, 0], "mean_rouge_l": [0.7, 0.1]}),
                      "documents.parquet")
    run.write_summary({"n_samples": 6, "exact_rate": 2 / 6, "n_exact": 2, "prefix": 32, "suffix": 32,
                       "decoding": "greedy", "documents": {"n_documents": 2, "documents_with_exact": 1,
                                                          "mean_exact_fraction": 1 / 3,
                                                          "reproduced_token_fraction": 0.25}})
    _figure(run, "memorization_map.png")
    return run.path


def _mia_run(root: Path, name: str = "standard") -> Path:
    rng = np.random.default_rng(0)
    member = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    scores = {"loss": rng.normal(0, 1, 80) + 2.0 * member, "min_k_20": rng.normal(0, 1, 80) + member}
    run = RunDir(root / f"mia-{name}", "mia", {"attacks": "loss,min_k"},
                 inputs={"model": str(root / name), "members": "train.jsonl", "nonmembers": "heldout.jsonl"})
    run.write_samples(pd.DataFrame({"id": [f"d{i}" for i in range(80)], "member": member}
                                   | {f"score_{k}": v for k, v in scores.items()}))
    attacks = {k: {"auc": 0.9 if k == "loss" else 0.7, "auc_ci95": [0.85, 0.95],
                   "oracle": {"tpr_at_fpr_0.01": 0.3, "tpr_at_fpr_0.001": 0.1}} for k in scores}
    run.write_summary({"n_members": 40, "n_nonmembers": 40, "columns": list(scores), "attacks": attacks})
    return run.path


def _memorization_run(root: Path, name: str = "standard") -> Path:
    run = RunDir(root / f"mem-{name}", "memorization", {"reference": "zstd"},
                 inputs={"model_dir": str(root / name), "data": "train.jsonl"})
    run.write_samples(pd.DataFrame({"id": ["a", "b"], "bits_model": [20.0, 30.0], "bits_reference": [1400.0, 1300.0],
                                    "mem_u_bits": [1380.0, 1270.0], "n_tokens": [72, 72], "n_bytes": [270, 250]}))
    run.write_summary({"reference": "zstd level 19", "n_samples": 2, "total_bits_model": 50.0,
                       "total_bits_reference": 2700.0, "total_mem_u_bits": 2650.0, "mem_u_bits_per_token": 18.4,
                       "fraction_samples_with_mem_u": 1.0, "bits_reference_per_byte": 5.2,
                       "top_samples": [{"id": "a", "mem_u_bits": 1380.0, "bits_model": 20.0, "bits_reference": 1400.0,
                                        "n_tokens": 72, "text": EVIL}]})
    return run.path


def _risk_run(root: Path) -> Path:
    run = RunDir(root / "risk", "risk", {"mode": "post-training"}, inputs={"model": str(root / "standard"),
                                                                            "data": "train.jsonl"})
    prediction = {"params": 668160.0, "train_sequences": 231.1, "window": 64, "alpha_bits_per_param": 3.6,
                  "precision": "published", "capacity_bits": 2405376.0, "bits_per_token": 4.0, "data_bits": 59160.0,
                  "data_to_capacity_ratio": 0.0246, "regime": "memorizing", "predicted_mia_f1": 1.0,
                  "mia_law": "morris2025"}
    run.write_summary({"mode": "post-training", "predicted_mia_f1": 1.0, "mia_law": "morris2025",
                       "mia_laws": [{"name": "morris2025", "predicted_mia_f1": 1.0, "uncapped_f1": 1.04,
                                     "source": "Morris et al. 2025"}],
                       "prediction": prediction, "measured": {"exact_rate": 0.33, "mia_auc": 0.9},
                       "thresholds": {"exact_rate": 0.01, "mia_auc": 0.95}, "exceeded": {"exact_rate": 0.33},
                       "verdict": "VERDICT: FAIL (exact_rate 0.33 > 0.01)"})
    return run.path


def _model_dir(root: Path, name: str = "standard") -> Path:
    model = root / name
    model.mkdir(parents=True)
    (model / "training_log.csv").write_text("epoch,step,train_loss\n1,5,3.2\n2,10,2.9\n")  # no val_loss column
    (model / "train_config.json").write_text(json.dumps({"objective": "standard", "epochs": 2, "seq_len": 72,
                                                         "train_ids": [f"t{i}" for i in range(40)]}))
    return model


def _every_kind(root: Path) -> list[Path]:
    return [_risk_run(root), _model_dir(root), _extract_run(root, "standard", 0.33), _documents_run(root),
            _mia_run(root), _memorization_run(root)]


def _md_cells(line: str) -> list[str]:
    return re.split(r"(?<!\\)\|", line)  # split on unescaped pipes only


def test_script_in_training_data_is_text_not_markup(tmp_path):
    run = _extract_run(tmp_path, "standard", 0.33)
    res = report(run_dirs=[run], out=tmp_path / "rep")
    page = Path(res.html).read_text()
    parser = _Tags()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert "script" not in tags  # the report itself has no script, so any would come from data
    assert all("onerror" not in attrs for _, attrs in parser.tags)
    assert all(a["src"].startswith("data:image/png;base64,") for t, a in parser.tags if t == "img")
    assert any("<script>alert(1)</script>" in t for t in parser.text)  # shown, as text, intact
    md = Path(res.markdown).read_text()
    assert "<script>" not in md and "<img" not in md and "&lt;script&gt;" in md
    row = next(line for line in md.splitlines() if "&lt;script&gt;" in line and line.startswith("|"))
    header = next(line for line in md.splitlines() if line.startswith("| sample |"))
    assert len(_md_cells(row)) == len(_md_cells(header))  # the data's pipe did not add a column
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
    assert "| standard | 1/3 (80%) | 0.570 |" in md and "| goldfish | 1/3 (0%) | 0.570 |" in md  # at a glance
    assert "| figure | standard | goldfish | sinks |" in md  # the wide headline table, transposed
    assert (tmp_path / "rep" / "figures" / "compare-extract.png").is_file()
    r = run_cli("report", *runs, "--out", tmp_path / "r2", "--label", "A", "--label", "B", "--label", "C")
    assert r.returncode == 0, r.stderr
    md2 = (tmp_path / "r2" / "report.md").read_text()
    assert "| A |" in md2 and "| B |" in md2 and "| C |" in md2
    # the command prints the report's path last
    assert r.stdout.strip().splitlines()[-1] == f"report -> {tmp_path / 'r2' / 'report.html'}"


def test_missing_optional_files_and_fields(tmp_path, run_cli):
    run = RunDir(tmp_path / "odd", "capacity", {})  # no summary, no samples, no figures
    model = tmp_path / "model"
    model.mkdir()
    (model / "training_log.csv").write_text("epoch,step,train_loss\n1,5,3.2\n2,10,2.9\n")  # no val_loss column
    res = report(run_dirs=[run.path, model], out=tmp_path / "rep")
    md = Path(res.markdown).read_text()
    assert "training-curves" in md and "Training loss per epoch" in md and "validation" not in md.lower()
    r = run_cli("report", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.strip() == f"error: not a run directory: {tmp_path / 'nope'}"
    r = run_cli("report", run.path, "--label", "a", "--label", "b")
    assert r.returncode == 2 and "one label per run directory" in r.stderr


def test_numbers_read_as_numbers():
    v = labels.value
    assert v("exact_rate", 1.0) == "100%" and v("exact_rate", 0.008789) == "0.879%" and v("exact_rate", 0) == "0%"
    assert v("exact_rate", 0.99996) == "99.9%"  # never rounded up to a perfect score
    assert v("total_mem_u_bits", 87952.26) == "87,952" and v("mem_u_bits_per_token", 19.0868, True) == \
        "19.09 bits/token"
    assert v("n_samples", 64) == "64" and v("params", 668160.0) == "668,160" and v("loss_auc", 1) == "1.000"
    assert v("mean_match_prefix", 4.516) == "4.5" and v("data_to_capacity_ratio", 0.0245949) == "0.0246"
    assert v("anything", 3.5e-5) == "3.5×10⁻⁵" and "e" not in v("capacity_bits", 6.682e5)
    assert labels.attack_label("min_k_pp_20") == "Min-K%++, k = 20%" and labels.heading("mem_u_bits_per_token") == \
        "unintended memorization per token (bits/token)"


def test_every_reported_key_has_a_human_label():
    """Every key the report's tables, figures and glance name is in the one label table (none falls back)."""
    keys = {k for ks in HEADLINE.values() for k in ks} | {k for _, k in GLANCE} | \
        {k for ks in COMPARE_METRICS.values() for k in ks} | {"loss_auc", "best_auc", "best_attack", "n_members",
                                                              "n_nonmembers", "loss_tpr_at_1pct_fpr"}
    keys |= {f"document.{c}" for c in report_module.DOCUMENT_COLUMNS}
    assert sorted(k for k in keys if k not in labels.LABELS) == []
    assert all("_" not in lab.text for lab in labels.LABELS.values())


def test_findings_first_then_probes_then_provenance(tmp_path):
    res = report(run_dirs=_every_kind(tmp_path), out=tmp_path / "rep")
    md = Path(res.markdown).read_text()
    h2 = re.findall(r"^## (.*)$", md, flags=re.M)
    assert h2 == ["Verdict and key findings", "Pre-release risk", "Extraction", "Membership inference",
                  "Unintended memorization", "Trained models", "Settings and provenance"]
    first = md.split("## Pre-release risk")[0]
    assert "**Verdict: FAIL.**" in first and "| reproduced verbatim | 33% | 1% | FAIL |" in first
    assert "| MIA AUC, loss attack | 0.900 | 0.950 | pass |" in first
    for probe in ("**Extraction.**", "**Membership inference.**", "**Unintended memorization.**",
                  "**Prediction from size alone.**"):
        assert probe in first
    # the explanations a number needs, once each
    assert "0.5 is chance" in md and "c1 = 1.34" in md and "zstd level 19, which needs 18.75 bits per token" in md
    # no table header is a snake_case key
    headers = [line for i, line in enumerate(md.splitlines()[:-1]) if md.splitlines()[i + 1].startswith("|---")]
    assert headers and all("\\_" not in h for h in headers)
    html_page = Path(res.html).read_text()
    assert html_page.count("<section") == len(h2) and "break-before:page" in html_page


def test_wide_tables_are_transposed_and_split():
    headers = ["run"] + [f"figure {i}" for i in range(12)]
    rows = [[f"run {r}"] + list(range(12)) for r in range(3)]
    (table,) = report_module._fit_table(headers, rows, corner="figure")
    assert table.headers == ["figure", "run 0", "run 1", "run 2"] and len(table.rows) == 12
    assert table.rows[5] == ["figure 5", 5, 5, 5]
    many = report_module._fit_table(headers, [[f"run {r}"] + list(range(12)) for r in range(10)])
    assert all(len(t.headers) <= MAX_COLUMNS for t in many) and sum(len(t.headers) - 1 for t in many) == 10


def test_continuations_show_what_was_reproduced_and_where_it_diverged():
    true, model = align(" the open file with methods write", " the open file for reading")
    marked = "".join(t for t, s in model if s == "mark")
    assert marked == " the open file" and "".join(t for t, s in true if s == "mark") == " the open file"
    # the divergence marker sits right after the shared start, in both
    assert [s for _, s in true].index("div") == 1 and [s for _, s in model].index("div") == 1
    assert "".join(t for t, s in model if s != "div") == " the open file for reading"  # the text is unchanged
    # a divergence inside a word marks the start of that word, not a split word
    true, model = align(" detected automatically so", " detected a single")
    assert "".join(t for t, s in true[: [s for _, s in true].index("div")]) == " detected"
    # ... but a true word that ends where the model runs on keeps its place: the model added to it
    true, _ = align(" dirfd `dirpath` and", " dirfd`, and `dirpath`")
    assert "".join(t for t, s in true[: [s for _, s in true].index("div")]) == " dirfd"
    same, _ = align(" all the same", " all the same")
    assert [s for _, s in same] == ["mark"]  # verbatim: all marked, no divergence


def test_documents_map_and_reproduced_spans(tmp_path):
    res = report(run_dirs=[_documents_run(tmp_path)], out=tmp_path / "rep")
    md = Path(res.markdown).read_text()
    assert "### Documents most reproduced" in md and "| book-1 | 128 | 3 | 66.7% | 64 | 64 | 0.700 |" in md
    assert "memorization\\_map.png" in md or "memorization_map.png" in md
    passage = md.split("document <code>book-1</code>")[1].split("document <code>")[0]
    assert "<b>book-1 window 0 continuation text</b>" in passage and "<b>book-1 window 1" in passage
    assert "book-1 window 2 continuation text" in passage and "<b>book-1 window 2" not in passage
    assert "**Extraction.**" in md and "25% of the tokens of its 2 documents reproduced" in md


def _visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]


def test_every_figure_has_axis_labels(tmp_path, monkeypatch, memorized):
    """The matplotlib Figure objects themselves: the report's own figures and every probe's, drawn by the real
    commands (the exposure figure from its function: it needs a model trained with canaries)."""
    from memaudit import exposure as exposure_module
    from memaudit.api import extract, memorization, mia

    drawn = []
    real_report_png, real_save = report_module.png_bytes, RunDir.save_figure

    def report_png(fig):
        drawn.append(("report", fig))
        return real_report_png(fig)

    def save_figure(self, fig, name):
        drawn.append((name, fig))
        return real_save(self, fig, name)

    monkeypatch.setattr(report_module, "png_bytes", report_png)
    monkeypatch.setattr(RunDir, "save_figure", save_figure)
    m = memorized
    extract(model_dir=m.model_dir, data=m.train_file, stride=32, limit=4, out=tmp_path / "ex")
    mia(model_dir=m.model_dir, members=m.train_file, nonmembers=m.heldout_file, attacks="loss,zlib,min_k", limit=12,
        bootstrap=20, out=tmp_path / "mia")
    memorization(model_dir=m.model_dir, data=m.train_file, reference="zstd", limit=6, out=tmp_path / "mem")
    canaries = pd.DataFrame({"id": ["c0", "control-1"], "inserted": [True, False], "exposure": [9.5, 1.2],
                             "space_size": [1024, 1024]})
    exposure_module._exposure_figure(RunDir(tmp_path / "exp", "exposure", {}), canaries)
    report(run_dirs=[tmp_path / "ex", tmp_path / "mia", tmp_path / "mem"] + _every_kind(tmp_path / "k"),
           out=tmp_path / "rep")
    names = {n for n, _ in drawn}
    assert {"rouge_l.png", "match_prefix.png", "memorization_map.png", "roc.png", "roc_loglog.png",
            "histograms.png", "mem_u_hist.png", "exposure.png", "report"} <= names
    assert sum(n == "report" for n, _ in drawn) >= 8  # compare, reach, ROC, scores, mem_U, law, training, ...
    unlabelled = [(n, ax.get_title()) for n, fig in drawn for ax in _visible_axes(fig)
                  if not ax.get_xlabel().strip() or not ax.get_ylabel().strip()]
    assert unlabelled == []
    loglog = [ax for n, fig in drawn if n == "report" for ax in _visible_axes(fig) if ax.get_xscale() == "log"]
    assert any("false positive rate" in ax.get_xlabel() for ax in loglog)  # the ROC reads low FPR on a log axis


# ---------------------------------------------------------------- the browser

_PROBE = """<script>
window.addEventListener('load', () => {
  const W = document.documentElement.clientWidth, H = window.innerHeight;
  const kf = document.getElementById('key-findings');
  const first = kf && kf.querySelector('.verdict, ul.findings li');
  const wide = [...document.querySelectorAll('body *')].filter(e => {
    const r = e.getBoundingClientRect();
    return r.right > W + 0.5 || r.left < -0.5 || e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0
      && getComputedStyle(e).overflowX !== 'visible';
  }).map(e => e.tagName + '.' + e.className);
  const broken = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (node.parentElement.closest('pre, code, td.value, script')) continue;
    const re = /[^\\s\\-\\u2013\\u2014\\/]+/g;
    let m;
    while ((m = re.exec(node.data))) {
      if (m[0].length > 30) continue;
      const range = document.createRange();
      range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
      const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.bottom)));
      if (tops.size > 1) broken.push(m[0]);
    }
  }
  document.body.setAttribute('data-probe', JSON.stringify({
    width: W, height: H, docWidth: document.documentElement.scrollWidth,
    findingsTop: kf ? kf.getBoundingClientRect().top : null,
    firstBottom: first ? first.getBoundingClientRect().bottom : null,
    wide: wide, broken: broken,
    imgs: [...document.images].map(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().height > 0),
    scripts: document.scripts.length, alerted: window.__alerted || 0,
    text: document.body.innerText.includes('<script>alert(1)<\\/script>')}));
});
</script>"""
_GUARD = "<script>window.alert = () => { window.__alerted = (window.__alerted || 0) + 1 };</script>"


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("CI is set and no Chromium was found: .ci/run installs Debian's chromium (apt-get install -y "
                    "chromium); the browser test must run in CI, not skip")
    if found is None:
        pytest.skip("chromium not installed (Debian package chromium; .ci/run installs it)")
    return found


def _in_browser(chrome: str, page: Path, profile: Path) -> dict:
    """What headless Chromium at 1280 x 800 made of the page (the probe runs after load, appended to a copy)."""
    probed = page.with_name(page.stem + "-probed.html")
    probed.write_text(page.read_text().replace("<head>", "<head>" + _GUARD, 1) + _PROBE)
    cmd = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1280,800", "--virtual-time-budget=10000",
           "--dump-dom", probed.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    probed.unlink()
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the browser did not run the page's load event"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def _assert_readable(result: dict, n_images: int) -> None:
    # a 1280 x 800 window: headless Chromium leaves about 650 px of it to the page, the first screen checked
    assert result["width"] == 1280 and 600 <= result["height"] <= 800
    assert result["findingsTop"] is not None and 0 <= result["findingsTop"] < result["height"]
    assert result["firstBottom"] is not None and result["firstBottom"] <= result["height"]  # verdict / 1st finding
    assert result["docWidth"] <= 1280 and result["wide"] == []  # nothing scrolls sideways
    assert result["broken"] == []  # no word broken across lines
    assert result["imgs"] == [True] * n_images  # every figure decoded and laid out
    assert result["scripts"] == 2 and result["alerted"] == 0  # only the probe's two scripts ran


def test_html_reads_in_headless_chromium_at_1280px(tmp_path):
    """A report of every kind, with script in the data, long labels and long paths, as a reviewer's browser
    shows it."""
    chrome = _chromium()
    runs = _every_kind(tmp_path / ("a-rather-long-folder-name-for-the-runs-" * 2))
    runs.append(_extract_run(tmp_path, "goldfish-with-a-long-label", 0.0))
    res = report(run_dirs=runs, out=tmp_path / "rep", title="memaudit pre-release risk: standard model")
    page = Path(res.html)
    result = _in_browser(chrome, page, tmp_path / "profile")
    print("browser:", {k: v for k, v in result.items() if k != "imgs"}, len(result["imgs"]), "images")
    _assert_readable(result, page.read_text().count("<img "))
    assert result["text"]  # the training sample's markup is shown as text


@pytest.mark.parametrize("committed", ["reports/demo/report.html", "reports/demo/risk/report.html"])
def test_committed_reports_read_in_headless_chromium(tmp_path, committed):
    chrome = _chromium()
    page = ROOT / committed
    if not page.is_file():
        pytest.skip(f"{committed} is not in this checkout")
    copy = tmp_path / "report.html"
    shutil.copy(page, copy)
    result = _in_browser(chrome, copy, tmp_path / "profile")
    print(committed, {k: v for k, v in result.items() if k != "imgs"}, len(result["imgs"]), "images")
    _assert_readable(result, copy.read_text().count("<img "))


def test_load_run_reads_documents(tmp_path):
    run = load_run(_documents_run(tmp_path))
    assert run.documents is not None and list(run.documents["id"]) == ["book-1", "book-2"]
    blocks = build_blocks([run], "t")
    assert any(b.kind == "passage" for b in blocks) and any(b.name.endswith("memorization_map.png") for b in blocks)


def test_memorization_over_whole_documents_lists_its_documents(tmp_path):
    """A memorization run with windows has a documents.parquet: the report lists the documents with the most
    unintended memorization, most first, in the labels' units; a run of one window per document lists none."""
    path = _memorization_run(tmp_path)
    docs = pd.DataFrame({"id": ["ch1", "ch2", "ch3"], "n_tokens": [300, 500, 90], "n_windows": [3, 5, 1],
                         "mem_u_bits": [410.5, 1830.25, 0.0], "mem_u_bits_per_token": [1.37, 3.66, 0.0],
                         "max_window_mem_u_bits": [200.0, 700.0, 0.0], "windows_with_mem_u": [2, 5, 0]})
    docs.to_parquet(path / "documents.parquet")
    blocks = build_blocks([load_run(path)], "t")
    at = next(i for i, b in enumerate(blocks) if b.kind == "h3" and b.text.startswith("Documents with the most "
                                                                                        "unintended memorization"))
    table = blocks[at + 1]
    assert table.kind == "table" and table.headers[0] == "document"
    assert [r[0] for r in table.rows] == ["ch2", "ch1", "ch3"]
    assert "unintended memorization (bits)" in table.headers and table.rows[0][table.headers.index(
        "unintended memorization (bits)")] == "1,830"
    docs.assign(n_windows=1).to_parquet(path / "documents.parquet")
    assert not any(b.text.startswith("Documents with the most") for b in build_blocks([load_run(path)], "t"))
