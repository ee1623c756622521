"""FastV as a method, at the original's K: layer K-1's attention row of the last prompt token
(after rotary, causal, averaged over heads) ranks the visual tokens over the whole video, and
the tokens it drops are gone before layer K (pkunlp-icler/FastV, inplace code). ``pruning_layer:
2`` is the paper's K = 2: layers 0 and 1 see every token, layer 2 on the kept ones.

``kv_cache`` says what the layers that saw every token keep: ``original`` (the default) their
whole cache, as FastV's KV-cache code (decoding still reads the dropped tokens there);
``compact`` drops them there too, as PruneVid's Stage 3 does."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.methods import UNIT, LayerContext, LayerReduction, Method, fraction_knob, register_method

KV_CACHE_MODES = ("original", "compact")


@dataclass
class FastVConfig:
    enabled: bool = False
    pruning_layer: int | str = "2/28"  # K: the first layer on the kept tokens (scored by layer K-1); an index >= 1 or "K/N"
    keep_ratio: float = 0.5  # int(V * keep_ratio) kept over the whole video
    budget: float | None = None  # keep round(budget * visual tokens before any method) instead (FastV's kept count)
    kv_cache: str = "original"  # original: layers 0..K-1 keep their whole cache (FastV); compact: drop there too


def select(ctx: LayerContext, cfg: FastVConfig) -> LayerReduction:
    import torch

    from prunevid_bench.stages import stage2 as s2

    q_rot, k_rot = ctx.rotate(ctx.q, ctx.k)
    ctx.scored_rows = 1
    ctx.scores = s2.last_token_scores(q_rot[:, -1:], k_rot, ctx.visual, ctx.scaling, ctx.seq_len - 1)
    if cfg.budget is not None:
        from prunevid_bench.stages.fastv import fastv_budget, fastv_keep

        n_keep = min(fastv_budget(ctx.original_visual, cfg.budget)[0], ctx.scores.numel())
        keep = fastv_keep(ctx.scores, n_keep)
    else:
        n_keep = int(ctx.scores.numel() * cfg.keep_ratio)
        keep = torch.sort(torch.topk(ctx.scores, n_keep).indices).values
    return LayerReduction(keep=keep, compact_cache=cfg.kv_cache == "compact")


register_method(Method(
    name="fastv",
    acts="llm_layer",
    config=FastVConfig,
    departs="ties broken by index; layer K-1's attention row recomputed for the last query (no eager pass); kv_cache: compact is ours (the original keeps layers 0..K-1 whole); K=0 refused (docs/methods.md)",
    summary="control: layer K-1's last-token attention keeps the visual tokens that layers K.. see",
    ranges={"keep_ratio": UNIT, "budget": UNIT},
    choices={"kv_cache": KV_CACHE_MODES},
    record_fields=("pruning_layer",),
    select=select,
    pruning_layer=lambda cfg: cfg.pruning_layer,
    prunes_before=True,
    budget_knob=fraction_knob,  # FastV's kept count itself: exact
    attention_scores=lambda cfg: "last_row",
))
