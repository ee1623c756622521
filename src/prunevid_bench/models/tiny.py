"""Small Qwen2.5-VL models and an offline tokenizer/processor, built in code (nothing downloaded).

``tiny`` has seeded random weights and exists to prove the pipeline right on a CPU in seconds.
``toy`` (see ``prunevid_bench.toy``) has the same processor and is trained on the toy world.
Both use a byte-level tokenizer (one token per byte) with Qwen's special tokens, and a chat
template that writes the same ``<|im_start|>`` layout as the real Qwen2.5-VL template.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Ids 256..263 follow the 256 byte tokens; the order mirrors Qwen's special tokens.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, _, IMAGE_PAD_ID, VIDEO_PAD_ID = range(256, 264)
VOCAB_SIZE = 264  # 256 bytes + 8 special tokens

SYSTEM_PROMPT = "You are a helpful assistant."

# Our own Jinja template producing Qwen's chat layout:
# <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>question<|im_end|>\n<|im_start|>assistant\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySizes:
    """Model shape; the defaults are ``tiny``. head_dim = hidden/heads; mrope sections sum to head_dim/2."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_heads: int = 2
    tokens_per_second: int = 2
    vocab_size: int = VOCAB_SIZE  # bytes + special tokens, plus any word tokens (see build_tokenizer)


def byte_token_id(char: str) -> int:
    """Id of a one-byte token (the same in every tokenizer built here): the byte-level alphabet in sorted order."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet()).index(char)


def build_tokenizer(words=()):
    """The offline tokenizer: one token per byte (``tiny``), plus one token per word of ``words``
    for models trained with a word vocabulary (``toy``).

    ``words`` are byte-level pre-tokens as GPT-2's split makes them (``"Ġred"`` is " red"). A
    pre-token that is a word is one token, ids after the special tokens in the given order; any
    other text falls back to one token per byte (there are no merges).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({s: len(alphabet) + i for i, s in enumerate(SPECIAL_TOKENS)})  # ids 256..263
    vocab.update({w: VOCAB_SIZE + i for i, w in enumerate(dict.fromkeys(words))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    # Without words the whole text is one pre-token; with words it is split GPT-2 style, so a
    # word and the space before it ("Ġred") are one pre-token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(words))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def build_processor(max_pixels: int = 112 * 112, min_pixels: int = 56 * 56, tokenizer=None,
                    processor_class: str = "Qwen2_5_VLProcessor"):
    """The offline processor: the family's processor (Qwen2.5-VL's by default; Qwen2-VL's gives no
    ``second_per_grid_ts``) with Qwen2-VL's image/video processors and our tokenizer."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixel_bounds = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    common = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    return getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessor(size=dict(pixel_bounds), **common),
        tokenizer=tokenizer or build_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(size=dict(pixel_bounds), cap_pixels_per_frame=False, **common),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_text_config(sizes: TinySizes) -> dict:
    """The language model's config of the tiny models (both families share it)."""
    head_dim = sizes.hidden_size // sizes.num_attention_heads
    assert sum(sizes.mrope_section) * 2 == head_dim, "mrope sections must sum to head_dim/2"
    return dict(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": list(sizes.mrope_section), "rope_theta": 10000.0},
        use_sliding_window=False,
        bos_token_id=PAD_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def tiny_config(config_class, sizes: TinySizes, vision_config: dict, attn_implementation: str):
    """A tiny model's config (both families): the shared language model, the family's vision
    tower, our special-token ids."""
    cfg = config_class(
        text_config=tiny_text_config(sizes),
        vision_config=vision_config,
        image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def seeded_model(model_class, cfg, seed: int):
    """``model_class(cfg)`` with weights drawn from ``seed`` (the global RNG left as it was), in
    eval mode, stopping at ``<|im_end|>``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(cfg)
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def build_config(sizes: TinySizes = TinySizes(), attn_implementation: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig

    vision_config = dict(
        depth=sizes.vision_depth,
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=sizes.vision_intermediate_size,
        num_heads=sizes.vision_heads,
        in_channels=3,
        out_hidden_size=sizes.hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,  # a multiple of 28
        fullatt_block_indexes=[sizes.vision_depth - 1],
        tokens_per_second=sizes.tokens_per_second,
    )
    return tiny_config(Qwen2_5_VLConfig, sizes, vision_config, attn_implementation)


def build_tiny_model(seed: int = 0, attn_implementation: str = "sdpa", sizes: TinySizes = TinySizes()):
    """A Qwen2.5-VL with seeded random weights (float32, CPU, eval mode)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return seeded_model(Qwen2_5_VLForConditionalGeneration, build_config(sizes, attn_implementation), seed)


def build_tiny(attn_implementation: str = "sdpa"):
    """The built-in model ``tiny``: (model, processor)."""
    return build_tiny_model(attn_implementation=attn_implementation), build_processor()
