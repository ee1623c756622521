"""Dataset run folders: the per-sample log, the summary statistics (computed by
``harness.run_stats``), and reading a folder back.

A dataset run folder holds::

    config.json        the resolved config, dataset identity, sample ids, fingerprint hash
    environment.json   versions, device, git commit (written when the run starts)
    samples.jsonl      one JSON line per finished sample, appended and flushed as it goes
    samples.rank-<r>.jsonl  the same, written by rank r of a run split over processes (harness.shard)
    plan.json          which questions are run, which were skipped and why (what a summary needs)
    summary.json       accuracy with CI, per category, skipped rows, counts, medians and spread
    summary.csv        the same as one flat row
    backup-<N>/        what a ``--force`` rerun moved aside (N = 1, 2, ...; never reused)

The logs are the source of truth: the summary is recomputed from all of them, so a resumed run
summarises every sample whichever process ran it. When an id appears twice (a sample retried
after an error, or redone), a row that needs no retry wins over one that does; otherwise the
last line wins, reading ``samples.jsonl`` and then the rank logs in rank order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.record_check import record_problem
from prunevid_bench.harness.run_stats import (  # noqa: F401 - importable from here too
    METRICS,
    enabled_sections,
    flat_row,
    layer_spec,
    shortfall,
    spread,
    summarise,
)

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
# What a forced rerun moves into a fresh backup folder: the logs and every file derived from
# them, the config last (a folder without one is new: an interrupted move leaves no log behind).
RUN_FILES = (SAMPLES_FILE, SUMMARY_FILE, "summary.csv", PLAN_FILE, CONFIG_FILE, "environment.json")


NOT_IDENTITY = ("runtime",)  # config sections that change how fast a run goes, never what it computes


def identity_config(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a run folder's fingerprint covers: the config without NOT_IDENTITY sections, nor
    ``video.decoder: auto`` (older folders keep their names; each record names its decoder), nor
    ``budget`` when it matches tokens, nor ``prefill`` when off (the defaults: folders from before
    they existed keep their names)."""
    out = None if cfg is None else {k: v for k, v in cfg.items() if k not in NOT_IDENTITY}
    if out and isinstance(out.get("budget"), Mapping) and out["budget"].get("match", "tokens") == "tokens":
        out.pop("budget")
    if out and isinstance(out.get("prefill"), Mapping) and not out["prefill"].get("chunk_tokens"):
        out.pop("prefill")
    if out and isinstance(out.get("video"), Mapping) and out["video"].get("decoder") == "auto":
        out["video"] = {k: v for k, v in out["video"].items() if k != "decoder"}
    return out


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """A short stable hash of what decides a run's results (config, dataset, sampling)."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ, e.g. ``config.tome.budget``."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------
# The per-sample log


def sample_logs(run_dir: Path) -> list[Path]:
    """``samples.jsonl`` (when present) and every rank log, in rank order."""
    from prunevid_bench.harness.shard import RANK_LOG_PATTERN

    ranks = sorted((int(m.group(1)), p) for p in Path(run_dir).glob("samples.rank-*.jsonl")
                   if (m := RANK_LOG_PATTERN.fullmatch(p.name)))
    plain = Path(run_dir) / SAMPLES_FILE
    return ([plain] if plain.is_file() else []) + [p for _, p in ranks]


def run_files(run_dir: Path) -> list[str]:
    """RUN_FILES with the folder's rank logs among the logs (before the config: see RUN_FILES)."""
    return [SAMPLES_FILE, *(p.name for p in sample_logs(run_dir) if p.name != SAMPLES_FILE), *RUN_FILES[1:]]


def needs_retry(record: Mapping[str, Any]) -> bool:
    """A logged error is run again on resume only when it may not recur (memory, I/O); a final
    one (a video the processor refuses, a prompt too long) is kept. Rows logged before errors
    were classified are retried, as they were then."""
    return bool(record.get("error")) and record.get("error_transient", True)


def read_run_samples(run_dir: Path, own: Path | None = None) -> dict[str, dict[str, Any]]:
    """Records by id from every log of the folder (see the module docstring for which row wins).
    Only ``own``, the log this process appends to, is repaired: another rank may be writing its."""
    records: dict[str, dict[str, Any]] = {}
    for path in sample_logs(run_dir):
        for sample_id, record in read_samples(path, repair=own is not None and path == own, check=True).items():
            if sample_id not in records or needs_retry(records[sample_id]) or not needs_retry(record):
                records[sample_id] = record
    return records


