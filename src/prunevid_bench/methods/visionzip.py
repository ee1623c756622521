"""VisionZip as a method, as VidCom2's Qwen port runs it (the authors ship no Qwen code): after the
merger, before the LLM, each temporal step keeps its dominant tokens and merges the rest into
contextual tokens (``stages.visionzip``). Kept and anchor tokens keep their own M-RoPE ids; a
contextual row takes its anchor's id (and, on Qwen3-VL, the mean of its members' DeepStack rows,
or its anchor's with ``model.deepstack: representative``, which is what the port does).

``score``: ``norm`` (the default: the port ranks by the merged token's L2 norm, not by
attention) or ``attention`` (the correction: the attention each token receives in the vision
tower's last block, from that block's q and k under any kernel: ``patch.vision_attention``)."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import UNIT, BudgetKnob, Method, Range, VideoTokens, VisualReduction, register_method

SCORES = ("norm", "attention")


@dataclass
class VisionZipConfig:
    enabled: bool = False
    retention_ratio: float = 0.25  # r: each temporal step keeps max(1, int(N r)) tokens (the port's R_RATIO)
    dominant_ratio: float = 0.6  # of those, max(1, int(keep * 0.6)) dominant; the rest contextual
    k_neighbors: int = 5  # density: mean cosine similarity to the k most similar other tokens
    score: str = "norm"  # norm: the port's token L2 norm; attention: attention received in the tower's last block
    budget: float | None = None  # kept fraction: max(1, round(budget * N)) per temporal step instead of r


def reduce(tokens: VideoTokens, cfg: VisionZipConfig) -> VisualReduction:
    import torch

    from prunevid_bench.stages import visionzip

    if not tokens.is_full_grid:
        raise PruneVidError("visionzip needs each video's full token grid: run it before other visual-token methods")
    grid = tokens.embeds.reshape(tokens.t, tokens.n, -1)
    if cfg.score == "norm":
        scores = grid.float().norm(dim=-1)
    else:
        scores = tokens.extras["vision_received"].reshape(tokens.t, tokens.n)
    keep = visionzip.visionzip_budget(tokens.n, cfg.budget) if cfg.budget is not None else None
    res = visionzip.visionzip_keep(grid, scores, cfg.retention_ratio, cfg.dominant_ratio, cfg.k_neighbors, keep)
    rep = res.representative.to(tokens.index.device)
    group = torch.unique(tokens.group[rep], return_inverse=True)[1]
    return VisualReduction(dest=res.dest.to(rep.device), group=group, representative=rep,
                           stats={"visionzip_dominant_tokens": int(res.dominant.sum()),
                                  "visionzip_contextual_tokens": int((~res.dominant).sum())})


def budget_knob(cfg: VisionZipConfig, fraction: float) -> BudgetKnob:
    """``budget``: ``max(1, round(B * N))`` tokens per temporal step, so ``T`` times that, exactly."""
    from prunevid_bench.stages.visionzip import visionzip_budget

    return BudgetKnob({"budget": fraction}, lambda grids: sum(t * visionzip_budget(n, fraction) for t, n in grids))


register_method(Method(
    name="visionzip",
    acts="visual_tokens",
    config=VisionZipConfig,
    departs="follows VidCom2's Qwen port (no official Qwen code); score: norm as the port, attention is ours; "
            "ties by index; an anchor always joins itself (docs/methods.md)",
    summary="VisionZip (VidCom2's Qwen port): per step the dominant tokens, the rest merged into contextual ones",
    ranges={"retention_ratio": UNIT, "dominant_ratio": UNIT, "k_neighbors": Range(1), "budget": UNIT},
    choices={"score": SCORES},
    record_fields=("visionzip_dominant_tokens", "visionzip_contextual_tokens"),
    reduce=reduce,
    budget_knob=budget_knob,
    vision_attention=lambda cfg: "received" if cfg.score == "attention" else None,
))
