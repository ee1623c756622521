"""``prunevid sweep``: a grid of configs over one dataset, each cell a resumable dataset run.

Cells, in the order they run:
- ``baseline``: the base config with every method off. Always included: agreement and deltas
  are measured against it.
- grid cells: the Cartesian product of the swept values over the base config (``--preset``,
  ``--config``, ``--set``). Sweeping a Stage-1 key (``stage1.*`` other than ``enabled``) switches
  Stage 1 on in every grid cell, and a Stage-2 key switches Stage 2 on, so ``prunevid sweep tau``
  measures merging even from a preset that has it off. Sweep ``stage1.enabled`` itself to
  override that.
- ``--controls random``: each grid cell whose LLM-layer method scores (PruneVid Stage 2), again
  with its ``score=random`` (the same number of tokens kept, chosen at random; every other method
  as in the cell, so the same tokens reach that layer). Cells without one get none.
- ``--controls frames``: the baseline (every method off) with fewer frames, so that its visual tokens match a grid
  cell's kept tokens (medians). The frame count is known only after the cell ran, so these run
  last, one per distinct count.

Layout: ``<results>/sweep-<label>-<dataset>-<hash>/`` holds ``sweep.json`` (the cells),
``cells/<cell>/`` (a run folder each), ``summary.csv`` (one row per cell) and ``pareto.png``.
The hash covers the base config, the answer mode and the questions, not the grid: adding values
or controls later reuses the cells already done. Each cell resumes sample by sample, so an
interrupted sweep restarted with the same command picks up where it stopped; the model is loaded
once, on the first sample that must run, and shared by every cell.

With ``--launcher local`` or ``slurm`` the cells run as submitit jobs instead (``harness.launch``):
the unfinished ones are submitted, the sweep waits (or returns with ``--no-wait``), then reads
every finished cell back and makes the same table; ``--status`` shows each cell's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from prunevid_bench.config import RunConfig
from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.answers import agreement
from prunevid_bench.harness.evaluate import (
    DatasetPlan,
    EvalResult,
    evaluate_plan,
    fmt_pct,
    needs_retry,
    pipeline_loader,
    plan_dataset,
    with_feature_cache,
)
from prunevid_bench.harness.launch import Launch
from prunevid_bench.harness.runlock import LOCK_FILE, RunLock, held_locks
from prunevid_bench.harness.runs import CONFIG_FILE, back_up, fingerprint_hash, read_run_samples
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.harness.sweep_grid import (
    Cell, expand_cells, frames_controls, grid_spec, method_budget_cells, short_name, value_text,
)
from prunevid_bench.harness.sweep_grid import (  # noqa: F401 (read from here by the CLI and older callers)
    load_sweep_file, parse_method_grid, parse_values, shipped_values,
)
from prunevid_bench.harness.tables import Column, FittedTable
from prunevid_bench.report import slug, write_json

SWEEP_FEATURE_CACHE_GB = 4.0  # memory for the cells' shared vision features (--feature-cache-gb)
METRIC_CHOICES = ("accuracy", "agreement")


@dataclass(frozen=True)
class SweepGrid:
    """What a sweep varies, and how it reports: the grid, its controls, the plot's metric."""

    params: tuple[str, ...] = ()  # the keys to sweep (short or dotted); empty: every key given values
    values: tuple[str, ...] = ()  # "name=v1,v2,..." each
    sweep_file: Path | None = None  # a grid YAML, overlaid by values
    controls: tuple[str, ...] = ()  # random | frames
    metric: str = "accuracy"  # accuracy | agreement, for the Pareto front
    dry_run: bool = False  # list the cells and their status; run nothing
    status: bool = False  # the same list, with each cell's job: what a running sweep has done so far
    methods: tuple[str, ...] = ()  # matched budgets: prunevid or registered method names ...
    budgets: tuple[float, ...] = ()  # ... each run at every kept fraction B (its own knob set by budget.budget_overrides)


@dataclass
class SweepResult:
    sweep_dir: Path
    cells: list[Cell]
    rows: list[dict[str, Any]]
    plot: Path | None
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell name -> its summary.json
    failed: dict[str, str] = field(default_factory=dict)  # cell name -> its error or state (launched cells)


# ---------------------------------------------------------------------------------------------
# Running


def sweep_dir_for(results_dir: Path, label: str, base: RunConfig, plan: DatasetPlan, answer_mode: str) -> Path:
    key = fingerprint_hash({"config": base.to_dict(), "answer_mode": answer_mode, "dataset": plan.identity()})
    return Path(results_dir) / f"sweep-{slug(label)}-{slug(plan.name)}-{key}"


