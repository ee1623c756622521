"""FlashVID: the vision side against a naive transcription of the official code (segments, ADTS,
temporal trees, DPC-kNN over the roots, written with loops and dicts) on random and planted
videos, the tree sums (the original's quirk) and their correction, the one-frame segment's
duplicate rows; on the tiny model of each family, nothing to reduce == the baseline, counts, the
LLM input rebuilt by hand and the cache-free reference, and its LLM-side pruning on the FastV
machinery against a naive transcription of its rule."""

from __future__ import annotations

import math

import pytest
import torch

from prunevid_bench.stages import flashvid
from tests.reduced_video import N, T, case, check_identity, check_run, eager_vision_scores, grid_tokens, run  # noqa: F401
from tests.test_fastvid import naive_cos, static_scenes


# ----------------------------------------------------------------------------- the naive transcription
def naive_segments(x, threshold, min_segments):
    means = [x[t].mean(0) for t in range(x.shape[0])]
    sims = [naive_cos(means[i], means[i + 1]) for i in range(len(means) - 1)]
    cuts = [i for i, s in enumerate(sims) if s < threshold]
    if len(cuts) + 1 < min_segments:
        filled = [1.0 if s < threshold else s for s in sims]
        cuts = sorted(cuts + sorted(range(len(sims)), key=lambda i: (filled[i], i))[: min(min_segments - len(cuts) - 1, len(sims))])
    edges = [-1, *cuts, x.shape[0] - 1]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def naive_adts(frame, attn, k):
    n = frame.shape[0]
    d = [[(1 - naive_cos(frame[i], frame[j])) * float(attn[j]) * 1e6 for j in range(n)] for i in range(n)]
    second = [sorted(d[i][j] for i in range(n))[1] for j in range(n)]
    picks = [max(range(n), key=lambda j: (second[j], -j))]
    while len(picks) < min(k, n):
        score = [-1.0 if j in picks else min(d[s][j] for s in picks) for j in range(n)]
        picks.append(max(range(n), key=lambda j: (score[j], -j)))
    return sorted(picks)


def naive_dpc(feats, clusters):
    """(centres in score order, label of each token), FlashVID's k = min(clusters, 7)."""
    m, dim = feats.shape
    k = min(clusters, 7)
    d = [[float((feats[i] - feats[j]).norm()) / math.sqrt(dim) for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:k]) / k) for i in range(m)]
    top = max(max(r) for r in d)
    delta = [min([d[i][j] for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)] or [top]) for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-rho[i] * delta[i], i))[:clusters]
    labels = [centres.index(i) if i in centres else min(range(clusters), key=lambda c: (d[i][centres[c]], c)) for i in range(m)]
    return centres, labels


def naive_flashvid(x, attn, r=0.25, expansion=1.25, alpha=0.7, temporal=0.8, seg_threshold=0.9, min_segments=4,
                   tree="original", single="original"):
    """The original's rows as (flat index, row, is ADTS) in ascending index order."""
    n_frames, n, _ = x.shape
    budget = math.ceil(n * r * expansion)
    n_adts = math.ceil(budget * alpha)
    n_tstm = budget - n_adts
    out, start = [], 0
    for length in naive_segments(x, seg_threshold, min_segments):
        if length == 0:
            continue
        frames = range(start, start + length)
        picked = {t: naive_adts(x[t], attn[t], n_adts) for t in frames}
        out += [(t * n + i, x[t, i], True) for t in frames for i in picked[t]]
        if length > 1:
            best = {}
            for t in frames:
                for i in range(n):
                    if t == start or i in picked[t]:
                        best[(t, i)] = (-1.0, None)
                        continue
                    cands = [(naive_cos(x[t, i], x[t - 1, j]), -j) for j in range(n) if j not in picked[t - 1]]
                    value, j = max(cands) if cands else (-1.0, 0)
                    best[(t, i)] = (value, (t - 1, -j))
            threshold = temporal
            stay = sum(1 for v, _ in best.values() if not v > threshold)
            if stay < budget * length:
                threshold = max(sorted((v for v, _ in best.values()), reverse=True)[length * n - budget * length - 1], -1 + 1e-6)
            parent = {key: p for key, (v, p) in best.items() if v > threshold}
            children = {key: [c for c, p in parent.items() if p == key] for key in best}

            def subtree(key):
                return x[key] + sum((subtree(c) for c in children[key]), torch.zeros_like(x[key]))

            def size(key):
                return 1 + sum(size(c) for c in children[key])

            roots = {t: [i for i in range(n) if (t, i) not in parent and i not in picked[t]] for t in frames}
            value = {(t, i): subtree((t, i)) / (1 + len(children[(t, i)]) if tree == "original" else size((t, i)))
                     for t in frames for i in roots[t]}
        else:
            t = start
            roots = {t: list(range(n)) if single == "original" else [i for i in range(n) if i not in picked[t]]}
            value = {(t, i): x[t, i] for i in roots[t]}
        ratio = n_tstm * length / sum(len(v) for v in roots.values())
        for t in frames:
            clusters = math.ceil(len(roots[t]) * ratio)
            if clusters > 0 and ratio < 1:
                centres, labels = naive_dpc(torch.stack([value[(t, i)] for i in roots[t]]), clusters)
                for c, centre in enumerate(centres):
                    part = [value[(t, roots[t][j])] for j in range(len(roots[t])) if labels[j] == c]
                    out.append((t * n + roots[t][centre], torch.stack(part).mean(0), False))
            else:
                out += [(t * n + i, value[(t, i)], False) for i in roots[t]]
        start += length
    return sorted(out, key=lambda row: row[0])


