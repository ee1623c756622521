"""The built-in models ``toy`` (a tiny Qwen2.5-VL trained on the toy world, shipped in the package),
``toy8`` (8 layers, the toy world v2) and ``toy-qwen3vl`` (a tiny Qwen3-VL on the toy world).

The weights live in ``prunevid_bench/assets/toy/`` (``config.json`` + ``model.safetensors``) and
are produced by ``make toy-model`` (``python -m prunevid_bench.toy.train``). Training and
inference both build their processor with :func:`build_toy_processor`, so the two see identical
pixels and tokens.
"""

from __future__ import annotations

from pathlib import Path

from prunevid_bench.errors import PruneVidError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
# ``toy8``: 8 layers, trained on the toy world v2 (docs/toy-model.md); its own words, its own folder.
TOY8_DIR = ASSET_DIR.parent / "toy8"
# ``toy-qwen3vl``: ``toy``'s recipe on a Qwen3-VL (DeepStack, timestamps in the prompt).
TOY_QWEN3VL_DIR = ASSET_DIR.parent / "toy-qwen3vl"
# Each built-in toy's weights folder (a model's identity in a record hashes its weights file).
TOY_DIRS = {"toy": ASSET_DIR, "toy8": TOY8_DIR, "toy-qwen3vl": TOY_QWEN3VL_DIR}
# The toy families: a Qwen2.5-VL (``toy``, ``toy8``) or a Qwen3-VL (``toy-qwen3vl``).
FAMILIES = ("qwen2.5-vl", "qwen3-vl")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# The toy videos are 112 x 112: 8 x 8 patches of 14 px, 16 LLM tokens per temporal grid step.
# The bounds keep that size as it is (no resize) and match the `tiny` processor.
MAX_PIXELS = 112 * 112
MIN_PIXELS = 56 * 56
# Qwen3-VL's patches are 16 px (32 px per LLM token): its processor resizes a toy frame to
# 128 x 128, again 4 x 4 tokens per temporal step, each covering the same 28 x 28 px of the clip.
QWEN3VL_MAX_PIXELS = 128 * 128
# Qwen3-VL's processor writes "<t seconds>" before each temporal step; the toy clips last 2 s.
TIMESTAMPS = tuple(f"<{t / 10:.1f} seconds>" for t in range(100))


# How the toy model answers a multiple-choice question: the option's word, then its letter
# ("red (B)"). Naming the answer first turns the letter into a lookup among the options, which a
# 4-layer model learns in minutes; the letter parser reads the bracketed letter.
ANSWER_FORMAT = "{word} ({letter})"
# A text-only question of the training warm-up: the answer is named, the model points at it.
NAMED_QUESTION = "Which option is {answer}?"


def toy_words(world: str = "v1", family: str = "qwen2.5-vl") -> list[str]:
    """The toy model's word tokens: every byte-level word of every toy prompt, in first-seen order.

    The corpus is the chat template's fixed text, every question the toy world can ask, every
    option line, the instruction and every answer, so each of those words is one token and the rest of any
    text falls back to bytes. Built from the world's constants, hence the same on every machine.
    ``world`` "v2" appends the words of the v2 questions (the v1 ids stay as they are), and
    ``family`` "qwen3-vl" the words of its timestamps (" seconds").
    """
    from tokenizers import pre_tokenizers

    from prunevid_bench.choices import PROMPT_INSTRUCTION
    from prunevid_bench.models.tiny import SYSTEM_PROMPT
    from prunevid_bench.toy.world import COLOURS, CORNERS, DIRECTIONS, LETTERS, QUESTION_TEMPLATES, SHAPES

    answers = [*COLOURS, *SHAPES, *DIRECTIONS]
    corpus = [SYSTEM_PROMPT, "system\nuser\nassistant\n", PROMPT_INSTRUCTION]
    corpus += [NAMED_QUESTION.format(answer=a) for a in answers]
    corpus += [t.format(colour=c, shape=s, corner=k) for t in QUESTION_TEMPLATES.values()
               for c in COLOURS for s in SHAPES for k in CORNERS]
    corpus += [f"({letter}) {a}" for letter in LETTERS for a in answers]  # option lines
    corpus += [ANSWER_FORMAT.format(word=a, letter=letter) for letter in LETTERS for a in answers]
    if world != "v1":
        from prunevid_bench.toy.world_v2 import V2_TEMPLATES

        corpus += [t.format(colour=c, shape=s, corner=k) for t in V2_TEMPLATES.values()
                   for c in COLOURS for s in SHAPES for k in CORNERS]
    if family == "qwen3-vl":
        corpus += TIMESTAMPS
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = (p for text in corpus for p, _ in split.pre_tokenize_str(text))
    return [p for p in dict.fromkeys(pieces) if len(p) > 1]


def build_toy_processor(world: str = "v1", family: str = "qwen2.5-vl"):
    """The processor a toy model is trained and evaluated with: the ``tiny`` processor of its
    family (``tiny-qwen3vl``'s for "qwen3-vl") with the toy words as single tokens (the byte ids
    and special ids are the same)."""
    from prunevid_bench.models.tiny import build_processor, build_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown toy family {family!r} (one of {', '.join(FAMILIES)})")
    tokenizer = build_tokenizer(toy_words(world, family))
    if family == "qwen3-vl":
        from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_processor

        processor = build_qwen3vl_processor(max_pixels=QWEN3VL_MAX_PIXELS)
        processor.tokenizer = tokenizer
        return processor
    return build_processor(max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, tokenizer=tokenizer)


def family_of_config(config) -> str:
    """The toy family of a model config (its ``model_type``)."""
    return "qwen3-vl" if config.model_type == "qwen3_vl" else "qwen2.5-vl"


def toy_model_class(family: str):
    """The transformers class of a toy family (training builds it, loading fills it)."""
    import transformers

    return getattr(transformers, "Qwen3VLForConditionalGeneration" if family == "qwen3-vl"
                   else "Qwen2_5_VLForConditionalGeneration")


def load_toy8_model(attn_implementation: str = "sdpa"):
    """The built-in ``toy8``: 8 layers, trained on the toy world v2 (``make toy8-model``)."""
    return load_toy_model(attn_implementation, TOY8_DIR, world="v2")


def load_toy_qwen3vl_model(attn_implementation: str = "sdpa"):
    """The built-in ``toy-qwen3vl``: ``toy``'s recipe on a Qwen3-VL (``make toy-qwen3vl-model``)."""
    return load_toy_model(attn_implementation, TOY_QWEN3VL_DIR)


def load_toy_model(attn_implementation: str = "sdpa", asset_dir: Path = ASSET_DIR, world: str = "v1"):
    """(model in eval mode, float32 on the CPU; processor) from the shipped weights; the family
    (Qwen2.5-VL or Qwen3-VL) is the one ``config.json`` names."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from prunevid_bench.models.tiny import IM_END_ID, PAD_ID

    config_path, weights_path = Path(asset_dir) / CONFIG_FILE, Path(asset_dir) / WEIGHTS_FILE
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise PruneVidError(
            f"the toy model's {' and '.join(missing)} {'are' if len(missing) > 1 else 'is'} missing from {asset_dir}; "
            f"run `make {Path(asset_dir).name if Path(asset_dir).name in TOY_DIRS else 'toy'}-model` to train it"
        )
    config = AutoConfig.from_pretrained(str(asset_dir))
    config._attn_implementation = attn_implementation
    family = family_of_config(config)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG as it was
        model = toy_model_class(family)(config)
    model.load_state_dict(load_file(str(weights_path)), strict=True)  # float16 files (toy8) load as float32
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval(), build_toy_processor(world, family)
