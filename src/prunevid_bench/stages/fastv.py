"""FastV's selection rule: after layer K, keep the visual tokens the last prompt token attends to
most (attention averaged over heads), a global top-k over all visual tokens, not per group.

Read for the rule (the code is ours): pkunlp-icler/FastV ``src/FastV/lmms-eval-with-kvcache/
fastv_kvcache.py`` and ``src/FastV/llava-hf/.../modeling_llama.py``: the attention of layer K-1
(causal, after rotary), ``mean(dim=heads)[-1]`` over the image span, ``topk(int(V * (1 - R)))``,
kept indices sorted, everything from layer K on runs on the shorter sequence. The score itself
is ``stages.stage2.last_token_scores``.

Shapes: V visual tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages.stage2 import last_token_scores

DEFAULT_LAYER = 2  # FastV's K
DEFAULT_RATIO = 0.5  # FastV's R: the share of visual tokens dropped

__all__ = ["DEFAULT_LAYER", "DEFAULT_RATIO", "fastv_budget", "fastv_keep", "fastv_keep_count", "last_token_scores"]


def fastv_keep_count(n_visual: int, ratio: float) -> int:
    """FastV's count for drop ratio R: ``int(V * (1 - R))``."""
    if not 0.0 <= ratio < 1.0:
        raise PruneVidError(f"FastV ratio must be in [0, 1), got {ratio}")
    return int(n_visual * (1 - ratio))


def fastv_keep(scores: Tensor, n_keep: int) -> Tensor:
    """scores [V] -> ascending positions [n_keep] of the n_keep highest scores (global top-k;
    ties: lower index first, a stable sort where FastV's ``topk`` leaves them unspecified)."""
    if not 0 <= n_keep <= scores.numel():
        raise PruneVidError(f"FastV cannot keep {n_keep} of {scores.numel()} visual tokens")
    best = torch.sort(-scores.float(), stable=True).indices[:n_keep]
    return torch.sort(best).values


def fastv_budget(n_visual: int, budget: float) -> tuple[int, int]:
    """FastV's knob for a kept fraction ``budget``: the kept count itself (FastV's
    ``ATTENTION_RANK``), so it is exact: ``round(budget * V)``. Returns (n_keep, achieved)."""
    n_keep = round(budget * n_visual)
    return n_keep, n_keep
