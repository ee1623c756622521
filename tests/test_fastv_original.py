"""FastV at the original's K, on both tiny families: the kept set equals a naive transcription of
pkunlp-icler/FastV's inplace code (layer K-1's attention, eager, ``mean(heads)[-1]`` over the
visual span, ``topk``, sorted) at K = 1, 2, 3; the run equals a cache-free reference in which
layers 0..K-1 see every token (and decoding still sees the dropped ones there, FastV's KV cache)
or, with ``fastv.kv_cache: compact``, not."""

from __future__ import annotations

import pytest
import torch

from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.errors import PruneVidError
from prunevid_bench.measure import cache_lengths
from tests.test_stage2 import N_LAYERS, N_VISUAL, baseline, models, pipes, reference_for, run_traced, tiny_name  # noqa: F401


def fastv(k, keep=0.5, kv_cache="original") -> dict:
    return {"fastv.enabled": True, "fastv.pruning_layer": k, "fastv.keep_ratio": keep, "fastv.kv_cache": kv_cache}


@torch.no_grad()
def naive_fastv_keep(model, inputs, k: int, keep_ratio: float) -> torch.Tensor:
    """The original, transcribed naively: run the unpruned prompt with eager attention, take layer
    K-1's attention weights, average over heads, the last row over the visual span, keep the
    ``int(V * ratio)`` largest, sorted (indices into the visual span)."""
    out = model(**inputs, position_ids=prefill_position_ids(model, inputs), output_attentions=True)
    ids = inputs["input_ids"][0]
    video = torch.nonzero(ids == model.config.video_token_id).flatten()
    first, last = int(video[0]), int(video[-1])
    image_attention_score = out.attentions[k - 1].mean(dim=1)[0][-1][first : last + 1]
    top = image_attention_score.topk(int(video.numel() * keep_ratio)).indices
    return top.sort().values


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_kept_set_equals_the_original_at_k(pipes, models, k, keep):
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **fastv(k, keep))
    expected = naive_fastv_keep(models["eager"], prepared.inputs, k, keep)
    assert torch.equal(traced.state.kept_visual, expected)
    assert traced.result.pruning_layer == k
    if k > 1:  # the neighbouring layer's attention keeps another set: the test tells K from K-1
        assert not torch.equal(naive_fastv_keep(models["eager"], prepared.inputs, k - 1, keep), expected)


@pytest.mark.parametrize("impl,k", [("sdpa", 1), ("eager", 2), ("sdpa", 3)])
@pytest.mark.parametrize("kv_cache", ["original", "compact"])
def test_run_matches_cache_free_reference(pipes, impl, k, kv_cache):
    """Layers 0..K-1 run on every token, K.. on the kept ones; decoding reads the dropped tokens
    in layers 0..K-1 exactly when their cache is left whole (the original)."""
    pipe, prepared = pipes[impl]
    traced = run_traced(pipe, prepared, **fastv(k, kv_cache=kv_cache))
    original = kv_cache == "original"
    assert traced.handle.score_layer == k - 1  # layers 0..K-1 on every token: the reference drops after K-1
    ref = reference_for(pipe, prepared, traced, decode_sees_dropped=original)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    other = reference_for(pipe, prepared, traced, decode_sees_dropped=not original)
    assert (other[1:] - traced.logits[1:]).abs().max() > 1e-3  # the cache rule is seen
    base = baseline(pipes, impl).result
    prompt, kept = prepared.inputs["input_ids"].shape[1], traced.state.keep_index.numel()
    r = traced.result
    assert r.kv_cache_bytes_uncompressed == base.kv_cache_bytes
    full_layers = k if original else 0
    per_token_layer = base.kv_cache_bytes // (prompt * N_LAYERS)
    assert r.kv_cache_bytes == per_token_layer * (full_layers * prompt + (N_LAYERS - full_layers) * kept)


def test_early_layers_keep_their_whole_cache(pipes):
    from transformers import DynamicCache

    pipe, prepared = pipes["eager"]
    traced = run_traced(pipe, prepared, **fastv(2))
    handle, model, inputs = pipe._handle, pipe.model, prepared.inputs
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        model(**inputs, position_ids=prefill_position_ids(model, inputs), past_key_values=cache, use_cache=True)
    prompt, kept = inputs["input_ids"].shape[1], handle.state.keep_index.numel()
    assert cache_lengths(cache) == [prompt, prompt] + [kept] * (N_LAYERS - 2)
    assert traced.result.tokens_after == N_VISUAL // 2


def test_layer_zero_is_refused_and_a_shallow_relative_depth_is_layer_one(pipes):
    pipe, prepared = pipes["sdpa"]
    with pytest.raises(PruneVidError, match=r"fastv.pruning_layer must be >= 1: fastv scores with layer K-1"):
        pipe.run(prepared, **fastv(0))
    assert pipe.run(prepared, **fastv("2/28")).pruning_layer == 1  # 2/28 of 4 layers rounds to 0


def test_flops_count_layers_0_to_k_minus_1_on_every_token(pipes):
    """The analytic prefill FLOPs run layers 0..K-1 on the whole prompt and K.. on the kept rows,
    plus the one scored row at layer K-1."""
    from prunevid_bench.families import family_of
    from prunevid_bench.flops import TextShape, llm_prefill_flops, prunevid_scoring_flops, tokens_per_layer, vision_encoder_flops

    pipe, prepared = pipes["sdpa"]
    r = pipe.run(prepared, **fastv(2), **{"generation.max_new_tokens": 1})
    shape = TextShape.from_config(pipe.model.config)
    kept_len = r.prompt_tokens - (r.tokens_before - r.tokens_after)
    llm = llm_prefill_flops(shape, tokens_per_layer(N_LAYERS, r.prompt_tokens, 1, kept_len),
                            scoring=prunevid_scoring_flops(shape, 1, r.prompt_tokens))
    vision = vision_encoder_flops(family_of(pipe.model).vision_shape(pipe.model.config), r.video_grid_thw)
    assert r.prefill_flops == (llm + vision).total


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_with_the_early_layers_whole_equals_the_engine(pipes, models, impl):
    """``model.generate`` decodes over a cache whose layers 0..K-1 hold the whole prompt and
    K.. the kept rows (the mask of the shorter layers is cut to them), as our engine does."""
    from prunevid_bench.config import RunConfig
    from prunevid_bench.methods.fastv import FastVConfig
    from prunevid_bench.patch import apply_methods

    pipe, prepared = pipes[impl]
    engine = run_traced(pipe, prepared, **fastv(2))
    model, inputs = models[impl], prepared.inputs
    handle = apply_methods(model, RunConfig(methods={"fastv": FastVConfig(enabled=True, pruning_layer=2)}))
    try:
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=len(engine.logits), do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        handle.remove()
    assert gen.sequences[0, inputs["input_ids"].shape[1] :].tolist() == engine.result.generated_token_ids
    torch.testing.assert_close(torch.cat(gen.logits).float(), engine.logits, rtol=0, atol=1e-5)
    prompt, kept = inputs["input_ids"].shape[1], handle.state.keep_index.numel()
    steps = len(engine.logits) - 1
    assert cache_lengths(gen.past_key_values) == [prompt + steps] * 2 + [kept + steps] * (N_LAYERS - 2)
