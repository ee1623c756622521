"""The registry of dataset row formats: a name, how to recognise a file, how to read one row."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.datasets.base import QASample

# Given the dataset file, the video root and the --answers value, a function reading one row
# (with its 1-based position in the file) into a sample; it raises Skip for an unusable row.
RowReader = Callable[[Mapping[str, Any], int], QASample]
OpenFormat = Callable[[Path, Path, Any], RowReader]


@dataclass(frozen=True)
class RowFormat:
    name: str  # the --format value
    title: str  # the dataset's own name, for messages
    detect: Callable[[set[str]], bool]  # do these first-row keys belong to this format?
    open: OpenFormat
    answers_file: bool = False  # answers come in a separate file (--answers)


_FORMATS: dict[str, RowFormat] = {}


def register_format(name: str, *, title: str, detect: Callable[[set[str]], bool],
                    answers_file: bool = False) -> Callable[[OpenFormat], OpenFormat]:
    """Decorate a format's ``open(path, video_root, answers) -> row reader`` to register it."""

    def add(open_format: OpenFormat) -> OpenFormat:
        if name in _FORMATS:
            raise ValueError(f"dataset format {name!r} is registered twice")
        _FORMATS[name] = RowFormat(name, title, detect, open_format, answers_file)
        return open_format

    return add


def format_names() -> list[str]:
    return list(_FORMATS)


def get_format(name: str) -> RowFormat:
    if name not in _FORMATS:
        from prunevid_bench.config import _suggest

        raise PruneVidError(f"unknown dataset format {name!r}{_suggest(name, format_names())}; "
                            f"use one of {', '.join(format_names())}")
    return _FORMATS[name]


def detect_format(first_row: Mapping[str, Any] | None, path: Path) -> RowFormat:
    """The first registered format that recognises the first row's keys."""
    if first_row is None:
        raise PruneVidError(f"{path} holds no question rows; check the file")
    keys = set(first_row)
    for fmt in _FORMATS.values():
        if fmt.detect(keys):
            return fmt
    raise PruneVidError(
        f"cannot tell the dataset format of {path} from its keys {sorted(keys)}; "
        f"pass --format with one of {', '.join(format_names())}"
    )
