"""The method and family registries: the controls as methods agree with the Stage-2 score modes
they stand for, one LLM-layer method per run, the vision encoder's output before and after its
merger, and one-line errors for what a user can get wrong."""

from __future__ import annotations

import pytest
import torch

from prunevid_bench.config import build_config
from prunevid_bench.errors import PruneVidError
from prunevid_bench.families import family_for_type, family_of
from prunevid_bench.methods import ACTS, all_methods, get_method

ONE_TOKEN = {"generation.max_new_tokens": 3}


def test_builtin_methods_in_run_order():
    names = [m.name for m in all_methods()]
    assert names[0] == "tome_vision"  # inside the vision encoder first
    first = ["prunevid_stage1", "tome", "evs", "vidcom2", "prunevid_stage2"]  # visual tokens, then LLM layer
    assert [n for n in names if n in first] == first
    assert [m.acts for m in all_methods()] == sorted((m.acts for m in all_methods()), key=ACTS.index)
    assert names.index("holitom") < names.index("prunevid_stage2")
    assert {"random", "fastv"} <= set(names[5:])
    assert build_config("default").enabled_methods == ["prunevid_stage1", "prunevid_stage2"]
    assert build_config("stage2_only").enabled_methods == ["prunevid_stage2"]
    assert build_config("baseline").enabled_methods == []


def test_random_method_is_the_random_score_control(tiny_pipe, frames8):
    """``random`` keeps exactly what ``stage2.score=random`` keeps (the sweep's control)."""
    prepared = tiny_pipe.prepare(frames8, "What happens?")
    as_score = tiny_pipe.run(prepared, **{"stage2.enabled": True, "pruning_layer": 1, "score": "random", "stage2.seed": 3}, **ONE_TOKEN)
    keep_score = tiny_pipe._handle.state.keep_index.clone()
    as_method = tiny_pipe.run(prepared, **{"random.enabled": True, "random.pruning_layer": 1, "random.seed": 3}, **ONE_TOKEN)
    assert torch.equal(tiny_pipe._handle.state.keep_index, keep_score)
    assert as_method.generated_token_ids == as_score.generated_token_ids
    assert as_method.methods == ["random"] and as_method.pruning_layer == 1
    assert (as_method.reductions[0].tokens_in, as_method.reductions[0].tokens_out) == (64, as_score.stage2_tokens_after)


@pytest.mark.parametrize("pipe_fixture", ["tiny_pipe", "tiny_qwen2vl_pipe"])
def test_fastv_keeps_the_last_tokens_favourites_and_everything_at_ratio_one(request, pipe_fixture, frames8):
    pipe = request.getfixturevalue(pipe_fixture)
    prepared = pipe.prepare(frames8, "What happens?")
    base = pipe.run(prepared, **ONE_TOKEN)
    full = pipe.run(prepared, **{"fastv.enabled": True, "fastv.pruning_layer": 1, "fastv.keep_ratio": 1.0}, **ONE_TOKEN)
    assert full.generated_token_ids == base.generated_token_ids
    torch.testing.assert_close(full.first_token_logits, base.first_token_logits, rtol=0, atol=1e-6)
    half = pipe.run(prepared, **{"fastv.enabled": True, "fastv.pruning_layer": 1, "fastv.keep_ratio": 0.5}, **ONE_TOKEN)
    st = pipe._handle.state
    assert half.stage2_tokens_after == 32 and st.kept_visual.numel() == 32
    dropped = torch.ones(64, dtype=torch.bool)
    dropped[st.kept_visual] = False
    assert st.scores[st.kept_visual].min() >= st.scores[dropped].max()  # a global top-k, not per group


def test_one_llm_layer_method_per_run():
    with pytest.raises(PruneVidError, match="one LLM-layer method per run: stage2 and fastv"):
        build_config(overrides={"stage2.enabled": True, "fastv.enabled": True})


def test_method_keys_are_checked_once_with_did_you_mean():
    with pytest.raises(PruneVidError, match=r"unknown config key 'fastv.keep_ration' \(did you mean 'fastv.keep_ratio'\?\)"):
        build_config(overrides={"fastv.keep_ration": 0.3})
    with pytest.raises(PruneVidError, match=r"fastv.keep_ratio must be in \(0, 1\], got 0.0"):
        build_config(overrides={"fastv.keep_ratio": 0.0})
    with pytest.raises(PruneVidError, match=r"did you mean 'fastv'"):
        get_method("fastvv")
    # short names keep meaning PruneVid's keys even though other methods have keys of that name
    assert build_config(overrides={"keep_ratio": 0.3}).stage2.keep_ratio == 0.3


def test_old_stage1_k_still_loads(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("stage1:\n  enabled: true\n  k: 5\n")
    assert build_config(config_file=path).stage1.dpc_neighbours == 5
    assert build_config(overrides={"stage1.k": 4}).stage1.dpc_neighbours == 4


def test_unsupported_model_type_lists_the_supported():
    with pytest.raises(PruneVidError, match="model type 'llava' is not supported; prunevid-bench supports the model types qwen2_5_vl, qwen2_vl"):
        family_for_type("llava")


@pytest.mark.parametrize("pipe_fixture", ["tiny_pipe", "tiny_qwen2vl_pipe"])
def test_vision_encoder_output_before_and_after_the_merger(request, pipe_fixture, frames8):
    """The family reaches the encoder's patch features (before the merger: [patches, C_vision])
    and the LLM's visual tokens (after it: [patches / merge^2, hidden])."""
    pipe = request.getfixturevalue(pipe_fixture)
    family = family_of(pipe.model)
    seen = {}
    hook = family.vision_merger(pipe.model).register_forward_hook(
        lambda m, args, out: seen.update(before=args[0].shape, after=out.shape))
    try:
        result = pipe.run(frames8, "What happens?", **ONE_TOKEN)
    finally:
        hook.remove()
    geometry = family.geometry(pipe.model.config)
    (t, h, w), = result.video_grid_thw
    assert (geometry.patch, geometry.temporal, geometry.merge) == (14, 2, 2)
    assert seen["before"][0] == t * h * w and seen["after"] == (t * h * w // geometry.merge**2, pipe.model.config.get_text_config().hidden_size)
    assert seen["after"][0] == result.visual_tokens


def test_methods_show_says_where_each_builtin_departs_from_its_original():
    """Every built-in method states in `prunevid methods show` where it departs from its
    original's code (or that it has none); a plug-in that says nothing is marked as such."""
    from typer.testing import CliRunner

    from prunevid_bench.cli import app
    from prunevid_bench.methods import all_methods

    for method in all_methods():
        if not (method.reduce or method.select).__module__.startswith("prunevid_bench."):
            continue  # a test's own plug-in
        shown = CliRunner().invoke(app, ["methods", "show", method.name])
        assert shown.exit_code == 0, shown.output
        line = next(ln for ln in shown.output.splitlines() if ln.startswith("departs from the original: "))
        assert method.departs and method.departs in " ".join(shown.output.split()), method.name
        assert "not stated" not in line
