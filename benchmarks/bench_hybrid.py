"""Every method on a hybrid (Qwen3.5-shaped) language model: measured TTFT beside the ideal one.

    PYTHONPATH=src python benchmarks/bench_hybrid.py --device cpu --threads 1 --tokens 4096 8192 --repeats 2
    PYTHONPATH=src python benchmarks/bench_hybrid.py --smoke        # tiny sizes, a few seconds

The language model is Qwen3.5-9B's (``Qwen3_5TextConfig``'s defaults: hidden 4096, MLP 12288,
gated full attention with 16 heads / 4 kv heads of 256 and rotary on a quarter of each head,
Gated DeltaNet with 16 key heads / 32 value heads of 128, conv 4, three linear layers to one
full) with every width divided by ``--scale`` (head sizes kept, head counts divided) and
``--layers`` layers in the same 3:1 pattern, random weights. Its input is thousands of visual
tokens as precomputed vision-encoder output in Qwen3.5's layout (one placeholder run per
temporal step, each after its timestamp); the tower is skipped, as in bench_methods.py, whose
variants, rounds and table this script reuses. "ideal ms" comes from the analytic FLOPs model,
which counts the linear layers' projections, short conv and chunked delta rule
(``flops.gated_deltanet_flops``) and the gated full-attention layers.

What a hybrid changes: a pre-LLM method shortens every layer's input; an LLM-layer method scores
at a full-attention layer (a relative K moves down to one) and compacts only the full-attention
layers' caches, while the linear layers 0..K have already run on every token.
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_methods import VARIANTS, measure, print_table
from bench_stage2 import PeakMemory, mib, setup, synthetic_video
from qwen3_llm import step_prompt_ids

from prunevid_bench.measure import state_bytes
from prunevid_bench.models.tiny import VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID

QUESTION = ("What is the person in the video doing? Options: A. cooking B. reading C. running D. sleeping. "
            "Answer with the option's letter.<|im_end|>\n<|im_start|>assistant\n")


def build_model(args, device, dtype):
    """Qwen3.5-9B's language model with widths / ``args.scale`` and ``args.layers`` layers."""
    import transformers

    from prunevid_bench.models.tiny import IMAGE_PAD_ID, seeded_model

    s = args.scale
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(args.layers)]
    text = dict(vocab_size=300, hidden_size=4096 // s, intermediate_size=12288 // s, num_hidden_layers=args.layers,
                layer_types=types, num_attention_heads=max(1, 16 // s), num_key_value_heads=max(1, 4 // s), head_dim=256,
                linear_num_key_heads=max(1, 16 // s), linear_num_value_heads=max(1, 32 // s), linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel_dim=4, max_position_embeddings=65536,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "mrope_section": [11, 11, 10],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25},
                eos_token_id=258, pad_token_id=256)
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=4096 // s)
    cfg = transformers.Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD_ID,
                                     video_token_id=VIDEO_PAD_ID, vision_start_token_id=VISION_START_ID,
                                     vision_end_token_id=VISION_END_ID)
    cfg._attn_implementation = "sdpa"
    return seeded_model(transformers.Qwen3_5ForConditionalGeneration, cfg, 0).to(device=device, dtype=dtype)


def grid_for(tokens: int, frames: int) -> tuple[int, int, int]:
    """(t, h, w) in patches for about ``tokens`` merged tokens over ``frames`` grid steps."""
    per_frame = max(1, round(tokens / frames))
    side_h = max(1, int(per_frame**0.5))
    return frames, 2 * side_h, 2 * max(1, round(per_frame / side_h))


def build_inputs(model, grid: tuple[int, int, int], device, dtype) -> dict:
    """The prompt in Qwen3.5's layout: per temporal step ``<t seconds>`` + a vision run."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t, h, w = grid
    n = h * w // 4
    input_ids = step_prompt_ids(t, n, device, QUESTION)
    embeds = synthetic_video(t, n, model.config.get_text_config().hidden_size).to(device, dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == VIDEO_PAD_ID).long() * 2,
        "video_grid_thw": torch.tensor([list(grid)], device=device),
        "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=(embeds,))},
    }


def print_machine(model, device, dtype_name: str, args) -> None:
    import platform
    import sys

    import transformers

    text = model.config.get_text_config()
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at start")
    print(f"machine: {platform.platform()} | {hardware}")
    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | transformers {transformers.__version__} "
          f"| device {device} | dtype {dtype_name} | attention sdpa")
    full = [i for i, k in enumerate(text.layer_types) if k == "full_attention"]
    print(f"model: random Qwen3.5-9B-shaped LLM, widths / {args.scale}, {text.num_hidden_layers} layers (full attention "
          f"at {full}), hidden {text.hidden_size}, MLP {text.intermediate_size}, {text.num_attention_heads} heads / "
          f"{text.num_key_value_heads} kv heads of {text.head_dim}, DeltaNet {text.linear_num_key_heads} k / "
          f"{text.linear_num_value_heads} v heads of {text.linear_value_head_dim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (cpu float32, cuda bfloat16), float32, bfloat16, float16")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--frames", type=int, default=16, help="temporal grid steps")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (Qwen3.5-9B: 32), every 4th full attention")
    parser.add_argument("--scale", type=int, default=8, help="divide Qwen3.5-9B's widths (hidden, MLP, head counts) by this")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="visual tokens (default 4096 8192 16384)")
    parser.add_argument("--budget", type=float, default=0.25, help="matched budget: kept fraction of the visual tokens")
    parser.add_argument("--variants", nargs="+", default=None, choices=[label for label, _ in VARIANTS])
    parser.add_argument("--new-tokens", type=int, default=2, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before them")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run per variant: checks the script works")
    parser.add_argument("--ideal-only", action="store_true", help="only the full-scale ideal speed-ups (arithmetic)")
    args = parser.parse_args()
    if args.ideal_only:
        return ideal_at_full_scale(args.tokens or [4096, 8192, 16384], args.budget)
    if args.smoke:
        args.frames, args.layers, args.scale, args.repeats, args.warmup, args.new_tokens = 4, 8, 16, 1, 0, 1
        args.threads = args.threads or 1
    args.tokens = args.tokens or ([256] if args.smoke else [4096, 8192, 16384])
    chosen = set(args.variants or [label for label, _ in VARIANTS]) | {"baseline"}
    variants = [(label, o) for label, o in VARIANTS if label in chosen]

    device, dtype_name, dtype = setup(args)
    model = build_model(args, device, dtype)
    print_machine(model, device, dtype_name, args)
    print(f"budget {args.budget} through each method's budget key (random: its per-group keep_ratio); "
          f"prunevid at its official default; timing: median (min-max) of {args.repeats} rounds after "
          f"{args.warmup} warm-up; memory: {PeakMemory(device).kind}")
    print("ideal ms = baseline TTFT / (baseline LLM prefill FLOPs / the variant's), measured token counts; the"
          " vision tower is skipped; KV MiB: the full-attention layers' keys and values only")
    for tokens in args.tokens:
        grid = grid_for(tokens, args.frames)
        inputs = build_inputs(model, grid, device, dtype)
        print(f"\n{int(inputs['mm_token_type_ids'].bool().sum())} visual tokens (grid {list(grid)}), prompt "
              f"{inputs['input_ids'].shape[1]} tokens, load average {os.getloadavg()[0]:.2f} at the start")
        print_table(measure(variants, model, inputs, args, device))
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
    ideal_at_full_scale(args.tokens, args.budget)
    cache = _states_after_prefill(model, inputs)
    print(f"recurrent + conv states of the {sum(k == 'linear_attention' for k in model.config.get_text_config().layer_types)}"
          f" linear layers: {mib(state_bytes(cache))} MiB, whatever the prompt's length")


def ideal_at_full_scale(token_counts: list[int], budget: float) -> None:
    """The analytic ideal speed-up of each kind of method on the real Qwen3.5-9B language model
    (32 layers, full attention at 3, 7, .., 31) and on the same model made dense (every layer full
    attention), with ``budget`` of the visual tokens kept: before the LLM, or after K = 11 (PruneVid's
    "10/28", a full-attention layer) or after K - 1 = 3 (FastV's "2/28" -> 2 scores layer 1,
    linear: moved to 3). Arithmetic only (flops.py), nothing run."""
    import dataclasses

    from transformers import Qwen3_5TextConfig

    from prunevid_bench import flops as fl

    hybrid = fl.TextShape.from_config(Qwen3_5TextConfig())
    dense = dataclasses.replace(hybrid, layer_types=())
    text_rows = 200
    print(f"\nideal prefill speed-up at full scale (Qwen3.5-9B LLM, {text_rows} text tokens, keep {budget:.0%} "
          "of the visual tokens; the vision tower left out)")
    print(f"{'visual':>7} {'model':<7} {'before LLM':>10} {'after K=11':>10} {'after K-1=3':>11}")
    for n in token_counts:
        prompt, kept = n + text_rows, round(budget * n) + text_rows
        for name, shape in (("hybrid", hybrid), ("dense", dense)):
            base = fl.llm_prefill_flops(shape, [prompt] * shape.num_layers)
            cells = [fl.llm_prefill_flops(shape, [kept] * shape.num_layers)]
            for k in (11, 3):
                cells.append(fl.llm_prefill_flops(shape, fl.tokens_per_layer(shape.num_layers, prompt, k, kept)))
            print(f"{n:>7} {name:<7} " + " ".join(f"{fl.ideal_speedup(base, c):>{w}.2f}x" for c, w in zip(cells, (9, 9, 10))))


@torch.inference_mode()
def _states_after_prefill(model, inputs):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
    return cache


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its speed-ups use wall-clock median TTFTs")
    main()
