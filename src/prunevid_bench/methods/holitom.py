"""HoliTom (cokeshao/HoliTom) as a method: outer merging on each video's visual tokens before
the LLM (static windows by a dynamic programme, each window's static tokens averaged over time
and clustered, the dynamic tokens kept by score; ``stages.holitom``), and, with ``inner_merge``
on, the original's inner merging at LLM layer K: layer K-1's last-token attention keeps
``round(V (1 - inner_ratio))`` visual tokens and every other one is folded into its most similar
kept token by the original's sequential halving (a ``LayerReduction`` merge with its own weights).

The authors ship LLaVA code only; the outer merge follows the Qwen port in VidCom2's ``qwen``
branch (score: the token's L2 norm; outer only there). Merged rows take a representative's
M-RoPE id (a static cluster: its centre in the window's first step), not the port's evenly
spaced placeholder ids (docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import (UNIT, BudgetKnob, LayerContext, LayerReduction, Method, Range, VideoTokens,
                                    VisualReduction, register_method)

KV_CACHE_MODES = ("original", "compact")


@dataclass
class HoliTomConfig:
    enabled: bool = False
    retain_ratio: float = 0.25  # r: about r * T * N kept before the LLM, the static removal counted (the port's R_RATIO)
    tau: float = 0.8  # a token is static in a window when its cosine with the next step's exceeds tau at every step
    beta: float = 0.6  # a merged cluster is beta * centre + (1 - beta) * mean of its other members
    k: int = 7  # DPC-kNN neighbours (min(k, clusters), as the original)
    max_window: int = 1024  # the longest static window, in temporal steps
    budget: float | None = None  # kept fraction of the video's tokens at the end; sets r (1: nothing merged)
    inner_merge: bool = False  # the original's merging inside the LLM at pruning_layer (HoliTom's "M"; off in the port)
    pruning_layer: int | str = "18/28"  # K of the inner merge: layers 0..K-1 see every token (the scripts' HOLITOM_k=18)
    inner_ratio: float = 0.5  # the share of the visual tokens merged away at K (HOLITOM_r)
    kv_cache: str = "original"  # original: layers 0..K-1 keep their whole cache (as HoliTom); compact: merge it too


def _ratio(cfg: HoliTomConfig) -> float:
    """r: the configured ratio, or the budget's (which counts the inner merge when it is on)."""
    if cfg.budget is None:
        return cfg.retain_ratio
    return min(1.0, cfg.budget / (1 - cfg.inner_ratio)) if cfg.inner_merge else cfg.budget


def reduce(tokens: VideoTokens, cfg: HoliTomConfig) -> VisualReduction:
    import torch

    from prunevid_bench.stages import holitom

    if not tokens.is_full_grid:
        raise PruneVidError("holitom needs each video's full token grid: run it before other visual-token methods")
    # a budget of 1 keeps every token: no window is static (r = 1 keeps every dynamic token)
    tau = float("inf") if cfg.budget == 1.0 else cfg.tau
    res = holitom.holitom_outer(tokens.embeds.reshape(tokens.t, tokens.n, -1), _ratio(cfg), tau, cfg.beta, cfg.k,
                                cfg.max_window)
    rep = res.representative.to(tokens.index.device)
    group = torch.unique(tokens.group[rep], return_inverse=True)[1]
    return VisualReduction(dest=res.dest.to(rep.device), group=group, representative=rep, embeds=res.merged,
                           stats={"holitom_merged_tokens": int(tokens.index.numel() - rep.numel()),
                                  "holitom_windows": len(res.windows)})


def select(ctx: LayerContext, cfg: HoliTomConfig) -> LayerReduction:
    """The inner merge, scored with layer K-1 (the patch calls it there: ``prunes_before``)."""
    import torch
    import torch.nn.functional as F

    from prunevid_bench.stages import holitom
    from prunevid_bench.stages import stage2 as s2

    q_rot, k_rot = ctx.rotate(ctx.q, ctx.k)
    ctx.scored_rows = 1
    ctx.scores = s2.last_token_scores(q_rot[:, -1:], k_rot, ctx.visual, ctx.scaling, ctx.seq_len - 1)
    n_keep = holitom.inner_keep_count(ctx.scores.numel(), cfg.inner_ratio)
    ranked = torch.sort(-ctx.scores.float(), stable=True).indices[:n_keep]  # topk order (ties: lower index)
    keep = torch.sort(ranked).values
    unit = F.normalize(ctx.hidden[ctx.visual].float(), dim=-1)
    nearest = (unit @ unit[ranked].T).argmax(dim=1)  # the first most similar in topk order, as the original's max
    slot = torch.empty_like(ranked)
    slot[torch.sort(ranked).indices] = torch.arange(n_keep, device=ranked.device)  # topk order -> place in keep
    into = slot[nearest]
    into[keep] = torch.arange(n_keep, device=keep.device)
    weights = holitom.inner_merge_weights(keep, into)
    return LayerReduction(keep=keep, compact_cache=cfg.kv_cache == "compact", merge_into=into, merge_weights=weights)


def budget_knob(cfg: HoliTomConfig, fraction: float) -> BudgetKnob:
    """``budget``: r set so that about ``round(B * T * N)`` remain at the end (the target; HoliTom's
    count, ``sum round(n_static r') + W ceil(n_dyn r')``, reaches it only roughly)."""
    return BudgetKnob({"budget": fraction}, lambda grids: round(fraction * sum(t * n for t, n in grids)))


register_method(Method(
    name="holitom",
    acts="visual_tokens",
    config=HoliTomConfig,
    departs="outer merge as VidCom2's Qwen port (norm score, D=0); rows in position order with a representative's id, "
            "not the port's placeholder ids; DPC ties by index, no noise; inner: scores recomputed, at least one kept (docs/methods.md)",
    summary="HoliTom: static windows merged over time, DPC-kNN clusters, dynamic tokens by score; "
            "inner_merge also folds tokens together at LLM layer K",
    ranges={"retain_ratio": UNIT, "tau": Range(-1), "beta": Range(0, 1), "k": Range(1), "max_window": Range(2),
            "budget": UNIT, "inner_ratio": Range(0, 1, hi_open=True)},
    choices={"kv_cache": KV_CACHE_MODES},
    record_fields=("holitom_merged_tokens", "holitom_windows"),
    reduce=reduce,
    select=select,
    also={"llm_layer": lambda cfg: cfg.inner_merge},
    pruning_layer=lambda cfg: cfg.pruning_layer,
    prunes_before=True,
    budget_knob=budget_knob,
))