def matches(res, naive) -> None:
    """Our rows == the original's, except where the original has two rows at one index (a
    one-frame segment's cluster centred on an ADTS token): that row sits at another member's
    index, or is folded away when it has none."""
    ours = dict(zip(res.representative.tolist(), res.embeds))
    indices = [i for i, _, _ in naive]
    duplicated = {i for i in indices if indices.count(i) > 1}
    plain = [(i, row) for i, row, adts in naive if not (i in duplicated and not adts)]
    for i, row in plain:
        torch.testing.assert_close(ours[i], row, rtol=0, atol=1e-5)
    moved = [row for i, row, adts in naive if i in duplicated and not adts]
    extra = [row for i, row in ours.items() if i not in {j for j, _ in plain}]
    assert len(extra) <= len(moved) and res.stats["flashvid_duplicate_rows"] == len(moved)
    for row in extra:
        assert any(torch.allclose(row, m, rtol=0, atol=1e-5) for m in moved)


def random_video(seed=0, frames=6, n=12, dim=8):
    return torch.randn(frames, n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs", [
    {"seg_threshold": -1.0, "min_segments": 1},  # one segment of every frame: trees and DPC-kNN
    {"seg_threshold": -1.0, "min_segments": 3},  # complementary cuts
    {"seg_threshold": -1.0, "min_segments": 1, "temporal": 0.0, "tree": "mean"},
    {},  # random video, threshold 0.9: one-frame segments, the original's duplicate rows
    {"single": "exclude_adts"},
])
@pytest.mark.parametrize("video", ["random", "scenes"])
def test_equals_the_naive_transcription(kwargs, video):
    x = random_video() if video == "random" else static_scenes([2, 3, 1], n=12, dim=8, noise=0.3)
    attn = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(7))
    names = {"seg_threshold": "segment_threshold", "min_segments": "min_segments", "temporal": "temporal_threshold",
             "tree": "tree_merge", "single": "single_frame"}
    res = flashvid.flashvid(x, attn, **{names[k]: v for k, v in kwargs.items()})
    matches(res, naive_flashvid(x, attn, **kwargs))


def test_segments_with_a_zero_length_one():
    """T = 3 < min_segments: the threshold's cut and the complementary cut land on one place."""
    x = static_scenes([1, 2], n=6)
    segments = flashvid.flashvid_segments(x, 0.9, 4)
    assert segments == naive_segments(x, 0.9, 4) and 0 in segments and sum(segments) == 3


