"""Qwen3-VL (dense and MoE) on its tiny models: per-step placeholder runs, q/k after QK-norm,
and DeepStack owned by the patch so that it follows every reduction.

Each method's run is checked against the package's cache-free, layer-by-layer reference
(``verify.reference``, the one ``prunevid verify`` uses) that adds the DeepStack levels by hand (taken from the tower itself, averaged over each merged row's members),
at K = 0, D-1, D and later (D = 2 DeepStack levels on 4 layers); the same reference without
DeepStack must differ, so the check can fail. All float32 on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.errors import PruneVidError
from prunevid_bench.families import family_of
from prunevid_bench.models.tiny import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID
from prunevid_bench.pipeline import _with_overrides, load_pipeline
from prunevid_bench.verify.reference import cache_free_logits, deepstack_inputs
from tests.test_stage2 import Traced

MODELS = ("tiny-qwen3vl", "tiny-qwen3vl-moe")
QUESTION = "What is happening in this video?"
MAX_NEW = 4
LEVELS, N_LAYERS = 2, 4


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


def run_traced(pipe, prepared, **overrides) -> Traced:
    """``pipe.run`` with the language model's input (after the patch's pre-hook) and every
    step's logits recorded."""
    cfg = _with_overrides(pipe.config.to_dict(), overrides)
    handle = pipe._apply_stages(cfg)
    seen, logits = {}, []

    def on_llm_input(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] > 1:
            seen["embeds"] = kwargs["inputs_embeds"].detach().clone()
            seen["position_ids"] = kwargs["position_ids"].clone()

    lm = pipe.model.model.language_model
    hooks = [lm.register_forward_pre_hook(on_llm_input, with_kwargs=True),
             pipe.model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[0, -1].detach().clone()))]
    try:
        result = pipe.run(prepared, config=cfg)
    finally:
        for h in hooks:
            h.remove()
    return Traced(result, handle.state if handle is not None else None, torch.stack(logits).float(),
                  seen["embeds"], seen["position_ids"])


