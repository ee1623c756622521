"""Qwen2.5-VL (transformers 5.x ``modeling_qwen2_5_vl``): M-RoPE whose temporal ids follow the
video's timing (``second_per_grid_ts``), window attention in the vision tower."""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from prunevid_bench.families import register_family
from prunevid_bench.families.base import Family


def _tiny(seed: int = 0, attn_implementation: str = "sdpa"):
    from prunevid_bench.models.tiny import build_tiny_model

    return build_tiny_model(seed=seed, attn_implementation=attn_implementation)


class Qwen2_5_VLFamily(Family):
    def merger_order(self, model, grid_thw: torch.Tensor) -> torch.Tensor:
        """The tower reorders patch groups window by window before its blocks (its
        ``window_index``) and the merger sees them in that order."""
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError:  # transformers before 5.24: a method of the tower
            order, _ = self.vision_encoder(model).get_window_index(grid_thw)
        else:
            vision = model.config.vision_config
            order, _ = get_vision_window_index(grid_thw, vision.spatial_merge_size, vision.window_size, vision.patch_size)
        return order.to(grid_thw.device)


QWEN2_5_VL = register_family(Qwen2_5_VLFamily(
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    rope_inputs=("video_grid_thw", "image_grid_thw", "second_per_grid_ts"),
    apply_rotary=apply_rotary_pos_emb,
    build_tiny=_tiny,
))