def test_a_chain_sums_over_two_and_the_correction_averages():
    """A token static over three frames, a <- b <- c: the original's root is (a + b + c) / 2."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    x = torch.stack([base, base * 1.01, base * 1.02])
    free = torch.ones(3, 4, dtype=torch.bool)
    root, feats, roots = flashvid.temporal_trees(x, free, 0, 0.5, "original")
    assert roots[0].all() and not roots[1:].any() and root.reshape(-1)[8:].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(feats[0], x.sum(0) / 2)
    _, mean, _ = flashvid.temporal_trees(x, free, 0, 0.5, "mean")
    torch.testing.assert_close(mean[0], x.mean(0))


def test_adts_picks_attended_and_diverse_tokens():
    """Two near-copies with the highest attention and one distinct token: ADTS takes one of the
    copies, then the distinct one, not the other copy."""
    frame = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.7, 0.7]])
    attn = torch.tensor([[0.4, 0.39, 0.2, 0.01]])
    assert flashvid.adts(frame[None], attn, 2)[0].tolist() == naive_adts(frame, attn[0], 2) == [0, 2]


# ----------------------------------------------------------------------------- on the tiny models
def test_nothing_to_reduce_equals_the_baseline(case):
    pipe, prepared, _ = case
    check_identity(case, run(pipe, prepared, **{"flashvid.enabled": True, "flashvid.budget": 1.0}))
    check_identity(case, run(pipe, prepared, **{"flashvid.enabled": True, "flashvid.retention_ratio": 1.0,
                                                "flashvid.alpha": 1.0}))


@pytest.mark.parametrize("overrides", [{}, {"flashvid.segment_threshold": 0.0, "flashvid.min_segments": 1},
                                       {"flashvid.single_frame": "exclude_adts", "flashvid.budget": 0.5},
                                       {"flashvid.segment_threshold": 0.0, "flashvid.min_segments": 2,
                                        "flashvid.tree_merge": "mean", "flashvid.temporal_threshold": 0.0}])
def test_llm_input_and_logits_equal_the_references(case, overrides):
    pipe, prepared, _ = case
    x, attn = grid_tokens(case), eager_vision_scores(pipe, prepared)["received"]
    keys = {"segment_threshold", "min_segments", "single_frame", "tree_merge", "temporal_threshold"}
    kwargs = {k.split(".")[1]: v for k, v in overrides.items() if k.split(".")[1] in keys}
    if "flashvid.budget" in overrides:
        kwargs["frame_tokens"] = max(1, round(overrides["flashvid.budget"] * N))
    res = flashvid.flashvid(x, attn, **kwargs)
    out = run(pipe, prepared, **{"flashvid.enabled": True, **overrides})
    red = out.result.reductions[0]
    assert (red.method, red.tokens_in, red.tokens_out) == ("flashvid", T * N, res.representative.numel())
    if not overrides:  # ceil(16 * 0.25 * 1.25) = 5 per frame, ceil(5 * 0.7) = 4 of them ADTS
        assert out.result.to_dict()["flashvid_adts_tokens"] == T * 4
    check_run(case, out, res.dest, res.representative, rows=res.embeds)


def test_llm_side_pruning_keeps_the_last_tokens_top_ceil_share(case):
    """flashvid_llm on FastV's machinery: the kept set is ceil(V * 0.3) of the visual tokens by
    layer K-1's last-row attention (recomputed here with eager weights), and the run equals the
    cache-free reference with layers 0..K-1 keeping their whole cache."""
    from prunevid_bench.verify.reference import reference_for

    pipe, prepared, _ = case
    out = run(pipe, prepared, **{"flashvid.enabled": True, "flashvid_llm.enabled": True, "flashvid_llm.pruning_layer": 2})
    st = out.state
    assert st.tokens_before == 20 and st.tokens_after == math.ceil(20 * 0.3) == st.kept_visual.numel()
    assert not st.compacted
    want = torch.sort(torch.sort(-st.scores.float(), stable=True).indices[:6]).values
    assert torch.equal(st.kept_visual.cpu(), want.cpu())
    if "qwen3" in pipe.model.config.model_type:  # the reference that adds DeepStack's levels by hand
        from tests.test_qwen3_vl import deepstack_rows, reference

        rows, levels = deepstack_rows(pipe, prepared, st)
        ref = reference(pipe.model, out, prepared, rows, levels, out.handle.score_layer, st.keep_index.cpu(),
                        decode_sees_dropped=True)
    else:
        ref = reference_for(pipe, prepared, out)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    plain = run(pipe, prepared, **{"flashvid.enabled": True})
    assert (out.logits - plain.logits).abs().max() > 1e-3  # the LLM-side pruning changed the computation


def test_presets_are_the_scripts_settings():
    from prunevid_bench.config import build_config

    q25, q3 = build_config("flashvid-25"), build_config("flashvid-25-qwen3")
    assert q25.enabled_methods == q3.enabled_methods == ["flashvid", "flashvid_llm"]
    assert (q25.flashvid.retention_ratio, q25.flashvid.min_segments, q25.flashvid_llm.pruning_layer,
            q25.flashvid_llm.llm_retention_ratio) == (0.25, 4, "20/28", 0.3)
    assert (q3.flashvid_llm.pruning_layer, q3.flashvid_llm.llm_retention_ratio) == ("28/36", 0.1)
    assert flashvid.flashvid_layer_average(0.25, 1.25, 20, 28, 0.3) == pytest.approx(0.25)
    assert flashvid.flashvid_layer_average(0.25, 1.25, 28, 36, 0.1) == pytest.approx(0.25)
