"""``prunevid sweep``: a grid of configs over one dataset, each cell a resumable dataset run.

Cells, in the order they run:
- ``baseline``: the base config with every stage off. Always included: agreement and deltas
  are measured against it.
- grid cells: the Cartesian product of the swept values over the base config (``--preset``,
  ``--config``, ``--set``). Sweeping a Stage-1 key (``stage1.*`` other than ``enabled``) switches
  Stage 1 on in every grid cell, and a Stage-2 key switches Stage 2 on, so ``prunevid sweep tau``
  measures merging even from a preset that has it off. Sweep ``stage1.enabled`` itself to
  override that.
- ``--controls random``: each grid cell with Stage 2 on, again with ``stage2.score=random`` (the
  same number of tokens kept, chosen at random). Cells without Stage 2 get none.
- ``--controls frames``: the baseline with fewer frames, so that its visual tokens match a grid
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

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from prunevid_bench.config import RunConfig, from_dict, load_yaml, merge_into, overrides_to_layer, resolve_key
from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.answers import agreement, paired_difference, paired_short
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
from prunevid_bench.harness.tables import Column, FittedTable
from prunevid_bench.report import slug, write_json

SWEEP_DIR = Path(__file__).resolve().parents[1] / "sweeps"  # package data, like the presets (config.PRESET_DIR)

CONTROLS = ("random", "frames")
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
    budgets: tuple[float, ...] = ()  # ... each run at every kept fraction B (its own knob set by config.budget_overrides)


@dataclass
class Cell:
    name: str
    kind: str  # baseline | grid | control_random | control_frames
    overrides: dict[str, Any]  # dotted keys applied to the base config
    config: RunConfig
    matches: list[str] = field(default_factory=list)  # frames control: the cells whose budget it matches
    method: str | None = None  # matched-budget cells: the method and the asked budget
    budget: float | None = None


@dataclass
class SweepResult:
    sweep_dir: Path
    cells: list[Cell]
    rows: list[dict[str, Any]]
    plot: Path | None
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell name -> its summary.json
    failed: dict[str, str] = field(default_factory=dict)  # cell name -> its error or state (launched cells)


# ---------------------------------------------------------------------------------------------
# The grid


def short_name(key: str) -> str:
    """``stage1.tau`` -> ``tau`` when the short name is unambiguous, else the dotted key."""
    short = key.split(".", 1)[1]
    try:
        return short if resolve_key(short) == key else key
    except PruneVidError:
        return key


def parse_values(specs: list[str]) -> dict[str, list[Any]]:
    """``["tau=0.7,0.8", "stage2.score=prunevid,random"]`` -> {dotted key: [values]} (YAML-typed)."""
    out: dict[str, list[Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise PruneVidError(f"--values expects name=v1,v2,..., got '{spec}'")
        name, raw = spec.split("=", 1)
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not values:
            raise PruneVidError(f"--values {name}: no values given")
        out[resolve_key(name.strip())] = values
    return out


def load_sweep_file(path: Path) -> dict[str, list[Any]]:
    """A sweep file: ``grid: {name: [values], ...}`` (short or dotted names), plus a description.

    A name that is not a file but names a shipped sweep (``stage1``) reads that one, so a wheel
    install, which has no ``sweeps/`` folder to point at, can use them too."""
    shipped = SWEEP_DIR / f"{path}.yaml"
    if not Path(path).is_file() and Path(path).name == str(path) and shipped.is_file():
        path = shipped
    data = load_yaml(Path(path))
    grid = data.get("grid") if isinstance(data, dict) else None
    if not isinstance(grid, dict) or not grid:
        raise PruneVidError(f"{path}: expected a 'grid' mapping of parameter: [values]")
    out = {}
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise PruneVidError(f"{path}: grid.{name} must be a non-empty list of values")
        out[resolve_key(str(name))] = values
    return out


def shipped_values(key: str) -> list[Any] | None:
    """Values for ``key`` from the sweep files shipped in ``sweeps/`` (alphabetical order), so
    ``prunevid sweep tau cluster_ratio`` works without ``--values``."""
    for path in sorted(SWEEP_DIR.glob("*.yaml")):
        grid = load_sweep_file(path)
        if key in grid:
            return grid[key]
    return None


def dedupe_values(key: str, values: list[Any], notes: list[str] | None = None) -> list[Any]:
    """``values`` without repeats, in order (two equal values would share one cell folder). Each
    repeat dropped is said in ``notes``. ``True`` and ``1`` are different values here."""
    kept: list[Any] = []
    for value in values:
        if any(isinstance(v, bool) == isinstance(value, bool) and v == value for v in kept):
            if notes is not None:
                notes.append(f"{short_name(key)}={_value_text(value)} is given more than once; it runs once")
            continue
        kept.append(value)
    return kept


def grid_spec(params: list[str], values: list[str] | None, sweep_file: Path | None,
              notes: list[str] | None = None) -> dict[str, list[Any]]:
    """The swept keys and their values: a sweep file overlaid by ``--values``, restricted to
    PARAMS when given. Repeated values are dropped, with a line in ``notes``."""
    spec = load_sweep_file(sweep_file) if sweep_file else {}
    given = parse_values(values or [])
    spec.update(given)
    if params:
        keys = [resolve_key(p) for p in params]
        extra = [k for k in given if k not in keys]
        if extra:
            raise PruneVidError(f"--values given for {', '.join(extra)}, which is not among the swept PARAMs")
        missing = [k for k in keys if k not in spec]
        for key in missing[:]:  # no values given: take them from the first shipped sweep file listing the key
            shipped = shipped_values(key)
            if shipped is not None:
                spec[key] = shipped
                missing.remove(key)
        if missing:
            raise PruneVidError(f"no values for {missing[0]}: give --values {short_name(missing[0])}=v1,v2 or a --sweep-file that lists it")
        spec = {k: spec[k] for k in keys}
    if not spec:
        raise PruneVidError("nothing to sweep: name PARAMs with --values name=v1,v2, or give --sweep-file")
    for key in spec:
        if key.startswith("model."):
            raise PruneVidError(f"{key} cannot be swept: a sweep loads one model; run one sweep per model")
        if key.startswith("runtime."):
            raise PruneVidError(f"{key} cannot be swept: it is set once per process (--threads)")
    return {key: dedupe_values(key, vals, notes) for key, vals in spec.items()}


def with_overrides(base: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    return from_dict(merge_into(base.to_dict(), overrides_to_layer(overrides), "sweep"))


def _value_text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def expand_cells(base: RunConfig, spec: dict[str, list[Any]], controls: list[str] | None = None) -> list[Cell]:
    """The baseline, every grid cell and the random controls (frames controls come later)."""
    controls = list(dict.fromkeys(controls or []))  # a control named twice runs once
    for control in controls:
        if control not in CONTROLS:
            raise PruneVidError(f"unknown control '{control}'; use {' or '.join(CONTROLS)}")
    from prunevid_bench.methods import method_sections

    sections = method_sections()
    off = {"stage1.enabled": False, "stage2.enabled": False}
    # any other method the base config has on is off in the baseline too
    off.update({f"{s}.enabled": False for s in sections if s not in ("stage1", "stage2") and base.section(s).enabled})
    cells = [Cell("baseline", "baseline", off, with_overrides(base, off))]
    switch_on = {f"{k.split('.')[0]}.enabled": True for k in spec
                 if k.split(".")[0] in sections and not k.endswith(".enabled")}
    for combo in itertools.product(*spec.values()):
        chosen = dict(zip(spec, combo))
        overrides = {**switch_on, **chosen}  # an explicitly swept .enabled wins
        name = ",".join(f"{short_name(k)}={_value_text(v)}" for k, v in chosen.items())
        cells.append(Cell(name, "grid", overrides, with_overrides(base, overrides)))
    if "random" in (controls or []):
        for cell in [c for c in cells if c.kind == "grid"]:
            if cell.config.stage2.enabled and cell.config.stage2.score != "random":
                overrides = {**cell.overrides, "stage2.score": "random"}
                cells.append(Cell(f"{cell.name}+random", "control_random", overrides, with_overrides(base, overrides)))
    return cells


# PruneVid's lines in a matched-budget sweep: Stages 1 and 2 on, with these settings on top.
PRUNEVID_LINES = {"prunevid": {}, "prunevid-vision": {"stage1.space": "vision"}}


def method_budget_cells(base: RunConfig, methods: list[str], budgets: list[float]) -> list[Cell]:
    """Matched budgets: the baseline (every method off) and one cell per method and budget, with
    only that method on (``prunevid``: Stages 1 and 2, Stage 1 with the base's settings;
    ``prunevid-vision``: the same with Stage 1 in the vision encoder's space) and its knob set to
    keep the fraction B (``config.budget_overrides``)."""
    from prunevid_bench.config import budget_overrides
    from prunevid_bench.methods import all_methods, get_method

    if not budgets:
        raise PruneVidError("--methods needs --budgets B1,B2,... (kept fractions in (0, 1])")
    off = {f"{m.section}.enabled": False for m in all_methods()}
    cells = [Cell("baseline", "baseline", off, with_overrides(base, off))]
    for name in dict.fromkeys(methods):
        sections = ["stage1", "stage2"] if name in PRUNEVID_LINES else [get_method(name).section]
        on = {**off, **{f"{s}.enabled": True for s in sections}, **PRUNEVID_LINES.get(name, {})}
        for budget in dict.fromkeys(budgets):
            overrides = {**on, **budget_overrides(with_overrides(base, on), float(budget))}
            cells.append(Cell(f"{name},budget={_value_text(budget)}", "method", overrides, with_overrides(base, overrides),
                              method=name, budget=float(budget)))
    return cells


def parse_method_grid(methods: str | None, budgets: str | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``--methods a,b --budgets 0.1,0.5`` -> (names, fractions), each checked."""
    if methods is None:
        if budgets is not None:
            raise PruneVidError("--budgets needs --methods (e.g. --methods prunevid,tome)")
        return (), ()
    from prunevid_bench.methods import get_method

    names = tuple(n.strip() for n in methods.split(",") if n.strip())
    for name in names:
        if name not in PRUNEVID_LINES:
            get_method(name)  # unknown names: did you mean
    try:
        values = tuple(float(b) for b in (budgets or "").split(",") if b.strip())
    except ValueError:
        raise PruneVidError(f"--budgets expects fractions like 0.1,0.25,0.5, got '{budgets}'") from None
    for value in values:
        if not 0.0 < value <= 1.0:
            raise PruneVidError(f"--budgets values must be in (0, 1], got {value}")
    return names, values


def frames_controls(base: RunConfig, cells: list[Cell], results: dict[str, EvalResult]) -> list[Cell]:
    """Baseline runs with fewer frames, one per distinct count matching a grid cell's kept tokens."""
    baseline = results["baseline"].summary["metrics"]
    if "tokens_before_stage1" not in baseline or "num_frames" not in baseline:
        return []
    frames_now = baseline["num_frames"]["median"]
    per_step = baseline["tokens_before_stage1"]["median"] / max(1.0, frames_now / 2)  # tokens per 2 frames
    wanted: dict[int, list[str]] = {}
    for cell in cells:
        metrics = results[cell.name].summary["metrics"] if cell.name in results else {}
        if cell.kind != "grid" or "tokens_after" not in metrics:
            continue
        frames = 2 * max(1, round(metrics["tokens_after"]["median"] / per_step))
        if frames < frames_now:
            wanted.setdefault(frames, []).append(cell.name)
    out = []
    for frames in sorted(wanted):
        overrides = {"stage1.enabled": False, "stage2.enabled": False, "video.num_frames": frames, "video.fps": None}
        out.append(Cell(f"frames={frames}", "control_frames", overrides, with_overrides(base, overrides), wanted[frames]))
    return out


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
             "overrides": " ".join(f"{short_name(k)}={_value_text(v)}" for k, v in cell.overrides.items()),
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
        if "stage2.pruning_layer" in spec:  # the layer the model resolved, beside the value as swept
            row[short_name("stage2.pruning_layer")] = res.summary.get("pruning_layer")
            row["pruning_layer_spec"] = cell.config.stage2.pruning_layer if cell.config.stage2.enabled else None
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
    grid = " × ".join(f"{short_name(k) if '.' in k else k} {{{', '.join(_value_text(v) for v in values)}}}" for k, values in spec.items())
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
        Column("TTFT", lambda r: fmt_seconds(r["ttft_s"]), rank=1, note="TTFT: median"),
        Column("speed-up", _speedup, rank=3, note="speed-up: median over questions of TTFT(baseline) / TTFT(cell), "
               "with p25-p75 (--interleave measures each pair under the same load)"),
        Column("front", _front, rank=2, note=f"front: on the Pareto front of {metric} against kept tokens / TTFT"),
        Column("Δacc (p)", lambda r: paired_short(r.get("paired_difference"), r.get("mcnemar_p")), rank=3,
               note="Δacc: paired difference from the baseline cell in points, p: exact McNemar"),
        Column("agree", lambda r: fmt_pct(r["agreement"]), rank=3, note="agree: with the baseline cell"),
        Column("kept", lambda r: fmt_pct(r["retention"]), rank=4, note="kept: of the visual tokens in"),
        Column("n", lambda r: str(r["n"]), rank=5),
        Column("KV", lambda r: human_bytes(r["kv_cache_bytes"]), rank=6),
        Column("dec tok/s", lambda r: _count(r["decode_tokens_per_s"], 1), rank=7),
        Column("peak mem", lambda r: human_bytes(r["peak_memory_bytes"]), rank=8),
    ]
    return FittedTable(columns, rows, title=title, full_table="every column: summary.csv")
