"""One matched-budget rule: a kept fraction B of the original visual tokens becomes the settings
of the method that takes it (``Method.budget_knob``), and the count that method promises.

``--budget`` (run, sweep) and the sweep's ``--methods/--budgets`` cells both come here; the
fraction's range is checked here, once (``methods.check_budget``); the run record holds the
promise beside the kept count (``Pipeline``'s budget fields)."""

from __future__ import annotations

from typing import Any

from prunevid_bench.config import RunConfig, from_dict, merge_into, overrides_to_layer
from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import check_budget, get_method


def budget_overrides(cfg: RunConfig, budget: float) -> dict[str, Any]:
    """``--budget B``: the overrides that make this run keep the fraction B of the original visual
    tokens: the last enabled method with a budget knob (``Method.budget_knob``) turns B into its
    own settings (PruneVid's Stage 1 keeps its settings and Stage 2 keeps round(B * original) in
    total). The range is checked here, once, for every method."""
    check_budget(budget)
    enabled = [get_method(name) for name in cfg.enabled_methods]
    takes = [m for m in enabled if m.budget_knob is not None]
    if not takes:
        named = f" ({', '.join(m.name for m in enabled)} take no budget)" if enabled else ""
        raise PruneVidError(f"--budget needs a method that takes one{named}: e.g. --preset default, or --set tome.enabled=true")
    method = takes[-1]
    knob = method.budget_knob(cfg.section(method.section), budget)
    if knob.tokens_fixed and cfg.budget.match == "tokens":
        raise PruneVidError(knob.tokens_fixed)
    return {f"{method.section}.{key}": value for key, value in knob.settings.items()}


def budget_method(cfg: RunConfig):
    """The enabled method whose knob a ``budget`` setting drives (the last with one), or None."""
    takes = [m for m in (get_method(n) for n in cfg.enabled_methods)
             if m.budget_knob is not None and getattr(cfg.section(m.section), "budget", None) is not None]
    return takes[-1] if takes else None


def with_budget(cfg: RunConfig, budget: float | None, match: str | None = None) -> RunConfig:
    """``cfg`` with ``budget_overrides`` applied (unchanged for None), and ``budget.match`` set
    when ``match`` is given (``flops``: the knob is solved per sample, ``match_flops``)."""
    if match is not None:
        cfg = from_dict(merge_into(cfg.to_dict(), overrides_to_layer({"budget.match": match}), "--match"))
    if budget is None:
        return cfg
    return from_dict(merge_into(cfg.to_dict(), overrides_to_layer(budget_overrides(cfg, budget)), "--budget"))


# --match flops: how close to the asked FLOPs fraction a solved run must come before the solver
# stops (a fraction of the baseline's prefill FLOPs), and how many runs of a sample it may make.
FLOPS_TOLERANCE = 0.005
FLOPS_RUNS = 3


def match_flops(pipe, prepared, cfg: RunConfig):
    """One sample at matched cost (``budget.match: flops``): the knob of the budget's method
    (``Method.budget_knob``) is solved so this run's analytic prefill FLOPs (vision encoder + LLM,
    ``flops.run_flops``) are the fraction B of the unreduced run's, B being the budget asked.

    A run at the token-matched knob shows how this input flows (the tokens entering the LLM, the
    layer K the LLM-layer method prunes at); the FLOPs at any other knob value follow from the
    count the knob promises at the method's place, and bisection over the knob finds B. The run
    at the solved knob is measured; if its FLOPs miss B by more than FLOPS_TOLERANCE (a promise
    the method did not keep exactly), the solve is repeated from that run (FLOPS_RUNS runs at
    most). A method that cannot cost as little as B runs at its smallest budget and says so
    (``match_note``). The record holds the FLOPs fraction reached (``prefill_flops_fraction``)
    beside the token fraction (``visual_tokens_kept_ratio``), the target and the solved knob."""
    method = budget_method(cfg)
    base = from_dict(merge_into(cfg.to_dict(), overrides_to_layer({"budget.match": "tokens"}), "--match"))
    if method is None:  # nothing to match (e.g. a sweep's baseline cell): the run as it is
        return pipe.run(prepared, config=base)
    target = cfg.section(method.section).budget
    place = method.where(cfg.section(method.section))
    if place not in ("vision_encoder", "visual_tokens", "llm_layer"):
        raise PruneVidError(f"--match flops: {method.name} acts at {place}, whose prefill FLOPs are not modelled; "
                            "match it by tokens")
    tried: dict[float, Any] = {}
    fraction = target

    def at(f: float) -> RunConfig:  # the knob set as a FLOPs budget sets it, then run once (matched by tokens)
        return with_budget(with_budget(cfg, f), None, "tokens")

    for _ in range(FLOPS_RUNS):
        run = pipe.run(prepared, config=at(fraction))
        tried[fraction] = run
        if abs(run.prefill_flops_fraction - target) <= FLOPS_TOLERANCE:
            break
        layer = pipe._apply_stages(at(fraction))
        fraction = _solve(pipe, prepared, base, method, place, run, fraction, target,
                          layer.score_layer if layer is not None and layer.layer_method else None)
        if fraction in tried:
            break
    best = min(tried.values(), key=lambda run: abs(run.prefill_flops_fraction - target))
    best.method_fields.update(match="flops", flops_target=target, flops_solve_runs=len(tried))
    if best.prefill_flops_fraction - target > FLOPS_TOLERANCE:
        best.method_fields["match_note"] = (f"{method.name} cannot cost as little as {target:g} of the baseline's prefill "
                                            f"FLOPs here: {best.prefill_flops_fraction:.3f} at the nearest knob tried"
                                            + (" (its count did not follow its knob)" if "budget_note" in best.method_fields else ""))
    elif target - best.prefill_flops_fraction > FLOPS_TOLERANCE:
        best.method_fields["match_note"] = (f"{method.name} reached {best.prefill_flops_fraction:.3f} of the baseline's "
                                            f"prefill FLOPs, not {target:g} (its knob moves in steps)")
    return best


