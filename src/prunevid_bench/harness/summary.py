"""A dataset run's summary: recomputed from every log of its folder (whichever process wrote
it), written to summary.json and summary.csv (``summarize_run``), and shown as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.run_stats import flat_row, summarise
from prunevid_bench.harness.runlock import meta_lock
from prunevid_bench.harness.runs import CONFIG_FILE, PLAN_FILE, SUMMARY_FILE, read_run_samples, sample_logs
from prunevid_bench.harness.shard import missing_samples, rank_summary
from prunevid_bench.report import read_json, write_csv_row, write_json
from prunevid_bench.terminal import printable


def load_baseline(baseline: Path | None) -> list[dict[str, Any]] | None:
    if baseline is None:
        return None
    if not sample_logs(Path(baseline)):
        raise PruneVidError(f"--baseline {baseline} is not a dataset run folder (no samples.jsonl)")
    return list(read_run_samples(Path(baseline)).values())


def summarize_run(run_dir: Path, baseline_records: list[dict[str, Any]] | None = None,
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary of every log of ``run_dir`` (whichever process wrote it), written to
    summary.json and summary.csv; returned with the records it counted. Without
    ``baseline_records``, agreement is with the run's ``--baseline`` folder, or for a sweep cell
    with its sweep's baseline cell, as the sweep reported it."""
    run_dir = Path(run_dir)
    again = "rerun the run's command (finished samples are kept)"
    if not (run_dir / CONFIG_FILE).is_file():
        raise PruneVidError(f"{run_dir} is not a dataset run folder (no {CONFIG_FILE})")
    meta = read_json(run_dir / CONFIG_FILE, "restore it, or rerun with --force to start this run folder over", ("config",))
    if not (run_dir / PLAN_FILE).is_file():
        raise PruneVidError(f"{run_dir} has no {PLAN_FILE} (written by an older version, or not a dataset run); {again}")
    plan = read_json(run_dir / PLAN_FILE, again, ("runnable", "skipped", "counts", "n_selected"))
    kinds = {"runnable": list, "skipped": list, "counts": dict, "n_selected": int}
    wrong = [key for key, kind in kinds.items() if not isinstance(plan[key], kind) or isinstance(plan[key], bool)]
    if wrong or not all(isinstance(i, str) for i in plan["runnable"]):
        raise PruneVidError(f"{run_dir / PLAN_FILE}: {(wrong or ['runnable'])[0]} has the wrong type; {again}")
    mismatch = None
    if meta.get("baseline"):  # --baseline: no agreement with a run that saw other inputs
        from prunevid_bench.harness.inputs import baseline_mismatch

        mismatch = baseline_mismatch(run_dir, Path(meta["baseline"]))
        if mismatch:
            baseline_records = None
        elif baseline_records is None:
            baseline_records = load_baseline(Path(meta["baseline"]))
    elif baseline_records is None and meta.get("scenario") == "sweep-cell" and meta.get("kind") != "baseline":
        sibling = run_dir.parent / "baseline"  # sweep.cell_folder("baseline")
        baseline_records = load_baseline(sibling) if sample_logs(sibling) else None
    with meta_lock(run_dir):  # the last rank to end reads every finished log
        done = read_run_samples(run_dir)
        records = [done[i] for i in plan["runnable"] if i in done]
        summary = {
            "run": run_dir.name,
            "model": model_of(run_dir, meta),
            "complete": len(records) == len(plan["runnable"]) and not any(r.get("error") for r in records),
            "n_selected": plan["n_selected"],
            "counts": {**plan["counts"], "evaluated": len(records)},
            **summarise(records, plan["skipped"], baseline_records),
        }
        ranks = rank_summary(records)
        if ranks:
            summary["ranks"] = ranks
        summary.update(missing_samples(run_dir, plan["runnable"], done))
        if mismatch:
            summary["baseline_mismatch"] = mismatch
        write_json(run_dir / SUMMARY_FILE, summary)
        write_csv_row(run_dir / "summary.csv", flat_row(meta, summary, meta["config"]))
    return summary, records