def deepstack_rows(pipe, prepared, st, merge: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(LLM-input rows of the visual tokens, each level there), from the towers themselves: a
    row's level is the mean of its members' own levels (``merge``) or its representative's
    (the package's reference, ``verify.reference.deepstack_inputs``)."""
    return deepstack_inputs(pipe, prepared, st, "merge" if merge else "representative")


def reference(model, traced: Traced, prepared, rows, levels, k: int, keep_index, decode_sees_dropped=False,
              deepstack=True) -> torch.Tensor:
    """Logits behind the generated tokens, each recomputed with no cache by the package's
    reference (``verify.reference.cache_free_logits``): layers 0..k on the LLM input (level i
    added after layer i at ``rows``), then only ``keep_index`` and the generated tokens through
    the later layers (the levels still due added at the kept rows' new places)."""
    first = prefill_position_ids(model, prepared.inputs)[1:, :, -1:] + 1
    return cache_free_logits(model, traced.embeds, traced.position_ids[1:], keep_index, k,
                             traced.result.generated_token_ids, first, decode_sees_dropped=decode_sees_dropped,
                             deepstack=(rows, levels) if deepstack else None)


CASES = [  # (overrides, K of the reference or None: no LLM-layer method)
    ({"stage2.enabled": True, "stage2.pruning_layer": 0, "stage2.keep_ratio": 0.4}, 0),
    ({"stage2.enabled": True, "stage2.pruning_layer": LEVELS - 1, "stage2.keep_ratio": 0.4}, LEVELS - 1),
    ({"stage2.enabled": True, "stage2.pruning_layer": LEVELS, "stage2.keep_ratio": 0.4}, LEVELS),
    ({"stage2.enabled": True, "stage2.pruning_layer": 3, "stage2.keep_ratio": 0.4, "stage2.score": "attention"}, 3),
    ({"fastv.enabled": True, "fastv.pruning_layer": 1, "fastv.keep_ratio": 0.5}, 0),
    ({"fastv.enabled": True, "fastv.pruning_layer": 2, "fastv.keep_ratio": 0.5}, 1),
    ({"random.enabled": True, "random.pruning_layer": 1, "random.keep_ratio": 0.5}, 1),
    ({"stage1.enabled": True, "stage1.cluster_ratio": 0.5, "stage1.tau": 0.8, "stage1.min_cluster_tokens": 4}, None),
    ({"stage1.enabled": True, "stage1.cluster_ratio": 0.5, "stage1.tau": 0.8, "stage1.min_cluster_tokens": 4,
      "stage2.enabled": True, "stage2.pruning_layer": 0, "stage2.keep_ratio": 0.5}, 0),
    ({"tome.enabled": True, "tome.budget": 0.5}, None),
    ({"evs.enabled": True, "evs.video_pruning_rate": 0.5, "evs.positions": "original"}, None),
    ({"vidcom2.enabled": True, "vidcom2.retention_ratio": 0.3}, None),
    ({"visionzip.enabled": True, "visionzip.score": "attention"}, None),
    ({"fastvid.enabled": True, "fastvid.dyseg_c": 2}, None),
    ({"flashvid.enabled": True}, None),
    ({"flashvid.enabled": True, "flashvid_llm.enabled": True, "flashvid_llm.pruning_layer": 2}, 1),
    ({"holitom.enabled": True, "holitom.retain_ratio": 0.3}, None),
]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("overrides,k", CASES)
def test_every_method_equals_the_reference_with_deepstack(pipes, impl, overrides, k):
    pipe, prepared = pipes[impl]
    traced = run_traced(pipe, prepared, **overrides)
    st = traced.state
    rows, levels = deepstack_rows(pipe, prepared, st)
    keep = st.keep_index if k is not None else torch.arange(traced.embeds.shape[1])
    k_ref = k if k is not None else N_LAYERS - 1
    sees = k is not None and not st.compacted
    ref = reference(pipe.model, traced, prepared, rows, levels, k_ref, keep, decode_sees_dropped=sees)
    assert min(st.tokens_after, st.tokens_after_visual) < st.tokens_in_prompt  # something was removed
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    without = reference(pipe.model, traced, prepared, rows, levels, k_ref, keep, decode_sees_dropped=sees, deepstack=False)
    assert (without - traced.logits).abs().max() > 1e-3  # the check is sensitive to DeepStack


def test_representative_mode_takes_the_representatives_levels(pipes):
    pipe, prepared = pipes["sdpa"]
    over = {"tome.enabled": True, "tome.budget": 0.5}
    merged = run_traced(pipe, prepared, **over)
    rep = run_traced(pipe, prepared, **over, **{"model.deepstack": "representative"})
    rows, levels = deepstack_rows(pipe, prepared, rep.state, merge=False)
    keep = torch.arange(rep.embeds.shape[1])
    ref = reference(pipe.model, rep, prepared, rows, levels, N_LAYERS - 1, keep)
    torch.testing.assert_close(rep.logits, ref, rtol=0, atol=1e-4)
    assert (rep.logits - merged.logits).abs().max() > 1e-4


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_methods_off_and_keep_all_equal_vanilla_generate(pipes, impl):
    pipe, prepared = pipes[impl]
    base = run_traced(pipe, prepared)
    with torch.no_grad():
        ids = pipe.model.generate(**prepared.inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert base.result.generated_token_ids == ids[0, prepared.inputs["input_ids"].shape[1]:].tolist()
    keep_all = run_traced(pipe, prepared, **{"stage2.enabled": True, "stage2.pruning_layer": 0, "stage2.keep_ratio": 1.0})
    assert keep_all.state.deepstack is not None  # the patch added DeepStack itself
    torch.testing.assert_close(keep_all.logits, base.logits, rtol=0, atol=1e-5)
    assert keep_all.result.generated_token_ids == base.result.generated_token_ids


@pytest.mark.parametrize("mode", ["attention", "last_token"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_stage2_scores_equal_eager_attention_weights(pipes, k, mode):
    """Scores from q/k after QK-norm are rows of layer K's own (rotary, causal) attention:
    ``attention`` max over heads then over the question rows, ``last_token`` the last row
    averaged over heads."""
    pipe, prepared = pipes["eager"]
    traced = run_traced(pipe, prepared, **{"stage2.enabled": True, "stage2.pruning_layer": k, "stage2.keep_ratio": 0.5,
                                          "stage2.score": mode})
    st = traced.state
    pipe.remove_stages()
    weights = {}
    layer = pipe.model.model.language_model.layers[k].self_attn
    hook = layer.register_forward_hook(lambda m, a, out: weights.update(w=out[1]))
    try:
        with torch.no_grad():
            pipe.model(**prepared.inputs, output_attentions=True)
    finally:
        hook.remove()
    w = weights["w"][0].float()  # [H, L, L]: vanilla transformers, DeepStack its own
    visual = st.visual_positions
    if mode == "attention":
        expected = w[:, st.query_start :][:, :, visual].amax(dim=0).amax(dim=0)
    else:
        expected = w[:, -1, visual].mean(dim=0)
    torch.testing.assert_close(st.scores.float(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [c for c, _ in CASES[::3]])
def test_only_video_placeholders_are_removed(pipes, overrides):
    """Timestamps and markers are text: never removed; a frame emptied of its tokens keeps them."""
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **overrides)
    st = traced.state
    ids = prepared.inputs["input_ids"][0]
    kept = st.source_index if st.keep_index is None else st.source_index[st.keep_index]
    gone = torch.ones(ids.numel(), dtype=torch.bool)
    gone[kept] = False
    assert bool((ids[gone] == VIDEO_PAD_ID).all()) and int(gone.sum()) > 0
    for marker in (VISION_START_ID, VISION_END_ID):
        assert int((ids[kept] == marker).sum()) == int((ids == marker).sum()) == 4
    # the record's kept tokens per frame (--save-kept) are the pads each step's run still holds
    from prunevid_bench.kept import kept_record

    (video,) = list(kept_record(pipe._handle).values())[-1]
    recorded = [sum(1 for t, _, _ in video["kept"] if t == step) for step in range(4)]
    runs = family_of(pipe.model).video_runs(pipe.model, ids, prepared.inputs["video_grid_thw"].tolist())[0]
    in_prompt = [int(((kept >= s) & (kept < e)).sum()) for s, e in runs]
    assert recorded == in_prompt and sum(recorded) == min(st.tokens_after, st.tokens_after_visual)


def test_an_emptied_frame_keeps_its_timestamp_and_markers(pipes):
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **{"vidcom2.enabled": True, "vidcom2.retention_ratio": 0.02})
    st = traced.state
    ids = prepared.inputs["input_ids"][0]
    text = ids[st.source_index][ids[st.source_index] != VIDEO_PAD_ID]
    assert torch.equal(text, ids[ids != VIDEO_PAD_ID])  # every timestamp and marker is still there


def test_a_wrong_layout_is_refused(pipes):
    pipe, prepared = pipes["sdpa"]
    ids = prepared.inputs["input_ids"][0].clone()
    first_end = int(torch.nonzero(ids == VISION_END_ID)[0])
    ids[first_end] = VIDEO_PAD_ID  # two steps' runs no longer split as the grid says
    with pytest.raises(PruneVidError, match="placeholder runs"):
        family_of(pipe.model).video_runs(pipe.model, ids, prepared.inputs["video_grid_thw"].tolist())


def test_vision_space_and_vllm_positions_are_refused_in_one_line(pipes):
    pipe, prepared = pipes["sdpa"]
    for over in ({"stage1.enabled": True, "stage1.space": "vision"},
                 {"evs.enabled": True, "evs.positions": "vllm"}):
        with pytest.raises(PruneVidError) as err:
            run_traced(pipe, prepared, **over)
        assert "\n" not in str(err.value)
    pipe.remove_stages()


@torch.no_grad()
@pytest.mark.parametrize("mode", ["merge", "representative"])
def test_a_layer_merge_below_the_last_deepstack_layer_merges_the_levels(pipes, mode):
    """merge_nearest at K = 0 < D-1: after layer 0 every merged row is the mean of its members
    (hidden states), and level 1 is added at the merged rows as the mean of their members'
    levels (``representative``: the kept row's own). Prefill logits against a by-hand forward."""
    pipe, prepared = pipes["sdpa"]
    traced = run_traced(pipe, prepared, **{"merge_nearest.enabled": True, "merge_nearest.pruning_layer": 0,
                                          "merge_nearest.keep_ratio": 0.4, "model.deepstack": mode})
    st = traced.state
    lm, x = pipe.model.model.language_model, traced.embeds
    n = x.shape[1]
    dest = torch.full((n,), -1, dtype=torch.long)
    dest[st.keep_index] = torch.arange(st.keep_index.numel())
    kept_rows = st.visual_positions[st.kept_visual]
    into = st.merged_into
    dest[st.visual_positions[into >= 0]] = dest[kept_rows[into[into >= 0]]]
    assert int((dest >= 0).sum()) > st.keep_index.numel()  # rows were merged, not only dropped
    members = torch.nn.functional.one_hot(dest.clamp(min=0), st.keep_index.numel()).float()
    members[dest < 0] = 0
    rows, levels = deepstack_rows(pipe, prepared, st)
    outs = []
    for deepstack in (True, False):
        pos = traced.position_ids[1:]
        h = lm.layers[0](x, attention_mask=None, position_embeddings=lm.rotary_emb(x, pos), position_ids=None).clone()
        if deepstack:
            h[0, rows] += levels[0]
        h = ((members.T @ h[0]) / members.sum(0)[:, None])[None]
        pos = pos[..., st.keep_index]
        level = torch.zeros(n, levels[1].shape[-1])
        level[rows] = levels[1]
        if mode == "merge":
            is_ds = torch.zeros(n, dtype=torch.bool)
            is_ds[rows] = True
            weight = members * is_ds[:, None]
            later = (weight.T @ level) / weight.sum(0).clamp(min=1)[:, None]
        else:
            later = level[st.keep_index]
        for i, layer in enumerate(lm.layers[1:], start=1):
            h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos), position_ids=None).clone()
            if deepstack and i == 1:
                h[0] += later
        outs.append(pipe.model.lm_head(lm.norm(h[:, -1]))[0].float())
    torch.testing.assert_close(traced.logits[0], outs[0], rtol=0, atol=1e-4)
    assert (traced.logits[0] - outs[1]).abs().max() > 1e-3


def test_cli_runs_a_saved_qwen3vl_checkpoint_with_the_default_preset(clip8, tmp_path):
    """``prunevid run clip.mp4 "q" --model <dir> --preset default`` on a Qwen3-VL saved with
    ``save_pretrained``: the model, its processor and the record's DeepStack mode."""
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app
    from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_processor, build_tiny_qwen3vl_model

    folder = tmp_path / "qwen3vl"
    build_tiny_qwen3vl_model().save_pretrained(folder)
    build_qwen3vl_processor().save_pretrained(folder)
    args = ["run", clip8, "What moves?", "--model", folder, "--preset", "default", "--num-frames", "8",
            "--max-new-tokens", "3", "--device", "cpu", "--results-dir", tmp_path / "out"]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["model_family"] == "qwen3_vl"
    assert result["visual_tokens"] > result["tokens_after_visual_methods"] > result["visual_tokens_kept"] > 0
    assert json.loads((run_dir / "config.json").read_text())["config"]["model"]["deepstack"] == "merge"


def test_a_stream_on_qwen3vl_equals_offline_through_the_cli(clip8, tmp_path):
    """Each chunk's steps written with their timestamps, its DeepStack levels added: the streamed
    answer is the offline run's (tests/test_streaming_qwen3.py checks the pieces)."""
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    args = ["stream", clip8, "--model", "tiny-qwen3vl", "--chunk-frames", "4", "--ask", "1.9:What moves?",
            "--compare-offline", "--max-new-tokens", "4", "--dtype", "float32", "--device", "cpu",
            "--results-dir", tmp_path, "--label", "s"]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    (r,) = [json.loads(line) for line in (tmp_path / "s" / "questions.jsonl").read_text().splitlines()]
    assert r["offline_agrees"] and r["offline_max_logit_diff"] <= 1e-4 and r["visual_tokens"] > 0


def test_a_feature_cache_hit_equals_a_miss_with_the_deepstack_levels_stored(pipes, clip8, tmp_path):
    from prunevid_bench.feature_cache import FeatureCache

    pipe, _ = pipes["sdpa"]
    settings = {"stage1.enabled": True, "stage1.min_cluster_tokens": 4, "stage2.enabled": True,
                "stage2.pruning_layer": 0, "stage2.keep_ratio": 0.5, "video.num_frames": 8}
    pipe.feature_cache = None
    expected = pipe.run(str(clip8), QUESTION, **settings)
    tower = []
    hook = pipe.model.model.visual.register_forward_hook(lambda *_: tower.append(1))
    try:
        results = []
        for _ in range(2):
            pipe.feature_cache = FeatureCache(0, tmp_path / "features")  # disk only: a new process
            results.append((pipe.run(str(clip8), QUESTION, **settings), dict(pipe.feature_cache.stats)))
    finally:
        hook.remove()
        pipe.feature_cache = None
    (miss, miss_stats), (hit, hit_stats) = results
    assert (miss_stats["misses"], hit_stats["disk_hits"], len(tower), hit.vision_cached) == (1, 1, 1, True)
    for result in (miss, hit):
        assert result.generated_token_ids == expected.generated_token_ids
        torch.testing.assert_close(result.first_token_logits, expected.first_token_logits, rtol=0, atol=0)


def test_timestamps_are_the_steps_true_times_in_the_file(pipes, tmp_path):
    """The processor gets the source's fps and the sampled frames' source indices: 8 of 16 frames
    at 4 fps are frames 1, 3, ..., 15, so step i reads the mean of its two frames' times."""
    import re

    from tests.conftest import write_clip

    pipe, _ = pipes["sdpa"]
    clip = write_clip(tmp_path / "clip16.mp4", 16, fps=4, seed=2)
    prepared = pipe._prepare(str(clip), QUESTION, _with_overrides(pipe.config.to_dict(), {"video.num_frames": 8}), None)
    indices = prepared.clips[0].indices
    expected = [f"<{(a + b) / 2 / 4:.1f} seconds>" for a, b in zip(indices[0::2], indices[1::2])]
    text = pipe.processor.tokenizer.decode(prepared.inputs["input_ids"][0])
    assert indices[0] > 0 and re.findall(r"<[0-9.]+ seconds>", text) == expected


def all_levels(pipe, prepared, st) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(LLM-input rows, levels) of every video's tokens (each row the mean of its members' levels)
    and every image's tokens (untouched), from the towers themselves."""
    return deepstack_inputs(pipe, prepared, st, "merge")


@pytest.fixture(scope="module")
def two_videos_and_an_image(pipes):
    pipe, _ = pipes["sdpa"]
    rng = np.random.default_rng(3)
    messages = [{"role": "user", "content": [
        {"type": "video", "video": frames(), "fps": 2},
        {"type": "image", "image": rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)},
        {"type": "video", "video": rng.integers(0, 256, (4, 96, 128, 3), dtype=np.uint8), "fps": 2},
        {"type": "text", "text": QUESTION}]}]
    return pipe, pipe.prepare(messages=messages)


