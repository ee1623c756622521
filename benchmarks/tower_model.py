"""A model whose vision tower has a real checkpoint's shape (random weights) in front of
bench_stage2's scaled-down language model, and a video prompt whose pixels go through that tower,
so TTFT includes the tower (bench_methods.py ``--tower``).

Towers (``TOWERS``): Qwen2.5-VL-7B's (32 blocks x 1280, SwiGLU 3420, 16 heads, window attention
in 112-px windows, full attention in blocks 7, 15, 23, 31) and Qwen3-VL-8B's (27 blocks x 1152,
GELU 4304, 16 heads, 16-px patches, DeepStack mergers after blocks 8, 16, 24). ``depth`` below
the real one keeps the same relative positions of the full-attention / DeepStack blocks (a
smaller run on a shared CPU); the width is always the real one.
"""

from __future__ import annotations

import torch

from prunevid_bench.models.tiny import (IM_END_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID, TinySizes,
                                        build_config, build_tokenizer, seeded_model)

TOWERS = {
    "qwen2.5-vl-7b": dict(family="qwen2_5_vl", depth=32, hidden=1280, intermediate=3420, heads=16, patch=14,
                          special=(7, 15, 23, 31)),
    "qwen3-vl-8b": dict(family="qwen3_vl", depth=27, hidden=1152, intermediate=4304, heads=16, patch=16,
                        special=(8, 16, 24)),
}
QUESTION = "What happens in the video? Answer briefly."


def _scaled(blocks, real: int, depth: int) -> list[int]:
    """The real tower's special blocks at the same relative depth in a ``depth``-block tower."""
    return sorted({min(depth - 1, round((b + 1) * depth / real) - 1) for b in blocks})


def build_tower_model(name: str, depth: int | None, sizes: TinySizes, device, dtype):
    spec = TOWERS[name]
    depth = depth or spec["depth"]
    sizes = TinySizes(**{**sizes.__dict__, "vision_depth": depth, "vision_hidden_size": spec["hidden"],
                         "vision_intermediate_size": spec["intermediate"], "vision_heads": spec["heads"]})
    special = _scaled(spec["special"], spec["depth"], depth)
    if spec["family"] == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        cfg = build_config(sizes, "sdpa")
        cfg.vision_config.window_size, cfg.vision_config.fullatt_block_indexes = 112, special
        model = seeded_model(Qwen2_5_VLForConditionalGeneration, cfg, 0)
    else:
        from transformers import Qwen3VLForConditionalGeneration

        from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_config

        cfg = build_qwen3vl_config(sizes, "sdpa")
        vision = cfg.vision_config
        vision.depth, vision.deepstack_visual_indexes, vision.num_position_embeddings = depth, special, 2304
        model = seeded_model(Qwen3VLForConditionalGeneration, cfg, 0)
    model.generation_config.eos_token_id = IM_END_ID
    return model.to(device=device, dtype=dtype)


def tower_inputs(model, name: str, grid: tuple[int, int, int], device, dtype) -> dict:
    """A prompt around one video of grid (t, h, w) patches with random pixels: one placeholder run
    (Qwen2.5-VL), or one run per temporal step (Qwen3-VL)."""
    spec = TOWERS[name]
    tok = build_tokenizer()
    t, h, w = grid
    n = h * w // 4
    runs = [[VISION_START_ID] + [VIDEO_PAD_ID] * n * t + [VISION_END_ID]] if spec["family"] == "qwen2_5_vl" else \
        [[VISION_START_ID] + [VIDEO_PAD_ID] * n + [VISION_END_ID] for _ in range(t)]
    ids = [tok_id for run in runs for tok_id in run] + tok(QUESTION, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids], device=device)
    pixels = torch.randn(t * h * w, 3 * 2 * spec["patch"] ** 2, generator=torch.Generator().manual_seed(0))
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == VIDEO_PAD_ID).long() * 2,
        "pixel_values_videos": pixels.to(device, dtype),
        "video_grid_thw": torch.tensor([list(grid)], device=device),
    }
    if spec["family"] == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([1.0], device=device)
    return inputs


def tower_grid(patches_per_frame: int, frames: int, window: int = 8) -> tuple[int, int, int]:
    """(t, h, w) with about ``patches_per_frame`` patches per temporal step, sides multiples of
    ``window`` patches (Qwen2.5-VL's 112-px window is 8 patches; Qwen3-VL needs only 2)."""
    side = max(window, round(patches_per_frame**0.5 / window) * window)
    return frames, side, side
