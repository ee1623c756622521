"""Streams on Qwen3-VL (per-step timestamps, DeepStack) and Qwen3.5 (a hybrid LM: Gated DeltaNet
layers with a recurrent state, full-attention layers with a KV cache) equal offline, unpruned."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from prunevid_bench import streaming
from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.errors import PruneVidError
from prunevid_bench.families import family_of
from prunevid_bench.streaming import StreamSession

FPS = 2.0
QUESTION = "What is moving?"
MODELS = ["tiny-qwen3vl", "tiny-qwen3vl-moe", "tiny-qwen3_5", "tiny-qwen3_5-moe"]
_PIPES: dict = {}


def pipe_of(name: str):
    from prunevid_bench.pipeline import load_pipeline

    if name not in _PIPES:
        _PIPES[name] = load_pipeline(name, device="cpu", dtype="float32")
    return _PIPES[name]


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    for pipe in _PIPES.values():
        pipe.remove_stages()
    _PIPES.clear()


@pytest.fixture(scope="module")
def frames12() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 255, (12, 112, 112, 3), dtype=np.uint8)


def messages(frames, question=QUESTION):
    return [{"role": "user", "content": [{"type": "video", "video": frames, "fps": FPS}, {"type": "text", "text": question}]}]


def streamed(pipe, frames, chunk=4, **kwargs) -> StreamSession:
    session = StreamSession(pipe, video_fps=FPS, chunk_frames=chunk, **kwargs)
    for i in range(0, len(frames), chunk):
        session.append(frames[i : i + chunk])
    return session


def layer_state(layer) -> dict:
    """Every tensor a cache layer holds (keys, values, conv and recurrent states), by name."""
    out = {}
    for name, value in vars(layer).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        out.update({(name, k): v.clone() for k, v in items if isinstance(v, torch.Tensor)})
    return out


def assert_same_cache(a: StreamSession, b: StreamSession) -> None:
    assert len(a.cache.layers) == len(b.cache.layers)
    for x, y in zip(a.cache.layers, b.cache.layers):
        sx, sy = layer_state(x), layer_state(y)
        assert sx.keys() == sy.keys() and sx
        assert all(torch.equal(sx[k], sy[k]) for k in sx), [k for k in sx if not torch.equal(sx[k], sy[k])]


@pytest.mark.parametrize("name", MODELS)
def test_stream_equals_offline_after_each_chunk(name, frames12):
    pipe = pipe_of(name)
    session = StreamSession(pipe, video_fps=FPS, chunk_frames=4)
    for i in range(3):
        session.append(frames12[i * 4 : (i + 1) * 4])
        answer = session.ask(QUESTION, max_new_tokens=6)
        ref = pipe.run(messages=messages(frames12[: (i + 1) * 4]), max_new_tokens=6)
        assert (answer.first_logits - ref.first_token_logits).abs().max() <= 1e-4
        assert answer.token_ids == ref.generated_token_ids
        assert answer.cached_tokens + answer.question_tokens == ref.prompt_tokens
        assert answer.visual_tokens == ref.visual_tokens


@pytest.mark.parametrize("name", ["tiny-qwen3vl", "tiny-qwen3_5"])
def test_streamed_tokens_and_positions_are_the_offline_prompts(name, frames12):
    """Each step's timestamp text and placeholder run, and every M-RoPE id, as offline."""
    pipe = pipe_of(name)
    seen: list[torch.Tensor] = []
    hook = pipe.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"][1:, 0].clone()), with_kwargs=True)
    try:
        session = streamed(pipe, frames12)
        session.ask(QUESTION, max_new_tokens=1)
    finally:
        hook.remove()
    prepared = pipe.prepare(messages=messages(frames12))
    expected_ids = prepared.inputs["input_ids"][0].tolist()
    suffix = session._tokens(session._split_template(QUESTION)[1])
    assert session._prefix_ids + session._video_ids + suffix == expected_ids
    assert torch.equal(torch.cat(seen, dim=1), prefill_position_ids(pipe.model, prepared.inputs)[1:, 0])


