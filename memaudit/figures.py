"""matplotlib for the figures every command draws: the file-only Agg backend, and a figure as PNG bytes.

pyplot is imported on first use: it takes about half a second to load, which a command that draws nothing (and
`--help`) should not pay.
"""
from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed, no window opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes, closed afterwards (an open figure holds its memory until closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()
