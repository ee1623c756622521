"""Streaming equals offline: a stream with no pruning is the offline prefill computed in pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunevid_bench.methods.prunevid_stage1 import Stage1Config
from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.errors import PruneVidError
from prunevid_bench.streaming import StreamSession, encode_chunk

FPS = 2.0
QUESTION = "What is moving?"


@pytest.fixture(scope="module")
def frames16() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 255, (16, 112, 112, 3), dtype=np.uint8)


def with_section(pipe, **sections):
    """The pipeline's config with these method sections (``stage1=Stage1Config(...)``) in place."""
    import dataclasses

    return dataclasses.replace(pipe.config, **sections)


def offline(pipe, frames, question=QUESTION, max_new_tokens=6, **overrides):
    messages = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": FPS}, {"type": "text", "text": question}]}]
    return pipe.run(messages=messages, max_new_tokens=max_new_tokens, **overrides)


def test_chunk_features_equal_the_whole_videos(tiny_pipe, frames16):
    whole, (t, h, w) = encode_chunk(tiny_pipe, frames16, FPS)
    per_step = whole.shape[0] // t
    for start, end in [(0, 2), (4, 10), (14, 16)]:
        part, grid = encode_chunk(tiny_pipe, frames16[start:end], FPS)
        assert grid == ((end - start) // 2, h, w)
        torch.testing.assert_close(part, whole[start // 2 * per_step : end // 2 * per_step], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 4, 8])
def test_stream_equals_offline_after_first_middle_and_last_chunk(tiny_pipe, frames16, chunk):
    session = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=chunk)
    n_chunks = len(frames16) // chunk
    ask_after = sorted({1, (n_chunks + 1) // 2, n_chunks})
    for i in range(n_chunks):
        session.append(frames16[i * chunk : (i + 1) * chunk])
        if i + 1 in ask_after:
            seen = (i + 1) * chunk
            answer = session.ask(QUESTION, max_new_tokens=6)
            ref = offline(tiny_pipe, frames16[:seen])
            assert (answer.first_logits - ref.first_token_logits).abs().max() <= 1e-4
            assert answer.token_ids == ref.generated_token_ids
            assert answer.cached_tokens + answer.question_tokens == ref.prompt_tokens
            assert answer.visual_tokens == ref.visual_tokens


def test_a_qwen2_vl_stream_equals_offline_too(tiny_qwen2vl_pipe, frames16):
    """The second family: its M-RoPE time ids advance by one per step, and the stream follows."""
    session = StreamSession(tiny_qwen2vl_pipe, video_fps=FPS, chunk_frames=4)
    for i in range(3):
        session.append(frames16[i * 4 : (i + 1) * 4])
    answer = session.ask(QUESTION, max_new_tokens=6)
    ref = offline(tiny_qwen2vl_pipe, frames16[:12])
    assert (answer.first_logits - ref.first_token_logits).abs().max() <= 1e-4
    assert answer.token_ids == ref.generated_token_ids and answer.visual_tokens == ref.visual_tokens


def test_streamed_position_ids_equal_the_offline_prompts(tiny_pipe, frames16):
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append(kwargs["position_ids"][1:, 0].clone())

    hook = tiny_pipe.model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        session = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4)
        for i in range(3):
            session.append(frames16[i * 4 : (i + 1) * 4])
        session.ask(QUESTION, max_new_tokens=1)
    finally:
        hook.remove()
    streamed = torch.cat(seen, dim=1)
    prepared = tiny_pipe.prepare(messages=[{"role": "user", "content": [
        {"type": "video", "video": frames16[:12], "fps": FPS}, {"type": "text", "text": QUESTION}]}])
    expected = prefill_position_ids(tiny_pipe.model, prepared.inputs)[1:, 0]
    assert torch.equal(streamed, expected)


def test_ask_leaves_no_trace(tiny_pipe, frames16):
    asked = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4)
    plain = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4)
    asked.append(frames16[:4])
    plain.append(frames16[:4])
    before = asked.cache_info()
    first = asked.ask(QUESTION, max_new_tokens=5)
    second = asked.ask(QUESTION, max_new_tokens=5)
    assert first.token_ids == second.token_ids and torch.equal(first.first_logits, second.first_logits)
    assert asked.cache_info() == before
    asked.append(frames16[4:8])
    plain.append(frames16[4:8])
    for a, b in zip(asked.cache.layers, plain.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_an_asks_extra_memory_is_its_own_tokens(tiny_pipe, frames16):
    session = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4)
    session.append(frames16[:4])
    info = session.cache_info()
    per_token = info["bytes"] // info["tokens"]
    answer = session.ask(QUESTION, max_new_tokens=4)
    # The question's tokens and every generated token but the last were written to the cache.
    assert answer.extra_kv_bytes == (answer.question_tokens + len(answer.token_ids) - 1) * per_token
    assert answer.kv_bytes == info["bytes"] + answer.question_tokens * per_token
    assert session.cache_info()["bytes"] == info["bytes"]


def test_an_odd_frame_waits_for_the_next_chunk(tiny_pipe, frames16):
    odd = StreamSession(tiny_pipe, video_fps=FPS)
    even = StreamSession(tiny_pipe, video_fps=FPS)
    odd.append(frames16[:3])
    assert odd.cache_info()["pending_frames"] == 1 and odd.frames_seen == 2
    assert odd.append(frames16[3:4]) is not None and odd.cache_info()["pending_frames"] == 0
    even.append(frames16[:4])
    assert odd.ask(QUESTION, 3).token_ids == even.ask(QUESTION, 3).token_ids


def test_ask_choice_equals_offline_logits_choice(tiny_pipe, frames16):
    from prunevid_bench.choices import format_mc_prompt
    from prunevid_bench.choices import letter_token_ids

    options = ["a cat", "a car", "a cloud"]
    session = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4)
    session.append(frames16[:4])
    session.append(frames16[4:8])
    answer = session.ask_choice(QUESTION, options)
    ref = offline(tiny_pipe, frames16[:8], format_mc_prompt(QUESTION, options), max_new_tokens=1)
    letters = letter_token_ids(tiny_pipe.processor.tokenizer, 3)
    assert answer.choice == int(ref.first_token_logits[letters].argmax())
    assert (answer.first_logits - ref.first_token_logits).abs().max() <= 1e-4


