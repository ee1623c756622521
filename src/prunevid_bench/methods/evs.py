"""vLLM's Efficient Video Sampling as a method: per spatial position, the dissimilarity to the
same position one temporal step earlier; the first step always kept; a global top-k with vLLM's
count for ``video_pruning_rate`` (``stages.evs``). Kept tokens keep their original M-RoPE ids
(vLLM's own renumbering, ``stages.evs.evs_position_ids(mode="vllm")``, is not wired yet)."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import UNIT, Method, Range, VideoTokens, VisualReduction, register_method


@dataclass
class EVSConfig:
    enabled: bool = False
    video_pruning_rate: float = 0.75  # q: max(N_frame, int(T * N_frame * (1 - q))) tokens kept (vLLM's count)
    budget: float | None = None  # kept fraction of the video's tokens; sets q when given


def reduce(tokens: VideoTokens, cfg: EVSConfig) -> VisualReduction:
    import torch

    from prunevid_bench.stages import evs

    if not tokens.is_full_grid:
        raise PruneVidError("evs needs each video's full token grid: run it before other visual-token methods")
    rate = cfg.video_pruning_rate if cfg.budget is None else evs.evs_budget(tokens.n, tokens.t, cfg.budget)[0]
    mask = evs.evs_retention_mask(tokens.embeds.reshape(tokens.t, tokens.n, -1), rate)
    keep = torch.nonzero(mask).flatten().to(tokens.index.device)
    group = torch.unique(tokens.group[keep], return_inverse=True)[1]
    return VisualReduction(keep=keep, embeds=tokens.embeds[keep], group=group,
                           stats={"evs_dropped_tokens": int(mask.numel() - keep.numel())})


register_method(Method(
    name="evs",
    acts="visual_tokens",
    config=EVSConfig,
    summary="vLLM's EVS: drop the tokens least changed since the previous temporal step (global top-k)",
    ranges={"video_pruning_rate": Range(0, 1, hi_open=True), "budget": UNIT},
    record_fields=("evs_dropped_tokens",),
    reduce=reduce,
))
