"""``tiny-qwen2vl``: a Qwen2-VL with seeded random weights, the second family's ``tiny``.

Same shapes, tokenizer and chat template as ``tiny`` (see ``models.tiny``); what differs is the
family: Qwen2-VL's vision tower (full attention per frame, no windows, GELU MLP) and its M-RoPE
(temporal id +1 per temporal grid step, no ``second_per_grid_ts``).
"""

from __future__ import annotations

from prunevid_bench.models.tiny import TinySizes, seeded_model, tiny_config

PROCESSOR_CLASS = "Qwen2VLProcessor"


def build_qwen2vl_config(sizes: TinySizes = TinySizes(), attn_implementation: str = "sdpa"):
    from transformers import Qwen2VLConfig

    vision_config = dict(
        depth=sizes.vision_depth,
        embed_dim=sizes.vision_hidden_size,
        hidden_size=sizes.hidden_size,  # Qwen2-VL: the merger's output width (the LLM's)
        mlp_ratio=sizes.vision_intermediate_size // sizes.vision_hidden_size,
        num_heads=sizes.vision_heads,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return tiny_config(Qwen2VLConfig, sizes, vision_config, attn_implementation)


def build_tiny_qwen2vl_model(seed: int = 0, attn_implementation: str = "sdpa", sizes: TinySizes = TinySizes()):
    """A Qwen2-VL with seeded random weights (float32, CPU, eval mode)."""
    from transformers import Qwen2VLForConditionalGeneration

    return seeded_model(Qwen2VLForConditionalGeneration, build_qwen2vl_config(sizes, attn_implementation), seed)


def build_qwen2vl_processor():
    from prunevid_bench.models.tiny import build_processor

    return build_processor(processor_class=PROCESSOR_CLASS)


def build_tiny_qwen2vl(attn_implementation: str = "sdpa"):
    """The built-in model ``tiny-qwen2vl``: (model, processor)."""
    return build_tiny_qwen2vl_model(attn_implementation=attn_implementation), build_qwen2vl_processor()
