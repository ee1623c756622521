"""A dataset run split over processes (torchrun, or RANK/WORLD_SIZE set by hand): each sample
exactly once, the merged summary equal to one process's, resume across world sizes, a killed
rank losing only its sample in flight, and `prunevid summarize` at any time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import EXIT_INCOMPLETE, app
from prunevid_bench.config import build_config
from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.evaluate import evaluate_plan, plan_dataset
from prunevid_bench.harness.runs import read_run_samples, read_samples, sample_logs
from prunevid_bench.harness.shard import Shard
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()
NO_WARMUP = EvalOptions(warmup=0)  # these tests count model calls
FAST = ["--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4", "--warmup", "0"]  # no warm-up: these count model calls
SRC = str(Path(__file__).resolve().parents[1] / "src")
# What must not depend on how the run was split: the answer and every measured token count.
SAME = ("prediction", "parse_status", "generated_text", "correct", "tokens_before_stage1", "tokens_after_stage1",
        "tokens_after", "prompt_tokens", "llm_prefill_tokens", "generated_tokens")
SPLIT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("toy"), 20, seed=3)


def plain_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SPLIT_VARS}
    return {**env, "PYTHONPATH": SRC, **more}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "prunevid_bench", *map(str, args)]


def run_args(toy: Path, out: Path) -> list:
    return ["run", "--dataset", toy, *FAST, "--results-dir", out]


def the_run_dir(out: Path) -> Path:
    (run_dir,) = out.iterdir()
    return run_dir


def logged_ids(run_dir: Path) -> list[str]:
    """Every id as often as a log holds it (a torn last line is no row)."""
    return [i for path in sample_logs(run_dir) for i in read_samples(path)]


@pytest.fixture
def calls(monkeypatch, tiny_pipe):
    """The CLI's model is the session's tiny pipeline, and model calls are counted."""
    import prunevid_bench.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
    for name in SPLIT_VARS:
        monkeypatch.delenv(name, raising=False)

    class Counter:
        n = 0

    original = Pipeline.run

    def counted(self, *args, **kwargs):
        Counter.n += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "run", counted)
    return Counter


def test_shards_are_disjoint_and_cover_every_question():
    items = list(range(11))
    for world in (1, 2, 3, 4):
        parts = [Shard(r, world).take(items) for r in range(world)]
        assert sorted(sum(parts, [])) == items and parts[0][:2] == ([0, world] if world > 1 else [0, 1])
    assert Shard.from_env({}) == Shard()
    assert Shard.from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"}) == Shard(1, 3, 1)
    assert Shard(1, 3).log_name == "samples.rank-1.jsonl" and Shard().log_name == "samples.jsonl"
    assert Shard(0, 2).device("cpu") == "cpu" and Shard().device("auto") == "auto"
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(PruneVidError, match="torchrun"):
            Shard.from_env(bad)


def test_torchrun_on_two_cpu_processes_equals_one_process(toy, tmp_path):
    split, single = tmp_path / "split", tmp_path / "single"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "prunevid_bench", *map(str, run_args(toy, split))]
    procs = [subprocess.Popen(torchrun, env=plain_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
             subprocess.Popen(cli(*run_args(toy, single)), env=plain_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert procs[1].returncode == EXIT_INCOMPLETE, outputs[1]  # the tiny model leaves replies unparsed
    assert f"exitcode  : {EXIT_INCOMPLETE}" in outputs[0] and "rank      : 1" not in outputs[0], outputs[0]
    split_dir, single_dir = the_run_dir(split), the_run_dir(single)
    assert split_dir.name == single_dir.name  # one run, whatever the split
    assert sorted(p.name for p in sample_logs(split_dir)) == ["samples.rank-0.jsonl", "samples.rank-1.jsonl"]
    ids = logged_ids(split_dir)
    assert len(ids) == 20 and len(set(ids)) == 20  # each sample exactly once
    split_rows, single_rows = read_run_samples(split_dir), read_run_samples(single_dir)
    assert set(split_rows) == set(single_rows)
    for sample_id, row in single_rows.items():
        assert {k: split_rows[sample_id][k] for k in SAME} == {k: row[k] for k in SAME}, sample_id
    rank_of = {i: r for r in (0, 1) for i in read_samples(split_dir / f"samples.rank-{r}.jsonl")}
    order = list(single_rows)  # file order
    assert all(rank_of[i] == n % 2 for n, i in enumerate(order))  # rank r took every 2nd from r

    merged, alone = (json.loads((d / "summary.json").read_text()) for d in (split_dir, single_dir))
    assert merged["complete"] and merged["accuracy"] == alone["accuracy"]
    assert {k: merged["metrics"][k] for k in ("visual_tokens_kept", "prompt_tokens")} == \
           {k: alone["metrics"][k] for k in ("visual_tokens_kept", "prompt_tokens")}
    assert merged["ranks"] == [{"world_size": 2, "rank": r, "device": "cpu", "n": 10} for r in (0, 1)]
    assert "ranks" not in alone
    shards = json.loads((split_dir / "environment.json").read_text())["shards"]
    assert shards["world_size"] == 2 and {k: v["device"] for k, v in shards["ranks"].items()} == {"0": "cpu", "1": "cpu"}


def test_a_rerun_with_another_world_size_redoes_nothing(toy, tmp_path, tiny_pipe, calls):
    plan = plan_dataset(DatasetSpec(toy, limit=12))
    cfg = build_config(None, None, {"model.name": "tiny", "video.num_frames": 4, "generation.max_new_tokens": 2})
    run_dir = tmp_path / "run"
    first = evaluate_plan(cfg, plan, tiny_pipe, run_dir, NO_WARMUP, quiet=True, shard=Shard(0, 2))  # rank 1 never ran
    assert first.ran == 6 and not first.summary["complete"] and first.summary["counts"]["evaluated"] == 6
    calls.n = 0
    ran = [evaluate_plan(cfg, plan, tiny_pipe, run_dir, NO_WARMUP, quiet=True, shard=Shard(r, 3)).ran for r in range(3)]
    # Rank r of 3 takes r, r+3, r+6, r+9; rank 0 of 2 did the even ones: two are left to each.
    assert calls.n == sum(ran) == 6 and ran == [2, 2, 2]
    ids = logged_ids(run_dir)
    assert len(ids) == 12 and len(set(ids)) == 12
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["accuracy"]["n"] == 12
    assert [(r["world_size"], r["rank"], r["n"]) for r in summary["ranks"]] == [(2, 0, 6), (3, 0, 2), (3, 1, 2), (3, 2, 2)]
    calls.n = 0
    assert evaluate_plan(cfg, plan, tiny_pipe, run_dir, NO_WARMUP, quiet=True).ran == 0 and calls.n == 0  # one process: all done


SLOW_RANK = textwrap.dedent("""
    import sys, time
    import prunevid_bench.pipeline as p
    run = p.Pipeline.run
    def slow(self, *args, **kwargs):
        time.sleep(0.4)  # long enough to be killed between two samples, or in one
        return run(self, *args, **kwargs)
    p.Pipeline.run = slow
    from prunevid_bench.cli import main
    sys.argv = ["prunevid", *sys.argv[1:]]
    main()
