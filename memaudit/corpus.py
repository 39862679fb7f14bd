"""The embedded real-text corpus: docstrings of the installed Python standard library (no downloads).

Deterministic for a given Python version: modules from a fixed list, objects in name order, whitespace
normalised, exact duplicates dropped. See data/README.md for why this corpus.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import random
import re
import sysconfig
import warnings
from pathlib import Path

from .errors import MemauditError

MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar cmd codecs collections colorsys configparser "
    "contextlib copy csv dataclasses datetime decimal difflib dis email enum filecmp fnmatch fractions ftplib "
    "functools getopt gettext glob graphlib gzip hashlib heapq hmac html http imaplib inspect io ipaddress "
    "itertools json locale logging lzma mailbox math mimetypes numbers operator optparse os pathlib pickle "
    "pkgutil platform plistlib poplib pprint queue quopri random re reprlib sched secrets selectors shelve "
    "shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess "
    "symtable sysconfig tarfile tempfile textwrap threading timeit tokenize tomllib trace traceback types "
    "typing unittest urllib uuid warnings wave weakref xml zipfile zipimport zlib"
).split()


def _clean(doc: str) -> str:
    return re.sub(r"\s+", " ", doc).strip()


def stdlib_docstrings(min_chars: int = 400, max_chars: int = 2000) -> list[str]:
    """Docstrings of stdlib modules, classes and functions, each between min_chars and max_chars."""
    seen, out = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
            objects = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
            for obj in objects:
                if not (inspect.ismodule(obj) and obj is mod) and not (
                        inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                    continue
                doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
                if not doc:
                    continue
                text = _clean(doc)
                if min_chars <= len(text) <= max_chars and text not in seen:
                    seen.add(text)
                    out.append(text)
    return out


def demo_corpus(n_train: int = 100, n_heldout: int = 100, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint train / held-out documents drawn from the stdlib docstrings with a fixed seed."""
    docs = stdlib_docstrings()
    if len(docs) < n_train + n_heldout:
        raise MemauditError(f"only {len(docs)} docstrings are available here: --n-train + --n-heldout is "
                            f"{n_train + n_heldout}")
    rng = random.Random(seed)
    rng.shuffle(docs)
    return docs[:n_train], docs[n_train:n_train + n_heldout]


SOURCE_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "turtledemo", "__pycache__"})


def stdlib_source_docstrings(min_chars: int = 200, max_chars: int = 20_000) -> list[str]:
    """Every docstring in the installed standard library's source files (a larger corpus, ~1.2M characters on
    Python 3.11.7, for experiments that need many unique documents).

    Read with `ast` from the .py files under the stdlib directory (nothing imported), sorted by path, each file's
    docstrings in ast.walk (breadth-first) order; test suites, idlelib, turtledemo and site-packages skipped;
    whitespace normalised, exact duplicates dropped. See data/README.md.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SOURCE_SKIP_DIRS.intersection(p.relative_to(root).parts) and not p.name.startswith("test_"))
    seen, out = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        for path in files:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node, clean=False)
                text = _clean(doc) if doc else ""
                if min_chars <= len(text) <= max_chars and text not in seen:
                    seen.add(text)
                    out.append(text)
    return out
