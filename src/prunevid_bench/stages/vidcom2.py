"""VidCom2 (frame uniqueness -> per-frame budgets -> the most distinct tokens of each frame) on
one video's merged visual tokens, before the LLM. Attention-free.

Read for the rules (the code is ours): xuyang-liu16/VidCom2, ``qwen`` branch,
``token_compressor/vidcom2/vidcom2.py`` (``vidcom2_compression`` and helpers) and
``token_compressor/vidcom2/models/qwen2_vl.py`` (called on the patch merger's output with
``base_scale = R_RATIO``); vLLM's port ``vllm/multimodal/video_prune/vidcom2.py`` for contrast.

Shapes: T temporal grid steps, N tokens per step, C channels, C' = int(C / 2) kept channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prunevid_bench.errors import PruneVidError

GAUSSIAN_BANDWIDTHS = tuple(2.0**k for k in range(-3, 2))  # 1/8 .. 2, as the official code
LOW_VARIANCE_SHARE = 0.5  # the official code scores on the lowest-variance half of the channels
FRAME_TEMPERATURE = 0.01  # softmax temperature of the frame budget


def low_variance_channels(x: Tensor, share: float = LOW_VARIANCE_SHARE) -> Tensor:
    """x [V, C] -> [V, int(C * share)]: the channels with the smallest (biased) variance over all
    tokens, in ascending order of variance (ties: lower channel first)."""
    variances = x.float().var(dim=0, unbiased=False)
    k = int(x.shape[-1] * share)
    return x.index_select(1, torch.sort(variances, stable=True).indices[:k])


def _multi_scale_gaussian(x: Tensor, centre: Tensor) -> Tensor:
    dist_sq = ((x - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2 * a)) for a in GAUSSIAN_BANDWIDTHS)


def gaussian_scores(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """tokens [T, N, C'] -> (video_score [T, N], frame_score [T, N]) in float32: the summed
    multi-scale Gaussian similarity of each L2-normalised token to the video centre (mean of all
    normalised tokens) and to its frame's centre."""
    unit = F.normalize(tokens.float(), dim=-1)
    video_centre = unit.mean(dim=(0, 1), keepdim=True)
    frame_centre = unit.mean(dim=1, keepdim=True)
    return _multi_scale_gaussian(unit, video_centre), _multi_scale_gaussian(unit, frame_centre)


def frame_uniqueness(video_score: Tensor) -> Tensor:
    """[T, N] -> [T] softmax weights over frames of ``-mean video similarity / 0.01``: a frame
    unlike the video as a whole gets most of the weight."""
    score = -video_score.mean(dim=-1)
    return torch.softmax((score - score.max()) / FRAME_TEMPERATURE, dim=0)


def frame_keep_counts(uniqueness: Tensor, retention_ratio: float, tokens_per_frame: int) -> Tensor:
    """The official per-frame budget: scale_t = min(1, r * (1 + p_t - mean p)), then
    k_t = max(1, round(scale_t * N)) (``torch.round``: halves to even). LongTensor [T].

    The counts sum to about r * T * N, not exactly, and r = 1 does not keep everything (frames
    below the mean weight get scale < 1); ``vidcom2_budget`` handles both."""
    if retention_ratio <= 0:
        raise PruneVidError(f"VidCom2 retention_ratio must be > 0, got {retention_ratio}")
    scales = (retention_ratio * (1 + uniqueness - uniqueness.mean())).clamp(max=1.0)
    return (scales * tokens_per_frame).round().long().clamp(min=1)


def vidcom2_scores(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """tokens [T, N, C] -> (token_similarity [T, N], frame uniqueness [T]): everything VidCom2
    computes from the features; the budget only enters in ``frame_keep_counts``."""
    n_frames, per_frame, _ = tokens.shape
    selected = low_variance_channels(tokens.reshape(n_frames * per_frame, -1))
    video_score, frame_score = gaussian_scores(selected.reshape(n_frames, per_frame, -1))
    return video_score + frame_score, frame_uniqueness(video_score)


def vidcom2_keep(tokens: Tensor, retention_ratio: float, exact_count: bool = False,
                 scores: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Flat indices (t * N + n, ascending) of the tokens VidCom2 keeps: in each frame the k_t
    tokens least similar to the video and frame centres. tokens [T, N, C]; ``scores``: their
    ``vidcom2_scores`` when already computed (a budget needs them first).

    ``exact_count`` adds vLLM's reconcile step (not in the official code): the total is forced
    to ``max(T, int(T * N * r))`` by dropping the kept tokens with the highest similarity, or
    adding the dropped ones with the lowest, over the whole video."""
    similarity, uniqueness = scores if scores is not None else vidcom2_scores(tokens)
    counts = frame_keep_counts(uniqueness, retention_ratio, tokens.shape[1])
    kept = select_per_frame(similarity, counts)
    if exact_count:
        total = similarity.numel()
        kept = reconcile(similarity.reshape(-1), kept, max(similarity.shape[0], min(int(total * retention_ratio), total)))
    return kept


def reconcile(similarity: Tensor, kept: Tensor, target: int) -> Tensor:
    """vLLM's exact-count step: similarity [V], kept ascending indices -> ascending indices of
    exactly ``target`` tokens (ties: lower index first)."""
    mask = torch.zeros(similarity.numel(), dtype=torch.bool, device=similarity.device)
    mask[kept] = True
    excess = int(mask.sum()) - target
    if excess > 0:  # drop the most redundant kept tokens
        pool = kept
        worst = torch.sort(-similarity[pool], stable=True).indices[:excess]
        mask[pool[worst]] = False
    elif excess < 0:  # add the most distinct dropped tokens
        pool = torch.nonzero(~mask).flatten()
        best = torch.sort(similarity[pool], stable=True).indices[:-excess]
        mask[pool[best]] = True
    return torch.nonzero(mask).flatten()


def select_per_frame(similarity: Tensor, counts: Tensor) -> Tensor:
    """similarity [T, N], counts [T] -> ascending flat indices of each frame's ``counts[t]``
    lowest-similarity tokens (ties: lower index first; the official ``topk`` leaves them
    unspecified)."""
    n_frames, per_frame = similarity.shape
    rank = torch.sort(torch.sort(similarity, dim=-1, stable=True).indices, dim=-1).indices  # [T, N]
    keep = rank < counts[:, None]
    return torch.nonzero(keep.reshape(-1)).flatten()


def vidcom2_budget(uniqueness: Tensor, tokens_per_frame: int, budget: float, iterations: int = 60) -> tuple[float, int]:
    """VidCom2's knob for a kept fraction ``budget``: the retention ratio whose official count
    is closest to ``round(budget * T * N)`` (ties: the larger count), found by bisection on the
    count, which is a non-decreasing step function of the ratio for fixed frame weights.

    The count can step over the target (several frames round at once), so it is exact only
    where the rule allows. The search reaches the ratio at which every frame keeps all its
    tokens (above 1 when frames differ), so budget 1 is the identity. Returns (ratio, achieved).
    """
    n_frames = uniqueness.numel()
    target = round(budget * n_frames * tokens_per_frame)

    def count(ratio: float) -> int:
        return int(frame_keep_counts(uniqueness, ratio, tokens_per_frame).sum())

    full = float(1.0 / (1 + uniqueness - uniqueness.mean()).min())  # every scale reaches 1
    lo, hi = 0.0, full
    if count(hi) < target:
        hi = full * 2  # float rounding at the top: a little more
    for _ in range(iterations):  # invariant: count(lo) < target <= count(hi), or lo == 0
        mid = (lo + hi) / 2
        if count(mid) >= target:
            hi = mid
        else:
            lo = mid
    above, below = count(hi), count(lo) if lo > 0 else None
    if below is not None and target - below < above - target:
        return lo, below
    return hi, above
