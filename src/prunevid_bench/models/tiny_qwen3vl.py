"""``tiny-qwen3vl`` and ``tiny-qwen3vl-moe``: Qwen3-VL (dense and MoE) with seeded random weights.

Same tokenizer as ``tiny`` (see ``models.tiny``); what differs is the family: a vision tower with
patch 16 and learned position embeddings that also returns DeepStack features from two of its
blocks (added after LLM layers 0 and 1), QK-norm in the language model, interleaved M-RoPE, and
``Qwen3VLProcessor``, which writes ``<t seconds><|vision_start|>`` + n pads + ``<|vision_end|>``
per temporal step. The chat template writes a bare ``<|video_pad|>`` (no outer wrapper), which
gives the same prompt on transformers 5.24 and 5.25.
"""

from __future__ import annotations

from prunevid_bench.models.tiny import (
    CHAT_TEMPLATE, IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID, TinySizes, seeded_model, tiny_text_config,
)

PROCESSOR_CLASS = "Qwen3VLProcessor"
DEEPSTACK_LEVELS = 2  # DeepStack features from vision blocks 0 and 1, added after LLM layers 0 and 1
# a bare video placeholder: the processor adds each step's timestamp and markers itself (images keep theirs)
CHAT_TEMPLATE_QWEN3 = CHAT_TEMPLATE.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")


def build_qwen3vl_config(sizes: TinySizes = TinySizes(), attn_implementation: str = "sdpa", moe: bool = False):
    import transformers

    text = tiny_text_config(sizes)
    text.pop("rope_scaling")
    text.pop("use_sliding_window")
    text["head_dim"] = sizes.hidden_size // sizes.num_attention_heads
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(sizes.mrope_section),
                               "mrope_interleaved": True}
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=sizes.intermediate_size // 2,
                    decoder_sparse_step=1)
    vision = dict(
        depth=DEEPSTACK_LEVELS + 1, hidden_size=sizes.vision_hidden_size, intermediate_size=sizes.vision_intermediate_size,
        num_heads=sizes.vision_heads, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=sizes.hidden_size, num_position_embeddings=64, deepstack_visual_indexes=list(range(DEEPSTACK_LEVELS)),
    )
    config_class = getattr(transformers, "Qwen3VLMoeConfig" if moe else "Qwen3VLConfig")
    cfg = config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
                       vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_qwen3vl_model(seed: int = 0, attn_implementation: str = "sdpa", sizes: TinySizes = TinySizes(),
                             moe: bool = False):
    """A Qwen3-VL (``moe``: Qwen3-VL-MoE) with seeded random weights (float32, CPU, eval mode)."""
    import transformers

    name = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    return seeded_model(getattr(transformers, name), build_qwen3vl_config(sizes, attn_implementation, moe), seed)


def build_qwen3vl_processor(max_pixels: int = 128 * 128, min_pixels: int = 64 * 64):
    """Qwen3-VL's processor with our tokenizer; frames are sampled by our pipeline, not by it.
    Its video ``size`` bounds a whole video's pixels; ``cap_pixels_per_frame`` bounds one frame's."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from prunevid_bench.models.tiny import build_tokenizer

    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **common),
        tokenizer=build_tokenizer(),
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": 64 * max_pixels},
                                              cap_pixels_per_frame=max_pixels, do_sample_frames=False, **common),
        chat_template=CHAT_TEMPLATE_QWEN3,
    )


def build_tiny_qwen3vl(attn_implementation: str = "sdpa"):
    """The built-in model ``tiny-qwen3vl``: (model, processor)."""
    return build_tiny_qwen3vl_model(attn_implementation=attn_implementation), build_qwen3vl_processor()


def build_tiny_qwen3vl_moe(attn_implementation: str = "sdpa"):
    """The built-in model ``tiny-qwen3vl-moe``: (model, processor)."""
    return build_tiny_qwen3vl_model(attn_implementation=attn_implementation, moe=True), build_qwen3vl_processor()