@pytest.mark.parametrize("overrides,k", [*CASES, ({}, None)])
def test_two_videos_and_an_image_through_every_method(two_videos_and_an_image, overrides, k):
    """Each video reduced on its own, the image's tokens and DeepStack levels untouched: every
    method (and none, the patch still adding DeepStack) ≡ the by-hand reference."""
    pipe, prepared = two_videos_and_an_image
    over = overrides or {"stage2.enabled": True, "stage2.pruning_layer": 0, "stage2.keep_ratio": 1.0}
    traced = run_traced(pipe, prepared, **over)
    st = traced.state
    assert len(st.videos) == 2 and int((prepared.inputs["input_ids"] == IMAGE_PAD_ID).sum()) > 0
    rows, levels = all_levels(pipe, prepared, st)
    keep = st.keep_index if k is not None else torch.arange(traced.embeds.shape[1])
    ref = reference(pipe.model, traced, prepared, rows, levels, k if k is not None else N_LAYERS - 1, keep,
                    decode_sees_dropped=k is not None and not st.compacted)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    kept = st.source_index if st.keep_index is None else st.source_index[st.keep_index]
    ids = prepared.inputs["input_ids"][0]
    gone = torch.ones(ids.numel(), dtype=torch.bool)
    gone[kept] = False
    assert bool((ids[gone] == VIDEO_PAD_ID).all()) and (int(gone.sum()) > 0) == bool(overrides)


