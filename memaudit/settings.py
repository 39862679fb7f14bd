"""How every command's Python entry point takes its settings: one dataclass object, or its fields as keywords."""
from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def settings_from(cls: type[T], settings: T | None, options: dict[str, Any]) -> T:
    """`settings` itself, or `cls(**options)`; both at once is a mistake (which would win?)."""
    if settings is None:
        return cls(**options)
    if options:
        raise TypeError(f"pass a {cls.__name__} or keyword options, not both (got {', '.join(sorted(options))})")
    if not isinstance(settings, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(settings).__name__}")
    return settings