def test_the_deepstack_add_is_what_makes_a_qwen3vl_stream_exact(frames12, monkeypatch):
    """Sensitivity: the same stream without adding each chunk's DeepStack levels is far off."""
    pipe = pipe_of("tiny-qwen3vl")
    ref = pipe.run(messages=messages(frames12[:8]), max_new_tokens=1)
    monkeypatch.setattr(streaming, "add_deepstack", lambda layers, deepstack: nullcontext())
    answer = streamed(pipe, frames12[:8]).ask(QUESTION, max_new_tokens=1)
    assert (answer.first_logits - ref.first_token_logits).abs().max() > 1e-3


def test_questions_leave_a_hybrid_streams_states_bit_identical(frames12):
    pipe = pipe_of("tiny-qwen3_5")
    asked = StreamSession(pipe, video_fps=FPS, chunk_frames=4)
    plain = StreamSession(pipe, video_fps=FPS, chunk_frames=4)
    answers = []
    for i in range(3):
        asked.append(frames12[i * 4 : (i + 1) * 4])
        plain.append(frames12[i * 4 : (i + 1) * 4])
        answers.append(asked.ask(f"{QUESTION} ({i})", max_new_tokens=4))
        assert_same_cache(asked, plain)
    info = [{k: v for k, v in s.cache_info().items() if k != "chunks"} for s in (asked, plain)]  # chunks: timings
    assert info[0] == info[1] and info[0]["recurrent_state_bytes"] > 0
    again = asked.ask("What now? (0)", max_new_tokens=4)
    assert again.token_ids == plain.ask("What now? (0)", max_new_tokens=4).token_ids


def test_without_the_restore_a_question_leaks_into_the_recurrent_state(frames12, monkeypatch):
    """Sensitivity: cropping the KV caches alone leaves the question in the linear layers."""
    pipe = pipe_of("tiny-qwen3_5")
    monkeypatch.setattr(streaming, "restore_states", lambda cache, states: None)
    asked, plain = streamed(pipe, frames12[:4]), streamed(pipe, frames12[:4])
    asked.ask(QUESTION, max_new_tokens=2)
    with pytest.raises(AssertionError):
        assert_same_cache(asked, plain)


