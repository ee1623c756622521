"""Threads, load and start-up: --threads / runtime.threads set torch's threads and every record
carries them with the load average; commands that only read run folders import no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.config import build_config
from tests.conftest import PROJECT_ROOT
from prunevid_bench.errors import PruneVidError
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()
FAST = ["--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4", "--limit", "2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("toy"), 3, seed=2)


@pytest.fixture(scope="module")
def run_dirs(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    try:
        for extra in ([], ["--preset", "default", "--set", "stage2.pruning_layer=1"]):
            res = runner.invoke(app, ["run", "--dataset", str(toy), *FAST, "--threads", "2", "--results-dir", str(out),
                                      *extra])
            assert res.exit_code in (0, 3), res.output
    finally:
        torch.set_num_threads(before)
    return sorted(out.iterdir())


def test_threads_are_set_and_every_record_carries_them_and_the_load(run_dirs):
    for run_dir in run_dirs:
        rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert rows and all(r["torch_threads"] == 2 and len(r["load_average"]) == 3 for r in rows)
        env = json.loads((run_dir / "environment.json").read_text())
        assert env["torch_threads"] == 2 and len(env["load_average_start"]) == 3 and env["cpu_count"] == os.cpu_count()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["runtime"]["torch_threads"] == [2] and summary["runtime"]["load_max"] >= 0
        config = json.loads((run_dir / "config.json").read_text())["config"]
        assert config["runtime"] == {"threads": 2, "save_kept": False}


def test_threads_are_no_part_of_a_runs_identity(run_dirs, toy, tmp_path):
    """The same run with other threads resumes the same folder: nothing is redone."""
    res = runner.invoke(app, ["run", "--dataset", str(toy), *FAST, "--threads", "1", "--results-dir",
                              str(run_dirs[0].parent)])
    assert res.exit_code in (0, 3) and "2 of 2 questions already done" in res.output, res.output
    assert len(list(run_dirs[0].parent.iterdir())) == 2


def test_bad_thread_counts_are_refused():
    with pytest.raises(PruneVidError, match="runtime.threads must be >= 1"):
        build_config(None, None, {"runtime.threads": 0})
    with pytest.raises(PruneVidError, match="cannot be swept"):
        from prunevid_bench.harness.sweep import grid_spec

        grid_spec(["threads"], ["threads=1,2"], None)


def test_a_busy_machine_is_named(monkeypatch):
    from prunevid_bench.harness import inputs

    assert inputs.busy_note([0.5, 0.5, 0.5]) is None
    note = inputs.busy_note([float(os.cpu_count() + 3), 1.0, 1.0])
    assert note and "exceeds the" in note and "--threads" in note


@pytest.mark.parametrize("command", [["compare", "{a}", "{b}"], ["summarize", "{a}"], ["presets"], ["methods"],
                                     ["compare", "{a}", "{b}", "--markdown"]])
def test_commands_that_only_read_run_folders_import_no_torch(run_dirs, command):
    args = [c.format(a=run_dirs[0], b=run_dirs[1]) for c in command]
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom prunevid_bench.cli import app\n"
            f"res = CliRunner().invoke(app, {args!r})\n"
            "print(res.exit_code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    assert done.returncode == 0, done.stderr
    code, imported = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert code in ("0", "3") and imported == "[]", done.stdout
