"""Sweeps as jobs through submitit: `--launcher local --workers 2` gives the serial sweep's cells,
`--status` shows each cell's state, a rerun submits only unfinished cells, a failed cell stays in
its cell, and the SLURM path writes one job array with the requested partition, GPUs and time
(sbatch faked; the jobs themselves run on submitit's debug executor)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("submitit")

from prunevid_bench.cli import EXIT_INCOMPLETE, app  # noqa: E402
from prunevid_bench.errors import PruneVidError  # noqa: E402
from prunevid_bench.harness import launch  # noqa: E402
from prunevid_bench.harness.launch import Launch, slurm_minutes  # noqa: E402
from prunevid_bench.harness.runlock import RunLock  # noqa: E402
from prunevid_bench.harness.runs import read_run_samples  # noqa: E402
from prunevid_bench.toy.world import generate_dataset  # noqa: E402

runner = CliRunner()
FAST = ["--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4"]
# What a cell's row must show whichever way it ran (timings differ from run to run).
ROW_KEYS = ("cell", "kind", "n", "accuracy", "unparsed", "errors", "agreement", "num_frames", "tokens_in",
            "tokens_after_visual_methods", "kept_tokens", "retention")
RECORD_KEYS = ("prediction", "generated_text", "tokens_after_stage1", "tokens_after", "prompt_tokens", "generated_tokens")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("toy"), 4, seed=3)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})  # --status tables whole


def sweep_args(toy: Path, out: Path, *more) -> list:
    return ["sweep", "tau", "--values", "tau=0.7,0.8", "--dataset", toy, *FAST, "--results-dir", out, "--json", *more]


def the_sweep(out: Path) -> Path:
    (sweep_dir,) = out.iterdir()
    return sweep_dir


def payload(res) -> dict:
    return json.loads(res.stdout[res.stdout.index("{"):])


def cell_records(sweep_dir: Path, cell: str) -> dict:
    return {i: {k: r[k] for k in RECORD_KEYS} for i, r in read_run_samples(sweep_dir / "cells" / cell).items()}


def test_local_workers_equal_the_serial_sweep_and_a_rerun_submits_only_unfinished_cells(toy, tmp_path):
    serial = invoke(*sweep_args(toy, tmp_path / "serial"))
    assert serial.exit_code == EXIT_INCOMPLETE, serial.output
    res = invoke(*sweep_args(toy, tmp_path / "local", "--launcher", "local", "--workers", "2"))
    assert res.exit_code == EXIT_INCOMPLETE, res.output
    assert "submitted 3 cells to local" in res.output
    rows = {r["cell"]: {k: r[k] for k in ROW_KEYS} for r in payload(res)["rows"]}
    assert rows == {r["cell"]: {k: r[k] for k in ROW_KEYS} for r in payload(serial)["rows"]}
    assert set(rows) == {"baseline", "tau=0.7", "tau=0.8"}
    local_dir, serial_dir = the_sweep(tmp_path / "local"), the_sweep(tmp_path / "serial")
    for cell in rows:
        assert cell_records(local_dir, cell) == cell_records(serial_dir, cell), cell
        summaries = [json.loads((d / "cells" / cell / "summary.json").read_text()) for d in (local_dir, serial_dir)]
        assert summaries[0]["accuracy"] == summaries[1]["accuracy"]
        assert summaries[0].get("agreement") == summaries[1].get("agreement")
    jobs = json.loads((local_dir / "launch.json").read_text())["cells"]
    assert jobs["baseline"]["job_id"] == jobs["tau=0.8"]["job_id"] != jobs["tau=0.7"]["job_id"]  # two workers

    status = invoke(*sweep_args(toy, tmp_path / "local", "--status"))
    assert status.exit_code == 0 and status.output.count("done") >= 3 and f"local {jobs['tau=0.7']['job_id']}" in status.output

    logs = {cell: (local_dir / "cells" / cell / "samples.jsonl").read_text() for cell in rows}
    for path in (local_dir / "cells" / "tau=0.8").iterdir():
        path.unlink()  # one cell lost: only it is submitted again
    again = invoke(*sweep_args(toy, tmp_path / "local", "--launcher", "local", "--workers", "2"))
    assert again.exit_code == EXIT_INCOMPLETE, again.output
    assert "submitted 1 cells to local" in again.output
    assert {r["cell"]: {k: r[k] for k in ROW_KEYS} for r in payload(again)["rows"]} == rows
    for cell in ("baseline", "tau=0.7"):
        assert (local_dir / "cells" / cell / "samples.jsonl").read_text() == logs[cell]  # not run again
    after = json.loads((local_dir / "launch.json").read_text())["cells"]
    assert after["baseline"] == jobs["baseline"] and after["tau=0.8"]["job_id"] != jobs["tau=0.8"]["job_id"]
    last = invoke(*sweep_args(toy, tmp_path / "local", "--launcher", "local", "--workers", "2"))
    assert "nothing to submit" in last.output and last.exit_code == EXIT_INCOMPLETE


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """``sbatch`` and ``srun`` on PATH: sbatch keeps the script it is given and answers as SLURM does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = tmp_path / "submitted"
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {scripts}/script.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_submits_one_job_array_with_the_requested_resources(toy, tmp_path, fake_slurm):
    out = tmp_path / "out"
    args = sweep_args(toy, out, "--launcher", "slurm", "--slurm-partition", "gpu-a100", "--slurm-gpus-per-cell", "1",
                      "--slurm-time", "4:00:00")
    res = invoke(*args, "--no-wait")
    assert res.exit_code == 0, res.output
    assert "submitted 3 cells to slurm (job 4242)" in res.output and "--status" in res.output
    script = (fake_slurm / "script.sh").read_text()
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --gpus-per-node=1", "#SBATCH --array=0-2%3",
                 "#SBATCH --time=240", "#SBATCH --nodes=1"):
        assert line in script.splitlines(), (line, script)
    sweep_dir = the_sweep(out)
    jobs = json.loads((sweep_dir / "launch.json").read_text())["cells"]
    assert sorted(j["job_id"] for j in jobs.values()) == ["4242_0", "4242_1", "4242_2"]
    status = invoke(*sweep_args(toy, out, "--status"))
    assert status.exit_code == 0 and status.output.count("new") == 3 and "slurm 4242_1" in status.output