def test_a_hybrid_cache_budget_evicts_from_full_attention_layers_only(frames12):
    pipe = pipe_of("tiny-qwen3_5")
    kinds = pipe.model.config.get_text_config().layer_types
    capped = StreamSession(pipe, video_fps=FPS, chunk_frames=4, cache_tokens=40)
    enforce, seen = capped._enforce_cache_tokens, []

    def watched():  # every layer's tensors around each eviction
        before = [layer_state(layer) for layer in capped.cache.layers]
        evicted = enforce()
        seen.append((evicted, before, [layer_state(layer) for layer in capped.cache.layers]))
        return evicted

    capped._enforce_cache_tokens = watched
    for i in range(0, 12, 4):
        capped.append(frames12[i : i + 4])
    assert capped.visual_tokens == 40 and sum(e for e, _, _ in seen) == 96 - 40
    for evicted, before, after in seen:
        for kind, b, a in zip(kinds, before, after):
            if kind == "full_attention":
                assert a[("keys", None)].shape[-2] == b[("keys", None)].shape[-2] - evicted
            else:  # the recurrent state has absorbed every token, evicted or not: never edited
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    answer = capped.ask(QUESTION, max_new_tokens=2)
    assert answer.eviction_layers == [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    assert answer.recurrent_state_bytes > 0
    assert streamed(pipe, frames12[:4]).ask(QUESTION, 1).eviction_layers is None


@pytest.mark.parametrize("name", ["tiny-qwen3vl", "tiny-qwen3_5"])
def test_question_time_eviction_keeps_offline_prunevids_tokens(name, frames12):
    """Layer K's scores over the last step's <|vision_end|> (kept from the append) and the
    question: offline Stage 2's exactly (K inside DeepStack's layers on Qwen3-VL, the first
    full-attention layer on Qwen3.5)."""
    from prunevid_bench.methods.prunevid_stage2 import Stage2Config
    import dataclasses

    pipe = pipe_of(name)
    full = family_of(pipe.model).attention_layers(pipe.model.config)  # every layer, or the full-attention ones
    k = full[0] if name == "tiny-qwen3_5" else 1
    cfg = dataclasses.replace(pipe.config, stage2=Stage2Config(enabled=True, pruning_layer=k, keep_ratio=0.4))
    session = streamed(pipe, frames12[:8], config=cfg)
    plain = streamed(pipe, frames12[:8])
    answer = session.ask(QUESTION, max_new_tokens=4)
    ref = pipe.run(messages=messages(frames12[:8]), max_new_tokens=4, **{
        "stage2.enabled": True, "stage2.pruning_layer": k, "stage2.keep_ratio": 0.4})
    state = pipe._handle.state
    torch.testing.assert_close(session.eviction.last["scores"], state.scores, rtol=0, atol=1e-5)
    assert torch.equal(session.eviction.last["kept"].cpu(), state.kept_visual.cpu())
    assert answer.visual_tokens_kept == ref.tokens_after < answer.visual_tokens
    assert answer.eviction_layers == full
    assert_same_cache(session, plain)  # the answer's pruning and its recurrent writes left no trace
    if name != "tiny-qwen3_5":
        return
    with pytest.raises(PruneVidError, match="linear-attention layer"):
        StreamSession(pipe, video_fps=FPS, config=dataclasses.replace(
            pipe.config, stage2=Stage2Config(enabled=True, pruning_layer=k - 1, keep_ratio=0.4)))


def scenes(scene_frames: int, count: int) -> np.ndarray:
    """Each scene one still image (plus faint noise), so Stage 1's segments are the scenes."""
    rng = np.random.default_rng(5)
    parts = []
    for _ in range(count):
        base = rng.integers(0, 255, (1, 112, 112, 3))
        parts.append(np.clip(base + rng.integers(-2, 3, (scene_frames, 112, 112, 3)), 0, 255).astype(np.uint8))
    return np.concatenate(parts)


@pytest.mark.parametrize("deepstack", ["merge", "representative"])
def test_stage1_per_chunk_on_qwen3vl_carries_the_deepstack_levels_as_offline(deepstack):
    """Chunks that are Stage 1's segments: the merged tokens' DeepStack levels follow them as
    offline (averaged, or the representative's), so the stream equals the pruned offline run."""
    from prunevid_bench.config import from_dict

    pipe = pipe_of("tiny-qwen3vl")
    frames = scenes(4, 2)
    overrides = {"stage1.enabled": True, "stage1.temporal_segment_ratio": 0.5, "stage1.min_cluster_tokens": 4,
                 "model.deepstack": deepstack}
    ref = pipe.run(messages=messages(frames), max_new_tokens=4, **overrides)
    assert ref.stage1_segments == 2 and ref.tokens_after_stage1 < ref.tokens_before_stage1
    cfg = pipe.config.to_dict()
    for key, value in overrides.items():
        section, field = key.split(".")
        cfg[section][field] = value
    answer = streamed(pipe, frames, config=from_dict(cfg)).ask(QUESTION, max_new_tokens=4)
    assert answer.visual_tokens == ref.tokens_after_stage1
    assert (answer.first_logits - ref.first_token_logits).abs().max() <= 1e-4
    assert answer.token_ids == ref.generated_token_ids
    cfg["model"]["deepstack"] = "merge" if deepstack == "representative" else "representative"
    other = streamed(pipe, frames, config=from_dict(cfg)).ask(QUESTION, max_new_tokens=1)
    assert (other.first_logits - ref.first_token_logits).abs().max() > 1e-3  # the check tells the modes apart
