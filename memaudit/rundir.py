"""Run directories: config.json, samples.parquet, summary.json, figures; atomic writes; partial results for --resume.

Every folder memaudit writes (a run, a trained model, a report, the demo) is an *owned* output: a marker file,
`.memaudit-run.json`, names the command that wrote it and lists every file and folder it wrote, recorded before
each write. `--overwrite` removes only what that list names, and only in a folder the same command wrote; a folder
holding anything else (a model, another command's run, a user's files, an input of the current run) is refused
before any work starts. Files follow the user's umask, and every write is atomic (a temporary name, then a rename).
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
import transformers

from .errors import MemauditError
from .figures import png_bytes
from .version import __version__

MARKER = ".memaudit-run.json"
# summary.json's layout. Adding a key keeps the version; renaming or removing one bumps it, and a reader refuses a
# summary from a newer layout instead of misreading it. Summaries written before the field existed are version 1.
SUMMARY_SCHEMA_VERSION = 1
# The files a run directory written before markers existed may hold: adopted on --resume, nothing else is.
_LEGACY_NAMES = ("config.json", "summary.json", "*.parquet", "*.png", "*.csv")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename; mode follows the umask
    (mkstemp alone would leave 0600, unreadable to colleagues sharing a report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON: a non-finite number (a threshold no sample reaches, an undefined rate) is written as null,
    since NaN and Infinity are not JSON and strict readers (a release pipeline's) reject them."""
    path = Path(path)
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())
    return path


def read_json(path: Path, strict: bool = False) -> dict:
    """A JSON object from a run; damage is one clear error. `strict`: anything but an object is damage too."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise MemauditError(f"unreadable {path}: {str(exc).splitlines()[0][:200]}") from None
    if strict and not isinstance(obj, dict):
        raise MemauditError(f"{path} is damaged: it holds a {type(obj).__name__}, not a JSON object")
    return obj if isinstance(obj, dict) else {}


def summary_header(command: str) -> dict[str, Any]:
    """The keys every summary.json starts with; a command's returned summary starts with them too."""
    return {"schema_version": SUMMARY_SCHEMA_VERSION, "command": command}


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's summary.json ({} when the run has none), refused when a newer memaudit wrote it."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return {}
    summary = read_json(path, strict=True)
    version = summary.get("schema_version", 1)
    if not isinstance(version, int) or version > SUMMARY_SCHEMA_VERSION:
        raise MemauditError(f"{path} has summary schema version {version!r}; this memaudit reads up to version "
                            f"{SUMMARY_SCHEMA_VERSION}: upgrade memaudit to read it")
    return summary


def _finite(obj: Any) -> Any:
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    return obj


def _json_default(o: Any):
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
    return {"memaudit": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


# --- ownership of output folders ---------------------------------------------------------------------------------

def _read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("command"), str):
        return None
    listed = [*(marker.get("files") or ()), *(marker.get("dirs") or ())]
    if not all(_plain_name(n) for n in listed):  # a damaged or forged list: nothing in it is trusted
        return None
    return marker


def _plain_name(name: object) -> bool:
    """One entry of this folder: never a path that could reach outside it."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _legacy_command(path: Path) -> str | None:
    """The command of a run directory written before markers existed (its config.json names it)."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(cfg, dict) and isinstance(cfg.get("command"), str) and "memaudit" in (cfg.get("versions") or {}):
        return cfg["command"]
    return None


def _foreign(path: Path, marker: dict) -> list[str]:
    """Entries under `path` that its marker does not list. A listed folder is wholly owned (the command made it,
    runs it nests included, as `risk` nests its measurements); an unlisted one, even another memaudit run, is not."""
    files, dirs = set(marker.get("files") or ()), set(marker.get("dirs") or ())
    out = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if name == MARKER or name in files or name in dirs:
            continue
        if entry.is_dir() and not entry.is_symlink() and not any(entry.iterdir()):
            continue  # an empty folder holds nothing to lose
        out.append(name + ("/" if entry.is_dir() else ""))
    return out


def _remove_owned(path: Path, marker: dict) -> None:
    """Delete what the marker lists, then the marker; keep anything else."""
    for name in marker.get("files") or ():
        f = path / name
        if f.is_file() or f.is_symlink():
            f.unlink()
    for name in marker.get("dirs") or ():
        d = path / name
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d)
    (path / MARKER).unlink(missing_ok=True)


