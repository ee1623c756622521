"""Where a sweep's cells run: in this process one after another (``serial``, the default), or as
jobs through submitit (``pip install 'prunevid-bench[slurm]'``):

- ``slurm``: one job array, one array task per unfinished cell, each with the requested partition,
  GPUs and time limit (``--slurm-partition``, ``--slurm-gpus-per-cell``, ``--slurm-time``).
- ``local``: ``--workers N`` processes on this machine through submitit's local executor; worker
  w takes every N-th unfinished cell from w, and is given GPU w alone (``CUDA_VISIBLE_DEVICES``)
  when there are GPUs.

Both run the same job function, ``run_cells``: each cell is an ordinary run folder (locked,
resumable sample by sample) evaluated with ``evaluate_plan``, with the sweep's vision-feature
cache (``--feature-cache``: a folder every job reads and writes, entries written whole and renamed
into place); a cell that fails writes its error to
``<cell>/error.json`` and the job goes on with its next cell. The sweep waits for the jobs, or with
``--no-wait`` returns once they are submitted; ``launch.json`` keeps the job id of each cell. A
rerun of the same command submits only the cells not finished, not running (their lock is held)
and, on SLURM, not still queued. submitit's files (pickled jobs, logs) are in ``<sweep>/jobs/``.

See docs/scale-out.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunevid_bench.errors import PruneVidError

LAUNCHERS = ("serial", "local", "slurm")
ERROR_FILE = "error.json"
LAUNCH_FILE = "launch.json"
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local default is 2 minutes: a cell may take days
SLURM_CLUSTER = "slurm"  # the submitit executor of --launcher slurm (tests run its path on "debug")
QUEUED = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


@dataclass(frozen=True)
class Launch:
    """How the cells of a sweep are run."""

    launcher: str = "serial"  # serial | local | slurm
    workers: int = 1  # local: parallel processes, one device each
    slurm_partition: str | None = None
    slurm_gpus_per_cell: int = 1
    slurm_time: str = "4:00:00"  # per cell: minutes, MM:SS, H:MM:SS or D-H:MM:SS
    wait: bool = True  # False: return once the jobs are submitted

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise PruneVidError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got '{self.launcher}'")
        if self.workers < 1:
            raise PruneVidError("--workers must be at least 1")
        if self.workers != 1 and self.launcher != "local":
            raise PruneVidError("--workers applies to --launcher local; SLURM runs as many cells as it can at once")
        if self.launcher != "slurm" and self.slurm_partition is not None:
            raise PruneVidError("--slurm-partition applies to --launcher slurm")
        if self.launcher == "serial" and not self.wait:
            raise PruneVidError("--no-wait needs --launcher local or slurm: the serial sweep runs in this process")
        if self.slurm_gpus_per_cell < 0:
            raise PruneVidError("--slurm-gpus-per-cell must be 0 or more")
        slurm_minutes(self.slurm_time)

    @property
    def parallel(self) -> bool:
        return self.launcher != "serial"


def slurm_minutes(text: str) -> int:
    """SLURM's time formats as whole minutes (rounded up): ``90``, ``30:00``, ``4:00:00``, ``1-12:00:00``."""
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        day_count = int(days) if days else 0
    except ValueError:
        parts, day_count = [], 0
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
        raise PruneVidError(f"--slurm-time '{text}' is not a SLURM time; use e.g. 4:00:00 or 90 (minutes)")
    seconds = {1: lambda m: m * 60, 2: lambda m, s: m * 60 + s, 3: lambda h, m, s: h * 3600 + m * 60 + s}[len(parts)](*parts)
    return max(1, day_count * 1440 + -(-seconds // 60))


@dataclass
class CellTask:
    """One cell, as a job receives it: everything ``evaluate_plan`` needs, picklable."""

    name: str
    config: dict[str, Any]  # RunConfig.to_dict()
    plan: Any  # DatasetPlan
    run_dir: Path
    options: Any  # EvalOptions
    meta: dict[str, Any]


def run_cells(tasks: list[CellTask]) -> dict[str, str]:
    """The job function: run each cell in turn; one model load shared by the job's cells (a sweep
    varies no ``model.*`` key), and one vision-feature cache, as a serial sweep's (its memory part
    per job, its ``--feature-cache`` folder shared by every job). Returns each cell's outcome,
    ``done`` or its error."""
    from rich.console import Console

    from prunevid_bench.config import from_dict
    from prunevid_bench.harness.evaluate import evaluate_plan, pipeline_loader, with_feature_cache
    from prunevid_bench.harness.sweep import SWEEP_FEATURE_CACHE_GB

    outcomes: dict[str, str] = {}
    get_pipe = None
    if tasks:
        get_pipe = with_feature_cache(pipeline_loader(from_dict(tasks[0].config)), tasks[0].options,
                                      default_gb=SWEEP_FEATURE_CACHE_GB)
    console = Console(force_terminal=False)  # into the job's log
    for task in tasks:
        console.print(f"cell {task.name}", highlight=False, soft_wrap=True)
        error_path = Path(task.run_dir) / ERROR_FILE
        try:
            evaluate_plan(from_dict(task.config), task.plan, get_pipe, Path(task.run_dir), task.options,
                          meta=task.meta, console=console, quiet=True)
        except Exception as exc:  # noqa: BLE001 - a failure stays in its cell; the job goes on
            outcomes[task.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            Path(task.run_dir).mkdir(parents=True, exist_ok=True)
            error_path.write_text(json.dumps({"error": outcomes[task.name], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
            console.print(f"cell {task.name} failed: {outcomes[task.name]}", highlight=False, soft_wrap=True)
            continue
        error_path.unlink(missing_ok=True)
        outcomes[task.name] = "done"
    return outcomes


def run_watched(job_function, tasks: list) -> dict[str, str]:
    """The local job: ``job_function(tasks)`` (``run_cells``) in a child process, so that a death
    by a signal (kill -9, the kernel's out-of-memory killer) is seen and named. submitit's local
    controller does not keep its task's exit status: without the child, a killed job could only
    be told by its last log line. Returns the child's outcomes; each cell it left without one gets
    ``killed (signal N, NAME)`` or ``its worker exited with code N``."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: safe with CUDA
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_outcomes, args=(job_function, tasks, send))
    child.start()
    send.close()
    try:
        outcomes = receive.recv()
    except EOFError:  # it died before it could answer
        outcomes = {}
    child.join()
    code = child.exitcode or 0
    why = signal_reason(-code) if code < 0 else f"its worker exited with code {code}"
    return {t.name: outcomes.get(t.name, why) for t in tasks}


def _send_outcomes(job_function, tasks: list, send) -> None:
    send.send(job_function(tasks))
    send.close()


def signal_reason(number: int) -> str:
    import signal

    try:
        return f"killed (signal {number}, {signal.Signals(number).name})"
    except ValueError:
        return f"killed (signal {number})"


def _submitit():
    try:
        import submitit
    except ImportError:
        raise PruneVidError("--launcher local and slurm run through submitit: pip install 'prunevid-bench[slurm]'") from None
    return submitit


def submit(launch: Launch, tasks: list[CellTask], folder: Path) -> list[tuple[list[str], Any]]:
    """Submit ``tasks`` as jobs; return (cell names, job) for each job."""
    submitit = _submitit()
    if launch.launcher == "local":
        import torch

        gpus = torch.cuda.device_count()
        if gpus and launch.workers > gpus:
            raise PruneVidError(f"--workers {launch.workers} but {gpus} GPUs are visible; one worker per GPU")
        executor = submitit.LocalExecutor(folder=folder)
        jobs = []
        for w in range(min(launch.workers, len(tasks))):
            mine = tasks[w::launch.workers]
            executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=1 if gpus else 0,
                                       visible_gpus=(w,) if gpus else ())
            jobs.append(([t.name for t in mine], executor.submit(run_watched, run_cells, mine)))
        return jobs
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=SLURM_CLUSTER)
    except RuntimeError as exc:  # no srun on this machine
        raise PruneVidError(f"--launcher slurm: {exc}; run on a SLURM login node, or use --launcher local") from None
    executor.update_parameters(name="prunevid-sweep", timeout_min=slurm_minutes(launch.slurm_time), nodes=1,
                               tasks_per_node=1, gpus_per_node=launch.slurm_gpus_per_cell,
                               slurm_partition=launch.slurm_partition)
    jobs = executor.map_array(run_cells, [[t] for t in tasks])  # one array: a task per cell
    return [([t.name], job) for t, job in zip(tasks, jobs)]


def record_jobs(sweep_dir: Path, launch: Launch, jobs: list[tuple[list[str], Any]]) -> None:
    """launch.json: the job of each cell, kept across reruns (a cell not resubmitted keeps its job)."""
    path = sweep_dir / LAUNCH_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    cells = data.get("cells", {})
    for names, job in jobs:
        for name in names:
            cells[name] = {"launcher": launch.launcher, "job_id": str(job.job_id),
                           "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps({"folder": str(sweep_dir / "jobs"), "cells": cells}, indent=2) + "\n")


def recorded_job(sweep_dir: Path, cell: str) -> dict[str, str] | None:
    path = sweep_dir / LAUNCH_FILE
    return json.loads(path.read_text()).get("cells", {}).get(cell) if path.is_file() else None


def still_queued(sweep_dir: Path, cell: str) -> bool:
    """Whether the cell's SLURM job is still pending or running, as ``sacct`` says (False when it
    cannot be asked)."""
    job = recorded_job(sweep_dir, cell)
    if not job or job["launcher"] != "slurm":
        return False
    try:
        submitit = _submitit()
        return submitit.SlurmJob(sweep_dir / "jobs", job["job_id"]).state.split()[0] in QUEUED
    except Exception:  # noqa: BLE001 - no sacct here (another machine, or the job is too old to list)
        return False


def clear_stale_error(run_dir: Path) -> None:
    """A cell found finished keeps no ``error.json`` (its job's controller may have died, and
    been reported, while the cell itself finished)."""
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)


def cell_error(run_dir: Path) -> str | None:
    path = Path(run_dir) / ERROR_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["error"]
    except (ValueError, KeyError):
        return "unreadable error.json"


def wait_for(jobs: list[tuple[list[str], Any]]) -> dict[str, str]:
    """Each cell's outcome once its job has ended; a job that died takes its cells' error with it."""
    outcomes: dict[str, str] = {}
    for names, job in jobs:
        try:
            outcomes.update(job.result())
        except Exception as exc:  # noqa: BLE001 - the job itself died (killed, out of memory, timed out)
            outcomes.update({name: f"job {job.job_id} failed: {failure_reason(job, exc)}" for name in names})
    return outcomes


MEMORY_WORDS = ("OutOfMemoryError", "out of memory", "MemoryError", "oom-kill", "oom_kill", "OUT_OF_MEMORY")


def failure_reason(job, exc: BaseException) -> str:
    """Why a job ended without a result, in words: ``out of memory``, ``killed (signal 9,
    SIGKILL)``, SLURM's time limit or cancellation; else the last line submitit reported. (A
    local job names its own deaths: ``run_watched``.)"""
    text = str(exc)
    process = getattr(job, "_process", None)  # a local job's worker process
    code = process.poll() if process is not None else None
    try:
        state = str(job.state).split()[0] if process is None else ""  # SLURM's word (sacct)
    except Exception:  # noqa: BLE001 - no sacct here
        state = ""
    if state == "OUT_OF_MEMORY" or any(word in text for word in MEMORY_WORDS):
        return "out of memory" + (f" (signal {-code})" if code is not None and code < 0 else "")
    if code is not None and code < 0:
        return signal_reason(-code)
    if state == "TIMEOUT":
        return "the time limit was reached (--slurm-time)"
    if state in ("CANCELLED", "NODE_FAIL", "PREEMPTED"):
        return f"{state.lower().replace('_', ' ')} (SLURM)"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
