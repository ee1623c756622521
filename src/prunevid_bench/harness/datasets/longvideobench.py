"""LongVideoBench: the validation release as it ships, ``lvb_val.json`` (rows with ``candidates``)
or the parquet lmms-eval reads (``validation-00000-of-00001.parquet``: ``option0`` .. ``option4``,
"N/A" past the last option). Both have ``correct_choice`` (a 0-based index), ``video_path``
(relative to the ``videos/`` folder), ``id``, ``question_category``, ``duration_group``.

As lmms-eval's ``longvideobench_val_v``: the options end at the first "N/A"; subtitles are not
used (the ``_i`` variant interleaves them; we do not)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunevid_bench.harness.datasets.base import QASample, Skip, as_text, build_sample, missing, required_text
from prunevid_bench.harness.datasets.registry import RowReader, register_format

NOT_AN_OPTION = "N/A"  # lmms-eval's marker for an unused option slot


@register_format("longvideobench", title="LongVideoBench", detect=lambda keys: "correct_choice" in keys)
def open_longvideobench(path: Path, root: Path, answers: Any) -> RowReader:
    def read(row: Mapping[str, Any], position: int) -> QASample:
        return longvideobench_row(row, position, root)

    return read


def longvideobench_row(row: Mapping, position: int, root: Path) -> QASample:
    if isinstance(row.get("candidates"), list):
        options = [as_text(c, "candidate") for c in row["candidates"]]
    else:
        options = []
        while f"option{len(options)}" in row:
            raw = row[f"option{len(options)}"]
            if missing(raw) or str(raw).strip() == NOT_AN_OPTION:
                break
            options.append(as_text(raw, f"option{len(options)}"))
    raw = row.get("correct_choice")
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, float) and raw.is_integer():  # pandas reads an int column with gaps as float
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise Skip(f"correct_choice {raw!r} is not an option index")
    video = root / required_text(row, "video_path")
    qid = row.get("id")
    sample_id = str(qid) if not missing(qid) else f"{required_text(row, 'video_id')}-{position}"
    category = row.get("question_category")
    meta = {k: str(row[k]) for k in ("duration_group", "topic_category", "video_id") if not missing(row.get(k))}
    return build_sample(sample_id, video, required_text(row, "question"), options, raw,
                        None if missing(category) else str(category), None, None, meta)
