"""HoliTom's merging as pure tensor functions (read for the rule in cokeshao/HoliTom
``holitom/llava_arch.py`` and ``holitom/modeling_qwen2.py``, and in the Qwen port of
xuyang-liu16/VidCom2, ``qwen`` branch, ``token_compressor/holitom/``; the code is ours).

Outer merging, before the LLM, on one video's tokens x [T, N, C] (T temporal steps, N tokens per
step, flat index t * N + n):

1. ``frame_similarity``: the cosine of each token with the same token one step later, [T-1, N]
   (float32, as the Qwen port).
2. ``static_windows``: a dynamic programme splits the steps into windows; a window [s, e] (e > s)
   is worth ``|{n : sim[f, n] > tau for all f in [s, e)}| * (e - s)`` removed tokens. Strict
   comparisons, so on ties the single step, or the smaller window, wins (as the original).
3. The retained ratio is rescaled so that the removed static tokens count against it:
   ``r' = min(r / ((T N - removed) / (T N)), 1)``.
4. Per window of W >= 2 steps: the static positions (similar over the whole window) are averaged
   over the W steps and clustered by DPC-kNN into ``round(n_static r')`` clusters (``k = min(K,
   clusters)``); each cluster is ``beta * centre + (1 - beta) * mean(its other members)``. In every
   step of every window the other (dynamic) tokens keep ``ceil(n_dyn r')`` by score (the Qwen
   port's score: the token's L2 norm); the rest are dropped (D = 0, the default of both codes).

Inner merging, at LLM layer K: ``inner_merge_weights`` writes the original's sequential update
``h[t] = (h[t] + h[s]) / 2`` (each dropped token s, in ascending order, into its most similar kept
token t) as one weight per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from prunevid_bench.stages.dpc_knn import dpc_knn


def frame_similarity(x: Tensor) -> Tensor:
    """x [T, N, C] -> [T-1, N]: cosine of token (t, n) with (t+1, n), in float32."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(-1)


