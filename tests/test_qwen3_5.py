"""Qwen3.5 (dense and MoE) on its tiny models: a hybrid language model of 8 layers, 3 and 7 gated
full attention, the others Gated DeltaNet linear attention.

Every method's run equals the cache-free, layer-by-layer reference (``verify.reference``), in
which the linear layers 0..K run on the whole prompt and the generated tokens continue from that
state (what the model really does: a recurrent state cannot forget); a reference that drops the
tokens from the linear layers too gives other logits, so the check can fail. All float32, CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunevid_bench.errors import PruneVidError
from prunevid_bench.measure import cache_bytes, state_bytes
from prunevid_bench.models.tiny import VIDEO_PAD_ID
from prunevid_bench.pipeline import _with_overrides, load_pipeline
from prunevid_bench.verify.reference import reference_for, trace

MODELS = ("tiny-qwen3_5", "tiny-qwen3_5-moe")
QUESTION = "What is happening in this video?"
MAX_NEW = 4
FULL = (3, 7)  # the tiny models' full-attention layers


def frames() -> np.ndarray:
    out = np.random.default_rng(0).integers(0, 256, (8, 128, 128, 3), dtype=np.uint8)
    out[:, :32] = out[0, :32]  # a static strip: Stage 1 and EVS find static tokens
    return out


@pytest.fixture(scope="module", params=MODELS)
def pipes(request):
    out = {}
    for impl in ("sdpa", "eager"):
        pipe = load_pipeline(request.param, device="cpu", dtype="float32", attn_implementation=impl,
                             overrides={"generation.max_new_tokens": MAX_NEW})
        out[impl] = (pipe, pipe.prepare(frames(), QUESTION))
    yield out
    for pipe, _ in out.values():
        pipe.remove_stages()


def run_traced(pipe, prepared, **overrides):
    """The traced run, its hooks removed after it: the references run the bare layers."""
    traced = trace(pipe, prepared, _with_overrides(pipe.config.to_dict(), overrides))
    pipe.remove_stages()
    assert len(traced.logits) == traced.result.generated_tokens
    return traced


LAYER_CASES = [  # (overrides, the layer scored)
    ({"stage2.enabled": True, "stage2.pruning_layer": 3, "stage2.keep_ratio": 0.4}, 3),
    ({"stage2.enabled": True, "stage2.pruning_layer": "20/28", "stage2.keep_ratio": 0.4}, 3),  # 20/28 of 8 is 6
    ({"stage2.enabled": True, "stage2.pruning_layer": 7, "stage2.keep_ratio": 0.4, "stage2.score": "attention"}, 7),
    ({"fastv.enabled": True, "fastv.pruning_layer": 4, "fastv.keep_ratio": 0.5, "fastv.kv_cache": "compact"}, 3),
    ({"fastv.enabled": True, "fastv.pruning_layer": 4, "fastv.keep_ratio": 0.5, "fastv.kv_cache": "original"}, 3),
    ({"random.enabled": True, "random.pruning_layer": 3, "random.keep_ratio": 0.5}, 3),
    ({"flashvid.enabled": True, "flashvid_llm.enabled": True, "flashvid_llm.pruning_layer": 4}, 3),
    ({"stage1.enabled": True, "stage1.cluster_ratio": 0.5, "stage1.tau": 0.8, "stage1.min_cluster_tokens": 4,
      "stage2.enabled": True, "stage2.pruning_layer": 3, "stage2.keep_ratio": 0.5}, 3),
]
VISUAL_CASES = [
    {"stage1.enabled": True, "stage1.cluster_ratio": 0.5, "stage1.tau": 0.8, "stage1.min_cluster_tokens": 4},
    {"tome.enabled": True, "tome.budget": 0.5},
    {"tome.enabled": True, "tome.budget": 0.5, "tome.proportional_attention": True},
    {"evs.enabled": True, "evs.video_pruning_rate": 0.5, "evs.positions": "original"},
    {"vidcom2.enabled": True, "vidcom2.retention_ratio": 0.3},
    {"visionzip.enabled": True, "visionzip.score": "attention"},
    {"fastvid.enabled": True, "fastvid.dyseg_c": 2},
    {"flashvid.enabled": True},
    {"holitom.enabled": True, "holitom.retain_ratio": 0.3},
    {"dycoke.enabled": True, "dycoke.kv_prune": False},  # its decoding stage is refused on hybrids (below)
]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_methods_off_and_keep_all_equal_vanilla_generate(pipes, impl):
    pipe, prepared = pipes[impl]
    base = run_traced(pipe, prepared)
    with torch.no_grad():
        ids = pipe.model.generate(**prepared.inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert base.result.generated_token_ids == ids[0, prepared.inputs["input_ids"].shape[1]:].tolist()
    for over in ({"stage2.enabled": True, "stage2.pruning_layer": 3, "stage2.keep_ratio": 1.0},
                 {"tome.enabled": True, "tome.budget": 1.0}):
        keep_all = run_traced(pipe, prepared, **over)
        torch.testing.assert_close(keep_all.logits, base.logits, rtol=0, atol=1e-5)
        assert keep_all.result.generated_token_ids == base.result.generated_token_ids


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("overrides", VISUAL_CASES, ids=lambda o: "+".join(sorted(o))[:40])
def test_methods_before_the_llm_equal_the_reference(pipes, impl, overrides):
    """Every layer, linear and full, simply sees fewer tokens."""
    pipe, prepared = pipes[impl]
    traced = run_traced(pipe, prepared, **overrides)
    assert traced.state.tokens_after_visual < traced.state.tokens_in_prompt
    torch.testing.assert_close(traced.logits, reference_for(pipe, prepared, traced), rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("overrides,scored", LAYER_CASES, ids=lambda o: str(o)[:60] if isinstance(o, dict) else str(o))
def test_llm_layer_methods_equal_the_reference_with_the_linear_layers_whole(pipes, impl, overrides, scored):
    pipe, prepared = pipes[impl]
    traced = run_traced(pipe, prepared, **overrides)
    st, handle = traced.state, traced.handle
    assert handle.score_layer == scored and 0 < st.tokens_after < st.tokens_before
    ref = reference_for(pipe, prepared, traced)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    wrong = reference_for(pipe, prepared, traced, drop_from_linear=True)
    assert (wrong - traced.logits).abs().max() > 1e-3  # the linear layers' whole state matters


def test_the_record_keeps_the_layer_asked_for_and_the_memory_apart(pipes):
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **{"stage2.enabled": True, "stage2.pruning_layer": "20/28",
                                          "stage2.keep_ratio": 0.4})
    r = traced.result
    assert (r.pruning_layer_requested, r.pruning_layer, r.pruning_layer_spec) == (6, 3, "20/28")
    dropped = r.tokens_after_visual_methods - r.visual_tokens_kept
    assert (r.linear_layers_0_to_k, r.tokens_absorbed_by_linear_layers) == (3, dropped)
    assert r.absorbed_share == pytest.approx(dropped / r.llm_prefill_tokens, abs=1e-6)
    # bytes from the tensors' shapes: keys and values of the 2 full layers, conv + recurrent states of 6
    text = pipe.model.config.get_text_config()
    kept = r.llm_prefill_tokens - dropped
    kv_per_row = 2 * text.num_key_value_heads * text.head_dim * 4
    assert r.kv_cache_bytes == len(FULL) * kept * kv_per_row
    assert r.kv_cache_bytes_uncompressed == len(FULL) * r.llm_prefill_tokens * kv_per_row
    conv_dim = 2 * text.linear_num_key_heads * text.linear_key_head_dim + text.linear_num_value_heads * text.linear_value_head_dim
    conv = conv_dim * text.linear_conv_kernel_dim * 4
    recurrent = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim * 4
    assert r.recurrent_state_bytes == 6 * (conv + recurrent)
    data = r.to_dict()
    assert data["recurrent_state_bytes"] == r.recurrent_state_bytes and data["pruning_layer_requested"] == 6
    off = run_traced(pipe, prepared).result
    assert off.recurrent_state_bytes == r.recurrent_state_bytes and off.linear_layers_0_to_k is None


def test_state_bytes_read_the_cache_tensors(pipes):
    from transformers import DynamicCache

    pipe, prepared = pipes["sdpa"]
    cache = DynamicCache(config=pipe.model.config.get_text_config())
    with torch.no_grad():
        pipe.model(**prepared.inputs, cache=cache, use_cache=True)
    tensors = [t for layer in cache.layers for s in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {}))
               for t in s.values() if t is not None]
    assert len(tensors) == 12 and state_bytes(cache) == sum(t.numel() * t.element_size() for t in tensors)
    assert cache_bytes(cache) == sum(cache.layers[i].keys.nbytes + cache.layers[i].values.nbytes for i in FULL)


@pytest.mark.parametrize("spec,method,message", [
    (2, "stage2", "nearest K that scores a full-attention layer: 3"),
    (5, "stage2", "3 or 7"),
    (3, "fastv", "layer K-1 = 2, a linear-attention layer"),
])
def test_an_absolute_linear_layer_is_a_one_line_error(pipes, spec, method, message):
    pipe, prepared = pipes["sdpa"]
    over = {f"{method}.enabled": True, f"{method}.pruning_layer": spec}
    with pytest.raises(PruneVidError) as err:
        run_traced(pipe, prepared, **over)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["attention", "last_token"])
@pytest.mark.parametrize("k", FULL)
def test_stage2_scores_equal_eager_attention_weights(pipes, k, mode):
    """q at ``q_norm`` (the query half of the gated ``q_proj``), k at ``k_norm``, partial rotary:
    the scores are rows of the full-attention layer's own attention weights."""
    pipe, prepared = pipes["eager"]
    traced = run_traced(pipe, prepared, **{"stage2.enabled": True, "stage2.pruning_layer": k, "stage2.keep_ratio": 0.5,
                                          "stage2.score": mode})
    st = traced.state
    weights = {}
    attn = pipe.model.model.language_model.layers[k].self_attn
    hook = attn.register_forward_hook(lambda m, a, out: weights.update(w=out[1]))
    try:
        with torch.no_grad():
            pipe.model(**prepared.inputs, output_attentions=True)
    finally:
        hook.remove()
    w = weights["w"][0].float()
    visual = st.visual_positions
    if mode == "attention":
        expected = w[:, st.query_start :][:, :, visual].amax(dim=0).amax(dim=0)
    else:
        expected = w[:, -1, visual].mean(dim=0)
    torch.testing.assert_close(st.scores.float(), expected, rtol=0, atol=1e-5)


