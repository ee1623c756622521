"""The analytic FLOPs model: by hand on a toy shape, and against torch's FLOP counter on the
tiny Qwen2.5-VL and Qwen2-VL (eager attention computes the full score matrix, so it is compared with
``causal=False``; the counter counts matmuls and convolutions, as the model does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prunevid_bench.config import Stage1Config, Stage2Config
from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.flops import (
    QWEN25_VL_7B_TEXT,
    QWEN25_VL_7B_VISION,
    Flops,
    TextShape,
    VisionShape,
    attention_pairs,
    decoder_layer_flops,
    ideal_speedup,
    llm_prefill_flops,
    prunevid_scoring_flops,
    tokens_per_layer,
    vision_encoder_flops,
)
from prunevid_bench.families import family_for_type, family_of
from prunevid_bench.models.tiny import build_processor
from prunevid_bench.patch import apply_prunevid

TOY = TextShape(hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, num_layers=2, vocab_size=10)


def test_one_layer_by_hand():
    # n = 3 tokens, D = 8, d = 4, H = 2, H_kv = 1, I = 16
    # q: 2*3*8*8 = 384, k: 2*3*8*4 = 192, v: 192, o: 2*3*8*8 = 384 -> 1152
    # causal pairs 3*4/2 = 6: q k^T 2*2*4*6 = 96, attn v 96 -> 192 (full: 9 pairs -> 288)
    # mlp 3 * 2*3*8*16 = 2304
    assert decoder_layer_flops(TOY, 3) == Flops(projections=1152, attention=192, mlp=2304)
    assert decoder_layer_flops(TOY, 3, causal=False).attention == 288
    assert attention_pairs(3) == 6 and attention_pairs(3, causal=False) == 9


def test_pruned_prefill_by_hand():
    # layer 0 (K = 0) sees 3 tokens, layer 1 sees 2: 3648 + (768 + 2*2*2*4*3 + 1536) = 3648 + 2400
    # lm_head on one row: 2*8*10 = 160; scoring of 1 row against 3 keys: 2*2*4*1*3 = 48
    tokens = tokens_per_layer(2, 3, pruning_layer=0, tokens_after_pruning=2)
    assert tokens == [3, 2]
    pruned = llm_prefill_flops(TOY, tokens, scoring=prunevid_scoring_flops(TOY, 1, 3))
    assert pruned == Flops(projections=1152 + 768, attention=192 + 96, mlp=2304 + 1536, lm_head=160, scoring=48)
    assert pruned.total == 3648 + 2400 + 160 + 48
    full = llm_prefill_flops(TOY, tokens_per_layer(2, 3))
    assert full.total == 2 * 3648 + 160
    assert ideal_speedup(full, pruned) == pytest.approx((2 * 3648 + 160) / (3648 + 2400 + 208))


def test_bad_token_lists_are_refused():
    with pytest.raises(ValueError):
        llm_prefill_flops(TOY, [3])
    with pytest.raises(ValueError):
        tokens_per_layer(2, 3, pruning_layer=2, tokens_after_pruning=1)
    with pytest.raises(ValueError):
        tokens_per_layer(2, 3, pruning_layer=0, tokens_after_pruning=4)


def test_vision_encoder_by_hand():
    # one frame of 4x4 patches, D = 4, 2 heads, I = 8, merge 2 -> 2x2 merged; window 28 px -> 1 merged
    # token (4 patches) per window; block 0 windowed, block 1 full.
    shape = VisionShape(hidden_size=4, intermediate_size=8, num_heads=2, depth=2, out_hidden_size=6,
                        window_size=28, fullatt_block_indexes=(1,))
    p = 16
    embed = 2 * p * (3 * 2 * 14 * 14) * 4
    linear = 2 * p * 4 * 12 + 2 * p * 4 * 4 + 3 * 2 * p * 4 * 8  # qkv, proj, mlp per block
    windowed = 2 * 2 * 4 * (4 * 4**2)  # 4 windows of 4 patches: 64 pairs; 2 heads * d 2 = 4
    full = 2 * 2 * 4 * 16**2
    merger = 2 * 4 * 16 * 16 + 2 * 4 * 16 * 6
    assert vision_encoder_flops(shape, [(1, 4, 4)]).vision == embed + 2 * linear + windowed + full + merger


def test_seven_b_scale_is_plausible():
    # 7B LLM, ~7.6e9 parameters in the layers: about 2 * params FLOPs per token, plus attention
    per_token = llm_prefill_flops(QWEN25_VL_7B_TEXT, [1] * 28, lm_head_tokens=0).total
    assert 2 * 6.4e9 < per_token < 2 * 7.2e9
    assert vision_encoder_flops(QWEN25_VL_7B_VISION, [(8, 24, 24)]).total > 0


# ----------------------------------------------------------------------------- against the model
@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def tiny(request):
    family = family_for_type(request.param)
    model = family.build_tiny(attn_implementation="eager")
    processor = build_processor(processor_class=family.processor_class)
    frames = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    meta = [{"total_num_frames": 8, "fps": 2.0, "frames_indices": list(range(8))}]
    inputs = dict(processor(text=[prompt], videos=[frames], video_metadata=meta, do_sample_frames=False,
                            return_tensors="pt"))
    return model, inputs


def counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_llm_and_vision_match_torch_flop_counter(tiny):
    model, inputs = tiny
    shape = TextShape.from_config(model.config)
    length = inputs["input_ids"].shape[1]
    embeds = torch.randn(1, length, shape.hidden_size)
    position_ids = prefill_position_ids(model, inputs)
    llm = counted(lambda: model.model.language_model(inputs_embeds=embeds, position_ids=position_ids))
    assert llm == llm_prefill_flops(shape, [length] * shape.num_layers, causal=False, lm_head_tokens=0).total
    grid = inputs["video_grid_thw"]
    vision = counted(lambda: model.model.visual(inputs["pixel_values_videos"], grid_thw=grid))
    assert vision == vision_encoder_flops(family_of(model).vision_shape(model.config), grid.tolist()).total


@pytest.mark.parametrize("k", [0, 2])
def test_pruned_prefill_matches_torch_flop_counter(tiny, k):
    """The patched prefill (eager): layers 0..K on all tokens, the score, K+1.. on the kept ones."""
    model, inputs = tiny
    shape = TextShape.from_config(model.config)
    handle = apply_prunevid(model, Stage1Config(), Stage2Config(enabled=True, pruning_layer=k, keep_ratio=0.4))
    try:
        position_ids = prefill_position_ids(model, inputs)
        total = counted(lambda: model(**inputs, position_ids=position_ids, logits_to_keep=1))
    finally:
        handle.remove()
    st = handle.state
    length = inputs["input_ids"].shape[1]
    rows = length - st.query_start
    expected = llm_prefill_flops(
        shape,
        tokens_per_layer(shape.num_layers, length, k, st.keep_index.numel()),
        causal=False,
        scoring=prunevid_scoring_flops(shape, rows, length),
    ) + vision_encoder_flops(family_of(model).vision_shape(model.config), inputs["video_grid_thw"].tolist())
    assert total == expected.total


@pytest.mark.parametrize("pipe_fixture", ["tiny_pipe", "tiny_qwen2vl_pipe"])
def test_run_record_carries_flops_and_ideal_speedup(request, pipe_fixture, frames8):
    """The record's analytic FLOPs are the run's own token counts put through flops.py: the
    baseline is its own reference (speed-up 1), the pruned run is cheaper by its dropped tokens."""
    pipe = request.getfixturevalue(pipe_fixture)
    prepared = pipe.prepare(frames8, "What happens?")
    base = pipe.run(prepared, **{"generation.max_new_tokens": 1})
    assert base.prefill_flops == base.prefill_flops_baseline and base.ideal_speedup == 1.0
    r = pipe.run(prepared, **{"stage2.enabled": True, "pruning_layer": 1, "keep_ratio": 0.4, "generation.max_new_tokens": 1})
    model = pipe.model
    shape = TextShape.from_config(model.config)
    ids = prepared.inputs["input_ids"][0]
    rows = ids.numel() - int(torch.nonzero(ids == model.config.vision_end_token_id)[-1])  # <|vision_end|> on
    vision = vision_encoder_flops(family_of(model).vision_shape(model.config), r.video_grid_thw)
    llm = llm_prefill_flops(shape, tokens_per_layer(shape.num_layers, r.prompt_tokens, 1,
                                                    r.prompt_tokens - (r.stage2_tokens_before - r.stage2_tokens_after)),
                            scoring=prunevid_scoring_flops(shape, rows, r.prompt_tokens))
    assert r.prefill_flops == (llm + vision).total and r.prefill_flops_baseline == base.prefill_flops
    assert r.ideal_speedup == pytest.approx(base.prefill_flops / r.prefill_flops) and r.ideal_speedup > 1