@pytest.mark.parametrize("element", [{"nframes": 8}, {"nframes": 16}, {"fps": 2.0}], ids=str)
def test_qwen_policy_equals_qwen_vl_utils_for_qwen3(pipes, tmp_path, element):
    """The ``qwen`` policy on a Qwen3-VL: frame indices, sizes and pixels as qwen-vl-utils 0.0.14's
    ``fetch_video(image_patch_size=16)``, and the prompt ids (timestamps included) and pixels as
    its output through the processor with its own metadata."""
    from prunevid_bench.decoders import installed

    if not any(installed(name) for name in ("decord", "torchcodec")):
        pytest.skip("qwen-vl-utils needs decord or torchcodec to read videos (optional extras here)")
    vision_process = pytest.importorskip("qwen_vl_utils.vision_process")
    from tests.conftest import write_clip

    pipe, _ = pipes["sdpa"]
    clip = write_clip(tmp_path / "wide.mp4", 48, size=(360, 640), fps=8, seed=3)
    cfg = _with_overrides(pipe.config.to_dict(), {"video.policy": "qwen", "video.num_frames": element.get("nframes"),
                                                 "video.fps": element.get("fps")})
    ours = pipe._prepare(str(clip), QUESTION, cfg, None)
    (video, meta), _ = vision_process.fetch_video({"video": str(clip), **element}, image_patch_size=16,
                                                  return_video_sample_fps=True, return_video_metadata=True)
    assert ours.clips[0].indices == list(meta["frames_indices"])
    assert torch.equal(torch.from_numpy(ours.clips[0].frames).permute(0, 3, 1, 2).float(), video)
    meta = {k: meta[k] for k in ("fps", "frames_indices", "total_num_frames")}
    theirs = pipe.processor(text=[ours.prompt], videos=[video], video_metadata=[meta], do_resize=False,
                            do_sample_frames=False, return_tensors="pt")
    assert torch.equal(ours.inputs["input_ids"], theirs["input_ids"])
    assert torch.equal(ours.inputs["pixel_values_videos"], theirs["pixel_values_videos"])


