"""PruneVid Stage 1 in the vision encoder's space (``stage1.space: vision``) on both tiny
families, float32 on the CPU: nothing merged equals the baseline token for token; the LLM input
equals a reference built here by hand from the merger's input (the 2x2 patch features of each
token, put back in raster order, merged by ``merge_video_tokens``, projected through the merger
once), and the run equals the cache-free layer-by-layer reference on it; the merger projects
only the merged tokens (FLOPs to the row); ``generate`` agrees; images pass untouched; the
feature cache is neither used nor filled; bad settings are one-line errors.

The video is test_stage2's: 4 temporal grid steps of 4x4 merged tokens. The tiny Qwen2.5-VL's
window is 2x2 merged tokens, so its tower hands the merger each frame window by window (the
order the test checks is not the identity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.families import family_of
from prunevid_bench.flops import merger_flops
from prunevid_bench.pipeline import load_pipeline
from prunevid_bench.stages.stage1 import merge_video_tokens
from tests.test_stage2 import MAX_NEW, N_FRAMES, N_LAYERS, N_VISUAL, PER_FRAME, QUESTION, TINY_MODELS, cache_free_logits, layout, run_traced, video_frames

VISION = {"stage1.enabled": True, "stage1.space": "vision", "stage1.min_cluster_tokens": 4}
NOTHING_MERGED = {**VISION, "stage1.tau": 1.0, "stage1.cluster_ratio": 1.0}


@pytest.fixture(scope="module", params=TINY_MODELS)
def case(request):
    pipe = load_pipeline(request.param, device="cpu", dtype="float32", overrides={"generation.max_new_tokens": MAX_NEW})
    prepared = pipe.prepare(video_frames(), QUESTION)
    yield pipe, prepared, run_traced(pipe, prepared)
    pipe.remove_stages()


def run(case, **overrides):
    pipe, prepared, _ = case
    return run_traced(pipe, prepared, **overrides)


def merger_input(pipe, prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(the merger's input rows [U * 4, C] as the tower hands them over, the tower's output [U, D])
    of the unreduced video, captured around one baseline forward."""
    seen = {}

    def keep(name, value):  # a hook returning a value would replace the module's input or output
        seen[name] = value.detach().clone()

    merger = family_of(pipe.model).vision_merger(pipe.model)
    hooks = [merger.register_forward_pre_hook(lambda m, args: keep("x", args[0]))]
    tower = family_of(pipe.model).vision_encoder(pipe.model)
    hooks.append(tower.register_forward_hook(lambda m, a, out: keep("out", out.pooler_output)))
    pipe.remove_stages()
    try:
        with torch.inference_mode():
            pipe.model(**prepared.inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen["x"], seen["out"]


def raster_units(pipe, prepared) -> torch.Tensor:
    """Each LLM token's 2x2 patch features side by side, [T, N, 4C], in the prompt's order."""
    x, out = merger_input(pipe, prepared)
    grid = prepared.inputs["video_grid_thw"]
    order = family_of(pipe.model).merger_order(pipe.model, grid)
    merger = family_of(pipe.model).vision_merger(pipe.model)
    with torch.inference_mode():
        projected = merger(x)
    # The order's meaning, checked against the tower itself: merger row j is raster token order[j].
    torch.testing.assert_close(out[order], projected, rtol=0, atol=0)
    rows = x.reshape(-1, x.shape[-1] * 4)
    raster = torch.empty_like(rows)
    raster[order] = rows
    return raster.reshape(N_FRAMES, PER_FRAME, -1)


def test_the_merger_sees_the_qwen2_5_vl_video_window_by_window(case):
    pipe, prepared, _ = case
    order = family_of(pipe.model).merger_order(pipe.model, prepared.inputs["video_grid_thw"])
    assert sorted(order.tolist()) == list(range(N_VISUAL))
    identity = torch.equal(order, torch.arange(N_VISUAL))
    assert identity == (pipe.model.config.model_type == "qwen2_vl")  # Qwen2-VL has no windows


def test_nothing_merged_equals_the_baseline(case):
    base = case[2]
    out = run(case, **NOTHING_MERGED)
    assert out.result.reductions[0].acts == "vision_encoder"
    assert out.result.tokens_after_stage1 == N_VISUAL
    assert out.result.generated_token_ids == base.result.generated_token_ids
    torch.testing.assert_close(out.embeds, base.embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, base.logits, rtol=0, atol=1e-5)


def test_llm_input_and_logits_equal_the_hand_built_reference(case):
    pipe, prepared, base = case
    units = raster_units(pipe, prepared)
    res = merge_video_tokens(units, tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.25, k=7, min_cluster_tokens=4)
    m = res.merged.shape[0]
    assert 0 < m < N_VISUAL and res.n_static_tokens > 0  # the planted static strip is found static
    merger = family_of(pipe.model).vision_merger(pipe.model)
    with torch.inference_mode():
        projected = merger(res.merged.reshape(-1, units.shape[-1] // 4))  # the merged rows, projected once
    start, end = layout(prepared.inputs["input_ids"])
    source = torch.cat([torch.arange(start), start + res.representative, torch.arange(end, base.embeds.shape[1])])
    embeds = base.embeds[:, source].clone()
    embeds[0, start : start + m] = projected
    full = prefill_position_ids(pipe.model, prepared.inputs)

    out = run(case, **VISION)
    assert out.result.tokens_after_stage1 == m
    assert out.result.stage1_static_tokens == res.n_static_tokens
    torch.testing.assert_close(out.embeds, embeds, rtol=0, atol=1e-6)
    assert torch.equal(out.position_ids[1:], full[1:, :, source])  # the representatives' original ids
    ref = cache_free_logits(pipe.model, embeds, full[1:, :, source], torch.arange(source.numel()), N_LAYERS - 1,
                            out.result.generated_token_ids, full[1:, :, -1:] + 1)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    # Not the LLM-space Stage 1: merging before the (non-linear) merger changes the tokens.
    llm = run(case, **{**VISION, "stage1.space": "llm"})
    assert (llm.embeds.shape != out.embeds.shape) or (llm.embeds - out.embeds).abs().max() > 1e-4


def test_the_merger_projects_only_the_merged_tokens(case):
    pipe, prepared, _ = case
    rows = []
    merger = family_of(pipe.model).vision_merger(pipe.model)
    out = run(case, **VISION)  # installs the patch; count the rows its wrapped merger computes
    hook = merger.mlp.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        again = pipe.run(prepared, **VISION)
    finally:
        hook.remove()
    m = out.result.tokens_after_stage1
    assert rows == [m] and again.tokens_after_stage1 == m
    llm = run(case, **{**VISION, "stage1.space": "llm"})
    assert llm.result.llm_prefill_tokens == out.result.llm_prefill_tokens  # same counts here, so only the merger differs
    vision = family_of(pipe.model).vision_shape(pipe.model.config)
    assert llm.result.prefill_flops - out.result.prefill_flops == merger_flops(vision, N_VISUAL - m)
    assert out.result.prefill_flops_baseline == llm.result.prefill_flops_baseline


def test_with_stage2_the_groups_come_from_the_vision_space_merge(case):
    pipe, prepared, _ = case
    res = merge_video_tokens(raster_units(pipe, prepared), tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.25, k=7,
                             min_cluster_tokens=4)
    out = run(case, **VISION, **{"stage2.enabled": True, "stage2.pruning_layer": 1, "stage2.keep_ratio": 0.5})
    st = out.state
    assert torch.equal(st.visual_groups, res.group.to(st.visual_groups.device))  # not the frames, not LLM space's
    sizes = torch.bincount(st.visual_groups)
    assert st.tokens_after == int(sum(int(n * 0.5) for n in sizes.tolist()))
    assert [r.acts for r in out.result.reductions] == ["vision_encoder", "llm_layer"]


def test_generate_with_the_patch_gives_the_same_tokens(case):
    pipe, prepared, _ = case
    out = run(case, **VISION)
    inputs = prepared.inputs
    with torch.inference_mode():
        ref = pipe.model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert out.result.generated_token_ids == ref.tolist()[: len(out.result.generated_token_ids)]


def test_an_image_beside_the_video_passes_untouched():
    from tests.test_messages import two_videos_and_an_image

    pipe = load_pipeline("tiny", device="cpu", dtype="float32", overrides={"generation.max_new_tokens": 3})
    prepared = pipe.prepare(messages=two_videos_and_an_image())
    base = run_traced(pipe, prepared)
    same = run_traced(pipe, prepared, **NOTHING_MERGED)
    assert same.result.generated_token_ids == base.result.generated_token_ids
    torch.testing.assert_close(same.embeds, base.embeds, rtol=0, atol=1e-6)
    merged = run_traced(pipe, prepared, **VISION)
    assert merged.result.tokens_after_stage1 < merged.result.tokens_before_stage1
    assert merged.state.method_tokens["prunevid_stage1"][0] == merged.result.tokens_before_stage1  # both videos
    pipe.remove_stages()


def test_the_feature_cache_is_neither_used_nor_filled(tmp_path):
    from prunevid_bench.feature_cache import FeatureCache

    pipe = load_pipeline("tiny", device="cpu", dtype="float32", overrides={"generation.max_new_tokens": 3})
    plain = pipe.run(video_frames(), QUESTION)
    pipe.feature_cache = FeatureCache(max_bytes=1 << 30, directory=tmp_path)
    vision = pipe.run(pipe.prepare(video_frames(), QUESTION), **VISION)
    assert not vision.vision_cached
    after = pipe.run(pipe.prepare(video_frames(), QUESTION))  # would be served the reduced tower output if kept
    assert after.generated_token_ids == plain.generated_token_ids
    torch.testing.assert_close(after.first_token_logits, plain.first_token_logits, rtol=0, atol=1e-6)
    again = pipe.run(pipe.prepare(video_frames(), QUESTION), **VISION)
    assert again.generated_token_ids == vision.generated_token_ids and not again.vision_cached
    pipe.remove_stages()


def test_streaming_refuses_vision_space(tiny_pipe):
    from prunevid_bench.methods.prunevid_stage1 import Stage1Config
    from prunevid_bench.errors import PruneVidError
    from prunevid_bench.streaming import StreamSession

    from prunevid_bench.config import RunConfig

    cfg = RunConfig(stage1=Stage1Config(enabled=True, space="vision"))
    with pytest.raises(PruneVidError, match="prunevid_stage1 acts inside the vision encoder with this config"):
        StreamSession(tiny_pipe, video_fps=2, chunk_frames=4, config=cfg)


def test_cli_runs_vision_space_and_names_a_bad_space(clip8, tmp_path):
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    args = ["run", str(clip8), "What happens?", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "2", "--json"]
    res = CliRunner().invoke(app, args + ["--preset", "stage1_only", "--set", "stage1.space=vision"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert [r["acts"] for r in record["reductions"]] == ["vision_encoder"]
    assert record["tokens_after_stage1"] < record["tokens_before_stage1"]
    bad = CliRunner().invoke(app, args + ["--preset", "stage1_only", "--set", "stage1.space=visoin"])
    assert bad.exit_code == 2
    assert "stage1.space must be one of llm, vision, got 'visoin' (did you mean 'vision'?)" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_compare_names_the_space_only_when_it_is_not_the_official_one():
    from prunevid_bench.config import RunConfig
    from prunevid_bench.harness.compare import stages_text

    cfg = RunConfig().to_dict()
    cfg["stage1"].update(enabled=True)
    assert "space" not in stages_text(cfg)
    cfg["stage1"].update(space="vision")
    assert stages_text(cfg) == "S1 tau=0.8 c=0.5 seg=0.25 space=vision"


def test_a_matched_budget_sweep_draws_prunevid_in_both_spaces(tmp_path):
    import csv
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import EXIT_INCOMPLETE, app
    from prunevid_bench.toy.world import generate_dataset

    data = generate_dataset(tmp_path / "toy", 2, seed=3)
    args = ["sweep", "--methods", "prunevid,prunevid-vision", "--budgets", "0.25", "--dataset", str(data), "--limit", "1",
            "--model", "tiny", "--max-new-tokens", "2", "--num-frames", "8", "--results-dir", str(tmp_path / "out")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code in (0, EXIT_INCOMPLETE), res.output
    (sweep_dir,) = (tmp_path / "out").iterdir()
    rows = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    assert list(rows) == ["baseline", "prunevid,budget=0.25", "prunevid-vision,budget=0.25"]
    assert rows["prunevid-vision,budget=0.25"]["method"] == "prunevid-vision"
    cells = {c["name"]: c["overrides"] for c in json.loads((sweep_dir / "sweep.json").read_text())["cells"]}
    vision = cells["prunevid-vision,budget=0.25"]
    assert vision["stage1.space"] == "vision" and vision["stage1.enabled"] and vision["stage2.budget"] == 0.25
    assert "stage1.space" not in cells["prunevid,budget=0.25"]
    assert float(rows["prunevid-vision,budget=0.25"]["kept_tokens"]) <= 16  # round(0.25 * 64)
