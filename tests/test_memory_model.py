"""The analytic prefill-memory model (``memory_model``) against itself and against measurement:
a chunk as long as the prompt is the whole prefill; chunks lower the layers' peak, the more the
smaller; and ``bench_stage2.py --chunk-tokens`` prints measured peaks (torch's allocator,
profiler events) that the model predicts within 15% on a small model with real token counts."""

from __future__ import annotations

import re

from prunevid_bench import memory_model as mm
from tests.test_benchmarks import run_script

SHAPE = mm.MemoryShape(hidden=512, intermediate=2688, heads=8, kv_heads=2, head_dim=64, layers=8)


def test_a_chunk_as_long_as_the_prompt_is_the_whole_prefill():
    whole = mm.prefill_peaks(SHAPE, 4000, 3800, 4000, 1600, k=2, query_rows=100)
    assert mm.prefill_peaks(SHAPE, 4000, 3800, 4000, 1600, k=2, chunk=4000, query_rows=100) == whole
    assert mm.prefill_peaks(SHAPE, 4000, 3800, 4000, chunk=0) == mm.prefill_peaks(SHAPE, 4000, 3800, 4000, chunk=9999)


def test_smaller_chunks_lower_the_layers_peak_and_never_the_kv_cache():
    peaks = [mm.prefill_peaks(SHAPE, 16000, 15800, 16000, chunk=n)["llm_layers"] for n in (0, 4096, 2048, 1024)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0] / 2
    kv = SHAPE.layers * 16000 * 2 * SHAPE.kv_heads * SHAPE.head_dim * SHAPE.bytes
    assert all(p > kv for p in peaks)


def test_the_model_predicts_the_measured_peaks():
    out = run_script("bench_stage2.py", "--device", "cpu", "--threads", "1", "--frames", "8", "--layers", "4",
                     "--hidden", "256", "--heads", "4", "--tokens", "2048", "--repeats", "1", "--warmup", "0",
                     "--new-tokens", "1", "--chunk-tokens", "512", "--no-stage1", "--score-tokens",
                     "--scoring-speed-tokens")
    rows = [line for line in out.splitlines() if re.match(r"(baseline|stage 2\+3) +(0|512) ", line)]
    assert len(rows) == 4, out
    for line in rows:
        measured, model = map(int, re.search(r"(\d+) \((\d+)\) +\d+\.\d\d ", line).groups())
        assert abs(measured - model) <= max(1, 0.15 * measured), line
    whole, chunked = (int(re.search(r"(\d+) \(\d+\) +\d+\.\d\d ", r).group(1)) for r in rows[:2])
    assert chunked < whole


def test_bench_methods_prints_each_variant_whole_and_chunked():
    out = run_script("bench_methods.py", "--smoke", "--threads", "1", "--variants", "fastv", "--chunk-tokens", "64")
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("chunked prefill (--chunk-tokens 64)")) + 3
    rows = {line.split()[0]: line.split() for line in lines[start:start + 2]}
    assert list(rows) == ["baseline", "fastv"]
    for cells in rows.values():
        assert int(cells[-3]) > 0 and int(cells[-2]) > 0 and float(cells[-1]) > 0  # peak MiB whole, chunked, x base
