"""ToMe as a method: bipartite soft matching with size-weighted merging on each video's visual
tokens before the LLM, intra-frame then inter-frame (``stages.tome``). A merged token takes its
destination's M-RoPE id (the representative the patch index-selects the ids by)."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import UNIT, BudgetKnob, Method, Range, VideoTokens, VisualReduction, register_method

BELOW_ONE = Range(0, 1, hi_open=True)  # [0, 1): shares removed


@dataclass
class ToMeConfig:
    enabled: bool = False
    intra_ratio: float = 0.25  # TempMe's proportion: int(N * intra_ratio) removed within each frame
    inter_ratio: float = 0.25  # ... then int(n_clip * inter_ratio) removed across each clip's frames
    clip_frames: int = 2  # neighbouring temporal steps matched together in the inter-frame step
    budget: float | None = None  # kept fraction of the video's tokens; replaces the two ratios when set
    inter_share: float = 0.5  # with a budget: the share of the removals made across frames
    proportional_attention: bool = False  # ToMe's log(size) on the attention logits of merged tokens (SDPA or eager)


def _groups(values):
    import torch

    return torch.unique(values, return_inverse=True)[1]


def reduce(tokens: VideoTokens, cfg: ToMeConfig) -> VisualReduction:
    from prunevid_bench.stages import tome

    if not tokens.is_full_grid:
        raise PruneVidError("tome needs each video's full token grid: run it before other visual-token methods")
    if cfg.budget is not None:
        intra, inter, _ = tome.tome_budget(tokens.t, tokens.n, cfg.budget, cfg.inter_share, cfg.clip_frames)
    else:
        intra, inter = tome.tome_video_removals(tokens.t, tokens.n, cfg.intra_ratio, cfg.inter_ratio, cfg.clip_frames)
    res = tome.tome_video(tokens.embeds.reshape(tokens.t, tokens.n, -1), intra, inter, cfg.clip_frames)
    rep = res.representative.to(tokens.index.device)
    return VisualReduction(dest=res.token_to_merged.to(rep.device), group=_groups(tokens.group[rep]), representative=rep,
                           embeds=res.merged, proportional_attention=cfg.proportional_attention,
                           stats={"tome_merged_tokens": int(tokens.index.numel() - rep.numel())})


def budget_knob(cfg: ToMeConfig, fraction: float) -> BudgetKnob:
    """``budget``: removal counts ToMe takes directly, so ``round(B * T * N)`` exactly (one per
    clip at least, the closest reachable)."""
    from prunevid_bench.stages import tome

    def promise(grids):
        return sum(tome.tome_budget(t, n, fraction, cfg.inter_share, cfg.clip_frames)[2] for t, n in grids)

    return BudgetKnob({"budget": fraction}, promise)

register_method(Method(
    name="tome",
    acts="visual_tokens",
    config=ToMeConfig,
    departs='once on the visual tokens before the LLM, not in every ViT block; merged tokens in position order; the order of later rounds is our choice (docs/methods.md)',
    summary="ToMe: bipartite soft matching, size-weighted merges within frames then across neighbouring frames",
    ranges={"intra_ratio": BELOW_ONE, "inter_ratio": BELOW_ONE, "clip_frames": Range(1),
            "budget": UNIT, "inter_share": Range(0, 1)},
    record_fields=("tome_merged_tokens",),
    reduce=reduce,
    budget_knob=budget_knob,
))
