"""Run directories: config.json, samples.parquet, summary.json, figures; atomic writes; partial results for --resume."""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import MemauditError


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())
    return path


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"memaudit": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def _changed(old: dict | None, new: dict) -> list[str]:
    """Keys whose value differs from the recorded run's; a key added since the run was recorded matches while it
    is unset (None)."""
    old = old or {}
    new = {k: v for k, v in new.items() if k in old or v is not None}
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


class RunDir:
    """One measuring command's output folder.

    A folder that already holds a run is never overwritten silently: pass `resume=True` to continue it
    (its recorded settings must match) or `overwrite=True` to start over.
    """

    def __init__(self, out: str | os.PathLike, command: str, settings: dict[str, Any], *,
                 inputs: dict[str, Any] | None = None, resume: bool = False, overwrite: bool = False):
        self.path = Path(out)
        self.partial_dir = self.path / "partial"
        self.config = {"command": command, "settings": settings, "inputs": inputs or {}, "versions": versions(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        cfg_file = self.path / "config.json"
        if self.path.exists() and not self.path.is_dir():
            raise MemauditError(f"--out {self.path} exists and is not a directory")
        if cfg_file.exists():
            if resume:
                old = json.loads(cfg_file.read_text())
                if old.get("command") != command:
                    raise MemauditError(f"cannot resume {self.path}: it holds a {old.get('command')} run, not {command}")
                was, now = old.get("settings") or {}, json.loads(json.dumps(settings, default=_json_default))
                if changed := _changed(was, now):
                    raise MemauditError(f"cannot resume {self.path}: it was started with other settings ("
                                        + "; ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed) + ")")
                if changed := _changed(old.get("inputs"), json.loads(json.dumps(inputs or {}, default=_json_default))):
                    raise MemauditError(f"cannot resume {self.path}: its inputs differ ({', '.join(changed)}: other "
                                        "files, or files changed since)")
                self.config["started"] = old.get("started", self.config["started"])
            elif overwrite:
                shutil.rmtree(self.path)
            else:
                raise MemauditError(f"{self.path} already holds a run: pass --resume to continue it, "
                                    "--overwrite to replace it, or choose another --out")
        elif resume and self.partial_dir.exists():
            pass
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(cfg_file, self.config)

    @staticmethod
    def default_out(command: str) -> Path:
        return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"

    # Partial results: one parquet file per finished unit of work (a batch), named by a key.
    def save_partial(self, key: str, df: pd.DataFrame) -> None:
        write_parquet(self.partial_dir / f"{key}.parquet", df)

    def load_partial(self, key: str) -> pd.DataFrame | None:
        f = self.partial_dir / f"{key}.parquet"
        return pd.read_parquet(f) if f.is_file() else None

    def load_partials(self) -> list[pd.DataFrame]:
        if not self.partial_dir.exists():
            return []
        return [pd.read_parquet(f) for f in sorted(self.partial_dir.glob("*.parquet"))]

    def write_samples(self, df: pd.DataFrame, name: str = "samples.parquet") -> Path:
        return write_parquet(self.path / name, df)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return write_json(self.path / "summary.json", summary)

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path / name, obj)

    def save_figure(self, fig, name: str) -> Path:
        import io

        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path = self.path / name
        _atomic_write_bytes(path, buf.getvalue())
        return path

    def finish(self) -> None:
        """Drop the partial results once the final files are written."""
        if self.partial_dir.exists():
            shutil.rmtree(self.partial_dir)
