"""Stages 2 and 3 on the tiny models of both families (``tiny``: Qwen2.5-VL, ``tiny-qwen2vl``:
Qwen2-VL; every test runs on each): against vanilla transformers, a cache-free reference, eager
attention weights, the official score written densely, ``generate``, and exact token counts.

All runs are float32 on the CPU. The video is 8 seeded-random 112x112 frames (4 temporal grid
steps of 8x8 patches -> 64 visual tokens, 16 per frame) whose top quarter is the same in every
frame, so that Stage 1 finds static as well as dynamic tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunevid_bench.config import Stage1Config, Stage2Config
from prunevid_bench.engine import prefill_position_ids, run_greedy
from prunevid_bench.errors import PruneVidError
from prunevid_bench.families import family_for_type
from prunevid_bench.measure import cache_bytes, cache_lengths
from prunevid_bench.models.tiny import (
    SYSTEM_PROMPT,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
)
from prunevid_bench.pipeline import _with_overrides, load_pipeline
from prunevid_bench.patch import apply_prunevid
from prunevid_bench.stages import stage2 as s2
from prunevid_bench.verify.reference import Traced, additive_mask, cache_free_logits, reference_for, trace  # noqa: F401 (Traced, additive_mask: other test modules import them from here)

QUESTION = "What is happening in this video?"
MAX_NEW = 5
N_LAYERS, N_FRAMES, PER_FRAME, N_VISUAL = 4, 4, 16, 64
STAGE1 = {"stage1.enabled": True, "cluster_ratio": 0.5, "tau": 0.8, "min_cluster_tokens": 4}
SCORES = ("prunevid", "attention", "last_token", "random")


def stage2(k: int | str = 1, keep: float = 0.4, score: str = "prunevid", stage1: bool = False) -> dict:
    over = {"stage2.enabled": True, "pruning_layer": k, "keep_ratio": keep, "score": score}
    return {**over, **STAGE1} if stage1 else over


def video_frames(seed: int = 0) -> np.ndarray:
    frames = np.random.default_rng(seed).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    frames[:, :28] = frames[0, :28]  # a static strip: Stage 1 gets a static group as well
    return frames


# ----------------------------------------------------------------------------- fixtures/helpers
TINY_MODELS = ("tiny", "tiny-qwen2vl")  # one per family


@pytest.fixture(scope="module", params=TINY_MODELS)
def tiny_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipes(tiny_name):
    """One pipeline per attention implementation, with the same seeded tiny weights."""
    out = {}
    frames = video_frames()
    _BASELINES.clear()
    for impl in ("sdpa", "eager"):
        pipe = load_pipeline(tiny_name, device="cpu", dtype="float32", attn_implementation=impl, overrides={"generation.max_new_tokens": MAX_NEW})
        out[impl] = (pipe, pipe.prepare(frames, QUESTION))
    yield out
    for pipe, _ in out.values():
        pipe.remove_stages()


def run_traced(pipe, prepared, **overrides) -> Traced:
    """``pipe.run`` traced: what entered the LLM and the logits of every step (the package's tracer)."""
    traced = trace(pipe, prepared, _with_overrides(pipe.config.to_dict(), overrides))
    assert len(traced.logits) == traced.result.generated_tokens
    return traced


_BASELINES: dict = {}


def baseline(pipes, impl: str) -> Traced:
    if impl not in _BASELINES:
        pipe, prepared = pipes[impl]
        _BASELINES[impl] = run_traced(pipe, prepared)
    return _BASELINES[impl]


def layout(input_ids: torch.Tensor) -> tuple[int, int]:
    """(first visual index, index of <|vision_end|>) in the unpruned prompt, read off the ids."""
    ids = input_ids[0]
    start = int(torch.nonzero(ids == VISION_START_ID)[0]) + 1
    end = int(torch.nonzero(ids == VISION_END_ID)[-1])
    assert int((ids[start:end] == VIDEO_PAD_ID).sum()) == end - start == N_VISUAL
    return start, end


# ----------------------------------------------------------------------------- the cache-free reference
# prunevid_bench.verify.reference: cache_free_logits, reference_for (one reference, shared with `prunevid verify`)


REFERENCE_CASES = [
    ("sdpa", False, 0, "prunevid"),
    ("sdpa", False, 1, "attention"),
    ("sdpa", False, 3, "last_token"),
    ("eager", False, 1, "prunevid"),
    ("eager", False, 3, "attention"),
    ("sdpa", True, 1, "prunevid"),
    ("sdpa", True, 3, "attention"),
    ("eager", True, 0, "prunevid"),
    ("eager", True, 3, "random"),
]


@pytest.mark.parametrize("impl,with_stage1,k,score", REFERENCE_CASES)
def test_pruned_run_matches_cache_free_reference(pipes, impl, with_stage1, k, score):
    pipe, prepared = pipes[impl]
    traced = run_traced(pipe, prepared, **stage2(k=k, keep=0.4, score=score, stage1=with_stage1))
    st = traced.state
    full = prefill_position_ids(pipe.model, prepared.inputs)
    if with_stage1:
        # the LLM input carries the representatives' original M-RoPE ids (never renumbered)
        assert traced.position_ids.shape[-1] < full.shape[-1]
        assert torch.equal(traced.position_ids[1:], full[1:, :, st.source_index])
    else:
        assert torch.equal(traced.position_ids, full)
    assert 0 < st.tokens_after < st.tokens_before
    ref = reference_for(pipe, prepared, traced)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(traced.result.first_token_logits, ref[0], rtol=0, atol=1e-4)
    # pruning changed the computation, so agreement above is not agreement with the baseline
    # (with K = the last layer only the decode steps change: the prompt's last row is intact)
    base = baseline(pipes, impl).logits
    n = min(len(base), len(traced.logits))
    assert (traced.logits[:n] - base[:n]).abs().max() > 1e-3


def test_reference_detects_wrong_decode_semantics(pipes):
    """The reference comparison can fail: renumbering decode positions by the dropped count, or
    letting decoded tokens see the dropped tokens, moves the later logits far beyond 1e-4."""
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **stage2(k=1))
    n_dropped = prepared.inputs["input_ids"].shape[1] - traced.state.keep_index.numel()
    full = prefill_position_ids(pipe.model, prepared.inputs)
    renumbered = cache_free_logits(
        pipe.model, traced.embeds, traced.position_ids[1:], traced.state.keep_index, 1,
        traced.result.generated_token_ids, full[1:, :, -1:] + 1 - n_dropped,
    )
    sees_dropped = reference_for(pipe, prepared, traced, decode_sees_dropped=True)
    for wrong in (renumbered, sees_dropped):
        torch.testing.assert_close(wrong[0], traced.logits[0], rtol=0, atol=1e-4)  # prefill is unaffected
        assert (wrong[1:] - traced.logits[1:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- keep everything
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("score", SCORES)
def test_keep_ratio_one_equals_baseline(pipes, impl, score):
    pipe, prepared = pipes[impl]
    base = baseline(pipes, impl)
    traced = run_traced(pipe, prepared, **stage2(k=1, keep=1.0, score=score))
    assert traced.state.tokens_after == N_VISUAL
    assert traced.result.generated_token_ids == base.result.generated_token_ids
    torch.testing.assert_close(traced.result.first_token_logits, base.result.first_token_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(traced.logits, base.logits, rtol=0, atol=1e-6)
    assert traced.result.kv_cache_bytes == base.result.kv_cache_bytes


def test_attention_implementations_agree(pipes):
    """sdpa and eager give the same tokens, unpruned and pruned, and prune the same tokens."""
    for overrides in ({}, stage2(k=1), stage2(k=2, score="attention")):
        sdpa = run_traced(*pipes["sdpa"], **overrides)
        eager = run_traced(*pipes["eager"], **overrides)
        assert sdpa.result.generated_token_ids == eager.result.generated_token_ids
        torch.testing.assert_close(sdpa.logits, eager.logits, rtol=0, atol=1e-5)
        if overrides:
            assert torch.equal(sdpa.state.keep_index, eager.state.keep_index)


# ----------------------------------------------------------------------------- scores
@pytest.fixture(scope="module")
def models(tiny_name):
    """Fresh tiny models (same seed as the pipelines) for direct forwards with our own handles."""
    family = family_for_type({"tiny": "qwen2_5_vl", "tiny-qwen2vl": "qwen2_vl"}[tiny_name])
    return {impl: family.build_tiny(attn_implementation=impl) for impl in ("sdpa", "eager")}


def forward_with(model, inputs, stage1: Stage1Config, stage2_cfg: Stage2Config, **kwargs):
    """One prefill with a fresh handle; returns (model output, handle state, input of layer K)."""
    handle = apply_prunevid(model, stage1, stage2_cfg)
    seen = {}

    def on_layer_k(module, args, kw):
        seen["hidden"] = args[0].detach().clone()

    hook = model.model.language_model.layers[stage2_cfg.pruning_layer].register_forward_pre_hook(
        on_layer_k, with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model(**inputs, position_ids=prefill_position_ids(model, inputs), **kwargs)
    finally:
        hook.remove()
        handle.remove()
    return out, handle.state, seen["hidden"]


def stage1_cfg(enabled: bool) -> Stage1Config:
    return Stage1Config(enabled=enabled, cluster_ratio=0.5, tau=0.8, min_cluster_tokens=4)


def merged_layout(input_ids: torch.Tensor, merged_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visual positions, query rows) in the post-Stage-1 sequence, from lengths alone: the text
    before and after the video is untouched, so the merged tokens fill the gap between them; the
    query rows are every row after the last visual token, its <|vision_end|> included."""
    start, end = layout(input_ids)
    n_merged = merged_len - (input_ids.shape[1] - N_VISUAL)
    return torch.arange(start, start + n_merged), torch.arange(start + n_merged, merged_len)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize(
    "with_stage1", [False, True], ids=["stage1_off", "stage1_on"]
)
def test_attention_scores_equal_eager_attention_weights(pipes, models, k, with_stage1):
    """``attention`` scores are rows of layer K's real (rotary, causal) attention: max over
    heads, then over the query rows; ``last_token`` is the last row averaged over heads."""
    inputs = pipes["eager"][1].inputs
    model = models["eager"]
    for mode in ("attention", "last_token"):
        out, st, _ = forward_with(
            model, inputs, stage1_cfg(with_stage1), Stage2Config(enabled=True, pruning_layer=k, score=mode),
            output_attentions=True,
        )
        weights = out.attentions[k][0].float()  # [H, L1, L1], layer K runs before anything is dropped
        visual, rows = merged_layout(inputs["input_ids"], weights.shape[-1])
        assert torch.equal(st.visual_positions, visual)
        if mode == "attention":
            expected = weights[:, rows][:, :, visual].amax(dim=0).amax(dim=0)
        else:
            expected = weights[:, -1, visual].mean(dim=0)
        torch.testing.assert_close(st.scores, expected, rtol=0, atol=1e-5)


def dense_official_scores(layer, hidden, rows, visual) -> torch.Tensor:
    """The official PruneVid score written out densely: the full L x L softmax of pre-rotary
    q.k^T * scaling, key heads repeated for GQA, no mask; max over heads, then over ``rows``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)[0]
    n, d = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(n, -1, d).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, d).transpose(0, 1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # query head h reads key head h // groups
    probs = torch.softmax(q @ k.transpose(1, 2) * d**-0.5, dim=-1)  # [H, L, L]
    return probs[:, rows][:, :, visual].amax(dim=0).amax(dim=0)


@pytest.mark.parametrize("impl,k", [("sdpa", 1), ("eager", 3)])
@pytest.mark.parametrize(
    "with_stage1", [False, True], ids=["stage1_off", "stage1_on"]
)
def test_prunevid_scores_equal_dense_official_formula(pipes, models, impl, k, with_stage1):
    inputs = pipes[impl][1].inputs
    model = models[impl]
    with torch.no_grad():
        cfg = Stage2Config(enabled=True, pruning_layer=k)
        _, st, hidden = forward_with(model, inputs, stage1_cfg(with_stage1), cfg)
        visual, rows = merged_layout(inputs["input_ids"], hidden.shape[1])
        expected = dense_official_scores(model.model.language_model.layers[k], hidden, rows, visual)
    torch.testing.assert_close(st.scores, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,keep", [(0, 0.4), (1, 0.25), (3, 0.5)])
def test_kept_set_equals_the_official_query_row_rule(pipes, models, k, keep):
    """The official code, transcribed naively: the image span is the first to the last pad
    index, the query rows are ``A[:, :, img_end + 1:, img_start:img_end + 1]`` of the pre-rotary,
    unmasked softmax (its <|vision_end|> row included), max over heads then rows, and each
    frame keeps ``topk(int(n * keep))``, offset and sorted."""
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **stage2(k=k, keep=keep))
    inputs, model = prepared.inputs, models["sdpa"]
    seen = {}
    hook = model.model.language_model.layers[k].register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=a[0].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, position_ids=prefill_position_ids(model, inputs))
    finally:
        hook.remove()
    ids = inputs["input_ids"][0]
    pads = torch.nonzero(ids == VIDEO_PAD_ID).flatten()
    img_start, img_end = int(pads[0]), int(pads[-1])
    layer = model.model.language_model.layers[k]
    attn = layer.self_attn
    x = layer.input_layernorm(seen["hidden"])[0]
    n, d = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(n, -1, d).transpose(0, 1)
    kk = attn.k_proj(x).view(n, -1, d).transpose(0, 1)
    kk = kk.repeat_interleave(q.shape[0] // kk.shape[0], dim=0)  # GQA: query head h reads key head h // groups
    probs = torch.softmax(q @ kk.transpose(1, 2) / d**0.5, dim=-1)
    text_to_video = probs[:, img_end + 1 :, img_start : img_end + 1]
    importance = text_to_video.max(0)[0].max(0)[0]
    kept = []
    for f in range(N_FRAMES):
        frame = importance[f * PER_FRAME : (f + 1) * PER_FRAME]
        kept.append(frame.topk(int(PER_FRAME * keep)).indices + f * PER_FRAME)
    expected = torch.cat(kept).sort().values
    assert torch.equal(traced.state.kept_visual, expected)


def test_max_max_scores_on_small_inputs():
    """Pure function against a per-head loop: GQA head mapping, no mask vs causal mask."""
    gen = torch.Generator().manual_seed(0)
    n_heads, n_kv, n_keys, d = 4, 2, 11, 8
    keys = torch.randn(n_kv, n_keys, d, generator=gen)
    queries = torch.randn(n_heads, 3, d, generator=gen)
    visual = torch.tensor([1, 2, 3, 5])
    rows_at = torch.tensor([6, 8, 10])
    scaling = d**-0.5
    no_mask, causal = [], []
    for h in range(n_heads):
        logits = queries[h] @ keys[h // (n_heads // n_kv)].T * scaling  # [3, L]
        no_mask.append(torch.softmax(logits, -1))
        future = torch.arange(n_keys).view(1, -1) > rows_at.view(-1, 1)
        causal.append(torch.softmax(logits.masked_fill(future, float("-inf")), -1))
    expected = torch.stack(no_mask)[..., visual].amax(0).amax(0)
    expected_causal = torch.stack(causal)[..., visual].amax(0).amax(0)
    torch.testing.assert_close(s2.max_max_scores(queries, keys, visual, scaling), expected, rtol=0, atol=1e-6)
    got = s2.max_max_scores(queries, keys, visual, scaling, query_positions=rows_at)
    torch.testing.assert_close(got, expected_causal, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, expected_causal)


def _max_max_scores_before(queries, keys, visual_index, scaling, query_positions=None):
    """The implementation this module had before the cheaper scoring (kept as the reference):
    the full softmax over all keys per row chunk, keys repeated per chunk, then the visual columns."""
    best = torch.full((visual_index.numel(),), float("-inf"))
    for rows in s2._row_chunks(queries.shape[0], queries.shape[1], keys.shape[1]):
        pos = None if query_positions is None else query_positions[rows]
        probs = s2.attention_probs(queries[:, rows], keys, scaling, pos)[..., visual_index]
        best = torch.maximum(best, probs.amax(dim=(0, 1)))
    return best


@pytest.mark.parametrize("n_heads, n_kv", [(4, 4), (4, 2), (8, 1), (28, 4)])
@pytest.mark.parametrize("visual", ["contiguous", "scattered"])
def test_max_max_scores_equal_the_previous_implementation(n_heads, n_kv, visual):
    """The split-keys / grouped-heads / folded-scale scoring gives the old scores within 1e-6,
    with and without the causal mask, for dense and grouped heads and scattered visual tokens
    (several videos or images in one prompt)."""
    gen = torch.Generator().manual_seed(n_heads * 10 + n_kv)
    n_keys, n_rows, d = 300, 17, 16
    queries = 2 * torch.randn(n_heads, n_rows, d, generator=gen)
    keys = 2 * torch.randn(n_kv, n_keys, d, generator=gen)
    if visual == "contiguous":
        visual_index = torch.arange(20, 250)
    else:
        visual_index = torch.sort(torch.randperm(n_keys - n_rows, generator=gen)[:150]).values
    rows_at = torch.arange(n_keys - n_rows, n_keys)
    for pos in (None, rows_at):
        expected = _max_max_scores_before(queries, keys, visual_index, d**-0.5, pos)
        got = s2.max_max_scores(queries, keys, visual_index, d**-0.5, pos)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- chunking
def test_scoring_chunks_rows_and_never_builds_l_by_l(pipes, monkeypatch):
    """Tiny chunks (one query row at a time) give the same scores and the same kept tokens; no
    softmax ever sees more than the chunk budget or a square L x L block."""
    pipe, prepared = pipes["sdpa"]
    seq_len = prepared.inputs["input_ids"].shape[1]
    calls = []
    original = s2._grouped_probs

    def spy(grouped_q, keys, *args, **kwargs):
        n_kv, n_rep, rows, _ = grouped_q.shape
        calls.append((n_kv * n_rep, rows, keys.shape[1]))
        return original(grouped_q, keys, *args, **kwargs)

    monkeypatch.setattr(s2, "_grouped_probs", spy)
    default_budget = s2.ROW_CHUNK_ELEMENTS
    for score in ("prunevid", "attention"):
        calls.clear()
        whole = run_traced(pipe, prepared, **stage2(k=1, score=score))
        assert calls and all(rows < keys == seq_len for _, rows, keys in calls)
        assert len(calls) == 1  # the default budget holds all text rows of this prompt at once
        monkeypatch.setattr(s2, "ROW_CHUNK_ELEMENTS", 4 * seq_len * 2)  # 2 rows of 4 heads per chunk
        calls.clear()
        chunked = run_traced(pipe, prepared, **stage2(k=1, score=score))
        monkeypatch.setattr(s2, "ROW_CHUNK_ELEMENTS", default_budget)
        assert len(calls) > 1 and all(h * r * n <= 4 * seq_len * 2 for h, r, n in calls)
        torch.testing.assert_close(chunked.state.scores, whole.state.scores, rtol=0, atol=1e-7)
        assert torch.equal(chunked.state.keep_index, whole.state.keep_index)


def test_chunked_pure_scores_equal_unchunked(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(4, 9, 8, generator=gen), torch.randn(2, 30, 8, generator=gen)
    visual, rows_at = torch.arange(3, 20), torch.arange(21, 30)
    whole = [s2.max_max_scores(queries, keys, visual, 0.3), s2.max_max_scores(queries, keys, visual, 0.3, rows_at)]
    monkeypatch.setattr(s2, "ROW_CHUNK_ELEMENTS", 1)  # one row per chunk
    chunked = [s2.max_max_scores(queries, keys, visual, 0.3), s2.max_max_scores(queries, keys, visual, 0.3, rows_at)]
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # matmul blocking may round differently


# ----------------------------------------------------------------------------- KV cache and decoding
@pytest.mark.parametrize(
    "k,with_stage1", [(1, False), (3, False), (0, True)]
)
def test_cache_after_prefill_is_compacted(pipes, models, k, with_stage1):
    model = models["sdpa"]
    inputs = pipes["sdpa"][1].inputs
    prompt_len = inputs["input_ids"].shape[1]
    from transformers import DynamicCache

    def prefill(stage1, stage2_cfg):
        handle = apply_prunevid(model, stage1, stage2_cfg)
        cache = DynamicCache(config=model.config.get_text_config())
        try:
            with torch.no_grad():
                model(**inputs, position_ids=prefill_position_ids(model, inputs), past_key_values=cache, use_cache=True)
        finally:
            handle.remove()
        return cache, handle.state

    full_cache, _ = prefill(Stage1Config(), Stage2Config())
    assert cache_lengths(full_cache) == [prompt_len] * N_LAYERS
    cache, st = prefill(stage1_cfg(with_stage1), Stage2Config(enabled=True, pruning_layer=k, keep_ratio=0.4))
    kept_visual = sum(int(n * 0.4) for n in torch.bincount(st.visual_groups).tolist())
    if not with_stage1:
        assert kept_visual == N_FRAMES * int(PER_FRAME * 0.4)
    kept_len = prompt_len - N_VISUAL + kept_visual
    assert st.tokens_after == kept_visual and st.keep_index.numel() == kept_len
    assert cache_lengths(cache) == [kept_len] * N_LAYERS  # layers 0..K compacted too
    assert cache_bytes(cache) * prompt_len == cache_bytes(full_cache) * kept_len


def test_run_record_kv_bytes_fall_with_dropped_tokens(pipes):
    pipe, prepared = pipes["sdpa"]
    base = baseline(pipes, "sdpa").result
    prompt_len = prepared.inputs["input_ids"].shape[1]
    for k in (0, 2):
        r = run_traced(pipe, prepared, **stage2(k=k)).result
        kept_len = prompt_len - N_VISUAL + N_FRAMES * int(PER_FRAME * 0.4)
        assert r.tokens_before == N_VISUAL and r.tokens_after == N_FRAMES * int(PER_FRAME * 0.4)
        assert r.kv_cache_bytes * prompt_len == base.kv_cache_bytes * kept_len
        assert r.kv_cache_bytes_uncompressed == base.kv_cache_bytes


@pytest.mark.parametrize(
    "with_stage1", [False, True], ids=["stage1_off", "stage1_on"]
)
def test_generate_with_patch_equals_engine(pipes, models, with_stage1):
    """``model.generate`` (its own position bookkeeping, vision tower run before the prefill)
    gives the engine's tokens and logits step by step; its cache is compacted as well."""
    pipe, prepared = pipes["sdpa"]
    overrides = stage2(k=1, stage1=with_stage1)
    engine = run_traced(pipe, prepared, **overrides)
    model, inputs = models["sdpa"], prepared.inputs
    handle = apply_prunevid(model, stage1_cfg(with_stage1), Stage2Config(enabled=True, pruning_layer=1))
    try:
        with torch.no_grad():
            gen = model.generate(
                **inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    finally:
        handle.remove()
    tokens = gen.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    assert tokens == engine.result.generated_token_ids
    torch.testing.assert_close(torch.cat(gen.logits).float(), engine.logits, rtol=0, atol=1e-5)
    assert torch.equal(handle.state.keep_index, engine.state.keep_index)
    kept_len = engine.state.keep_index.numel()
    assert cache_lengths(gen.past_key_values) == [kept_len + MAX_NEW - 1] * N_LAYERS


# ----------------------------------------------------------------------------- selection
def test_stratified_keep_floor_per_group_in_order():
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.8, 0.3, 0.1, 0.4, 0.2])
    # floor(3*.5)=1 -> [1]; floor(5*.5)=2 -> 5 then the first of the tied 0.3s (3); floor(2*.5)=1 -> [8]
    assert s2.stratified_keep(scores, groups, 0.5).tolist() == [1, 3, 5, 8]
    assert s2.stratified_keep(scores, groups, 1.0).tolist() == list(range(10))
    assert s2.stratified_keep(scores, groups, 0.3).tolist() == [5]  # 0, 1 and 0 per group
    # int(90 * 0.7) is 62 (90 * 0.7 == 62.99999999999999), as in the official code
    one_group = torch.zeros(90, dtype=torch.long)
    assert s2.stratified_keep(torch.arange(90.0), one_group, 0.7).tolist() == list(range(28, 90))
    for n in range(1, 300):  # the official Python count for every size at a few ratios
        for ratio in (0.1, 0.3, 0.4, 0.7, 0.9):
            kept = s2.stratified_keep(torch.arange(float(n)), torch.zeros(n, dtype=torch.long), ratio)
            assert kept.numel() == int(n * ratio), (n, ratio)
    # group ids need not be contiguous or sorted; the result is in original order
    scores = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0, 6.0])
    interleaved = s2.stratified_keep(scores, torch.tensor([7, 3, 7, 3, 7, 3]), 0.67)
    assert interleaved.tolist() == [1, 2, 4, 5]
    # all tied: the lowest indices win
    assert s2.stratified_keep(torch.ones(6), torch.zeros(6, dtype=torch.long), 0.5).tolist() == [0, 1, 2]


def test_stage1_off_keeps_the_same_count_in_every_frame(pipes):
    pipe, prepared = pipes["sdpa"]
    start, _ = layout(prepared.inputs["input_ids"])
    st = run_traced(pipe, prepared, **stage2(k=1, keep=0.4)).state
    assert torch.equal(st.visual_groups, torch.arange(N_VISUAL) // PER_FRAME)
    kept_pos = st.keep_index[(st.keep_index >= start) & (st.keep_index < start + N_VISUAL)]
    frame = (kept_pos - start) // PER_FRAME
    assert torch.bincount(frame, minlength=N_FRAMES).tolist() == [int(PER_FRAME * 0.4)] * N_FRAMES
    # every text token survives, in order
    text = torch.cat([torch.arange(start), torch.arange(start + N_VISUAL, prepared.inputs["input_ids"].shape[1])])
    assert torch.equal(st.keep_index[~torch.isin(st.keep_index, kept_pos)], text)
    # within each frame, the kept tokens are that frame's top scores
    for f in range(N_FRAMES):
        in_frame = torch.arange(f * PER_FRAME, (f + 1) * PER_FRAME)
        kept = torch.isin(start + in_frame, kept_pos)
        assert st.scores[in_frame][kept].min() >= st.scores[in_frame][~kept].max()


def test_stage1_on_keeps_floor_of_each_group(pipes):
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **stage2(k=1, keep=0.5, stage1=True))
    st, r = traced.state, traced.result
    assert r.stage1_static_tokens and r.stage1_dynamic_tokens  # both kinds of group are exercised
    counts = torch.bincount(st.visual_groups)
    kept_counts = torch.bincount(st.visual_groups[st.kept_visual], minlength=len(counts))
    assert kept_counts.tolist() == [int(n * 0.5) for n in counts.tolist()]
    assert torch.equal(st.kept_visual, torch.sort(st.kept_visual).values)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"keep_ratio": 0.0}, "stage2.keep_ratio"),
        ({"keep_ratio": 1.5}, "stage2.keep_ratio"),
        ({"keep_ratio": -0.2}, "stage2.keep_ratio"),
        ({"pruning_layer": 4}, r"stage2.pruning_layer must be in \[0, 3\] for this model \(4 layers\)"),
        ({"pruning_layer": -1}, "stage2.pruning_layer must be a 0-based layer index"),
        ({"pruning_layer": "29/28"}, "stage2.pruning_layer must be a 0-based layer index"),
        ({"pruning_layer": "10/28x"}, "stage2.pruning_layer must be a 0-based layer index"),
    ],
)
def test_out_of_range_settings_name_the_key(pipes, overrides, key):
    pipe, prepared = pipes["sdpa"]
    with pytest.raises(PruneVidError, match=key):
        pipe.run(prepared, **{"stage2.enabled": True, **overrides})
    assert pipe.run(prepared, **stage2(k=N_LAYERS - 1)).tokens_after > 0  # the pipeline still works


