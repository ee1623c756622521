"""Analytic prefill FLOPs of Qwen2-VL / Qwen2.5-VL: the ideal speed-up that fewer tokens can buy.

Only matrix multiplications are counted, a multiply-add being 2 FLOPs (the convention of
``torch.utils.flop_counter``); norms, rotary, softmax, activations and residual adds are
O(n * hidden) and left out. Pure Python, no torch: a model config or the presets below give the
shapes (the model's family gives them: ``Family.vision_shape``), and the token counts come from
the run (``run_flops``).

Per decoder layer with n tokens (empty cache), hidden D, H query heads and H_kv key/value heads
of size d, MLP width I:
    projections  2 n D (H d)  [q]  +  2 * 2 n D (H_kv d)  [k, v]  +  2 n (H d) D  [o]
    attention    2 * 2 H d P  [q k^T and attn v], P = n (n + 1) / 2 query-key pairs when
                 causal (what a causal kernel needs), n^2 when the full matrix is computed
    mlp          3 * 2 n D I  [gate, up, down: SwiGLU]
A hybrid model (Qwen3.5) names each layer's kind (``TextShape.layer_types``). Its full-attention
layers are gated (``q_proj`` emits query and gate: twice the query width). Its Gated DeltaNet
layers, with Hk key heads of size dk, Hv value heads of size dv, conv width w, chunk C:
    projections  2 n D (2 Hk dk + 2 Hv dv + 2 Hv)  [qkv, z, b, a]  +  2 n (Hv dv) D  [out]
    conv         2 (n + w - 1) (2 Hk dk + Hv dv) w  [depthwise, as transformers pads it]
    delta rule   per value head and chunk of the padded length: 2 C^2 dk [k_beta k^T] + 2 C^2 dk
                 [q k^T] + C (C - 1) (dv + dk) [the two unit-triangular solves] + 2 C^2 dv
                 [intra-chunk attn v] + 3 * 2 C dk dv [the state's read twice and its update]
    (``gated_deltanet_flops``: linear in n, the chunked rule transformers runs).
PruneVid runs layers 0..K on all tokens and K+1.. on the kept ones (``tokens_per_layer``); the
Stage 2 score adds ``2 H d R L`` for R query rows against L keys (``prunevid_scoring_flops``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TextShape:
    """The language model's shape."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_heads (Qwen2.5-VL)
    # a hybrid model (Qwen3.5): each layer's kind; empty: every layer full attention
    layer_types: tuple[str, ...] = ()
    gated_attention: bool = False  # q_proj emits query and gate (Qwen3.5's full attention)
    linear_key_heads: int = 0  # Gated DeltaNet's shape
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    conv_kernel: int = 0
    chunk_size: int = 64  # the chunked delta rule's chunk (transformers' default)

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config) -> TextShape:
        """From a transformers Qwen2.5-VL config (or its text config)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        experts = getattr(text, "num_experts_per_tok", None)  # MoE: the active experts' MLPs
        shared = getattr(text, "shared_expert_intermediate_size", 0) or 0  # and a shared expert (Qwen3.5-MoE)
        types = tuple(getattr(text, "layer_types", None) or ())
        hybrid = "linear_attention" in types
        linear = dict(
            layer_types=types, gated_attention=True, linear_key_heads=text.linear_num_key_heads,
            linear_value_heads=text.linear_num_value_heads, linear_key_dim=text.linear_key_head_dim,
            linear_value_dim=text.linear_value_head_dim, conv_kernel=text.linear_conv_kernel_dim,
        ) if hybrid else {}
        return cls(
            **linear,
            hidden_size=text.hidden_size,
            intermediate_size=experts * text.moe_intermediate_size + shared if experts else text.intermediate_size,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            num_layers=text.num_hidden_layers,
            vocab_size=text.vocab_size,
            head_dim=getattr(text, "head_dim", None),
        )


@dataclass(frozen=True)
class VisionShape:
    """The vision encoder's shape (Qwen2.5-VL ViT: window attention except in a few blocks)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    depth: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    mlp_matmuls: int = 3  # SwiGLU (Qwen2.5-VL); 2 for Qwen2-VL's fc1/GELU/fc2
    mergers: int = 1  # patch mergers each token goes through (Qwen3-VL: 1 + its DeepStack levels)
    @classmethod
    def from_config(cls, config) -> VisionShape:
        vision = getattr(config, "vision_config", config)
        return cls(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_heads=vision.num_heads,
            depth=vision.depth,
            out_hidden_size=vision.out_hidden_size,
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            in_channels=vision.in_channels,
            spatial_merge_size=vision.spatial_merge_size,
            window_size=vision.window_size,
            fullatt_block_indexes=tuple(vision.fullatt_block_indexes),
        )


