"""HoliTom: the outer merge and the inner merge against naive transcriptions of the original's
rules (written here with the original's loops, on planted inputs), exact counts, nothing to
reduce ≡ vanilla, and the runs on the tiny models of each family against the cache-free
references (the inner merge: the halving weights, with layers 0..K-1's cache left whole as in
the original, or compacted). All float32 on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from prunevid_bench.methods import LayerContext, get_method
from prunevid_bench.stages import holitom as h
from prunevid_bench.tokens import weighted_rows
from prunevid_bench.verify.reference import reference_for
from tests.test_stage2 import QUESTION, run_traced, video_frames


# ----------------------------------------------------------------------------- naive transcriptions
def naive_windows(sim: torch.Tensor, tau: float, max_window: int):
    """``select_static_windows`` as the original writes it (cumprod matrix, float dp, strict >)."""
    b = sim.shape[0] + 1
    mat = torch.ones((b, b, sim.shape[1]))
    for start in range(b - 1):
        cum = torch.cumprod(sim[start:] > tau, dim=0)
        mat[start, start + 1 : start + 1 + len(cum)] = cum.float()
    lengths = (torch.arange(b).unsqueeze(0) - torch.arange(b).unsqueeze(1)).clamp(min=0)
    count = (mat.sum(-1) * lengths).float()
    dp, prev = torch.zeros(b), torch.zeros(b, dtype=torch.long)
    for i in range(b):
        max_val, best_j = (dp[i - 1] if i > 0 else 0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            cur = (dp[j] if j >= 0 else 0) + count[j + 1, i]
            if cur > max_val:
                max_val, best_j = cur, j + 1
        dp[i], prev[i] = max_val, best_j
    out, i = [], b - 1
    while i >= 0:
        out.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return out[::-1], dp[-1].item()


def naive_dpc(x: torch.Tensor, cluster_num: int, k: int):
    """``cluster_dpc_knn`` without its 1e-6 noise (the planted inputs have no density ties)."""
    dist = torch.cdist(x[None].float(), x[None].float()) / x.shape[-1] ** 0.5
    density = (-(torch.topk(dist, k, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).float()
    dmax = dist.flatten(1).max(-1).values[:, None, None]
    d, _ = (dist * mask + dmax * (1 - mask)).min(-1)
    return (d * density).topk(cluster_num, dim=-1).indices[0], dist[0]


def naive_density_merge(feat: torch.Tensor, ratio: float, beta: float, kk: int):
    """``merge_tokens_by_density`` + ``merge_tokens_by_clustering``: (centre positions, rows)."""
    num = round(feat.shape[0] * ratio)
    if num == 0:
        return [], []
    centres, dist = naive_dpc(feat, num, min(kk, num))
    centres = torch.sort(centres).values
    others = [i for i in range(feat.shape[0]) if i not in centres.tolist()]
    idx = torch.argmin(dist[others][:, centres], dim=-1) if others else torch.zeros(0, dtype=torch.long)
    rows = []
    for c in range(num):
        members = [o for o, a in zip(others, idx.tolist()) if a == c]
        rows.append(beta * feat[centres[c]] + (1 - beta) * feat[members].mean(0) if members else feat[centres[c]])
    return centres.tolist(), rows


def naive_outer(x: torch.Tensor, r: float, tau: float, beta: float = 0.6, kk: int = 7):
    """The Qwen port's ``holitom_compression`` (score = L2 norm, D = 0) with each output row's flat
    representative (a static row: its centre in the window's first step): {rep: features}."""
    t, n, _ = x.shape
    unit = torch.nn.functional.normalize(x.float(), p=2, dim=-1)
    sim = torch.nn.functional.cosine_similarity(unit[:-1], unit[1:], dim=-1)
    windows, reduced = naive_windows(sim, tau, 1024)
    total = t * n
    r = min(r / ((total - reduced) / total), 1) if total > reduced else r
    out = {}
    for s, e in windows:
        mask = torch.all(sim[s:e] > tau, dim=0) if e > s else torch.zeros(n, dtype=torch.bool)
        pos = torch.arange(n)
        if e > s and mask.any():
            centres, rows = naive_density_merge(x[s : e + 1, mask].mean(0), r, beta, kk)
            for c, row in zip(centres, rows):
                out[s * n + int(pos[mask][c])] = row
        dyn = pos[~mask]
        keep = math.ceil(dyn.numel() * r)
        for f in range(s, e + 1):
            if keep:
                top = x[f, dyn].norm(dim=-1).topk(keep).indices
                for p in dyn[top].tolist():
                    out[f * n + p] = x[f, p]
    return out, windows, r


def planted(seed: int = 0) -> torch.Tensor:
    """6 steps of 16 tokens: positions 0-11 barely change over steps 0-3, the rest move. (Enough
    static tokens for at least 3 clusters: with k = min(7, clusters) = 2 two mutual nearest
    neighbours tie in density, which the original breaks by noise and we by index.)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 16, 8, generator=g)
    x[1:4, :12] = x[0, :12] + 0.02 * torch.randn(3, 12, 8, generator=g)
    return x


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("seed,ratio,tau", [(0, 0.25, 0.8), (1, 0.5, 0.8), (2, 0.2, 0.65), (3, 0.3, 0.95)])
def test_outer_merge_equals_the_naive_transcription(seed, ratio, tau):
    x = planted(seed)
    want, windows, r = naive_outer(x, ratio, tau)
    res = h.holitom_outer(x, ratio, tau)
    assert res.windows == windows and res.ratio == r
    assert res.representative.tolist() == sorted(want)  # rows in position order, each at its representative
    torch.testing.assert_close(res.merged, torch.stack([want[i] for i in sorted(want)]), rtol=0, atol=1e-6)
    # the operator: every static member of a window goes to its cluster's row, each kept dynamic token to its own
    assert torch.equal(res.dest[res.representative], torch.arange(res.representative.numel()))


def test_a_planted_static_block_becomes_one_window_and_the_count_is_the_formula():
    x = planted(0)
    res = h.holitom_outer(x, 0.25, 0.8)
    assert res.windows == [(0, 3), (4, 4), (5, 5)]  # steps 0-3 share positions 0-11
    r = res.ratio
    assert r == min(0.25 / ((96 - 36) / 96), 1)  # the 12 static positions stored once instead of 4 times
    assert res.representative.numel() == round(12 * r) + 4 * math.ceil(4 * r) + 2 * math.ceil(16 * r) == 5 + 8 + 14


def test_beta_merge_and_the_vanishing_static_part_are_the_originals():
    x = planted(0)
    plain = h.holitom_outer(x, 0.25, 0.8, beta=1.0)  # beta 1: each cluster is its centre alone
    beta = h.holitom_outer(x, 0.25, 0.8)
    rows = torch.bincount(beta.dest[beta.dest >= 0])
    assert rows.max() > 4  # a static cluster of several positions over the 4-step window
    assert (beta.merged - plain.merged).abs().max() > 1e-3  # the check sees beta
    # round(n_static r') = 0: the window's static tokens vanish (Python's round, as the original)
    y = torch.randn(4, 3, 8)
    y[1:, 0] = y[0, 0]
    res = h.holitom_outer(y, 0.1, 0.8)
    assert res.windows == [(0, 3)] and round(1 * res.ratio) == 0 and bool((res.dest[[0, 3, 6, 9]] == -1).all())


def test_inner_merge_equals_the_originals_sequential_loop():
    """The original at layer K: layer K-1's last-row attention (head mean) over the visual span,
    topk(round(V (1 - r))), then each other token in ascending order folded into its most similar
    kept token (cosine, first maximum in topk order) by ``h[t] = (h[t] + h[s]) / 2``."""
    g = torch.Generator().manual_seed(0)
    heads, length, dim, width = 2, 20, 4, 16
    q, k, hidden = torch.randn(heads, length, dim, generator=g), torch.randn(heads, length, dim, generator=g), torch.randn(length, width, generator=g)
    visual = torch.arange(3, 15)
    hidden[visual[5]] = hidden[visual[2]]  # a duplicate: its similarity ties, the topk order breaks the tie
    ctx = LayerContext(q=q, k=k, rotate=lambda a, b: (a, b), visual=visual, groups=torch.zeros(12, dtype=torch.long),
                       query_start=15, scaling=0.5, seq_len=length, hidden=hidden)
    cfg = get_method("holitom").config(inner_ratio=0.5)
    red = get_method("holitom").select(ctx, cfg)
    got = weighted_rows(hidden[visual], red.merge_into, red.merge_weights, red.keep.numel())

    attn = torch.softmax(torch.einsum("hd,hld->hl", q[:, -1], k) * 0.5, dim=-1)  # the last row sees every key
    row = attn.mean(0)[visual]
    top = row.topk(round(12 * (1 - 0.5))).indices + 3
    states = hidden.clone()
    non = [i for i in visual.tolist() if i not in top.tolist()]
    a, b = states[non], states[top]
    sim = (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).T)
    best = sim.max(dim=-1).indices
    for i, s in enumerate(non):
        t = top[best[i]]
        states[t] = (states[t] + states[s]) / 2
    want = states[torch.sort(top).values]
    assert torch.equal(red.keep + 3, torch.sort(top).values)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    plain = weighted_rows(hidden[visual], red.merge_into, torch.ones(12), red.keep.numel())  # a plain mean
    assert (plain - want).abs().max() > 1e-3  # the halving is what the check sees


# ----------------------------------------------------------------------------- the models
FAMILIES = ("tiny", "tiny-qwen2vl")


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    from prunevid_bench.pipeline import load_pipeline

    pipe = load_pipeline(request.param, device="cpu", dtype="float32", overrides={"generation.max_new_tokens": 4})
    prepared = pipe.prepare(video_frames(), QUESTION)
    yield pipe, prepared, run_traced(pipe, prepared)
    pipe.remove_stages()


def video_grid(traced) -> torch.Tensor:
    """The baseline's video tokens as they entered the LLM, [T, N, C] (4 steps of 16)."""
    st = traced.state
    return traced.embeds[0, st.visual_positions].reshape(4, 16, -1) if st is not None else None


def test_a_budget_of_one_reduces_nothing(case):
    pipe, prepared, base = case
    out = run_traced(pipe, prepared, **{"holitom.enabled": True, "holitom.budget": 1.0})
    assert out.result.tokens_after_visual_methods == 64
    assert out.result.generated_token_ids == base.result.generated_token_ids
    torch.testing.assert_close(out.logits, base.logits, rtol=0, atol=1e-6)


def test_outer_run_has_the_pure_functions_count_input_and_matches_the_cache_free_reference(case):
    pipe, prepared, base = case
    out = run_traced(pipe, prepared, **{"holitom.enabled": True, "holitom.retain_ratio": 0.3})
    st = out.state
    grid = out.state.videos[0]
    full = run_traced(pipe, prepared, **{"holitom.enabled": True, "holitom.budget": 1.0})
    res = h.holitom_outer(video_grid(full), 0.3, 0.8)
    assert out.result.tokens_after_visual_methods == res.representative.numel() < 64  # exact count
    assert torch.equal(grid.index.cpu(), res.representative)
    torch.testing.assert_close(out.embeds[0, st.visual_positions], res.merged, rtol=0, atol=1e-6)
    ref = reference_for(pipe, prepared, out)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    assert (out.logits[0] - base.logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kv_cache,k", [("original", 2), ("compact", 1), ("original", 3)])
def test_inner_merge_matches_the_cache_free_reference(case, kv_cache, k):
    pipe, prepared, _ = case
    over = {"holitom.enabled": True, "holitom.retain_ratio": 0.5, "holitom.inner_merge": True,
            "holitom.pruning_layer": k, "holitom.kv_cache": kv_cache}
    out = run_traced(pipe, prepared, **over)
    st, r = out.state, out.result
    assert st.tokens_after == h.inner_keep_count(st.tokens_before, 0.5) and st.compacted == (kv_cache == "compact")
    assert [(x.acts, x.tokens_in, x.tokens_out) for x in r.reductions] == [
        ("visual_tokens", 64, st.tokens_before), ("llm_layer", st.tokens_before, st.tokens_after)]
    assert r.layer_method == "holitom" and r.pruning_layer == k
    ref = reference_for(pipe, prepared, out)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    sizes = reference_for(pipe, prepared, out, weights=st.row_sizes.float())  # a size-weighted mean instead
    assert (sizes - out.logits).abs().max() > 1e-3


def test_preset_is_the_published_setting_and_the_knob_promises_the_fraction(case):
    from prunevid_bench.config import build_config

    cfg = build_config("holitom-25")
    assert cfg.enabled_methods == ["holitom"]
    section = cfg.section("holitom")
    assert (section.retain_ratio, section.tau, section.inner_merge) == (0.25, 0.8, False)
    knob = get_method("holitom").budget_knob(section, 0.25)
    assert knob.settings == {"budget": 0.25} and knob.promise([(4, 16), (2, 10)]) == 21


@pytest.mark.parametrize("model", ["tiny-qwen3vl", "tiny-qwen3vl-moe"])
def test_qwen3_vl_inner_merge_matches_the_reference_with_deepstack(model):
    """K - 1 >= D - 1: every DeepStack level is added before the merge (levels: the mean of each
    outer row's members, as the operator carries them)."""
    from prunevid_bench.pipeline import load_pipeline
    from tests.test_qwen3_vl import deepstack_rows, frames

    pipe = load_pipeline(model, device="cpu", dtype="float32", overrides={"generation.max_new_tokens": 4})
    prepared = pipe.prepare(frames(), QUESTION)
    out = run_traced(pipe, prepared, **{"holitom.enabled": True, "holitom.retain_ratio": 0.5, "holitom.inner_merge": True,
                                        "holitom.pruning_layer": 2})
    st = out.state
    assert st.tokens_after < st.tokens_before < st.tokens_in_prompt
    rows, levels = deepstack_rows(pipe, prepared, st)
    ref = reference_for(pipe, prepared, out, deepstack=(rows, levels))
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    without = reference_for(pipe, prepared, out, deepstack=None)
    assert (without - out.logits).abs().max() > 1e-3  # the check sees DeepStack
    base, same = run_traced(pipe, prepared), run_traced(pipe, prepared, **{"holitom.enabled": True, "holitom.budget": 1.0})
    assert same.result.tokens_after_visual_methods == same.result.visual_tokens  # nothing to reduce
    assert same.result.generated_token_ids == base.result.generated_token_ids
    torch.testing.assert_close(same.logits, base.logits, rtol=0, atol=1e-5)
    pipe.remove_stages()


def test_a_still_video_is_one_window_a_moving_token_never_static_and_one_step_is_dynamic_only():
    g = torch.Generator().manual_seed(0)
    still = torch.randn(1, 16, 8, generator=g).repeat(5, 1, 1)
    still[:, 7] = torch.randn(5, 8, generator=g)  # one token moves in every step
    res = h.holitom_outer(still, 0.1, 0.8)
    assert res.windows == [(0, 4)] and res.ratio == min(0.1 / ((80 - 60) / 80), 1)
    assert bool((res.dest[7::16] >= 0).all()) and len(set(res.dest[7::16].tolist())) == 5  # its own row in each step
    one = h.holitom_outer(still[:1], 0.25, 0.8)
    assert one.windows == [(0, 0)] and one.representative.numel() == 4  # ceil(16 * 0.25) by norm