""")


def test_a_killed_rank_loses_only_its_sample_in_flight(toy, tmp_path, calls):
    args = [str(a) for a in run_args(toy, tmp_path)]
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_RANK, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=plain_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)))
             for r in (0, 1)]
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list(tmp_path.glob("*/samples.rank-1.jsonl"))
        if logs and len(read_samples(logs[0])) >= 2:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    output = procs[0].communicate(timeout=300)[0]
    procs[1].wait()
    run_dir = the_run_dir(tmp_path)
    lost_rank = len(read_samples(run_dir / "samples.rank-1.jsonl"))
    assert 2 <= lost_rank < 10, "rank 1 finished before it was killed"
    assert len(read_samples(run_dir / "samples.rank-0.jsonl")) == 10, output  # rank 0 went on alone

    res = runner.invoke(app, ["summarize", str(run_dir), "--json"])  # while the run is unfinished
    assert res.exit_code == EXIT_INCOMPLETE, res.output
    partial = json.loads(res.stdout[res.stdout.index("{"):])
    assert partial["counts"]["evaluated"] == 10 + lost_rank and not partial["complete"]
    assert "questions evaluated so far" in res.output
    assert json.loads((run_dir / "summary.json").read_text())["counts"]["evaluated"] == 10 + lost_rank

    calls.n = 0
    res = runner.invoke(app, args)  # one process resumes the rest
    assert res.exit_code == EXIT_INCOMPLETE, res.output
    assert calls.n == 10 - lost_rank and f"{10 + lost_rank} of 20 questions already done" in res.output
    ids = logged_ids(run_dir)
    assert len(ids) == 20 and len(set(ids)) == 20  # nothing lost, nothing duplicated
    assert json.loads((run_dir / "summary.json").read_text())["complete"]


def test_a_launch_with_another_world_size_is_refused_while_one_runs(toy, tmp_path, calls):
    held = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from prunevid_bench.harness.runlock import RunLock
        RunLock(sys.argv[1], name=".lock.rank-1-of-2").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=plain_env())
    try:
        assert held.stdout.readline().strip() == "locked"
        plan = plan_dataset(DatasetSpec(toy, limit=2))
        cfg = build_config(None, None, {"model.name": "tiny", "video.num_frames": 4, "generation.max_new_tokens": 2})
        with pytest.raises(PruneVidError, match=r"another launch \(.lock.rank-1-of-2 is held\)"):
            evaluate_plan(cfg, plan, lambda: None, tmp_path / "run", quiet=True)
        with pytest.raises(PruneVidError, match="another launch"):
            evaluate_plan(cfg, plan, lambda: None, tmp_path / "run", quiet=True, shard=Shard(0, 3))
    finally:
        held.kill()
        held.wait()
    assert calls.n == 0


def test_force_is_refused_under_a_split_launch(toy, tmp_path, calls, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, [*map(str, run_args(toy, tmp_path)), "--force"])
    assert res.exit_code == 2 and "--force cannot be split over processes" in res.output
    assert calls.n == 0


def test_summarize_refuses_what_is_not_a_dataset_run(tmp_path):
    res = runner.invoke(app, ["summarize", str(tmp_path)])
    assert res.exit_code == 2 and "is not a dataset run folder" in res.output


def test_a_sweep_under_a_launcher_is_refused(toy, tmp_path, calls, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, ["sweep", "tau", "--values", "tau=0.7", "--dataset", str(toy), *FAST, "--results-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--launcher local --workers N" in res.output and calls.n == 0


def test_a_split_run_missing_a_rank_exits_incomplete_naming_it(toy, tmp_path, calls, monkeypatch):
    """Rank 1 of 2 never ran: rank 0 finishes its half and exits 3 naming rank 1 and the missing
    ids; `summarize` says the same. (``logits``: every answer parses, so nothing else is wrong.)"""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = [*map(str, run_args(toy, tmp_path)), "--limit", "6", "--answer-mode", "logits"]
    res = runner.invoke(app, args)
    assert res.exit_code == EXIT_INCOMPLETE, res.output
    assert "3 not evaluated (" in res.output and "rank 1 of 2 did not finish" in res.output
    run_dir = the_run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy"]["unparsed"] == 0 and summary["accuracy"]["errors"] == 0
    assert summary["missing_ranks"] == [1] and len(summary["missing"]) == 3
    assert all(i in res.output for i in summary["missing"])
    res = runner.invoke(app, ["run", *args[1:], "--quiet"])  # quiet: nothing said, the exit code still tells
    assert res.exit_code == EXIT_INCOMPLETE and res.output == ""
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    res = runner.invoke(app, ["summarize", str(run_dir)])
    assert res.exit_code == EXIT_INCOMPLETE and "rank 1 of 2 did not finish" in res.output
    res = runner.invoke(app, args)  # one process finishes the rest: a clean exit
    assert res.exit_code == 0, res.output
    assert "missing" not in json.loads((run_dir / "summary.json").read_text())
    assert runner.invoke(app, ["summarize", str(run_dir)]).exit_code == 0
