"""EVS with ``evs.positions: vllm`` on the tiny models (float32, CPU): the M-RoPE ids the
language model receives are vLLM's renumbering (``stages.evs.evs_position_ids``) of the unpruned
ids, for one video, two videos and both families; decoding continues from the prompt's largest
id + 1 (vLLM's ``mrope_position_delta``), through our engine, ``generate`` and a loop that lets
the model derive positions; the run equals the cache-free reference; the CLI takes the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.engine import cache_keyword, prefill_position_ids
from prunevid_bench.pipeline import _with_overrides
from prunevid_bench.stages import evs
from tests.test_messages import two_videos_and_an_image, video_spans
from tests.test_stage2 import MAX_NEW, N_LAYERS, cache_free_logits, run_traced

VLLM = {"evs.enabled": True, "evs.video_pruning_rate": 0.6, "evs.positions": "vllm"}
W = 2  # the portrait clip's grid width in tokens (H' = 4)


def portrait_clip(pipe, n_frames: int = 48):
    """24 temporal steps (by default) of a 4 x 2 token grid and a one-character question.
    transformers 5.24 starts the text after the video at its first id + max(H', W') = + 4, vLLM
    at + W' = + 2; and the video's largest t id then lies above the last prompt token's, so
    decoding from the largest id + 1 (vLLM) is not decoding from the last + 1."""
    frames = np.random.default_rng(3).integers(0, 255, (n_frames, 112, 56, 3), dtype=np.uint8)
    return pipe.prepare(frames, "?")


def expected_vllm_ids(full: torch.Tensor, input_ids: torch.Tensor, grids: list, source: torch.Tensor) -> torch.Tensor:
    """(3, L') vLLM's ids for the kept tokens ``source``: ``evs_position_ids`` once per video,
    first video first, each on the previous result (later indices move by the dropped tokens)."""
    ids = full[1:, 0]
    dropped = 0
    for (start, end), (_, _, w) in zip(video_spans(input_ids, grids), grids):
        keep = torch.isin(torch.arange(start, end), source)
        ids = evs.evs_position_ids(ids, torch.arange(start, end) - dropped, keep, w // 2, mode="vllm")
        dropped += int((~keep).sum())
    return ids


def capture_llm_positions(pipe):
    """Every language-model call's position ids, as it receives them (after the patch)."""
    seen = []
    hook = pipe.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    return seen, hook


def traced(pipe, prepared, **overrides):
    return run_traced(pipe, prepared, **{"generation.max_new_tokens": MAX_NEW, **overrides})


# ----------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("pipe_fixture", ["tiny_pipe", "tiny_qwen2vl_pipe"])
def test_prefill_ids_are_vllms_renumbering_one_video(request, pipe_fixture):
    pipe = request.getfixturevalue(pipe_fixture)
    prepared = portrait_clip(pipe)
    inputs = prepared.inputs
    full = prefill_position_ids(pipe.model, inputs)
    out = traced(pipe, prepared, **VLLM)
    source = out.state.source_index
    (start, end), = video_spans(inputs["input_ids"], inputs["video_grid_thw"].tolist())
    assert 0 < out.state.tokens_after_stage1 < end - start
    expected = expected_vllm_ids(full, inputs["input_ids"], inputs["video_grid_thw"].tolist(), source)
    assert torch.equal(out.position_ids[1:, 0], expected)
    assert torch.equal(out.position_ids[0, 0], torch.arange(source.numel()))  # the text row stays contiguous
    after = int(torch.nonzero(source == end)[0])  # the <|vision_end|> after the video
    base = int(full[1, 0, start])
    assert out.position_ids[1:, 0, after].tolist() == [base + W] * 3
    assert full[1:, 0, end].tolist() == [base + 4] * 3  # transformers' numbering: + max(H', W')


def test_prefill_ids_are_vllms_renumbering_two_videos(tiny_pipe):
    """The second video is portrait (H' = 4, W' = 3): it moves what follows it by -1, on top of
    what the first (square) one does. The still between them is numbered as vLLM would too
    (vLLM renumbers after images as well; for H' <= W' that changes nothing)."""
    prepared = tiny_pipe.prepare(messages=two_videos_and_an_image())
    inputs = prepared.inputs
    grids = inputs["video_grid_thw"].tolist()
    full = prefill_position_ids(tiny_pipe.model, inputs)
    out = traced(tiny_pipe, prepared, **VLLM)
    expected = expected_vllm_ids(full, inputs["input_ids"], grids, out.state.source_index)
    assert torch.equal(out.position_ids[1:, 0], expected)
    assert [g[1] // 2 - g[2] // 2 for g in grids] == [0, 1]
    assert int(out.position_ids[1, 0, -1]) == int(full[1, 0, -1]) - 1


@pytest.mark.parametrize("seconds", (0.5, 2 / 3, 1.25, 7.5))
def test_vllm_positions_cast_seconds_per_step_as_vllm_does(tiny_pipe, seconds):
    """vLLM's EVS numbers a video's time ids with ``second_per_grid_ts.long()``: a kept token of
    step a sits at the video's first id + a * int(s) * tokens_per_second (transformers 5.24:
    floor(a * s * tokens_per_second)); ``original`` keeps the installed transformers' ids."""
    prepared = portrait_clip(tiny_pipe, n_frames=16)
    prepared.inputs["second_per_grid_ts"] = torch.tensor([seconds])
    (start, end), = video_spans(prepared.inputs["input_ids"], prepared.inputs["video_grid_thw"].tolist())
    full = prefill_position_ids(tiny_pipe.model, prepared.inputs)
    per_second = tiny_pipe.model.config.vision_config.tokens_per_second
    for mode, interval in (("vllm", int(seconds) * per_second), ("original", None)):
        out = traced(tiny_pipe, prepared, **{**VLLM, "evs.positions": mode})
        source = out.state.source_index
        video = (source >= start) & (source < end)
        step = (source[video] - start) // 8  # 8 tokens a step (4 x 2)
        got = out.position_ids[1, 0, video]
        if mode == "vllm":
            assert torch.equal(got, full[1, 0, start] + step * interval)
        else:
            assert torch.equal(got, full[1, 0, source[video]])
            assert not torch.equal(got, full[1, 0, start] + step * int(seconds) * per_second)  # 5.24 keeps the fraction


def test_original_positions_keep_the_unpruned_ids(tiny_pipe):
    prepared = portrait_clip(tiny_pipe)
    full = prefill_position_ids(tiny_pipe.model, prepared.inputs)
    out = traced(tiny_pipe, prepared, **{**VLLM, "evs.positions": "original"})
    assert torch.equal(out.position_ids[1:], full[1:, :, out.state.source_index])
    assert (out.state.prompt_max_id, out.state.decode_position_shift) == (None, 0)


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("pipe_fixture", ["tiny_pipe", "tiny_qwen2vl_pipe"])
def test_decoding_continues_from_the_largest_prompt_id(request, pipe_fixture):
    """Our engine and ``generate`` both pass explicit positions that continue the unpruned
    numbering; with the patch every decode step sits at the renumbered prompt's max + 1 + i on
    the M-RoPE rows, and both give the same tokens."""
    pipe = request.getfixturevalue(pipe_fixture)
    prepared = portrait_clip(pipe)
    inputs = prepared.inputs
    cfg = _with_overrides(pipe.config.to_dict(), {"generation.max_new_tokens": 6, **VLLM})
    pipe._apply_stages(cfg)
    seen, hook = capture_llm_positions(pipe)
    try:
        result = pipe.run(prepared, config=cfg)
        engine_calls = list(seen)
        seen.clear()
        with torch.inference_mode():
            ref = pipe.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    finally:
        hook.remove()
    assert result.generated_token_ids == ref[0, inputs["input_ids"].shape[1] :].tolist()
    n_unpruned = inputs["input_ids"].shape[1]
    for calls in (engine_calls, seen):
        prompt = calls[0][1:, 0]
        assert int(prompt.max()) > int(prompt[:, -1].max())  # a video id is the largest: max + 1 is not last + 1
        decode = torch.cat(calls[1:], dim=-1)
        steps = decode.shape[-1]
        assert steps == len(result.generated_token_ids) - 1 > 0
        assert torch.equal(decode[1:, 0], (int(prompt.max()) + 1 + torch.arange(steps)).expand(3, -1))
        assert torch.equal(decode[0, 0], n_unpruned + torch.arange(steps))  # the text row is left alone


def test_positions_derived_by_the_model_continue_from_the_largest_id_too(tiny_pipe):
    """A loop that passes no decode positions gets them from the cache length and ``rope_deltas``,
    which the patch sets from the renumbered prompt. A short clip: the last text token holds the
    largest id, so the renumbering moves it (-2)."""
    from transformers import DynamicCache

    model = tiny_pipe.model
    inputs = portrait_clip(tiny_pipe, n_frames=8).inputs
    tiny_pipe._apply_stages(_with_overrides(tiny_pipe.config.to_dict(), VLLM))
    seen, hook = capture_llm_positions(tiny_pipe)
    try:
        with torch.inference_mode():
            cache = {cache_keyword(model): DynamicCache(config=model.config.get_text_config())}
            out = model(**inputs, position_ids=prefill_position_ids(model, inputs), **cache, use_cache=True)
            model(input_ids=out.logits[:, -1].argmax(-1).view(1, 1), **cache, use_cache=True)
    finally:
        hook.remove()
    prompt, step = seen[0][1:, 0], seen[1][-3:, 0]
    unpruned = prefill_position_ids(model, inputs)[1:, 0]
    assert int(prompt.max()) == int(prompt[:, -1].max()) == int(unpruned.max()) - 2
    assert step.tolist() == [[int(prompt.max()) + 1]] * 3


# ----------------------------------------------------------------------------- the cache-free reference
def test_vllm_positions_match_cache_free_reference(tiny_pipe):
    """The LLM input rebuilt here from the baseline's visual tokens, EVS's pure mask and
    ``evs_position_ids``; decoding at the largest id + 1 + i."""
    prepared = portrait_clip(tiny_pipe)
    ids = prepared.inputs["input_ids"]
    (start, end), = video_spans(ids, prepared.inputs["video_grid_thw"].tolist())
    base = traced(tiny_pipe, prepared)
    t = prepared.inputs["video_grid_thw"][0, 0]
    mask = evs.evs_retention_mask(base.embeds[0, start:end].reshape(int(t), 4 * W, -1), 0.6)
    source = torch.cat([torch.arange(start), start + torch.nonzero(mask).flatten(), torch.arange(end, ids.shape[1])])
    embeds = base.embeds[:, source]
    full = prefill_position_ids(tiny_pipe.model, prepared.inputs)
    mrope = evs.evs_position_ids(full[1:, 0], torch.arange(start, end), mask, W, mode="vllm").unsqueeze(1)
    out = traced(tiny_pipe, prepared, **VLLM)
    original = traced(tiny_pipe, prepared, **{**VLLM, "evs.positions": "original"})
    torch.testing.assert_close(out.embeds, embeds, rtol=0, atol=1e-6)
    assert torch.equal(out.position_ids[1:], mrope)
    first_decode = torch.full((3, 1, 1), int(mrope.max()) + 1)
    ref = cache_free_logits(tiny_pipe.model, embeds, mrope, torch.arange(source.numel()), N_LAYERS - 1,
                            out.result.generated_token_ids, first_decode)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    assert (out.logits[0] - original.logits[0]).abs().max() > 1e-4  # the renumbering changed the computation


# ----------------------------------------------------------------------------- config and CLI
def cli_args(clip8, tmp_path) -> list[str]:
    return ["run", str(clip8), "What is happening?", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "2",
            "--results-dir", str(tmp_path), "--json", "-q", "--set", "evs.enabled=true"]


def test_cli_runs_vllm_positions(clip8, tmp_path):
    res = CliRunner().invoke(app, [*cli_args(clip8, tmp_path), "--set", "evs.positions=vllm"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["visual_tokens_kept"] == 16  # 0.75 of 64 dropped, as with the original ids


def test_bad_position_mode_is_a_one_line_error(clip8, tmp_path):
    res = CliRunner().invoke(app, [*cli_args(clip8, tmp_path), "--set", "evs.positions=vlm"])
    assert res.exit_code != 0
    assert res.output.strip().count("\n") == 0
    assert "evs.positions must be one of original, vllm, got 'vlm' (did you mean 'vllm'?)" in res.output
    assert "Traceback" not in res.output


def test_evs_75_preset_numbers_positions_as_vllm():
    from prunevid_bench.config import build_config, load_yaml, preset_path

    cfg = build_config("evs-75")
    assert (cfg.section("evs").positions, cfg.section("evs").video_pruning_rate) == ("vllm", 0.75)
    assert "vLLM's positions" in load_yaml(preset_path("evs-75"))["description"]
