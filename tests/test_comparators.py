"""The comparator algorithms (ToMe, EVS, VidCom2, FastV) against dense, deliberately naive
transcriptions of their published rules, on planted inputs; keep-everything identities; exact
token counts for budgets. Pure tensors on the CPU, no model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages import evs, fastv, tome, vidcom2


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- ToMe
def naive_matching(x: torch.Tensor, r: int) -> list[int]:
    """ToMe's rule, one token at a time: A = even, B = odd; each A token's best B by cosine; the
    r best edges (ties: lower A first) merge into their B token."""
    n = x.shape[0]
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    cos = lambda i, j: float(x[i] @ x[j]) / (float(x[i].norm()) * float(x[j].norm()))  # noqa: E731
    edges = []
    for i in a:
        best_j = max(b, key=lambda j: (cos(i, j), -j))  # highest score, lowest B on ties
        edges.append((-cos(i, best_j), i, best_j))
    dst = list(range(n))
    for _, i, j in sorted(edges)[: min(r, len(b))]:
        dst[i] = j
    return dst


@pytest.mark.parametrize("n,r", [(9, 3), (10, 5), (7, 1), (12, 0)])
def test_matching_equals_naive_transcription(n, r):
    x = seeded(n, 5, seed=n + r)
    assert tome.bipartite_soft_matching(x, r).tolist() == naive_matching(x, r)


def test_hand_computed_merges_and_sizes():
    # A = 0, 2, 4; B = 1, 3, 5. Edges: 0->1 (cos 1), 2->3 (cos 0.8), 4->5 (cos 1).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [-2.0, 0.0]])
    dst = tome.bipartite_soft_matching(x, 2)
    assert dst.tolist() == [1, 1, 2, 3, 5, 5]
    merged, size, kept, inverse = tome.merge_by_destination(x, torch.ones(6), dst)
    assert kept.tolist() == [1, 2, 3, 5] and inverse.tolist() == [0, 0, 1, 2, 3, 3]
    assert size.tolist() == [2, 1, 1, 2]
    assert torch.allclose(merged, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.5, 0.0]]))
    # r = 1: the tie between 0->1 and 4->5 goes to the lower A token
    assert tome.bipartite_soft_matching(x, 1).tolist() == [1, 1, 2, 3, 4, 5]
    # sizes weight the average: a token of size 3 pulls the mean three times as hard
    m, s, _, _ = tome.merge_by_destination(x, torch.tensor([3.0, 1, 1, 1, 1, 1]), dst)
    assert s.tolist() == [4, 1, 1, 2] and torch.allclose(m[0], torch.tensor([1.0, 0.0]))
    m, s, _, _ = tome.merge_by_destination(x, torch.tensor([1.0, 1, 1, 1, 3, 1]), dst)
    assert torch.allclose(m[3], torch.tensor([(3 * -1.0 + -2.0) / 4, 0.0]))


def test_multi_round_removes_exactly_r_and_tracks_sizes():
    x = seeded(16, 4, seed=3)
    out, size, rep, to_out = tome.tome_merge(x, 11)  # more than half: needs several rounds
    assert out.shape[0] == 5 and size.sum() == 16
    assert rep.tolist() == sorted(rep.tolist())
    for j in range(5):  # each output is the plain mean of the inputs mapped to it (sizes start at 1)
        members = (to_out == j).nonzero().flatten()
        assert size[j] == members.numel() and to_out[rep[j]] == j
        assert torch.allclose(out[j], x[members].mean(0), atol=1e-6)
    with pytest.raises(PruneVidError):
        tome.tome_merge(x, 16)


def test_inter_frame_merges_twins_into_the_earlier_frame():
    # N = 3 is odd, so a token's twin one step later lands in the other set of the alternate split
    frame = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    video = torch.stack([frame, frame])  # [T=2, N=3, C=3]
    result = tome.tome_video(video, [0, 0], [3], clip_frames=2)
    assert result.representative.tolist() == [1, 3, 5]
    assert result.size.tolist() == [2, 2, 2]
    assert result.token_to_merged.tolist() == [1, 0, 2, 1, 0, 2]
    assert torch.equal(result.merged, frame[[1, 0, 2]])
    # intra-frame only: nothing crosses frames
    only_intra = tome.tome_video(video, [1, 1], [0], clip_frames=2)
    assert (only_intra.token_to_merged[:3] < 2).all() and (only_intra.token_to_merged[3:] >= 2).all()


def test_tome_zero_removals_is_the_identity():
    video = seeded(5, 6, 8, seed=1)
    result = tome.tome_video(video, [0] * 5, [0] * 3, clip_frames=2)
    assert torch.equal(result.merged, video.reshape(30, 8))
    assert result.representative.tolist() == list(range(30)) and result.size.tolist() == [1.0] * 30
    intra, inter, achieved = tome.tome_budget(5, 6, 1.0)
    assert achieved == 30 and sum(intra) == sum(inter) == 0


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("inter_share", [0.0, 0.5, 1.0])
def test_tome_budget_keeps_exactly_round_b_n(budget, inter_share):
    T, N = 6, 10
    video = seeded(T, N, 12, seed=7)
    intra, inter, achieved = tome.tome_budget(T, N, budget, inter_share=inter_share, clip_frames=2)
    result = tome.tome_video(video, intra, inter, clip_frames=2)
    assert achieved == round(budget * T * N) == result.merged.shape[0]
    assert result.size.sum() == T * N
    flat = video.reshape(T * N, -1)
    for j in range(result.merged.shape[0]):
        members = (result.token_to_merged == j).nonzero().flatten()
        assert torch.allclose(result.merged[j], flat[members].mean(0), atol=1e-5)
        assert result.representative[j] in members


def test_tome_budget_below_one_per_clip_is_one_per_clip():
    assert tome.tome_budget(6, 10, 0.01, clip_frames=2)[2] == 3


def test_tempme_removal_counts():
    # TempMe: int(patch_num * proportion) per frame, int(left * frames * proportion) per clip
    intra, inter = tome.tome_video_removals(5, 49, 0.1, 0.3, clip_frames=2)
    assert intra == [4] * 5 and inter == [int(45 * 2 * 0.3), int(45 * 2 * 0.3), int(45 * 0.3)]
    with pytest.raises(PruneVidError):
        tome.tome_video_removals(5, 49, 1.0, 0.3)


def test_proportional_attention_is_duplicated_keys_under_sdpa():
    torch.manual_seed(0)
    L, d, Q = 6, 8, 3
    q, k, v = torch.randn(1, 2, Q, d), torch.randn(1, 2, L, d), torch.randn(1, 2, L, d)
    size = torch.tensor([1.0, 3, 1, 2, 1, 4])
    positions = torch.tensor([3, 4, 5])
    mask = tome.proportional_attention_mask(size, positions)
    assert mask.shape == (1, 1, Q, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # naive: softmax(q k^T / sqrt(d) + log size) over the visible keys
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) + size.log()
    logits = logits.masked_fill(torch.arange(L)[None, :] > positions[:, None], float("-inf"))
    assert torch.allclose(out, torch.softmax(logits, -1) @ v, atol=1e-6)
    # the motivation: a key of size s weighs as s copies of itself (last query sees all keys)
    reps = size.long()
    dup = F.scaled_dot_product_attention(q[..., -1:, :], k.repeat_interleave(reps, 2), v.repeat_interleave(reps, 2))
    assert torch.allclose(out[..., -1:, :], dup, atol=1e-6)
    # all sizes 1: the plain causal mask
    plain = tome.proportional_attention_mask(torch.ones(L), positions)
    visible = torch.arange(L)[None, :] <= positions[:, None]
    assert torch.allclose(
        F.scaled_dot_product_attention(q, k, v, attn_mask=plain),
        F.scaled_dot_product_attention(q, k, v, attn_mask=visible),
        atol=1e-6,
    )


# ------------------------------------------------------------------------------------------ EVS
def naive_evs(tokens: torch.Tensor, q: float) -> list[bool]:
    T, N, _ = tokens.shape
    score = []
    for t in range(T):
        for n in range(N):
            if t == 0:
                score.append(255.0)
            else:
                a, b = tokens[t, n].double(), tokens[t - 1, n].double()
                score.append(1 - float(a @ b) / (float(a.norm()) * float(b.norm())))
    k = max(N, int(T * N * (1 - q)))
    keep = sorted(range(T * N), key=lambda i: (-score[i], i))[:k]
    return [i in keep for i in range(T * N)]


@pytest.mark.parametrize("q", [0.0, 0.3, 0.75, 0.99])
def test_evs_mask_equals_naive_transcription(q):
    tokens = seeded(5, 6, 16, seed=11)
    assert evs.evs_retention_mask(tokens, q).tolist() == naive_evs(tokens, q)


def test_evs_drops_the_static_positions():
    T, N = 4, 6
    tokens = seeded(T, N, 16, seed=2)
    static = [0, 2, 5]
    tokens[:, static] = tokens[0, static]  # these spatial positions never change
    k = T * N - len(static) * (T - 1)  # first step plus every moving token
    mask = evs.evs_retention_mask(tokens, 1 - k / (T * N)).reshape(T, N)
    assert mask[0].all()
    assert not mask[1:, static].any() and mask[1:, [1, 3, 4]].all()


def test_evs_a_clip_whose_second_half_repeats_drops_the_repeats():
    first = seeded(2, 6, 16, seed=4)
    clip = torch.cat([first, first[-1:].expand(2, -1, -1)])  # steps 2 and 3 repeat step 1
    mask = evs.evs_retention_mask(clip, 0.5).reshape(4, 6)
    assert mask[:2].all() and not mask[2:].any()


def test_evs_counts_and_budget():
    assert evs.evs_retained_count(6, 4, 0.0) == 24
    assert evs.evs_retained_count(6, 4, 0.99) == 6  # never below one step
    for T, N in ((4, 6), (8, 49), (16, 252)):
        for budget in (0.1, 0.25, 0.5, 0.8, 1.0):
            q, achieved = evs.evs_budget(N, T, budget)
            target = round(budget * T * N)
            assert achieved == evs.evs_retained_count(N, T, q) == max(N, target)
            tokens = seeded(T, N, 4, seed=T)
            assert int(evs.evs_retention_mask(tokens, q).sum()) == achieved
    assert evs.evs_budget(6, 4, 1.0)[0] == 0.0
    with pytest.raises(PruneVidError):
        evs.evs_retention_mask(seeded(2, 3, 4), 1.0)


def test_evs_rate_zero_keeps_every_token_in_order():
    tokens = seeded(3, 5, 8, seed=9)
    assert evs.evs_retention_mask(tokens, 0.0).all()


def test_evs_position_modes():
    # text 0..2 (index 2 is vision start), video T=3, H'=3, W'=2 with t ids scaled by 2, text after
    T, H, W = 3, 3, 2
    t_ids = torch.arange(T).repeat_interleave(H * W) * 2
    h_ids = torch.arange(H).repeat_interleave(W).repeat(T)
    w_ids = torch.arange(W).repeat(T * H)
    base = 3
    video = torch.stack([t_ids, h_ids, w_ids]) + base
    after_start = base + int(video.max()) - base + 1  # max id of the video + 1 (transformers < 5.24, vLLM without EVS)
    text_after = torch.arange(4) + after_start
    ids = torch.cat([torch.arange(3).expand(3, -1), video, text_after.expand(3, -1)], dim=1)
    video_index = torch.arange(3, 3 + T * H * W)
    keep = torch.zeros(T * H * W, dtype=torch.bool)
    keep[:6] = True
    keep[[7, 15]] = True
    orig = evs.evs_position_ids(ids, video_index, keep, W, mode="original")
    assert torch.equal(orig, torch.cat([ids[:, :3], video[:, keep], text_after.expand(3, -1)], dim=1))
    vllm = evs.evs_position_ids(ids, video_index, keep, W, mode="vllm")
    assert torch.equal(vllm[:, : 3 + 8], orig[:, : 3 + 8])  # the kept video ids are the same
    assert vllm[:, 3 + 8 :].tolist() == [[5, 6, 7, 8]] * 3  # base + W' onwards, not 8 onwards
    assert orig[:, 3 + 8 :].tolist() == [[8, 9, 10, 11]] * 3


# -------------------------------------------------------------------------------------- VidCom2
def naive_vidcom2(tokens: torch.Tensor, r: float) -> list[int]:
    """The official rule written out token by token, in float64."""
    T, N, C = tokens.shape
    flat = tokens.reshape(T * N, C).double()
    var = [float(((flat[:, c] - flat[:, c].mean()) ** 2).mean()) for c in range(C)]
    channels = sorted(range(C), key=lambda c: (var[c], c))[: int(C * 0.5)]
    unit = [[tokens[t, n, channels].double() / tokens[t, n, channels].double().norm() for n in range(N)] for t in range(T)]
    video_centre = sum(u for row in unit for u in row) / (T * N)
    alphas = [2.0**k for k in range(-3, 2)]

    def gauss(x, c):
        d2 = float(((x - c) ** 2).sum())
        return sum(math.exp(-d2 / (2 * a)) for a in alphas)

    kept = []
    v_mean, sims = [], []
    for t in range(T):
        frame_centre = sum(unit[t]) / N
        v = [gauss(u, video_centre) for u in unit[t]]
        f = [gauss(u, frame_centre) for u in unit[t]]
        v_mean.append(sum(v) / N)
        sims.append([a + b for a, b in zip(v, f)])
    scores = [-m for m in v_mean]
    top = max(scores)
    e = [math.exp((s - top) / 0.01) for s in scores]
    p = [x / sum(e) for x in e]
    p_mean = sum(p) / T
    for t in range(T):
        scale = min(1.0, r * (1 + p[t] - p_mean))
        k = max(1, round(scale * N))
        order = sorted(range(N), key=lambda n: (sims[t][n], n))[:k]
        kept += sorted(t * N + n for n in order)
    return kept


@pytest.mark.parametrize("r", [0.1, 0.25, 0.5])
def test_vidcom2_equals_naive_transcription(r):
    tokens = seeded(4, 9, 10, seed=5)
    tokens[2] += 1.5  # one frame stands out, so the budgets differ
    assert vidcom2.vidcom2_keep(tokens, r).tolist() == naive_vidcom2(tokens, r)


@pytest.mark.parametrize("r", [0.1, 0.25, 0.33, 0.5])
def test_vidcom2_exact_count_is_vllms_reconcile(r):
    tokens = seeded(4, 9, 10, seed=5)
    tokens[2] += 1.5
    official = naive_vidcom2(tokens, r)
    sims = naive_similarity(tokens)
    target = max(4, int(36 * r))
    kept = set(official)
    while len(kept) > target:  # drop the kept token with the highest similarity
        kept.remove(max(kept, key=lambda i: (sims[i], -i)))
    while len(kept) < target:  # add the dropped token with the lowest similarity
        kept.add(min(set(range(36)) - kept, key=lambda i: (sims[i], i)))
    got = vidcom2.vidcom2_keep(tokens, r, exact_count=True)
    assert got.numel() == target and got.tolist() == sorted(kept)


def naive_similarity(tokens: torch.Tensor) -> list[float]:
    """The token scores (themselves checked against ``naive_vidcom2`` above); this test is about
    the reconcile step."""
    similarity, _ = vidcom2.vidcom2_scores(tokens)
    return similarity.reshape(-1).tolist()


def test_vidcom2_a_unique_frame_gets_more_budget():
    scene, other_scene = seeded(12, seed=6), seeded(12, seed=8)
    tokens = scene + 0.3 * seeded(5, 16, 12, seed=7)  # five views of one scene ...
    tokens[3] = other_scene + 0.3 * seeded(16, 12, seed=9)  # ... but frame 3 shows another
    _, uniqueness = vidcom2.vidcom2_scores(tokens)
    counts = vidcom2.frame_keep_counts(uniqueness, 0.25, 16)
    assert int(uniqueness.argmax()) == 3
    assert counts[3] > counts[[0, 1, 2, 4]].max()
    kept = vidcom2.vidcom2_keep(tokens, 0.25)
    assert int(((kept // 16) == 3).sum()) == counts[3]


def test_vidcom2_budget_one_keeps_everything_in_order():
    tokens = seeded(4, 9, 10, seed=5)
    tokens[1] *= 4
    _, uniqueness = vidcom2.vidcom2_scores(tokens)
    assert vidcom2.frame_keep_counts(uniqueness, 1.0, 9).sum() < 36  # the official r = 1 does not
    ratio, achieved = vidcom2.vidcom2_budget(uniqueness, 9, 1.0)
    assert achieved == 36
    assert vidcom2.vidcom2_keep(tokens, ratio).tolist() == list(range(36))


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_vidcom2_budget_counts(budget):
    tokens = seeded(6, 20, 10, seed=12)
    tokens[4] += 2.0
    _, uniqueness = vidcom2.vidcom2_scores(tokens)
    ratio, achieved = vidcom2.vidcom2_budget(uniqueness, 20, budget)
    assert vidcom2.vidcom2_keep(tokens, ratio).numel() == achieved
    target = round(budget * 120)
    # nothing closer is reachable: scan the knob finely
    reachable = {int(vidcom2.frame_keep_counts(uniqueness, x / 2000, 20).sum()) for x in range(1, 2600)}
    assert abs(achieved - target) == min(abs(c - target) for c in reachable)


def test_vidcom2_identical_frames_reach_multiples_of_t_exactly():
    tokens = seeded(1, 10, 6, seed=13).expand(4, -1, -1).contiguous()
    _, uniqueness = vidcom2.vidcom2_scores(tokens)
    assert vidcom2.vidcom2_budget(uniqueness, 10, 0.3)[1] == 12  # 3 per frame
    assert vidcom2.vidcom2_budget(uniqueness, 10, 0.32)[1] == 12  # 13 is unreachable; 12 is closest


# ---------------------------------------------------------------------------------------- FastV
def test_fastv_selection_equals_naive_transcription():
    H, H_kv, L, d = 4, 2, 20, 8
    visual = torch.arange(3, 15)
    q, k = seeded(H, 1, d, seed=20), seeded(H_kv, L, d, seed=21)
    scores = fastv.last_token_scores(q, k, visual, 1 / math.sqrt(d), position=L - 1)
    kept = fastv.fastv_keep(scores, fastv.fastv_keep_count(12, fastv.DEFAULT_RATIO))
    # naive: per head softmax of the last query over all keys, mean over heads, top int(V * (1 - R))
    avg = [0.0] * L
    for h in range(H):
        logits = [float(q[h, 0] @ k[h // 2, j]) / math.sqrt(d) for j in range(L)]
        z = sum(math.exp(x) for x in logits)
        for j in range(L):
            avg[j] += math.exp(logits[j]) / z / H
    vis = [avg[int(i)] for i in visual]
    expected = sorted(sorted(range(12), key=lambda i: (-vis[i], i))[: int(12 * 0.5)])
    assert kept.tolist() == expected


def test_fastv_top_k_is_global_not_stratified():
    scores = torch.tensor([0.1, 0.2, 0.1, 0.9, 0.8, 0.7, 0.0, 0.1, 0.05])  # frame 1 holds the top 3
    assert fastv.fastv_keep(scores, 3).tolist() == [3, 4, 5]


def test_fastv_budget_counts_and_identity():
    for V in (12, 49, 1000):
        for budget in (0.1, 0.25, 0.5, 1.0):
            n_keep, achieved = fastv.fastv_budget(V, budget)
            assert n_keep == achieved == round(budget * V)
    scores = seeded(12, seed=3)
    assert fastv.fastv_keep(scores, fastv.fastv_budget(12, 1.0)[0]).tolist() == list(range(12))
    assert fastv.fastv_keep_count(12, 0.0) == 12
    with pytest.raises(PruneVidError):
        fastv.fastv_keep(scores, 13)
