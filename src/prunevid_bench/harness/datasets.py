"""Multiple-choice video QA datasets: read, validate, sample, preflight.

Four row formats are understood (field names as in the official releases, see
shared/research/harness.md §5):

- ``egoschema``: ``q_uid``, ``question``, ``option 0`` .. ``option 4``; answers live in a separate
  JSON file ``{q_uid: int}`` (``subset_answers.json`` in the official repo); video
  ``<video_root>/<q_uid>.mp4``.
- ``mvbench``: one JSON file per task with ``video``, ``question``, ``candidates``, ``answer`` (the
  text of one candidate) and optional ``start``/``end`` seconds; the task is the file's stem.
- ``videomme``: the Video-MME parquet with ``videoID``, ``question``, ``options`` ("A. ..."),
  ``answer`` (a letter), ``question_id``, ``task_type``, ``duration``, ``domain``.
- ``jsonl``: our own rows ``id``, ``video``, ``question``, ``options``, ``answer`` (letter, 0-based
  int or option text), optional ``category``, ``start``, ``end``.

Rows are read from a JSON list, a JSONL file or a parquet file; the row format is recognised from
the keys of the first row. A row that cannot be used is never dropped silently: it lands in
``Dataset.skipped`` with the reason. Nothing here decodes video or imports torch.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunevid_bench.errors import PruneVidError

LETTERS = "ABCDEFGHIJ"  # same set as answers.LETTERS; options beyond ten cannot be lettered
FORMATS = ("egoschema", "mvbench", "videomme", "jsonl")
EGOSCHEMA_ANSWER_FILES = ("answers.json", "subset_answers.json")
# "A. red", "(B) blue", "C) green" — the letter prefix Video-MME puts on its options.
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])[.):]\s*")


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
    format: str  # one of FORMATS
    path: Path
    samples: list[QASample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row id or "line N", reason)

    def __len__(self) -> int:
        return len(self.samples)


class _Skip(Exception):
    """A row is unusable; the message is the reason reported in Dataset.skipped."""


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_dataset(
    path: str | Path,
    *,
    video_root: str | Path | None = None,
    answers: str | Path | Mapping[str, int] | None = None,
    format: str | None = None,
) -> Dataset:
    """Read a dataset file, recognise its format and return validated samples.

    ``video_root`` is the folder the rows' video names are relative to (default: the dataset
    file's folder). ``answers`` is the EgoSchema answer file (or mapping); by default an
    ``answers.json`` or ``subset_answers.json`` beside the questions is used. ``format`` forces
    one of ``egoschema|mvbench|videomme|jsonl`` instead of auto-detection.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PruneVidError(f"dataset file not found: {path}; check the path")
    if format is not None and format not in FORMATS:
        raise PruneVidError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    if video_root is None:
        root = path.parent.resolve()
    else:
        root = Path(video_root).expanduser().resolve()
        if not root.is_dir():
            raise PruneVidError(f"video root not found: {root}; pass the folder that holds the videos")

    rows, label_kind, skipped = _read_rows(path)
    fmt = format or _detect_format(rows, path)
    if answers is not None and fmt != "egoschema":
        raise PruneVidError(f"an answers file only applies to EgoSchema, but {path.name} is {fmt}; drop --answers")

    if fmt == "egoschema":
        answer_map, answer_source = _egoschema_answers(path, answers)

        def convert(row, i):
            return _egoschema_row(row, root, answer_map, answer_source)
    elif fmt == "mvbench":

        def convert(row, i):
            return _mvbench_row(row, i, root, path.stem)
    elif fmt == "videomme":

        def convert(row, i):
            return _videomme_row(row, i, root)
    else:

        def convert(row, i):
            return _jsonl_row(row, root)

    samples: list[QASample] = []
    seen: set[str] = set()
    for i, row in rows:
        label = _row_label(row, i, label_kind)
        try:
            if not isinstance(row, Mapping):
                raise _Skip("not a JSON object")
            sample = convert(row, i)
        except _Skip as skip:
            skipped.append((label, str(skip)))
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
    return Dataset(name=path.stem, format=fmt, path=path.resolve(), samples=samples, skipped=skipped)


