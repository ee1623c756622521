"""FlashVID as two methods (Fanziyang-v/FlashVID, official Qwen2.5-VL and Qwen3-VL code):

- ``flashvid``: after the merger, before the LLM: segments, then per segment ADTS (attention and
  diversity, with the tower's ``received`` attention: ``patch.vision_attention``) and TSTM (tree
  merging over time, DPC-kNN over the trees' roots) (``stages.flashvid``). Rows keep their
  representatives' M-RoPE ids, as the original's ``keep_visual_global_indices``.
- ``flashvid_llm``: its optional pruning inside the LLM, on the FastV machinery
  (``patch.layer``): layer K-1's attention row of the last prompt token, averaged over heads,
  keeps ``ceil(V * llm_retention_ratio)`` visual tokens from layer K on (the scripts: K = 20 of 28
  layers, 0.3 on Qwen2.5-VL; K = 28 of 36, 0.1 on Qwen3-VL).

``tree_merge: original`` reproduces the original's tree roots (a subtree's SUM over 1 + its
direct children, not a mean); ``mean`` is the correction. ``single_frame: original`` clusters a
one-frame segment's N tokens ADTS included, as the original; ``exclude_adts`` is the correction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import (UNIT, BudgetKnob, LayerContext, LayerReduction, Method, Range, VideoTokens,
                                    VisualReduction, register_method)

KV_CACHE_MODES = ("original", "compact")

TREE_MERGES = ("original", "mean")  # a tree root: its subtree's sum over (1 + direct children), or its mean
SINGLE_FRAME = ("original", "exclude_adts")  # a one-frame segment clusters all N tokens, or only the non-ADTS ones


@dataclass
class FlashVIDConfig:
    enabled: bool = False
    retention_ratio: float = 0.25  # r: ceil(N r expansion) tokens per frame before the LLM (the scripts: 0.10..0.25)
    expansion: float = 1.25  # the vision side keeps expansion * r; flashvid_llm then prunes inside the LLM
    alpha: float = 0.7  # the share of a frame's budget chosen by ADTS (ceil), the rest by TSTM
    temporal_threshold: float = 0.8  # TSTM: a token merges into its most similar token of the frame before above this
    segment_threshold: float = 0.9  # cut where consecutive frame means' cosine is below this
    min_segments: int = 4  # the Qwen scripts' min_segment_num (signature default 8)
    do_segment: bool = True  # False: the whole video one segment
    complementary_segment: bool = True  # add the least similar transitions as cuts up to min_segments
    tree_merge: str = "original"  # original: a root is its subtree's sum over (1 + direct children); mean: the mean
    single_frame: str = "original"  # original: a one-frame segment clusters all N tokens (ADTS too); exclude_adts
    budget: float | None = None  # kept fraction entering the LLM: max(1, round(budget * N)) per frame, no expansion


@dataclass
class FlashVIDLLMConfig:
    enabled: bool = False
    pruning_layer: int | str = "20/28"  # K: the first layer on the kept tokens (scored by K-1); Qwen3-VL scripts: "28/36"
    llm_retention_ratio: float = 0.3  # ceil(V * ratio) visual tokens kept from layer K on (Qwen3-VL scripts: 0.1)
    kv_cache: str = "original"  # original: layers 0..K-1 keep their whole cache (as FlashVID); compact: drop there too


def reduce(tokens: VideoTokens, cfg: FlashVIDConfig) -> VisualReduction:
    import torch

    from prunevid_bench.stages import flashvid

    if not tokens.is_full_grid:
        raise PruneVidError("flashvid needs each video's full token grid: run it before other visual-token methods")
    grid = tokens.embeds.reshape(tokens.t, tokens.n, -1)
    attention = tokens.extras["vision_received"].reshape(tokens.t, tokens.n)
    frame_tokens = flashvid_frame_tokens(tokens.n, cfg.budget) if cfg.budget is not None else None
    res = flashvid.flashvid(grid, attention, cfg.retention_ratio, cfg.expansion, cfg.alpha, cfg.temporal_threshold,
                            cfg.segment_threshold, cfg.min_segments, cfg.do_segment, cfg.complementary_segment,
                            cfg.tree_merge, cfg.single_frame, frame_tokens=frame_tokens)
    rep = res.representative.to(tokens.index.device)
    group = torch.unique(tokens.group[rep], return_inverse=True)[1]
    stats = {"flashvid_segments": sum(1 for s in res.segments if s), "flashvid_adts_tokens": int(res.adts.sum()),
             **res.stats}
    return VisualReduction(dest=res.dest.to(rep.device), group=group, representative=rep,
                           embeds=res.embeds.to(tokens.embeds.dtype), stats=stats)


def flashvid_frame_tokens(n: int, budget: float) -> int:
    return max(1, round(budget * n))


def budget_knob(cfg: FlashVIDConfig, fraction: float) -> BudgetKnob:
    """``budget``: ``max(1, round(B * N))`` tokens per frame entering the LLM (no expansion); the
    count is about T times that (ceil rounding per frame, segment trees)."""
    return BudgetKnob({"budget": fraction}, lambda grids: sum(t * min(n, flashvid_frame_tokens(n, fraction)) for t, n in grids))


def select(ctx: LayerContext, cfg: FlashVIDLLMConfig) -> LayerReduction:
    from prunevid_bench.stages import stage2 as s2
    from prunevid_bench.stages.fastv import fastv_keep

    q_rot, k_rot = ctx.rotate(ctx.q, ctx.k)
    ctx.scored_rows = 1
    ctx.scores = s2.last_token_scores(q_rot[:, -1:], k_rot, ctx.visual, ctx.scaling, ctx.seq_len - 1)
    keep = fastv_keep(ctx.scores, min(math.ceil(ctx.scores.numel() * cfg.llm_retention_ratio), ctx.scores.numel()))
    return LayerReduction(keep=keep, compact_cache=cfg.kv_cache == "compact")


register_method(Method(
    name="flashvid",
    acts="visual_tokens",
    config=FlashVIDConfig,
    departs="no density noise (ties by index); a duplicated row of a one-frame segment takes another member's "
            "position or is folded; Qwen3-VL keeps the per-step vision markers; budget >= N keeps all (docs/methods.md)",
    summary="FlashVID: segments, attention+diversity selection, tree merging over time, DPC-kNN over the roots",
    ranges={"retention_ratio": UNIT, "expansion": Range(0, lo_open=True), "alpha": Range(0, 1),
            "temporal_threshold": Range(-1, 1, hi_open=True), "segment_threshold": Range(-1, 1),
            "min_segments": Range(1), "budget": UNIT},
    choices={"tree_merge": TREE_MERGES, "single_frame": SINGLE_FRAME},
    record_fields=("flashvid_segments", "flashvid_adts_tokens", "flashvid_duplicate_rows"),
    reduce=reduce,
    budget_knob=budget_knob,
    vision_attention=lambda cfg: "received",
))

register_method(Method(
    name="flashvid_llm",
    acts="llm_layer",
    config=FlashVIDLLMConfig,
    departs="ties by index; the attention row recomputed for the last query (no eager layer); kv_cache: compact is "
            "ours (docs/methods.md)",
    summary="FlashVID's LLM-side pruning: layer K-1's last-token attention keeps ceil(V r) visual tokens from K on",
    ranges={"llm_retention_ratio": UNIT},
    choices={"kv_cache": KV_CACHE_MODES},
    record_fields=("pruning_layer",),
    select=select,
    pruning_layer=lambda cfg: cfg.pruning_layer,
    prunes_before=True,
    attention_scores=lambda cfg: "last_row",
    keeps_everything={"llm_retention_ratio": 1.0},
))
