"""Lines of a method grid (``sweep --methods``) that are not one method: name -> (the methods
on, settings on top). A method registers its own (PruneVid: its stages together)."""

from __future__ import annotations

import difflib
from typing import Any

from prunevid_bench.errors import PruneVidError

_LINES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}


def register_line(name: str, methods: tuple[str, ...], settings: dict[str, Any] | None = None) -> None:
    """A named line of a method grid: these registered methods on together, with ``settings``
    (dotted keys) on top; the budget drives the last of them that has a knob."""
    _LINES[name] = (tuple(methods), dict(settings or {}))


def method_line(name: str) -> tuple[tuple, dict[str, Any]]:
    """The methods and settings of one line of a method grid: a registered line, or one method."""
    from prunevid_bench.methods import all_methods, get_method

    names = [m.name for m in all_methods()]  # loads the registry (and the lines its methods register)
    if name in _LINES:
        methods, settings = _LINES[name]
        return tuple(get_method(m) for m in methods), settings
    if name not in names:
        close = difflib.get_close_matches(name, [*names, *_LINES], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PruneVidError(f"unknown method '{name}'{hint}; see `prunevid methods`")
    return (get_method(name),), {}
