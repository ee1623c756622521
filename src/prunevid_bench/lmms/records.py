"""Our run folder beside lmms-eval's output: what lmms-eval does not measure.

lmms-eval writes its scores (``<output_path>/<model>/<date>_results.json``) and, with
``--log_samples``, its per-sample log. The ``prunevid`` model adds one folder of ours::

    config.json       the resolved config and how lmms-eval was asked (tasks are in the samples)
    environment.json  versions, device, git commit
    samples.jsonl     one line per request: task, doc_id, the prompt, the reply, and every
                      RunResult field (tokens per stage, TTFT, vision/prefill/decode times, peak
                      memory, KV bytes, frames fed); flushed as it goes
    summary.json      per task and over all: median and spread of each measured field

With several processes (``torchrun`` / ``accelerate launch``), rank N writes
``samples.rankN.jsonl`` and ``summary.rankN.json`` into rank 0's folder. The same figures' means,
over every rank, go to lmms-eval's throughput metrics (so they appear in its ``results.json`` as
``avg_prunevid_<field>``) and each sample's go into its logged ``token_counts`` under ``prunevid``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunevid_bench.config import RunConfig
from prunevid_bench.harness.runs import METRICS, SampleLog, spread
from prunevid_bench.report import RunResult, slug, write_json

# RunResult fields left out of a record: the token ids are in the reply, the logits are a tensor.
RESULT_EXCLUDE = {"generated_token_ids", "first_token_logits"}
# What lmms-eval's results.json gets (as means) and each logged sample (as values).
THROUGHPUT_FIELDS = (
    "ttft_s", "vision_encoder_s", "prefill_s", "decode_tokens_per_s", "prompt_tokens", "llm_prefill_tokens",
    "visual_tokens", "tokens_after_visual_methods", "tokens_after", "total_compression_ratio",
    "peak_memory_bytes", "kv_cache_bytes", "kv_cache_bytes_uncompressed",
)


def output_path_from_argv(argv: list[str] | None = None) -> Path | None:
    """lmms-eval's ``--output_path`` when it runs from its command line (the model is not told)."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--output_path" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--output_path="):
            return Path(arg.split("=", 1)[1])
    return None


def default_records_dir(label: str | None, preset: str | None, output_path: Path | None) -> Path:
    """``<output_path>/prunevid/<label or preset>-<time>``; ``results/lmms-...`` without an output path."""
    name = f"{slug(label or preset or 'custom')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return output_path / "prunevid" / name if output_path else Path("results") / f"lmms-{name}"


class RunRecords:
    """One lmms-eval run's folder of our records (one process's share of it)."""

    def __init__(self, folder: Path, cfg: RunConfig, pipe, meta: Mapping[str, Any], rank: int = 0, world_size: int = 1):
        from prunevid_bench.single import write_run_header

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{rank}" if world_size > 1 else ""
        self.samples_path = self.folder / f"samples{suffix}.jsonl"
        self.summary_path = self.folder / f"summary{suffix}.json"
        if rank == 0:
            write_run_header(self.folder, cfg, pipe, {"scenario": "lmms-eval", "world_size": world_size, **meta})
        self.records: list[dict[str, Any]] = []

    def add(self, task: str, doc_id: int, split: str, prompt: str, reply: str, result: RunResult) -> dict[str, Any]:
        record = {"task": task, "doc_id": doc_id, "split": split, "prompt": prompt, "reply": reply}
        record.update({k: v for k, v in result.to_dict().items() if k not in RESULT_EXCLUDE})
        with SampleLog(self.samples_path) as log:
            log.write(record)
        self.records.append(record)
        return record

    def write_summary(self) -> dict[str, Any]:
        """Median and spread per task and over all, recomputed from every record so far."""
        def metrics(rows):
            found = {name: spread(r.get(name) for r in rows) for name in METRICS}
            return {k: v for k, v in found.items() if v is not None}

        tasks = sorted({r["task"] for r in self.records})
        summary = {
            "n": len(self.records),
            "metrics": metrics(self.records),
            "by_task": {t: {"n": sum(r["task"] == t for r in self.records),
                            "metrics": metrics([r for r in self.records if r["task"] == t])} for t in tasks},
        }
        write_json(self.summary_path, summary)
        return summary


def sample_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """The measured fields of one record, for lmms-eval's per-sample log."""
    return {k: record.get(k) for k in THROUGHPUT_FIELDS}


def throughput(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """lmms-eval's ``log_metrics`` arguments for a batch of records: generated tokens, the time
    spent in the model (TTFT + decode, summed), and each measured field's mean."""
    tokens = sum(int(r["generated_tokens"]) for r in records)
    elapsed = sum(float(r["ttft_s"]) + float(r["decode_s"]) for r in records)
    means = {}
    for name in THROUGHPUT_FIELDS:
        values = [float(r[name]) for r in records if r.get(name) is not None]
        if values:
            means[f"prunevid_{name}"] = sum(values) / len(values)
    # total_requests: lmms-eval 0.7.3's summary divides the elapsed time by it into its avg_latency
    return {"total_gen_tokens": tokens, "total_elapsed_time": elapsed,
            "avg_speed": tokens / elapsed if elapsed > 0 else 0.0,
            "additional_metrics": {"total_requests": len(records), **means}}
