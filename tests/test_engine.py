"""The engine against vanilla transformers, and token counts against the processor's grid."""

from __future__ import annotations

import pytest
import torch

from prunevid_bench.engine import prefill_position_ids, run_greedy


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pipe_fixture", ["tiny_pipe", "tiny_qwen2vl_pipe", "tiny_qwen3vl_pipe",
                                         "tiny_qwen3vl_moe_pipe"])
def test_engine_equals_generate(request, pipe_fixture, seed):
    """Methods off, the engine is vanilla ``generate`` token for token, on both families."""
    import numpy as np

    tiny_pipe = request.getfixturevalue(pipe_fixture)
    frames = np.random.default_rng(seed).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)
    tiny_pipe.remove_stages()
    prepared = tiny_pipe.prepare(frames, "What is happening in this video?")
    inputs = prepared.inputs
    out = run_greedy(tiny_pipe.model, inputs, max_new_tokens=24)
    with torch.inference_mode():
        ref = tiny_pipe.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert out.token_ids == ref[0, inputs["input_ids"].shape[1] :].tolist()
    # the first-token logits are the vanilla forward's logits
    with torch.inference_mode():
        logits = tiny_pipe.model(**inputs).logits[0, -1]
    torch.testing.assert_close(out.first_logits, logits.float(), rtol=0, atol=1e-5)


def test_engine_stops_at_eos(tiny_pipe, frames8):
    model = tiny_pipe.model
    prepared = tiny_pipe.prepare(frames8, "Stop?")
    first = run_greedy(model, prepared.inputs, max_new_tokens=3).token_ids
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first[1]  # pretend the second token is the end
    try:
        assert run_greedy(model, prepared.inputs, max_new_tokens=10).token_ids == first[:2]
    finally:
        model.generation_config.eos_token_id = saved


@pytest.mark.parametrize(
    "n_frames,height,width,grid",
    [(8, 112, 112, [4, 8, 8]), (4, 56, 112, [2, 4, 8]), (16, 84, 56, [8, 6, 4]), (2, 112, 56, [1, 8, 4])],
)
def test_visual_token_count_is_thw_over_4(tiny_pipe, n_frames, height, width, grid):
    import numpy as np

    frames = np.zeros((n_frames, height, width, 3), dtype=np.uint8)
    result = tiny_pipe.run(frames, "Count?", **{"generation.max_new_tokens": 1})
    assert result.video_grid_thw == [grid]
    t, h, w = grid
    assert result.visual_tokens == t * h * w // 4
    assert result.tokens_before_stage1 == result.tokens_after == t * h * w // 4
    assert result.total_compression_ratio == 1.0


def test_run_record_measures(tiny_pipe, frames8):
    r = tiny_pipe.run(frames8, "What?", **{"generation.max_new_tokens": 4})
    assert r.generated_tokens == len(r.generated_token_ids) <= 4
    assert r.prompt_tokens > r.visual_tokens == 64
    assert r.ttft_s > 0 and r.vision_encoder_s > 0 and r.prefill_s > 0
    assert r.ttft_s >= r.vision_encoder_s
    cfg = tiny_pipe.model.config.get_text_config()
    # KV bytes read off the cache equal the analytic size for the full prompt (float32)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert r.kv_cache_bytes == r.prompt_tokens * per_token == r.kv_cache_bytes_uncompressed


def test_prefill_positions_follow_time(tiny_pipe, frames8):
    """The processor is told the sampled fps, so M-RoPE time ids step with the frames."""
    prepared = tiny_pipe.prepare(frames8, "Q")
    pos = prefill_position_ids(tiny_pipe.model, prepared.inputs)
    ids = prepared.inputs["input_ids"][0]
    video = ids == tiny_pipe.model.config.video_token_id
    t_ids = pos[1, 0, video].view(4, 16)
    assert (t_ids[:, 0] == t_ids[:, 1]).all()
    # 2 frames per grid step at 2 fps: 1 s per step, tokens_per_second=2 -> time ids 2 apart
    steps = t_ids[1:, 0] - t_ids[:-1, 0]
    assert steps.tolist() == [2, 2, 2]
