"""A sweep's cells run as submitit jobs (``--launcher local`` or ``slurm``; see
``harness.launch`` and docs/scale-out.md): submit the unfinished cells, wait (or not), then read
every finished cell back, against the baseline cell as a serial sweep does, into the same table.
"""

from __future__ import annotations

import json

from rich.markup import escape

from prunevid_bench.harness.evaluate import EvalResult, summarize_run
from prunevid_bench.harness.launch import ERROR_FILE, CellTask, record_jobs, still_queued, submit, wait_for
from prunevid_bench.harness.runs import back_up
from prunevid_bench.harness.sweep import (
    SweepResult,
    cell_folder,
    cell_meta,
    cell_status,
    frames_controls,
    report_sweep,
    write_sweep_json,
)


def run_as_jobs(base, cells, plan, sweep_dir, spec, controls, metric, options, meta, launch, console) -> SweepResult:
    """Submit the unfinished cells, wait, read every finished cell back; the frames controls
    follow once the baseline and the grid are done (with --no-wait: on a rerun)."""
    (sweep_dir / "cells").mkdir(parents=True, exist_ok=True)
    if options.force:  # as a serial sweep: the table and plot no longer hold; each cell backs up its own
        back_up(sweep_dir, ("summary.csv", "pareto.png"))
    write_sweep_json(sweep_dir, base, spec, controls, metric, cells)
    waited = submit_cells(cells, plan, sweep_dir, options, meta, launch, console)
    results, failed = read_cells(cells, plan, sweep_dir)
    if "frames" in controls and waited and not failed:
        extra = frames_controls(base, cells, results)
        cells = cells + extra
        write_sweep_json(sweep_dir, base, spec, controls, metric, cells)
        waited = submit_cells(extra, plan, sweep_dir, options, meta, launch, console)
        results, failed = read_cells(cells, plan, sweep_dir)
    if not waited:
        console.print(f"submitted; follow with the same command and --status. sweep folder: {sweep_dir}", soft_wrap=True)
        return SweepResult(sweep_dir, cells, [], None, failed={})
    for name, why in failed.items():
        console.print(f"[red]cell {escape(name)}[/]: {escape(why)}", highlight=False, soft_wrap=True)
    if "baseline" not in results:
        console.print("no table: the baseline cell has not finished; rerun the same command to retry it", soft_wrap=True)
        return SweepResult(sweep_dir, cells, [], None, failed=failed)
    return report_sweep(base, cells, results, plan, sweep_dir, spec, controls, metric, options.preset, console, failed)


def submit_cells(cells, plan, sweep_dir, options, meta, launch, console) -> bool:
    """Submit the cells not finished, running or queued; True once their jobs have ended (or
    nothing was submitted), False when submitted without waiting."""
    tasks = []
    for cell in cells:
        run_dir = sweep_dir / "cells" / cell_folder(cell.name)
        state = cell_status(run_dir, plan)
        if state == "running" or (state == "done" and not options.force) or still_queued(sweep_dir, cell.name):
            continue
        tasks.append(CellTask(cell.name, cell.config.to_dict(), plan, run_dir, options, cell_meta(meta, cell)))
    if not tasks:
        console.print("nothing to submit: every cell is finished, running or queued", soft_wrap=True)
        return True
    jobs = submit(launch, tasks, sweep_dir / "jobs")
    record_jobs(sweep_dir, launch, jobs)
    ids = ", ".join(sorted({str(job.job_id).split("_")[0] for _, job in jobs}))
    console.print(f"submitted {len(tasks)} cells to {launch.launcher} (job {ids})", highlight=False, soft_wrap=True)
    if not launch.wait:
        return False
    console.print("waiting for the jobs (logs in jobs/)", soft_wrap=True)
    outcomes = wait_for(jobs)
    for task in tasks:  # a job that died could not say why its cells did not finish: say it for them
        outcome = outcomes.get(task.name, "its job ended without a result")
        if outcome != "done" and not (task.run_dir / ERROR_FILE).is_file():
            task.run_dir.mkdir(parents=True, exist_ok=True)
            (task.run_dir / ERROR_FILE).write_text(json.dumps({"error": outcome}) + "\n")
    return True


def read_cells(cells, plan, sweep_dir) -> tuple[dict[str, EvalResult], dict[str, str]]:
    """The finished cells as results (summarised again, against the baseline cell as a serial
    sweep does); the others with their state."""
    results: dict[str, EvalResult] = {}
    failed: dict[str, str] = {}
    for cell in sorted(cells, key=lambda c: c.kind != "baseline"):  # the baseline first: the others compare to it
        run_dir = sweep_dir / "cells" / cell_folder(cell.name)
        state = cell_status(run_dir, plan)
        if state != "done":
            failed[cell.name] = state
            continue
        baseline = results["baseline"].records if cell.kind != "baseline" and "baseline" in results else None
        summary, records = summarize_run(run_dir, baseline)
        results[cell.name] = EvalResult(run_dir, summary, records, 0)
    return results, failed
