"""Qwen3.5, dense and MoE (transformers 5.x ``modeling_qwen3_5``, ``modeling_qwen3_5_moe``): the
family behind Qwen3.5, Qwen3.6 and Qwen3.8.

Processor, prompt layout (one placeholder run per temporal step, each after its timestamp),
M-RoPE ids and inputs policy are Qwen3-VL's, so the family is Qwen3-VL's with what differs:
- a hybrid language model: ``config.layer_types`` names each layer ``linear_attention`` (Gated
  DeltaNet: a fixed-size recurrent state and a short causal conv, no KV cache) or
  ``full_attention`` (gated softmax attention with a KV cache). An LLM-layer method scores only at
  a full-attention layer and compacts only their caches (``attention_layers``; the semantics are in
  docs/methods.md);
- gated attention: ``q_proj`` emits query and gate per head, so q is taken at ``q_norm`` (the
  query half, normalised), k at ``k_norm``, both before rotary;
- partial rotary: the family's ``apply_rotary_pos_emb`` rotates the first ``cos.shape[-1]``
  channels of each head and passes the rest;
- no DeepStack: the tower returns its merged tokens only.
"""

from __future__ import annotations

import dataclasses

from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

from prunevid_bench.families import register_family
from prunevid_bench.families.base import Family
from prunevid_bench.families.qwen3_vl import Qwen3VLFamily


def _tiny(seed: int = 0, attn_implementation: str = "sdpa"):
    from prunevid_bench.models.tiny_qwen3_5 import build_tiny_qwen3_5_model

    return build_tiny_qwen3_5_model(seed=seed, attn_implementation=attn_implementation)


def _tiny_moe(seed: int = 0, attn_implementation: str = "sdpa"):
    from prunevid_bench.models.tiny_qwen3_5 import build_tiny_qwen3_5_model

    return build_tiny_qwen3_5_model(seed=seed, attn_implementation=attn_implementation, moe=True)


class Qwen3_5Family(Qwen3VLFamily):
    def attention_layers(self, config) -> list[int]:
        """The full-attention layers, as the checkpoint's ``layer_types`` lists them."""
        types = config.get_text_config().layer_types
        return [i for i, kind in enumerate(types) if kind == "full_attention"]

    def deepstack_levels(self, model) -> int:
        return 0

    def lmms_video(self, request) -> dict:
        """lmms-eval 0.7.3's ``qwen3_5`` model: a total pixel budget instead of a frame count, so
        qwen-vl-utils samples at its default 2 fps up to 768 frames, with frames of at least
        64 merged tokens (``models/simple/qwen3_5.py`` defaults, ``_build_video_kwargs``)."""
        return {"fps": 2.0, "max_frames": 768, "min_pixels": 64 * 32 * 32, "total_pixels": 224 * 1024 * 32 * 32}

    def vision_output(self, pooler: tuple, deepstack: list | None):
        return Family.vision_output(self, pooler, deepstack)

    def vision_shape(self, config):
        """Qwen3-VL's tower (full attention per step, a 2-matmul GELU MLP, learned position
        embeddings) with one merger per token and no DeepStack."""
        from prunevid_bench.flops import VisionShape

        v = config.vision_config
        return VisionShape(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads, depth=v.depth,
            out_hidden_size=v.out_hidden_size, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            in_channels=v.in_channels, spatial_merge_size=v.spatial_merge_size,
            fullatt_block_indexes=tuple(range(v.depth)), mlp_matmuls=2, mergers=1,
        )


QWEN3_5 = register_family(Qwen3_5Family(
    model_type="qwen3_5",
    model_class="Qwen3_5ForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    rope_inputs=("video_grid_thw", "image_grid_thw"),
    apply_rotary=apply_rotary_pos_emb,
    build_tiny=_tiny,
    video_layout="step",
))
# The MoE variant: the same family, with its own model class and tiny model.
QWEN3_5_MOE = register_family(dataclasses.replace(
    QWEN3_5, model_type="qwen3_5_moe", model_class="Qwen3_5MoeForConditionalGeneration", build_tiny=_tiny_moe,
))