def model_of(run_dir: Path, meta: dict[str, Any]) -> str | None:
    """The model that ran: as environment.json recorded it when loaded, else the config's name."""
    env_path = Path(run_dir) / "environment.json"
    env = read_json(env_path, "restore it, or rerun with --force") if env_path.is_file() else {}
    return env.get("model_name") or meta["config"]["model"]["name"]


def shown(text: str) -> str:
    """Data-file text (ids, reasons quoting questions or paths) for the console: escape
    sequences and rich markup are printed, not obeyed."""
    return escape(printable(text))


def summary_table(summary: dict[str, Any], title: str = "Summary") -> Table:
    """Accuracy, skips and the medians of one dataset run, for people."""
    from prunevid_bench.single import fmt_seconds, human_bytes

    acc = summary["accuracy"]
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")

    def row(name: str, value: str) -> None:
        table.add_row(shown(name), shown(value))  # "[p25, p75]" is text, not rich markup; categories come from the data

    if summary.get("model"):
        row("model", summary["model"])
    counts = summary.get("counts")
    if counts:  # selected = evaluated + skipped in preflight; skipped = unusable rows + preflight
        pre = f"; {counts['skipped_preflight']} skipped in preflight" if counts["skipped_preflight"] else ""
        row("questions evaluated", f"{acc['n']} (of {counts['selected']} selected{pre})")
    else:  # folders written before counts were recorded
        row("questions evaluated", f"{acc['n']} (of {summary['n_selected']} selected)")
    row("accuracy [95% CI]", f"{fmt_pct(acc['accuracy'])} [{fmt_pct(acc['ci_low'])}, {fmt_pct(acc['ci_high'])}]  ({acc['correct']}/{acc['n']})")
    row("unparsed replies (counted wrong)", str(acc["unparsed"]))
    row("errors (counted wrong)", str(acc["errors"]))
    skipped = str(len(summary["skipped"]))
    if counts and counts["unusable"] and counts["skipped_preflight"]:
        skipped += f" ({counts['unusable']} unusable rows, {counts['skipped_preflight']} in preflight)"
    elif counts and counts["unusable"]:
        skipped += " (unusable rows)"
    row("skipped (not evaluated)", skipped)
    if "agreement" in summary:
        ag = summary["agreement"]
        row("agreement with baseline", f"{fmt_pct(ag['agreement'])} [{fmt_pct(ag['ci_low'])}, {fmt_pct(ag['ci_high'])}] on {ag['n']}")
    if summary.get("baseline_mismatch"):
        row("agreement with baseline", f"not computed: {summary['baseline_mismatch']}")
    if summary.get("paired"):
        from prunevid_bench.harness.answers import paired_text

        row("Δ accuracy vs baseline, paired [95% CI], McNemar p", paired_text(summary["paired"]))
    for name, cat in summary["accuracy"].get("by_category", {}).items():
        row(f"  {name}", f"{fmt_pct(cat['accuracy'])}  ({cat['correct']}/{cat['n']})")
    m = summary["metrics"]

    def med(name, fmt=str):
        return fmt(m[name]["median"]) if name in m else "-"

    row("visual tokens: prompt → LLM → kept (median)",
                  f"{med('visual_tokens', _int)} → {med('tokens_after_visual_methods', _int)} → {med('visual_tokens_kept', _int)}")
    if "ttft_s" in m:
        t = m["ttft_s"]
        row("TTFT median [p25, p75]", f"{fmt_seconds(t['median'])} [{fmt_seconds(t['p25'])}, {fmt_seconds(t['p75'])}]")
    row("decode speed (median)", med("decode_tokens_per_s", lambda v: f"{v:.1f} tok/s"))
    row("peak memory (median)", med("peak_memory_bytes", human_bytes))
    row("KV cache after prefill (median)", med("kv_cache_bytes", human_bytes))
    return table


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _int(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
