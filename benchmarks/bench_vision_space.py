"""Stage 1 in the LLM's space against Stage 1 in the vision encoder's space, at Qwen2.5-VL-7B's
merger shape: what each costs, merger included.

    PYTHONPATH=src python benchmarks/bench_vision_space.py                 # T=16 x N=256, auto device
    PYTHONPATH=src python benchmarks/bench_vision_space.py --T 32 --threads 1
    PYTHONPATH=src python benchmarks/bench_vision_space.py --smoke         # seconds, for CI

- ``space: llm`` (official): the merger projects all T * N tokens (each 2x2 patch features of
  1280 side by side, 5120 wide, -> 3584), then ``merge_video_tokens`` runs on the 3584-wide tokens.
- ``space: vision``: ``merge_video_tokens`` runs on the 5120-wide patch groups, then the merger
  projects only the M merged rows.

The patch groups are synthetic but shaped like a video (bench_stage1's scenes with still slots),
the merger is Qwen2.5-VL's with random weights. Both orders run in the same process, medians
after a warm-up (bench_stage2's `timed`); the merger's FLOPs are ``flops.merger_flops``.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

from bench_stage1 import CONFIG, synthetic_video
from bench_stage2 import timed
from prunevid_bench.flops import QWEN25_VL_7B_VISION, merger_flops
from prunevid_bench.stages.stage1 import merge_video_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=16, help="temporal grid steps")
    parser.add_argument("--N", type=int, default=256, help="LLM tokens per step (a 16 x 16 merged grid)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape and one run (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.T, args.N, args.repeats = 4, 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = QWEN25_VL_7B_VISION
    unit = shape.spatial_merge_size**2
    merger = Qwen2_5_VLPatchMerger(shape.out_hidden_size, shape.hidden_size, shape.spatial_merge_size)
    merger = merger.to(device=device, dtype=dtype).eval()
    groups = synthetic_video(args.T, args.N, shape.hidden_size * unit).to(device=device, dtype=dtype)  # [T, N, 5120]
    total = args.T * args.N

    def project(rows: torch.Tensor) -> torch.Tensor:  # [M, 5120] -> [M, 3584]
        return merger(rows.reshape(-1, shape.hidden_size))

    with torch.inference_mode():
        tokens = project(groups.reshape(total, -1))
        res_llm = merge_video_tokens(tokens.reshape(args.T, args.N, -1), **CONFIG)
        res_vision = merge_video_tokens(groups, **CONFIG)
        merger_all = timed(lambda: project(groups.reshape(total, -1)), device, args.repeats)
        s1_llm = timed(lambda: merge_video_tokens(tokens.reshape(args.T, args.N, -1), **CONFIG), device, args.repeats)
        s1_vision = timed(lambda: merge_video_tokens(groups, **CONFIG), device, args.repeats)
        merger_kept = timed(lambda: project(res_vision.merged.to(dtype)), device, args.repeats)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load:.2f} at end")
    print(f"machine: {platform.platform()} | {hardware}")
    print(f"torch {torch.__version__} | device {device} | dtype {str(dtype).removeprefix('torch.')}")
    print(f"input: T={args.T} x N={args.N} = {total} tokens; patch groups {shape.hidden_size}x{unit} = "
          f"{shape.hidden_size * unit} wide; merger -> {shape.out_hidden_size} (Qwen2.5-VL-7B, random weights)")
    print(f"stage 1: {CONFIG}; median of {args.repeats} after 1 warm-up")
    print()
    rows = [
        ("llm", res_llm.n_merged, total, merger_all, s1_llm),
        ("vision", res_vision.n_merged, res_vision.n_merged, merger_kept, s1_vision),
    ]
    print(f"{'space':<8} {'tokens out':>10} {'merger rows':>11} {'merger GFLOP':>12} {'merger ms':>9} {'stage 1 ms':>10} {'total ms':>9}")
    for space, out, merged_rows, merger_s, s1_s in rows:
        print(f"{space:<8} {out:>10} {merged_rows:>11} {merger_flops(shape, merged_rows) / 1e9:>12.1f} "
              f"{merger_s * 1e3:>9.1f} {s1_s * 1e3:>10.1f} {(merger_s + s1_s) * 1e3:>9.1f}")
    llm_total, vision_total = merger_all + s1_llm, merger_kept + s1_vision
    print(f"\nvision / llm: merger {merger_kept / merger_all:.2f}x, stage 1 {s1_vision / s1_llm:.2f}x, "
          f"merger + stage 1 {vision_total / llm_total:.2f}x")


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its speed-ups use wall-clock median TTFTs")
    main()
