"""The benchmark scripts still run: each at tiny sizes in a subprocess (they measure nothing here;
the figures live in docs/benchmarks.md). Exit status 0 and the lines each one must print."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

BENCHMARKS = PROJECT_ROOT / "benchmarks"
TINY_LLM = ["--device", "cpu", "--threads", "1", "--frames", "8", "--layers", "2", "--hidden", "64", "--heads", "4"]


def run_script(name: str, *args: str, cwd=None) -> str:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          env=env, cwd=cwd or PROJECT_ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of bench_methods' table, by variant label (first column)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant")) + 2
    rows = {}
    for line in lines[start:]:
        if not line or line.startswith(" "):
            break
        rows[line.split()[0]] = line.split()
    return rows


def test_bench_methods_smoke_prints_a_row_per_variant():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_methods import VARIANTS
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = run_script("bench_methods.py", "--smoke", "--threads", "1")
    rows = table_rows(out)
    assert list(rows) == [label for label, _ in VARIANTS]
    kept, total = map(int, rows["baseline"][1].split("/"))
    assert kept == total > 0
    for label, cells in rows.items():
        if label != "baseline":
            kept, total = map(int, cells[1].split("/"))
            assert 0 < kept < total, label
            assert cells[-3] in ("pass", "FAIL"), label  # the 3% goal column
    # the matched budget 0.25 of the 240 smoke tokens, where a method reaches it exactly
    for label in ("prunevid@B", "fastv", "tome", "tome+prop", "evs"):
        assert rows[label][1] == "60/240", label


def test_bench_methods_runs_a_subset_at_two_token_counts():
    out = run_script("bench_methods.py", "--smoke", "--threads", "1", "--tokens", "128", "256", "--variants", "evs")
    assert out.count("\nvariant ") == 2
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("baseline", "evs"))] == ["baseline", "evs"] * 2


def test_bench_methods_smoke_on_a_qwen3_vl_shaped_llm_with_deepstack():
    """``--family qwen3-vl``: every variant on a Qwen3-VL LLM (QK-norm, DeepStack after layers 0..2)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_methods import VARIANTS
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = run_script("bench_methods.py", "--smoke", "--threads", "1", "--family", "qwen3-vl")
    assert "model: random Qwen3-VL LLM, 3 layers" in out and "DeepStack: 3 levels added after layers 0..2" in out
    rows = table_rows(out)
    assert list(rows) == [label for label, _ in VARIANTS]
    assert rows["baseline"][1] == "240/240"
    for label in ("prunevid@B", "fastv", "tome", "tome+prop", "evs"):
        assert rows[label][1] == "60/240", label


def test_bench_qwen3_inputs_carry_deepstack_levels_that_reach_the_logits():
    """The bench's precomputed DeepStack levels are added by the model: zeroing them moves the
    logits (so the Qwen3-VL mode really runs DeepStack), and its prompt has one run per step."""
    import argparse

    import torch

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from qwen3_llm import build_qwen3_inputs, build_qwen3_model
    finally:
        sys.path.remove(str(BENCHMARKS))
    from prunevid_bench.models.tiny import VISION_START_ID

    args = argparse.Namespace(hidden=64, heads=4, kv_heads=2, layers=3, intermediate=None)
    model = build_qwen3_model(args, torch.device("cpu"), torch.float32)
    assert model.config.text_config.intermediate_size == 192 and model.config.text_config.head_dim == 16
    inputs = build_qwen3_inputs(model, (4, 4, 4), torch.device("cpu"), torch.float32)
    assert int((inputs["input_ids"] == VISION_START_ID).sum()) == 4
    with torch.no_grad():
        logits = model(**inputs).logits
        video = inputs["mm_encoder_outputs"]["video"]
        video.deepstack_features = [tuple(torch.zeros_like(x) for x in level) for level in video.deepstack_features]
        without = model(**inputs).logits
    assert not torch.allclose(logits, without, atol=1e-4)


def test_bench_methods_family_refuses_the_tower_in_one_line():
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_methods.py"), "--smoke", "--family", "qwen3-vl",
                           "--tower", "qwen3-vl-8b"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--family applies without --tower" in done.stderr


