"""Stage 1 (DPC-KNN, segmentation, static/dynamic split, merging) on built inputs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages.dpc_knn import dpc_knn, pairwise_distances
from prunevid_bench.stages.stage1 import (
    _cluster_means,
    contiguous_segments,
    merge_video_tokens,
    segment_frames,
    static_slots,
)

DEFAULTS = dict(tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.25)


# --- a per-token Python reference of the documented DPC-KNN rules -------------------------------


def naive_dpc_knn(x: torch.Tensor, n_clusters: int, k: int) -> tuple[list, list]:
    """The rules of dpc_knn written out token by token, in float64, with rho = exp(...) itself."""
    all_labels, all_centers = [], []
    for points in x.double().tolist():
        n, dim = len(points), len(points[0])
        dist = [
            [math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q))) / math.sqrt(dim) for q in points]
            for p in points
        ]
        kk = min(k, n)
        rho = [math.exp(-sum(d * d for d in sorted(row)[:kk]) / kk) for row in dist]
        d_max = max(max(row) for row in dist)
        score = []
        for i in range(n):
            denser = [j for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
            delta = min(dist[i][j] for j in denser) if denser else d_max
            score.append(rho[i] * delta)
        centers = sorted(range(n), key=lambda i: (-score[i], i))[:n_clusters]
        labels = []
        for i in range(n):
            if i in centers:
                labels.append(centers.index(i))
            else:
                labels.append(min(range(n_clusters), key=lambda r: (dist[centers[r]][i], r)))
        all_labels.append(labels)
        all_centers.append(centers)
    return all_labels, all_centers


@pytest.mark.parametrize(
    "seed,batch,n,dim,n_clusters,k",
    [(0, 2, 30, 16, 5, 7), (1, 1, 40, 8, 12, 7), (2, 3, 9, 4, 3, 20), (3, 1, 25, 32, 1, 1),
     (4, 2, 12, 6, 12, 3)],
)
def test_dpc_knn_matches_naive_reference(seed, batch, n, dim, n_clusters, k):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=gen)
    labels, centers = dpc_knn(x, n_clusters, k)
    ref_labels, ref_centers = naive_dpc_knn(x, n_clusters, k)
    assert labels.dtype == torch.long and centers.dtype == torch.long
    assert centers.tolist() == ref_centers
    assert labels.tolist() == ref_labels


def same_partition(labels: list[int], truth: list[int]) -> bool:
    pairs = set(zip(labels, truth))
    return len(pairs) == len(set(labels)) == len(set(truth))


def test_dpc_knn_recovers_planted_blobs():
    gen = torch.Generator().manual_seed(5)
    n_blobs, per_blob, dim = 4, 10, 24
    centres = torch.randn(n_blobs, dim, generator=gen) * 3
    truth = torch.arange(n_blobs).repeat_interleave(per_blob)
    points = centres[truth] + 0.3 * torch.randn(n_blobs * per_blob, dim, generator=gen)
    perm = torch.randperm(len(truth), generator=gen)
    labels, centers = dpc_knn(points[perm].unsqueeze(0), n_blobs, k=7)
    assert same_partition(labels[0].tolist(), truth[perm].tolist())
    assert sorted(truth[perm][centers[0]].tolist()) == list(range(n_blobs))  # one centre per blob


def test_dpc_knn_is_deterministic_with_exact_ties():
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(6, 8, generator=gen)
    x = base[torch.tensor([0, 1, 0, 2, 3, 1, 4, 5, 5, 0, 2, 3])].unsqueeze(0)  # many duplicates
    first = dpc_knn(x, 4)
    second = dpc_knn(x.clone(), 4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # All tokens equal: every density ties, so the index rule decides everything.
    # (120 tokens: an unstable sort reorders equal keys at this size.)
    labels, centers = dpc_knn(torch.ones(2, 120, 3), 60)
    assert centers.tolist() == [list(range(60))] * 2
    assert labels.tolist() == [list(range(60)) + [0] * 60] * 2


def test_pairwise_distances_match_direct_cdist():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 50, 64, generator=gen)
    direct = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist") / 8
    assert torch.allclose(pairwise_distances(x).double(), direct, rtol=1e-5, atol=1e-5)
    # Near-duplicates far from the origin: the uncentred expansion loses them to cancellation.
    near = 50.0 + torch.randn(1, 64, generator=gen) + 1e-3 * torch.randn(1, 20, 64, generator=gen)
    direct = torch.cdist(near.double(), near.double(), compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.allclose(pairwise_distances(near).double(), direct / 8, rtol=1e-3, atol=1e-6)
    assert torch.equal(pairwise_distances(near).diagonal(dim1=1, dim2=2), torch.zeros(1, 20))


def test_dpc_knn_validation():
    x = torch.randn(1, 5, 3)
    with pytest.raises(PruneVidError, match="n_clusters"):
        dpc_knn(x, 0)
    with pytest.raises(PruneVidError, match="n_clusters"):
        dpc_knn(x, 6)
    with pytest.raises(PruneVidError, match="k must"):
        dpc_knn(x, 2, k=0)


# --- temporal segmentation -----------------------------------------------------------------------


def naive_refine(labels):
    """The official segmentation semantics, transcribed step by step with plain loops."""
    T = len(labels)
    runs, s = [], 0  # (label, start, end) of each run of equal labels
    for i in range(1, T + 1):
        if i == T or labels[i] != labels[s]:
            runs.append((labels[s], s, i))
            s = i
    kept = [False] * T
    for label in set(labels):
        mine = [(a, b) for lab, a, b in runs if lab == label]
        best = max(b - a for a, b in mine)
        for a, b in mine:
            if b - a == best and best > 1:
                for f in range(a, b):
                    kept[f] = True
    new = [labels[f] if kept[f] else None for f in range(T)]
    f = 0
    while f < T:
        if new[f] is not None:
            f += 1
            continue
        g = f
        while g < T and new[g] is None:
            g += 1
        left = 0
        while f - 1 - left >= 0 and new[f - 1 - left] == new[f - 1]:
            left += 1
        right = 0
        while g + right < T and new[g + right] == new[g]:
            right += 1
        if f == 0 and g == T:
            value = 0
        elif f == 0:
            value = new[g]
        elif g == T:
            value = new[f - 1]
        else:
            value = new[f - 1] if left >= right else new[g]
        for h in range(f, g):
            new[h] = value
        f = g
    lengths = []
    for f in range(T):
        if f > 0 and new[f] == new[f - 1]:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


@pytest.mark.parametrize(
    "labels,lengths",
    [
        ([3, 0, 3, 3, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0], [5, 3, 8]),  # the case (ours was [4, 4, 8])
        ([0, 0, 1, 1, 1, 0, 0], [2, 3, 2]),  # both runs of 0 tie for its longest: both stay (ours was [2, 5])
        ([0], [1]),
        ([0, 1], [2]),  # two single-frame runs: everything dropped, label 0, one segment
        ([0, 1, 0, 1], [4]),
        ([0, 0, 1, 0, 0], [5]),  # the dropped frame joins the left run on a tie; all one label
        ([0, 0, 1, 1, 0, 0], [2, 2, 2]),
        ([0, 0, 0, 1, 2, 2], [4, 2]),  # the single frame joins the longer neighbour (left)
        ([1, 1, 0, 2, 2, 2], [2, 4]),  # ... (right)
        ([0, 0, 1, 2, 2], [3, 2]),  # tie: left
        ([3, 0, 0, 1, 1, 1, 2], [3, 4]),
        ([0, 0, 1, 1, 2, 2], [2, 2, 2]),
        ([5, 1, 1, 4, 2, 2, 2, 7], [4, 4]),  # the left run grew to 3 by the first stretch: a 3-3 tie, left (not [3, 5])
    ],
)
def test_contiguous_segments_rule(labels, lengths):
    assert contiguous_segments(labels) == lengths
    assert naive_refine(labels) == lengths


def test_contiguous_segments_match_naive_transcription():
    rng = random.Random(8)
    for _ in range(600):
        n = rng.randint(1, 40)
        labels = [rng.randint(0, rng.randint(0, 6)) for _ in range(n)]
        lengths = contiguous_segments(labels)
        assert lengths == naive_refine(labels), labels
        assert sum(lengths) == n
        assert all(length >= (2 if n >= 2 else 1) for length in lengths)


def test_segment_frames_recovers_planted_blocks():
    gen = torch.Generator().manual_seed(9)
    scenes = torch.randn(3, 32, generator=gen)
    blocks = [4, 5, 3]
    frames = torch.cat([scenes[i].expand(b, 32) for i, b in enumerate(blocks)])
    frames = frames + 0.05 * torch.randn(frames.shape, generator=gen)
    assert segment_frames(frames, 0.25) == blocks  # int(12 * 0.25) = 3 clusters


def test_segment_frames_properties_and_no_nan():
    gen = torch.Generator().manual_seed(10)
    for trial in range(40):
        n_frames = 1 + trial % 13
        ratio = [0.1, 0.25, 0.5, 1.0][trial % 4]
        frames = torch.randn(n_frames, 6, generator=gen)
        lengths = segment_frames(frames, ratio)
        assert sum(lengths) == n_frames and min(lengths) >= (2 if n_frames >= 2 else 1)
        tokens = torch.randn(n_frames, 20, 6, generator=gen)
        result = merge_video_tokens(tokens, tau=0.5, cluster_ratio=0.5,
                                    temporal_segment_ratio=ratio, min_cluster_tokens=3)
        assert not result.merged.isnan().any()
        assert int(result.cluster_size.sum()) == n_frames * 20


# --- static slots and merging --------------------------------------------------------------------


def planted_video(n_frames=4, n_slots=16, dim=32, static=range(6), seed=11):
    """Slots in `static` repeat the same token (up to scale) in every frame; the rest are random."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n_frames, n_slots, dim, generator=gen)
    still = torch.randn(len(static), dim, generator=gen)
    scale = torch.linspace(0.5, 2.0, n_frames).view(-1, 1, 1)  # cosine ignores brightness
    tokens[:, list(static)] = still * scale
    return tokens


