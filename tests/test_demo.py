"""`memaudit demo` as shipped: standard memorizes, held-out does not, goldfish and sinks extract less; reuse."""
import subprocess
import sys
import time

from memaudit.demo import run_demo


def test_demo_as_shipped_mitigations_extract_less(tmp_path):
    lines = []
    t0 = time.time()
    res = run_demo(tmp_path / "demo", echo=lines.append)
    f = res["figures"]
    assert f["standard"]["exact_rate"] >= 0.9 and f["standard"]["heldout_exact_rate"] <= 0.05
    assert f["goldfish"]["exact_rate"] < f["standard"]["exact_rate"]
    assert f["sinks"]["exact_rate"] < f["standard"]["exact_rate"]
    md = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "| goldfish |" in md and "| sinks |" in md and "standard, held-out docs" in md
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    print(f"demo as shipped: {time.time() - t0:.0f} s")  # issue 6 asks for < 5 minutes on 2 cores
    # a second run reuses the trained models and only re-measures
    lines.clear()
    run_demo(tmp_path / "demo", echo=lines.append)
    assert sum("reusing the trained model" in ln for ln in lines) == 3


def test_demo_cli_rejects_unknown_objective(tmp_path):
    r = subprocess.run([sys.executable, "-m", "memaudit", "demo", "--objectives", "standard,nope",
                        "--out", str(tmp_path / "d")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --objectives") and "Traceback" not in r.stderr
