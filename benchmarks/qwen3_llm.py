"""bench_methods.py ``--family qwen3-vl``: a random-weight Qwen3-VL whose language model has
Qwen3-VL-8B's form scaled down like bench_stage2's (QK-norm, interleaved M-RoPE, GQA 4:1, an MLP
3 x hidden, DeepStack levels added after layers 0, 1, 2), and a prompt of Qwen3-VL's layout (per
temporal step ``<t seconds><|vision_start|>`` n pads ``<|vision_end|>``) whose visual tokens and
DeepStack levels are handed in as precomputed vision-encoder output: the tower is skipped, as in
the default mode, so TTFT and the FLOPs ideal are both the language model's prefill alone.

Qwen3-VL-8B's language model: 36 layers x 4096, 32 heads / 8 kv heads of 128, MLP 12288, and
3 DeepStack levels (from tower blocks 8, 16, 24) added after decoder layers 0, 1, 2.
"""

from __future__ import annotations

import torch
from bench_stage2 import QUESTION, SYSTEM, synthetic_video

from prunevid_bench.models.tiny import IM_END_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID, TinySizes, build_tokenizer

DEEPSTACK_LAYERS = 3  # Qwen3-VL-8B's levels: added after decoder layers 0, 1, 2
MLP_RATIO = 12288 / 4096  # Qwen3-VL-8B's MLP width over its hidden size


def qwen3_sizes(args) -> TinySizes:
    """The scaled language model from the options of ``add_model_arguments`` (``--intermediate``
    defaults to 8B's 3 x hidden); M-RoPE sections in 8B's [24, 20, 20] proportions."""
    half = args.hidden // args.heads // 2
    t = half * 24 // 64
    h = (half - t) // 2
    return TinySizes(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 64 * round(args.hidden * MLP_RATIO / 64),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        mrope_section=(t, h, half - t - h),
    )


def build_qwen3_model(args, device, dtype):
    """Qwen3-VL with the scaled LLM and ``DEEPSTACK_LAYERS`` levels; its (tiny) tower is never run."""
    from transformers import Qwen3VLForConditionalGeneration

    from prunevid_bench.models.tiny import seeded_model
    from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_config

    sizes = qwen3_sizes(args)
    if sizes.num_hidden_layers < DEEPSTACK_LAYERS:
        raise SystemExit(f"--family qwen3-vl needs at least {DEEPSTACK_LAYERS} layers (DeepStack adds after 0..2)")
    cfg = build_qwen3vl_config(sizes, "sdpa")
    cfg.vision_config.depth = DEEPSTACK_LAYERS + 1
    cfg.vision_config.deepstack_visual_indexes = list(range(DEEPSTACK_LAYERS))
    model = seeded_model(Qwen3VLForConditionalGeneration, cfg, 0)
    model.generation_config.eos_token_id = IM_END_ID
    return model.to(device=device, dtype=dtype)


def step_prompt_ids(t: int, n: int, device, question: str = QUESTION) -> torch.Tensor:
    """[1, L] prompt ids in the per-step layout of Qwen3-VL and Qwen3.5: the system text, then per
    temporal step ``<t seconds>`` (1 s per step, from 0.5 s) and a vision run of ``n`` pads, then
    ``question`` (bench_stage2's by default)."""
    tok = build_tokenizer()
    ids = tok(SYSTEM, add_special_tokens=False)["input_ids"]
    for step in range(t):
        ids += tok(f"<{step + 0.5:.1f} seconds>", add_special_tokens=False)["input_ids"]
        ids += [VISION_START_ID] + [VIDEO_PAD_ID] * n + [VISION_END_ID]
    ids += tok(question, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], device=device)


def build_qwen3_inputs(model, grid: tuple[int, int, int], device, dtype) -> dict:
    """bench_stage2's prompt and synthetic video in Qwen3-VL's per-step layout (each step's
    timestamp at 1 s per step, from 0.5 s), with one synthetic [V, C] tensor per DeepStack level."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    t, h, w = grid
    n = h * w // 4
    input_ids = step_prompt_ids(t, n, device)
    dim = model.config.get_text_config().hidden_size
    embeds = synthetic_video(t, n, dim).to(device, dtype)
    levels = [(synthetic_video(t, n, dim, seed=1 + i).to(device, dtype),) for i in range(DEEPSTACK_LAYERS)]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == VIDEO_PAD_ID).long() * 2,
        "video_grid_thw": torch.tensor([list(grid)], device=device),
        "mm_encoder_outputs": {"video": BaseModelOutputWithDeepstackFeatures(pooler_output=(embeds,),
                                                                             deepstack_features=levels)},
    }