def test_only_video_placeholders_are_removed(pipes):
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **LAYER_CASES[-1][0])
    st = traced.state
    ids = prepared.inputs["input_ids"][0]
    gone = torch.ones(ids.numel(), dtype=torch.bool)
    gone[st.source_index[st.keep_index]] = False
    assert bool((ids[gone] == VIDEO_PAD_ID).all()) and int(gone.sum()) > 0


def test_cli_runs_a_saved_qwen3_5_checkpoint_with_the_default_preset(clip8, tmp_path):
    """``prunevid run clip.mp4 "q" --model <dir> --preset default`` on a Qwen3.5 saved with
    ``save_pretrained``: the default preset's relative layer lands on a full-attention layer."""
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app
    from prunevid_bench.models.tiny_qwen3_5 import build_tiny_qwen3_5_model
    from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_processor

    folder = tmp_path / "qwen3_5"
    build_tiny_qwen3_5_model().save_pretrained(folder)
    build_qwen3vl_processor().save_pretrained(folder)
    args = ["run", clip8, "What moves?", "--model", folder, "--preset", "default", "--num-frames", "8",
            "--max-new-tokens", "3", "--device", "cpu", "--results-dir", tmp_path / "out"]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["model_family"] == "qwen3_5"
    assert result["visual_tokens"] > result["tokens_after_visual_methods"] > result["visual_tokens_kept"] > 0
    assert result["pruning_layer"] in FULL and result["recurrent_state_bytes"] > 0


