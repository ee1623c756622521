"""PruneVid Stages 2+3 as a method: after layer K, keep a share of each group's visual tokens by
their attention from the question (``stages.stage2``); the patch drops the rest from the hidden
states and the KV cache. Config section ``stage2`` (:class:`Stage2Config`); score modes ``SCORE_MODES``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from prunevid_bench.methods import UNIT, LayerContext, Method, fraction_knob, register_method

SCORE_MODES = ("prunevid", "attention", "last_token", "random")


@dataclass
class Stage2Config:
    enabled: bool = False
    pruning_layer: int | str = "10/28"  # K: layers 0..K see all tokens, K+1.. the kept ones; an index or "K/N" (resolve_layer)
    keep_ratio: float = 0.4  # int(n * keep_ratio) kept in each Stage-1 group (the official count)
    score: str = "prunevid"  # prunevid | attention | last_token | random
    seed: int = 0  # for score = random
    budget: float | None = None  # not official: keep round(budget * visual tokens before Stage 1) in total, spread over the groups by size


def scores(ctx: LayerContext, mode: str, seed: int = 0):
    """[V] importance of each visual token under ``mode`` (see ``SCORE_MODES``)."""
    import torch

    from prunevid_bench.stages import stage2 as s2

    rows = torch.arange(ctx.query_start, ctx.seq_len, device=ctx.visual.device)
    ctx.scored_rows = {"prunevid": rows.numel(), "attention": rows.numel(), "last_token": 1}.get(mode, 0)
    if mode == "prunevid":
        # Official score: q, k BEFORE rotary, no causal mask, softmax over all keys.
        return s2.max_max_scores(ctx.q[:, rows], ctx.k, ctx.visual, ctx.scaling)
    if mode in ("attention", "last_token"):
        q_rot, k_rot = ctx.rotate(ctx.q, ctx.k)
        if mode == "attention":
            return s2.max_max_scores(q_rot[:, rows], k_rot, ctx.visual, ctx.scaling, query_positions=rows)
        return s2.last_token_scores(q_rot[:, -1:], k_rot, ctx.visual, ctx.scaling, ctx.seq_len - 1)
    return s2.random_scores(ctx.visual.numel(), seed, ctx.visual.device)


def select(ctx: LayerContext, cfg: Stage2Config):
    from prunevid_bench.stages import stage2 as s2

    ctx.scores = scores(ctx, cfg.score, cfg.seed)
    total = None if cfg.budget is None else round(cfg.budget * ctx.original_visual)
    return s2.stratified_keep(ctx.scores, ctx.groups, cfg.keep_ratio, total)


register_method(Method(
    name="prunevid_stage2",
    section="stage2",
    acts="llm_layer",
    config=Stage2Config,
    departs="on Qwen's M-RoPE layers instead of PLLaVA's; budget (a total share) and the scores other than prunevid are ours; layers keep SDPA/FlashAttention (docs/algorithm.md)",
    summary="PruneVid Stages 2+3: after layer K keep a share of each group by the question's attention; compact the KV cache",
    ranges={"keep_ratio": UNIT, "budget": UNIT},
    choices={"score": SCORE_MODES},
    record_fields=("stage2_tokens_before", "stage2_tokens_after", "stage2_s", "pruning_layer", "pruning_layer_spec"),
    select=select,
    pruning_layer=lambda cfg: cfg.pruning_layer,
    budget_knob=fraction_knob,  # Stage 2 keeps round(B * original) in total (fewer if Stage 1 left fewer)
    attention_scores=lambda cfg: {"attention": "query_rows", "last_token": "last_row"}.get(cfg.score),
    label=lambda v, layer: (f"S2 {'keep=' + str(v['keep_ratio']) if v.get('budget') is None else 'budget=' + str(v['budget'])}"
                            f" L={layer} {v['score']}"),
    short_keys_first=True,  # the short names of the presets and sweeps written before the registry
    stream_eviction=lambda: importlib.import_module("prunevid_bench.methods.prunevid_stream").QuestionEviction,
))

