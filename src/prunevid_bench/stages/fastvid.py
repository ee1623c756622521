"""FastVID on one video's merged visual tokens: dynamic temporal segmentation (DySeg), then per
segment density-based spatio-temporal pruning (STPrune: salient tokens by the tower's attention,
context tokens by DPC-kNN) and merging (DTM: the other tokens folded into the context tokens).

Read for the rules (the code is ours): LunarShen/FastVID, ``fastvid_qwen25vl/lmms-eval/
lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py`` (``Qwen2_5_VLForConditionalGeneration.forward``,
the prefill branch; ``Qwen2_5_VLVisionFlashAttention2.forward`` for the attention) and
``fastvid_qwen25vl/scripts/eval.sh`` for the defaults. The official code is Qwen2.5-VL only.

Shapes: T temporal grid steps ("frames"), N tokens per step, C channels; flat index t * N + n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages.dpc_knn import dpc_knn

DEFAULTS = {"retention_ratio": 0.27, "dyseg_c": 8, "dyseg_tau": 0.84, "dyseg_ignore": 0.95, "stprune_d": 0.4,
            "dtm_p": 4, "dtm_beta": 0.6}  # scripts/eval.sh
DPC_K = 4  # STPrune's k nearest, self included


@dataclass
class FastVIDResult:
    dest: Tensor  # [T * N] output row of each token (-1: dropped); a merged token: its most similar target's row
    representative: Tensor  # [M] ascending flat indices of the kept (salient and context) tokens
    embeds: Tensor  # [M, C] the rows as FastVID computes them (context rows blended with what merged into them)
    salient: Tensor  # [M] bool: a salient row (else a context row)
    segments: list[int]  # DySeg's segment lengths, in frames


def frame_similarity(x: Tensor) -> Tensor:
    """x [L, N, C] -> [L - 1]: cosine of consecutive frames' mean tokens, in x's dtype (the
    official code's bf16, where a threshold like 0.84 is compared as 0.83984375)."""
    g = x.mean(dim=1)
    g = g / g.norm(dim=-1, keepdim=True)
    return (g[:-1] * g[1:]).sum(dim=-1)


def sizes_from_cuts(cuts: list[int], length: int) -> list[int]:
    """Segment lengths of ``length`` frames cut after each frame in ``cuts`` (sorted, distinct)."""
    edges = [-1, *cuts, length - 1]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def dyseg(x: Tensor, c: int, tau: float) -> list[int]:
    """DySeg: cut after the c - 1 least similar frame transitions and after every one below tau.
    A video of T < c frames gets T - 1 cuts (the official ``topk`` raises there); ties: lower
    index first."""
    sim = frame_similarity(x)
    lowest = torch.sort(sim.float(), stable=True).indices[: max(0, min(c - 1, sim.numel()))]
    cuts = torch.unique(torch.cat([lowest, torch.nonzero(sim < tau).flatten()]))
    return sizes_from_cuts(cuts.tolist(), x.shape[0])


def segment_budgets(x: Tensor, frame_retain: int, d: float, p: int, ignore: float) -> tuple[list[int], list[int]]:
    """(salient, context) counts of each frame of one segment x [L, N, C], the official rule:
    the segment's ``frame_retain * L`` tokens split into context ``max(int(. * d), 1)`` and
    salient; frames at least ``ignore``-similar to the next form sub-segments whose whole
    budget goes to their LAST frame; salient split evenly over the V sub-segments (remainder to
    the first), context over ceil(V / p) groups placed every p-th sub-segment, clamped to N // 2
    and then reversed (the last sub-segment gets the first group's share)."""
    length, n, _ = x.shape
    seg_retain = frame_retain * length
    context = max(int(seg_retain * d), 1)
    salient = seg_retain - context
    if length == 1:
        return [salient], [context]
    sim = frame_similarity(x)
    subs = sizes_from_cuts(torch.nonzero(sim < ignore).flatten().tolist(), length)
    v = len(subs)
    sub_salient = [salient // v + (i < salient % v) for i in range(v)]
    groups = -(-v // p)
    group_context = [context // groups + (i < context % groups) for i in range(groups)]
    sub_context = [min(group_context[i // p], n // 2) if i % p == 0 else 0 for i in range(v)][::-1]
    per_salient, per_context = [], []
    for size, s, ctx in zip(subs, sub_salient, sub_context):
        per_salient += [0] * (size - 1) + [min(s, n - ctx)]
        per_context += [0] * (size - 1) + [ctx]
    return per_salient, per_context


def fastvid(x: Tensor, attention: Tensor, retention_ratio: float = 0.27, c: int = 8, tau: float = 0.84,
            ignore: float = 0.95, d: float = 0.4, p: int = 4, beta: float = 0.6,
            frame_retain: int | None = None) -> FastVIDResult:
    """x [T, N, C] the video's tokens, attention [T, N] each token's score (the tower's
    ``pseudo_cls`` attention) -> FastVID's rows. ``frame_retain`` (a budget) replaces
    ``int(N * retention_ratio)``.

    Per context frame of a segment, every token of the segment that is neither salient nor one
    of THIS frame's context tokens (other frames' context tokens included) joins its most
    similar context token of this frame; a target with m members becomes ``w * target + (1 - w)
    * mean(members)``, ``w = max(1 / (m + 1), beta)``. A token is so merged into every context
    frame of its segment, which no single operator row says: ``dest`` sends it to the one
    target it is most similar to, for the sizes and per-token extras; ``embeds`` are FastVID's."""
    n_frames, n, _ = x.shape
    if frame_retain is None:
        frame_retain = int(n * retention_ratio)
    if frame_retain < 1:
        raise PruneVidError(f"FastVID keeps int(N * r) = 0 tokens per frame at N = {n}, r = {retention_ratio}: raise r")
    segments = dyseg(x, c, tau)
    unit = x / x.norm(dim=-1, keepdim=True)  # in x's dtype, as the official code
    kept, rows, is_salient, dest = [], [], [], torch.full((n_frames * n,), -1, dtype=torch.long, device=x.device)
    best = torch.full((n_frames * n,), -float("inf"), device=x.device)
    start = 0
    for length in segments:
        seg = x[start : start + length]
        salient_n, context_n = segment_budgets(seg, frame_retain, d, p, ignore)
        salient, contexts = [], []
        for f in range(length):
            top = torch.sort(-attention[start + f].float(), stable=True).indices[: salient_n[f]]
            salient.append(top + f * n)
            if context_n[f] > 0:
                rest = torch.nonzero(~torch.isin(torch.arange(n, device=x.device), top)).flatten()
                take = min(context_n[f], rest.numel())
                if take:
                    centres = dpc_knn(seg[f, rest][None], take, k=DPC_K)[1][0]
                    contexts.append(rest[torch.sort(centres).values] + f * n)
        salient = torch.cat(salient)
        flat, flat_unit = seg.reshape(length * n, -1), unit[start : start + length].reshape(length * n, -1)
        everything = torch.arange(length * n, device=x.device)
        for targets in contexts:
            merge = everything[~torch.isin(everything, torch.cat([salient, targets]))]
            sim = flat_unit[merge] @ flat_unit[targets].T  # [m, c]
            choice = sim.argmax(dim=-1)
            one_hot = F.one_hot(choice, targets.numel()).to(x.dtype)
            members = one_hot.sum(dim=0)[:, None]
            weight = (1 / (members + 1)).clamp(min=beta)
            mean = (one_hot.T @ flat[merge]) / members.clamp(min=1)
            rows.append(weight * flat[targets] + (1 - weight) * mean)
            kept.append(targets + start * n)
            is_salient.append(torch.zeros(targets.numel(), dtype=torch.bool, device=x.device))
            score = sim.max(dim=-1).values.float()
            closer = score > best[merge + start * n]
            best[merge[closer] + start * n] = score[closer]
            dest[merge[closer] + start * n] = targets[choice[closer]] + start * n  # flat index for now
        rows.append(flat[salient])
        kept.append(salient + start * n)
        is_salient.append(torch.ones(salient.numel(), dtype=torch.bool, device=x.device))
        start += length
    kept_flat = torch.cat(kept)
    order = torch.argsort(kept_flat)
    representative = kept_flat[order]
    position = torch.full((n_frames * n,), -1, dtype=torch.long, device=x.device)
    position[representative] = torch.arange(representative.numel(), device=x.device)
    dest[representative] = representative
    dest = torch.where(dest >= 0, position[dest.clamp(min=0)], dest)
    return FastVIDResult(dest, representative, torch.cat(rows)[order], torch.cat(is_salient)[order], segments)


def fastvid_budget(n: int, budget: float) -> int:
    """The tokens per frame that a kept fraction ``budget`` gives FastVID: ``max(1, round(budget * N))``
    (its ``int(N * r)``); the count is at most T times that, less where the clamps bite."""
    return max(1, round(budget * n))