def static_windows(sim: Tensor, tau: float, max_window: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's ``select_static_windows``: windows [(start, end)] covering every step, and the
    tokens they remove in total (``dp[T-1]``). sim [T-1, N]."""
    n_steps = sim.shape[0] + 1
    above = (sim > tau).cpu()
    count = [[0] * n_steps for _ in range(n_steps)]  # count[s][e]: tokens removed by window [s, e]
    for s in range(n_steps - 1):
        still = torch.ones(above.shape[1], dtype=torch.bool)
        for e in range(s + 1, n_steps):
            still &= above[e - 1]
            count[s][e] = int(still.sum()) * (e - s)
    best, prev = [0] * n_steps, [0] * n_steps
    for i in range(n_steps):
        value, start = (best[i - 1] if i > 0 else 0), i
        for width in range(2, min(i + 1, max_window) + 1):
            j = i - width
            candidate = (best[j] if j >= 0 else 0) + count[j + 1][i]
            if candidate > value:  # strict: ties keep the single step or the smaller window
                value, start = candidate, j + 1
        best[i], prev[i] = value, start
    windows, i = [], n_steps - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], best[-1]


def adjusted_ratio(ratio: float, total: int, removed: int) -> float:
    """The retained ratio after the static removal is counted (the Qwen port's guard included)."""
    return min(ratio / ((total - removed) / total), 1.0) if total > removed else ratio


def cluster_merge(x: Tensor, n_clusters: int, k: int, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """HoliTom's ``merge_tokens_by_density`` on x [n, C]: (centres [m] ascending, label [n] the
    cluster of each token, merged [m, C]). Each non-centre joins its nearest centre (the first
    on ties); a cluster with other members is ``beta * centre + (1 - beta) * their mean``."""
    centres = torch.sort(dpc_knn(x.unsqueeze(0), n_clusters, k=min(k, n_clusters))[1][0]).values
    dist = torch.cdist(x.float(), x[centres].float())  # [n, m]
    label = dist.argmin(dim=1)
    label[centres] = torch.arange(n_clusters, device=x.device)
    others = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    others[centres] = False
    count = torch.zeros(n_clusters, device=x.device).index_add_(0, label[others], torch.ones(int(others.sum()), device=x.device))
    summed = torch.zeros(n_clusters, x.shape[1], device=x.device).index_add_(0, label[others], x[others].float())
    centre = x[centres].float()
    mean = summed / count.clamp(min=1)[:, None]
    merged = torch.where((count > 0)[:, None], beta * centre + (1 - beta) * mean, centre)
    return centres, label, merged.to(x.dtype)


@dataclass
class OuterResult:
    """One video's outer merge: ``dest`` [T*N] the output row of each token (-1: dropped),
    ``representative`` [M] ascending (a static cluster: its centre in the window's first step),
    ``merged`` [M, C] the rows' features, ``windows`` and ``ratio`` (r') for the record."""

    dest: Tensor
    representative: Tensor
    merged: Tensor
    windows: list[tuple[int, int]]
    ratio: float


def holitom_outer(x: Tensor, ratio: float, tau: float = 0.8, beta: float = 0.6, k: int = 7,
                  max_window: int = 1024, score: Tensor | None = None) -> OuterResult:
    """HoliTom's outer merge of x [T, N, C] keeping about ``ratio`` of T N; ``score`` [T, N] ranks
    the dynamic tokens (default: their L2 norm, as the Qwen port; ties to the lower index)."""
    n_steps, n, _ = x.shape
    flat = x.reshape(n_steps * n, -1)
    score = x.float().norm(dim=-1) if score is None else score
    sim = frame_similarity(x) if n_steps > 1 else None
    windows, removed = static_windows(sim, tau, max_window) if sim is not None else ([(0, 0)], 0)
    r = adjusted_ratio(ratio, n_steps * n, removed)
    dest = torch.full((n_steps * n,), -1, dtype=torch.long, device=x.device)  # provisional row ids first
    reps, rows = [], []  # per window: representatives [m], features [m, C]
    n_rows = 0
    for s, e in windows:
        static = torch.all(sim[s:e] > tau, dim=0) if e > s else torch.zeros(n, dtype=torch.bool, device=x.device)
        steps = torch.arange(s, e + 1, device=x.device)
        positions = torch.nonzero(static).flatten()
        n_clusters = round(positions.numel() * r) if e > s else 0  # Python's round, as the original (0: the static part vanishes)
        if n_clusters > 0:
            centres, label, merged = cluster_merge(x[s : e + 1, positions].float().mean(0).to(x.dtype), n_clusters, k, beta)
            dest[(steps[:, None] * n + positions[None, :]).flatten()] = (n_rows + label).repeat(e - s + 1)
            reps.append(s * n + positions[centres])
            rows.append(merged)
            n_rows += n_clusters
        dynamic = torch.nonzero(~static).flatten()
        n_keep = math.ceil(dynamic.numel() * r)
        if n_keep:
            best = torch.sort(-score[s : e + 1][:, dynamic].float(), dim=1, stable=True).indices[:, :n_keep]
            kept = (steps[:, None] * n + dynamic[best]).flatten()  # [W * n_keep]
            dest[kept] = n_rows + torch.arange(kept.numel(), device=x.device)
            reps.append(kept)
            rows.append(flat[kept])
            n_rows += kept.numel()
    rep = torch.cat(reps) if reps else torch.zeros(0, dtype=torch.long, device=x.device)
    order = torch.sort(rep).indices
    renumber = torch.empty_like(order)
    renumber[order] = torch.arange(order.numel(), device=x.device)
    dest = torch.where(dest >= 0, renumber[dest.clamp(min=0)], dest)
    merged = torch.cat(rows)[order] if rows else flat[:0]
    return OuterResult(dest, rep[order], merged.to(x.dtype), windows, r)


def inner_keep_count(n_visual: int, ratio: float) -> int:
    """The original's ``round(L (1 - r))`` kept at layer K (at least one: the original raises at 0)."""
    return max(1, round(n_visual * (1 - ratio))) if n_visual else 0


def inner_merge_weights(keep: Tensor, into: Tensor) -> Tensor:
    """The original's sequential merge written as weights. ``keep`` [V'] the kept tokens
    (ascending), ``into`` [V] the kept row each token goes to (a kept token its own, -1 dropped).
    A kept row that received the tokens s_1 < ... < s_m by ``h[t] = (h[t] + h[s]) / 2`` in
    ascending s is ``2^-m h_t + sum_i 2^-(m-i+1) h_{s_i}``: returns each token's weight [V]
    (float64; a row's weights sum to 1; a dropped token 0)."""
    v = into.numel()
    source = into >= 0
    source[keep] = False
    src = torch.nonzero(source).flatten()  # ascending
    dest = into[src]
    received = torch.bincount(dest, minlength=keep.numel())  # m of each kept row
    order = torch.sort(dest * v + src).indices  # grouped by row, ascending index within
    row = dest[order]
    rank = torch.arange(src.numel(), device=into.device) - (received.cumsum(0) - received)[row]
    later = received[row] - 1 - rank  # sources of the same row after this one
    weight = torch.zeros(v, dtype=torch.float64, device=into.device)
    weight[src[order]] = 0.5 ** (later + 1).double()
    weight[keep] = 0.5 ** received.double()
    return weight