LMMS_QWEN3_VL = {"min_pixels": 256 * 28 * 28, "max_pixels": 1605632}  # lmms-eval 0.7.3 qwen3_vl defaults


@pytest.mark.parametrize("run, element", [
    ({}, {"nframes": 32, **LMMS_QWEN3_VL}),
    ({"video.fps": 8.0}, {"fps": 8.0, "max_frames": 32, **LMMS_QWEN3_VL}),
    ({"video.total_pixels": 1_000_000}, {"max_frames": 32, "total_pixels": 1_000_000, "min_pixels": 256 * 28 * 28}),
], ids=["defaults", "fps", "total_pixels"])
def test_lmms_eval_policy_equals_what_lmms_evals_qwen3_vl_asks_of_qwen_vl_utils(tmp_path, monkeypatch, run, element):
    """lmms-eval 0.7.3's ``qwen3_vl`` model (``_build_video_kwargs``) passes qwen-vl-utils
    ``nframes`` min(32, frames in the file), ``min_pixels`` 256*28*28 and ``max_pixels`` 1605632
    with ``image_patch_size=16``; with ``fps`` set, ``max_frames`` 32 instead of a count; with
    ``total_pixels`` set, ``max_frames`` 32 at qwen-vl-utils' own 2 fps, and no ``max_pixels``.
    The ``lmms-eval`` policy on a Qwen3-VL gives the same frames, and through the processor (with
    qwen-vl-utils' metadata, as lmms-eval calls it) the same prompt ids and pixels. A 13-frame file
    asks for 13, which qwen-vl-utils rounds to 12, as the policy does."""
    from prunevid_bench.decoders import installed
    from prunevid_bench.video import load_clip
    from tests.conftest import write_clip

    reader = next((name for name in ("decord", "torchcodec") if installed(name)), None)
    if reader is None:
        pytest.skip("qwen-vl-utils needs decord or torchcodec to read videos (optional extras here)")
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", reader)
    vision_process = pytest.importorskip("qwen_vl_utils.vision_process")
    pipe = load_pipeline("tiny-qwen3vl", device="cpu", dtype="float32", overrides={"video.policy": "lmms-eval", **run})
    request = pipe.video_request()
    assert (request.max_frames, request.factor) == (32, 32)
    assert request.fps == (2.0 if "video.total_pixels" in run else run.get("video.fps"))
    for size, frames in (((360, 640), 48), ((48, 64), 13)):
        clip_path = write_clip(tmp_path / f"c{frames}.mp4", frames, size=size, fps=8, seed=3)
        ours = load_clip(clip_path, request=request)
        asked = {**element, "nframes": min(32, frames)} if "nframes" in element else element
        (video, meta), fps = vision_process.fetch_video({"video": str(clip_path), **asked}, image_patch_size=16,
                                                        return_video_sample_fps=True, return_video_metadata=True)
        assert ours.indices == list(meta["frames_indices"]) and ours.sampled_fps == pytest.approx(fps, rel=1e-12)
        assert torch.equal(torch.from_numpy(ours.frames).permute(0, 3, 1, 2).float(), video)
        prepared = pipe.prepare(ours, QUESTION)
        meta = {k: meta[k] for k in ("fps", "frames_indices", "total_num_frames")}
        theirs = pipe.processor(text=[prepared.prompt], videos=[video], video_metadata=[meta], do_resize=False,
                                do_sample_frames=False, return_tensors="pt")
        assert torch.equal(prepared.inputs["input_ids"], theirs["input_ids"])
        assert torch.equal(prepared.inputs["pixel_values_videos"], theirs["pixel_values_videos"])
    pipe.remove_stages()


