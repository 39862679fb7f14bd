"""`memaudit demo`: end to end, small (default suite) and as shipped (slow)."""
import json

import pytest

from memaudit.demo import run_demo


def test_demo_small_end_to_end(tmp_path):
    lines = []
    s = run_demo(tmp_path / "demo", epochs=60, n_train=16, n_heldout=16, echo=lines.append)
    out = "\n".join(lines)
    assert "trained on" in out and "held out" in out
    assert s["train"]["exact_rate"] > s["heldout"]["exact_rate"]
    for name in ("train", "heldout"):
        saved = json.loads((tmp_path / "demo" / f"extract-{name}" / "summary.json").read_text())
        assert saved == s[name]
    # a second run reuses the trained model
    lines.clear()
    run_demo(tmp_path / "demo", epochs=60, n_train=16, n_heldout=16, echo=lines.append)
    assert any("reusing the trained model" in ln for ln in lines)


@pytest.mark.slow
def test_demo_as_shipped(tmp_path):
    s = run_demo(tmp_path / "demo", echo=lambda *_: None)
    assert s["train"]["exact_rate"] >= 0.9 and s["heldout"]["exact_rate"] <= 0.05
