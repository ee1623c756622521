"""The numbers a method's keys take: ``Range`` (a key's bounds), ``BUDGET`` (a kept fraction) and
``BudgetKnob`` (the method's own keys that keep a fraction, and the count they promise)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from prunevid_bench.errors import PruneVidError


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: ``lo``/``hi`` bounds (None: unbounded), open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def contains(self, value: float) -> bool:
        """Written as "is inside" so that NaN is outside every range."""
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def check(self, key: str, value: float) -> None:
        if not self.contains(value):
            raise PruneVidError(f"{key} must be {self}, got {value}")


UNIT = Range(0, 1, lo_open=True)  # (0, 1]: ratios
BUDGET = UNIT  # a kept fraction of the original visual tokens (--budget, --budgets, a method's `budget` key)


def check_budget(fraction: float, name: str = "--budget") -> None:
    """The one range check of a kept fraction, wherever it enters."""
    BUDGET.check(name, fraction)


@dataclass(frozen=True)
class BudgetKnob:
    """What ``Method.budget_knob(cfg, fraction)`` returns: ``settings``, the method's own keys
    that keep the fraction (e.g. ``{"budget": 0.25}``), and ``promise(grids)``, the visual tokens
    it promises to keep for videos of these ``(t, n)`` grids (temporal steps, tokens per step).
    A method inside the vision tower's blocks adds ``tower_blocks(vision, grids)``: per block,
    (patches in attention, attention pairs, patches in the MLP) its plan gives for videos of these
    ``(t, h, w)`` patch grids (``flops.vision_encoder_flops``'s ``blocks``; ``budget.match_flops``
    predicts its FLOPs with them), and ``tokens_fixed``, when its knob leaves the LLM's visual
    tokens as they are, why (a token budget is then refused; a FLOPs budget is not)."""

    settings: dict[str, Any]
    promise: Callable[[list[tuple[int, int]]], int]
    tower_blocks: Callable[[Any, list[tuple[int, int, int]]], list[tuple[int, int, int]]] | None = None
    tokens_fixed: str = ""


def fraction_knob(cfg: Any, fraction: float) -> BudgetKnob:
    """The knob of a method whose ``budget`` key keeps ``round(fraction * all visual tokens)``."""
    return BudgetKnob({"budget": fraction}, lambda grids: round(fraction * sum(t * n for t, n in grids)))