def test_a_stream_on_qwen3_5_equals_offline_and_says_what_eviction_spares(clip8, tmp_path):
    """An ask restores the recurrent states (tests/test_streaming_qwen3.py checks them bit for
    bit); a cache budget evicts from the full-attention layers only, and the run says so."""
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    base = ["stream", clip8, "--model", "tiny-qwen3_5", "--chunk-frames", "4", "--ask", "1.9:What moves?",
            "--ask", "3.9:What now?", "--max-new-tokens", "3", "--dtype", "float32", "--device", "cpu",
            "--results-dir", tmp_path]
    res = CliRunner().invoke(app, [str(a) for a in base + ["--compare-offline", "--label", "s"]])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "s" / "questions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["offline_agrees"] and r["offline_max_logit_diff"] <= 1e-4 for r in rows)
    assert all(r["recurrent_state_bytes"] > 0 and r["eviction_layers"] is None for r in rows)
    res = CliRunner().invoke(app, [str(a) for a in base + ["--cache-tokens", "20", "--label", "c"]])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["eviction_layers"] == list(FULL) and "recurrent states keep every token" in " ".join(res.output.split())
    res = CliRunner().invoke(app, [str(a) for a in base + ["--set", "stage2.enabled=true", "--set",
                                                            "stage2.pruning_layer=1", "--label", "r"]])
    assert res.exit_code == 2 and "a linear-attention layer" in res.output and "Traceback" not in res.output


def test_methods_show_says_how_the_layer_resolves_on_hybrid_models():
    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    for name in ("prunevid_stage2", "fastv"):
        res = CliRunner().invoke(app, ["methods", "show", name])
        assert res.exit_code == 0 and "on hybrid models (Qwen3.5)" in res.output
        assert "nearest full-attention layer at or below it" in " ".join(res.output.split())
    assert "on hybrid models" not in CliRunner().invoke(app, ["methods", "show", "tome"]).output


