"""MLVU (multiple choice): the dev set as lmms-eval reads it (``sy1998/MLVU_dev``, a parquet of rows
``video_name``, ``question``, ``candidates``, ``answer``, ``task_type``, ``question_id``). The
``question`` text already carries the lettered options ("(A) ..." lines), as lmms-eval sends it;
our prompt letters the options itself, so those lines are taken off the question (and read as
the options when a row has no ``candidates``). ``answer`` is the right option's letter ("A" or
"(A)") or its text. The video is ``<video root>/<video_name>``; the task type is the category
(MLVU's M-avg is the mean over task types: ``prunevid reproduce`` computes it so)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunevid_bench.choices import LETTERS
from prunevid_bench.harness.datasets.base import (
    QASample,
    Skip,
    as_text,
    build_sample,
    index_of_text,
    missing,
    required_text,
)
from prunevid_bench.harness.datasets.registry import RowReader, register_format

_OPTION_LINE = re.compile(r"^\s*\(([A-J])\)\s*(.*?)\s*$")  # "(B) a red ball"
_LETTER = re.compile(r"^\s*\(?([A-J])\)?\s*$")


@register_format("mlvu", title="MLVU", detect=lambda keys: "video_name" in keys)
def open_mlvu(path: Path, root: Path, answers: Any) -> RowReader:
    def read(row: Mapping[str, Any], position: int) -> QASample:
        return mlvu_row(row, position, root)

    return read


def split_options(text: str) -> tuple[str, list[str]]:
    """(the question without its trailing "(A) ..." lines, those options in order)."""
    lines = text.strip().split("\n")
    options: list[str] = []
    while lines:
        match = _OPTION_LINE.match(lines[-1])
        if not match:
            break
        options.insert(0, match.group(2))
        lines.pop()
    letters = [_OPTION_LINE.match(line).group(1) for line in text.strip().split("\n")[len(lines):]]
    if letters != list(LETTERS[: len(letters)]):  # not a clean A, B, C... block: leave the text whole
        return text.strip(), []
    return "\n".join(lines).strip(), options


def mlvu_row(row: Mapping, position: int, root: Path) -> QASample:
    question, embedded = split_options(required_text(row, "question"))
    raw_candidates = row.get("candidates")
    if raw_candidates is not None and not isinstance(raw_candidates, (str, bytes)) and not missing(raw_candidates):
        options = [as_text(c, "candidate") for c in list(raw_candidates)]
        if embedded and len(embedded) != len(options):
            raise Skip(f"the question lists {len(embedded)} options but candidates has {len(options)}")
    else:
        options = embedded
    if not question:
        raise Skip("no question before the options")
    if missing(row.get("answer")):
        raise Skip("no answer")
    answer = as_text(row["answer"], "answer")
    letter = _LETTER.match(answer)
    index = LETTERS.index(letter.group(1)) if letter else index_of_text(answer, options)
    video = root / required_text(row, "video_name")
    qid = row.get("question_id")
    sample_id = str(qid) if not missing(qid) else f"{Path(str(row['video_name'])).stem}-{position}"
    category = row.get("task_type")
    meta = {"duration": str(row["duration"])} if not missing(row.get("duration")) else {}
    return build_sample(sample_id, video, question, options, index, None if missing(category) else str(category),
                        None, None, meta)