def test_ask_choice_can_parse_a_generated_reply(tiny_pipe, frames16):
    from prunevid_bench.choices import format_mc_prompt, parse_choice

    options = ["a cat", "a car"]
    session = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4)
    session.append(frames16[:4])
    answer = session.ask_choice(QUESTION, options, max_new_tokens=4)
    reply = session.ask(format_mc_prompt(QUESTION, options), 4).text
    assert answer.text == reply and (answer.choice, answer.parse_status) == parse_choice(reply, 2, options)


def test_reset_empties_the_stream(tiny_pipe, frames16):
    session = StreamSession(tiny_pipe, video_fps=FPS)
    empty = session.cache_info()
    session.append(frames16[:4])
    session.reset()
    assert session.cache_info() == empty and empty["visual_tokens"] == 0 and empty["tokens"] > 0


def test_user_errors_are_one_line(tiny_pipe, frames16):
    with pytest.raises(PruneVidError, match="multiple of 2"):
        StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=3)
    session = StreamSession(tiny_pipe, video_fps=FPS)
    with pytest.raises(PruneVidError, match="append at least one chunk"):
        session.ask(QUESTION)
    session.append(frames16[:2])
    with pytest.raises(PruneVidError, match="keep the frame size"):
        session.append(np.zeros((2, 112, 224, 3), dtype=np.uint8))
    with pytest.raises(PruneVidError, match="longer than chunk_frames"):
        StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=2).append(frames16[:4])
    text = tiny_pipe.model.config.get_text_config()
    limit, text.max_position_embeddings = text.max_position_embeddings, 80
    try:
        with pytest.raises(PruneVidError, match="max_position_embeddings"):
            session.ask(QUESTION)
    finally:
        text.max_position_embeddings = limit
    assert session.cache_info()["tokens"] == session.chunks[0].visual_tokens + len(session._prefix_ids)


# ------------------------------------------------------------------ pruning in a stream
def two_scene_clip(scene_frames: int, scenes: int) -> np.ndarray:
    """Each scene one still image (plus faint noise), so Stage 1's segments are the scenes."""
    rng = np.random.default_rng(5)
    parts = []
    for _ in range(scenes):
        base = rng.integers(0, 255, (1, 112, 112, 3))
        noise = rng.integers(-2, 3, (scene_frames, 112, 112, 3))
        parts.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return np.concatenate(parts)


