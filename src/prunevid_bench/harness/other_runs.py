"""Run folders of the other scenarios read as dataset runs, for ``compare``: a stream folder
(``prunevid stream``) and our records beside an lmms-eval run (``prunevid_bench.lmms.records``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.runs import SUMMARY_FILE, read_samples, spread
STREAM_METRICS = ("ttft_s", "kv_cache_bytes", "visual_tokens", "visual_tokens_kept")


def _as_dataset_record(r: dict[str, Any]) -> dict[str, Any]:
    """A stream record with a dataset record's names: the visual tokens cached (in), those the
    answer kept after question-time eviction (out; all of them without eviction), the KV bytes."""
    kept = r.get("visual_tokens_kept")
    return {**r, "kv_cache_bytes": r.get("kv_bytes"), "visual_tokens_kept": r.get("visual_tokens") if kept is None else kept}


def stream_as_run(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A stream folder (``prunevid stream``) read as a dataset run: its answered questions as
    the records, accuracy over the scored ones, medians of TTFT, KV bytes and visual tokens."""
    from prunevid_bench.harness.answers import accuracy_summary

    log = path / "questions.jsonl"
    if not log.is_file():
        raise PruneVidError(f"{path} is a stream folder without questions.jsonl: the run has not finished; rerun its command")
    rows = read_samples(log)
    records = {i: _as_dataset_record(r) for i, r in rows.items() if not r.get("skipped")}
    scored = [r for r in records.values() if "correct" in r]
    summary = {
        "accuracy": accuracy_summary(scored) if scored else None,
        "skipped": [{"id": i, "reason": r["skipped"]} for i, r in rows.items() if r.get("skipped")],
        "metrics": {k: v for k in STREAM_METRICS if (v := spread(r.get(k) for r in records.values())) is not None},
    }
    return summary, records


def lmms_as_run(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Our records beside an lmms-eval run (``prunevid_bench.lmms.records``) read as a run: the
    requests of every rank by ``task:doc_id``, the measured medians; lmms-eval scores the answers."""
    from prunevid_bench.report import read_json

    summary = read_json(path / SUMMARY_FILE, "rerun lmms-eval, or leave this folder out", ("metrics",))
    records: dict[str, dict[str, Any]] = {}
    for log in sorted(path.glob("samples*.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                records[f"{row['task']}:{row['doc_id']}"] = {**row, "id": f"{row['task']}:{row['doc_id']}"}
    return {"accuracy": None, "metrics": summary["metrics"]}, records
