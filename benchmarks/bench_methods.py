"""Each method's TTFT against its ideal, and its own cost (selection / merging) as a share of the
baseline's TTFT, on the scaled model of bench_stage2.py at several visual-token counts.

    PYTHONPATH=src python benchmarks/bench_methods.py --device cpu --threads 1 --tokens 4096 8192 --repeats 3
    PYTHONPATH=src python benchmarks/bench_methods.py --smoke        # tiny sizes, a few seconds
    PYTHONPATH=src python benchmarks/bench_methods.py --variants baseline tome --tokens 4096
    PYTHONPATH=src python benchmarks/bench_methods.py --tower qwen2.5-vl-7b --tower-depth 8 --tokens 512
    PYTHONPATH=src python benchmarks/bench_methods.py --family qwen3-vl --tokens 4096 8192 --threads 1

With ``--tower`` the prompt's video goes through a vision tower of a real checkpoint's shape
(``tower_model.py``: Qwen2.5-VL-7B's 32 x 1280 or Qwen3-VL-8B's 27 x 1152; ``--tower-depth``
fewer blocks at the same relative layout) in front of the same scaled language model, TTFT
includes the tower, and the variants are ``TOWER_VARIANTS``: ToMe inside the tower's blocks at
the ``r`` that halves the blocks' mean token count (unmerge and 2x2-group mergers), and with
LLM-side ToMe after it. The FLOPs model then counts the tower's blocks with the token counts
each block really had, and a second table sets the tower's own time against its ideal.

The model and the inputs are bench_stage2.py's (imported from it): a random-weight Qwen2.5-VL
language model scaled down from 7B, fed thousands of visual tokens as precomputed
vision-encoder output (the vision tower is skipped; it is the same for every variant). Every
variant is a run config built from ``VARIANTS`` (label -> config overrides, one line each) and
installed with ``apply_methods`` on the same loaded model, at the matched budget ``--budget``
where the method has a budget knob. With ``--family qwen3-vl`` the same variants run on a
Qwen3-VL whose language model has Qwen3-VL-8B's form at the same scale, DeepStack levels added
after layers 0-2 (``qwen3_llm.py``; the tower skipped likewise, its levels handed in with the
visual tokens).

The variants take turns: each round runs every variant once, so a change of the shared
machine's load falls on all of them alike. Per variant and token count: the visual tokens kept,
the median (min-max) TTFT of the timed rounds after the warm-up rounds, the ideal TTFT (the baseline's TTFT divided by the ideal speed-up from the
analytic FLOPs model with the measured token counts), the method's own time (the handle's clock
marks around its reduce/select: CUDA events on a GPU, perf_counter on the CPU) and its share of
the baseline's TTFT, against the goal of at most 3%. Memory as in bench_stage2.py, one extra run.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass

from bench_stage2 import PeakMemory, add_model_arguments, build_inputs, build_model, grid_for, mib, print_machine, setup, spread
from qwen3_llm import build_qwen3_inputs, build_qwen3_model

from prunevid_bench import flops as fl
from prunevid_bench.config import build_config
from prunevid_bench.engine import run_greedy
from prunevid_bench.families import family_of
from prunevid_bench.measure import Clock
from prunevid_bench.methods import place_key
from prunevid_bench.patch import apply_methods

BUDGET = object()  # stands for --budget in VARIANTS
GOAL = 0.03  # a method's own time at most 3% of the baseline's TTFT (PruneVid's share; issue 14)

# label -> config overrides (``--set`` keys); add a line to add a variant. Each comparator at the
# matched budget through its own budget key; random has none, so its per-group share is the budget.
# (Stage 1 in the vision tower, ``stage1.space: vision``, needs the tower these inputs skip.)
VARIANTS: list[tuple[str, dict]] = [
    ("baseline", {}),
    ("prunevid", {"stage1.enabled": True, "stage2.enabled": True}),  # the official default (keep 0.4 per group)
    ("prunevid@B", {"stage1.enabled": True, "stage2.enabled": True, "stage2.budget": BUDGET}),
    ("fastv", {"fastv.enabled": True, "fastv.budget": BUDGET}),
    ("tome", {"tome.enabled": True, "tome.budget": BUDGET}),
    ("tome+prop", {"tome.enabled": True, "tome.budget": BUDGET, "tome.proportional_attention": True}),
    ("evs", {"evs.enabled": True, "evs.budget": BUDGET}),
    ("vidcom2", {"vidcom2.enabled": True, "vidcom2.budget": BUDGET}),
    ("random", {"random.enabled": True, "random.keep_ratio": BUDGET}),
    ("visionzip", {"visionzip.enabled": True, "visionzip.budget": BUDGET}),  # the port's norm score
    ("fastvid", {"fastvid.enabled": True, "fastvid.budget": BUDGET}),  # tower attention: the stand-in below
    ("flashvid", {"flashvid.enabled": True, "flashvid.budget": BUDGET}),
    ("flashvid+L", {"flashvid.enabled": True, "flashvid.budget": BUDGET, "flashvid_llm.enabled": True}),
    ("holitom", {"holitom.enabled": True, "holitom.budget": BUDGET}),
    ("holitom+M", {"holitom.enabled": True, "holitom.budget": BUDGET, "holitom.inner_merge": True}),  # + the merge at 18/28
    ("dycoke", {"dycoke.enabled": True, "dycoke.budget": BUDGET}),  # TTM; its KV pruning acts while decoding, after TTFT
]


TOWER_R = object()  # stands for the r that halves the tower blocks' mean token count (per unit: patch or 2x2 group)
TOWER_VARIANTS: list[tuple[str, dict]] = [
    ("baseline", {}),
    ("tome_vis", {"tome_vision.enabled": True, "tome_vision.r": TOWER_R}),
    ("tome_vis-g", {"tome_vision.enabled": True, "tome_vision.r": TOWER_R, "tome_vision.merger": "groups"}),
    ("tome_vis+t", {"tome_vision.enabled": True, "tome_vision.r": TOWER_R, "tome.enabled": True, "tome.budget": BUDGET}),
]


def halving_r(units: int, depth: int, share: float = 0.5) -> int:
    """The smallest constant r whose blocks see on average at most ``share`` of a frame's
    ``units`` tokens (each block removes min(r, half of what is left), ToMe's cap)."""
    for r in range(1, units):
        n, total = units, 0
        for _ in range(depth):
            total += n
            n -= min(r, n // 2)
        if total <= share * units * depth:
            return r
    return units // 2


@dataclass
class Result:
    label: str
    methods: list[str]
    visual_before: int
    visual_kept: int
    ttft: list[float]
    own_s: list[float]  # all the variant's methods together, per timed run
    per_method_s: dict[str, list[float]]
    kv_bytes: int
    peak_bytes: int
    flops: fl.Flops
    flops_baseline: fl.Flops
    tower_s: list[float] = None  # the vision encoder's time per timed run (--tower)
    tower_blocks: list | None = None  # its blocks' (attention tokens, pairs, MLP tokens), when merged


def variant_config(overrides: dict, budget: float, tower_r: dict | None = None):
    """The run config of one variant; ``tower_r``: merger mode -> the halving r (``--tower``)."""
    def value(key, v):
        if v is TOWER_R:
            return tower_r["groups" if overrides.get("tome_vision.merger") == "groups" else "unmerge"]
        return budget if v is BUDGET else v

    return build_config(overrides={k: value(k, v) for k, v in overrides.items()})


def tower_attention_stand_in(handle, model, inputs: dict, args):
    """These inputs skip the vision tower, so the methods that read its last block's attention
    (FastVID, FlashVID) get it computed here, at the start of the prefill (inside the TTFT, on the
    handle's clock, so in "own ms"), by the same rule (``stages.vision_attention``) on random q/k
    of a tower scaled like this LLM (its heads and head size; 4 patches per token). Returns the
    hook (``remove()``), or None when no method reads the tower."""
    import torch

    from prunevid_bench.families import family_of
    from prunevid_bench.stages.vision_attention import step_scores

    if handle is None or not handle.vision_rules:
        return None
    t, h, w = inputs["video_grid_thw"][0].tolist()
    gen = torch.Generator().manual_seed(1)
    qk = [torch.randn(args.heads, t * h * w, args.hidden // args.heads, generator=gen).to(inputs["input_ids"].device)
          for _ in range(2)]

    def hook(module, hook_args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            start = handle.clock.mark()
            scores = {f"vision_{rule}": step_scores(*qk, [h * w] * t, 4, rule) for rule in handle.vision_rules}
            handle.supply_vision_scores(scores, [(t, h * w // 4)], (start, handle.clock.mark()))

    return family_of(model).base(model).register_forward_pre_hook(hook, with_kwargs=True)


def one_run(model, cfg, inputs: dict, args, device, memory: PeakMemory | None = None):
    """One prefill + decode with ``cfg``'s methods installed (removed after): the engine's output,
    each method's seconds, the handle's report and its layer K (None without an LLM-layer method)."""
    handle = apply_methods(model, cfg) if cfg.enabled_methods or cfg.prefill.chunk_tokens else None
    stand_in = tower_attention_stand_in(handle, model, inputs, args)
    try:
        if memory:
            memory.start()
        out = run_greedy(model, inputs, args.new_tokens, clock=handle.clock if handle else Clock(device))
        peak = memory.stop(out) if memory else 0
        # each place a method acts at before the first token (a decode stage's time is not TTFT's)
        seconds = {place_key(m, p, c): handle.seconds(place_key(m, p, c)) for m, c, p in handle.placed if p != "decode"} \
            if handle else {}
        report = handle.report() if handle else None
        layer = handle.score_layer if handle and handle.layer_method else None  # the last layer on every token
    finally:
        if handle:
            handle.remove()
        if stand_in:
            stand_in.remove()
    return out, seconds, report, layer, peak


def measure(variants: list[tuple[str, dict]], model, inputs: dict, args, device) -> list[Result]:
    """Every variant once per round, round after round (warm-up rounds first), so that a change
    of the shared machine's load falls on all variants alike; then one memory run each."""
    configs = [(label, variant_config(overrides, args.budget, getattr(args, "tower_r", None))) for label, overrides in variants]
    ttft = {label: [] for label, _ in configs}
    tower = {label: [] for label, _ in configs}
    per_method = {label: {} for label, _ in configs}
    for i in range(args.warmup + args.repeats):
        for label, cfg in configs:
            out, seconds, *_ = one_run(model, cfg, inputs, args, device)
            if i >= args.warmup:
                ttft[label].append(out.ttft_s)
                tower[label].append(out.vision_encoder_s)
                for n, s in seconds.items():
                    per_method[label].setdefault(n, []).append(s)
    prompt_len = inputs["input_ids"].shape[1]
    results = []
    for label, cfg in configs:
        out, _, report, layer, peak = one_run(model, cfg, inputs, args, device, PeakMemory(device))
        if report is None:
            llm_len, kept, dropped, scored = prompt_len, out.visual_tokens, 0, 0
        else:
            llm_len, kept = report["llm_prefill_tokens"], report["tokens_after"]
            dropped, scored = report["tokens_before"] - report["tokens_after"], report["scored_rows"]
        if getattr(args, "tower", None):  # the tower's real shape and grid, its blocks with the tokens they had
            vision, grids = family_of(model).vision_shape(model.config), inputs["video_grid_thw"].tolist()
        else:  # the vision encoder is skipped here (grids=[]): only the LLM's prefill is compared
            vision, grids = fl.QWEN25_VL_7B_VISION, []
        blocks = report["tower_blocks"] if report is not None else None
        skipped = report["merger_rows_skipped"] if report is not None else 0
        run, base = fl.run_flops(model.config, vision, grids, prompt_len, llm_len, layer, dropped, scored, skipped, blocks)
        own = [sum(runs) for runs in zip(*per_method[label].values())] if cfg.enabled_methods else []
        results.append(Result(label, cfg.enabled_methods, out.visual_tokens, kept, ttft[label], own,
                              per_method[label], out.kv_cache_bytes, peak, run, base, tower[label], blocks))
    return results


def print_table(results: list[Result]) -> None:
    base_ttft = statistics.median(results[0].ttft)
    header = (f"{'variant':<13} {'visual kept':>17} {'TTFT ms':>22} {'ideal ms':>9} {'/ideal':>6} "
              f"{'own ms':>8} {'own/base':>8} {'<=3%':>4} {'KV MiB':>6} {'peak MiB':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        ideal = base_ttft / fl.ideal_speedup(r.flops_baseline, r.flops)
        kept = f"{r.visual_kept}/{r.visual_before} {r.visual_kept / r.visual_before:.3f}"
        if r.methods:
            share = statistics.median(r.own_s) / base_ttft
            own = f"{statistics.median(r.own_s) * 1e3:>8.1f} {share:>7.2%} {'pass' if share <= GOAL else 'FAIL':>4}"
        else:
            own = f"{'-':>8} {'-':>8} {'-':>4}"
        print(f"{r.label:<13} {kept:>17} {spread(r.ttft, 1e3):>22} {ideal * 1e3:>9.0f} "
              f"{statistics.median(r.ttft) / ideal:>6.2f} {own} {mib(r.kv_bytes):>6} {mib(r.peak_bytes):>8}")
    several = [r for r in results if len(r.per_method_s) > 1]
    for r in several:
        parts = ", ".join(f"{n} {statistics.median(v) * 1e3:.1f} ms" for n, v in r.per_method_s.items())
        print(f"  {r.label}: {parts}")


def print_chunked(results: list[Result], chunk: int) -> None:
    """Each variant whole and chunked (``LABEL/c``): TTFT and peak memory side by side."""
    by_label = {r.label: r for r in results}
    base_peak = by_label["baseline"].peak_bytes
    print(f"\nchunked prefill (--chunk-tokens {chunk}) beside whole: peak MiB, and / the baseline's whole peak")
    header = f"{'variant':<11} {'TTFT ms':>9} {'chunked':>9} {'+%':>6} {'peak MiB':>8} {'chunked':>8} {'x base':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        c = by_label.get(f"{r.label}/c")
        if c is None:
            continue
        whole_ms, chunk_ms = statistics.median(r.ttft) * 1e3, statistics.median(c.ttft) * 1e3
        print(f"{r.label:<11} {whole_ms:>9.0f} {chunk_ms:>9.0f} {chunk_ms / whole_ms - 1:>+6.1%} "
              f"{mib(r.peak_bytes):>8} {mib(c.peak_bytes):>8} {c.peak_bytes / base_peak:>6.2f}")


def print_tower_table(results: list[Result], patches: int) -> None:
    """The tower's own time against its ideal (its FLOPs with each block's real token count);
    block tokens: the blocks' mean token count over the tower's ``patches``."""
    base_tower = statistics.median(results[0].tower_s)
    header = f"{'variant':<11} {'block tokens':>12} {'tower ms':>22} {'ideal ms':>9} {'/ideal':>6} {'TTFT ms':>9}"
    print(header)
    print("-" * len(header))
    full = results[0].flops_baseline.vision
    for r in results:
        ideal = base_tower / (full / r.flops.vision)
        mean = sum(b[0] for b in r.tower_blocks) / len(r.tower_blocks) if r.tower_blocks else patches
        tokens = f"{mean / patches:.3f}"
        print(f"{r.label:<11} {tokens:>12} {spread(r.tower_s, 1e3):>22} {ideal * 1e3:>9.0f} "
              f"{statistics.median(r.tower_s) / ideal:>6.2f} {statistics.median(r.ttft) * 1e3:>9.0f}")


def run_tower(args, device, dtype, chosen: set[str]) -> None:
    """``--tower``: the real-shape tower in front of the scaled LLM, ToMe inside it."""
    from bench_stage2 import llm_sizes
    from tower_model import TOWERS, build_tower_model, tower_grid, tower_inputs

    model = build_tower_model(args.tower, args.tower_depth, llm_sizes(args), device, dtype)
    print_machine(model, device, dtype_name_of(dtype))
    spec, depth = TOWERS[args.tower], len(family_of(model).vision_encoder(model).blocks)
    print(f"vision tower: {args.tower}'s shape ({spec['hidden']} wide, {depth} of its {spec['depth']} blocks), "
          f"random weights; TTFT includes it; the language model above in {family_of(model).model_type}'s form")
    variants = [(label, o) for label, o in TOWER_VARIANTS if label in chosen or label == "baseline"]
    if family_of(model).deepstack_levels(model):  # DeepStack: the 2x2-group merger is not supported
        variants = [(label, o) for label, o in variants if o.get("tome_vision.merger") != "groups"]
    for tokens in args.tokens:
        grid = tower_grid(tokens * 4 // args.frames, args.frames, 8 if spec["family"] == "qwen2_5_vl" else 2)
        per_frame = grid[1] * grid[2]
        args.tower_r = {"unmerge": args.tower_r_value or halving_r(per_frame, depth),
                        "groups": args.tower_r_value or halving_r(per_frame // 4, depth)}
        inputs = tower_inputs(model, args.tower, grid, device, dtype)
        print(f"\n{per_frame * grid[0] // 4} visual tokens (grid {list(grid)}: {per_frame * grid[0]} patches in the "
              f"tower), r = {args.tower_r['unmerge']} patches / {args.tower_r['groups']} groups per frame and block; "
              f"load average {os.getloadavg()[0]:.2f} at the start")
        results = measure(variants, model, inputs, args, device)
        print_table(results)
        print()
        print_tower_table(results, per_frame * grid[0])
        print(f"load average {os.getloadavg()[0]:.2f} at the end")


def dtype_name_of(dtype) -> str:
    return str(dtype).replace("torch.", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="visual tokens before any method, each rounded to the grid (default 4096 8192; smoke 256)")
    parser.add_argument("--budget", type=float, default=0.25, help="matched budget: kept fraction of the visual tokens")
    parser.add_argument("--variants", nargs="+", default=None,
                        choices=list(dict.fromkeys(label for label, _ in VARIANTS + TOWER_VARIANTS)),
                        help="a subset of the variants (the baseline always runs)")
    parser.add_argument("--new-tokens", type=int, default=2, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported); a round runs each variant once")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before them")
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="also run every variant with prefill.chunk_tokens N (as LABEL/c): TTFT and peak memory beside whole")
    parser.add_argument("--tower", choices=["qwen2.5-vl-7b", "qwen3-vl-8b"], default=None,
                        help="run the video through a vision tower of this checkpoint's shape (TTFT includes it)")
    parser.add_argument("--tower-depth", type=int, default=None, help="fewer tower blocks than the real depth")
    parser.add_argument("--tower-r", dest="tower_r_value", type=int, default=None,
                        help="tome_vision's r (default: the r that halves the blocks' mean token count)")
    parser.add_argument("--family", choices=["qwen2.5-vl", "qwen3-vl"], default="qwen2.5-vl",
                        help="the language model's form: qwen3-vl = Qwen3-VL-8B's (QK-norm, DeepStack at layers 0-2)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one run per variant: checks the script works, measures nothing")
    args = parser.parse_args()
    if args.smoke:
        args.frames, args.layers, args.hidden, args.heads = 8, 3 if args.family == "qwen3-vl" else 2, 64, 4
        args.repeats, args.warmup, args.new_tokens = 1, 0, 1
        args.threads = args.threads or 1  # two threads on a busy two-core box oversubscribe it
    args.tokens = args.tokens or ([256] if args.smoke else [4096, 8192])
    table = TOWER_VARIANTS if args.tower else VARIANTS
    chosen = set(args.variants or [label for label, _ in table]) | {"baseline"}
    variants = [(label, o) for label, o in table if label in chosen]
    if args.chunk_tokens:
        variants += [(f"{label}/c", {**o, "prefill.chunk_tokens": args.chunk_tokens}) for label, o in variants]

    device, dtype_name, dtype = setup(args)
    if args.tower and args.family != "qwen2.5-vl":
        parser.error("--family applies without --tower (--tower picks its own family)")
    if args.tower:
        if args.smoke:
            args.tower_depth = args.tower_depth or 2
        return run_tower(args, device, dtype, chosen)
    qwen3 = args.family == "qwen3-vl"
    model = (build_qwen3_model if qwen3 else build_model)(args, device, dtype)
    if qwen3:
        print_machine(model, device, dtype_name, "Qwen3-VL")
        print(f"  Qwen3-VL-8B's form (36 x 4096, 32/8 heads of 128, MLP 12288) scaled down; QK-norm, interleaved "
              f"M-RoPE; DeepStack: {family_of(model).deepstack_levels(model)} levels added after layers 0..2")
    else:
        print_machine(model, device, dtype_name)
    print(f"budget {args.budget} (kept fraction of the visual tokens, through each method's budget key; "
          f"random: its per-group keep_ratio); each method's other keys at their defaults")
    print(f"timing: median (min-max) of {args.repeats} rounds after {args.warmup} warm-up "
          f"(a round runs every variant once, in turn); "
          f"memory: {PeakMemory(device).kind}")
    print("ideal ms = baseline TTFT / ideal speed-up; ideal speed-up = baseline LLM prefill FLOPs / the variant's,")
    print("  with its measured token counts (flops.run_flops: layers 0..K and K+1.., causal attention, plus the")
    print("  Stage-2/FastV score's q.k rows). A method's own selection/merge work is NOT in the FLOPs model apart")
    print("  from that score, nor is tome+prop's bias (extra q/k channels); the vision encoder is skipped by every variant.")
    print("own ms = the methods' own time (handle clock marks around reduce/select, incl. KV compaction for")
    print(f"  LLM-layer methods); own/base = own ms / the baseline's median TTFT at that token count; goal <= {GOAL:.0%}.")
    if qwen3:
        print("  Qwen3-VL: its DeepStack adds (levels x visual rows x hidden) and QK-norm are elementwise, left out like")
        print("  every norm and residual add (under 0.1% of the prefill's FLOPs here); its q/k/v/o and MLP shapes are in.")
    print("fastvid, flashvid read the tower's last-block attention: the tower is skipped, so it is computed by their rule")
    print("  at the prefill's start on random q/k of a tower scaled like this LLM (in TTFT and own ms).")

    for tokens in args.tokens:
        grid = grid_for(tokens, args.frames)
        inputs = (build_qwen3_inputs if qwen3 else build_inputs)(model, grid, device, dtype)
        print(f"\n{int(inputs['mm_token_type_ids'].bool().sum())} visual tokens (grid {list(grid)}), "
              f"prompt {inputs['input_ids'].shape[1]} tokens, load average {os.getloadavg()[0]:.2f} at the start")
        results = measure(variants, model, inputs, args, device)
        print_table(results)
        if args.chunk_tokens:
            print_chunked(results, args.chunk_tokens)
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
        del inputs


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its speed-ups use wall-clock median TTFTs")
    main()