def _exists_only(path: Path) -> None:
    if not Path(path).is_file():
        raise PruneVidError(f"video not found: {path}")


def run_sweep(
    base: RunConfig,
    dataset: DatasetSpec,
    grid: SweepGrid,
    options: EvalOptions = EvalOptions(),
    *,
    console: Console | None = None,
    pipeline=None,
    launch: Launch = Launch(),
) -> SweepResult:
    """Every cell of ``grid`` over ``dataset``, from the ``base`` config. Of ``options``, the
    baseline folder does not apply: a sweep's baseline is its own baseline cell. ``launch``: in
    this process (serial), or as jobs (``harness.launch``)."""
    console = console or Console()
    from prunevid_bench.harness.shard import Shard

    if Shard.from_env().split:
        raise PruneVidError("a sweep splits by cell, not by rank: run it once, with --launcher local --workers N "
                            "or --launcher slurm, not under torchrun or accelerate launch")
    params, values, sweep_file, controls = list(grid.params), list(grid.values), grid.sweep_file, list(grid.controls)
    metric, dry_run, answer_mode, force = grid.metric, grid.dry_run, options.answer_mode, options.force
    if metric not in METRIC_CHOICES:
        raise PruneVidError(f"--metric must be accuracy or agreement, got '{metric}'")
    notes: list[str] = []
    if grid.methods:
        if params or values or sweep_file or controls:
            raise PruneVidError("--methods/--budgets make their own grid; drop PARAMs, --values, --sweep-file and --controls")
        spec = {"method": list(grid.methods), "budget": list(grid.budgets)}  # for the title and sweep.json
        cells = method_budget_cells(base, list(grid.methods), list(grid.budgets))
    else:
        spec = grid_spec(list(params or []), values, sweep_file, notes)
        cells = expand_cells(base, spec, controls)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    check_folders(cells)
    # A dry run only checks that videos exist; a real run decodes each one before the model loads.
    plan = plan_dataset(dataset, check=_exists_only if dry_run else None, console=console)
    label = options.label or ("methods" if grid.methods else Path(sweep_file).stem if sweep_file
                              else "+".join(short_name(k) for k in spec))
    sweep_dir = sweep_dir_for(options.results_dir, label, base, plan, answer_mode)
    if dry_run or grid.status:
        console.print(cells_table(cells, sweep_dir, plan, controls))
        console.print(f"sweep folder: {sweep_dir}  ({len(cells)} cells; nothing run)", soft_wrap=True)
        return SweepResult(sweep_dir, cells, [], None)
    meta = {"preset": options.preset, "label": label, "sweep": sweep_dir.name}
    # One sweep per folder at a time (each cell also locks its own run folder): two would rewrite
    # each other's sweep.json, table and plot, and a --force would back up the other's.
    with RunLock(sweep_dir, wait=options.wait, note=lambda text: console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)):
        if launch.parallel:
            from prunevid_bench.harness.sweep_jobs import run_as_jobs

            return run_as_jobs(base, cells, plan, sweep_dir, spec, controls, metric, options, meta, launch, console)
        return _run_cells_here(base, cells, plan, sweep_dir, spec, controls, metric, options, meta, pipeline, console)


def _run_cells_here(base, cells, plan, sweep_dir, spec, controls, metric, options, meta, pipeline, console) -> SweepResult:
    """The cells one after another in this process, then the sweep's table and plot."""
    force = options.force
    if pipeline is None:
        get_pipe = pipeline_loader(base)
    else:
        get_pipe = pipeline if callable(pipeline) else (lambda: pipeline)
    get_pipe = with_feature_cache(get_pipe, options, default_gb=SWEEP_FEATURE_CACHE_GB)
    if force or any(cell_status(sweep_dir / "cells" / cell_folder(c.name), plan) != "done" for c in cells):
        check_cells_fit(cells, get_pipe())  # before any cell runs: not after the baseline
    (sweep_dir / "cells").mkdir(parents=True, exist_ok=True)
    if force:  # the sweep's own table and plot no longer hold; each cell backs up its own results
        backup = back_up(sweep_dir, ("summary.csv", "pareto.png"))
        if backup is not None:
            console.print(f"--force: the earlier sweep table and plot are kept in {backup.name}/", soft_wrap=True)
    write_sweep_json(sweep_dir, base, spec, controls, metric, cells)
    results: dict[str, EvalResult] = {}

    def run_cell(cell: Cell, position: str) -> None:
        console.print(f"[bold]cell {position}[/] {escape(cell.name)} ({cell.kind})", highlight=False, soft_wrap=True)
        baseline_records = results["baseline"].records if "baseline" in results else None
        results[cell.name] = evaluate_plan(
            cell.config, plan, get_pipe, sweep_dir / "cells" / cell_folder(cell.name), options,
            meta=cell_meta(meta, cell), baseline_records=baseline_records, console=console, quiet=True,
        )
        res = results[cell.name]
        kept = res.summary["metrics"].get("tokens_after", {}).get("median")
        console.print(f"  accuracy {fmt_pct(res.summary['accuracy']['accuracy'])}, kept tokens "
                      f"{'-' if kept is None else f'{kept:.0f}'}; {res.ran} samples run now", highlight=False,
                      soft_wrap=True)

    for i, cell in enumerate(cells, start=1):
        run_cell(cell, f"{i}/{len(cells)}")
    if "frames" in (controls or []):
        extra = frames_controls(base, cells, results)
        for i, cell in enumerate(extra, start=1):
            run_cell(cell, f"frames control {i}/{len(extra)}")
        cells += extra
        write_sweep_json(sweep_dir, base, spec, controls, metric, cells)

    return report_sweep(base, cells, results, plan, sweep_dir, spec, controls, metric, options.preset, console)


