"""A sweep's table and Pareto front: one row per cell (accuracy, agreement, kept tokens, TTFT,
against the baseline cell), ``summary.csv``, the front of accuracy against kept tokens / TTFT,
and the rich table. ``harness.sweep`` calls these once the cells have run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunevid_bench.config import RunConfig
from prunevid_bench.harness.answers import agreement, paired_difference, paired_short
from prunevid_bench.harness.evaluate import DatasetPlan, EvalResult, fmt_pct
from prunevid_bench.harness.interleave import paired_speedup
from prunevid_bench.harness.sweep_grid import Cell, short_name, value_text
from prunevid_bench.harness.tables import Column, FittedTable


def sweep_rows(cells: list[Cell], results: dict[str, EvalResult], spec: dict[str, list[Any]]) -> list[dict[str, Any]]:
    base_records = results["baseline"].records
    base_ttft = results["baseline"].summary["metrics"].get("ttft_s", {}).get("median")
    rows = []
    for cell in cells:
        res = results[cell.name]
        acc, m = res.summary["accuracy"], res.summary["metrics"]
        ag = agreement(res.records, base_records)

        def med(name):
            return m[name]["median"] if name in m else None

        row = {"cell": cell.name, "kind": cell.kind}
        if cell.kind in ("method", "baseline") and "method" in spec:  # matched budgets: no config keys swept
            row.update(method=cell.method, budget=cell.budget)
        for key in (k for k in spec if "." in k):
            section, name = key.split(".")
            stage_off = section not in ("model", "video", "generation") and not cell.config.section(section).enabled
            # A stage's parameters mean nothing in a cell where it is off: left blank, not the base's value.
            row[short_name(key)] = None if stage_off and name != "enabled" else getattr(cell.config.section(section), name)
        for key in (k for k in spec if k.endswith(".pruning_layer")):  # the layer the model resolved, beside the value as swept
            section = cell.config.section(key.split(".")[0])
            row[short_name(key)] = res.summary.get("pruning_layer") if section.enabled else None
            row["pruning_layer_spec"] = section.pruning_layer if section.enabled else None
        paired = paired_difference(res.records, base_records)
        speed = paired_speedup(res.records, base_records) or {}
        row.update(
            speedup_paired_median=speed.get("median"), speedup_paired_p25=speed.get("p25"),
            speedup_paired_p75=speed.get("p75"), speedup_of_medians=speed.get("ratio_of_medians"),
            model=res.summary.get("model") or cell.config.model.name, paired_difference=paired["difference"], paired_ci_low=paired["ci_low"],
            paired_ci_high=paired["ci_high"], mcnemar_p=paired["p"],
            n=acc["n"], accuracy=acc["accuracy"], ci_low=acc["ci_low"], ci_high=acc["ci_high"],
            unparsed=acc["unparsed"], errors=acc["errors"], agreement=ag["agreement"],
            agreement_ci_low=ag["ci_low"], agreement_ci_high=ag["ci_high"],
            num_frames=med("num_frames"), tokens_in=med("visual_tokens"),
            tokens_after_visual_methods=med("tokens_after_visual_methods"), kept_tokens=med("visual_tokens_kept"),
            retention=med("visual_tokens_kept_ratio"), flops_fraction=med("prefill_flops_fraction"),
            tokens_per_layer=med("visual_tokens_per_layer"), ttft_s=med("ttft_s"), ideal_speedup=med("ideal_speedup"),
            ttft_ideal_s=base_ttft / med("ideal_speedup") if base_ttft and med("ideal_speedup") else None,
            decode_tokens_per_s=med("decode_tokens_per_s"), peak_memory_bytes=med("peak_memory_bytes"),
            kv_cache_bytes=med("kv_cache_bytes"), matches=";".join(cell.matches), run_dir=str(res.run_dir),
        )
        rows.append(row)
    return rows


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """For each (cost, quality) point: is it on the front (lower cost, higher quality)?

    A point is off the front when another has cost <= and quality >= with one of them strict.
    Points with a missing value are never on it.
    """
    flags = []
    for i, (x, y) in enumerate(points):
        if x is None or y is None or x != x or y != y:
            flags.append(False)
            continue
        dominated = any(
            j != i and ox is not None and oy is not None and ox <= x and oy >= y and (ox < x or oy > y)
            for j, (ox, oy) in enumerate(points)
        )
        flags.append(not dominated)
    return flags


def mark_pareto(rows: list[dict[str, Any]], metric: str) -> None:
    for cost in ("kept_tokens", "flops_fraction", "ttft_s"):
        flags = pareto_front([(r.get(cost), r[metric]) for r in rows])
        for row, flag in zip(rows, flags):
            row[f"pareto_{cost}"] = flag


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def sweep_title(spec: dict[str, list[Any]], controls, plan: DatasetPlan, base: RunConfig, preset: str | None) -> str:
    """What was swept, over what: the plot's and the table's title."""
    grid = " × ".join(f"{short_name(k) if '.' in k else k} {{{', '.join(value_text(v) for v in values)}}}" for k, values in spec.items())
    extra = f" with {' and '.join(controls)} controls" if controls else ""
    return (f"Sweep of {grid}{extra} on {plan.name} ({len(plan.runnable)} questions), "
            f"from preset {preset or '(none)'}, model {base.model.name}")


def _count(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _front(r: dict[str, Any]) -> str:
    return "".join(name for name, key in (("k", "pareto_kept_tokens"), ("f", "pareto_flops_fraction"),
                                          ("t", "pareto_ttft_s")) if r.get(key))


def _acc_ci(r: dict[str, Any]) -> str:
    ci = "" if r["ci_low"] is None else f" ({100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f})"
    return fmt_pct(r["accuracy"]) + ci


def _speedup(r: dict[str, Any]) -> str:
    if r.get("speedup_paired_median") is None:
        return "-"
    return f"{r['speedup_paired_median']:.2f}× ({r['speedup_paired_p25']:.2f}-{r['speedup_paired_p75']:.2f})"


def sweep_table(rows: list[dict[str, Any]], metric: str, title: str) -> FittedTable:
    """The sweep's console table, fitted to the terminal; summary.csv has every column."""
    from prunevid_bench.harness.inputs import model_text
    from prunevid_bench.single import fmt_seconds, human_bytes

    columns = [
        # a space after each comma: a long name wraps between its values
        Column("cell", lambda r: r["cell"].replace(",", ", "), rank=0, fold=True, justify="left"),
        # one model per sweep, named in the title too: at 80 columns the Pareto front goes first
        Column("model", lambda r: model_text(r.get("model")), rank=3, fold=True, justify="left", word_cap=10),
        Column("acc (CI)", _acc_ci, rank=0, note="acc: accuracy with its 95% CI in %"),
        Column("tokens", lambda r: _count(r["kept_tokens"]), rank=1, note="tokens: visual tokens kept (median)"),
        Column("kept", lambda r: fmt_pct(r["retention"]), rank=2, note="kept: of the visual tokens in"),
        Column("FLOPs", lambda r: fmt_pct(r.get("flops_fraction")), rank=1,
               note="FLOPs: prefill FLOPs (vision encoder + LLM, analytic) over the baseline's: what the line paid"),
        Column("tok/L", lambda r: _count(r.get("tokens_per_layer"), 1), rank=2,
               note="tok/L: visual tokens in each LLM layer's prefill, mean over layers (median)"),
        Column("TTFT", lambda r: fmt_seconds(r["ttft_s"]), rank=1, note="TTFT: median"),
        Column("speed-up", _speedup, rank=3, note="speed-up: median over questions of TTFT(baseline) / TTFT(cell), "
               "with p25-p75 (--interleave measures each pair under the same load)"),
        Column("front", _front, rank=1, note=f"front: on the Pareto front of {metric} against k: kept tokens, f: FLOPs, t: TTFT"),
        Column("Δacc (p)", lambda r: paired_short(r.get("paired_difference"), r.get("mcnemar_p")), rank=3,
               note="Δacc: paired difference from the baseline cell in points, p: exact McNemar"),
        Column("agree", lambda r: fmt_pct(r["agreement"]), rank=3, note="agree: with the baseline cell"),
        Column("n", lambda r: str(r["n"]), rank=5),
        Column("KV", lambda r: human_bytes(r["kv_cache_bytes"]), rank=6),
        Column("dec tok/s", lambda r: _count(r["decode_tokens_per_s"], 1), rank=7),
        Column("peak mem", lambda r: human_bytes(r["peak_memory_bytes"]), rank=8),
    ]
    return FittedTable(columns, rows, title=title, full_table="every column: summary.csv")
