"""The random control as a method: after layer K keep a random share of each group (what
``stage2.score=random`` does, and ``prunevid sweep --controls random`` runs), so a score can be
told from luck. With ``budget`` it keeps ``round(budget * original)`` in total, so it is a line of a
matched-budget sweep (``--methods random``)."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.methods import UNIT, LayerContext, Method, fraction_knob, register_method


@dataclass
class RandomConfig:
    enabled: bool = False
    pruning_layer: int | str = "10/28"  # K, as for stage2: an index or "K/N"
    keep_ratio: float = 0.4  # int(n * keep_ratio) kept in each group
    seed: int = 0
    budget: float | None = None  # keep round(budget * visual tokens before any method) in total, spread over the groups by size


def select(ctx: LayerContext, cfg: RandomConfig):
    from prunevid_bench.stages import stage2 as s2

    ctx.scores = s2.random_scores(ctx.visual.numel(), cfg.seed, ctx.visual.device)
    total = None if cfg.budget is None else round(cfg.budget * ctx.original_visual)
    return s2.stratified_keep(ctx.scores, ctx.groups, cfg.keep_ratio, total)


register_method(Method(
    name="random",
    acts="llm_layer",
    config=RandomConfig,
    departs='ours, no original: a control keeping the same counts by chance',
    summary="control: after layer K keep a random share of each group (seeded)",
    ranges={"keep_ratio": UNIT, "budget": UNIT},
    record_fields=("pruning_layer",),
    select=select,
    pruning_layer=lambda cfg: cfg.pruning_layer,
    budget_knob=fraction_knob,  # as stage2.budget: round(B * original) in total, by chance
))