def test_the_slurm_path_runs_cells_and_a_failed_cell_stays_in_its_cell(toy, tmp_path, monkeypatch, tiny_pipe):
    import prunevid_bench.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
    monkeypatch.setattr(launch, "SLURM_CLUSTER", "debug")  # submitit runs the same jobs in this process
    out = tmp_path / "out"
    args = ["sweep", "pruning_layer", "--values", "pruning_layer=1,99", "--dataset", toy, *FAST, "--limit", "2",
            "--results-dir", out, "--json", "--launcher", "slurm"]
    res = invoke(*args)
    assert res.exit_code == EXIT_INCOMPLETE, res.output
    data = payload(res)
    assert [r["cell"] for r in data["rows"]] == ["baseline", "pruning_layer=1"]  # the others went on
    assert set(data["failed"]) == {"pruning_layer=99"} and "pruning_layer" in data["failed"]["pruning_layer=99"]
    sweep_dir = the_sweep(out)
    error = json.loads((sweep_dir / "cells" / "pruning_layer=99" / "error.json").read_text())["error"]
    assert error.startswith("PruneVidError") and "99" in error
    status = invoke(*[a for a in args[:-2] if a != "--json"], "--status")
    assert "failed: PruneVidError" in status.output and status.output.count("done") >= 2
    cell = sweep_dir / "cells" / "pruning_layer=1"
    before = json.loads((cell / "summary.json").read_text())
    assert "agreement" in before and invoke("summarize", cell).exit_code == EXIT_INCOMPLETE
    assert json.loads((cell / "summary.json").read_text())["agreement"] == before["agreement"]  # with its baseline cell
    with RunLock(sweep_dir / "cells" / "baseline"):  # a cell being run shows as such and is not submitted again
        status = invoke(*[a for a in args[:-2] if a != "--json"], "--status")
        assert "│ running" in status.output and status.output.count("done") == 1
        again = invoke(*args)
    assert "submitted 1 cells to slurm" in again.output  # only the failed cell: the running one is left alone


def test_launch_options_are_checked():
    assert slurm_minutes("4:00:00") == 240 and slurm_minutes("90") == 90 and slurm_minutes("1-00:30:00") == 1470
    assert slurm_minutes("30:30") == 31
    for bad, message in [(dict(launcher="pbs"), "--launcher must be one of"),
                         (dict(workers=2), "--workers applies to --launcher local"),
                         (dict(wait=False), "--no-wait needs --launcher local or slurm"),
                         (dict(launcher="local", slurm_partition="p"), "--slurm-partition applies"),
                         (dict(launcher="slurm", slurm_time="soon"), "is not a SLURM time")]:
        with pytest.raises(PruneVidError, match=message):
            Launch(**bad)