def _lowest(visual_tokens: int) -> float:
    """The smallest knob fraction tried: one visual token's share (a budget is a fraction in (0, 1])."""
    return 1.0 / max(1, visual_tokens)


def _solve(pipe, prepared, base: RunConfig, method, place: str, run, fraction: float, target: float,
           layer: int | None) -> float:
    """The knob fraction whose predicted FLOPs are nearest ``target`` of the baseline's: the
    measured FLOPs of ``run`` (made at ``fraction``) plus the analytic change when the method
    keeps the count its knob promises at another fraction, by bisection (the FLOPs rise with the
    fraction). A method inside the tower's blocks also changes the blocks' FLOPs
    (``BudgetKnob.tower_blocks``)."""
    from prunevid_bench.families import family_of
    from prunevid_bench.flops import run_flops

    model = pipe.model
    family = family_of(model)
    inputs = prepared.inputs
    grids = [list(map(int, g)) for key in ("video_grid_thw", "image_grid_thw")
             for g in (inputs.get(key).tolist() if inputs.get(key) is not None else [])]
    merge = family.geometry(model.config).merge
    video_grids = [(t, (h // merge) * (w // merge)) for t, h, w in
                   (inputs["video_grid_thw"].tolist() if inputs.get("video_grid_thw") is not None else [])]
    vision = family.vision_shape(model.config)
    thw = [list(map(int, g)) for g in (inputs["video_grid_thw"].tolist() if inputs.get("video_grid_thw") is not None else [])]
    images = inputs.get("image_grid_thw") is not None and len(inputs["image_grid_thw"]) > 0
    entered, kept = run.tokens_after_visual_methods, run.visual_tokens_kept
    kept = entered if kept is None else kept

    def analytic(f: float) -> int:
        knob = method.budget_knob(base.section(method.section), f)
        n = knob.promise(video_grids)
        # a method inside the tower's blocks: their counts under its plan (images ran unmerged: the pipeline's rule)
        blocks = knob.tower_blocks(vision, thw) if knob.tower_blocks is not None and not images else None
        if place == "llm_layer":  # layers 0..K see what entered, the later ones what it keeps
            prefill, dropped, skipped = run.llm_prefill_tokens, entered - min(n, entered), 0
        else:  # every LLM layer sees the count it keeps (and the merger projects no more)
            prefill = run.llm_prefill_tokens - entered + n
            dropped = round((entered - kept) * n / entered) if entered else 0
            skipped = run.visual_tokens - n if place == "vision_encoder" else 0
        return run_flops(model.config, vision, grids, run.prompt_tokens, prefill, layer, dropped if layer is not None else 0,
                         0, skipped, blocks)[0].total

    anchor, goal = analytic(fraction), target * run.prefill_flops_baseline

    def predicted(f: float) -> float:
        return run.prefill_flops + analytic(f) - anchor

    lo, hi = _lowest(run.visual_tokens), 1.0
    if predicted(lo) >= goal:
        return lo
    if predicted(hi) <= goal:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(mid) < goal else (lo, mid)
    return min((lo, hi), key=lambda f: abs(predicted(f) - goal))
