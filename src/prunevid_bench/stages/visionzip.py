"""VisionZip on one video's merged visual tokens, temporal step by step: the dominant tokens by a
score, the others merged into contextual tokens around density-chosen anchors.

Read for the rules (the code is ours): dvlab-research/VisionZip (``visionzip/clip_encoder.py``,
``visionzip/utils.py``: the CLIP original) and its Qwen port in xuyang-liu16/VidCom2, branch
``qwen`` (``token_compressor/visionzip/core.py``, ``visionzip.py``, ``models/qwen2_5_vl.py``,
``models/qwen3_vl.py``), which we follow: the authors ship no Qwen code. Per temporal step,
with the port's defaults:

1. ``keep = max(1, int(N * r))``, ``dominant = max(1, int(keep * 0.6))``, contextual the rest;
2. the dominant tokens: the ``dominant`` highest scores. The port's score is the token's L2
   norm, not attention (``score="norm"``, its default); ``score="attention"`` is the obvious
   correction, the attention each token receives in the vision tower's last block;
3. the other tokens, ascending: density = the mean cosine similarity to their k = 5 most similar
   others; the ``contextual`` densest are the anchors;
4. every other token joins its most cosine-similar anchor; a contextual row is the plain mean
   of its members (an anchor is always its own member here: see ``visionzip_keep``);
5. output rows in ascending order of the kept (dominant and anchor) tokens.

Shapes: T temporal steps, N tokens per step, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prunevid_bench.errors import PruneVidError

DOMINANT_SHARE = 0.6  # the port's visionzip_dominant_ratio
K_NEIGHBOURS = 5  # the port's visionzip_k_neighbors
RETENTION = 0.25  # the port's R_RATIO


@dataclass
class VisionZipResult:
    dest: Tensor  # [T * N] the output row of each token (-1: dropped)
    representative: Tensor  # [M] ascending flat index of each output row's kept token
    dominant: Tensor  # [M] bool: the row is a dominant token (else a contextual one)


def step_counts(n: int, ratio: float, dominant_share: float = DOMINANT_SHARE) -> tuple[int, int]:
    """(dominant, contextual) tokens kept per temporal step of ``n`` tokens."""
    keep = max(1, int(n * ratio))
    dominant = max(1, int(keep * dominant_share))
    return dominant, keep - dominant


def visionzip_keep(x: Tensor, scores: Tensor, ratio: float = RETENTION, dominant_share: float = DOMINANT_SHARE,
                   k: int = K_NEIGHBOURS, keep_count: int | None = None) -> VisionZipResult:
    """x [T, N, C], scores [T, N] (higher: more dominant) -> the VisionZip operator, step by
    step. ``keep_count`` (a budget) replaces ``max(1, int(N * ratio))``.

    Ties: lower index first (a stable sort; the port's ``topk`` leaves them unspecified). The
    port lets an anchor that is an exact duplicate of an earlier anchor join that one (its own
    row is then itself alone); here every anchor is its own member, so the operator has one
    row per kept token."""
    n_steps, n, _ = x.shape
    if not 0 < ratio <= 1:
        raise PruneVidError(f"VisionZip retention ratio must be in (0, 1], got {ratio}")
    keep = max(1, int(n * ratio)) if keep_count is None else min(n, max(1, keep_count))
    n_dom = max(1, int(keep * dominant_share))
    n_ctx = keep - n_dom
    dest = torch.full((n_steps, n), -1, dtype=torch.long, device=x.device)
    is_dom = torch.zeros(n_steps, n, dtype=torch.bool, device=x.device)
    unit = F.normalize(x.float(), dim=-1)
    for t in range(n_steps):
        dominant = torch.sort(-scores[t].float(), stable=True).indices[:n_dom]
        is_dom[t, dominant] = True
        dest[t, dominant] = dominant  # a kept token's row, by its own index for now
        rest = torch.nonzero(~is_dom[t]).flatten()
        if n_ctx == 0 or rest.numel() == 0:
            continue
        sim = unit[t, rest] @ unit[t, rest].T  # [R, R]
        nk = min(k, rest.numel() - 1)
        if nk == 0:  # one token left: the port's density is NaN; it is its own anchor
            anchors = torch.zeros(1, dtype=torch.long, device=x.device)
        else:  # the k most similar others: the top k + 1, self (the largest) left out
            density = torch.sort(sim, dim=-1, descending=True, stable=True).values[:, 1 : nk + 1].mean(dim=-1)
            anchors = torch.sort(torch.sort(-density, stable=True).indices[:n_ctx]).values
        joins = sim[:, anchors].argmax(dim=-1)  # first maximum: the lowest anchor on a tie
        joins[anchors] = torch.arange(anchors.numel(), device=x.device)
        dest[t, rest] = rest[anchors][joins]
    flat = (dest + torch.arange(n_steps, device=x.device)[:, None] * n).where(dest >= 0, dest).reshape(-1)
    representative = torch.unique(flat[flat >= 0])
    row = torch.full((n_steps * n,), -1, dtype=torch.long, device=x.device)
    row[representative] = torch.arange(representative.numel(), device=x.device)
    out = torch.where(flat >= 0, row[flat.clamp(min=0)], flat)
    return VisionZipResult(out, representative, is_dom.reshape(-1)[representative])


def visionzip_budget(n: int, budget: float) -> int:
    """The tokens per temporal step that keep the fraction ``budget``: ``max(1, round(budget * n))``."""
    return max(1, round(budget * n))