def test_stage1_per_chunk_equals_offline_when_chunks_are_its_segments(tiny_pipe):
    frames = two_scene_clip(4, 2)  # 4 temporal steps, 2 scenes of 2 steps
    cfg = Stage1Config(enabled=True, temporal_segment_ratio=0.5, tau=0.8, min_cluster_tokens=4)
    ref = offline(tiny_pipe, frames, **{"stage1.enabled": True, "stage1.temporal_segment_ratio": 0.5,
                                        "stage1.min_cluster_tokens": 4})
    assert ref.stage1_segments == 2 and ref.tokens_after_stage1 < ref.tokens_before_stage1
    # Each chunk is one scene of 2 steps: int(2 * 0.5) = 1 segment, the offline one.
    session = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4, config=with_section(tiny_pipe, stage1=cfg))
    session.append(frames[:4])
    session.append(frames[4:])
    answer = session.ask(QUESTION, max_new_tokens=6)
    assert answer.visual_tokens == ref.tokens_after_stage1
    assert (answer.first_logits - ref.first_token_logits).abs().max() <= 1e-4
    assert answer.token_ids == ref.generated_token_ids


def test_stage1_per_chunk_never_merges_across_a_chunk(tiny_pipe):
    frames = two_scene_clip(8, 1)  # one still scene: offline Stage 1 merges it as one segment
    cfg = Stage1Config(enabled=True, temporal_segment_ratio=0.25, min_cluster_tokens=4)
    ref = offline(tiny_pipe, frames, **{"stage1.enabled": True, "stage1.temporal_segment_ratio": 0.25,
                                        "stage1.min_cluster_tokens": 4})
    session = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4, config=with_section(tiny_pipe, stage1=cfg))
    session.append(frames[:4])
    session.append(frames[4:])
    # Static slots are averaged per chunk, not over the whole scene: more tokens survive.
    assert ref.stage1_segments == 1
    assert session.visual_tokens > ref.tokens_after_stage1
    assert all(c.tokens_cached < c.tokens_in for c in session.chunks)


def test_the_visual_budget_holds_over_a_long_stream(tiny_pipe):
    rng = np.random.default_rng(9)
    budget = 40
    session = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=2, cache_tokens=budget)
    bytes_seen = []
    for _ in range(12):
        session.append(rng.integers(0, 255, (2, 112, 112, 3), dtype=np.uint8))
        info = session.cache_info()
        assert info["visual_tokens"] <= budget
        bytes_seen.append(info["bytes"])
    assert session.visual_tokens == budget and sum(c.evicted for c in session.chunks) > 0
    assert len(set(bytes_seen[-6:])) == 1  # flat once the budget is reached
    assert session.ask(QUESTION, max_new_tokens=2).visual_tokens == budget


def test_the_budget_evicts_the_most_redundant_tokens(tiny_pipe):
    still = np.full((2, 112, 112, 3), 90, dtype=np.uint8)
    noise = np.random.default_rng(1).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    chunks = [noise, noise, still]  # the second repeats the first step exactly: all redundant
    budgeted = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=2, cache_tokens=32)
    full = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=2)
    for chunk in chunks:
        budgeted.append(chunk)
        full.append(chunk)
    assert budgeted.chunks[-1].evicted == 16
    # The survivors are the first and the third chunk's tokens, untouched.
    prefix = full.cache_info()["tokens"] - 48
    kept = torch.cat([torch.arange(prefix), torch.arange(prefix, prefix + 16), torch.arange(prefix + 32, prefix + 48)])
    for a, b in zip(budgeted.cache.layers, full.cache.layers):
        assert torch.equal(a.keys, b.keys[:, :, kept]) and torch.equal(a.values, b.values[:, :, kept])


# ------------------------------------------------------------------ question-time eviction
def eviction_session(pipe, frames, keep_ratio, budget=None):
    from prunevid_bench.methods.prunevid_stage2 import Stage2Config

    cfg = Stage2Config(enabled=True, pruning_layer=1, keep_ratio=keep_ratio)
    session = StreamSession(pipe, video_fps=FPS, chunk_frames=4, config=with_section(pipe, stage2=cfg), cache_tokens=budget)
    for i in range(0, len(frames), 4):
        session.append(frames[i : i + 4])
    return session


def test_question_time_eviction_keeps_offline_prunevids_tokens(tiny_pipe, frames16):
    session = eviction_session(tiny_pipe, frames16[:12], keep_ratio=0.4)
    answer = session.ask(QUESTION, max_new_tokens=6)
    ref = offline(tiny_pipe, frames16[:12], **{"stage2.enabled": True, "stage2.pruning_layer": 1, "stage2.keep_ratio": 0.4})
    offline_state = tiny_pipe._handle.state
    # Layer K's scores, and so the kept tokens, are offline Stage 2's exactly.
    torch.testing.assert_close(session.eviction.last["scores"], offline_state.scores, rtol=0, atol=1e-6)
    assert torch.equal(session.eviction.last["kept"].cpu(), offline_state.kept_visual.cpu())
    assert answer.visual_tokens_kept == ref.tokens_after < answer.visual_tokens
    # Layers after K differ (the video's KV there saw every token): close to offline, not equal.
    assert (answer.first_logits - ref.first_token_logits).abs().max() < 1.0