def read_samples(path: Path, repair: bool = False, check: bool = False) -> dict[str, dict[str, Any]]:
    """Records by id (last line wins). A torn last line — the process was killed mid-write —
    is ignored, and with ``repair`` cut off so the next append starts on a clean line. With
    ``check`` (a dataset run's logs), a record with a wrongly typed field is refused."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last item is what follows the final newline ("" when clean)
    good_end = pos = 0
    for number, line in enumerate(lines, start=1):
        pos += len(line) + 1
        last = number == len(lines)
        if not line.strip():
            good_end = min(pos, len(data))
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError("not a sample record")
        except ValueError:
            if last:
                break  # torn final line: that sample is simply redone
            raise PruneVidError(f"{path}: line {number} is not a sample record; fix or delete that line") from None
        problem = record_problem(record) if check else None  # harness.record_check
        if problem:
            raise PruneVidError(f"{path}: line {number}: {problem}; fix or delete that line")
        records[str(record["id"])] = record
        good_end = min(pos, len(data))
    if repair and good_end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    elif repair and data and not data.endswith(b"\n"):
        with open(path, "ab") as fh:
            fh.write(b"\n")  # a complete last record without its newline: keep it, end the line
    return records


class SampleLog:
    """Append-only JSONL: each record is flushed and synced before the next sample starts."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=_plain) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SampleLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def back_up(folder: Path, names: Iterable[str]) -> Path | None:
    """Move the files ``names`` of ``folder`` into a new ``backup-<N>`` beside them (the first N
    not taken, so an earlier backup is never overwritten). None when there was nothing to move."""
    present = [name for name in names if (folder / name).exists()]
    if not present:
        return None
    n = 1
    while True:
        target = folder / f"backup-{n}"
        try:
            target.mkdir()
            break
        except FileExistsError:
            n += 1
    for name in present:
        (folder / name).replace(target / name)
    return target


# ---------------------------------------------------------------------------------------------
# Reading a finished run back (compare, sweep tables)


@dataclass
class SavedRun:
    """A run folder read back: a dataset run (summary.json) or a single-video run (result.json)."""

    path: Path
    meta: dict[str, Any]  # config.json without "config"
    config: dict[str, Any]  # the resolved RunConfig as a dict
    summary: dict[str, Any] | None  # dataset runs
    result: dict[str, Any] | None  # single-video runs
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)  # environment.json ({} when absent)

    @property
    def name(self) -> str:
        return self.meta.get("run") or self.path.name

    @property
    def question_ids(self) -> frozenset[str]:
        if self.result is not None:
            return frozenset({f"{self.meta.get('video')}::{self.meta.get('question')}"})
        return frozenset(self.records)

    @property
    def stages_off(self) -> bool:
        """No token-reduction method on (no method's section enabled)."""
        return not enabled_sections(self.config)

    @property
    def pruning_layer(self) -> int | str | None:
        """The absolute layer the LLM-layer method pruned at, as recorded by the run; folders written
        before it was recorded fall back to the config's value (then always an index)."""
        recorded = self.result if self.result is not None else self.summary or {}
        return recorded["pruning_layer"] if "pruning_layer" in recorded else layer_spec(self.config)

    def metric(self, name: str) -> float | None:
        """Median over samples for a dataset run; the value (or repeat median) for a single run."""
        if self.result is not None:
            return self.result.get(f"{name}_median", self.result.get(name))
        stats = (self.summary or {}).get("metrics", {}).get(name)
        return stats["median"] if stats else None


def load_run(path: Path) -> SavedRun:
    from prunevid_bench.report import read_json, with_place_names

    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise PruneVidError(f"{path} is not a run folder (no {CONFIG_FILE})")
    rerun = "rerun the run's command to rebuild it, or leave this folder out"
    meta = read_json(config_path, "restore it, or leave this folder out (rerunning with --force starts it over)", ("config",))
    config = meta.pop("config")
    summary = result = None
    records: dict[str, dict[str, Any]] = {}
    if meta.get("scenario") in ("stream", "lmms-eval"):  # folders other scenarios write
        from prunevid_bench.harness.other_runs import lmms_as_run, stream_as_run

        summary, records = (stream_as_run if meta["scenario"] == "stream" else lmms_as_run)(path)
    elif (path / SUMMARY_FILE).is_file():
        summary = read_json(path / SUMMARY_FILE, rerun, ("accuracy", "metrics"))
        summary["metrics"] = with_place_names(summary["metrics"])  # an old folder's metrics under the new names too
        records = read_run_samples(path)
    elif (path / "result.json").is_file():
        result = read_json(path / "result.json", "rerun the command, or leave this folder out")
    else:
        raise PruneVidError(f"{path} has no summary.json or result.json: the run has not finished; rerun its command")
    env_path = path / "environment.json"
    env = read_json(env_path, "restore it, or leave this folder out") if env_path.is_file() else {}
    return SavedRun(path, meta, config, summary, result, records, env)

