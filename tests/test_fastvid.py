"""FastVID: the pure rule against a naive transcription of the official Qwen2.5-VL code (loops,
a hand-written DPC-kNN) on random and planted videos, DySeg, the budget clamps and DTM's
weights; on the tiny model of each family, nothing to reduce == the baseline, counts, the LLM
input rebuilt by hand and the cache-free reference, with the tower's ``pseudo_cls`` attention
recomputed by transformers' eager path."""

from __future__ import annotations

import math

import pytest
import torch

from prunevid_bench.stages import fastvid
from tests.reduced_video import N, T, case, check_identity, check_run, eager_vision_scores, grid_tokens, run  # noqa: F401


# ----------------------------------------------------------------------------- the naive transcription
def naive_cos(a, b) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def naive_cuts(frames: list, threshold: float) -> list[int]:
    means = [f.mean(0) for f in frames]
    return [i for i in range(len(frames) - 1) if naive_cos(means[i], means[i + 1]) < threshold]


def naive_sizes(cuts, length):
    out, last = [], -1
    for c in sorted(set(cuts)):
        out.append(c - last)
        last = c
    return out + [length - 1 - last]


def naive_dpc(x: torch.Tensor, n_centres: int, k: int = 4) -> list[int]:
    m, dim = x.shape
    d = [[float((x[i] - x[j]).norm()) / math.sqrt(dim) for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[: min(k, m)]) / min(k, m)) for i in range(m)]
    top = max(max(row) for row in d)
    delta = []
    for i in range(m):
        denser = [d[i][j] for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(denser) if denser else top)
    order = sorted(range(m), key=lambda i: (-rho[i] * delta[i], i))
    return sorted(order[:n_centres])


