"""benchmarks/gpu_check.py: the CPU dry run of the reduced matrix runs every step and writes both
reports (CI, so the script cannot rot); the full matrix asks for what the issue lists; a step that
would pass the time budget is skipped and says so."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=PROJECT_ROOT, timeout=600)


@pytest.mark.slow
def test_quick_dry_run_on_the_cpu_runs_every_step(tmp_path):
    done = run("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    steps = report["steps"]
    assert set(steps) == {"verify float32 sdpa", "verify bfloat16 eager", "methods", "feature_cache", "stream", "torchrun"}
    assert all(step["status"] == "ok" for step in steps.values()), {k: v["status"] for k, v in steps.items()}
    assert {r["model"] for r in steps["verify float32 sdpa"]["reports"]} >= {"tiny", "tiny-qwen2vl"}
    assert report["versions"]["torch"] and report["versions"]["transformers"]
    md = (tmp_path / "report.md").read_text()
    assert "| verify float32 sdpa | ok |" in md and "transformers" in md


def test_full_matrix_is_the_issues():
    args = argparse.Namespace(device="cuda", quick=False)
    steps = {name: (command, limit) for name, command, limit in gpu_check.commands(args, Path("/tmp/x"))}
    methods = steps["methods"][0]
    assert methods[methods.index("--hidden") + 1] == "3584" and methods[methods.index("--layers") + 1] == "28"
    assert methods[methods.index("--tokens") + 1: methods.index("--tokens") + 3] == ["8192", "16384"]
    assert all("cuda" in command for command, _ in steps.values())
    assert "torch.distributed.run" in steps["torchrun"][0] and "1" in steps["torchrun"][0]
    matrix = gpu_check.verify_matrix("cuda", quick=False, has_flash=True)
    assert set(matrix) == {("float32", "sdpa"), ("float32", "eager"), ("bfloat16", "sdpa"), ("bfloat16", "eager"),
                           ("bfloat16", "flash_attention_2")}
    assert ("bfloat16", "flash_attention_2") not in gpu_check.verify_matrix("cuda", quick=False, has_flash=False)
    limits = sum(limit for _, limit in steps.values())
    assert limits <= gpu_check.BUDGET_S - 120  # the benchmark steps leave two minutes for the verify matrix


def test_a_step_past_the_budget_is_skipped_and_said(tmp_path):
    done = run("--device", "cpu", "--quick", "--steps", "stream", "--budget-s", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    step = json.loads((tmp_path / "report.json").read_text())["steps"]["stream"]
    assert step["status"] == "skipped" and "of the budget left" in step["reason"]
