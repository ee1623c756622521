"""A dataset run's statistics from its records: accuracy, agreement and the metrics' medians
and spread (``summarise``), why a run fell short (``shortfall``), and the flat summary.csv row.

Pure functions of the records and the config dict; ``harness.runs`` reads and writes the folders.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Mapping
from typing import Any


# Per-sample fields summarised with median and spread (errors excluded).
METRICS = (
    "num_frames",
    "visual_tokens",  # in the prompt
    "tokens_after_visual_methods",  # entering the LLM
    "visual_tokens_kept",  # after the LLM-layer method
    "visual_tokens_kept_ratio",
    "prefill_flops",
    "ideal_speedup",
    "prefill_flops_fraction",  # what the run paid: its prefill FLOPs over the unreduced run's
    "visual_tokens_per_layer",  # visual tokens in each LLM layer's prefill, mean over layers
    "prompt_tokens",
    "llm_prefill_tokens",
    "generated_tokens",
    "ttft_s",
    "vision_encoder_s",
    "visual_methods_s",
    "layer_method_s",
    "prefill_s",
    "decode_tokens_per_s",
    "peak_memory_bytes",
    "kv_cache_bytes",
    "kv_cache_bytes_uncompressed",
    "prepare_s",
)


def enabled_sections(cfg: Mapping[str, Any]) -> list[str]:
    """The config sections of the token-reduction methods a run had on, in config order."""
    return [name for name, values in cfg.items()
            if name not in ("model", "video", "generation") and isinstance(values, Mapping) and values.get("enabled")]


def layer_spec(cfg: Mapping[str, Any]) -> int | str | None:
    """The layer the run's LLM-layer method was configured at (an index or "K/N"), None without one."""
    return next((cfg[s]["pruning_layer"] for s in enabled_sections(cfg) if "pruning_layer" in cfg[s]), None)


def spread(values: Iterable[float | int | None]) -> dict[str, float] | None:
    """Median, quartiles, p90, min, max and mean of the non-missing values (None if none)."""
    xs = sorted(float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not xs:
        return None

    def pct(q: float) -> float:  # nearest-rank on the sorted values, as timing_summary does
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "p25": pct(0.25),
        "p75": pct(0.75),
        "p90": pct(0.9),
        "min": xs[0],
        "max": xs[-1],
        "mean": statistics.fmean(xs),
    }


def summarise(
    records: list[Mapping[str, Any]],
    skipped: list[Mapping[str, str]],
    baseline_records: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Accuracy (95% Wilson CI, per category), agreement with a baseline, metric medians."""
    from prunevid_bench.harness.answers import accuracy_summary, agreement, paired_difference
    from prunevid_bench.report import record_get

    ok = [r for r in records if not r.get("error")]
    summary: dict[str, Any] = {
        "n": len(records),
        "accuracy": accuracy_summary(records),
        "skipped": list(skipped),
        # The absolute layer the LLM-layer method pruned at, as the model resolved it (one config, one value).
        "pruning_layer": next((r["pruning_layer"] for r in ok if r.get("pruning_layer") is not None), None),
        "metrics": {name: spread(record_get(r, name) for r in ok) for name in METRICS},  # old folders: old names
    }
    summary["metrics"] = {k: v for k, v in summary["metrics"].items() if v is not None}
    loads = [r["load_average"][0] for r in ok if r.get("load_average")]
    if loads:  # how busy the machine was: timings under a load above the cores measure the queue
        summary["runtime"] = {"torch_threads": sorted({r["torch_threads"] for r in ok if "torch_threads" in r}),
                              "load_first": loads[0], "load_last": loads[-1], "load_max": max(loads),
                              "cpu_count": os.cpu_count()}
    if baseline_records is not None:
        summary["agreement"] = agreement(records, baseline_records)
        summary["paired"] = paired_difference(records, baseline_records)  # accuracy vs the baseline, paired test
    return summary


def shortfall(summary: Mapping[str, Any]) -> list[str]:
    """Why a finished dataset run did not answer every selected question, e.g.
    ``["2 skipped", "1 errored", "3 unparsed"]``, led by the questions not evaluated (with the
    ranks that were to run them); empty when every one got a parsed answer."""
    acc = summary["accuracy"]
    counts = {"skipped": len(summary.get("skipped", [])), "errored": acc["errors"], "unparsed": acc["unparsed"]}
    problems = [f"{n} {what}" for what, n in counts.items() if n]
    missing = summary.get("missing") or []
    if missing:  # an unfinished run (a rank died, or it was stopped): never a clean exit
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        ranks = summary.get("missing_ranks")
        who = (f"; rank {', '.join(map(str, ranks))} of {summary.get('world_size')} did not finish" if ranks else "")
        problems.insert(0, f"{len(missing)} not evaluated ({shown}{who})")
    return problems


def flat_row(meta: Mapping[str, Any], summary: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: identity, the methods and their settings, accuracy, agreement, metric median/p25/p75/p90."""
    acc = summary["accuracy"]
    row: dict[str, Any] = {
        "run": meta.get("run"),
        "label": meta.get("label"),
        "preset": meta.get("preset"),
        "model": cfg["model"]["name"],
        "dataset": meta.get("dataset", {}).get("name"),
        "answer_mode": meta.get("answer_mode"),
        "num_frames": cfg["video"]["num_frames"],
        "fps": cfg["video"]["fps"],
        "methods": "+".join(enabled_sections(cfg)),  # every method section on
        **{f"{section}.{key}": value for section in enabled_sections(cfg)  # their settings, by dotted key
           for key, value in cfg[section].items() if key != "enabled"},
        "pruning_layer": summary.get("pruning_layer"),  # resolved; None without an LLM-layer method
        "pruning_layer_spec": layer_spec(cfg),  # as configured, e.g. "10/28"
        "n": acc["n"],
        "correct": acc["correct"],
        "accuracy": acc["accuracy"],
        "ci_low": acc["ci_low"],
        "ci_high": acc["ci_high"],
        "unparsed": acc["unparsed"],
        "errors": acc["errors"],
        "skipped": len(summary.get("skipped", [])),
    }
    if "agreement" in summary:
        ag = summary["agreement"]
        row.update(agreement=ag["agreement"], agreement_n=ag["n"], agreement_ci_low=ag["ci_low"], agreement_ci_high=ag["ci_high"])
    if "paired" in summary:
        pd = summary["paired"]
        row.update(paired_difference=pd["difference"], paired_ci_low=pd["ci_low"], paired_ci_high=pd["ci_high"],
                   mcnemar_p=pd["p"])
    for name, stats in summary["metrics"].items():
        for key in ("median", "p25", "p75", "p90"):
            row[f"{name}_{key}"] = stats[key]
    return row
