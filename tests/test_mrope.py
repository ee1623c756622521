"""``model.mrope: qwen``: Qwen's own M-RoPE numbering (every segment starts at the largest id
before it + 1; a video's time ids step by int(seconds per step) * tokens_per_second) against a
naive transcription of transformers 4.57's rule written here from the grids alone, with whole and
fractional seconds per step; it moves only the starts of segments; decoding continues from the largest id + 1;
``generate`` agrees; the cache-free reference holds; methods compose; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.errors import PruneVidError
from prunevid_bench.mrope import numbering, qwen_numbering
from prunevid_bench.pipeline import load_pipeline
from tests.test_stage2 import N_LAYERS, QUESTION, TINY_MODELS, cache_free_logits, run_traced, video_frames

QWEN = {"model.mrope": "qwen", "generation.max_new_tokens": 4}


def published_rule(model, inputs) -> torch.Tensor:
    """(3, L) by transformers 4.57's rule, from scratch: a text run counts on from the largest id
    so far + 1; a vision span of grid (t, h, w) gets (t * interval, h, w) offsets from that start,
    with interval = int(seconds per step) * tokens_per_second for a Qwen2.5-VL video (4.57 casts
    the seconds to the int64 dtype of its ``arange`` before multiplying), 1 for Qwen2-VL, 0 for
    an image (one step)."""
    kinds = inputs["mm_token_type_ids"][0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    grids = {1: iter(inputs.get("image_grid_thw", [])), 2: iter(inputs.get("video_grid_thw", []))}
    seconds = iter(inputs["second_per_grid_ts"].tolist()) if "second_per_grid_ts" in inputs else None
    per_second = getattr(model.config.vision_config, "tokens_per_second", None)
    ids, top, i = [], -1, 0
    while i < len(kinds):
        j = i
        while j < len(kinds) and kinds[j] == kinds[i]:
            j += 1
        start = top + 1
        if kinds[i] == 0:
            ids += [[start + k] * 3 for k in range(j - i)]
        else:
            t, h, w = (int(x) for x in next(grids[kinds[i]]))
            step = 1 if kinds[i] == 1 or seconds is None else int(next(seconds)) * per_second
            ids += [[start + a * step, start + b, start + c]
                    for a in range(t) for b in range(h // merge) for c in range(w // merge)]
        top = max(max(row) for row in ids)
        i = j
    return torch.tensor(ids).T


@pytest.fixture(scope="module", params=TINY_MODELS)
def pipe(request):
    pipe = load_pipeline(request.param, device="cpu", dtype="float32")
    yield pipe
    pipe.remove_stages()


def test_the_lm_gets_the_published_numbering_and_transformers_5_24_differs(pipe):
    prepared = pipe.prepare(video_frames(), QUESTION)
    out = run_traced(pipe, prepared, **QWEN)
    rule = published_rule(pipe.model, prepared.inputs)
    assert torch.equal(out.position_ids[1:, 0], rule)
    assert torch.equal(out.position_ids[0, 0], torch.arange(rule.shape[1]))  # the text row stays the index
    plain = prefill_position_ids(pipe.model, prepared.inputs)[1:, 0]
    is_video = prepared.inputs["mm_token_type_ids"][0] == 2
    first, after = int(torch.nonzero(is_video)[0]), int(torch.nonzero(is_video)[-1]) + 1
    # Inside the video nothing moves; the text after it starts at the video's largest id + 1.
    assert torch.equal(rule[:, is_video] - rule[0, first], plain[:, is_video] - plain[0, first])
    assert int(rule[:, after].max()) == int(rule[:, :after].max()) + 1
    # transformers 5.24 starts it at the video's first id + max(H', W') instead: the same only
    # while the video's time ids span less than that (Qwen2-VL here: 4 steps of one id each).
    _, h, w = prepared.inputs["video_grid_thw"][0].tolist()
    side = max(h, w) // pipe.model.config.vision_config.spatial_merge_size
    longer_in_time = int(rule[0, is_video].max() - rule[0, first]) >= side
    assert int(plain[0, after]) - int(plain[0, first]) == side
    assert torch.equal(plain, rule) == (not longer_in_time)
    assert longer_in_time == (pipe.model.config.model_type == "qwen2_5_vl")  # 1 s steps x 2 ids a second


FRACTIONAL_STEPS = (0.5, 2 / 3, 1.25, 7.5)  # seconds per step: 16 frames of 16 s, 24 s, 51.2 s (4 fps), 4 fps of 0.27 fps


@pytest.mark.parametrize("seconds", FRACTIONAL_STEPS)
def test_fractional_seconds_per_step_are_cast_as_transformers_4_57_does(seconds):
    """transformers 5.24 numbers step a at floor(a * s * tokens_per_second), 4.57 at a * int(s) *
    tokens_per_second: with s fractional the two differ, and ``qwen`` gives the 4.57 ids."""
    pipe = load_pipeline("tiny", device="cpu", dtype="float32")
    prepared = pipe.prepare(video_frames(), QUESTION)
    prepared.inputs["second_per_grid_ts"] = torch.tensor([seconds])
    out = run_traced(pipe, prepared, **QWEN)
    rule = published_rule(pipe.model, prepared.inputs)
    assert torch.equal(out.position_ids[1:, 0], rule)
    is_video = prepared.inputs["mm_token_type_ids"][0] == 2
    steps = rule[0, is_video].unique() - rule[0, is_video].min()
    per_second = pipe.model.config.vision_config.tokens_per_second
    assert steps.tolist() == sorted({a * int(seconds) * per_second for a in range(int(prepared.inputs["video_grid_thw"][0, 0]))})
    plain = prefill_position_ids(pipe.model, prepared.inputs)[1:, 0]
    plain_steps = plain[0, is_video].unique() - plain[0, is_video].min()
    assert not torch.equal(plain_steps, steps)  # 5.24 keeps the fraction
    pipe.remove_stages()


def test_two_videos_an_image_and_a_system_prompt():
    from tests.test_messages import two_videos_and_an_image

    pipe = load_pipeline("tiny", device="cpu", dtype="float32")
    prepared = pipe.prepare(messages=two_videos_and_an_image())
    prepared.inputs["second_per_grid_ts"] = torch.tensor([2.5, 2 / 3])  # one video cast to 2, the other to 0
    out = run_traced(pipe, prepared, **QWEN)
    assert torch.equal(out.position_ids[1:, 0], published_rule(pipe.model, prepared.inputs))
    pipe.remove_stages()


def test_decoding_continues_after_the_largest_id_and_matches_the_cache_free_reference(pipe):
    prepared = pipe.prepare(video_frames(), QUESTION)
    out = run_traced(pipe, prepared, **QWEN)
    rule = published_rule(pipe.model, prepared.inputs)
    assert int(rule[:, -1].max()) == int(rule.max())  # the last prompt token holds the largest id
    ref = cache_free_logits(pipe.model, out.embeds, rule.unsqueeze(1), torch.arange(rule.shape[1]), N_LAYERS - 1,
                            out.result.generated_token_ids, (rule.max() + 1).view(1, 1, 1).expand(3, 1, 1))
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    if not torch.equal(prefill_position_ids(pipe.model, prepared.inputs)[1:, 0], rule):  # Qwen2.5-VL here
        base = run_traced(pipe, prepared, **{"generation.max_new_tokens": 4})
        assert (out.logits[0] - base.logits[0]).abs().max() > 1e-4  # the numbering changed the computation


def test_generate_under_the_same_numbering_gives_the_same_tokens(pipe):
    prepared = pipe.prepare(video_frames(), QUESTION)
    out = pipe.run(prepared, **QWEN)
    with numbering(pipe.model, "qwen"), torch.inference_mode():
        ref = pipe.model.generate(**prepared.inputs, max_new_tokens=4, do_sample=False)
    assert out.generated_token_ids == ref[0, prepared.inputs["input_ids"].shape[1]:].tolist()[: len(out.generated_token_ids)]
    assert "get_rope_index" not in pipe.model.model.__dict__  # the run's wrapper is gone


def test_methods_keep_their_tokens_qwen_ids():
    pipe = load_pipeline("tiny", device="cpu", dtype="float32")
    prepared = pipe.prepare(video_frames(), QUESTION)
    out = run_traced(pipe, prepared, **QWEN, **{"stage1.enabled": True, "stage1.min_cluster_tokens": 4,
                                                "stage2.enabled": True, "stage2.pruning_layer": 1})
    rule = published_rule(pipe.model, prepared.inputs)
    assert torch.equal(out.position_ids[1:, 0], rule[:, out.state.source_index])  # index-selected, never renumbered
    assert out.result.tokens_after < out.result.tokens_after_stage1 < out.result.tokens_before_stage1
    pipe.remove_stages()


def test_padding_is_left_alone_and_deltas_are_largest_plus_one_minus_length():
    ids = torch.tensor([[[0, 1, 2, 2, 2, 3, 4, 0], [0, 1, 2, 2, 3, 3, 4, 0], [0, 1, 2, 3, 2, 3, 4, 0]]]).transpose(0, 1)
    kinds = torch.tensor([[0, 0, 2, 2, 2, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    ids[:, 0, 2:6] = torch.tensor([[2, 2, 9, 9], [2, 2, 3, 3], [2, 3, 2, 3]])  # a video whose time ids reach 9
    out, deltas = qwen_numbering(ids, kinds, mask)
    assert out[:, 0, 6].tolist() == [10, 10, 10] and out[:, 0, 7].tolist() == ids[:, 0, 7].tolist()
    assert torch.equal(out[:, 0, :6], ids[:, 0, :6]) and deltas.tolist() == [[10 + 1 - 7]]


def test_bad_mode_and_streams_are_refused(clip8, tmp_path):
    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    res = CliRunner().invoke(app, ["run", str(clip8), "Q", "--model", "tiny", "--num-frames", "8", "--set", "model.mrope=qwne"])
    assert res.exit_code == 2 and "model.mrope must be transformers or qwen, got 'qwne'" in res.output
    res = CliRunner().invoke(app, ["run", str(clip8), "Q", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "2",
                                   "--set", "model.mrope=qwen", "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["stream", str(clip8), "--ask", "1:Q", "--model", "tiny", "--set", "model.mrope=qwen",
                                   "--results-dir", str(tmp_path)])
    assert res.exit_code == 2 and "model.mrope=transformers" in res.output
    with pytest.raises(PruneVidError):
        from prunevid_bench.config import RunConfig, validate

        cfg = RunConfig()
        cfg.model.mrope = "vllm"
        validate(cfg)
