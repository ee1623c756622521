"""Run folders never lose or mix results: forced reruns keep every earlier result, one process
holds a folder at a time (tested with real processes), and the counts shown add up."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prunevid_bench.cli import EXIT_INCOMPLETE, app
from prunevid_bench.config import build_config
from prunevid_bench.errors import PruneVidError
from prunevid_bench.choices import format_mc_prompt
from prunevid_bench.harness.datasets import load_dataset
from prunevid_bench.harness.evaluate import summary_table
from prunevid_bench.harness.runlock import LOCK_FILE, RunLock
from prunevid_bench.harness.runs import back_up
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()
FAST = ["--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("toy"), 4, seed=3)


@pytest.fixture(autouse=True)
def shared_model(tiny_pipe, monkeypatch):
    """The session's tiny pipeline instead of one built per invocation (seconds each)."""
    import prunevid_bench.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
    return tiny_pipe


def run_args(toy, out, *extra):
    return ["run", "--dataset", toy, *FAST, "--results-dir", out, "--label", "r", "--limit", "3", *extra]


# ---------------------------------------------------------------------------------------------
# --force


def test_two_consecutive_forces_keep_every_earlier_result(toy, tmp_path):
    assert invoke(*run_args(toy, tmp_path)).exit_code == EXIT_INCOMPLETE  # the tiny model parses no letter
    (run_dir,) = tmp_path.iterdir()
    first = (run_dir / "samples.jsonl").read_text()
    first_summary = (run_dir / "summary.json").read_text()
    res = invoke(*run_args(toy, tmp_path, "--force"))
    assert res.exit_code == EXIT_INCOMPLETE and "kept in backup-1/" in res.output
    second = (run_dir / "samples.jsonl").read_text()
    res = invoke(*run_args(toy, tmp_path, "--force"))
    assert res.exit_code == EXIT_INCOMPLETE and "kept in backup-2/" in res.output
    assert (run_dir / "backup-1" / "samples.jsonl").read_text() == first  # not overwritten by the second force
    assert (run_dir / "backup-1" / "summary.json").read_text() == first_summary
    assert (run_dir / "backup-2" / "samples.jsonl").read_text() == second
    for backup in ("backup-1", "backup-2"):
        assert {p.name for p in (run_dir / backup).iterdir()} == {
            "samples.jsonl", "summary.json", "summary.csv", "plan.json", "config.json", "environment.json"}
    assert len(read_lines(run_dir / "samples.jsonl")) == 3
    assert not (run_dir / LOCK_FILE).exists()  # released and cleaned up