def test_question_time_eviction_leaves_no_trace(tiny_pipe, frames16):
    session = eviction_session(tiny_pipe, frames16[:8], keep_ratio=0.4)
    plain = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4)
    for i in range(0, 8, 4):
        plain.append(frames16[i : i + 4])
    before = session.cache_info()
    keys = session.eviction.keys.clone()
    first = session.ask(QUESTION, max_new_tokens=5)
    assert session.cache_info() == before and torch.equal(session.eviction.keys, keys)
    assert session.ask(QUESTION, max_new_tokens=5).token_ids == first.token_ids
    for a, b in zip(session.cache.layers, plain.cache.layers):  # eviction never edits the stream's cache
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # The answer's copies hold the kept tokens only (O(kept + question), not a copy of the
    # cache); the stream's layers 0..K also held the question until the crop.
    n_layers, k = len(before["bytes_per_layer"]), session.eviction.layer
    per = before["bytes"] // (before["tokens"] * n_layers)  # one token in one layer
    dropped = first.visual_tokens - first.visual_tokens_kept
    copies = n_layers * (first.cached_tokens - dropped + first.question_tokens + len(first.token_ids) - 1) * per
    assert first.extra_kv_bytes == copies + (k + 1) * first.question_tokens * per
    assert first.kv_bytes == n_layers * (first.cached_tokens - dropped + first.question_tokens) * per


def test_question_time_eviction_keeping_everything_is_the_plain_stream(tiny_pipe, frames16):
    session = eviction_session(tiny_pipe, frames16[:8], keep_ratio=1.0)
    plain = StreamSession(tiny_pipe, video_fps=FPS, chunk_frames=4)
    for i in range(0, 8, 4):
        plain.append(frames16[i : i + 4])
    a, b = session.ask(QUESTION, 6), plain.ask(QUESTION, 6)
    assert a.visual_tokens_kept == a.visual_tokens and a.token_ids == b.token_ids
    assert torch.equal(a.first_logits, b.first_logits)


def test_the_key_store_follows_the_budget(tiny_pipe, frames16):
    session = eviction_session(tiny_pipe, frames16, keep_ratio=0.5, budget=40)
    assert session.visual_tokens == 40
    assert session.eviction.keys.shape[1] == session.cache_info()["tokens"]
    counts = torch.unique(session.visual_groups, return_counts=True)[1]
    assert session.ask(QUESTION, 3).visual_tokens_kept == sum(int(c * 0.5) for c in counts.tolist())  # per group


def test_evs_compares_a_chunks_first_step_with_the_previous_chunks_last():
    """Chunk [B, C] after a chunk ending in B: offline EVS would keep step 0 (255); in a stream
    step 0 repeats the step before it and goes, and C's tokens stay."""
    from prunevid_bench.config import RunConfig
    from prunevid_bench.stages import evs
    from prunevid_bench.stream_methods import enabled_methods, reduce_chunk

    rng = torch.Generator().manual_seed(0)
    b, c = torch.randn(16, 8, generator=rng), torch.randn(16, 8, generator=rng)
    features = torch.cat([b, c])
    cfg = RunConfig()
    cfg.methods["evs"].enabled, cfg.methods["evs"].video_pruning_rate = True, 0.75
    visual, _, _ = enabled_methods(cfg)
    first = reduce_chunk(visual, features, 2, 16, 4, previous=None)
    assert first.keep.tolist() == list(range(16))  # no step before: step 0 kept whole, as offline
    later = reduce_chunk(visual, features, 2, 16, 4, previous=b.clone())
    assert later.keep.tolist() == list(range(16, 32)) and later.methods == ["evs"]
    scores = evs.evs_dissimilarity(features.view(2, 16, 8), b)
    torch.testing.assert_close(scores[0], torch.zeros(16), rtol=0, atol=1e-6)
    naive = [1 - float(torch.nn.functional.cosine_similarity(c[i], b[i], dim=0)) for i in range(16)]
    torch.testing.assert_close(scores[1], torch.tensor(naive), rtol=0, atol=1e-6)
