"""Stage 1 of PruneVid: spatial-temporal merging of one video's visual tokens.

Pure tensor functions (docs/algorithm.md, Stage 1): split the video into
contiguous temporal segments, split each segment's spatial slots into static and dynamic, and
cluster each set with DPC-KNN, merging each cluster into the plain mean of its members.

Qwen2.5-VL layout: a "frame" is one temporal grid step (two input frames), and a video's tokens
are t-major, then merged rows, then merged columns, so token (t, n) has flat index ``t * N + n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages.dpc_knn import dpc_knn


@dataclass(frozen=True)
class Stage1Result:
    """The merged tokens of one video, in ascending order of their representatives.

    M merged tokens from T*N input tokens:
      - merged: [M, C], the input's dtype; each row is the plain mean of its members.
      - representative: LongTensor [M], flat index (t * N + n) of the input token whose M-RoPE
        position the merged token takes: a dynamic cluster's centre, or a static cluster's centre
        slot in the segment's first frame. Strictly increasing.
      - group: LongTensor [M], the Stage-2 group of each merged token (see group_kind).
      - cluster_size: LongTensor [M], input tokens represented; a static cluster of c slots in a
        W-frame segment represents c * W.
      - token_to_merged: LongTensor [T * N], the row of ``merged`` that represents each input
        token (``merged[r]`` is the mean of the tokens mapped to r, a static slot counting once
        per frame, which gives the same mean).
      - group_kind / group_segment / group_frame: one entry per group id. Groups are numbered
        segment by segment, the segment's static group first, then one dynamic group per frame,
        as in the official layout; empty groups are left out. group_frame is the frame of a
        dynamic group and the segment's first frame for a static group.
      - segment_lengths: frames per temporal segment, summing to T.
      - n_static_tokens / n_dynamic_tokens: merged tokens that are static / dynamic.
    """

    merged: Tensor
    representative: Tensor
    group: Tensor
    cluster_size: Tensor
    token_to_merged: Tensor
    group_kind: list[str]
    group_segment: list[int]
    group_frame: list[int]
    segment_lengths: list[int]
    n_static_tokens: int
    n_dynamic_tokens: int

    @property
    def n_segments(self) -> int:
        return len(self.segment_lengths)

    @property
    def n_merged(self) -> int:
        return self.merged.shape[0]


def contiguous_segments(labels: Sequence[int]) -> list[int]:
    """Turn per-frame cluster labels (in time order) into contiguous segment lengths, with the
    semantics of the official ``refine_clusters`` followed by ``segment_lengths``:

      1. For each label, find its runs of consecutive frames and keep every run that ties for
         the label's longest; drop the others. A label whose runs all have length 1 loses all
         of them.
      2. Scan left to right. Each maximal stretch of dropped frames takes the label of the
         longer adjacent run, measured on the labels as already updated by the scan (so a
         stretch that joined the run on its left lengthens it). Ties go to the left; a stretch
         with no neighbour at all (every frame dropped) gets label 0.
      3. Segments are the maximal runs of equal labels.

    E.g. ``[3,0,3,3,1,2,2,2,0,0,0,0,0,0,0,0]`` -> ``[5, 3, 8]`` and ``[0,0,1,1,1,0,0]`` ->
    ``[2, 3, 2]`` (both runs of 0 tie for its longest, so both stay). Kept runs have >= 2
    frames, so every segment has >= 2 frames whenever T >= 2.
    """
    labels = list(labels)
    if not labels:
        raise PruneVidError("cannot segment a video with no frames")
    runs: list[list[int]] = []  # [label, start, length]
    for i, label in enumerate(labels):
        if runs and runs[-1][0] == label:
            runs[-1][2] += 1
        else:
            runs.append([label, i, 1])
    longest: dict[int, int] = {}
    for label, _, length in runs:
        longest[label] = max(longest.get(label, 0), length)
    out: list[int | None] = list(labels)
    for label, start, length in runs:
        if length < 2 or length < longest[label]:
            out[start : start + length] = [None] * length

    def run_length(i: int, step: int) -> int:  # run of equal labels at i, walking by step
        j = i
        while 0 <= j + step < len(out) and out[j + step] == out[i]:
            j += step
        return abs(j - i) + 1

    i = 0
    while i < len(out):
        if out[i] is not None:
            i += 1
            continue
        end = i
        while end < len(out) and out[end] is None:
            end += 1
        left = run_length(i - 1, -1) if i > 0 else 0
        right = run_length(end, 1) if end < len(out) else 0
        if left == 0 and right == 0:
            fill = 0
        else:
            fill = out[i - 1] if left >= right else out[end]
        out[i:end] = [fill] * (end - i)
        i = end
    lengths = [1]
    for a, b in zip(out, out[1:]):
        if a == b:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def segment_frames(frame_means: Tensor, temporal_segment_ratio: float, k: int = 7) -> list[int]:
    """Split T frames into contiguous temporal segments; returns their lengths (sum T, each >= 1).

    frame_means: [T, C], the mean token of each frame. DPC-KNN clusters them, ignoring time, into
    ``max(1, int(T * temporal_segment_ratio))`` clusters (``int`` truncation as in the official
    code), and ``contiguous_segments`` makes the labels contiguous in time as the official
    ``refine_clusters`` does (no segment of one frame unless T == 1).
    """
    n_frames = frame_means.shape[0]
    n_clusters = max(1, int(n_frames * temporal_segment_ratio))
    if n_clusters == 1:
        return [n_frames]
    labels, _ = dpc_knn(frame_means.unsqueeze(0), n_clusters, k)
    return contiguous_segments(labels[0].tolist())


def static_slots(tokens: Tensor, tau: float) -> Tensor:
    """Which spatial slots are static over a segment's frames.

    tokens: [W, N, C] (W frames of one segment) -> BoolTensor [N].
    Slot l is static when the mean cosine similarity of its tokens over all ordered frame pairs
    i != j exceeds tau (all pairs, not consecutive ones, as in the official code). W == 1 has no
    pair, so nothing is static. Each cosine is clamped to <= 1 and the diagonal masked out (not
    subtracted), so rounding can never lift the mean above 1: tau == 1 makes nothing static.
    Zero vectors have cosine 0 with everything.
    """
    n_frames, n_slots, _ = tokens.shape
    if n_frames < 2:
        return torch.zeros(n_slots, dtype=torch.bool, device=tokens.device)
    # Cosines from the per-slot Gram matrix rather than normalised copies of the tokens: one
    # pass over [W, N, C] instead of three.
    per_slot = tokens.float().transpose(0, 1)  # [N, W, C]
    gram = torch.bmm(per_slot, per_slot.transpose(1, 2))  # [N, W, W]
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0.0).sqrt().clamp_(min=1e-12)
    cosine = (gram / (norms.unsqueeze(2) * norms.unsqueeze(1))).clamp_(max=1.0)
    eye = torch.eye(n_frames, dtype=torch.bool, device=tokens.device)
    mean_cosine = cosine.masked_fill(eye, 0.0).sum(dim=(1, 2)) / (n_frames * (n_frames - 1))
    return mean_cosine > tau


def _merge_sets(features: Tensor, cluster_ratio: float, k: int, min_cluster_tokens: int):
    """Cluster B same-sized token sets and average each cluster.

    features: [B, n, C] float32 -> (merged [B, m, C], labels [B, n], centers [B, m], sizes [B, m]).
    A set of at most min_cluster_tokens tokens (14 in the official code), or one whose cluster
    count would be n anyway, is left as is: every token is its own cluster, so the identity
    configuration reproduces its input exactly.
    """
    batch, n, _ = features.shape
    m = n if n <= min_cluster_tokens else max(1, int(n * cluster_ratio))
    if m == n:
        identity = torch.arange(n, device=features.device).expand(batch, n)
        sizes = torch.ones(batch, n, dtype=torch.long, device=features.device)
        return features, identity, identity, sizes
    labels, centers = dpc_knn(features, m, k)
    merged, sizes = _cluster_means(features, labels, m, one_hot_matmul=features.is_cuda)
    return merged, labels, centers, sizes


def _cluster_means(features: Tensor, labels: Tensor, m: int, *, one_hot_matmul: bool):
    """Plain mean of each cluster: features [B, n, C], labels [B, n] in [0, m) ->
    (means [B, m, C], sizes LongTensor [B, m]). Every cluster must be non-empty (DPC-KNN's
    centres own themselves).

    On CUDA a one-hot matmul, because CUDA's index_add_ sums in a nondeterministic order;
    elsewhere index_add_, which is deterministic on CPU and skips the matmul's n*m*C multiply-adds.
    """
    batch, _, dim = features.shape
    rows = (labels + torch.arange(batch, device=labels.device).unsqueeze(1) * m).flatten()
    sizes = torch.bincount(rows, minlength=batch * m).view(batch, m)
    if one_hot_matmul:
        one_hot = F.one_hot(labels, m).to(features.dtype)  # [B, n, m]
        sums = torch.bmm(one_hot.transpose(1, 2), features)
    else:
        sums = features.new_zeros(batch * m, dim).index_add_(0, rows, features.flatten(0, 1))
        sums = sums.view(batch, m, dim)
    return sums / sizes.unsqueeze(-1), sizes


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise PruneVidError(f"stage1.{name} must be in (0, 1], got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PruneVidError(f"stage1.{name} must be an integer >= {minimum}, got {value!r}")


def merge_video_tokens(
    tokens: Tensor,
    *,
    tau: float,
    cluster_ratio: float,
    temporal_segment_ratio: float,
    k: int = 7,
    min_cluster_tokens: int = 14,
) -> Stage1Result:
    """Merge one video's tokens [T, N, C] (T temporal grids of N tokens) into M tokens.

    1. Segments: ``segment_frames`` on the frame means.
    2. In each segment of W frames, ``static_slots(tau)`` splits the slots. Static slots are
       averaged over the W frames into the segment's static set; each frame's other slots form
       that frame's dynamic set.
    3. Each set of more than min_cluster_tokens tokens is clustered with DPC-KNN into
       ``max(1, int(n * cluster_ratio))`` clusters, and each cluster becomes the plain mean of its
       members (for the static set, of the time-averaged slots).
    4. Output rows are sorted by representative index (see Stage1Result), NOT in the official
       segment/DPC-score order: Qwen's M-RoPE positions come from the representatives.
    The maths runs in float32; ``merged`` is cast back to the input dtype.
    """
    if tokens.dim() != 3 or 0 in tokens.shape:
        raise PruneVidError(
            f"stage1 expects one video's tokens of shape [T, N, C], got {tuple(tokens.shape)}"
        )
    _check_ratio("tau", tau)
    _check_ratio("cluster_ratio", cluster_ratio)
    _check_ratio("temporal_segment_ratio", temporal_segment_ratio)
    _check_int("k", k, 1)
    _check_int("min_cluster_tokens", min_cluster_tokens, 0)

    n_frames, n_slots, _ = tokens.shape
    device = tokens.device
    x = tokens.float()
    segment_lengths = segment_frames(x.mean(dim=1), temporal_segment_ratio, k)

    merged_parts, rep_parts, group_parts, size_parts = [], [], [], []
    member_parts, row_parts = [], []  # input flat indices and their (pre-sort) merged rows
    group_kind: list[str] = []
    group_segment: list[int] = []
    group_frame: list[int] = []
    n_rows = n_static = 0

    start = 0
    for segment, width in enumerate(segment_lengths):
        segment_tokens = x[start : start + width]  # [W, N, C]
        frames = torch.arange(start, start + width, device=device)
        is_static = static_slots(segment_tokens, tau)
        static_idx = is_static.nonzero().squeeze(1)
        dynamic_idx = (~is_static).nonzero().squeeze(1)

        if static_idx.numel():
            # [1, Ns, C]: each static slot averaged over the segment's frames
            averaged = segment_tokens.index_select(1, static_idx).mean(dim=0, keepdim=True)
            merged, labels, centers, sizes = _merge_sets(
                averaged, cluster_ratio, k, min_cluster_tokens
            )
            m = merged.shape[1]
            merged_parts.append(merged[0])
            rep_parts.append(start * n_slots + static_idx[centers[0]])
            size_parts.append(sizes[0] * width)
            group_parts.append(torch.full((m,), len(group_kind), device=device))
            # A static slot stands for its token in every frame of the segment.
            member_parts.append((frames.unsqueeze(1) * n_slots + static_idx).flatten())
            row_parts.append((n_rows + labels[0]).repeat(width))
            group_kind.append("static")
            group_segment.append(segment)
            group_frame.append(start)
            n_rows += m
            n_static += m

        if dynamic_idx.numel():
            # [W, Nd, C]: the static slots are the same in every frame, so is Nd
            per_frame = segment_tokens.index_select(1, dynamic_idx)
            merged, labels, centers, sizes = _merge_sets(
                per_frame, cluster_ratio, k, min_cluster_tokens
            )
            m = merged.shape[1]
            frame_offsets = torch.arange(width, device=device).unsqueeze(1)
            merged_parts.append(merged.flatten(0, 1))
            rep_parts.append((frames.unsqueeze(1) * n_slots + dynamic_idx[centers]).flatten())
            size_parts.append(sizes.flatten())
            group_parts.append((len(group_kind) + frame_offsets).expand(width, m).flatten())
            member_parts.append((frames.unsqueeze(1) * n_slots + dynamic_idx).flatten())
            row_parts.append((n_rows + frame_offsets * m + labels).flatten())
            for w in range(width):
                group_kind.append("dynamic")
                group_segment.append(segment)
                group_frame.append(start + w)
            n_rows += width * m
        start += width

    representative = torch.cat(rep_parts)
    order = torch.argsort(representative)
    representative = representative[order]
    assert bool((representative[1:] > representative[:-1]).all()), "duplicate representatives"
    new_row = torch.empty_like(order)
    new_row[order] = torch.arange(order.numel(), device=device)
    token_to_merged = torch.full((n_frames * n_slots,), -1, dtype=torch.long, device=device)
    token_to_merged[torch.cat(member_parts)] = new_row[torch.cat(row_parts)]

    return Stage1Result(
        merged=torch.cat(merged_parts)[order].to(tokens.dtype),
        representative=representative,
        group=torch.cat(group_parts).long()[order],
        cluster_size=torch.cat(size_parts)[order],
        token_to_merged=token_to_merged,
        group_kind=group_kind,
        group_segment=group_segment,
        group_frame=group_frame,
        segment_lengths=segment_lengths,
        n_static_tokens=n_static,
        n_dynamic_tokens=n_rows - n_static,
    )