def report_sweep(base, cells, results, plan, sweep_dir, spec, controls, metric, preset, console,
            failed: dict[str, str] | None = None) -> SweepResult:
    """summary.csv, the table and pareto.png over the cells that have results."""
    done = [c for c in cells if c.name in results]
    rows = sweep_rows(done, results, spec)
    mark_pareto(rows, metric)
    write_csv(sweep_dir / "summary.csv", rows)
    title = sweep_title(spec, controls, plan, base, preset)
    console.print(sweep_table(rows, metric, title=title))
    from prunevid_bench.harness.plot import plot_pareto

    plot = plot_pareto(rows, metric, sweep_dir / "pareto.png", title=title)
    console.print(f"sweep folder: {sweep_dir}\n  table: summary.csv   plot: {plot.name}", soft_wrap=True)
    return SweepResult(sweep_dir, cells, rows, plot, {name: res.summary for name, res in results.items()}, failed or {})


def cell_meta(meta: dict[str, Any], cell: Cell) -> dict[str, Any]:
    return {**meta, "scenario": "sweep-cell", "cell": cell.name, "kind": cell.kind, "overrides": cell.overrides,
            "matches": cell.matches}


def cell_folder(name: str) -> str:
    """A cell's folder name: its name with anything unusual for a file name replaced."""
    return "".join(c if c.isalnum() or c in "=,.+_-" else "-" for c in name)


def check_folders(cells: list[Cell]) -> None:
    """Two cells must never write one folder (e.g. values that differ only in a replaced character)."""
    seen: dict[str, str] = {}
    for cell in cells:
        folder = cell_folder(cell.name)
        if folder in seen:
            raise PruneVidError(f"sweep cells '{seen[folder]}' and '{cell.name}' would share the folder cells/{folder}; "
                                "give distinct values")
        seen[folder] = cell.name


def check_cells_fit(cells: list[Cell], pipe) -> None:
    """Apply every cell's stage settings to the loaded model once (e.g. ``pruning_layer=99`` on a
    4-layer model fails here), so a bad cell stops the sweep before the first one runs."""
    try:
        for cell in cells:
            try:
                pipe._apply_stages(cell.config)
            except PruneVidError as exc:
                raise PruneVidError(f"sweep cell {cell.name}: {exc}") from None
    finally:
        pipe.remove_stages()


def write_sweep_json(sweep_dir: Path, base: RunConfig, spec, controls, metric, cells: list[Cell]) -> None:
    write_json(sweep_dir / "sweep.json", {
        "grid": spec,
        "controls": list(controls or []),
        "metric": metric,
        "base_config": base.to_dict(),
        "cells": [{"name": c.name, "kind": c.kind, "folder": f"cells/{cell_folder(c.name)}", "overrides": c.overrides,
                   "matches": c.matches} for c in cells],
    })


def cell_status(run_dir: Path, plan: DatasetPlan) -> str:
    """``new``, ``running`` (its lock is held), ``k/n done``, ``done``, or ``failed: <error>``
    (a launched cell whose job recorded an error and that has not finished since)."""
    from prunevid_bench.harness.launch import cell_error

    if run_dir.is_dir() and LOCK_FILE in held_locks(run_dir, own=""):
        return "running"
    finished = 0
    if (run_dir / CONFIG_FILE).is_file():
        done = read_run_samples(run_dir)
        finished = sum(1 for s in plan.runnable if s.id in done and not needs_retry(done[s.id]))
        if finished == len(plan.runnable):
            return "done"
    error = cell_error(run_dir)
    if error is not None:
        return f"failed: {error}"
    return f"{finished}/{len(plan.runnable)} done" if (run_dir / CONFIG_FILE).is_file() else "new"