def sample_rows(samples: list[QASample], limit: int | None, seed: int = 0) -> list[QASample]:
    """A seeded random subset of ``limit`` samples, kept in file order.

    Not the first N rows: files are often sorted by video or task, so a prefix is biased.
    ``limit`` None or >= len(samples) returns them all.
    """
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit < 1:
        raise PruneVidError(f"limit must be a positive number of questions, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in chosen]


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


def _detect_format(rows: list[tuple[int, Any]], path: Path) -> str:
    first = next((row for _, row in rows if isinstance(row, Mapping)), None)
    if first is None:
        raise PruneVidError(f"{path} holds no question rows; check the file")
    keys = set(first)
    if "q_uid" in keys:
        return "egoschema"
    if "candidates" in keys:
        return "mvbench"
    if "videoID" in keys:
        return "videomme"
    if "options" in keys and "video" in keys:
        return "jsonl"
    raise PruneVidError(
        f"cannot tell the dataset format of {path} from its keys {sorted(keys)}; "
        f"pass --format with one of {', '.join(FORMATS)}"
    )


def _row_label(row: Any, position: int, kind: str) -> str:
    if isinstance(row, Mapping):
        for key in ("id", "q_uid", "question_id"):
            value = row.get(key)
            if not _missing(value):
                return str(value)
    return f"{kind} {position}"


# ---------------------------------------------------------------------------------------------
# Row formats


def _egoschema_answers(path: Path, answers: str | Path | Mapping[str, int] | None) -> tuple[Mapping[str, Any], str]:
    if isinstance(answers, Mapping):
        return answers, "the answers given"
    if answers is None:
        found = [path.parent / name for name in EGOSCHEMA_ANSWER_FILES if (path.parent / name).is_file()]
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


def _egoschema_row(row: Mapping, root: Path, answer_map: Mapping[str, Any], answer_source: str) -> QASample:
    uid = _required_text(row, "q_uid")
    options = []
    while f"option {len(options)}" in row:
        options.append(_text(row[f"option {len(options)}"], f"option {len(options)}"))
    if uid not in answer_map:
        raise _Skip(f"no answer in {answer_source}")
    raw = answer_map[uid]
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _Skip(f"answer {raw!r} in {answer_source} is not an option index")
    return _build(uid, root / f"{uid}.mp4", _required_text(row, "question"), options, raw, None, None, None)


def _mvbench_row(row: Mapping, position: int, root: Path, task: str) -> QASample:
    candidates = row.get("candidates")
    if not isinstance(candidates, list):
        raise _Skip("candidates is not a list")
    options = [_text(c, "candidate") for c in candidates]
    if _missing(row.get("answer")):
        raise _Skip("no answer")
    answer = _text(row["answer"], "answer")
    index = _index_of_text(answer, options)
    start, end = _bounds(row)
    # The file has no ids; task stem + 0-based position is stable for a given file.
    sample_id = f"{task}-{position - 1}"
    video = root / _required_text(row, "video")
    return _build(sample_id, video, _required_text(row, "question"), options, index, task, start, end)


def _videomme_row(row: Mapping, position: int, root: Path) -> QASample:
    video_id = _required_text(row, "videoID")
    raw_options = row.get("options")
    if _missing(raw_options) or isinstance(raw_options, (str, bytes)):
        raise _Skip("options is not a list")
    options = []
    for i, raw in enumerate(list(raw_options)):
        text = _text(raw, "option")
        prefix = _OPTION_PREFIX.match(text)
        if prefix and prefix.group(1) == LETTERS[min(i, len(LETTERS) - 1)]:
            text = text[prefix.end() :]
        options.append(text)
    if _missing(row.get("answer")):
        raise _Skip("no answer")
    letter = str(row["answer"]).strip().upper()
    if len(letter) != 1 or letter not in LETTERS:
        raise _Skip(f"answer {row['answer']!r} is not an option letter")
    qid = row.get("question_id")
    sample_id = str(qid) if not _missing(qid) else f"{video_id}-{position}"
    category = row.get("task_type")
    meta = {k: str(row[k]) for k in ("duration", "domain", "sub_category", "video_id") if not _missing(row.get(k))}
    return _build(
        sample_id,
        root / f"{video_id}.mp4",
        _required_text(row, "question"),
        options,
        LETTERS.index(letter),
        None if _missing(category) else str(category),
        None,
        None,
        meta,
    )


def _jsonl_row(row: Mapping, root: Path) -> QASample:
    sample_id = _required_text(row, "id")
    options = row.get("options")
    if not isinstance(options, list):
        raise _Skip("options is not a list")
    options = [_text(o, "option") for o in options]
    answer = row.get("answer")
    if _missing(answer):
        raise _Skip("no answer")
    if isinstance(answer, bool):
        raise _Skip(f"answer {answer!r} is neither a letter, an index nor an option's text")
    if isinstance(answer, int):
        index = answer  # range is checked in _build
    elif isinstance(answer, str):
        index = _index_of_letter_or_text(answer, options)
    else:
        raise _Skip(f"answer {answer!r} is neither a letter, an index nor an option's text")
    category = row.get("category")
    start, end = _bounds(row)
    video = root / _required_text(row, "video")  # an absolute video path survives the join
    return _build(
        sample_id,
        video,
        _required_text(row, "question"),
        options,
        index,
        None if _missing(category) else str(category),
        start,
        end,
    )


def _build(sample_id, video, question, options, index, category, start, end, meta=None) -> QASample:
    """Checks shared by every format, then the frozen sample."""
    if len(options) < 2:
        raise _Skip(f"{len(options)} option(s); a multiple-choice question needs at least 2")
    if len(options) > len(LETTERS):
        raise _Skip(f"{len(options)} options; at most {len(LETTERS)} can be lettered A-J")
    empty = [LETTERS[i] for i, option in enumerate(options) if not option]
    if empty:
        raise _Skip(f"option {empty[0]} is empty")
    if not 0 <= index < len(options):
        raise _Skip(f"answer index {index} is outside the {len(options)} options")
    try:
        video = Path(video).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop (RuntimeError before Python 3.13)
        raise _Skip(f"video {video} cannot be resolved ({err}); fix the link") from None
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


def _index_of_text(answer: str, options: list[str]) -> int:
    matches = [i for i, option in enumerate(options) if option.strip() == answer.strip()]
    if not matches:
        raise _Skip(f"answer {answer!r} is not among the options")
    if len(matches) > 1:
        raise _Skip(f"answer {answer!r} matches {len(matches)} identical options")
    return matches[0]


def _index_of_letter_or_text(answer: str, options: list[str]) -> int:
    """A letter ("B") names an option; otherwise the answer must be one option's exact text.

    A digit string is text, not an index ("2" is an option of a counting question); only a JSON
    int is an index. A letter that is also another option's text is ambiguous and skipped.
    """
    stripped = answer.strip()
    text_matches = [i for i, option in enumerate(options) if option.strip() == stripped]
    if len(stripped) == 1 and stripped.upper() in LETTERS:
        index = LETTERS.index(stripped.upper())
        if any(i != index for i in text_matches):
            raise _Skip(f"answer {answer!r} is both a letter and the text of another option")
        return index
    return _index_of_text(answer, options)


def _bounds(row: Mapping) -> tuple[float | None, float | None]:
    values = []
    for key in ("start", "end"):
        raw = row.get(key)
        if _missing(raw):
            values.append(None)
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise _Skip(f"{key} {raw!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0:
            raise _Skip(f"{key} {raw!r} is not a time in seconds")
        values.append(value)
    start, end = values
    if start is not None and end is not None and end <= start:
        raise _Skip(f"end {end} is not after start {start}")
    return start, end


def _missing(value: Any) -> bool:
    """None, NaN (pandas' empty cell) or an empty string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _text(value: Any, what: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _missing(value):
        return str(value)  # numeric options ("3") are legitimate
    if not isinstance(value, str):
        raise _Skip(f"{what} is not text")
    return value.strip()


def _required_text(row: Mapping, key: str) -> str:
    value = row.get(key)
    if _missing(value):
        raise _Skip(f"no {key}")
    return _text(value, key)