def test_an_interrupted_force_leaves_no_stale_summary(toy, tmp_path, monkeypatch):
    assert invoke(*run_args(toy, tmp_path)).exit_code == EXIT_INCOMPLETE
    (run_dir,) = tmp_path.iterdir()
    monkeypatch.setattr(Pipeline, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert invoke(*run_args(toy, tmp_path, "--force")).exit_code == 130
    # The summaries described the old answers: they moved with them, none stays beside the new log.
    assert not (run_dir / "summary.json").exists() and not (run_dir / "summary.csv").exists()
    assert (run_dir / "backup-1" / "summary.csv").is_file()
    assert (run_dir / "samples.jsonl").read_text() == ""


def test_back_up_never_reuses_a_number(tmp_path):
    (tmp_path / "backup-1").mkdir()  # taken (e.g. by a run that died half-way)
    (tmp_path / "samples.jsonl").write_text("x\n")
    assert back_up(tmp_path, ["samples.jsonl", "summary.json"]) == tmp_path / "backup-2"
    assert (tmp_path / "backup-2" / "samples.jsonl").read_text() == "x\n"
    assert back_up(tmp_path, ["samples.jsonl"]) is None  # nothing left to move


# ---------------------------------------------------------------------------------------------
# The run-folder lock, with real processes

HOLDER = textwrap.dedent("""
    import sys, time
    from prunevid_bench.harness.runlock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")


def hold(run_dir: Path, seconds: float) -> subprocess.Popen:
    """Another process holding ``run_dir`` for ``seconds``; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def run_dir(toy, tmp_path) -> Path:
    """A finished run folder (so a rerun only resumes: fast) and the arguments that target it."""
    assert invoke(*run_args(toy, tmp_path)).exit_code == EXIT_INCOMPLETE
    (folder,) = tmp_path.iterdir()
    return folder


def test_a_second_process_is_refused_naming_the_holder(toy, run_dir):
    holder = hold(run_dir, 60)
    try:
        before = (run_dir / "samples.jsonl").read_text()
        res = invoke(*run_args(toy, run_dir.parent, "--force"))
        assert res.exit_code == 2, res.output
        error = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"in use by process {holder.pid}" in error[0] and "--wait" in error[0]
        assert (run_dir / "samples.jsonl").read_text() == before and not (run_dir / "backup-1").exists()
    finally:
        holder.kill()
        holder.wait()


def test_wait_queues_behind_the_holder(toy, run_dir):
    holder = hold(run_dir, 1.5)
    try:
        res = invoke(*run_args(toy, run_dir.parent, "--force", "--wait"))
    finally:
        holder.wait()
    assert res.exit_code == EXIT_INCOMPLETE, res.output
    assert f"waiting for process {holder.pid}" in res.output
    assert (run_dir / "backup-1" / "samples.jsonl").is_file() and len(read_lines(run_dir / "samples.jsonl")) == 3


def test_a_lock_left_by_a_killed_process_is_taken_over(toy, run_dir):
    holder = hold(run_dir, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run_dir / LOCK_FILE).read_text().split()[0] == str(holder.pid)  # the crash left the file behind
    res = invoke(*run_args(toy, run_dir.parent))
    assert res.exit_code == EXIT_INCOMPLETE, res.output
    assert f"stale lock left by process {holder.pid}" in res.output
    assert not (run_dir / LOCK_FILE).exists()


def test_two_cli_processes_on_one_folder_never_mix(toy, tmp_path):
    """Two identical runs started together: one runs, the other queues (--wait) and then finds
    every sample done. Without the lock the log held every id twice."""
    args = [sys.executable, "-m", "prunevid_bench.cli", *map(str, run_args(toy, tmp_path, "--wait"))]
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_INCOMPLETE] * 2, outputs
    (run_dir,) = tmp_path.iterdir()
    rows = read_lines(run_dir / "samples.jsonl")
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    assert sum("3 of 3 questions already done" in out for out in outputs) == 1


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(PruneVidError, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    import errno

    from prunevid_bench.harness import runlock

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runlock.os, "open", refuse)
    with pytest.raises(PruneVidError, match=r"cannot write in .* \(Read-only file system\); pass a writable --results-dir"):
        RunLock(tmp_path / "run").acquire()


def test_sweeps_lock_each_cell(toy, tmp_path):
    args = ["sweep", "tau", "--values", "tau=0.7", "--dataset", toy, "--limit", "1", *FAST, "--results-dir", tmp_path]
    assert invoke(*args).exit_code == EXIT_INCOMPLETE
    (sweep_dir,) = tmp_path.iterdir()
    holder = hold(sweep_dir / "cells" / "tau=0.7", 60)
    try:
        res = invoke(*args, "--force")
        assert res.exit_code == 2 and f"cells/tau=0.7 is in use by process {holder.pid}" in res.output
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# What a sample row holds, and counts that add up


def test_sample_rows_carry_question_options_prompt_and_raw_reply(toy, tmp_path, tiny_pipe):
    assert invoke(*run_args(toy, tmp_path)).exit_code == EXIT_INCOMPLETE
    (run_dir,) = tmp_path.iterdir()
    questions = {s.id: s for s in load_dataset(toy).samples}
    for row in read_lines(run_dir / "samples.jsonl"):
        sample = questions[row["id"]]
        assert row["question"] == sample.question and row["options"] == list(sample.options)
        assert row["prompt"] == tiny_pipe.build_prompt(format_mc_prompt(sample.question, sample.options))
        assert "<|vision_start|>" in row["prompt"]
    row = read_lines(run_dir / "samples.jsonl")[0]
    sample = questions[row["id"]]
    cfg = build_config(None, None, {"video.num_frames": 4, "generation.max_new_tokens": 2})
    again = tiny_pipe.run(tiny_pipe.prepare(sample.video, format_mc_prompt(sample.question, sample.options), cfg), config=cfg)
    tok = tiny_pipe.processor.tokenizer
    assert row["reply_raw"] == tok.decode(again.generated_token_ids, skip_special_tokens=False)
    assert row["generated_text"] == again.generated_text


def test_skipped_and_selected_counts_add_up(toy, tmp_path):
    """5 rows: 1 without an answer (unusable), 2 whose video is missing, 2 that run."""
    rows = read_lines(toy)
    rows.append({**rows[0], "id": "extra"})
    rows[1]["video"] = rows[2]["video"] = "videos/missing.mp4"
    del rows[3]["answer"]
    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke("run", "--dataset", data, "--video-root", toy.parent, *FAST, "--answer-mode", "logits",
                 "--results-dir", tmp_path / "out")
    assert res.exit_code == EXIT_INCOMPLETE, res.output  # all parsed (logits), but 3 rows were skipped
    assert "5 rows, 1 unusable; 4 selected; preflight: 2 ready, 2 skipped" in res.output
    assert "incomplete: 3 skipped" in res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    wide = Console(width=200, record=True, file=io.StringIO())
    wide.print(summary_table(summary))
    table = wide.export_text()
    assert "2 (of 4 selected; 2 skipped in preflight)" in table
    assert "3 (1 unusable rows, 2 in preflight)" in table
    c = summary["counts"]
    assert c == {"rows": 5, "unusable": 1, "selected": 4, "ready": 2, "skipped_preflight": 2, "evaluated": 2}
    assert c["rows"] == c["evaluated"] + len(summary["skipped"]) and c["selected"] == c["evaluated"] + c["skipped_preflight"]
    assert summary["accuracy"]["n"] == c["evaluated"]