# Qwen/Qwen2.5-VL-7B-Instruct (config.json): the model the paper-scale numbers refer to.
QWEN25_VL_7B_TEXT = TextShape(
    hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4, num_layers=28, vocab_size=152064
)
QWEN25_VL_7B_VISION = VisionShape(
    hidden_size=1280, intermediate_size=3420, num_heads=16, depth=32, out_hidden_size=3584
)


@dataclass(frozen=True)
class Flops:
    """FLOPs by part; ``total`` is their sum."""

    projections: int = 0
    attention: int = 0
    mlp: int = 0
    lm_head: int = 0
    scoring: int = 0
    vision: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def attention_pairs(n_tokens: int, causal: bool = True) -> int:
    """Query-key pairs of a prefill of n tokens: n (n + 1) / 2 causal, n^2 full."""
    return n_tokens * (n_tokens + 1) // 2 if causal else n_tokens * n_tokens


def decoder_layer_flops(shape: TextShape, n_tokens: int, causal: bool = True, layer: int = 0) -> Flops:
    """Decoder layer ``layer``'s prefill over n tokens (no cache)."""
    n, dim, d = n_tokens, shape.hidden_size, shape.d
    mlp = 3 * 2 * n * dim * shape.intermediate_size
    if shape.layer_types and shape.layer_types[layer] == "linear_attention":
        return gated_deltanet_flops(shape, n) + Flops(mlp=mlp)
    q_width, kv_width = shape.num_heads * d, shape.num_kv_heads * d
    q_out = 2 * q_width if shape.gated_attention else q_width
    projections = 2 * n * dim * q_out + 2 * 2 * n * dim * kv_width + 2 * n * q_width * dim
    attention = 2 * 2 * shape.num_heads * d * attention_pairs(n, causal)
    return Flops(projections=projections, attention=attention, mlp=mlp)


