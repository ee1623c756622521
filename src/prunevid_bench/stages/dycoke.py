"""DyCoke's two rules as pure tensor functions (read for the rule in KD-TAO/DyCoke
``llava/model/llava_arch.py`` (``dycole_ttm``) and ``llava/model/language_model/modeling_qwen2.py``
(``PrunableDynamicCache``), and in the Qwen port of xuyang-liu16/VidCom2, ``qwen`` branch,
``token_compressor/dycoke/``; the code is ours).

Temporal token merging (TTM), before the LLM, on one video's tokens x [T, N, C] (T temporal steps;
on Qwen a step is a temporal grid step, two frames): it prunes, it merges nothing.

1. Pairs (0, 1), (2, 3), ...: the even step stays whole; the odd step keeps its ``n`` tokens least
   similar (cosine, same position) to the even step.
2. For i in ``range(0, T - 4, 4)``: step i + 2 keeps only its ``n`` tokens least similar to step i
   (steps 2, 6, 10, ...; the last qualifying group is left out by the loop bound, as written).

``n = int((1 - k) N)``. An odd T leaves its last step out of every pair, so the original drops it
(``odd_step="drop"``); ``"keep"`` keeps it whole instead. T = 1 is kept whole and T <= 4 skips
step 2 (the Qwen port; the original raises there).

Dynamic KV pruning, while decoding: ``kv_keep`` (the visual span's attention of the new token
at layer l - 1, the previous step's, the rule that decides).
"""

from __future__ import annotations

import torch
from torch import Tensor



def ttm_keep_per_step(n_tokens: int, merging_ratio: float) -> int:
    """The original's ``int((1 - k) N)``, with its float rounding (1 - 0.7 keeps int(0.30000000000000004 N))."""
    return int((1 - merging_ratio) * n_tokens)


def _least_similar(a: Tensor, b: Tensor, n: int) -> Tensor:
    """The ``n`` positions of step b least similar (cosine) to the same positions of step a,
    ascending (ties: the lower index)."""
    sim = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return torch.sort(torch.sort(sim, stable=True).indices[:n]).values


def ttm_keep(x: Tensor, n_keep: int, odd_step: str = "drop") -> Tensor:
    """x [T, N, C] -> the flat indices [M] TTM keeps, ascending (the Qwen port's order)."""
    t, n, _ = x.shape
    if t == 1:
        return torch.arange(n, device=x.device)
    steps: dict[int, Tensor] = {}  # step -> kept positions in it
    for i in range(0, t - 1, 2):
        steps[i] = torch.arange(n, device=x.device)
        steps[i + 1] = _least_similar(x[i], x[i + 1], n_keep)
    for i in range(0, t - 4, 4):
        steps[i + 2] = _least_similar(x[i], x[i + 2], n_keep)
    if t % 2 and odd_step == "keep":
        steps[t - 1] = torch.arange(n, device=x.device)
    return torch.cat([s * n + p for s, p in sorted(steps.items())])


def ttm_count(t: int, n: int, n_keep: int, odd_step: str = "drop") -> int:
    """The count ``ttm_keep`` gives: ``P N + P n - S2 (N - n)`` (P = T // 2 pairs, S2 =
    ``len(range(0, T - 4, 4))``), plus N for an odd T kept; N for T = 1."""
    if t == 1:
        return n
    pairs, second = t // 2, len(range(0, t - 4, 4))
    return pairs * n + pairs * n_keep - second * (n - n_keep) + (n if t % 2 and odd_step == "keep" else 0)


def ttm_budget(t: int, n: int, fraction: float, odd_step: str = "drop") -> int:
    """The tokens kept per pruned step whose count is closest to ``round(fraction T N)`` (the
    count rises with it; the lower one on a tie)."""
    target = round(fraction * t * n)
    return min(range(n + 1), key=lambda m: (abs(ttm_count(t, n, m, odd_step) - target), m))


def kv_keep_count(span: int, prune_ratio: float) -> int:
    """The original's ``int(img_len * (1 - p))``: 1 - 0.8 is 0.19999999999999996, so 100 keep 19."""
    return int(span * (1 - prune_ratio))


def attention_row(q: Tensor, keys: Tensor, scaling: float) -> Tensor:
    """The new token's attention over every cached position, averaged over heads: q [H, 1, d]
    (rotary applied), keys [H_kv, S, d] -> [S] (float32 softmax; keys repeated for grouped heads)."""
    keys = keys.repeat_interleave(q.shape[0] // keys.shape[0], dim=0)
    return torch.softmax((q.float() @ keys.float().transpose(-1, -2)) * scaling, dim=-1)[:, 0].mean(0)


def kv_keep(attention: Tensor, previous: Tensor | None, n_keep: int, threshold: float = 0.9) -> Tensor | None:
    """DyCoke's decision at one decoding step on the span's attention [V]: when its cosine with
    the previous step's is below ``threshold`` (or there is none), the ``n_keep`` most attended
    span positions (ascending; ties: the lower index); else None (the original then attends to
    the whole cache at this step)."""
    if previous is not None and float(torch.nn.functional.cosine_similarity(attention, previous, dim=0)) >= threshold:
        return None
    return torch.sort(torch.sort(-attention, stable=True).indices[:n_keep]).values
