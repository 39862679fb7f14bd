"""Progress bars (rich) on stderr, shown only on a terminal so logs stay clean."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def _enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("MEMAUDIT_NO_PROGRESS")


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n, description=None)`; a no-op when stderr is not a terminal."""
    if not _enabled() or total <= 0:
        yield lambda n=1, description=None: None
        return

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(description, total=total)
        # `advance(n, description=...)` also updates the label, e.g. with the running loss
        yield lambda n=1, description=None: prog.update(
            task, advance=n, **({"description": description} if description else {}))