def gated_deltanet_flops(shape: TextShape, n_tokens: int) -> Flops:
    """A Gated DeltaNet layer's token mixing over n tokens (empty state): projections, the short
    conv and the chunked delta rule (counted as ``attention``), as transformers runs them."""
    n, dim = n_tokens, shape.hidden_size
    dk, dv, hv = shape.linear_key_dim, shape.linear_value_dim, shape.linear_value_heads
    key_width, value_width = shape.linear_key_heads * dk, hv * dv
    conv_dim = 2 * key_width + value_width
    projections = 2 * n * dim * (conv_dim + value_width + 2 * hv) + 2 * n * value_width * dim
    conv = 2 * (n + shape.conv_kernel - 1) * conv_dim * shape.conv_kernel
    c = shape.chunk_size
    chunks = -(-n // c)  # the sequence is padded to whole chunks
    per_chunk = 4 * c * c * dk + 2 * c * c * dv + c * (c - 1) * (dk + dv) + 6 * c * dk * dv
    return Flops(projections=projections + conv, attention=hv * chunks * per_chunk)


def tokens_per_layer(
    num_layers: int, prompt_tokens: int, pruning_layer: int | None = None, tokens_after_pruning: int | None = None
) -> list[int]:
    """Sequence length seen by each layer: ``prompt_tokens`` (after Stage 1) up to and including
    layer K = ``pruning_layer``, ``tokens_after_pruning`` after it."""
    if pruning_layer is None:
        return [prompt_tokens] * num_layers
    if not 0 <= pruning_layer < num_layers:
        raise ValueError(f"pruning_layer must be in [0, {num_layers - 1}], got {pruning_layer}")
    if tokens_after_pruning is None or not 0 <= tokens_after_pruning <= prompt_tokens:
        raise ValueError("tokens_after_pruning must be given and lie in [0, prompt_tokens]")
    k = pruning_layer + 1
    return [prompt_tokens] * k + [tokens_after_pruning] * (num_layers - k)


def prunevid_scoring_flops(shape: TextShape, query_rows: int, keys: int) -> int:
    """Stage 2's score at layer K: q.k^T of the R text rows against all L keys, every head
    (q and k themselves are the layer's own projections, already counted)."""
    return 2 * shape.num_heads * shape.d * query_rows * keys


def llm_prefill_flops(
    shape: TextShape,
    tokens: Sequence[int],
    causal: bool = True,
    lm_head_tokens: int = 1,
    scoring: int = 0,
) -> Flops:
    """Prefill FLOPs of the language model's layers with ``tokens[i]`` tokens in layer i, plus the
    lm_head on ``lm_head_tokens`` rows (1: only the first token's logits are computed) and any
    scoring FLOPs. The embedding lookup costs no FLOPs."""
    if len(tokens) != shape.num_layers:
        raise ValueError(f"need one token count per layer ({shape.num_layers}), got {len(tokens)}")
    total = Flops()
    for layer, n in enumerate(tokens):
        total = total + decoder_layer_flops(shape, n, causal, layer)
    return total + Flops(lm_head=2 * lm_head_tokens * shape.hidden_size * shape.vocab_size, scoring=scoring)


def _window_lengths(merged_h: int, merged_w: int, window: int) -> Iterable[int]:
    """Merged tokens in each attention window of one frame (edge windows are partial), as
    transformers' ``get_vision_window_index`` tiles the frame."""
    for top in range(0, merged_h, window):
        for left in range(0, merged_w, window):
            yield min(window, merged_h - top) * min(window, merged_w - left)


def vision_block_flops(shape: VisionShape, attention_tokens: int, pairs: int, mlp_tokens: int) -> int:
    """One vision block: qkv and proj on ``attention_tokens``, q k^T and attn v over ``pairs``
    (query, key) pairs (the sum of its attention segments' squared lengths), the MLP on
    ``mlp_tokens`` (fewer than ``attention_tokens`` when ToMe merged between them)."""
    dim = shape.hidden_size
    return (2 * attention_tokens * dim * 3 * dim + 2 * attention_tokens * dim * dim
            + 2 * 2 * dim * pairs + shape.mlp_matmuls * 2 * mlp_tokens * dim * shape.intermediate_size)


def frame_pairs(shape: VisionShape, h: int, w: int, block: int) -> int:
    """(query, key) pairs of one temporal step of h x w patches in vision block ``block``: the
    whole step in a full-attention block, the sum over its windows otherwise."""
    if block in shape.fullatt_block_indexes:
        return (h * w) ** 2
    unit, merge = shape.spatial_merge_size**2, shape.spatial_merge_size
    window = shape.window_size // merge // shape.patch_size  # in merged tokens
    return sum((n * unit) ** 2 for n in _window_lengths(h // merge, w // merge, window))


def vision_encoder_flops(shape: VisionShape, grids: Sequence[Sequence[int]], blocks: Sequence | None = None) -> Flops:
    """The vision encoder over videos/images with grids (t, h, w) in patches (``video_grid_thw``):
    patch embedding, blocks (window attention, per-frame full attention in
    ``fullatt_block_indexes``), and the patch merger. Returned in ``Flops.vision``. ``blocks``:
    each block's real (attention tokens, pairs, MLP tokens) over all the grids, when a method
    merged inside the tower (``vision_block_flops``), instead of the full grids'."""
    dim, unit = shape.hidden_size, shape.spatial_merge_size**2
    patch_in = shape.in_channels * shape.temporal_patch_size * shape.patch_size**2
    total = 0
    for t, h, w in grids:
        patches = t * h * w
        total += 2 * patches * patch_in * dim  # Conv3d patch embedding
        if blocks is None:
            for block in range(shape.depth):
                total += vision_block_flops(shape, patches, t * frame_pairs(shape, h, w, block), patches)
        total += merger_flops(shape, patches // unit)
    if blocks is not None:
        total += sum(vision_block_flops(shape, *counts) for counts in blocks)
    return Flops(vision=total)


def merger_flops(shape: VisionShape, rows: int) -> int:
    """The patch merger's MLP on ``rows`` LLM tokens (each merge x merge patch features wide)."""
    wide = shape.hidden_size * shape.spatial_merge_size**2
    return shape.mergers * (2 * rows * wide * wide + 2 * rows * wide * shape.out_hidden_size)


def ideal_speedup(baseline: Flops, pruned: Flops) -> float:
    """How much faster the pruned computation would be if time followed FLOPs."""
    return baseline.total / pruned.total if pruned.total else float("inf")


def run_flops(model_config, vision: VisionShape, grids, prompt_tokens: int, llm_prefill_tokens: int,
              pruning_layer: int | None, tokens_dropped: int, scored_rows: int,
              merger_rows_skipped: int = 0, tower_blocks: Sequence | None = None) -> tuple[Flops, Flops]:
    """(this run's prefill FLOPs, the unreduced baseline's on the same input): the vision encoder
    over ``grids`` (its merger ``merger_rows_skipped`` tokens fewer, when a method merged them
    before it), the LLM with ``llm_prefill_tokens`` (after the visual-token methods) up to layer K
    and ``tokens_dropped`` fewer after it, and the score of ``scored_rows`` query rows;
    ``tower_blocks``: the blocks' real token counts when a method merged inside the tower."""
    text = TextShape.from_config(model_config)
    encoder = vision_encoder_flops(vision, grids)
    after = llm_prefill_tokens - tokens_dropped
    layers = tokens_per_layer(text.num_layers, llm_prefill_tokens, pruning_layer, after if pruning_layer is not None else None)
    scoring = prunevid_scoring_flops(text, scored_rows, llm_prefill_tokens) if scored_rows else 0
    encoder_run = vision_encoder_flops(vision, grids, tower_blocks) if tower_blocks else encoder
    encoder_run = Flops(vision=encoder_run.vision - merger_flops(vision, merger_rows_skipped))
    run = llm_prefill_flops(text, layers, scoring=scoring) + encoder_run
    base = llm_prefill_flops(text, [prompt_tokens] * text.num_layers) + encoder
    return run, base
