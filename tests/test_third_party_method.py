"""A method from outside the package: registered by a module in this folder, run end to end
through the CLI; in-process with ``register_method`` and in a fresh process through the entry
point group ``prunevid_bench.methods``."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def _run_record(run_root: Path) -> dict:
    (run_dir,) = run_root.iterdir()
    return json.loads((run_dir / "result.json").read_text())


@pytest.fixture
def every_other():
    """Register the plug-in for one test, then take it out of the registry again."""
    from prunevid_bench.methods import unregister_method

    importlib.reload(importlib.import_module("tests.every_other_method"))  # registers "every_other"
    yield
    unregister_method("every_other")


def test_registered_method_runs_through_the_cli(every_other, clip8, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["methods"])
    assert listed.exit_code == 0 and any(line.startswith("every_other [visual_tokens] every_other: enabled, offset")
                                         for line in listed.output.splitlines())
    shown = runner.invoke(app, ["methods", "show", "every_other"])
    assert "every_other.offset: int = 0  in [0, 1]" in shown.output
    bad = runner.invoke(app, ["run", str(clip8), "Q", "--model", "tiny", "--set", "every_other.ofset=1", "--results-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "did you mean 'every_other.offset'" in bad.output

    res = runner.invoke(app, ["run", str(clip8), "What is happening?", "--model", "tiny", "--num-frames", "8",
                              "--max-new-tokens", "2", "--set", "every_other.enabled=true", "--results-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    record = _run_record(tmp_path)
    assert record["visual_tokens"] == 64 and record["tokens_after_stage1"] == 32 and record["every_other_dropped"] == 32
    assert record["methods"] == ["every_other"] and record["visual_tokens_kept_ratio"] == 0.5
    (reduction,) = record["reductions"]
    assert (reduction["method"], reduction["tokens_in"], reduction["tokens_out"]) == ("every_other", 64, 32)
    assert reduction["kv_bytes_after"] < reduction["kv_bytes_before"]
    assert record["llm_prefill_tokens"] == record["prompt_tokens"] - 32
    assert record["ideal_speedup"] > 1


def test_entry_point_plugin_is_found_in_a_fresh_process(clip8, tmp_path):
    """A distribution on the path that declares the entry point (no import of it anywhere)."""
    dist = tmp_path / "site" / "every_other_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: every-other-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[prunevid_bench.methods]\nevery_other = every_other_method\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), str(tmp_path / "site")])}
    cli = [sys.executable, "-m", "prunevid_bench.cli"]
    listed = subprocess.run([*cli, "methods"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "every_other [visual_tokens]" in listed.stdout
    out = tmp_path / "runs"
    run = subprocess.run([*cli, "run", str(clip8), "Q", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "2",
                          "--set", "every_other.enabled=true", "--set", "every_other.offset=1", "--results-dir", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    record = _run_record(out)
    assert record["tokens_after_stage1"] == 32 and record["methods"] == ["every_other"]
