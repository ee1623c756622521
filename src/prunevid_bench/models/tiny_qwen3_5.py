"""``tiny-qwen3_5`` and ``tiny-qwen3_5-moe``: Qwen3.5 (dense and MoE) with seeded random weights.

Same tokenizer and processor as ``tiny-qwen3vl`` (Qwen3.5 uses ``Qwen3VLProcessor``: per-step
timestamps and markers). What differs is the language model, a hybrid: of its 8 layers, layers 3
and 7 are gated full attention (QK-norm, ``q_proj`` emitting query and gate, rotary on half of
each head) and the others Gated DeltaNet linear attention (a recurrent state and a short causal
conv, no KV cache) -- the real models' pattern of three linear layers to one full one. The vision
tower has no DeepStack.
"""

from __future__ import annotations

from prunevid_bench.models.tiny import (
    IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID, TinySizes, seeded_model, tiny_text_config,
)

LAYER_TYPES = ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + ("full_attention",)


def build_qwen3_5_config(sizes: TinySizes = TinySizes(), attn_implementation: str = "sdpa", moe: bool = False):
    import transformers

    text = tiny_text_config(sizes)
    text.pop("rope_scaling")
    text.pop("use_sliding_window")
    head_dim = 2 * sizes.hidden_size // sizes.num_attention_heads  # rotary on half of it: the mrope sections' span
    text.update(
        num_hidden_layers=len(LAYER_TYPES), layer_types=list(LAYER_TYPES), head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(sizes.mrope_section),
                         "mrope_interleaved": True, "partial_rotary_factor": 0.5},
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    if moe:
        text.pop("intermediate_size")
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=sizes.intermediate_size // 2,
                    shared_expert_intermediate_size=sizes.intermediate_size // 2)
    vision = dict(
        depth=2, hidden_size=sizes.vision_hidden_size, intermediate_size=sizes.vision_intermediate_size,
        num_heads=sizes.vision_heads, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=sizes.hidden_size, num_position_embeddings=64,
    )
    config_class = getattr(transformers, "Qwen3_5MoeConfig" if moe else "Qwen3_5Config")
    cfg = config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
                       vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_qwen3_5_model(seed: int = 0, attn_implementation: str = "sdpa", sizes: TinySizes = TinySizes(),
                             moe: bool = False):
    """A Qwen3.5 (``moe``: Qwen3.5-MoE) with seeded random weights (float32, CPU, eval mode)."""
    import transformers

    import torch

    name = "Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"
    model = seeded_model(getattr(transformers, name), build_qwen3_5_config(sizes, attn_implementation, moe), seed)
    # Long memory, as trained models have: transformers' init draws each head's decay rate A from
    # U(0.01, 16), which forgets a token within a few steps; with A in [0.005, 0.05] the video is
    # still in the recurrent state when the question is read, so a test can see what it holds.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "linear_attn"):
                heads = layer.linear_attn.A_log.numel()
                layer.linear_attn.A_log.copy_(torch.linspace(0.005, 0.05, heads).log())
    return model


def build_tiny_qwen3_5(attn_implementation: str = "sdpa"):
    """The built-in model ``tiny-qwen3_5``: (model, processor)."""
    from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_processor

    return build_tiny_qwen3_5_model(attn_implementation=attn_implementation), build_qwen3vl_processor()


def build_tiny_qwen3_5_moe(attn_implementation: str = "sdpa"):
    """The built-in model ``tiny-qwen3_5-moe``: (model, processor)."""
    from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_processor

    return build_tiny_qwen3_5_model(attn_implementation=attn_implementation, moe=True), build_qwen3vl_processor()
