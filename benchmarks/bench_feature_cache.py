"""Wall time of a 1 + 6 cell sweep with and without the vision-feature cache, and the share of
it spent in the vision tower.

    PYTHONPATH=src python benchmarks/bench_feature_cache.py                    # 20 toy questions
    PYTHONPATH=src python benchmarks/bench_feature_cache.py --size 448 --frames 16 --rounds 2

The model is a Qwen2.5-VL with random weights, the language model and the vision tower both
scaled down from 7B (default: 7 layers x 896 for the LLM, 14 heads / 2 kv heads, MLP 4864;
8 blocks x 320 for the tower), run on the toy world's videos through ``run_sweep`` exactly as
``prunevid sweep tau keep_ratio`` runs them: a baseline cell plus 2 x 3 grid cells of the
``default`` preset (Stages 1+2). Visual tokens per question = frames / 2 x (size / 28)^2.

The two sweeps alternate (without, with, without, with, ...), each into a fresh results folder,
so machine load drifts into both alike; the ratio is of the medians. The vision share is the
time inside the tower's forward (summed over the sweep) over the sweep's time. Both are given in
wall time and in this process's CPU time, which on a shared machine moves far less with other
jobs' load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from prunevid_bench.config import build_config
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.harness.sweep import SweepGrid, run_sweep
from prunevid_bench.models.loading import LoadedModel
from prunevid_bench.models.tiny import IM_END_ID, TinySizes, build_processor, build_tiny_model
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.toy.world import generate_dataset


class TowerTimer:
    """Seconds spent inside the vision tower's forward, summed: wall and this process's CPU time."""

    def __init__(self, visual):
        self.total = self.cpu = 0.0
        self._start = None
        self._hooks = [visual.register_forward_pre_hook(self._enter), visual.register_forward_hook(self._leave)]

    def _enter(self, *_):
        self._start = (time.perf_counter(), time.process_time())

    def _leave(self, *_):
        self.total += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def build_pipeline(args) -> Pipeline:
    head_dim = args.hidden // args.heads
    half = head_dim // 2
    sizes = TinySizes(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        mrope_section=(half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8),  # Qwen's [16, 24, 24] proportions
        vision_depth=args.vision_depth, vision_hidden_size=args.vision_hidden,
        vision_intermediate_size=4 * args.vision_hidden, vision_heads=args.vision_hidden // 64,
    )
    model = build_tiny_model(seed=0, sizes=sizes).to(args.device)
    model.generation_config.eos_token_id = IM_END_ID
    processor = build_processor(max_pixels=args.size * args.size, min_pixels=56 * 56)
    cfg = build_config("default", None, {"model.name": "tiny", "model.device": args.device, "model.dtype": "float32",
                                         "video.num_frames": args.frames, "generation.max_new_tokens": args.new_tokens})
    return Pipeline(LoadedModel(model, processor, "scaled", video_policy="processor"), cfg), cfg


def one_sweep(pipe, cfg, data: Path, cached: bool, args) -> tuple[float, float, float, float]:
    """(wall s, wall s inside the tower, CPU s, CPU s inside the tower) of one whole sweep into a
    fresh folder. CPU time is this process's: on a shared machine it moves far less with other
    jobs' load than wall time does."""
    timer = TowerTimer(pipe.model.model.visual)
    grid = SweepGrid(("tau", "keep_ratio"), ("tau=0.7,0.9", "keep_ratio=0.3,0.5,0.7"), None, (), "accuracy", False)
    with tempfile.TemporaryDirectory() as out:
        options = EvalOptions(results_dir=Path(out), feature_cache_gb=None if cached else 0)
        from rich.console import Console

        start, cpu_start = time.perf_counter(), time.process_time()

        result = run_sweep(cfg, DatasetSpec(data, limit=args.questions), grid, options,
                           console=Console(file=open(os.devnull, "w")), pipeline=pipe)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        errors = {name: s["accuracy"]["errors"] for name, s in result.summaries.items() if s["accuracy"]["errors"]}
        if errors:  # a sweep of failing samples times nothing: refuse to report it
            raise SystemExit(f"samples failed in cells {errors}; fix them before timing the sweep")
    for h in timer._hooks:
        h.remove()
    return wall, timer.total, cpu, timer.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per video")
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels (videos and processor)")
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--vision-depth", type=int, default=8)
    parser.add_argument("--vision-hidden", type=int, default=320)
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="(without, with) pairs, alternated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (float32 either way)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at start")
    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | transformers {transformers.__version__} | {args.device} float32")
    pipe, cfg = build_pipeline(args)
    tokens = args.frames // 2 * (args.size // 28) ** 2
    print(f"model: LLM {args.layers} x {args.hidden} ({args.heads}/{args.kv_heads} heads, MLP {args.intermediate}), "
          f"tower {args.vision_depth} x {args.vision_hidden}; {args.questions} questions, {args.frames} frames of "
          f"{args.size}px -> {tokens} visual tokens each; sweep tau x keep_ratio = 1 + 6 cells, preset default")
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_dataset(Path(tmp), args.questions, seed=0, frames=max(16, args.frames), size=args.size)
        runs: dict[bool, list[tuple[float, float, float, float]]] = {False: [], True: []}
        for i in range(args.rounds):
            for cached in (False, True):
                wall, tower, cpu, tower_cpu = one_sweep(pipe, cfg, data, cached, args)
                runs[cached].append((wall, tower, cpu, tower_cpu))
                print(f"  round {i + 1} {'with' if cached else 'without':>7} the cache: wall {wall:7.1f} s, "
                      f"tower {tower:6.1f} s ({100 * tower / wall:4.1f}%) | CPU {cpu:7.1f} s, tower "
                      f"{tower_cpu:6.1f} s ({100 * tower_cpu / cpu:4.1f}%)", flush=True)
    for name, total, part in (("wall", 0, 1), ("CPU", 2, 3)):
        without = statistics.median(r[total] for r in runs[False])
        with_cache = statistics.median(r[total] for r in runs[True])
        share_before = statistics.median(r[part] / r[total] for r in runs[False])
        share_after = statistics.median(r[part] / r[total] for r in runs[True])
        goal = (1 + 6 * (1 - share_before)) / 7
        print(f"\n{name} time, median of {args.rounds}: without {without:.1f} s, with {with_cache:.1f} s -> "
              f"{without / with_cache:.2f}x faster ({100 * (1 - with_cache / without):.0f}% less)")
        print(f"  vision tower share of the sweep: {100 * share_before:.1f}% without, {100 * share_after:.1f}% with")
        print(f"  goal from the measured share: with/without <= (1 + 6 x (1 - {share_before:.2f})) / 7 = {goal:.2f}; "
              f"measured {with_cache / without:.2f}")


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its ratios use wall-clock medians (CPU time per cell is printed beside)")
    main()
