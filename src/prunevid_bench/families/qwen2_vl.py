"""Qwen2-VL (transformers 5.x ``modeling_qwen2_vl``): M-RoPE whose temporal id advances by one
per temporal grid step (no ``second_per_grid_ts``), full per-frame attention in the vision tower
(no windows), a GELU MLP in the vision blocks."""

from __future__ import annotations

from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from prunevid_bench.families import register_family
from prunevid_bench.families.base import Family


def _tiny(seed: int = 0, attn_implementation: str = "sdpa"):
    from prunevid_bench.models.tiny_qwen2vl import build_tiny_qwen2vl_model

    return build_tiny_qwen2vl_model(seed=seed, attn_implementation=attn_implementation)


class Qwen2VLFamily(Family):
    def vision_shape(self, config):
        """Qwen2-VL's vision config: ``embed_dim`` wide, an MLP of ``mlp_ratio``, its
        ``hidden_size`` is the merger's output; every block attends per frame (no windows)."""
        from prunevid_bench.flops import VisionShape

        v = config.vision_config
        return VisionShape(
            hidden_size=v.embed_dim, intermediate_size=int(v.embed_dim * v.mlp_ratio), num_heads=v.num_heads,
            depth=v.depth, out_hidden_size=v.hidden_size, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size, in_channels=v.in_channels,
            spatial_merge_size=v.spatial_merge_size, fullatt_block_indexes=tuple(range(v.depth)), mlp_matmuls=2,
        )


QWEN2_VL = register_family(Qwen2VLFamily(
    model_type="qwen2_vl",
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    rope_inputs=("video_grid_thw", "image_grid_thw"),
    apply_rotary=apply_rotary_pos_emb,
    build_tiny=_tiny,
))
