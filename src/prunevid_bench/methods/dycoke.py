"""DyCoke (KD-TAO/DyCoke) as a method: temporal token merging (TTM) on each video's visual tokens
before the LLM (``stages.dycoke.ttm_keep``: each odd step keeps its tokens least like the step
before, and every fourth step from 2 its tokens least like step i), and, with ``kv_prune`` on,
dynamic KV-cache pruning while decoding: at every step the new token's attention at layer l - 1
(averaged over heads) over the visual span is compared with the previous step's; when it changed
(cosine below 0.9) the layers from l attend only to the text, the generated tokens and the
``int(V (1 - p))`` most attended visual tokens. The cache itself is never shortened (as the
original's ``PrunableDynamicCache``); the record holds what each step attended.

Quirks of the original reproduced by default: an odd number of steps drops the last one
(``odd_step: drop``; ``keep`` keeps it whole), the span leaves out the last visual token
(``len(TTM) - 1``), and a step whose attention did not change attends to the whole cache
(``on_stable: full``; ``reuse`` keeps the last pruned set, the paper's intent). No Qwen code is
published for the KV part; TTM follows VidCom2's Qwen port (kept tokens in position order)."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import (UNIT, BudgetKnob, DecodeContext, Method, Range, VideoTokens, VisualReduction,
                                    register_method)

STABLE_MODES = ("full", "reuse")

ODD_STEP = ("drop", "keep")  # an odd T: the last step dropped, as the original does, or kept


@dataclass
class DyCokeConfig:
    enabled: bool = False
    merging_ratio: float = 0.75  # k: a pruned step keeps int((1 - k) N) tokens (VidCom2's port: 1 - R_RATIO; lmms: 0.7)
    odd_step: str = "drop"  # an odd T's last step: drop (the original) or keep (whole)
    budget: float | None = None  # kept fraction of the video's tokens before the LLM; sets the tokens per pruned step
    kv_prune: bool = True  # prune the KV cache while decoding (DyCoke's second stage)
    decode_layer: int | str = "3/28"  # l: layers from l attend to the kept positions, scored at l - 1 (dycoke_l = 3)
    prune_ratio: float = 0.8  # p: int(V (1 - p)) visual tokens attended (dycoke_p)
    threshold: float = 0.9  # re-prune when the span's attention cosine with the previous step's is below it
    on_stable: str = "full"  # attention unchanged: full (the original: the whole cache) or reuse (the last kept set)


def _per_step(tokens: VideoTokens, cfg: DyCokeConfig) -> int:
    from prunevid_bench.stages import dycoke

    if cfg.budget is not None:
        return dycoke.ttm_budget(tokens.t, tokens.n, cfg.budget, cfg.odd_step)
    return dycoke.ttm_keep_per_step(tokens.n, cfg.merging_ratio)


def reduce(tokens: VideoTokens, cfg: DyCokeConfig) -> VisualReduction:
    import torch

    from prunevid_bench.stages import dycoke

    if not tokens.is_full_grid:
        raise PruneVidError("dycoke needs each video's full token grid: run it before other visual-token methods")
    keep = dycoke.ttm_keep(tokens.embeds.reshape(tokens.t, tokens.n, -1), _per_step(tokens, cfg), cfg.odd_step)
    keep = keep.to(tokens.index.device)
    group = torch.unique(tokens.group[keep], return_inverse=True)[1]
    dropped = tokens.t % 2 == 1 and tokens.t > 1 and cfg.odd_step == "drop"
    return VisualReduction.keep(keep, tokens.index.numel(), group,
                                stats={"dycoke_dropped_tokens": int(tokens.index.numel() - keep.numel()),
                                       "dycoke_odd_steps_dropped": int(dropped)})


def decode(ctx: DecodeContext, cfg: DyCokeConfig):
    """The visual tokens (indices into ``ctx.visual``) the layers from l attend to at this step,
    or None for all of them."""
    import torch

    from prunevid_bench.stages import dycoke

    span = ctx.visual[:-1]  # the original's image_token_length = len(TTM) - 1: the last visual token stays outside
    attention = dycoke.attention_row(ctx.q, ctx.k, ctx.scaling)[span]
    kept = dycoke.kv_keep(attention, ctx.memory.get("attention"), dycoke.kv_keep_count(span.numel(), cfg.prune_ratio),
                          cfg.threshold)
    ctx.memory["attention"] = attention
    if kept is None and cfg.on_stable == "reuse":
        kept = ctx.memory.get("kept")
    if kept is None:
        return None
    ctx.memory["kept"] = kept
    last = torch.tensor([ctx.visual.numel() - 1], device=kept.device)
    return torch.cat([kept, last])


def budget_knob(cfg: DyCokeConfig, fraction: float) -> BudgetKnob:
    """``budget``: the tokens per pruned step whose TTM count is closest to ``round(B T N)`` (the
    count is exact; T <= 4 and an odd T set its floor and ceiling). A fraction of 1 also turns the
    decoding stage off, so that nothing is reduced."""
    from prunevid_bench.stages import dycoke

    def promise(grids):
        return sum(dycoke.ttm_count(t, n, dycoke.ttm_budget(t, n, fraction, cfg.odd_step), cfg.odd_step)
                   for t, n in grids)

    return BudgetKnob({"budget": fraction, **({"kv_prune": False} if fraction == 1.0 else {})}, promise)


register_method(Method(
    name="dycoke",
    acts="visual_tokens",
    config=DyCokeConfig,
    departs="TTM kept tokens in position order (the Qwen port); the span is every video's visual tokens; "
            "ties by index; the previous attention is reset per sample; float32 softmax (docs/methods.md)",
    summary="DyCoke: drop each odd step's tokens least changed since the step before (TTM); "
            "kv_prune also attends, while decoding, to the visual tokens the new token attends to most",
    ranges={"merging_ratio": Range(0, 1), "budget": UNIT, "prune_ratio": Range(0, 1, hi_open=True),
            "threshold": Range(-1, 1)},
    choices={"odd_step": ODD_STEP, "on_stable": STABLE_MODES},
    record_fields=("dycoke_dropped_tokens", "dycoke_odd_steps_dropped", "decode_attended_per_step", "decode_cached_per_step",
                   "decode_tokens_attended_mean", "decode_tokens_cached_mean", "decode_steps_pruned",
                   "decode_kv_bytes_attended", "decode_kv_bytes_full"),
    reduce=reduce,
    decode=decode,
    also={"decode": lambda cfg: cfg.kv_prune},
    decode_layer=lambda cfg: cfg.decode_layer,
    budget_knob=budget_knob,
))
