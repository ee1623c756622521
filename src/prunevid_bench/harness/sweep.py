"""``prunevid sweep``: a grid of configs over one dataset, each cell a resumable dataset run.

Cells, in the order they run:
- ``baseline``: the base config with every method off. Always included: agreement and deltas
  are measured against it.
- grid cells: the Cartesian product of the swept values over the base config (``--preset``,
  ``--config``, ``--set``). Sweeping a method's key (other than ``enabled``) switches that method
  on in every grid cell, so ``prunevid sweep tau`` measures merging even from a preset that has
  it off. Sweep the method's ``enabled`` itself to override that.
- ``--controls random``: each grid cell whose LLM-layer method scores (e.g. PruneVid's), again
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
from prunevid_bench.harness.interleave import paired_speedup
from prunevid_bench.harness.launch import Launch
from prunevid_bench.harness.runlock import LOCK_FILE, RunLock, held_locks
from prunevid_bench.harness.runs import CONFIG_FILE, back_up, fingerprint_hash, identity_config, read_run_samples
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.harness.sweep_grid import (
    Cell, expand_cells, frames_controls, grid_spec, method_budget_cells, short_name, value_text,
)
from prunevid_bench.harness.sweep_grid import (  # noqa: F401 (read from here by the CLI and older callers)
    load_sweep_file, parse_method_grid, parse_values, shipped_values,
)
from prunevid_bench.harness.sweep_report import (  # noqa: F401 (pareto_front: read from here by older callers)
    mark_pareto, pareto_front, sweep_rows, sweep_table, sweep_title, write_csv,
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
    key = fingerprint_hash({"config": identity_config(base.to_dict()), "answer_mode": answer_mode, "dataset": plan.identity()})
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

    if options.interleave and launch.parallel:
        raise PruneVidError("--interleave runs every cell in this process; drop --launcher local/slurm")
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
    if pipeline is None:
        get_pipe = pipeline_loader(base)
    else:
        get_pipe = pipeline if callable(pipeline) else (lambda: pipeline)
    get_pipe = with_feature_cache(get_pipe, options, default_gb=SWEEP_FEATURE_CACHE_GB)
    try:
        return _run_cells(base, cells, plan, sweep_dir, spec, controls, metric, options, meta, get_pipe, console)
    finally:
        get_pipe.detach()  # the caller's pipeline does not keep this sweep's cache


def _run_cells(base, cells, plan, sweep_dir, spec, controls, metric, options, meta, get_pipe, console) -> SweepResult:
    force = options.force
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
        kept = res.summary["metrics"].get("visual_tokens_kept", {}).get("median")
        console.print(f"  accuracy {fmt_pct(res.summary['accuracy']['accuracy'])}, kept tokens "
                      f"{'-' if kept is None else f'{kept:.0f}'}; {res.ran} samples run now", highlight=False,
                      soft_wrap=True)

    if options.interleave:  # question by question through every cell (harness.interleave)
        from prunevid_bench.harness.interleave import run_interleaved

        console.print(f"[bold]interleaved[/]: each question through the {len(cells)} cells in turn", soft_wrap=True)
        folders = {c.name: sweep_dir / "cells" / cell_folder(c.name) for c in cells}
        results.update(run_interleaved(cells, plan, get_pipe, folders, options, lambda c: cell_meta(meta, c), console))
    else:
        for i, cell in enumerate(cells, start=1):
            run_cell(cell, f"{i}/{len(cells)}")
    if "frames" in (controls or []):
        extra = frames_controls(base, cells, results)
        for i, cell in enumerate(extra, start=1):
            run_cell(cell, f"frames control {i}/{len(extra)}")
        cells += extra
        write_sweep_json(sweep_dir, base, spec, controls, metric, cells)

    check_cell_inputs(results, options.allow_mixed)
    return report_sweep(base, cells, results, plan, sweep_dir, spec, controls, metric, options.preset, console)


def check_cell_inputs(results: dict[str, EvalResult], allow_mixed: bool) -> None:
    """Cells run at other times (a resumed sweep) must have run the same model the same way."""
    from prunevid_bench.harness.inputs import check_same_inputs
    from prunevid_bench.harness.runs import load_run

    saved = [load_run(res.run_dir) for res in results.values()]
    check_same_inputs(saved, saved[0], allow_mixed, what="tabulate this sweep")


def report_sweep(base, cells, results, plan, sweep_dir, spec, controls, metric, preset, console,
            failed: dict[str, str] | None = None) -> SweepResult:
    """summary.csv, the table and pareto.png over the cells that have results."""
    done = [c for c in cells if c.name in results]
    from prunevid_bench.harness.noops import no_effect_notes

    for note in no_effect_notes(done, results, spec):
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
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
    from prunevid_bench.harness.launch import cell_error, clear_stale_error

    if run_dir.is_dir() and LOCK_FILE in held_locks(run_dir, own=""):
        return "running"
    finished = 0
    if (run_dir / CONFIG_FILE).is_file():
        done = read_run_samples(run_dir)
        finished = sum(1 for s in plan.runnable if s.id in done and not needs_retry(done[s.id]))
        if finished == len(plan.runnable):
            clear_stale_error(run_dir)
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
