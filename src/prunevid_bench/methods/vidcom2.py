"""VidCom2 as a method (the official Qwen algorithm): frame uniqueness, the per-frame budget and,
in each frame, the tokens least like the video and frame centres (``stages.vidcom2``). Kept
tokens keep their original M-RoPE ids, as the official code gathers them."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import UNIT, Method, Range, VideoTokens, VisualReduction, fraction_knob, register_method


@dataclass
class VidCom2Config:
    enabled: bool = False
    retention_ratio: float = 0.25  # r: frame t keeps max(1, round(min(1, r (1 + p_t - mean p)) N)) tokens
    exact_count: bool = False  # vLLM's reconcile step to max(T, int(T N r)) tokens (not in the official code)
    budget: float | None = None  # kept fraction of the video's tokens; sets r when given (closest reachable count)


def reduce(tokens: VideoTokens, cfg: VidCom2Config) -> VisualReduction:
    import torch

    from prunevid_bench.stages import vidcom2

    if not tokens.is_full_grid:
        raise PruneVidError("vidcom2 needs each video's full token grid: run it before other visual-token methods")
    grid = tokens.embeds.reshape(tokens.t, tokens.n, -1)
    ratio, scores = cfg.retention_ratio, None
    if cfg.budget is not None:
        scores = vidcom2.vidcom2_scores(grid)  # once: the budget's frame weights and the selection share them
        ratio = vidcom2.vidcom2_budget(scores[1], tokens.n, cfg.budget)[0]
    keep = vidcom2.vidcom2_keep(grid, ratio, exact_count=cfg.exact_count and cfg.budget is None,
                                scores=scores).to(tokens.index.device)
    group = torch.unique(tokens.group[keep], return_inverse=True)[1]
    return VisualReduction.keep(keep, tokens.index.numel(), group,
                                stats={"vidcom2_dropped_tokens": int(tokens.index.numel() - keep.numel())})


register_method(Method(
    name="vidcom2",
    acts="visual_tokens",
    config=VidCom2Config,
    departs="scores in float32; ties by index; exact_count adds vLLM's reconcile step (docs/methods.md)",
    summary="VidCom2: per-frame budgets from frame uniqueness, then each frame's most distinct tokens",
    ranges={"retention_ratio": Range(0, lo_open=True), "budget": UNIT},
    record_fields=("vidcom2_dropped_tokens",),
    reduce=reduce,
    budget_knob=fraction_knob,  # the target; VidCom2's count reaches it only where its rule allows
))
