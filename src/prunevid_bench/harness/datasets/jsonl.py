"""Our own rows: ``id``, ``video``, ``question``, ``options``, ``answer`` (a letter, a 0-based int
or an option's text), optional ``category``, ``start``, ``end``. Also what ``prunevid toy-data``
writes. Registered last: its keys are the loosest test."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunevid_bench.choices import LETTERS
from prunevid_bench.harness.datasets.base import (
    QASample,
    Skip,
    as_text,
    bounds,
    build_sample,
    index_of_text,
    missing,
    required_text,
)
from prunevid_bench.harness.datasets.registry import RowReader, register_format


@register_format("jsonl", title="JSONL", detect=lambda keys: "options" in keys and "video" in keys)
def open_jsonl(path: Path, root: Path, answers: Any) -> RowReader:
    def read(row: Mapping[str, Any], position: int) -> QASample:
        return jsonl_row(row, root)

    return read


def jsonl_row(row: Mapping, root: Path) -> QASample:
    sample_id = required_text(row, "id")
    options = row.get("options")
    if not isinstance(options, list):
        raise Skip("options is not a list")
    options = [as_text(o, "option") for o in options]
    answer = row.get("answer")
    if missing(answer):
        raise Skip("no answer")
    if isinstance(answer, bool):
        raise Skip(f"answer {answer!r} is neither a letter, an index nor an option's text")
    if isinstance(answer, int):
        index = answer  # range is checked in build_sample
    elif isinstance(answer, str):
        index = index_of_letter_or_text(answer, options)
    else:
        raise Skip(f"answer {answer!r} is neither a letter, an index nor an option's text")
    category = row.get("category")
    start, end = bounds(row)
    video = root / required_text(row, "video")  # an absolute video path survives the join
    return build_sample(
        sample_id,
        video,
        required_text(row, "question"),
        options,
        index,
        None if missing(category) else str(category),
        start,
        end,
    )


def index_of_letter_or_text(answer: str, options: list[str]) -> int:
    """A letter ("B") names an option; otherwise the answer must be one option's exact text.

    A digit string is text, not an index ("2" is an option of a counting question); only a JSON
    int is an index. A letter that is also another option's text is ambiguous and skipped.
    """
    stripped = answer.strip()
    text_matches = [i for i, option in enumerate(options) if option.strip() == stripped]
    if len(stripped) == 1 and stripped.upper() in LETTERS:
        index = LETTERS.index(stripped.upper())
        if any(i != index for i in text_matches):
            raise Skip(f"answer {answer!r} is both a letter and the text of another option")
        return index
    return index_of_text(answer, options)
