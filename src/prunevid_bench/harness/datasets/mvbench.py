"""MVBench: one JSON file per task, rows ``video``, ``question``, ``candidates``, ``answer`` (the
text of one candidate) and optional ``start``/``end`` seconds; the task is the file's stem."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


@register_format("mvbench", title="MVBench", detect=lambda keys: "candidates" in keys)
def open_mvbench(path: Path, root: Path, answers: Any) -> RowReader:
    def read(row: Mapping[str, Any], position: int) -> QASample:
        return mvbench_row(row, position, root, path.stem)

    return read


def mvbench_row(row: Mapping, position: int, root: Path, task: str) -> QASample:
    candidates = row.get("candidates")
    if not isinstance(candidates, list):
        raise Skip("candidates is not a list")
    options = [as_text(c, "candidate") for c in candidates]
    if missing(row.get("answer")):
        raise Skip("no answer")
    answer = as_text(row["answer"], "answer")
    index = index_of_text(answer, options)
    start, end = bounds(row)
    # The file has no ids; task stem + 0-based position is stable for a given file.
    sample_id = f"{task}-{position - 1}"
    video = root / required_text(row, "video")
    return build_sample(sample_id, video, required_text(row, "question"), options, index, task, start, end)
