"""Streaming speed-up and KV memory: a question at the end of a stream of N chunks against the
offline re-prefill of all N chunks and the question; KV bytes over a long stream with and
without a visual-token budget (a PNG).

    PYTHONPATH=src python benchmarks/bench_streaming.py                       # N = 4, 8, 16
    PYTHONPATH=src python benchmarks/bench_streaming.py --chunks 4 8 --repeats 3 --plot kv.png

The model is a Qwen2.5-VL with random weights scaled down so a small CPU runs it (hidden 512,
8 layers, 8 heads sharing 2 key/value heads), with the built-in byte-level processor at
336x336 frames (144 merged tokens per temporal step). Each chunk is 4 frames (2 steps, 288
visual tokens). The stream's TTFT is timed from the question's arrival to its first token over
the cache already built; the offline TTFT is ``pipe.run`` on the same frames and question: the
vision tower over every frame plus the prefill of the whole prompt. The first-token logits of
the two are compared too (they must agree: the stream is the offline prefill in pieces).
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from prunevid_bench.config import RunConfig
from prunevid_bench.models.loading import LoadedModel
from prunevid_bench.models.tiny import TinySizes, build_processor, build_tiny_model
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.stream_plot import plot_kv_over_stream
from prunevid_bench.streaming import StreamSession

SIZES = TinySizes(hidden_size=512, intermediate_size=2736, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=(8, 12, 12), vision_depth=2, vision_hidden_size=64,
                  vision_intermediate_size=128, vision_heads=2)
SIDE = 336
CHUNK = 4
FPS = 2.0
QUESTION = "What happens at the end of the video?"


def scaled_pipeline(device: str) -> Pipeline:
    model = build_tiny_model(sizes=SIZES).to(device)
    # Random weights have no trained context length: allow the 16-chunk prompt (4.7k tokens).
    model.config.get_text_config().max_position_embeddings = 32768
    processor = build_processor(max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE)
    return Pipeline(LoadedModel(model, processor, "scaled", video_policy="processor"), RunConfig())


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, SIDE, SIDE, 3), dtype=np.uint8)


def offline_run(pipe, video, question=QUESTION):
    messages = [{"role": "user", "content": [{"type": "video", "video": video, "fps": FPS}, {"type": "text", "text": question}]}]
    return pipe.run(messages=messages, max_new_tokens=1)


def speedup(pipe, n_chunks: int, repeats: int) -> dict:
    video = frames(n_chunks * CHUNK)
    session = StreamSession(pipe, video_fps=FPS, chunk_frames=CHUNK)
    for i in range(n_chunks):
        session.append(video[i * CHUNK : (i + 1) * CHUNK])
    session.ask(QUESTION, 1)  # warm-up
    stream = [session.ask(QUESTION, 1) for _ in range(repeats)]
    offline_run(pipe, video)  # warm-up
    offline = [offline_run(pipe, video) for _ in range(repeats)]
    diff = float((stream[0].first_logits - offline[0].first_token_logits).abs().max())
    s = statistics.median(a.ttft_s for a in stream)
    o = statistics.median(r.ttft_s for r in offline)
    return {"chunks": n_chunks, "visual_tokens": session.visual_tokens, "stream_ttft_ms": s * 1000,
            "offline_ttft_ms": o * 1000, "speedup": o / s, "append_ms_median": statistics.median(c.append_s for c in session.chunks) * 1000,
            "max_logit_diff": diff}


def kv_series(pipe, n_chunks: int, budget: int | None) -> list[tuple[float, int]]:
    session = StreamSession(pipe, video_fps=FPS, chunk_frames=CHUNK, cache_tokens=budget)
    points = []
    for i in range(n_chunks):
        record = session.append(frames(CHUNK, seed=100 + i))
        points.append(((i + 1) * CHUNK / FPS, record.kv_bytes))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/stream_kv.png"))
    parser.add_argument("--plot-chunks", type=int, default=24, help="chunks in the plotted stream (>= 1)")
    parser.add_argument("--budget", type=int, default=1152, help="visual tokens (4 chunks of 288)")
    args = parser.parse_args()
    if args.plot_chunks < 1:
        parser.error(f"--plot-chunks must be >= 1, got {args.plot_chunks}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"machine: {platform.platform()} | {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__} | device {args.device} | float32 | model hidden {SIZES.hidden_size}, "
          f"{SIZES.num_hidden_layers} layers | frames {SIDE}x{SIDE}, {CHUNK} per chunk, {FPS} fps")
    pipe = scaled_pipeline(args.device)
    with torch.inference_mode():
        print(f"{'chunks':>6} {'visual':>7} {'stream TTFT':>12} {'offline TTFT':>13} {'speed-up':>9} {'append/chunk':>13} {'max |dlogit|':>13}")
        for n in args.chunks:
            r = speedup(pipe, n, args.repeats)
            print(f"{r['chunks']:>6} {r['visual_tokens']:>7} {r['stream_ttft_ms']:>9.1f} ms {r['offline_ttft_ms']:>10.1f} ms "
                  f"{r['speedup']:>8.1f}x {r['append_ms_median']:>10.1f} ms {r['max_logit_diff']:>13.2e}")
        series = {"no budget": kv_series(pipe, args.plot_chunks, None),
                  f"budget {args.budget} visual tokens": kv_series(pipe, args.plot_chunks, args.budget)}
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot_kv_over_stream(series, args.plot, title=f"KV cache over a {args.plot_chunks}-chunk stream")
    for name, points in series.items():
        early = min(4, len(points))
        print(f"KV bytes, {name}: after chunk {early} {points[early - 1][1] / 2**20:.2f} MiB, "
              f"after chunk {len(points)} {points[-1][1] / 2**20:.2f} MiB")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its speed-ups use wall-clock TTFTs")
    main()