@pytest.mark.parametrize("spec,k", [("10/28", 1), ("27/28", 3)])
def test_relative_pruning_layer_prunes_after_the_resolved_layer(pipes, spec, k):
    """A "K/N" layer on the 4-layer model behaves exactly as the absolute layer it resolves to; the
    run record keeps both: the layer it pruned after and the value as written."""
    pipe, prepared = pipes["sdpa"]
    relative = run_traced(pipe, prepared, **stage2(k=spec))
    absolute = run_traced(pipe, prepared, **stage2(k=k))
    neighbour = run_traced(pipe, prepared, **stage2(k=k - 1))
    assert torch.equal(relative.state.scores, absolute.state.scores)
    assert not torch.equal(relative.state.scores, neighbour.state.scores)  # scores do tell the layers apart
    assert torch.equal(relative.logits, absolute.logits)
    assert torch.equal(relative.state.keep_index, absolute.state.keep_index)
    r, a = relative.result, absolute.result
    assert (r.pruning_layer, r.pruning_layer_spec) == (k, spec) and (a.pruning_layer, a.pruning_layer_spec) == (k, k)
    assert r.kv_cache_bytes_uncompressed == a.kv_cache_bytes_uncompressed == baseline(pipes, "sdpa").result.kv_cache_bytes
    assert baseline(pipes, "sdpa").result.pruning_layer is None


def test_prompt_without_text_after_the_video_is_refused(pipes, models):
    processor = pipes["sdpa"][0].processor
    frames = video_frames()
    meta = [{"total_num_frames": 8, "fps": 2.0, "frames_indices": list(range(8))}]
    # Only the system prompt comes before the video: it must never be used as the question.
    head = (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
    )
    model = models["sdpa"]

    def run(prompt, stage2_enabled):
        inputs = dict(processor(text=[prompt], videos=[frames], video_metadata=meta, do_sample_frames=False,
                                return_tensors="pt"))
        handle = apply_prunevid(model, Stage1Config(), Stage2Config(enabled=stage2_enabled, pruning_layer=1))
        try:
            return run_greedy(model, inputs, 2), handle.state
        finally:
            handle.remove()

    with pytest.raises(PruneVidError, match="text after the video"):
        run(head, True)
    run(head, False)  # only Stage 2 needs a question
    _, st = run(head + "?", True)  # one token after the video is enough: it is the only query row
    assert st.query_start == st.keep_index[-2] and st.tokens_after == N_FRAMES * int(PER_FRAME * 0.4)  # <|vision_end|>, ?
