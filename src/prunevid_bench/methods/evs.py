"""vLLM's Efficient Video Sampling as a method: per spatial position, the dissimilarity to the
same position one temporal step earlier; the first step always kept; a global top-k with vLLM's
count for ``video_pruning_rate`` (``stages.evs``).

Positions (``evs.positions``): ``original`` (the default) keeps every kept token's and the
text's unpruned M-RoPE ids, as PruneVid does; ``vllm`` is what vLLM does for Qwen2.5-VL: the
kept video tokens keep their ids, the tokens after the video restart at the video's first id + W'
(``stages.evs.evs_position_ids(mode="vllm")``; the reduction's ``positions_after``), and decoding
continues from the largest prompt id + 1; the video's time ids are vLLM's too, ``step * int(seconds
per step) * tokens_per_second`` (``prunevid_bench.mrope.integer_second_time_ids``). ``vllm`` is the
mode that matches vLLM."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import UNIT, BudgetKnob, Method, Range, VideoTokens, VisualReduction, register_method

POSITION_MODES = ("original", "vllm")


@dataclass
class EVSConfig:
    enabled: bool = False
    video_pruning_rate: float = 0.75  # q: max(N_frame, int(T * N_frame * (1 - q))) tokens kept (vLLM's count)
    budget: float | None = None  # kept fraction of the video's tokens; sets q when given
    positions: str = "original"  # original: unpruned ids (as PruneVid); vllm: vLLM's renumbering after the video


def reduce(tokens: VideoTokens, cfg: EVSConfig) -> VisualReduction:
    import torch

    from prunevid_bench.stages import evs

    if not tokens.is_full_grid:
        raise PruneVidError("evs needs each video's full token grid: run it before other visual-token methods")
    rate = cfg.video_pruning_rate if cfg.budget is None else evs.evs_budget(tokens.n, tokens.t, cfg.budget)[0]
    # in a stream, a chunk's first step is compared with the previous chunk's last (tokens.previous)
    mask = evs.evs_retention_mask(tokens.embeds.reshape(tokens.t, tokens.n, -1), rate, tokens.previous)
    keep = torch.nonzero(mask).flatten().to(tokens.index.device)
    group = torch.unique(tokens.group[keep], return_inverse=True)[1]
    # vLLM's recompute_mrope_positions: what follows the video restarts at its first id + W'
    # (channel 3 of compute_mrope_for_media), whichever tokens were kept
    after = tokens.w if cfg.positions == "vllm" else None
    return VisualReduction.keep(keep, tokens.index.numel(), group, positions_after=after,
                                stats={"evs_dropped_tokens": int(mask.numel() - keep.numel())})


def budget_knob(cfg: EVSConfig, fraction: float) -> BudgetKnob:
    """``budget``: the pruning rate whose count is ``round(B * T * N)``, at least one step per video."""
    from prunevid_bench.stages import evs

    return BudgetKnob({"budget": fraction}, lambda grids: sum(evs.evs_budget(n, t, fraction)[1] for t, n in grids))

register_method(Method(
    name="evs",
    acts="visual_tokens",
    config=EVSConfig,
    departs="selection as vLLM's EVS; positions: original (our default) keeps each kept token's unpruned M-RoPE id, vllm renumbers as vLLM does; a stream compares a chunk's first step with the previous chunk's last (docs/methods.md)",
    summary="vLLM's EVS: drop the tokens least changed since the previous temporal step (global top-k); "
            "positions=vllm numbers the positions as vLLM does",
    ranges={"video_pruning_rate": Range(0, 1, hi_open=True), "budget": UNIT},
    choices={"positions": POSITION_MODES},
    record_fields=("evs_dropped_tokens",),
    reduce=reduce,
    integer_seconds=lambda cfg: cfg.positions == "vllm",  # vLLM: second_per_grid_ts.long() before scaling
    budget_knob=budget_knob,
))
