"""EgoSchema: rows ``q_uid``, ``question``, ``option 0`` .. ``option 4``; the answers live in a
separate JSON file ``{q_uid: int}`` (``subset_answers.json`` in the official release); the video
is ``<video_root>/<q_uid>.mp4``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.datasets.base import QASample, Skip, as_text, build_sample, required_text
from prunevid_bench.harness.datasets.registry import RowReader, register_format

ANSWER_FILES = ("answers.json", "subset_answers.json")  # looked for beside the questions


@register_format("egoschema", title="EgoSchema", detect=lambda keys: "q_uid" in keys, answers_file=True)
def open_egoschema(path: Path, root: Path, answers: str | Path | Mapping[str, int] | None) -> RowReader:
    answer_map, answer_source = read_answers(path, answers)

    def read(row: Mapping[str, Any], position: int) -> QASample:
        return egoschema_row(row, root, answer_map, answer_source)

    return read


def read_answers(path: Path, answers: str | Path | Mapping[str, int] | None) -> tuple[Mapping[str, Any], str]:
    if isinstance(answers, Mapping):
        return answers, "the answers given"
    if answers is None:
        found = [path.parent / name for name in ANSWER_FILES if (path.parent / name).is_file()]
        if not found:
            raise PruneVidError(
                f"EgoSchema answers not found beside {path}; pass the answers file "
                "(e.g. subset_answers.json) with --answers"
            )
        answer_path = found[0]
    else:
        answer_path = Path(answers).expanduser()
    try:
        data = json.loads(answer_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PruneVidError(f"cannot read EgoSchema answers {answer_path} ({err}); check the path") from None
    if not isinstance(data, dict):
        raise PruneVidError(f"{answer_path} must map q_uid to an answer index; got a JSON {type(data).__name__}")
    return data, answer_path.name


def egoschema_row(row: Mapping, root: Path, answer_map: Mapping[str, Any], answer_source: str) -> QASample:
    uid = required_text(row, "q_uid")
    options = []
    while f"option {len(options)}" in row:
        options.append(as_text(row[f"option {len(options)}"], f"option {len(options)}"))
    if uid not in answer_map:
        raise Skip(f"no answer in {answer_source}")
    raw = answer_map[uid]
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise Skip(f"answer {raw!r} in {answer_source} is not an option index")
    return build_sample(uid, root / f"{uid}.mp4", required_text(row, "question"), options, raw, None, None, None)
