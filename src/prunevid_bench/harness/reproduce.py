"""``prunevid reproduce NAME``: a published table's grid run through our harness, our numbers
printed beside the published ones.

Each benchmark file of the table is one matched-budget sweep (``harness.sweep``: the baseline cell
is the table's ``full`` row, a cell per method and budget, each a resumable run folder) under the
source's input setting; the model is loaded once for all of them. A benchmark spread over several
files (MVBench's 20 tasks) is pooled question by question. Our score is the benchmark's own
aggregate (accuracy with its Wilson 95% interval, or MLVU's mean over task types with a normal
interval); beside it: the published number, the difference, and whether the published number
lies inside our interval. Rows whose method this version lacks are named in one line each and
left out; ``--dry-run`` (``reproduce_plan.py``) says what would run and what it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from prunevid_bench.config import RunConfig, build_config
from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.published import FULL, Benchmark, PublishedRow, PublishedTable, load_table
from prunevid_bench.harness.tables import Column, FittedTable

NOT_AVAILABLE = "method not available in this version"


@dataclass
class Plan:
    table: PublishedTable
    config: RunConfig  # the source's input setting, with --model and the other flags on top
    data_root: Path
    runnable: list[PublishedRow]  # the full row and every row whose method exists here
    unavailable: list[PublishedRow]

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.method for r in self.runnable if r.method != FULL))

    @property
    def budgets(self) -> tuple[float, ...]:
        return tuple(dict.fromkeys(r.budget for r in self.runnable if r.budget is not None))

    def files(self, bench: Benchmark) -> list[tuple[Path, Path]]:
        return [(self.data_root / f, self.data_root / v) for f, v in bench.files]


def method_exists(name: str) -> bool:
    """A method, or a line of a method grid (``prunevid``), in this version's registry."""
    from prunevid_bench.methods.lines import method_line

    try:
        method_line(name)
    except PruneVidError:
        return False
    return True


def make_plan(name: str, data_root: Path | None, overrides: dict[str, Any] | None = None) -> Plan:
    """The table, its config (``overrides``: dotted keys, e.g. ``model.name`` from --model, over the
    source's input) and which rows can run."""
    table = load_table(name)
    if data_root is not None and not Path(data_root).is_dir():
        raise PruneVidError(f"data root not found: {data_root}; pass the folder that holds the benchmarks "
                            "(see `prunevid reproduce NAME --dry-run` for the layout)")
    config = build_config(None, None, {**table.input, "model.name": table.model, **(overrides or {})})
    runnable = [r for r in table.rows if r.method == FULL or method_exists(r.method)]
    unavailable = [r for r in table.rows if r not in runnable]
    return Plan(table, config, Path(data_root) if data_root is not None else Path("."), runnable, unavailable)


def unavailable_lines(plan: Plan) -> list[str]:
    return [f"{row.label}: {NOT_AVAILABLE} (published: "
            f"{', '.join(f'{b.short} {row.scores[b.name]}' for b in plan.table.benchmarks if b.name in row.scores) or 'none'})"
            for row in plan.unavailable]


def cell_name(row: PublishedRow) -> str:
    from prunevid_bench.harness.sweep_grid import value_text

    return "baseline" if row.method == FULL else f"{row.method},budget={value_text(row.budget)}"


# ---------------------------------------------------------------------------------------------
# Running


def run_reproduction(plan: Plan, options, *, limit: int | float | None = None, console: Console | None = None,
                     pipeline=None) -> list[dict[str, Any]]:
    """Every benchmark file as a matched-budget sweep; the side-by-side rows (``side_by_side``)."""
    from prunevid_bench.harness.evaluate import pipeline_loader
    from prunevid_bench.harness.specs import DatasetSpec
    from prunevid_bench.harness.sweep import SweepGrid, run_sweep

    console = console or Console()
    check_runnable(plan, limit)
    get_pipe = pipeline if pipeline is not None else pipeline_loader(plan.config)  # one model for every sweep
    grid = SweepGrid(methods=plan.methods, budgets=plan.budgets)
    tallies: dict[tuple[str, str], list[dict[str, Any]]] = {}
    files: dict[tuple[Path, Path, str], list[Benchmark]] = {}  # a file is swept once, whichever benchmarks read it
    for bench in plan.table.benchmarks:
        for path, videos in plan.files(bench):
            files.setdefault((path, videos, bench.format), []).append(bench)
    for (path, videos, fmt), benches in files.items():
        console.print(f"[bold]{escape(benches[0].title)}[/]: {escape(path.name)}", highlight=False, soft_wrap=True)
        spec = DatasetSpec(path, videos, None, fmt, limit, 0, "first")
        sweep_options = _with_label(options, f"reproduce-{plan.table.name}-{fmt}")
        result = run_sweep(plan.config, spec, grid, sweep_options, console=console, pipeline=get_pipe)
        for bench in benches:
            for cell, summary in result.summaries.items():
                tally = summary["accuracy"] if not bench.subset else subset_tally(result.sweep_dir, cell, spec, bench)
                tallies.setdefault((bench.name, cell), []).append(tally)
    return side_by_side(plan, tallies)


def subset_tally(sweep_dir: Path, cell: str, spec, bench: Benchmark) -> dict[str, Any]:
    """The accuracy tally of a cell over the questions whose labels match ``bench.subset`` (Video-MME
    by duration): the run's records of the questions the sweep asked, filtered by the file's rows."""
    from prunevid_bench.harness.answers import accuracy_summary
    from prunevid_bench.harness.datasets import load_dataset, sample_rows
    from prunevid_bench.harness.runs import read_run_samples
    from prunevid_bench.harness.sweep import cell_folder

    asked = sample_rows(load_dataset(spec.path, video_root=spec.video_root, format=spec.format).samples,
                        spec.limit, how=spec.sample)
    wanted = [s.id for s in asked if all(s.meta.get(k) == v for k, v in bench.subset)]
    records = read_run_samples(sweep_dir / "cells" / cell_folder(cell))
    return accuracy_summary([records[i] for i in wanted if i in records])


