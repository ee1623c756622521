"""FastVID as a method (LunarShen/FastVID, the official Qwen2.5-VL code): after the merger,
before the LLM, DySeg cuts the video into segments, STPrune keeps each segment's salient tokens
(the tower's last-block attention of each frame's mean query, ``patch.vision_attention``) and
its context tokens (DPC-kNN), and DTM folds the other tokens into the context tokens
(``stages.fastvid``). Kept tokens keep their own M-RoPE ids, as the original's
``position_ids[:, :, keep]``. The official code is Qwen2.5-VL only; on Qwen2-VL and Qwen3-VL the
same rule runs on their towers' last blocks."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import UNIT, BudgetKnob, Method, Range, VideoTokens, VisualReduction, register_method


@dataclass
class FastVIDConfig:
    enabled: bool = False
    retention_ratio: float = 0.27  # r: int(N r) tokens per frame, times the segment's length (eval.sh: 0.27 kept 24.1%)
    dyseg_c: int = 8  # DySeg: at least c segments (the c - 1 least similar transitions cut)
    dyseg_tau: float = 0.84  # ... and a cut wherever consecutive frames' cosine is below tau
    dyseg_ignore: float = 0.95  # frames at least this similar to the next give their budget to the last of them
    stprune_d: float = 0.4  # the share of a segment's tokens kept as context tokens (DPC-kNN)
    dtm_p: int = 4  # the context budget goes to every p-th sub-segment
    dtm_beta: float = 0.6  # a context token keeps at least this weight when others merge into it
    budget: float | None = None  # kept fraction: max(1, round(budget * N)) per frame instead of int(N r)


def reduce(tokens: VideoTokens, cfg: FastVIDConfig) -> VisualReduction:
    import torch

    from prunevid_bench.stages import fastvid

    if not tokens.is_full_grid:
        raise PruneVidError("fastvid needs each video's full token grid: run it before other visual-token methods")
    grid = tokens.embeds.reshape(tokens.t, tokens.n, -1)
    attention = tokens.extras["vision_pseudo_cls"].reshape(tokens.t, tokens.n)
    retain = fastvid.fastvid_budget(tokens.n, cfg.budget) if cfg.budget is not None else None
    res = fastvid.fastvid(grid, attention, cfg.retention_ratio, cfg.dyseg_c, cfg.dyseg_tau, cfg.dyseg_ignore,
                          cfg.stprune_d, cfg.dtm_p, cfg.dtm_beta, frame_retain=retain)
    rep = res.representative.to(tokens.index.device)
    group = torch.unique(tokens.group[rep], return_inverse=True)[1]
    return VisualReduction(dest=res.dest.to(rep.device), group=group, representative=rep, embeds=res.embeds,
                           stats={"fastvid_segments": len(res.segments), "fastvid_salient_tokens": int(res.salient.sum()),
                                  "fastvid_context_tokens": int((~res.salient).sum())})


def budget_knob(cfg: FastVIDConfig, fraction: float) -> BudgetKnob:
    """``budget``: ``max(1, round(B * N))`` tokens per frame; the promise is T times that, which
    FastVID's clamps can undercut on static content (the record then says so)."""
    from prunevid_bench.stages.fastvid import fastvid_budget

    return BudgetKnob({"budget": fraction}, lambda grids: sum(t * fastvid_budget(n, fraction) for t, n in grids))


register_method(Method(
    name="fastvid",
    acts="visual_tokens",
    config=FastVIDConfig,
    departs="no density noise (ties by index); T < c clamps DySeg's cuts where the original raises; a token merged "
            "into several context frames counts once, at its most similar target, in sizes and extras (docs/methods.md)",
    summary="FastVID: temporal segments, then salient (tower attention) and context (DPC-kNN) tokens, the rest merged",
    ranges={"retention_ratio": UNIT, "dyseg_c": Range(1), "dyseg_tau": Range(-1, 1), "dyseg_ignore": Range(-1, 1),
            "stprune_d": Range(0, 1), "dtm_p": Range(1), "dtm_beta": Range(0, 1), "budget": UNIT},
    record_fields=("fastvid_segments", "fastvid_salient_tokens", "fastvid_context_tokens"),
    reduce=reduce,
    budget_knob=budget_knob,
    vision_attention=lambda cfg: "pseudo_cls",
))