def test_static_slots_finds_planted_static_slots():
    tokens = planted_video()
    assert static_slots(tokens, 0.8).nonzero().flatten().tolist() == list(range(6))
    assert not static_slots(tokens, 1.0).any()  # identical directions still fail tau == 1
    assert not static_slots(tokens[:1], 0.1).any()  # one frame: no pair, nothing static
    same = torch.full((3, 4, 7), 0.1).float()  # rounding-prone identical tokens
    assert not static_slots(same, 1.0).any() and static_slots(same, 0.999).all()


def check_membership(result, tokens):
    """Every merged row is the mean of the tokens mapped to it and owns its representative."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    n_slots = tokens.shape[1]
    assert torch.equal(result.representative.sort().values, result.representative)
    assert len(set(result.representative.tolist())) == result.n_merged
    for row in range(result.n_merged):
        members = (result.token_to_merged == row).nonzero().flatten()
        assert members.numel() == int(result.cluster_size[row])
        torch.testing.assert_close(result.merged[row].float(), flat[members].mean(0),
                                   rtol=1e-4, atol=1e-5)
        rep = int(result.representative[row])
        group = int(result.group[row])
        assert rep in members.tolist()
        assert rep // n_slots == result.group_frame[group]
        if result.group_kind[group] == "dynamic":  # a dynamic cluster stays in its frame
            assert (members // n_slots == rep // n_slots).all()
    assert int(result.cluster_size.sum()) == tokens.shape[0] * n_slots


def test_merge_exact_counts_one_segment():
    tokens = planted_video()  # T=4, N=16, slots 0..5 static
    result = merge_video_tokens(tokens, **DEFAULTS, min_cluster_tokens=4)
    assert result.segment_lengths == [4]  # int(4 * 0.25) = 1 cluster
    # static set: 6 slots > 4 -> int(6 * 0.5) = 3; dynamic: 10 per frame > 4 -> 5 per frame.
    assert (result.n_static_tokens, result.n_dynamic_tokens, result.n_merged) == (3, 20, 23)
    assert result.group_kind == ["static"] + ["dynamic"] * 4
    assert result.group_frame == [0, 0, 1, 2, 3] and result.group_segment == [0] * 5
    assert result.group.bincount().tolist() == [3, 5, 5, 5, 5]
    static_rows = result.group == 0
    assert int(result.cluster_size[static_rows].sum()) == 6 * 4
    assert (result.representative[static_rows] < 6).all()  # first frame, static slots
    check_membership(result, tokens)

    # With min_cluster_tokens = 6 the static set (6 slots) is left unclustered.
    result = merge_video_tokens(tokens, **DEFAULTS, min_cluster_tokens=6)
    assert (result.n_static_tokens, result.n_dynamic_tokens) == (6, 20)
    assert result.representative[result.group == 0].tolist() == list(range(6))
    torch.testing.assert_close(result.merged[result.group == 0], tokens[:, :6].mean(0))
    check_membership(result, tokens)


def test_merge_static_collapse_and_dynamic_motion_across_segments():
    # Three scenes of 4 frames with their own offset (so the segments are the scenes); in the
    # first two some slots hold still, every other slot moves every frame.
    gen = torch.Generator().manual_seed(13)
    tokens = 2.0 * torch.randn(12, 20, 16, generator=gen)
    for scene, still in enumerate([range(8), range(4, 12), range(0)]):
        frames = slice(4 * scene, 4 * scene + 4)
        tokens[frames, list(still)] = 2.0 * torch.randn(len(still), 16, generator=gen)
        tokens[frames] += torch.randn(16, generator=gen)
    result = merge_video_tokens(tokens, tau=0.9, cluster_ratio=0.5, temporal_segment_ratio=0.25,
                                min_cluster_tokens=2)
    assert result.segment_lengths == [4, 4, 4]
    # scene 0: 8 static -> 4, 12 dynamic -> 6 x 4 frames; scene 1 the same; scene 2: 20 -> 10 x 4.
    assert result.n_static_tokens == 4 + 4
    assert result.n_dynamic_tokens == 24 + 24 + 40
    assert result.group_kind == (["static"] + ["dynamic"] * 4) * 2 + ["dynamic"] * 4
    assert result.group_segment == [0] * 5 + [1] * 5 + [2] * 4
    check_membership(result, tokens)


def test_identity_configuration_is_exact():
    gen = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16):
        tokens = torch.randn(6, 18, 8, generator=gen).to(dtype)
        tokens[:, :5] = tokens[:1, :5]  # identical tokens still are not static at tau == 1
        result = merge_video_tokens(tokens, tau=1.0, cluster_ratio=1.0, temporal_segment_ratio=0.5)
        assert result.merged.dtype == dtype
        assert torch.equal(result.merged, tokens.reshape(-1, 8))
        assert torch.equal(result.representative, torch.arange(6 * 18))
        assert torch.equal(result.token_to_merged, torch.arange(6 * 18))
        assert (result.cluster_size == 1).all() and result.n_static_tokens == 0


def test_merge_keeps_dtype_and_runs_in_half_precision():
    tokens = planted_video().to(torch.bfloat16)
    result = merge_video_tokens(tokens, **DEFAULTS, min_cluster_tokens=4)
    assert result.merged.dtype == torch.bfloat16
    assert (result.n_static_tokens, result.n_dynamic_tokens) == (3, 20)


def test_cluster_mean_paths_agree():
    # The CUDA path (one-hot matmul) and the CPU path (index_add_) give the same means.
    gen = torch.Generator().manual_seed(14)
    features = torch.randn(3, 30, 8, generator=gen)
    labels = torch.randint(0, 5, (3, 30), generator=gen)
    labels[:, :5] = torch.arange(5)  # no empty cluster
    by_add, sizes = _cluster_means(features, labels, 5, one_hot_matmul=False)
    by_matmul, sizes_mm = _cluster_means(features, labels, 5, one_hot_matmul=True)
    expected = torch.stack([torch.stack([features[b][labels[b] == r].mean(0) for r in range(5)])
                            for b in range(3)])
    torch.testing.assert_close(by_add, expected)
    torch.testing.assert_close(by_matmul, expected)
    assert torch.equal(sizes, sizes_mm) and sizes.sum() == 90


@pytest.mark.parametrize(
    "overrides,key",
    [({"tau": 1.5}, "stage1.tau must be in (0, 1], got 1.5"), ({"tau": 0.0}, "stage1.tau"),
     ({"cluster_ratio": 0}, "stage1.cluster_ratio"),
     ({"cluster_ratio": float("nan")}, "stage1.cluster_ratio"),
     ({"temporal_segment_ratio": 2.0}, "stage1.temporal_segment_ratio"),
     ({"k": 0}, "stage1.k"), ({"min_cluster_tokens": -1}, "stage1.min_cluster_tokens")],
)
def test_merge_validation_names_the_key(overrides, key):
    with pytest.raises(PruneVidError) as info:
        merge_video_tokens(torch.randn(2, 4, 3), **{**DEFAULTS, **overrides})
    assert key in str(info.value)


def test_merge_rejects_wrong_shape():
    with pytest.raises(PruneVidError, match=r"\[T, N, C\]"):
        merge_video_tokens(torch.randn(4, 3), **DEFAULTS)
