"""Reading a YAML config file (a preset, a user's --config, a sweep grid) with one-line errors (moved from config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prunevid_bench.errors import PruneVidError


def load_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PruneVidError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PruneVidError(f"cannot read config file {path}: {exc.strerror}; check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PruneVidError(f"{path}: line {line} is not UTF-8 text; save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise PruneVidError(f"{path}: not valid YAML{where}") from None
    return data