@pytest.mark.parametrize("n", [100, 128])
def test_hybrid_layer_flops_are_the_layers_own_count(n):
    """The analytic FLOPs of each layer (Gated DeltaNet: projections, the short conv, the chunked
    delta rule on the padded length; gated full attention) equal torch's count of the layer's own
    forward (eager, no mask: the full n x n product), less the two unit-triangular solves, which
    torch's counter does not count."""
    from torch.utils.flop_counter import FlopCounterMode

    from prunevid_bench.flops import TextShape, decoder_layer_flops
    from prunevid_bench.models.tiny_qwen3_5 import build_tiny_qwen3_5_model

    # No parameter needs a gradient: transformers 5.25 runs the short conv through a module that
    # takes a view of its weight, whose input torch's module tracker cannot hook under no_grad.
    model = build_tiny_qwen3_5_model(attn_implementation="eager").requires_grad_(False)
    lm = model.model.language_model
    shape = TextShape.from_config(model.config)
    assert shape.layer_types[3] == "full_attention" and shape.gated_attention and shape.linear_value_heads == 4
    x = torch.randn(1, n, shape.hidden_size)
    rotary = lm.rotary_emb(x, torch.arange(n).view(1, 1, -1).expand(3, 1, n))
    c, chunks = shape.chunk_size, -(-n // shape.chunk_size)
    solves = shape.linear_value_heads * chunks * c * (c - 1) * (shape.linear_key_dim + shape.linear_value_dim)
    for i, layer in enumerate(lm.layers):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            layer(x, position_embeddings=rotary, attention_mask=None)
        expected = decoder_layer_flops(shape, n, causal=False, layer=i).total
        assert expected - (solves if i not in FULL else 0) == counter.get_total_flops(), i
    moe = TextShape.from_config(build_tiny_qwen3_5_model(moe=True).config)
    text = build_tiny_qwen3_5_model(moe=True).config.get_text_config()
    assert moe.intermediate_size == text.num_experts_per_tok * text.moe_intermediate_size + text.shared_expert_intermediate_size


@pytest.mark.parametrize("impl,k", [("sdpa", 3), ("eager", 3), ("sdpa", 7)])
def test_a_merge_at_layer_k_equals_the_hybrid_reference(pipes, impl, k):
    """merge_nearest: the merge applies to the hidden states and the full-attention layers 0..K's
    keys and values; the linear layers 0..K keep every row in their states."""
    pipe, prepared = pipes[impl]
    traced = run_traced(pipe, prepared, **{"merge_nearest.enabled": True, "merge_nearest.pruning_layer": k,
                                          "merge_nearest.keep_ratio": 0.4})
    st = traced.state
    assert 0 < st.tokens_after < st.tokens_before and torch.bincount(st.merged_into[st.merged_into >= 0]).max() > 1
    ref = reference_for(pipe, prepared, traced)  # verify.merged.hybrid_merged_reference
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    dropped = reference_for(pipe, prepared, traced, merged=False)  # the same rows kept, nothing averaged
    assert (dropped - traced.logits).abs().max() > 1e-3


def test_lmms_eval_policy_equals_what_lmms_evals_qwen3_5_asks_of_qwen_vl_utils(tmp_path, monkeypatch):
    """lmms-eval 0.7.3's ``qwen3_5`` chat model passes qwen-vl-utils ``min_pixels`` 64*32*32,
    ``max_frames`` 768 and ``total_pixels`` 224*1024*32*32 (no frame count: its default 2 fps),
    with ``image_patch_size=16``; the ``lmms-eval`` policy on a Qwen3.5 gives the same frames."""
    from prunevid_bench.decoders import installed
    from prunevid_bench.video import load_clip
    from tests.conftest import write_clip

    reader = next((name for name in ("decord", "torchcodec") if installed(name)), None)
    if reader is None:
        pytest.skip("qwen-vl-utils needs decord or torchcodec to read videos (optional extras here)")
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", reader)
    vision_process = pytest.importorskip("qwen_vl_utils.vision_process")
    pipe = load_pipeline("tiny-qwen3_5", device="cpu", dtype="float32", overrides={"video.policy": "lmms-eval"})
    request = pipe.video_request()
    assert (request.fps, request.max_frames, request.min_pixels, request.factor) == (2.0, 768, 65536, 32)
    counted = pipe.video_request(_with_overrides(pipe.config.to_dict(), {"video.num_frames": 8}))
    assert counted.fps is None and counted.num_frames == 8  # a count the run sets wins over the rate
    for size, frames in (((360, 640), 48), ((48, 64), 13)):
        clip_path = write_clip(tmp_path / f"c{frames}.mp4", frames, size=size, fps=8, seed=3)
        ours = load_clip(clip_path, request=request)
        element = {"video": str(clip_path), "min_pixels": 64 * 32 * 32, "max_frames": 768,
                   "total_pixels": 224 * 1024 * 32 * 32}
        (video, meta), fps = vision_process.fetch_video(element, image_patch_size=16, return_video_sample_fps=True,
                                                        return_video_metadata=True)
        assert ours.indices == list(meta["frames_indices"]) and ours.sampled_fps == pytest.approx(fps, rel=1e-12)
        assert torch.equal(torch.from_numpy(ours.frames).permute(0, 3, 1, 2).float(), video)
    tiny = load_pipeline("tiny-qwen3vl", device="cpu", dtype="float32", overrides={"video.policy": "lmms-eval"})
    assert tiny.video_request().fps is None  # Qwen3-VL keeps qwen2_5_vl's defaults (32 frames)


@pytest.mark.parametrize("overrides", [LAYER_CASES[0][0], LAYER_CASES[4][0], VISUAL_CASES[1]], ids=["stage2", "fastv-original", "tome"])
def test_generate_with_the_patch_equals_the_engine(pipes, overrides):
    """``model.generate`` (its own position bookkeeping from the hybrid cache's first full-attention
    layer) gives the engine's tokens and logits."""
    from prunevid_bench.patch import apply_methods

    pipe, prepared = pipes["sdpa"]
    engine = run_traced(pipe, prepared, **overrides)
    handle = apply_methods(pipe.model, _with_overrides(pipe.config.to_dict(), overrides))
    try:
        with torch.no_grad():
            gen = pipe.model.generate(**prepared.inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
    finally:
        handle.remove()
    assert gen.sequences[0, prepared.inputs["input_ids"].shape[1]:].tolist() == engine.result.generated_token_ids
    torch.testing.assert_close(torch.cat(gen.logits).float(), engine.logits, rtol=0, atol=1e-5)


def test_vision_flops_are_the_towers_own_count():
    """Qwen3.5's tower (Qwen3-VL's, without DeepStack mergers): the analytic FLOPs equal torch's
    count of its forward (eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    from prunevid_bench.families import family_of
    from prunevid_bench.flops import vision_encoder_flops
    from prunevid_bench.models.tiny_qwen3_5 import build_tiny_qwen3_5_model

    model = build_tiny_qwen3_5_model(attn_implementation="eager")
    grid = torch.tensor([[4, 8, 12], [2, 4, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 16 * 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.visual(pixels, grid_thw=grid)
    shape = family_of(model).vision_shape(model.config)
    assert shape.mergers == 1 and vision_encoder_flops(shape, grid.tolist()).vision == counter.get_total_flops()


def test_dycokes_decoding_stage_is_refused_on_a_hybrid_in_one_line(pipes):
    """A linear layer folds every token into its state: a decoding step cannot leave one out."""
    pipe, prepared = pipes["sdpa"]
    with pytest.raises(PruneVidError, match="dycoke's decoding stage cannot run on qwen3_5.*dycoke.kv_prune=false"):
        run_traced(pipe, prepared, **{"dycoke.enabled": True})
    assert not pipe.model._forward_hooks and all(not m._forward_hooks and not m._forward_pre_hooks
                                                   for m in pipe.model.modules())  # nothing left installed



@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("overrides", [{}, LAYER_CASES[0][0], LAYER_CASES[3][0]], ids=["baseline", "stage2", "fastv"])
def test_a_chunked_prefill_equals_the_whole_one_the_linear_layers_running_whole(pipes, impl, overrides):
    """Only the full-attention layers run in chunks (patch.chunked): same logits, same kept tokens."""
    pipe, prepared = pipes[impl]
    whole = run_traced(pipe, prepared, **overrides)
    n = whole.result.prompt_tokens // 3 + 1  # does not divide the prompt; boundaries in the video
    chunked = run_traced(pipe, prepared, **overrides, **{"prefill.chunk_tokens": n})
    assert chunked.result.prefill_chunk_tokens == n
    assert chunked.result.generated_token_ids == whole.result.generated_token_ids
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=0, atol=1e-4)
    if overrides:
        assert torch.equal(chunked.state.kept_visual, whole.state.kept_visual)
        torch.testing.assert_close(chunked.logits, reference_for(pipe, prepared, chunked), rtol=0, atol=1e-4)
