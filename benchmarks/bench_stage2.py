"""Time-to-first-token, memory and KV cache of Stage 2 (+3), and of Stages 1+2, against the
unpruned model, next to the ideal speed-up from the analytic FLOPs model.

    PYTHONPATH=src python benchmarks/bench_stage2.py                      # auto device
    PYTHONPATH=src python benchmarks/bench_stage2.py --device cpu --tokens 2048 --repeats 3
    PYTHONPATH=src python benchmarks/bench_stage2.py --device cuda --hidden 1024 --layers 12 --tokens 8192

The model is a Qwen2.5-VL with random weights, scaled down from 7B (default hidden 512, 8 heads
sharing 2 key/value heads, MLP 5.3x wide as in 7B, 8 layers) so that it runs on a small CPU, but
fed THOUSANDS of visual tokens: the prompt holds N <|video_pad|> tokens under a fake
``video_grid_thw`` and the visual embeddings are handed in as precomputed vision-encoder output
(``mm_encoder_outputs``), so the LLM, M-RoPE ids, Stage 1, Stage 2 and Stage 3 all run exactly
as in a real sample while the vision tower is skipped (it is the same for every variant). The
embeddings are synthetic but shaped like a video: scenes of 4 temporal grid steps in which 40%
of the positions hold still, so Stage 1 finds static and dynamic tokens.

Each variant runs through the engine (prefill + greedy decode); warm-up runs are discarded and
the median (min-max) of the timed runs is reported. Memory is measured in one extra run per
variant: on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was
allocated before (weights and inputs); on the CPU the peak of the bytes held by torch's CPU
allocator during the run, from the profiler's allocation events (see ``PeakMemory``). A last
section compares the peak memory of our Stage 2 scoring (text rows only, in row chunks) with
the dense L x L softmax that output_attentions / eager attention at layer K would build.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from prunevid_bench import flops as fl
from prunevid_bench import measure
from prunevid_bench import memory_model as mm
from prunevid_bench.config import PrefillConfig, RunConfig, Stage1Config, Stage2Config
from prunevid_bench.engine import run_greedy
from prunevid_bench.measure import Clock
from prunevid_bench.models.tiny import (
    IM_END_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    TinySizes,
    build_tiny_model,
    build_tokenizer,
)
from prunevid_bench.patch import apply_methods
from prunevid_bench.stages import stage2 as s2

try:
    import prunevid_bench.stages.stage1  # noqa: F401

    HAVE_STAGE1 = True
except ImportError:
    HAVE_STAGE1 = False

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
# One byte per token with the offline tokenizer, so the question is kept short (about the length
# of a real multiple-choice prompt in Qwen's tokenizer, counted in bytes here).
QUESTION = (
    "What happens after the fridge opens? (A) it closes (B) a bottle is taken (C) the light goes off"
    " (D) nothing<|im_end|>\n<|im_start|>assistant\nBest option: ("
)


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak extra memory of one call. CUDA: ``max_memory_allocated`` after
    ``reset_peak_memory_stats``, minus what was allocated before (weights, inputs); for an engine
    run, the engine's own per-phase peaks (it resets the peak itself before prefill and before
    decoding), minus the same base. CPU: the
    peak of the bytes held by torch's CPU allocator during the call, summed from the profiler's
    allocation/free events (``profile_memory=True``; read through its event tree, a private but
    long-standing API). Peak RSS is no substitute: the process high-water mark (VmHWM) was seen
    to miss transient peaks on this machine's kernel, and freed memory is reused unseen."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = (
            "cuda max_memory_allocated - allocated before" if device.type == "cuda"
            else "cpu peak bytes held by torch's allocator (profiler allocation events)"
        )

    def start(self) -> None:
        self.phases: dict[str, int] = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def stop(self, engine_out=None, marks: list | None = None) -> int:
        """The peak; ``self.phases``: the peak of each prefill phase the patch closed (CUDA: the
        engine's readings; CPU: the timeline split at ``marks``, [(phase, its end in ns)])."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if engine_out is not None:
                peak = max(engine_out.prefill_peak_memory_bytes, engine_out.decode_peak_memory_bytes)
                self.phases = {k: v - self._base for k, v in engine_out.prefill_peak_by_phase.items()}
            else:
                peak = torch.cuda.max_memory_allocated(self.device)
            return int(peak - self._base)
        from torch._C._profiler import _EventType

        self._prof.__exit__(None, None, None)
        events, stack = [], list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))  # < 0 for a free
            stack.extend(node.children)
        held = peak = in_phase = 0
        marks, i = list(marks or []), 0
        for at, size in sorted(events):
            while i < len(marks) and at > marks[i][1]:  # a phase ended before this event
                self.phases[marks[i][0]], in_phase, i = in_phase, held, i + 1
            held += size
            peak, in_phase = max(peak, held), max(in_phase, held)
        for name, _ in marks[i:]:
            self.phases[name], in_phase = in_phase, held
        return peak


