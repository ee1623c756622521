"""``tiny-qwen2vl``: a Qwen2-VL with seeded random weights, the second family's ``tiny``.

Same shapes, tokenizer and chat template as ``tiny`` (see ``models.tiny``); what differs is the
family: Qwen2-VL's vision tower (full attention per frame, no windows, GELU MLP) and its M-RoPE
(temporal id +1 per temporal grid step, no ``second_per_grid_ts``).
"""

from __future__ import annotations

import torch

from prunevid_bench.models.tiny import IM_END_ID, IMAGE_PAD_ID, PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID, TinySizes, tiny_text_config

PROCESSOR_CLASS = "Qwen2VLProcessor"


def build_qwen2vl_config(sizes: TinySizes = TinySizes(), attn_implementation: str = "sdpa"):
    from transformers import Qwen2VLConfig

    text_config = tiny_text_config(sizes)
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
    cfg = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_qwen2vl_model(seed: int = 0, attn_implementation: str = "sdpa", sizes: TinySizes = TinySizes()):
    """A Qwen2-VL with seeded random weights (float32, CPU, eval mode)."""
    from transformers import Qwen2VLForConditionalGeneration

    cfg = build_qwen2vl_config(sizes, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def build_qwen2vl_processor():
    from prunevid_bench.models.tiny import build_processor

    return build_processor(processor_class=PROCESSOR_CLASS)


def build_tiny_qwen2vl(attn_implementation: str = "sdpa"):
    """The built-in model ``tiny-qwen2vl``: (model, processor)."""
    return build_tiny_qwen2vl_model(attn_implementation=attn_implementation), build_qwen2vl_processor()