def cells_table(cells: list[Cell], sweep_dir: Path, plan: DatasetPlan, controls) -> FittedTable:
    from prunevid_bench.harness.launch import recorded_job

    def job(cell: Cell) -> str:
        recorded = recorded_job(sweep_dir, cell.name)
        return "-" if recorded is None else f"{recorded['launcher']} {recorded['job_id']}"

    rows = [{"#": str(i), "cell": cell.name, "kind": cell.kind,
             "overrides": " ".join(f"{short_name(k)}={value_text(v)}" for k, v in cell.overrides.items()),
             "status": cell_status(sweep_dir / "cells" / cell_folder(cell.name), plan), "job": job(cell)}
            for i, cell in enumerate(cells, start=1)]
    if "frames" in (controls or []):
        rows.append({"#": "+", "cell": "frames=N", "kind": "control_frames",
                     "overrides": "baseline with fewer frames, one per grid cell's kept tokens", "status": "after the grid",
                     "job": "-"})
    columns = [Column("#", lambda r: r["#"]), Column("cell", lambda r: r["cell"].replace(",", ", "), fold=True, justify="left"),
               Column("kind", lambda r: r["kind"], rank=1, justify="left"),
               Column("overrides", lambda r: r["overrides"], fold=True, justify="left"),
               Column("status", lambda r: r["status"], fold=True, justify="left")]
    if any(r["job"] != "-" for r in rows):  # a launched sweep: which job ran each cell
        columns.append(Column("job", lambda r: r["job"], rank=2, justify="left"))
    return FittedTable(columns, rows, title=f"Sweep cells ({len(plan.runnable)} questions each)")


# ---------------------------------------------------------------------------------------------
# The table and the Pareto front


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
        row.update(
            n=acc["n"], accuracy=acc["accuracy"], ci_low=acc["ci_low"], ci_high=acc["ci_high"],
            unparsed=acc["unparsed"], errors=acc["errors"], agreement=ag["agreement"],
            agreement_ci_low=ag["ci_low"], agreement_ci_high=ag["ci_high"],
            num_frames=med("num_frames"), tokens_in=med("tokens_before_stage1"),
            tokens_after_stage1=med("tokens_after_stage1"), kept_tokens=med("tokens_after"),
            retention=med("total_compression_ratio"), ttft_s=med("ttft_s"), ideal_speedup=med("ideal_speedup"),
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
    for cost in ("kept_tokens", "ttft_s"):
        flags = pareto_front([(r[cost], r[metric]) for r in rows])
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
    return "/".join(name for name, key in (("tok", "pareto_kept_tokens"), ("ttft", "pareto_ttft_s")) if r[key])


def _acc_ci(r: dict[str, Any]) -> str:
    ci = "" if r["ci_low"] is None else f" ({100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f})"
    return fmt_pct(r["accuracy"]) + ci


def sweep_table(rows: list[dict[str, Any]], metric: str, title: str) -> FittedTable:
    """The sweep's console table, fitted to the terminal; summary.csv has every column."""
    from prunevid_bench.single import fmt_seconds, human_bytes

    columns = [
        # a space after each comma: a long name wraps between its values
        Column("cell", lambda r: r["cell"].replace(",", ", "), rank=0, fold=True, justify="left"),
        Column("acc (CI)", _acc_ci, rank=0, note="acc: accuracy with its 95% CI in %"),
        Column("tokens", lambda r: _count(r["kept_tokens"]), rank=1, note="tokens: visual tokens kept (median)"),
        Column("TTFT", lambda r: fmt_seconds(r["ttft_s"]), rank=1, note="TTFT: median"),
        Column("front", _front, rank=2, note=f"front: on the Pareto front of {metric} against kept tokens / TTFT"),
        Column("agree", lambda r: fmt_pct(r["agreement"]), rank=3, note="agree: with the baseline cell"),
        Column("kept", lambda r: fmt_pct(r["retention"]), rank=4, note="kept: of the visual tokens in"),
        Column("n", lambda r: str(r["n"]), rank=5),
        Column("KV", lambda r: human_bytes(r["kv_cache_bytes"]), rank=6),
        Column("dec tok/s", lambda r: _count(r["decode_tokens_per_s"], 1), rank=7),
        Column("peak mem", lambda r: human_bytes(r["peak_memory_bytes"]), rank=8),
    ]
    return FittedTable(columns, rows, title=title, full_table="every column: summary.csv")