def naive_fastvid(x, attn, r=0.27, c=8, tau=0.84, ignore=0.95, d=0.4, p=4, beta=0.6) -> dict:
    """The official prefill branch written out with lists: {flat index: row}."""
    n_frames, n, _ = x.shape
    frames = [x[t] for t in range(n_frames)]
    means = [f.mean(0) for f in frames]
    sims = [naive_cos(means[i], means[i + 1]) for i in range(n_frames - 1)]
    lowest = sorted(range(len(sims)), key=lambda i: (sims[i], i))[: min(c - 1, len(sims))]
    segments = naive_sizes(lowest + naive_cuts(frames, tau), n_frames)
    retain = int(n * r)
    out, start = {}, 0
    for length in segments:
        seg_retain = retain * length
        ctx_total = max(int(seg_retain * d), 1)
        sal_total = seg_retain - ctx_total
        if length == 1:
            sal, ctx = [sal_total], [ctx_total]
        else:
            subs = naive_sizes(naive_cuts(frames[start : start + length], ignore), length)
            v = len(subs)
            sub_sal = [sal_total // v + (1 if i < sal_total % v else 0) for i in range(v)]
            groups = (v + p - 1) // p
            group_ctx = [ctx_total // groups + (1 if i < ctx_total % groups else 0) for i in range(groups)]
            sub_ctx, g = [], 0
            for i in range(v):
                if i % p == 0:
                    sub_ctx.append(min(group_ctx[g], n // 2))
                    g += 1
                else:
                    sub_ctx.append(0)
            sub_ctx.reverse()
            sal, ctx = [], []
            for size, s, cc in zip(subs, sub_sal, sub_ctx):
                sal += [0] * (size - 1) + [min(s, n) if cc == 0 else min(s, n - min(cc, n // 2))]
                ctx += [0] * (size - 1) + [min(cc, n // 2)]
        salient, contexts = [], []
        for f in range(length):
            t = start + f
            top = sorted(range(n), key=lambda i: (-float(attn[t, i]), i))[: sal[f]]
            salient += [t * n + i for i in top]
            if ctx[f]:
                rest = [i for i in range(n) if i not in top]
                contexts.append([t * n + rest[j] for j in naive_dpc(x[t, rest], min(ctx[f], len(rest)))])
        flat = x.reshape(n_frames * n, -1)
        for i in salient:
            out[i] = flat[i]
        segment = range(start * n, (start + length) * n)
        for targets in contexts:
            merge = [i for i in segment if i not in salient and i not in targets]
            members = {tg: [] for tg in targets}
            for i in merge:
                members[max(targets, key=lambda tg: (naive_cos(flat[i], flat[tg]), -tg))].append(i)
            for tg in targets:
                w = max(1 / (len(members[tg]) + 1), beta)
                mean = torch.stack([flat[i] for i in members[tg]]).mean(0) if members[tg] else torch.zeros_like(flat[tg])
                out[tg] = w * flat[tg] + (1 - w) * mean
        start += length
    return dict(sorted(out.items()))


def rows_of(res) -> dict:
    return dict(zip(res.representative.tolist(), res.embeds))


def static_scenes(lengths, n=12, dim=10, seed=0, noise=0.02) -> torch.Tensor:
    """Scenes of near-identical frames, each scene its own random content."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        scene = torch.randn(n, dim, generator=g)
        out += [scene + noise * torch.randn(n, dim, generator=g) for _ in range(length)]
    return torch.stack(out)


@pytest.mark.parametrize("kwargs", [{}, {"c": 2}, {"c": 3, "r": 0.5, "p": 1}, {"c": 1, "tau": -1.0, "ignore": 0.99}])
@pytest.mark.parametrize("video", ["random", "scenes"])
def test_equals_the_naive_transcription(kwargs, video):
    x = (torch.randn(6, 12, 10, generator=torch.Generator().manual_seed(3)) if video == "random"
         else static_scenes([1, 3, 2]))
    attn = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(4))
    names = {"r": "retention_ratio", "c": "c", "tau": "tau", "ignore": "ignore", "p": "p"}
    res = fastvid.fastvid(x, attn, **{names[k]: v for k, v in kwargs.items()})
    got, want = rows_of(res), naive_fastvid(x, attn, **kwargs)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


def test_dyseg_cuts_at_scene_changes():
    x = static_scenes([3, 5, 2])
    assert fastvid.dyseg(x, c=2, tau=0.84) == [3, 5, 2]
    assert fastvid.dyseg(x, c=1, tau=-1.0) == [10]  # no cut asked for (the original raises there)
    assert fastvid.dyseg(x, c=20, tau=-1.0) == [1] * 10  # T < c: every transition (the original raises)


def test_a_static_segment_gives_its_budget_to_its_last_frame_and_the_clamps_bite():
    """Five near-identical frames of 16 tokens, 4 per frame: 20 in all, 8 context, 12 salient;
    one sub-segment, so the last frame gets it all, clamped to N // 2 = 8 context and 16 - 8 = 8
    salient: 16 spent of 20 (the script's 27% that kept 24.1%)."""
    x = static_scenes([5], n=16)
    assert fastvid.segment_budgets(x, 4, 0.4, 4, 0.95) == ([0, 0, 0, 0, 8], [0, 0, 0, 0, 8])
    res = fastvid.fastvid(x, torch.rand(5, 16), frame_retain=4, c=1, tau=-1.0)
    assert res.representative.numel() == 16 and bool((res.representative >= 64).all())  # all in the last frame


def test_context_budget_goes_to_every_pth_sub_segment_reversed():
    """Seven sub-segments of one frame each (unrelated frames, ignore 0.95), 4 tokens per frame:
    28 in all, int(28 * 0.4) = 11 context in ceil(7 / 4) = 2 groups (6, 5) placed at sub-segments
    0 and 4 and then reversed, so sub-segments 2 and 6 hold 5 and 6; 17 salient spread evenly,
    the remainder to the first."""
    x = static_scenes([1] * 7, n=16)
    salient, context = fastvid.segment_budgets(x, 4, 0.4, 4, 0.95)
    assert context == [0, 0, 5, 0, 0, 0, 6]
    assert salient == [3, 3, 3, 2, 2, 2, 2]


def test_dtm_blends_a_target_with_what_merged_into_it():
    """One frame, 6 tokens, 2 salient (by attention), 1 context: the 3 others merge into it and
    its row is 0.6 target + 0.4 mean (w = max(1/4, beta)); beta 0.2 gives 1/4 and 3/4."""
    x = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(5))
    attn = torch.tensor([[0.0, 9.0, 8.0, 0.1, 0.2, 0.3]])
    for beta, w in [(0.6, 0.6), (0.2, 0.25)]:
        res = fastvid.fastvid(x, attn, frame_retain=3, d=0.34, c=1, tau=-1.0, beta=beta)
        assert res.salient.tolist().count(True) == 2 and res.representative.numel() == 3
        target = int(res.representative[~res.salient][0])
        others = [i for i in (0, 3, 4, 5) if i != target]
        row = res.embeds[~res.salient][0]
        torch.testing.assert_close(row, w * x[0, target] + (1 - w) * x[0, others].mean(0))
        assert res.dest[others].tolist() == [res.representative.tolist().index(target)] * 3


# ----------------------------------------------------------------------------- on the tiny models
def test_nothing_to_reduce_equals_the_baseline(case):
    """r = 1 and every frame its own segment: all kept as salient or context, nothing merged."""
    pipe, prepared, _ = case
    check_identity(case, run(pipe, prepared, **{"fastvid.enabled": True, "fastvid.budget": 1.0}))


@pytest.mark.parametrize("overrides", [{}, {"fastvid.dyseg_c": 2, "fastvid.dyseg_tau": 0.5}, {"fastvid.budget": 0.5}])
def test_llm_input_and_logits_equal_the_references(case, overrides):
    pipe, prepared, _ = case
    x, attn = grid_tokens(case), eager_vision_scores(pipe, prepared)["pseudo_cls"]
    c, tau = overrides.get("fastvid.dyseg_c", 8), overrides.get("fastvid.dyseg_tau", 0.84)
    retain = fastvid.fastvid_budget(N, overrides["fastvid.budget"]) if "fastvid.budget" in overrides else None
    res = fastvid.fastvid(x, attn, c=c, tau=tau, frame_retain=retain)
    out = run(pipe, prepared, **{"fastvid.enabled": True, **overrides})
    red = out.result.reductions[0]
    assert (red.method, red.tokens_in, red.tokens_out) == ("fastvid", T * N, res.representative.numel())
    if not overrides:  # four one-frame segments of int(16 * 0.27) = 4 tokens: 3 salient, 1 context
        assert res.segments == [1] * T and res.representative.numel() == T * 4
        assert out.result.to_dict()["fastvid_salient_tokens"] == T * 3
    check_run(case, out, res.dest, res.representative, rows=res.embeds)


def test_the_scores_reaching_the_method_are_the_towers_attention(case, monkeypatch):
    """The ``pseudo_cls`` scores the patch hands the method (captured from the block's own q/k under
    SDPA) equal transformers' eager recomputation, standardised (the tiny towers' attention is
    nearly uniform: the spread is 1e-3 of the mean), and rank the tokens unlike the token norm
    (VidCom2's FastVID port's score), so the method really reads the tower."""
    from prunevid_bench.patch.vision_attention import VisionAttention

    pipe, prepared, _ = case
    seen, original = [], VisionAttention._take_vision_scores

    def keep(self, n_videos):
        out = original(self, n_videos)
        seen.append(out)
        return out

    monkeypatch.setattr(VisionAttention, "_take_vision_scores", keep)
    run(pipe, prepared, **{"fastvid.enabled": True})
    got = seen[0][0]["vision_pseudo_cls"].reshape(T, N)
    want = eager_vision_scores(pipe, prepared)["pseudo_cls"]
    torch.testing.assert_close(got.sum(-1), torch.ones(T))  # a softmax over each step's units
    standard = [(s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True) for s in (got, want)]
    torch.testing.assert_close(standard[0], standard[1], rtol=0, atol=1e-3)
    x = grid_tokens(case)
    assert not torch.equal(fastvid.fastvid(x, want).representative, fastvid.fastvid(x, x.norm(dim=-1)).representative)


def test_preset_and_budget_knob(case):
    from prunevid_bench.config import build_config
    from prunevid_bench.methods import get_method

    cfg = build_config("fastvid-25")
    assert cfg.enabled_methods == ["fastvid"] and cfg.fastvid.retention_ratio == 0.25
    method = get_method("fastvid")
    knob = method.budget_knob(method.config(), 0.25)
    assert knob.settings == {"budget": 0.25} and knob.promise([(4, 16), (2, 30)]) == 4 * 4 + 2 * 8
