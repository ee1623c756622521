"""Time Stage 1 (merge_video_tokens) at Qwen2.5-VL-7B video scale.

    PYTHONPATH=src python benchmarks/bench_stage1.py               # 32 x 576 x 3584, auto device
    PYTHONPATH=src python benchmarks/bench_stage1.py --device cpu --repeats 3

Default size: 64 sampled frames -> T = 32 temporal grids of 24 x 24 = 576 merged tokens each, at
Qwen2.5-VL-7B's hidden size 3584. The input is synthetic but shaped like a video (a few scenes,
part of each frame still, the rest changing), so segmentation, the static/dynamic split and both
kinds of clustering all do real work. Warm-up runs are discarded; the figure is the median.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from prunevid_bench.stages.stage1 import merge_video_tokens

# The official PLLaVA hyperparameters (docs/algorithm.md, Defaults).
CONFIG = dict(tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.25, k=7, min_cluster_tokens=14)


def synthetic_video(n_frames: int, n_slots: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[T, N, C] float32: scenes of ~4 grids; in each, 40% of slots hold still (small jitter)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n_frames, n_slots, dim, generator=gen)
    for start in range(0, n_frames, 4):
        frames = slice(start, start + 4)
        still = torch.randperm(n_slots, generator=gen)[: int(0.4 * n_slots)]
        background = torch.randn(len(still), dim, generator=gen)
        jitter = 0.1 * torch.randn(tokens[frames, still].shape, generator=gen)
        tokens[frames, still] = background + jitter
        tokens[frames] += 0.5 * torch.randn(dim, generator=gen)  # scene-wide offset
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=32, help="temporal grids (frames / 2)")
    parser.add_argument("--N", type=int, default=576, help="tokens per temporal grid")
    parser.add_argument("--C", type=int, default=3584, help="hidden size")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs before timing")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (cpu float32, cuda bfloat16), "
                        "float32, bfloat16, float16")
    args = parser.parse_args()

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype_name = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device.type == "cuda" else "float32"
    )
    dtype = getattr(torch, dtype_name)
    tokens = synthetic_video(args.T, args.N, args.C).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(args.warmup + args.repeats):
        sync()
        start = time.perf_counter()
        result = merge_video_tokens(tokens, **CONFIG)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"machine: {platform.platform()} | {hardware}")
    print(f"torch {torch.__version__} | device {device} | dtype {dtype_name}")
    print(f"input: T={args.T} x N={args.N} tokens x C={args.C}  ({args.T * args.N} tokens)")
    print(f"config: {CONFIG}")
    print(f"output: {result.n_merged} tokens ({result.n_merged / (args.T * args.N):.1%}); "
          f"{result.n_static_tokens} static + {result.n_dynamic_tokens} dynamic; "
          f"{result.n_segments} segments {result.segment_lengths}")
    ms = [t * 1e3 for t in times]
    print(f"merge_video_tokens: median {statistics.median(ms):.1f} ms  (min {min(ms):.1f}, "
          f"max {max(ms):.1f}; {args.repeats} runs after {args.warmup} warm-up)")


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its times are wall-clock medians")
    main()
