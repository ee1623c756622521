"""What every dataset format produces (a QASample per usable row) and the checks they share."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunevid_bench.choices import LETTERS  # options beyond ten cannot be lettered


@dataclass(frozen=True)
class QASample:
    """One multiple-choice question about one video."""

    id: str
    video: Path  # resolved path; existence is checked by preflight, not here
    question: str
    options: tuple[str, ...]
    answer_index: int  # 0-based index into options
    category: str | None = None
    start: float | None = None  # clip bounds in seconds (MVBench), None = whole video
    end: float | None = None
    # Extra labels for breakdowns (Video-MME duration/domain); not part of equality or hash.
    meta: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer_index]


@dataclass
class Dataset:
    """Samples that passed validation, plus every row that did not and why."""

    name: str  # file stem, e.g. "subset_questions" or "action_sequence"
    format: str  # a registered format's name
    path: Path
    samples: list[QASample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row id or "line N", reason)

    def __len__(self) -> int:
        return len(self.samples)


class Skip(Exception):
    """A row is unusable; the message is the reason reported in Dataset.skipped."""


def build_sample(sample_id, video, question, options, index, category, start, end, meta=None) -> QASample:
    """Checks shared by every format, then the frozen sample."""
    if len(options) < 2:
        raise Skip(f"{len(options)} option(s); a multiple-choice question needs at least 2")
    if len(options) > len(LETTERS):
        raise Skip(f"{len(options)} options; at most {len(LETTERS)} can be lettered A-J")
    empty = [LETTERS[i] for i, option in enumerate(options) if not option]
    if empty:
        raise Skip(f"option {empty[0]} is empty")
    if not 0 <= index < len(options):
        raise Skip(f"answer index {index} is outside the {len(options)} options")
    try:
        video = Path(video).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop (RuntimeError before Python 3.13)
        raise Skip(f"video {video} cannot be resolved ({err}); fix the link") from None
    return QASample(
        id=str(sample_id),
        video=video,
        question=question,
        options=tuple(options),
        answer_index=index,
        category=category,
        start=start,
        end=end,
        meta=meta or {},
    )


def index_of_text(answer: str, options: list[str]) -> int:
    matches = [i for i, option in enumerate(options) if option.strip() == answer.strip()]
    if not matches:
        raise Skip(f"answer {answer!r} is not among the options")
    if len(matches) > 1:
        raise Skip(f"answer {answer!r} matches {len(matches)} identical options")
    return matches[0]


def bounds(row: Mapping) -> tuple[float | None, float | None]:
    values = []
    for key in ("start", "end"):
        raw = row.get(key)
        if missing(raw):
            values.append(None)
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise Skip(f"{key} {raw!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0:
            raise Skip(f"{key} {raw!r} is not a time in seconds")
        values.append(value)
    start, end = values
    if start is not None and end is not None and end <= start:
        raise Skip(f"end {end} is not after start {start}")
    return start, end


def missing(value: Any) -> bool:
    """None, NaN (pandas' empty cell) or an empty string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def as_text(value: Any, what: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not missing(value):
        return str(value)  # numeric options ("3") are legitimate
    if not isinstance(value, str):
        raise Skip(f"{what} is not text")
    return value.strip()


def required_text(row: Mapping, key: str) -> str:
    value = row.get(key)
    if missing(value):
        raise Skip(f"no {key}")
    return as_text(value, key)
