"""Qwen2.5-VL (transformers 5.x ``modeling_qwen2_5_vl``): M-RoPE whose temporal ids follow the
video's timing (``second_per_grid_ts``), window attention in the vision tower."""

from __future__ import annotations

from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from prunevid_bench.families import register_family
from prunevid_bench.families.base import Family


def _tiny(seed: int = 0, attn_implementation: str = "sdpa"):
    from prunevid_bench.models.tiny import build_tiny_model

    return build_tiny_model(seed=seed, attn_implementation=attn_implementation)


QWEN2_5_VL = register_family(Family(
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    rope_inputs=("video_grid_thw", "image_grid_thw", "second_per_grid_ts"),
    apply_rotary=apply_rotary_pos_emb,
    build_tiny=_tiny,
))
