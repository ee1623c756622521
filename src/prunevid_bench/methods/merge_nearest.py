"""A control for merges inside the LLM: after layer K keep what PruneVid's Stage 2 keeps
(``stage2``'s official score, a share of each group) and average each other visual token into
the most similar kept token of its group (cosine of layer K's output hidden states) instead of
dropping it (a group that keeps nothing is dropped).
The patch applies the merge to the hidden states and to the KV cache of layers 0..K alike (a
merged row keeps its kept token's position), so the path HoliTom-style methods need is proven
against a cache-free reference (``tests/test_merge_nearest.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.methods import UNIT, LayerContext, LayerReduction, Method, register_method


@dataclass
class MergeNearestConfig:
    enabled: bool = False
    pruning_layer: int | str = "10/28"  # K: layers 0..K see all tokens, K+1.. the kept rows; an index or "K/N"
    keep_ratio: float = 0.4  # int(n * keep_ratio) kept in each group; the rest merged into the kept


def select(ctx: LayerContext, cfg: MergeNearestConfig) -> LayerReduction:
    import torch
    import torch.nn.functional as F

    from prunevid_bench.methods.prunevid_stage2 import scores
    from prunevid_bench.stages import stage2 as s2

    ctx.scores = scores(ctx, "prunevid")
    keep = s2.stratified_keep(ctx.scores, ctx.groups, cfg.keep_ratio)
    into = torch.full((ctx.visual.numel(),), -1, dtype=torch.long, device=ctx.visual.device)
    if keep.numel():
        unit = F.normalize(ctx.hidden[ctx.visual].float(), dim=-1)
        similarity = unit @ unit[keep].T  # [V, V']; only a kept token of the token's own group is a neighbour
        same = ctx.groups.view(-1, 1) == ctx.groups[keep].view(1, -1)
        best, into = similarity.masked_fill(~same, float("-inf")).max(dim=1)  # ties: the first kept token
        into[torch.isinf(best)] = -1  # a group that keeps nothing: its tokens are dropped
        into[keep] = torch.arange(keep.numel(), device=keep.device)
    return LayerReduction(keep=keep, merge_into=into)


register_method(Method(
    name="merge_nearest",
    acts="llm_layer",
    config=MergeNearestConfig,
    departs='ours, no original: a control for merging inside the LLM (docs/methods.md)',
    summary="control: after layer K keep Stage 2's share, average every other token into its group's most similar kept one",
    ranges={"keep_ratio": UNIT},
    record_fields=("pruning_layer",),
    select=select,
    pruning_layer=lambda cfg: cfg.pruning_layer,
    keeps_everything={"keep_ratio": 1.0},
))