def test_bench_methods_with_the_tower_smoke():
    """``--tower``: the real-width tower (2 blocks) in the TTFT, ToMe inside it halving the blocks' tokens."""
    out = run_script("bench_methods.py", "--smoke", "--threads", "1", "--tower", "qwen2.5-vl-7b", "--tokens", "64")
    rows = table_rows(out)
    assert list(rows) == ["baseline", "tome_vis", "tome_vis-g", "tome_vis+t"]
    assert rows["tome_vis"][1] == rows["baseline"][1] == "128/128"  # unmerge: the LLM sees every token
    kept, total = map(int, rows["tome_vis-g"][1].split("/"))
    assert kept < total
    tower = out[out.index("block tokens"):]
    assert "tome_vis" in tower and "1280 wide" in out


def test_bench_stage2_smoke():
    out = run_script("bench_stage2.py", *TINY_LLM, "--tokens", "256", "--repeats", "1", "--warmup", "0",
                     "--new-tokens", "1", "--score-tokens", "256", "--scoring-speed-tokens", "512")
    variants = [line[:13].strip() for line in out.splitlines() if line.startswith(("baseline ", "stage 2+3 ", "stages 1+2+3 "))]
    assert variants[:3] == ["baseline", "stage 2+3", "stages 1+2+3"]
    assert "scoring memory" in out and "scoring speed" in out


def test_bench_stage1_smoke():
    out = run_script("bench_stage1.py", "--device", "cpu", "--T", "4", "--N", "32", "--C", "64", "--repeats", "1",
                     "--warmup", "0")
    assert "median" in out.lower()


@pytest.mark.slow
def test_bench_feature_cache_smoke():
    out = run_script("bench_feature_cache.py", "--questions", "2", "--frames", "4", "--size", "56", "--layers", "1",
                     "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vision-depth", "1",
                     "--vision-hidden", "64", "--new-tokens", "1", "--rounds", "1", "--threads", "1")
    assert "faster" in out


@pytest.mark.slow
def test_bench_content_hash_smoke():
    out = run_script("bench_content_hash.py", "--mb", "4")
    for start in ("long video, 4 MiB: first hash", "  later keys of the same file", "checkpoint folder (",
                  "built-in 'tiny' state dict", "one sample key (tiny, a toy video): first"):
        assert any(line.startswith(start) for line in out.splitlines()), (start, out)


def test_video_policies_smoke():
    out = run_script("video_policies.py", "--frames", "32")  # lmms-eval asks for 32 by default
    assert out.count("| qwen |") == 1 and "| processor |" in out


def test_bench_video_memory_smoke():
    pytest.importorskip("decord", reason="the benchmark compares PyAV with decord (an optional extra)")
    out = run_script("bench_video_memory.py", "--frames", "40", "--width", "64", "--height", "48")  # a frame no wider than the square once crashed
    assert "pyav / decord peak RSS" in out


@pytest.mark.slow
def test_bench_streaming_smoke(tmp_path):
    out = run_script("bench_streaming.py", "--chunks", "2", "--repeats", "1", "--plot-chunks", "2", "--budget", "288",
                     "--plot", str(tmp_path / "kv.png"))
    assert (tmp_path / "kv.png").is_file() and "KV bytes, no budget" in out


def test_bench_vision_space_smoke():
    out = run_script("bench_vision_space.py", "--smoke", "--threads", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith(("llm ", "vision ")) and "/" not in line]
    assert [cells[0] for cells in rows] == ["llm", "vision"] and rows[0][1] == rows[1][1]  # the same tokens out
    assert "vision / llm:" in out


def test_demo_alternates_both_settings_in_one_process_and_says_correct_or_wrong():
    out = run_script("demo.py", "--repeats", "2", "--warmup", "1", "--threads", "1")
    assert out.count("A correct") == 2 and "128→128" in out and "128→16" in out
    assert "median of the 2 paired ratios" in out and "ratio of the medians" in out
    assert "TTFT ms median" in out and "(p25-p75)" in out and "2 alternating repeats after 1 warm-ups" in out
    assert "s, CPU " in out and "(process time, torch threads: 1); its speed-ups use wall-clock TTFTs" in out


def test_bench_hybrid_smoke_prints_every_variant_on_a_qwen3_5_shaped_model():
    out = run_script("bench_hybrid.py", "--smoke", "--variants", "prunevid", "fastv", "evs")
    assert "random Qwen3.5-9B-shaped LLM" in out and "full attention at [3, 7]" in out
    rows = table_rows(out)
    assert list(rows) == ["baseline", "prunevid", "fastv", "evs"]
    for label in ("prunevid", "fastv", "evs"):
        kept, total = map(int, rows[label][1].split("/"))
        assert 0 < kept < total, label
    assert "ideal prefill speed-up at full scale" in out and "recurrent + conv states" in out
