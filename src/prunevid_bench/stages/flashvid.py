"""FlashVID's vision side on one video's merged visual tokens: temporal segments (DySeg with a
minimum count), then per segment attention- and diversity-based token selection (ADTS) and
tree-based spatio-temporal merging (TSTM: temporal trees, then DPC-kNN over their roots).

Read for the rules (the code is ours): Fanziyang-v/FlashVID, ``flashvid/utils.py``
(``flashvid_compression``, ``segment_compression``, ``segment``, ``additional_segment``,
``spatiotemporal_compression``, ``dpc_knn``), ``flashvid/token_selection.py``
(``attn_div_based_token_selection``, the one the Qwen scripts use), ``scripts/qwen2_5_vl.sh`` and
``scripts/qwen3_vl.sh`` for the defaults. The attention is the tower's ``received`` rule.

Shapes: T temporal grid steps ("frames"), N tokens per step, C channels; flat index t * N + n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages.dpc_knn import dpc_knn



@dataclass
class FlashVIDResult:
    dest: Tensor  # [T * N] output row of each token (-1: dropped)
    representative: Tensor  # [M] ascending flat index of each row's position
    embeds: Tensor  # [M, C] the rows as FlashVID computes them
    adts: Tensor  # [M] bool: an ADTS row
    segments: list[int]  # segment lengths in frames (a zero-length one: an empty segment, as the original)
    stats: dict[str, int] = field(default_factory=dict)


def frame_budget(n: int, ratio: float, expansion: float, alpha: float, frame_tokens: int | None = None
                 ) -> tuple[int, int, int]:
    """(budget, ADTS, TSTM) tokens per frame: ``budget = ceil(N r expansion)`` (or ``frame_tokens``),
    ``ceil(budget alpha)`` of them by ADTS, the rest by TSTM."""
    budget = math.ceil(n * ratio * expansion) if frame_tokens is None else frame_tokens
    adts = math.ceil(budget * alpha)
    return budget, adts, budget - adts


def flashvid_segments(x: Tensor, threshold: float, min_segments: int, complementary: bool = True) -> list[int]:
    """Cut where consecutive frame means' cosine < threshold (in x's dtype); with fewer than
    ``min_segments`` segments, the similarities below the threshold are set to 1 and the lowest
    ``min(missing, T - 1)`` become extra cuts, without removing duplicates: a place cut twice gives
    a zero-length segment, as the original. Ties: lower index first."""
    g = x.mean(dim=1)
    g = g / g.norm(dim=-1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=-1)
    cuts = torch.nonzero(sim < threshold).flatten()
    if cuts.numel() + 1 < min_segments and complementary:
        filled = torch.where(sim < threshold, torch.ones_like(sim), sim)
        extra = torch.sort(filled.float(), stable=True).indices[: min(min_segments - cuts.numel() - 1, sim.numel())]
        cuts = torch.sort(torch.cat([cuts, extra])).values
    edges = [-1, *cuts.tolist(), x.shape[0] - 1]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def adts(x: Tensor, attention: Tensor, k: int) -> Tensor:
    """x [L, N, C], attention [L, N] -> [L, k'] ascending indices, k' = min(max(k, 1), N): per
    frame, ``D[i, j] = (1 - cos(i, j)) * attn[j] * 1e6`` in float32; the first pick maximises the
    second-smallest entry of column j, each next one ``min over picked s of D[s, j]`` (picked set
    to -1); ``argmax`` takes the first maximum."""
    length, n, _ = x.shape
    k = min(max(k, 1), n)
    if n < 2:
        raise PruneVidError("FlashVID's ADTS needs at least 2 tokens per frame")
    unit = x.float() / x.float().norm(dim=-1, keepdim=True)
    dist = (1.0 - unit @ unit.transpose(1, 2)) * (attention.float() * 1e6)[:, None, :]  # [L, N, N]
    picks = torch.zeros(length, k, dtype=torch.long, device=x.device)
    picks[:, 0] = torch.topk(dist, 2, dim=1, largest=False).values[:, 1, :].argmax(dim=-1)
    for i in range(1, k):
        chosen = torch.gather(dist, 1, picks[:, :i, None].expand(-1, -1, n)).min(dim=1).values
        chosen.scatter_(1, picks[:, :i], -1.0)
        picks[:, i] = chosen.argmax(dim=-1)
    return torch.sort(picks, dim=-1).values


def temporal_trees(x: Tensor, free: Tensor, lower_bound: int, threshold: float, tree_merge: str = "original"
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """TSTM's temporal step on one segment x [L, N, C] (L > 1), ``free`` [L, N] the non-ADTS tokens.
    Each free token of frame t points to its most similar free token of frame t - 1 and merges
    into it when that cosine exceeds the threshold (raised to the (LN - lower_bound)-th largest,
    kept above -1, when fewer than ``lower_bound`` tokens would stay). Returns (root [L, N] the
    flat segment index of each token's tree root, roots' features [L, N, C] (valid at roots),
    is_root [L, N] free roots). A root's features: ``original`` its subtree's sum over 1 + its
    direct children (a chain a <- b <- c gives (a + b + c) / 2), ``mean`` the subtree's mean."""
    length, n, _ = x.shape
    unit = x / x.norm(dim=-1, keepdim=True)
    sim = torch.einsum("bnd,bmd->bnm", unit[1:], unit[:-1])  # frame t + 1's tokens against frame t's
    sim = sim.masked_fill(~free[1:, :, None], -1.0).masked_fill(~free[:-1, None, :], -1.0)
    best, parent = sim.max(dim=-1)
    best = torch.cat([best.new_full((1, n), -1.0), best])
    parent = torch.cat([parent.new_full((1, n), -1), parent])
    merges = best > threshold
    if int((~merges).sum()) < lower_bound and length * n - lower_bound > 0:
        soft = torch.sort(best.reshape(-1).float(), descending=True).values[length * n - lower_bound - 1]
        merges = best > max(float(soft), -1.0 + 1e-6)
    feats, count = x.clone(), torch.ones(length, n, dtype=x.dtype, device=x.device)
    size = torch.ones(length, n, dtype=x.dtype, device=x.device)
    children = torch.zeros(length, n, dtype=x.dtype, device=x.device)
    for t in range(length - 1, 0, -1):  # last frame first: a subtree's sum travels up undivided
        go = merges[t]
        if bool(go.any()):
            feats[t - 1].index_add_(0, parent[t, go], feats[t, go])
            size[t - 1].index_add_(0, parent[t, go], size[t, go])
            children[t - 1].index_add_(0, parent[t, go], torch.ones_like(count[t, go]))
    divisor = size if tree_merge == "mean" else 1 + children
    feats = feats / divisor[..., None]
    root = torch.arange(length * n, device=x.device).view(length, n)
    for t in range(1, length):
        root[t] = torch.where(merges[t], root[t - 1][parent[t].clamp(min=0)], root[t])
    return root, feats, ~merges & free


def _cluster(feats: Tensor, n_clusters: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN with FlashVID's ``k = min(clusters, 7)``: (labels [n] by centre rank, centres)."""
    labels, centres = dpc_knn(feats[None], n_clusters, k=min(n_clusters, 7))
    return labels[0], centres[0]


def flashvid(x: Tensor, attention: Tensor, retention_ratio: float = 0.25, expansion: float = 1.25, alpha: float = 0.7,
             temporal_threshold: float = 0.8, segment_threshold: float = 0.9, min_segments: int = 4,
             do_segment: bool = True, complementary: bool = True, tree_merge: str = "original",
             single_frame: str = "original", frame_tokens: int | None = None) -> FlashVIDResult:
    """x [T, N, C], attention [T, N] (the tower's ``received`` attention) -> FlashVID's rows.
    ``frame_tokens`` (a budget) replaces ``ceil(N * r * expansion)``. A budget of N or more keeps
    every token (the original raises or duplicates tokens there).

    The original's rows are (a) the ADTS tokens, (b) per frame the DPC-kNN clusters of the TSTM
    roots (a cluster: the plain mean of its roots, at its centre's index). A one-frame segment
    clusters all N tokens, ADTS included (``single_frame: original``), so an ADTS token can also
    centre a cluster: the original then has two rows at one index. An operator row needs a
    position of its own, so such a row takes its lowest non-ADTS member's position (its
    features stay the original's), and one with no other member is folded away; both are
    counted in ``stats``. ``exclude_adts`` clusters only the other tokens."""
    n_frames, n, _ = x.shape
    budget, n_adts, n_tstm = frame_budget(n, retention_ratio, expansion, alpha, frame_tokens)
    if budget >= n:
        full = torch.arange(n_frames * n, device=x.device)
        return FlashVIDResult(full, full, x.reshape(n_frames * n, -1), torch.ones_like(full, dtype=torch.bool),
                              [n_frames], {"flashvid_duplicate_rows": 0})
    segments = flashvid_segments(x, segment_threshold, min_segments, complementary) if do_segment else [n_frames]
    owner = torch.full((n_frames * n,), -1, dtype=torch.long, device=x.device)  # flat index of each token's row
    rows: dict[int, Tensor] = {}  # row position -> features
    is_adts: dict[int, bool] = {}
    moved = folded = 0
    start = 0
    for length in segments:
        if length == 0:
            continue
        seg, base = x[start : start + length], start * n
        picked = adts(seg, attention[start : start + length], n_adts) if n_adts > 0 else seg.new_zeros(length, 0).long()
        free = torch.ones(length, n, dtype=torch.bool, device=x.device)
        free.scatter_(1, picked, False)
        flat_picked = (picked + torch.arange(length, device=x.device)[:, None] * n).reshape(-1)
        flat = seg.reshape(length * n, -1)
        for i in flat_picked.tolist():
            owner[base + i], rows[base + i], is_adts[base + i] = base + i, flat[i], True
        if n_tstm > 0:
            if length > 1:
                root, feats, roots = temporal_trees(seg, free, budget * length, temporal_threshold, tree_merge)
                root, feats = root.reshape(-1), feats.reshape(length * n, -1)
                members = [torch.nonzero(roots[f]).flatten() + f * n for f in range(length)]
            else:
                root, feats = torch.arange(n, device=x.device), flat
                members = [torch.arange(n, device=x.device) if single_frame == "original" else torch.nonzero(free[0]).flatten()]
            total = sum(int(m.numel()) for m in members)
            if total == 0:
                raise PruneVidError("FlashVID's TSTM left no token to merge (temporal_threshold >= 1?)")
            ratio = n_tstm * length / total
            centre_of = torch.full((length * n,), -1, dtype=torch.long, device=x.device)  # member -> its centre
            means = {}
            for m in members:
                clusters = math.ceil(m.numel() * ratio)
                if clusters > 0 and ratio < 1:
                    labels, centres = _cluster(feats[m], clusters)
                    centre_of[m] = m[centres[labels]]
                    sums = torch.zeros(clusters, feats.shape[-1], dtype=feats.dtype, device=x.device).index_add_(0, labels, feats[m])
                    rows_m = sums / torch.bincount(labels, minlength=clusters)[:, None].to(feats.dtype)
                    means.update(zip(m[centres].tolist(), rows_m))
                else:
                    centre_of[m] = m
                    means.update(zip(m.tolist(), feats[m]))
            # every token whose tree root is in a cluster goes with it; ADTS tokens keep their own rows
            token_centre = centre_of[root]
            token_centre[flat_picked] = -1
            went = torch.nonzero(token_centre >= 0).flatten()
            first = torch.full((length * n,), length * n, dtype=torch.long, device=x.device)
            first.scatter_reduce_(0, token_centre[went], went, "amin")
            at_of = torch.arange(length * n, device=x.device)
            is_picked = torch.zeros(length * n, dtype=torch.bool, device=x.device)
            is_picked[flat_picked] = True
            at_of[is_picked] = first[is_picked]  # a centre that is an ADTS token: its lowest other member
            for centre, row in means.items():
                at = int(at_of[centre])
                if at == length * n:
                    folded += 1  # an ADTS token alone: the original's duplicate row has no position of its own
                    continue
                moved += at != centre
                rows[base + at], is_adts[base + at] = row, False
            owner[base + went] = base + at_of[token_centre[went]]
        start += length
    representative = torch.tensor(sorted(rows), dtype=torch.long, device=x.device)
    position = torch.full((n_frames * n,), -1, dtype=torch.long, device=x.device)
    position[representative] = torch.arange(representative.numel(), device=x.device)
    dest = torch.where(owner >= 0, position[owner.clamp(min=0)], owner)
    embeds = torch.stack([rows[i] for i in representative.tolist()]) if rows else x.new_zeros(0, x.shape[-1])
    return FlashVIDResult(dest, representative, embeds, torch.tensor([is_adts[i] for i in representative.tolist()]),
                          segments, {"flashvid_duplicate_rows": moved + folded})


def flashvid_layer_average(ratio: float, expansion: float, pruning_layer: int, num_layers: int, llm_ratio: float) -> float:
    """FlashVID's r as the average visual-token retention over the LLM's layers: ``expansion * r``
    before layer K, ``llm_ratio`` of that after (Qwen2.5-VL-7B: (20 * 1.25 r + 8 * 0.375 r) / 28 = r)."""
    return ratio * expansion * (pruning_layer + (num_layers - pruning_layer) * llm_ratio) / num_layers