def _enclosing(out: Path) -> str | None:
    """Why `out` may not be written inside a folder above it: a model directory, or a folder another command owns
    that did not set this sub-folder aside for a run of its own (risk's measurements, the demo's runs)."""
    here = out.resolve()
    for parent in here.parents:
        if _is_model_dir(parent):
            return f"lies inside the model directory {parent}"
        marker = _read_marker(parent)
        if marker is not None and here.relative_to(parent).parts[0] not in set(marker.get("dirs") or ()):
            return f"lies inside {parent}, a memaudit {marker['command']} run"
    return None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _nothing_written(path: Path) -> bool:
    """Empty, or holding only a marker and empty folders (a run that failed before writing anything): a rerun may
    use it as a new folder."""
    return all(e.name == MARKER or (e.is_dir() and not e.is_symlink() and not any(e.iterdir()))
               for e in path.iterdir())


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(
        any(path.glob(pat)) for pat in ("*.safetensors", "*.bin", "*.pt"))


def check_output(out: str | os.PathLike, command: str, *, inputs: Iterable[str | os.PathLike] = (),
                 resume: bool = False, overwrite: bool = False, reuse: bool = False) -> None:
    """Refuse, in one line and before any work, an output folder memaudit may not write.

    Allowed: a new or empty folder; one holding a `command` run with `resume` (continue), `overwrite` (replace
    what it wrote) or `reuse` (write into it again, as `report` and `demo` do). Never: a file, a folder with files
    memaudit did not write, another command's run, a folder that is or holds an input, or one inside a model
    directory."""
    if not str(out).strip():
        raise MemauditError("--out is empty: name the folder to write")
    if resume and overwrite:
        raise MemauditError("--resume and --overwrite exclude each other: continue the run or replace it")
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise MemauditError(f"--out {out} is a symbolic link to nothing: choose another --out")
    if out.exists() and not out.is_dir():
        raise MemauditError(f"--out {out} exists and is not a directory")
    if why := _enclosing(out):
        raise MemauditError(f"--out {out} {why}: choose another --out")
    here = out.resolve()
    for p in inputs:
        p = Path(p)
        if not p.exists():
            continue
        there = p.resolve()
        if _inside(there, here) or (_is_model_dir(p) and _inside(here, there)):
            what = "is" if there == here else "holds" if _inside(there, here) else "lies inside"
            raise MemauditError(f"--out {out} {what} an input of this run ({p}): choose another --out")
    if not out.is_dir() or _nothing_written(out):
        return
    marker = _read_marker(out)
    if marker is None and (out / MARKER).exists():
        raise MemauditError(f"--out {out}: its {MARKER} is damaged (or lists paths outside the folder), so what "
                            "memaudit wrote there is unknown: remove the folder yourself or choose another --out")
    legacy = _legacy_command(out) if marker is None else None
    if marker is None and legacy is None:
        raise MemauditError(f"--out {out} is not empty and was not written by memaudit: choose another --out")
    other = marker["command"] if marker is not None else legacy
    if other != command:
        raise MemauditError(f"--out {out} holds a {other} run, not a {command} run: choose another --out")
    if resume or reuse:
        return
    if not overwrite:
        raise MemauditError(f"{out} already holds a {command} run: pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out")
    if marker is None:
        raise MemauditError(f"{out} holds a {command} run written by an older memaudit, which did not list its "
                            "files: remove it yourself or choose another --out")
    if foreign := _foreign(out, marker):
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MemauditError(f"--out {out} holds files memaudit did not write ({listed}): move them or choose "
                            "another --out")


class Owned:
    """An output folder claimed by one command: everything written into it is listed in its marker first."""

    def __init__(self, out: str | os.PathLike, command: str, *, inputs: Iterable[str | os.PathLike] = (),
                 resume: bool = False, overwrite: bool = False, reuse: bool = False):
        self.path = Path(out)
        self.command = command
        inputs = list(inputs)
        check_output(self.path, command, inputs=inputs, resume=resume, overwrite=overwrite, reuse=reuse)
        marker = _read_marker(self.path) if self.path.is_dir() else None
        if overwrite and not resume and marker is not None:
            _remove_owned(self.path, marker)
            marker = None
        if marker is None and self.path.is_dir() and _legacy_command(self.path) == command:
            marker = {"files": sorted({p.name for pat in _LEGACY_NAMES for p in self.path.glob(pat)}),
                      "dirs": ["partial"] if (self.path / "partial").is_dir() else []}
        self.files: set[str] = set((marker or {}).get("files") or ())
        self.dirs: set[str] = set((marker or {}).get("dirs") or ())
        self.path.mkdir(parents=True, exist_ok=True)
        self._save_marker()

    def _save_marker(self) -> None:
        write_json(self.path / MARKER, {"command": self.command, "memaudit": __version__,
                                        "files": sorted(self.files), "dirs": sorted(self.dirs)})

    def record(self, *names: str, dirs: Iterable[str] = ()) -> None:
        """List top-level files (`names`) and wholly owned sub-folders (`dirs`) before they are written."""
        new_files, new_dirs = set(names) - self.files, set(dirs) - self.dirs
        if new_files or new_dirs:
            self.files |= new_files
            self.dirs |= new_dirs
            self._save_marker()

    def write_bytes(self, name: str, data: bytes) -> Path:
        top, _, rest = name.partition("/")
        self.record(*([] if rest else [top]), dirs=[top] if rest else [])
        path = self.path / name
        atomic_write_bytes(path, data)
        return path

    def adopt(self, staging: Path) -> None:
        """Move everything in `staging` (a folder beside or inside this one) into it, listing each entry first:
        for files written by other libraries (save_pretrained) whose names memaudit does not choose."""
        for entry in sorted(staging.iterdir()):
            for f in [entry, *entry.rglob("*")] if entry.is_dir() else [entry]:
                if f.is_file():  # some writers (safetensors) create files 0600 whatever the umask
                    os.chmod(f, _FILE_MODE)
            if entry.is_dir():
                self.record(dirs=[entry.name])
                if (self.path / entry.name).exists():
                    shutil.rmtree(self.path / entry.name)
            else:
                self.record(entry.name)
            os.replace(entry, self.path / entry.name)
        staging.rmdir()


