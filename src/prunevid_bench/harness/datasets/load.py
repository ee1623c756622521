"""Reading a dataset file: the container (JSON list, JSONL, parquet), the row format, the checks;
then the seeded ``--limit`` sample and the video preflight."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prunevid_bench.confine import outside, refusal
from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.datasets.base import Dataset, QASample, Skip, missing
from prunevid_bench.harness.datasets.registry import detect_format, format_names, get_format


def load_dataset(
    path: str | Path,
    *,
    video_root: str | Path | None = None,
    answers: str | Path | Mapping[str, int] | None = None,
    format: str | None = None,
    allow_outside_root: bool = False,
) -> Dataset:
    """Read a dataset file, recognise its format and return validated samples.

    ``video_root`` is the folder the rows' video names are relative to (default: the dataset
    file's folder). ``answers`` is the EgoSchema answer file (or mapping); by default an
    ``answers.json`` or ``subset_answers.json`` beside the questions is used. ``format`` forces
    a registered format (``format_names()``) instead of auto-detection. A row whose video
    resolves outside the root is skipped, saying why, unless ``allow_outside_root``
    (``prunevid_bench.confine``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PruneVidError(f"dataset file not found: {path}; check the path")
    forced = get_format(format) if format is not None else None
    if video_root is None:
        root = path.parent.resolve()
    else:
        root = Path(video_root).expanduser().resolve()
        if not root.is_dir():
            raise PruneVidError(f"video root not found: {root}; pass the folder that holds the videos")

    rows, label_kind, skipped = _read_rows(path)
    fmt = forced or detect_format(next((row for _, row in rows if isinstance(row, Mapping)), None), path)
    if answers is not None and not fmt.answers_file:
        takers = " or ".join(f.title for f in map(get_format, format_names()) if f.answers_file)
        raise PruneVidError(f"an answers file only applies to {takers}, but {path.name} is {fmt.name}; drop --answers")

    read = fmt.open(path, root, answers)

    samples: list[QASample] = []
    seen: set[str] = set()
    for i, row in rows:
        label = _row_label(row, i, label_kind)
        try:
            if not isinstance(row, Mapping):
                raise Skip("not a JSON object")
            sample = read(row, i)
        except Skip as skip:
            skipped.append((label, str(skip)))
            continue
        real = None if allow_outside_root else outside(sample.video, root)
        if real is not None:
            what = f"video {row['video']}" if isinstance(row.get("video"), str) else "its video"
            skipped.append((label, refusal(what, real, root, "the video root")))
            continue
        if sample.id in seen:
            skipped.append((sample.id, "duplicate id (the first occurrence is kept)"))
            continue
        seen.add(sample.id)
        samples.append(sample)

    if not samples:
        reasons = "; ".join(f"{label}: {reason}" for label, reason in skipped[:3])
        detail = f" (skipped {len(skipped)} rows, e.g. {reasons})" if skipped else ""
        raise PruneVidError(f"no usable questions in {path}{detail}; fix the rows or pick another file")
    return Dataset(name=path.stem, format=fmt.name, path=path.resolve(), samples=samples, skipped=skipped)


SAMPLING = ("random", "first")


def sample_rows(samples: list[QASample], limit: int | float | None, seed: int = 0, how: str = "random",
                offset: int = 0) -> list[QASample]:
    """The questions a run asks, kept in file order: the rows from ``offset`` on, then ``limit``
    of them: a seeded random subset (``how="random"``; files are often sorted by video or task, so
    a prefix is biased) or the first ones (``how="first"``, as lmms-eval's ``--limit`` takes them).
    A ``limit`` below 1 is a fraction of those rows, rounded up (as lmms-eval); None or more than
    there are takes them all."""
    if how not in SAMPLING:
        raise PruneVidError(f"--sample must be random or first, got '{how}'")
    if offset < 0:
        raise PruneVidError(f"--offset must be >= 0, got {offset}")
    rows = list(samples)[offset:]
    if limit is not None:
        if not limit > 0 or (limit > 1 and not float(limit).is_integer()):  # NaN too
            raise PruneVidError(f"--limit must be a number of questions (>= 1) or a fraction in (0, 1), got {limit}")
        limit = math.ceil(len(rows) * limit) if limit < 1 else int(limit)
    if limit is None or limit >= len(rows):
        return rows
    if how == "first":
        return rows[:limit]
    chosen = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in chosen]