def test_slurm_without_a_cluster_is_one_line(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    res = invoke(*sweep_args(toy, tmp_path / "out", "--launcher", "slurm"))
    assert res.exit_code == 2 and "--launcher slurm" in res.output and "--launcher local" in res.output


def test_local_workers_write_and_reuse_the_disk_feature_cache(toy, tmp_path):
    features = tmp_path / "features"
    args = ["sweep", "tau", "--values", "tau=0.7", "--dataset", toy, *FAST, "--limit", "2", "--launcher", "local",
            "--feature-cache", features, "--json", "--warmup", "0"]  # a warm-up would fill the cache
    first = invoke(*args, "--results-dir", tmp_path / "first")
    assert first.exit_code in (0, EXIT_INCOMPLETE), first.output
    entries = sorted(features.glob("*.safetensors"))
    assert len(entries) == 2 and all(e.stat().st_mode & 0o777 == 0o600 for e in entries)
    cells = the_sweep(tmp_path / "first") / "cells"
    assert [r["vision_cached"] for r in read_run_samples(cells / "baseline").values()] == [False, False]
    assert [r["vision_cached"] for r in read_run_samples(cells / "tau=0.7").values()] == [True, True]  # job's memory
    second = invoke(*args, "--results-dir", tmp_path / "second")  # a new job: every sample from the disk
    assert second.exit_code in (0, EXIT_INCOMPLETE), second.output
    for cell in ("baseline", "tau=0.7"):
        records = read_run_samples(the_sweep(tmp_path / "second") / "cells" / cell)
        assert [r["vision_cached"] for r in records.values()] == [True, True], cell
        assert {i: {k: r[k] for k in RECORD_KEYS} for i, r in records.items()} == cell_records(cells.parent, cell)
    assert sorted(features.glob("*")) == entries  # no temporary file left behind


def die_by_signal_9(tasks):
    """A job function whose process is killed as the kernel's out-of-memory killer (or a user's
    kill -9) kills it, after a progress line."""
    import signal

    print("cell baseline: 3/4 done", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with_code_3(tasks):
    os._exit(3)


def test_a_killed_local_job_is_reported_as_killed(tmp_path):
    """The local launcher's job (run_watched) on submitit's local executor, its cells' work killed
    by signal 9: both cells say so, not the last progress line."""
    submitit = pytest.importorskip("submitit")
    tasks = [launch.CellTask(name, {}, None, tmp_path / name, None, {}) for name in ("baseline", "tau=0.7")]
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    job = executor.submit(launch.run_watched, die_by_signal_9, tasks)
    outcomes = launch.wait_for([(["baseline", "tau=0.7"], job)])
    assert outcomes == {"baseline": "killed (signal 9, SIGKILL)", "tau=0.7": "killed (signal 9, SIGKILL)"}
    assert launch.run_watched(exit_with_code_3, tasks[:1]) == {"baseline": "its worker exited with code 3"}


def test_failure_reasons_name_memory_and_slurm_states():
    class FakeJob:
        def __init__(self, state):
            self.state = state

    log = "Job 7 has not produced any output (state: FAILED)\nError stream produced:\ncell a: 2/4 done"
    assert launch.failure_reason(FakeJob("FAILED"), RuntimeError(log)) == "cell a: 2/4 done"
    assert launch.failure_reason(FakeJob("OUT_OF_MEMORY"), RuntimeError(log)) == "out of memory"
    assert launch.failure_reason(FakeJob("FAILED"), RuntimeError(log + "\ntorch.OutOfMemoryError: CUDA")) == "out of memory"
    assert launch.failure_reason(FakeJob("TIMEOUT"), RuntimeError(log)) == "the time limit was reached (--slurm-time)"
    assert launch.failure_reason(FakeJob("CANCELLED by 0"), RuntimeError(log)) == "cancelled (SLURM)"


def test_a_finished_cell_sheds_a_stale_error_file(toy, tmp_path, tiny_pipe):
    from rich.console import Console

    from prunevid_bench.config import build_config
    from prunevid_bench.harness.evaluate import evaluate_dataset
    from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
    from prunevid_bench.harness.sweep import cell_status

    cfg = build_config(None, None, {"model.name": "tiny", "video.num_frames": 4, "generation.max_new_tokens": 1})
    result = evaluate_dataset(cfg, DatasetSpec(toy, limit=1), EvalOptions(results_dir=tmp_path), pipeline=tiny_pipe,
                              console=Console(quiet=True))
    from prunevid_bench.harness.evaluate import plan_dataset

    (result.run_dir / launch.ERROR_FILE).write_text(json.dumps({"error": "job 12 failed: its controller died"}) + "\n")
    assert cell_status(result.run_dir, plan_dataset(DatasetSpec(toy, limit=1))) == "done"
    assert not (result.run_dir / launch.ERROR_FILE).exists()