def _changed(old: dict | None, new: dict) -> list[str]:
    """Keys whose value differs from the recorded run's; a key added since the run was recorded matches while it
    is unset (None)."""
    old = old or {}
    new = {k: v for k, v in new.items() if k in old or v is not None}
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def input_paths(inputs: dict[str, Any] | None) -> list[str]:
    """The paths among a run's recorded inputs (the rest are their hashes)."""
    return [v for k, v in (inputs or {}).items() if isinstance(v, str) and not k.endswith("_sha256")]


class RunDir:
    """One measuring command's output folder.

    A folder that already holds a run is never overwritten silently: pass `resume=True` to continue it
    (its recorded settings must match) or `overwrite=True` to start over (see `check_output` for what may be
    replaced).
    """

    def __init__(self, out: str | os.PathLike, command: str, settings: dict[str, Any], *,
                 inputs: dict[str, Any] | None = None, resume: bool = False, overwrite: bool = False):
        self.path = Path(out)
        self.partial_dir = self.path / "partial"
        self.config = {"command": command, "settings": settings, "inputs": inputs or {}, "versions": versions(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        cfg_file = self.path / "config.json"
        check_output(self.path, command, inputs=input_paths(inputs), resume=resume, overwrite=overwrite)
        if resume and cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            was, now = old.get("settings") or {}, json.loads(json.dumps(settings, default=_json_default))
            if changed := _changed(was, now):
                raise MemauditError(f"cannot resume {self.path}: it was started with other settings ("
                                    + "; ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed) + ")")
            if changed := _changed(old.get("inputs"), json.loads(json.dumps(inputs or {}, default=_json_default))):
                raise MemauditError(f"cannot resume {self.path}: its inputs differ ({', '.join(changed)}: other "
                                    "files, or files changed since)")
            self.config["started"] = old.get("started", self.config["started"])
        self.owned = Owned(self.path, command, resume=resume, overwrite=overwrite)
        self.write_json("config.json", self.config)

    @staticmethod
    def default_out(command: str) -> Path:
        return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"

    # Partial results: one parquet file per finished unit of work (a batch), named by a key.
    def save_partial(self, key: str, df: pd.DataFrame) -> None:
        self.owned.record(dirs=[self.partial_dir.name])
        write_parquet(self.partial_dir / f"{key}.parquet", df)

    def load_partial(self, key: str) -> pd.DataFrame | None:
        f = self.partial_dir / f"{key}.parquet"
        return pd.read_parquet(f) if f.is_file() else None

    def load_partials(self) -> list[pd.DataFrame]:
        if not self.partial_dir.exists():
            return []
        return [pd.read_parquet(f) for f in sorted(self.partial_dir.glob("*.parquet"))]

    def partial_path(self, name: str) -> Path:
        """A file of our own under partial/ (checkpoints), listed before it is written."""
        self.owned.record(dirs=[self.partial_dir.name])
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        return self.partial_dir / name

    def write_samples(self, df: pd.DataFrame, name: str = "samples.parquet") -> Path:
        self.owned.record(name)
        return write_parquet(self.path / name, df)

    def write_csv(self, name: str, df: pd.DataFrame) -> Path:
        return self.owned.write_bytes(name, df.to_csv(index=False).encode())

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """summary.json, stamped with the command and the schema version its readers check."""
        return self.write_json("summary.json", summary_header(self.config["command"]) | dict(summary))

    def write_json(self, name: str, obj: Any) -> Path:
        self.owned.record(name)
        return write_json(self.path / name, obj)

    def save_figure(self, fig, name: str) -> Path:
        return self.owned.write_bytes(name, png_bytes(fig))

    def finish(self) -> None:
        """Drop the partial results once the final files are written."""
        if self.partial_dir.exists():
            shutil.rmtree(self.partial_dir)
