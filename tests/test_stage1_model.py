"""Stage 1 inside the model: identity when nothing merges, true M-RoPE ids, several videos.
The fixtures run on the tiny model of each family (Qwen2.5-VL and Qwen2-VL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunevid_bench.methods.prunevid_stage1 import Stage1Config
from prunevid_bench.methods.prunevid_stage2 import Stage2Config
from prunevid_bench.engine import prefill_position_ids, run_greedy
from prunevid_bench.families import family_for_type
from prunevid_bench.models.tiny import build_processor, build_tiny_model
from prunevid_bench.patch import apply_prunevid
from prunevid_bench.stages.stage1 import merge_video_tokens

QUESTION = "What is happening?"


def planted_video(seed=0, frames=8):
    """Random frames with a static top-left quadrant (identical in every frame)."""
    video = np.random.default_rng(seed).integers(0, 255, (frames, 112, 112, 3), dtype=np.uint8)
    video[:, :56, :56] = video[0, :56, :56]
    return video


def prepare(processor, videos, question=QUESTION):
    content = [{"type": "video"} for _ in videos] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    meta = [{"total_num_frames": len(v), "fps": 2.0, "frames_indices": list(range(len(v)))} for v in videos]
    return dict(processor(text=[prompt], videos=list(videos), video_metadata=meta, do_sample_frames=False, return_tensors="pt"))


FAMILIES = ("qwen2_5_vl", "qwen2_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return family_for_type(request.param)


@pytest.fixture(scope="module")
def processor(family):
    return build_processor(processor_class=family.processor_class)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(family, request):
    return family.build_tiny(attn_implementation=request.param)


class LLMInputs:
    """Records what the language model receives (registered after the patch, so post-merge)."""

    def __init__(self, model):
        self.seen = []
        self.hook = model.model.language_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.seen.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids")})

    def remove(self):
        self.hook.remove()


def stage1(**kw):
    base = dict(enabled=True, tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.5, min_cluster_tokens=4)
    base.update(kw)
    return Stage1Config(**base)


def test_nothing_merged_equals_baseline(model, processor):
    inputs = prepare(processor, [planted_video()])
    base = run_greedy(model, inputs, 12)
    handle = apply_prunevid(model, stage1(tau=1.0, cluster_ratio=1.0), Stage2Config())
    try:
        out = run_greedy(model, inputs, 12)
    finally:
        handle.remove()
    assert out.token_ids == base.token_ids
    torch.testing.assert_close(out.first_logits, base.first_logits, rtol=0, atol=0)
    assert handle.state.tokens_after_stage1 == handle.state.tokens_before_stage1 == 64


def test_merged_tokens_carry_their_representatives_ids(model, processor):
    video = planted_video()
    inputs = prepare(processor, [video])
    ids = inputs["input_ids"][0]
    full_pos = prefill_position_ids(model, inputs)
    is_video = ids == model.config.video_token_id
    start = int(torch.nonzero(is_video)[0])
    end = start + int(is_video.sum())

    handle = apply_prunevid(model, stage1(), Stage2Config())
    rec = LLMInputs(model)
    try:
        out = run_greedy(model, inputs, 6)
    finally:
        rec.remove()
        handle.remove()
    # recompute the merge the patch must have done, from the true visual embeddings
    with torch.inference_mode():
        embeds = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output[0]
    expected = merge_video_tokens(embeds.view(4, 16, -1), tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.5, k=7, min_cluster_tokens=4)
    m = expected.merged.shape[0]
    prefill = rec.seen[0]
    pos, emb = prefill["position_ids"], prefill["inputs_embeds"][0]
    assert emb.shape[0] == ids.shape[0] - 64 + m
    # text before the video: untouched ids and embeddings
    assert torch.equal(pos[1:, 0, :start], full_pos[1:, 0, :start])
    # merged tokens: the representative's original (t, h, w), never renumbered
    assert torch.equal(pos[1:, 0, start : start + m], full_pos[1:, 0, start + expected.representative])
    torch.testing.assert_close(emb[start : start + m], expected.merged.to(emb.dtype))
    # text after the video keeps its unpruned ids
    assert torch.equal(pos[1:, 0, start + m :], full_pos[1:, 0, end:])
    # the text row is contiguous so no packed-sequence mask is inferred
    assert torch.equal(pos[0, 0], torch.arange(emb.shape[0]))
    # the planted static quadrant is found static (4 of 16 slots per frame)
    assert handle.state.method_stats["stage1_static_tokens"] >= 1
    assert handle.state.tokens_after_stage1 == m < 64
    assert handle.state.visual_groups.numel() == m
    # decoding continues the unpruned numbering: the same tokens as generate with the patch on
    handle = apply_prunevid(model, stage1(), Stage2Config())
    try:
        with torch.inference_mode():
            ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, ids.shape[0] :].tolist()
    finally:
        handle.remove()
    assert out.token_ids == ref


def test_two_videos_are_merged_each_on_its_own(processor):
    model = build_tiny_model()
    a, b = planted_video(1), planted_video(2, frames=4)
    inputs = prepare(processor, [a, b])
    handle = apply_prunevid(model, stage1(), Stage2Config(enabled=True, pruning_layer=1, keep_ratio=0.5))
    rec = LLMInputs(model)
    try:
        run_greedy(model, inputs, 3)
    finally:
        rec.remove()
        handle.remove()
    with torch.inference_mode():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    kw = dict(tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.5, k=7, min_cluster_tokens=4)
    ra = merge_video_tokens(feats[0].view(4, 16, -1), **kw)
    rb = merge_video_tokens(feats[1].view(2, 16, -1), **kw)
    st = handle.state
    assert st.tokens_before_stage1 == 64 + 32
    assert st.tokens_after_stage1 == ra.merged.shape[0] + rb.merged.shape[0]
    # groups of the second video are numbered after the first video's
    n_groups_a = len(ra.group_kind)
    assert st.visual_groups[: ra.merged.shape[0]].max() < n_groups_a <= st.visual_groups[ra.merged.shape[0] :].min()
    emb = rec.seen[0]["inputs_embeds"][0]
    pos_a = st.visual_positions[: ra.merged.shape[0]]
    pos_b = st.visual_positions[ra.merged.shape[0] :]
    torch.testing.assert_close(emb[pos_a], ra.merged)
    torch.testing.assert_close(emb[pos_b], rb.merged)


def test_run_record_has_stage1_fields(tiny_pipe):
    r = tiny_pipe.run(planted_video(), QUESTION, **{"stage1.enabled": True, "min_cluster_tokens": 4, "temporal_segment_ratio": 0.5})
    assert r.tokens_before_stage1 == 64
    assert r.tokens_after_stage1 == r.stage1_static_tokens + r.stage1_dynamic_tokens < 64
    assert r.stage1_segments >= 1 and r.stage1_s > 0
    assert r.tokens_before == r.tokens_after == r.tokens_after_stage1  # Stage 2 off
    assert r.llm_prefill_tokens == r.prompt_tokens - 64 + r.tokens_after_stage1
    assert r.total_compression_ratio == pytest.approx(r.tokens_after_stage1 / 64)


@pytest.mark.parametrize("stages", ["stage1", "stage1+2"])
def test_manual_decode_without_positions_continues_unpruned_numbering(processor, stages):
    """A user's own loop that lets the model derive positions (position_ids=None) gets the
    logits of explicit unpruned-numbering positions: the patch grows rope_deltas by the dropped
    count, because the model derives positions from the (shorter) cache length."""
    from transformers import DynamicCache

    model = build_tiny_model()
    inputs = prepare(processor, [planted_video()])
    s2 = Stage2Config(enabled=stages == "stage1+2", pruning_layer=1, keep_ratio=0.5)
    handle = apply_prunevid(model, stage1(), s2)
    tokens = [7, 42, 99]  # a fixed continuation: the same inputs for both loops

    next_pos = prefill_position_ids(model, inputs)[:, :, -1:] + 1  # (sets rope_deltas: call before the loops)

    def decode(explicit: bool) -> list[torch.Tensor]:
        cache = DynamicCache(config=model.config.get_text_config())
        kwargs = {"position_ids": prefill_position_ids(model, inputs)} if explicit else {}
        model(**inputs, **kwargs, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() < inputs["input_ids"].shape[1]  # something was dropped
        logits = []
        for i, tok in enumerate(tokens):
            step = {"position_ids": next_pos + i} if explicit else {}
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True, **step)
            logits.append(out.logits[0, -1])
        return logits

    try:
        with torch.inference_mode():
            derived, explicit = decode(False), decode(True)
    finally:
        handle.remove()
    for a, b in zip(derived, explicit):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