def check_runnable(plan: Plan, limit: int | float | None = None) -> None:
    """Something to run, every data file there and a usable --limit: else one line, before anything runs."""
    from prunevid_bench.harness.datasets import sample_rows

    sample_rows([], limit)  # the --limit rule, checked on no rows
    if not plan.methods:
        raise PruneVidError(f"none of the methods of {plan.table.name} is in this version "
                            f"({', '.join(r.method for r in plan.unavailable)}); nothing to set beside the table")
    missing = list(dict.fromkeys(str(f) for b in plan.table.benchmarks for f, _ in plan.files(b) if not f.is_file()))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PruneVidError(f"data missing: {missing[0]}{more}; `prunevid reproduce {plan.table.name} --dry-run "
                            f"--data-root {plan.data_root}` lists what is needed")


def _with_label(options, label: str):
    from dataclasses import replace

    return replace(options, label=label)


def score(parts: list[dict[str, Any]], metric: str) -> tuple[float, float, float, int]:
    """(score, 95% low, high, questions) in [0, 1] over the pooled files' accuracy tallies."""
    from prunevid_bench.harness.answers import wilson_interval

    correct, n = sum(p["correct"] for p in parts), sum(p["n"] for p in parts)
    if metric == "accuracy":
        low, high = wilson_interval(correct, n)
        return (correct / n if n else math.nan), low, high, n
    groups: dict[str, list[int]] = {}
    for part in parts:
        for name, tally in (part.get("by_category") or {"(none)": part}).items():
            total = groups.setdefault(name, [0, 0])
            total[0] += tally["correct"]
            total[1] += tally["n"]
    tasks = [(c, k) for c, k in groups.values() if k]
    if not tasks:
        return math.nan, math.nan, math.nan, 0
    # The mean of independent per-task proportions: its variance is the sum of theirs over K^2,
    # each taken at the Agresti-Coull estimate (c + 2) / (k + 4), so a task at 0% or 100% still
    # adds its uncertainty (the plain estimate would give it none).
    mean = sum(c / k for c, k in tasks) / len(tasks)
    variance = sum((c + 2) / (k + 4) * (1 - (c + 2) / (k + 4)) / (k + 4) for c, k in tasks)
    half = 1.96 * math.sqrt(variance) / len(tasks)
    return mean, max(0.0, mean - half), min(1.0, mean + half), n


def side_by_side(plan: Plan, tallies: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for row in plan.runnable:
        for bench in plan.table.benchmarks:
            parts = tallies.get((bench.name, cell_name(row)))
            if not parts:
                continue
            ours, low, high, n = score(parts, bench.metric)
            published = row.scores.get(bench.name)
            ours, low, high = (round(100 * x, 2) for x in (ours, low, high))
            rows.append({"method": row.method, "budget": row.budget, "benchmark": bench.name, "short": bench.short,
                         "metric": bench.metric, "published": published, "ours": ours, "ci_low": low, "ci_high": high,
                         "n": n, "delta": None if published is None else round(ours - published, 2),
                         "inside": None if published is None else bool(low <= published <= high)})
    return rows


def side_by_side_table(rows: list[dict[str, Any]], title: str) -> FittedTable:
    def fmt(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    def inside(r) -> str:
        return "-" if r["inside"] is None else ("yes" if r["inside"] else "no")

    columns = [
        Column("method", lambda r: r["method"], justify="left"),
        Column("B", lambda r: "1" if r["budget"] is None else f"{r['budget']:g}"),
        Column("bench", lambda r: r["short"], justify="left"),
        Column("paper", lambda r: "-" if r["published"] is None else str(r["published"])),
        Column("ours", lambda r: fmt(r["ours"])),
        Column("95% CI", lambda r: f"{r['ci_low']:.1f}-{r['ci_high']:.1f}", rank=1),
        Column("Δ", lambda r: "-" if r["delta"] is None else f"{r['delta']:+.1f}"),
        Column("in CI", inside, note="in CI: the published number lies inside our 95% interval"),
        Column("n", lambda r: str(r["n"]), rank=2, note="n: questions run"),
    ]
    return FittedTable(columns, rows, title=title)


def reproduce(name: str, data_root: Path, options, *, overrides: dict[str, Any] | None = None,
              limit: int | float | None = None, console: Console | None = None, pipeline=None) -> list[dict[str, Any]]:
    """The whole command: the plan, the unavailable rows in one line each, the runs, the table."""
    console = console or Console()
    plan = make_plan(name, data_root, overrides)
    check_runnable(plan, limit)
    for line in unavailable_lines(plan):
        console.print(f"[yellow]skipped:[/] {escape(line)}", highlight=False, soft_wrap=True)
    rows = run_reproduction(plan, options, limit=limit, console=console, pipeline=pipeline)
    console.print(side_by_side_table(rows, f"{plan.table.title} ({plan.config.model.name})"))
    console.print(f"source: {escape(plan.table.source['cite'])}", highlight=False, soft_wrap=True)
    for note in plan.table.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    from prunevid_bench.report import write_json

    out = Path(options.results_dir) / f"reproduce-{plan.table.name}.json"
    write_json(out, {"table": plan.table.name, "source": plan.table.source, "model": plan.config.model.name,
                     "input": plan.table.input, "notes": list(plan.table.notes), "unavailable": unavailable_lines(plan),
                     "rows": rows})
    console.print(f"side by side: {out}", highlight=False, soft_wrap=True)
    return rows
