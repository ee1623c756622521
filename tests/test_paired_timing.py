"""Paired timing: warm-up samples take the cold start off the first logged question of a dataset
run and of every sweep cell; an interleaved sweep gives the serial sweep's answers and token
counts and one paired TTFT ratio per question."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from prunevid_bench.config import build_config
from prunevid_bench.harness.evaluate import evaluate_dataset
from prunevid_bench.harness.interleave import paired_speedup
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.harness.sweep import SweepGrid, run_sweep
from prunevid_bench.toy.world import generate_dataset

FAST = {"video.num_frames": 4, "generation.max_new_tokens": 2, "stage2.pruning_layer": 1}
COLD_S = 0.4  # the injected cold start


@pytest.fixture
def cold_start(tiny_pipe):
    """The vision tower's first forward sleeps COLD_S (inside TTFT), as a cold process pays once."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(COLD_S)

    handle = tiny_pipe.model.model.visual.register_forward_pre_hook(hook)
    yield calls
    handle.remove()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("toy"), 4, seed=5)


def sweep(tiny_pipe, toy, out, warmup, interleave=False, keep=("0.3", "0.6"), cache_gb=0):
    cfg = build_config("default", None, FAST)
    grid = SweepGrid(("keep_ratio",), (f"keep_ratio={','.join(keep)}",))
    options = EvalOptions(results_dir=out, warmup=warmup, interleave=interleave, feature_cache_gb=cache_gb)
    return run_sweep(cfg, DatasetSpec(toy), grid, options, pipeline=tiny_pipe, console=Console(quiet=True))


def first_ttft(result, cell="baseline") -> float:
    import json

    rows = [json.loads(line) for line in (result.sweep_dir / "cells" / cell / "samples.jsonl").read_text().splitlines()]
    return rows[0]["ttft_s"]


@pytest.mark.parametrize("cache_gb", [0, 4])
@pytest.mark.parametrize("warmup", [0, 1])
def test_the_first_cell_pays_the_cold_start_only_without_warmup(tiny_pipe, toy, tmp_path, cold_start, warmup, cache_gb):
    """With the sweep's feature cache on too: the warm-up's cold vision time is not cached."""
    result = sweep(tiny_pipe, toy, tmp_path, warmup, cache_gb=cache_gb)
    if warmup:
        assert first_ttft(result) < COLD_S  # the warm-up took it, unlogged
    else:
        assert first_ttft(result) >= COLD_S  # the baseline's first question paid it: the old flattering speed-up
    if not cache_gb:
        assert len(cold_start) == 3 * 4 + 3 * warmup  # one warm-up question per cell


def test_a_dataset_run_warms_up_too_with_the_same_answers(tiny_pipe, toy, tmp_path, cold_start):
    import json

    cfg = build_config(None, None, FAST)
    runs = {}
    for warmup in (0, 1):
        cold_start.clear()  # each run starts cold
        res = evaluate_dataset(cfg, DatasetSpec(toy), EvalOptions(results_dir=tmp_path / str(warmup), warmup=warmup),
                               pipeline=tiny_pipe, console=Console(quiet=True))
        runs[warmup] = [json.loads(line) for line in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    assert runs[0][0]["ttft_s"] >= COLD_S > runs[1][0]["ttft_s"]
    for a, b in zip(runs[0], runs[1]):
        keys = ("id", "prediction", "generated_text", "generated_tokens", "tokens_after")
        assert [a[k] for k in keys] == [b[k] for k in keys]


def test_interleaved_sweep_equals_serial_and_pairs_every_question(tiny_pipe, toy, tmp_path):
    import json

    serial = sweep(tiny_pipe, toy, tmp_path / "serial", 1)
    mixed = sweep(tiny_pipe, toy, tmp_path / "interleaved", 1, interleave=True)
    assert [c.name for c in serial.cells] == [c.name for c in mixed.cells]
    for cell in serial.cells:
        rows = {}
        for name, result in (("serial", serial), ("interleaved", mixed)):
            path = result.sweep_dir / "cells" / cell.name / "samples.jsonl"
            rows[name] = [json.loads(line) for line in path.read_text().splitlines()]
        keys = ("id", "prediction", "generated_text", "generated_tokens", "tokens_before_stage1", "tokens_after_stage1",
                "tokens_after")
        assert [[r[k] for k in keys] for r in rows["serial"]] == [[r[k] for k in keys] for r in rows["interleaved"]]
    base = mixed.summaries["baseline"]
    for row in mixed.rows:
        records = [json.loads(line) for line in (mixed.sweep_dir / "cells" / row["cell"] / "samples.jsonl").read_text().splitlines()]
        base_records = [json.loads(line) for line in (mixed.sweep_dir / "cells" / "baseline" / "samples.jsonl").read_text().splitlines()]
        speed = paired_speedup(records, base_records)
        assert speed["n"] == 4 == base["n"]  # one paired ratio per question
        ratios = sorted(b["ttft_s"] / r["ttft_s"] for b, r in zip(base_records, records))
        assert row["speedup_paired_median"] == pytest.approx((ratios[1] + ratios[2]) / 2)
        assert row["speedup_paired_p25"] <= row["speedup_paired_median"] <= row["speedup_paired_p75"]
    assert mixed.rows[0]["speedup_paired_median"] == 1.0


def test_an_interleaved_sweep_resumes_cell_by_cell(tiny_pipe, toy, tmp_path):
    """Half the grid run serially, then the same sweep with one more value, interleaved: only
    the missing cell runs, and every cell ends with its four questions."""
    first = sweep(tiny_pipe, toy, tmp_path, 1, keep=("0.3",))
    assert {c.name for c in first.cells} == {"baseline", "keep_ratio=0.3"}
    again = sweep(tiny_pipe, toy, tmp_path, 1, interleave=True)
    assert again.sweep_dir == first.sweep_dir
    ran = {row["cell"]: row["n"] for row in again.rows}
    assert ran == {"baseline": 4, "keep_ratio=0.3": 4, "keep_ratio=0.6": 4}


def test_a_resumed_sweep_whose_cells_ran_differently_is_refused_unless_allowed(tiny_pipe, toy, tmp_path):
    """A cell finished under another transformers version (a sweep resumed after an upgrade) is
    not tabulated beside the others, unless --allow-mixed."""
    import json

    from prunevid_bench.errors import PruneVidError

    first = sweep(tiny_pipe, toy, tmp_path, 0, keep=("0.3",))
    env_path = first.sweep_dir / "cells" / "keep_ratio=0.3" / "environment.json"
    env = json.loads(env_path.read_text())
    env["transformers"] = "4.0.0"
    env_path.write_text(json.dumps(env))
    with pytest.raises(PruneVidError, match=r"cannot tabulate this sweep: .* differ in transformers \(transformers 4.0.0 vs"):
        sweep(tiny_pipe, toy, tmp_path, 0, keep=("0.3",))
    cfg = build_config("default", None, FAST)
    grid = SweepGrid(("keep_ratio",), ("keep_ratio=0.3",))
    options = EvalOptions(results_dir=tmp_path, warmup=0, allow_mixed=True)
    again = run_sweep(cfg, DatasetSpec(toy), grid, options, pipeline=tiny_pipe, console=Console(quiet=True))
    assert [r["cell"] for r in again.rows] == ["baseline", "keep_ratio=0.3"]
