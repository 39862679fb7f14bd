"""Bad input to `memaudit extract`: each ends with one `error: ...` line, exit code 2 and no traceback.

Most cases run `memaudit.cli.main` in-process (the same wrapper the console script runs); two run the real
console entry point in a subprocess to check what a user's terminal shows.
"""
import shutil
import subprocess
import sys

import pytest
import torch

from memaudit import cli


def _run_main(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["memaudit", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    cap = capsys.readouterr()
    return exc.value.code, cap.err


def _assert_one_error_line(code, err, expect):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_models(memorized, tmp_path_factory):
    """Broken model directories derived from the memorized fixture's good one."""
    from transformers import BertConfig, BertForMaskedLM

    from memaudit import load_model

    root = tmp_path_factory.mktemp("bad_models")
    good = memorized.model_dir
    not_model = root / "not_model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello")
    bert = root / "bert"
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64)).save_pretrained(bert)
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickled = root / "pickled"
    m = load_model(good)
    pickled.mkdir()
    m.model.config.save_pretrained(pickled)
    torch.save(m.model.state_dict(), pickled / "pytorch_model.bin")  # transformers 5 only writes safetensors
    m.tokenizer.save_pretrained(pickled)
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    return {"good": good, "missing": root / "nope", "not_model": not_model, "bert": bert, "corrupt": corrupt,
            "pickled": pickled}


@pytest.mark.parametrize("case,expect", [
    ("missing", "model directory not found"),
    ("not_model", "not a model directory"),
    ("bert", "not a causal language model"),
    ("corrupt", "corrupt or unreadable weights"),
    ("pickled", "--allow-pickle"),
])
def test_bad_model_dirs(bad_models, memorized, monkeypatch, capsys, case, expect):
    code, err = _run_main(monkeypatch, capsys, ["extract", bad_models[case], "--data", memorized.train_file,
                                                "--out", bad_models[case].parent / f"run-{case}"])
    _assert_one_error_line(code, err, expect)


def test_pickled_weights_load_with_allow_pickle(bad_models, memorized, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["memaudit", "extract", str(bad_models["pickled"]), "--data",
                                      str(memorized.train_file), "--limit", "5", "--allow-pickle",
                                      "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code in (0, None), capsys.readouterr().err
    assert (tmp_path / "r" / "samples.parquet").exists()


@pytest.mark.parametrize("content,args,expect", [
    (b"", [], "no documents"),
    (b'{"text": "fine"}\n{"text": oops}\n', [], "line 2 is not valid JSON"),
    (b'{"text": "caf\xe9 au lait"}\n', [], "line 1 is not valid UTF-8"),
    (None, ["--prefix", "60", "--suffix", "60"], "model's context is 96"),
    (b'{"text": "too short"}\n{"text": "also short"}\n', [], "all 2 documents are shorter than"),
])
def test_bad_data(memorized, tmp_path, monkeypatch, capsys, content, args, expect):
    data = memorized.train_file
    if content is not None:
        data = tmp_path / "d.jsonl"
        data.write_bytes(content)
    code, err = _run_main(monkeypatch, capsys, ["extract", memorized.model_dir, "--data", data, *args,
                                                "--out", tmp_path / "run"])
    _assert_one_error_line(code, err, expect)


def test_console_shows_one_line(bad_models, memorized, tmp_path):
    """The real entry point, as a user's terminal sees it."""
    r = subprocess.run([sys.executable, "-m", "memaudit", "extract", str(bad_models["corrupt"]), "--data",
                        str(memorized.train_file), "--out", str(tmp_path / "r")], capture_output=True, text=True)
    _assert_one_error_line(r.returncode, r.stderr, "corrupt or unreadable weights")
