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
    return {f"{method.section}.{key}": value for key, value in knob.settings.items()}


def budget_method(cfg: RunConfig):
    """The enabled method whose knob a ``budget`` setting drives (the last with one), or None."""
    takes = [m for m in (get_method(n) for n in cfg.enabled_methods)
             if m.budget_knob is not None and getattr(cfg.section(m.section), "budget", None) is not None]
    return takes[-1] if takes else None


def with_budget(cfg: RunConfig, budget: float | None) -> RunConfig:
    """``cfg`` with ``budget_overrides`` applied (unchanged for None)."""
    if budget is None:
        return cfg
    return from_dict(merge_into(cfg.to_dict(), overrides_to_layer(budget_overrides(cfg, budget)), "--budget"))
