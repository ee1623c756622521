"""FastV-style scoring as a method: after layer K keep the visual tokens the last prompt token
attends to most (after rotary, causal), over the whole video rather than per group."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.methods import UNIT, LayerContext, Method, fraction_knob, register_method


@dataclass
class FastVConfig:
    enabled: bool = False
    pruning_layer: int | str = "2/28"  # K: FastV prunes after layer 2 of LLaVA's 32; an index or "K/N"
    keep_ratio: float = 0.5  # int(V * keep_ratio) kept over the whole video
    budget: float | None = None  # keep round(budget * visual tokens before any method) instead (FastV's kept count)


def select(ctx: LayerContext, cfg: FastVConfig):
    import torch

    from prunevid_bench.stages import stage2 as s2

    q_rot, k_rot = ctx.rotate(ctx.q, ctx.k)
    ctx.scored_rows = 1
    ctx.scores = s2.last_token_scores(q_rot[:, -1:], k_rot, ctx.visual, ctx.scaling, ctx.seq_len - 1)
    if cfg.budget is not None:
        from prunevid_bench.stages.fastv import fastv_budget, fastv_keep

        n_keep = min(fastv_budget(ctx.original_visual, cfg.budget)[0], ctx.scores.numel())
        return fastv_keep(ctx.scores, n_keep)
    n_keep = int(ctx.scores.numel() * cfg.keep_ratio)
    return torch.sort(torch.topk(ctx.scores, n_keep).indices).values


register_method(Method(
    name="fastv",
    acts="llm_layer",
    config=FastVConfig,
    summary="control: after layer K keep the visual tokens the last prompt token attends to most",
    ranges={"keep_ratio": UNIT, "budget": UNIT},
    record_fields=("pruning_layer",),
    select=select,
    pruning_layer=lambda cfg: cfg.pruning_layer,
    budget_knob=fraction_knob,  # FastV's kept count itself: exact
))