def test_vision_flops_are_the_towers_own_count_with_its_deepstack_mergers():
    """The analytic FLOPs of Qwen3-VL's tower (per-step full attention, a 2-matmul MLP, 1 + D
    mergers per token) equal torch's count of the tower's own forward (eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    from prunevid_bench.flops import TextShape, vision_encoder_flops
    from prunevid_bench.models.tiny_qwen3vl import build_tiny_qwen3vl_model

    model = build_tiny_qwen3vl_model(attn_implementation="eager")
    grid = torch.tensor([[4, 8, 12], [2, 4, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 16 * 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.visual(pixels, grid_thw=grid)
    shape = family_of(model).vision_shape(model.config)
    assert shape.mergers == 1 + LEVELS
    assert vision_encoder_flops(shape, grid.tolist()).vision == counter.get_total_flops()
    moe = build_tiny_qwen3vl_model(moe=True).config.get_text_config()
    assert TextShape.from_config(moe).intermediate_size == moe.num_experts_per_tok * moe.moe_intermediate_size


def test_qwen_numbering_is_transformers_own_on_qwen3(pipes):
    """Each temporal step is its own segment whose text after it starts at its largest id + 1, in
    transformers already: ``model.mrope: qwen`` changes nothing on this family."""
    pipe, prepared = pipes["sdpa"]
    base = run_traced(pipe, prepared)
    qwen = run_traced(pipe, prepared, **{"model.mrope": "qwen"})
    assert torch.equal(qwen.position_ids, base.position_ids)
    assert qwen.result.generated_token_ids == base.result.generated_token_ids


def test_a_bad_deepstack_mode_is_a_one_line_error(clip8, tmp_path):
    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    args = ["run", clip8, "Q", "--model", "tiny-qwen3vl", "--set", "model.deepstack=mean", "--results-dir", tmp_path]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 2 and "model.deepstack must be merge or representative" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("overrides", [
    {"tome.enabled": True, "tome.budget": 1.0},
    {"evs.enabled": True, "evs.video_pruning_rate": 0.0, "evs.positions": "original"},
    {"stage1.enabled": True, "stage1.tau": 1.0, "stage1.cluster_ratio": 1.0},
    {"random.enabled": True, "random.pruning_layer": 0, "random.keep_ratio": 1.0},
], ids=lambda o: next(iter(o)).split(".")[0])
def test_keep_everything_equals_vanilla_with_every_kind_of_method(pipes, overrides):
    """With nothing removed, the levels carried as extras (or followed after layer K) and added by
    the patch give vanilla's logits: the takeover changes no arithmetic."""
    pipe, prepared = pipes["eager"]
    base = run_traced(pipe, prepared)
    kept = run_traced(pipe, prepared, **overrides)
    assert kept.state.deepstack is not None and kept.embeds.shape == base.embeds.shape
    torch.testing.assert_close(kept.logits, base.logits, rtol=0, atol=1e-5)


