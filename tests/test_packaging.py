"""A wheel install carries the presets and sweep files: built from the sources, installed with
``--no-deps`` into a folder of its own (torch and the rest come from this environment), and run
from outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT


def _run(args, cwd, env=None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_wheel_install_lists_presets_and_finds_sweep_files(tmp_path):
    project = tmp_path / "project"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(PROJECT_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, project / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", project], tmp_path)
    wheel = next((tmp_path / "dist").glob("prunevid_bench-*.whl"))
    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], tmp_path)

    env = {**os.environ, "PYTHONPATH": str(site)}  # not the checkout's src/
    where = _run([sys.executable, "-c", "import prunevid_bench; print(prunevid_bench.__file__)"], tmp_path, env)
    assert Path(where.strip()).is_relative_to(site)
    listed = _run([site / "bin" / "prunevid", "presets"], tmp_path, env)
    for name in ("baseline", "default", "aggressive", "stage1_only"):
        assert name in listed
    shown = _run([site / "bin" / "prunevid", "presets", "show", "default"], tmp_path, env)
    assert "tau: 0.8" in shown and "keep_ratio: 0.4" in shown
    values = _run([sys.executable, "-c", "from prunevid_bench.harness.sweep import shipped_values; "
                   "print(shipped_values('stage1.tau'), shipped_values('stage2.keep_ratio'))"], tmp_path, env)
    assert values.strip() == "[0.7, 0.8, 0.9] [0.2, 0.4, 0.6]"
    by_name = _run([sys.executable, "-c", "from prunevid_bench.harness.sweep import load_sweep_file; "
                    "print(sorted(load_sweep_file('stage2')))"], tmp_path, env)
    assert by_name.strip() == "['stage2.keep_ratio', 'stage2.pruning_layer']"
    tables = _run([site / "bin" / "prunevid", "reproduce", "--list", "--json"], tmp_path, env)
    assert "vidcom2-qwen3vl8b" in tables  # the published tables and benchmarks.yaml travel with the wheel


def test_decord_is_an_extra_and_the_package_decodes_without_it(tmp_path):
    """`pip install .` needs no decord (no wheel for aarch64 or macOS-arm64): it is an extra, and
    with it absent every video decodes with PyAV."""
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "decord" not in core and "torchcodec" not in core and "av>=" in core
    assert project["optional-dependencies"]["decord"] == ["decord>=0.6"]
    code = ("import sys; sys.modules['decord'] = None\n"
            "from prunevid_bench.video import check_video, load_clip\n"
            f"check_video({str(PROJECT_ROOT / 'examples' / 'toy_sample.mp4')!r})\n"
            f"print(load_clip({str(PROJECT_ROOT / 'examples' / 'toy_sample.mp4')!r}, num_frames=4).backend)")
    out = _run([sys.executable, "-c", code], tmp_path, {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    assert out.strip() == "pyav"
