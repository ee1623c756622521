"""Video-MME: the parquet release, rows ``videoID``, ``question``, ``options`` ("A. ..."),
``answer`` (a letter), ``question_id``, ``task_type``, ``duration``, ``domain``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunevid_bench.choices import LETTERS
from prunevid_bench.harness.datasets.base import QASample, Skip, as_text, build_sample, missing, required_text
from prunevid_bench.harness.datasets.registry import RowReader, register_format

# "A. red", "(B) blue", "C) green" — the letter prefix Video-MME puts on its options.
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])[.):]\s*")


@register_format("videomme", title="Video-MME", detect=lambda keys: "videoID" in keys)
def open_videomme(path: Path, root: Path, answers: Any) -> RowReader:
    def read(row: Mapping[str, Any], position: int) -> QASample:
        return videomme_row(row, position, root)

    return read


def videomme_row(row: Mapping, position: int, root: Path) -> QASample:
    video_id = required_text(row, "videoID")
    raw_options = row.get("options")
    if missing(raw_options) or isinstance(raw_options, (str, bytes)):
        raise Skip("options is not a list")
    options = []
    for i, raw in enumerate(list(raw_options)):
        text = as_text(raw, "option")
        prefix = _OPTION_PREFIX.match(text)
        if prefix and prefix.group(1) == LETTERS[min(i, len(LETTERS) - 1)]:
            text = text[prefix.end() :]
        options.append(text)
    if missing(row.get("answer")):
        raise Skip("no answer")
    letter = str(row["answer"]).strip().upper()
    if len(letter) != 1 or letter not in LETTERS:
        raise Skip(f"answer {row['answer']!r} is not an option letter")
    qid = row.get("question_id")
    sample_id = str(qid) if not missing(qid) else f"{video_id}-{position}"
    category = row.get("task_type")
    meta = {k: str(row[k]) for k in ("duration", "domain", "sub_category", "video_id") if not missing(row.get(k))}
    return build_sample(
        sample_id,
        root / f"{video_id}.mp4",
        required_text(row, "question"),
        options,
        LETTERS.index(letter),
        None if missing(category) else str(category),
        None,
        None,
        meta,
    )