def test_a_checkpoint_template_with_an_outer_wrapper_is_found_step_by_step():
    """Real Qwen3-VL templates write ``<|vision_start|><|video_pad|><|vision_end|>``; transformers
    5.24 keeps that outer wrapper around the expanded steps (5.25 drops it). The steps' runs are
    found all the same, and Stage 2 at K = 0 still removes pads only and equals the reference."""
    from prunevid_bench.config import build_config
    from prunevid_bench.models.loading import LoadedModel
    from prunevid_bench.models.tiny import CHAT_TEMPLATE
    from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_processor, build_tiny_qwen3vl_model
    from prunevid_bench.pipeline import Pipeline

    processor = build_qwen3vl_processor()
    processor.chat_template = CHAT_TEMPLATE
    pipe = Pipeline(LoadedModel(build_tiny_qwen3vl_model(), processor, "wrapped"),
                    build_config(overrides={"generation.max_new_tokens": MAX_NEW}))
    prepared = pipe.prepare(frames(), QUESTION)
    ids = prepared.inputs["input_ids"][0]
    assert int((ids == VISION_START_ID).sum()) in (4, 5)  # 5 on transformers 5.24
    traced = run_traced(pipe, prepared, **CASES[0][0])
    st = traced.state
    rows, levels = deepstack_rows(pipe, prepared, st)
    ref = reference(pipe.model, traced, prepared, rows, levels, 0, st.keep_index)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    gone = torch.ones(ids.numel(), dtype=torch.bool)
    gone[st.source_index[st.keep_index]] = False
    assert bool((ids[gone] == VIDEO_PAD_ID).all()) and int(gone.sum()) > 0
    pipe.remove_stages()