def _exists(path: Path) -> None:
    if not path.is_file():
        raise PruneVidError(f"video not found: {path}")


def preflight(
    samples: Iterable[QASample], check: Callable[[Path], Any] = _exists
) -> tuple[list[QASample], list[tuple[str, str]]]:
    """Split samples into those whose video passes ``check`` and (id, reason) for the rest.

    ``check`` raises PruneVidError for a missing or undecodable file (``video.check_video`` does);
    each distinct video is checked once, however many questions share it. Any other exception is
    a bug in the checker and propagates.
    """
    verdicts: dict[Path, str | None] = {}
    ok: list[QASample] = []
    problems: list[tuple[str, str]] = []
    for sample in samples:
        if sample.video not in verdicts:
            try:
                check(sample.video)
                verdicts[sample.video] = None
            except PruneVidError as err:
                verdicts[sample.video] = str(err) or "video check failed"
        reason = verdicts[sample.video]
        if reason is None:
            ok.append(sample)
        else:
            problems.append((sample.id, reason))
    return ok, problems


# ---------------------------------------------------------------------------------------------
# Reading containers


def _read_rows(path: Path) -> tuple[list[tuple[int, Any]], str, list[tuple[str, str]]]:
    """Return ([(1-based position, row)], label kind, skipped lines) for JSON, JSONL or parquet."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path), "row", []
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PruneVidError(f"cannot read {path}: {err}; check the file and its permissions") from None
    if suffix == ".jsonl":
        rows, skipped = _parse_jsonl(raw)
        return rows, "line", skipped
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        if suffix != ".json":  # maybe JSONL under another name
            rows, skipped = _parse_jsonl(raw)
            if rows:
                return rows, "line", skipped
        if isinstance(err, UnicodeDecodeError):
            line = raw[: err.start].count(b"\n") + 1
            raise PruneVidError(f"{path}: line {line} is not UTF-8 text; save the file as UTF-8") from None
        raise PruneVidError(f"{path} is not valid JSON ({err}); fix the file or convert it to JSONL") from None
    if not isinstance(data, list):
        raise PruneVidError(
            f"{path} holds a JSON {type(data).__name__}, not a list of questions; "
            "pass the questions file (an answers file goes to --answers)"
        )
    return list(enumerate(data, start=1)), "row", []


def _parse_jsonl(raw: bytes) -> tuple[list[tuple[int, Any]], list[tuple[str, str]]]:
    """Rows by line number; a line that is not UTF-8 or not JSON is skipped with its number."""
    rows: list[tuple[int, Any]] = []
    skipped: list[tuple[str, str]] = []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            skipped.append((f"line {number}", f"not UTF-8 text (byte {err.start + 1} of the line); save the file as UTF-8"))
            continue
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            skipped.append((f"line {number}", f"not valid JSON ({err.msg})"))
    return rows, skipped


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    try:
        import pandas as pd  # heavy; only parquet needs it

        frame = pd.read_parquet(path)
    except ImportError as err:
        raise PruneVidError(f"reading parquet needs pandas and pyarrow ({err}); pip install pandas pyarrow") from None
    except Exception as err:  # pyarrow raises its own error types for a corrupt file
        raise PruneVidError(f"cannot read {path} as parquet ({err}); check the file") from None
    return list(enumerate(frame.to_dict("records"), start=1))


def _row_label(row: Any, position: int, kind: str) -> str:
    if isinstance(row, Mapping):
        for key in ("id", "q_uid", "question_id"):
            value = row.get(key)
            if not missing(value):
                return str(value)
    return f"{kind} {position}"