class PhaseMarks(measure.PeakMemory):
    """Given to the patch as its memory reader on the CPU: the prefill's phase boundaries as
    wall-clock times (the profiler's clock), which ``PeakMemory.stop`` splits its timeline at."""

    def __init__(self, device):
        super().__init__(device)
        self.marks: list[tuple[str, int]] = []

    def reset(self, phases: bool = False) -> None:
        if phases:
            self.marks = []
        super().reset(phases)

    def _reset_device(self) -> None:
        pass

    def _read_device(self) -> int:
        return 0

    def phase(self, name: str) -> None:
        if self.phases is not None:
            self.marks.append((name, time.time_ns()))


# ----------------------------------------------------------------------------- inputs
def grid_for(tokens: int, frames: int) -> tuple[int, int, int]:
    """(t, h, w) in 14-px patches for about ``tokens`` merged tokens over ``frames`` grid steps."""
    per_frame = max(1, round(tokens / frames))
    side_h = max(1, int(per_frame**0.5))
    side_w = max(1, round(per_frame / side_h))
    return frames, 2 * side_h, 2 * side_w


def synthetic_video(t: int, n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[t * n, dim] float32 at the scale of the embedding table: scenes of 4 grid steps; in each
    scene 40% of the positions hold still (a fixed background plus a little jitter)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(t, n, dim, generator=gen)
    for start in range(0, t, 4):
        scene = slice(start, start + 4)
        still = torch.randperm(n, generator=gen)[: int(0.4 * n)]
        tokens[scene, still] = torch.randn(len(still), dim, generator=gen) + 0.1 * torch.randn(
            tokens[scene, still].shape, generator=gen
        )
        tokens[scene] += 0.5 * torch.randn(dim, generator=gen)
    return 0.02 * tokens.reshape(t * n, dim)


def build_inputs(model, grid: tuple[int, int, int], device, dtype) -> dict:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tok = build_tokenizer()
    t, h, w = grid
    n_visual = t * h * w // 4
    ids = (
        tok(SYSTEM, add_special_tokens=False)["input_ids"]
        + [VISION_START_ID] + [VIDEO_PAD_ID] * n_visual + [VISION_END_ID]
        + tok(QUESTION, add_special_tokens=False)["input_ids"]
    )
    input_ids = torch.tensor([ids], device=device)
    embeds = synthetic_video(t, n_visual // t, model.config.get_text_config().hidden_size).to(device, dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == VIDEO_PAD_ID).long() * 2,
        "video_grid_thw": torch.tensor([list(grid)], device=device),
        "second_per_grid_ts": torch.tensor([1.0], device=device),
        "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=(embeds,))},
    }


def llm_sizes(args) -> TinySizes:
    """The scaled-down language model's sizes from the options of ``add_model_arguments``."""
    head_dim = args.hidden // args.heads
    half = head_dim // 2
    mrope = (half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8)  # Qwen's [16, 24, 24] proportions
    return TinySizes(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 64 * round(args.hidden * 18944 / 3584 / 64),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        mrope_section=mrope,
    )


def build_model(args, device, dtype):
    model = build_tiny_model(seed=0, attn_implementation="sdpa", sizes=llm_sizes(args))
    model.generation_config.eos_token_id = IM_END_ID
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- one variant
@dataclass
class Row:
    name: str
    visual_after_stage1: int
    visual_after_stage2: int
    llm_tokens: list  # tokens per layer
    ttft: list
    cpu: list  # process time of each timed run (prefill + new_tokens - 1 decode steps): the load-proof cost
    decode_tps: list
    stage1_s: list
    stage2_s: list
    peak_bytes: int
    kv_bytes: int
    flops: fl.Flops
    chunk: int = 0
    phases: dict | None = None  # peak of each prefill phase
    llm_len: int = 0  # rows entering the LLM
    kept_len: int = 0  # rows after the LLM-layer method (llm_len without one)


def run_variant(name, model, inputs, args, device, stage1=None, stage2=None, chunk: int = 0) -> Row:
    cfg = RunConfig(stage1=stage1 or Stage1Config(), stage2=stage2 or Stage2Config(), prefill=PrefillConfig(chunk))
    handle = apply_methods(model, cfg) if (stage1 or stage2 or chunk) else None
    clock = handle.clock if handle else Clock(device)
    if handle and device.type == "cpu":
        handle.memory = PhaseMarks(device)
    reader = handle.memory if handle else None
    memory = PeakMemory(device)
    ttft, cpu, tps, s1_times, s2_times = [], [], [], [], []
    try:
        for i in range(args.warmup + args.repeats):
            started = time.process_time()
            out = run_greedy(model, inputs, args.new_tokens, clock=clock, memory=reader)
            if i >= args.warmup:
                cpu.append(time.process_time() - started)
                ttft.append(out.ttft_s)
                tps.append(out.decode_tokens_per_s or 0.0)
                if handle:
                    if stage1 and stage1.enabled:
                        s1_times.append(handle.seconds("prunevid_stage1"))
                    if stage2 and stage2.enabled:
                        s2_times.append(handle.seconds("prunevid_stage2"))
        memory.start()
        out = run_greedy(model, inputs, args.new_tokens, clock=clock, memory=reader)
        peak = memory.stop(out, getattr(reader, "marks", None))
    finally:
        if handle:
            handle.remove()
    shape = fl.TextShape.from_config(model.config)
    prompt_len = inputs["input_ids"].shape[1]
    n_visual = int((inputs["input_ids"] == VIDEO_PAD_ID).sum())
    if handle is None or handle.state.source_index is None:
        tokens = fl.tokens_per_layer(shape.num_layers, prompt_len)
        after1 = after2 = n_visual
        scoring = 0
    else:
        st = handle.state
        llm_len = int(st.source_index.numel())
        after1, after2 = st.tokens_after_stage1, st.tokens_after
        if stage2 and stage2.enabled:
            tokens = fl.tokens_per_layer(shape.num_layers, llm_len, handle.pruning_layer, int(st.keep_index.numel()))
            scoring = fl.prunevid_scoring_flops(shape, llm_len - st.query_start, llm_len)
        else:
            tokens, scoring = fl.tokens_per_layer(shape.num_layers, llm_len), 0
    return Row(
        name, after1, after2, tokens, ttft, cpu, tps, s1_times, s2_times, peak, out.kv_cache_bytes,
        fl.llm_prefill_flops(shape, tokens, scoring=scoring), chunk, memory.phases, tokens[0], tokens[-1],
    )


# ----------------------------------------------------------------------------- scoring memory
def scoring_memory(model, args, device, dtype, rows: int) -> list[tuple[int, int, int, float]]:
    """Peak extra memory of our scoring vs a dense L x L softmax, at several sequence lengths."""
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    d = text.hidden_size // heads
    memory = PeakMemory(device)
    results = []
    for length in args.score_tokens:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(heads, length, d, generator=gen).to(device, dtype)
        k = torch.randn(kv_heads, length, d, generator=gen).to(device, dtype)
        query_rows = torch.arange(length - rows, length, device=device)
        visual = torch.arange(40, length - rows - 1, device=device)
        memory.start()
        ours = s2.max_max_scores(q[:, query_rows], k, visual, d**-0.5)
        ours_peak = memory.stop()
        del ours
        memory.start()
        # what output_attentions at layer K yields: every row of the softmax, then the text rows
        dense = s2.attention_probs(q, k, d**-0.5)[:, query_rows][..., visual].amax(dim=(0, 1))
        dense_peak = memory.stop()
        del dense
        results.append((length, ours_peak, dense_peak, heads * length * length * 4 / 2**20))
        del q, k
    return results


# ----------------------------------------------------------------------------- scoring speed
def max_max_scores_before(queries, keys, visual_index, scaling):
    """The scoring as it was before it sliced the keys once (kept to measure the change): the
    full softmax per row chunk, keys repeated per chunk, a separate scaling multiply, then a
    gather of the visual columns of the products."""
    best = torch.full((visual_index.numel(),), float("-inf"), device=keys.device)
    for rows in s2._row_chunks(queries.shape[0], queries.shape[1], keys.shape[1]):
        probs = s2.attention_probs(queries[:, rows], keys, scaling)[..., visual_index]
        best = torch.maximum(best, probs.amax(dim=(0, 1)))
    return best


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (synchronised on CUDA)."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def scoring_speed(model, args, device, dtype, rows: int) -> list[tuple[int, float, float, float]]:
    """Scoring alone, before and after, and a plain float32 matmul of the score's shape
    ([H, R, d] @ [H, d, L], the FLOPs the score needs): (L, before s, after s, matmul s)."""
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    d = text.hidden_size // heads
    results = []
    for length in args.scoring_speed_tokens:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(heads, rows, d, generator=gen).to(device, dtype)
        k = torch.randn(kv_heads, length, d, generator=gen).to(device, dtype)
        visual = torch.arange(40, length - rows - 1, device=device)
        before = timed(lambda: max_max_scores_before(q, k, visual, d**-0.5), device, args.repeats)
        after = timed(lambda: s2.max_max_scores(q, k, visual, d**-0.5), device, args.repeats)
        qf, kf = q.float(), s2.repeat_kv(k.float(), heads // kv_heads).transpose(1, 2).contiguous()
        matmul = timed(lambda: torch.bmm(qf, kf), device, args.repeats)
        results.append((length, before, after, matmul))
        del q, k, qf, kf
    return results


def end_to_end(model, inputs, args, device, k, prompt_len, question_rows, grid) -> None:
    """TTFT, memory and KV cache of every variant, next to the analytic ideal speed-up; with
    ``--chunk-tokens``, each variant chunked too (``chunked_table``)."""
    stage2 = Stage2Config(enabled=True, pruning_layer=k, keep_ratio=args.keep_ratio, score="prunevid")
    variants = [("baseline", {}), ("stage 2+3", {"stage2": stage2})]
    if HAVE_STAGE1 and not args.no_stage1:
        variants.append(("stages 1+2+3", {"stage1": Stage1Config(enabled=True), "stage2": stage2}))
    rows = [run_variant(name, model, inputs, args, device, **kw) for name, kw in variants]
    if args.chunk_tokens:
        chunked = [run_variant(name, model, inputs, args, device, chunk=args.chunk_tokens, **kw) for name, kw in variants]
        chunked_table(rows, chunked, model, inputs, args, k, question_rows)
        print()

    base = rows[0]
    header = (f"{'variant':<13} {'visual s1/s2':>13} {'LLM tokens (0..K | K+1..)':>26} {'TTFT ms':>20} "
              f"{'speed-up':>8} {'ideal':>6} {'stage1 ms':>9} {'stage2 ms':>9} {'decode tok/s':>13} "
              f"{'peak MiB':>9} {'KV MiB':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        speed = statistics.median(base.ttft) / statistics.median(r.ttft)
        ideal = fl.ideal_speedup(base.flops, r.flops)
        llm = f"{r.llm_tokens[0]} | {r.llm_tokens[-1]}"
        print(f"{r.name:<13} {f'{r.visual_after_stage1}/{r.visual_after_stage2}':>13} {llm:>26} "
              f"{spread(r.ttft, 1e3):>20} {speed:>7.2f}x {ideal:>5.2f}x "
              f"{spread(r.stage1_s, 1e3, '{:.1f}').split()[0]:>9} {spread(r.stage2_s, 1e3, '{:.1f}').split()[0]:>9} "
              f"{spread(r.decode_tps, 1.0, '{:.1f}').split()[0]:>13} {mib(r.peak_bytes):>9} {mib(r.kv_bytes):>7}")
    print()
    print("ideal = baseline prefill FLOPs / variant prefill FLOPs (LLM layers with the measured token counts,")
    print("        causal attention, plus the Stage 2 score; Stage 1's clustering is not in the FLOPs model).")
    for r in rows:
        f = r.flops
        print(f"  {r.name:<13} {f.total / 1e9:8.1f} GFLOP  (projections {f.projections / 1e9:.1f}, attention "
              f"{f.attention / 1e9:.1f}, mlp {f.mlp / 1e9:.1f}, scoring {f.scoring / 1e9:.3f})")

    # The same token counts on Qwen2.5-VL-7B (28 layers, K at the same relative depth), with its
    # vision encoder on this grid, which no variant changes.
    k7 = max(0, min(27, round((k + 1) * 28 / args.layers) - 1))
    vision = fl.vision_encoder_flops(fl.QWEN25_VL_7B_VISION, [grid])
    print(f"\nsame token counts on Qwen2.5-VL-7B (K={k7}): ideal speed-up LLM only / with the vision encoder "
          f"({vision.total / 1e12:.1f} TFLOP)")
    shape7 = fl.QWEN25_VL_7B_TEXT
    base7 = fl.llm_prefill_flops(shape7, [prompt_len] * 28)
    for r in rows[1:]:
        llm_len, kept_len = r.llm_tokens[0], r.llm_tokens[-1]
        f7 = fl.llm_prefill_flops(shape7, fl.tokens_per_layer(28, llm_len, k7, kept_len),
                                  scoring=fl.prunevid_scoring_flops(shape7, question_rows, llm_len))
        end_to_end = fl.ideal_speedup(base7 + vision, f7 + vision)
        print(f"  {r.name:<13} {fl.ideal_speedup(base7, f7):.2f}x / {end_to_end:.2f}x")



def chunked_table(rows, chunked, model, inputs, args, k, question_rows) -> None:
    """Each variant whole and chunked: TTFT, the measured peak beside the analytic model's
    (``memory_model``), the peak against the baseline's whole one, and the peak of each phase."""
    shape = mm.MemoryShape.from_config(model.config, next(model.parameters()).element_size())
    prompt = inputs["input_ids"].shape[1]
    visual = int((inputs["input_ids"] == VIDEO_PAD_ID).sum())
    base_peak = rows[0].peak_bytes
    print(f"chunked prefill: --chunk-tokens {args.chunk_tokens} against whole (0); peak MiB measured (model); "
          f"x base = / the baseline's whole peak;\n  CPU ms: process time of the run (with --new-tokens 1 the prefill "
          f"alone), which a busy machine does not inflate as it does the wall-clock TTFT")
    header = (f"{'variant':<13} {'chunk':>5} {'TTFT ms':>20} {'+%':>6} {'CPU ms':>7} {'+%':>6} {'peak MiB (model)':>17} {'x base':>6} "
              f"{'0..K (model)':>13} {'method (model)':>15} {'K+1.. (model)':>14}")
    print(header)
    print("-" * len(header))
    for whole, r in zip(rows, chunked):
        for v in (whole, r):
            method = v.name != "baseline"
            pred = mm.prefill_peaks(shape, prompt, visual, v.llm_len, v.kept_len, k if method else None, v.chunk,
                                    query_rows=question_rows)
            measured = v.phases or {}
            cost = statistics.median(v.ttft) / statistics.median(whole.ttft) - 1
            cpu = statistics.median(v.cpu)
            cpu_cost = cpu / statistics.median(whole.cpu) - 1
            phase = [f"{mib(measured.get(name, v.peak_bytes if name == 'llm_layers' else 0)):>5} ({mib(pred[name])})"
                     for name in (("layers_0_to_k", "method", "layers_after_k") if method else ("llm_layers",))]
            phase = phase if method else [phase[0], "-", "-"]
            print(f"{v.name:<13} {v.chunk:>5} {spread(v.ttft, 1e3):>20} {cost:>+6.1%} {cpu * 1e3:>7.0f} {cpu_cost:>+6.1%} "
                  f"{f'{mib(v.peak_bytes)} ({mib(max(pred.values()))})':>17} {v.peak_bytes / base_peak:>6.2f} "
                  f"{phase[0]:>13} {phase[1]:>15} {phase[2]:>14}")


# ----------------------------------------------------------------------------- main
def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def spread(values: list[float], scale: float = 1.0, fmt: str | None = None) -> str:
    """median (min-max); the format adapts to the magnitude unless given."""
    if not values:
        return "-"
    v = [x * scale for x in values]
    fmt = fmt or ("{:.1f}" if statistics.median(v) < 100 else "{:.0f}")
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The device, dtype and model-shape options (shared with bench_methods.py)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (cpu float32, cuda bfloat16), float32, bfloat16, float16")
    parser.add_argument("--frames", type=int, default=16, help="temporal grid steps (= sampled frames / 2)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 7B's 5.29 x hidden)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def setup(args) -> tuple[torch.device, str, torch.dtype]:
    """Threads, device and dtype from the options of ``add_model_arguments``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return device, dtype_name, getattr(torch, dtype_name)


def print_machine(model, device, dtype_name: str, name: str = "Qwen2.5-VL") -> None:
    """The machine (with the load average: the box is shared), the versions and the model's shape."""
    import transformers

    text = model.config.get_text_config()
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at start"
    )
    print(f"machine: {platform.platform()} | {hardware}")
    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | transformers {transformers.__version__} "
          f"| device {device} | dtype {dtype_name} | attention sdpa")
    print(f"model: random {name} LLM, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
          f"{text.num_attention_heads} heads / {text.num_key_value_heads} kv heads, MLP {text.intermediate_size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=4096, help="visual tokens before Stage 1 (rounded to the grid)")
    parser.add_argument("--pruning-layer", type=int, default=None,
                        help="K (default: 10/32 of the depth, as in the paper)")
    parser.add_argument("--keep-ratio", type=float, default=0.4, help="Stage 2 keep ratio")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per run (decode speed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs per variant")
    parser.add_argument("--score-tokens", type=int, nargs="*", default=[2048, 4096, 8192],
                        help="sequence lengths for the scoring-memory comparison (none: skip it)")
    parser.add_argument("--scoring-speed-tokens", type=int, nargs="*", default=[8192, 16384],
                        help="sequence lengths for the scoring-speed comparison, before/after (none: skip it)")
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="also run every variant with prefill.chunk_tokens N: TTFT and peak memory beside the whole prefill")
    parser.add_argument("--no-stage1", action="store_true", help="skip the stages 1+2+3 variant")
    parser.add_argument("--scoring-only", action="store_true",
                        help="skip the end-to-end variants; only the scoring sections")
    args = parser.parse_args()

    device, dtype_name, dtype = setup(args)
    k = args.pruning_layer
    if k is None:
        k = max(0, min(args.layers - 1, round(args.layers * 10 / 32)))  # the paper: K = 10 of 32 layers

    model = build_model(args, device, dtype)
    grid = grid_for(args.tokens, args.frames)
    inputs = build_inputs(model, grid, device, dtype)
    prompt_len = inputs["input_ids"].shape[1]
    n_visual = int((inputs["input_ids"] == VIDEO_PAD_ID).sum())
    question_rows = len(build_tokenizer()(QUESTION, add_special_tokens=False)["input_ids"])
    text = model.config.get_text_config()

    print_machine(model, device, dtype_name)
    print(f"input: video grid {list(grid)} -> {n_visual} visual tokens, prompt {prompt_len} tokens "
          f"({question_rows} after the video); {args.new_tokens} new tokens")
    print(f"stage 2: K={k}, keep_ratio={args.keep_ratio}, score=prunevid; stage 1: official defaults "
          f"(tau 0.8, cluster_ratio 0.5, temporal_segment_ratio 0.25, k 7, min 14)"
          + ("" if HAVE_STAGE1 else "  [stage1 not importable: skipped]"))
    print(f"timing: median (min-max) of {args.repeats} runs after {args.warmup} warm-up; "
          f"memory: {PeakMemory(device).kind}")
    print()

    if not args.scoring_only:
        end_to_end(model, inputs, args, device, k, prompt_len, question_rows, grid)
    if args.score_tokens:
        print(f"\nscoring memory, {text.num_attention_heads} heads / {text.num_key_value_heads} kv heads, "
              f"{question_rows} query rows, {dtype_name} (peak extra MiB):")
        print(f"  {'L':>6} {'ours (rows only)':>17} {'dense L x L softmax':>19} {'one H x L x L fp32':>19}")
        for length, ours, dense, one in scoring_memory(model, args, device, dtype, question_rows):
            print(f"  {length:>6} {mib(ours):>17} {mib(dense):>19} {one:>19,.0f}")

    if args.scoring_speed_tokens:
        print(f"\nscoring speed, {text.num_attention_heads} heads / {text.num_key_value_heads} kv heads, "
              f"{question_rows} query rows, {dtype_name} inputs (median of {args.repeats} after 1 warm-up):")
        print(f"  {'L':>6} {'before ms':>10} {'after ms':>9} {'speed-up':>8} {'matmul ms':>10} "
              f"{'before/matmul rate':>18} {'after/matmul rate':>17}")
        for length, before, after, matmul in scoring_speed(model, args, device, dtype, question_rows):
            print(f"  {length:>6} {before * 1e3:>10.2f} {after * 1e3:>9.2f} {before / after:>7.2f}x "
                  f"{matmul * 1e3:>10.2f} {matmul / before:>18.2f} {matmul / after:>17.2f}")


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its speed-ups use wall-clock median TTFTs")
    main()
