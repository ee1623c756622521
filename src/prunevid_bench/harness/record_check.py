"""What a dataset run's log line must hold to be summarised: the fields summaries compute with
are numbers (or null) in every record this tool writes, so a record edited by hand or by
another tool is refused on reading (``runs.read_samples``), naming its line, instead of failing
deep inside a mean."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_COUNTS = ("num_frames", "n_options", "rank", "world_size")


def _numeric_field(key: str) -> bool:
    return (key in _COUNTS or key.endswith(("_s", "_fps", "ratio", "speedup")) or "tokens" in key
            or "bytes" in key or "flops" in key)


def record_problem(record: Mapping[str, Any]) -> str | None:
    """Why a log line cannot be a sample record, or None."""
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        return f"id must be text, got {record['id']!r}"
    for key, value in record.items():
        if value is not None and _numeric_field(key) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key} must be a number, got {value!r}"
    for key, kind, name in (("correct", bool, "true or false"), ("error", str, "text"), ("parse_status", str, "text")):
        if record.get(key) is not None and not isinstance(record[key], kind):
            return f"{key} must be {name}, got {record[key]!r}"
    if "rank" in record and not isinstance(record.get("world_size"), int):
        return "a record with a rank needs its world_size"
    return None
