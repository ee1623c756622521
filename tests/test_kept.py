"""``--save-kept`` / ``--show-kept``: the record's grid coordinates of each method's kept tokens
equal the method's own selection, computed here from the stages' pure functions on the same
embeddings; the picture is written; bad uses are one-line errors."""

from __future__ import annotations

import json

import torch
from PIL import Image
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.stages import evs, tome

T, H, W = 4, 4, 4  # the tiny model's 8 frames of 112 x 112: 4 steps of 4 x 4 tokens
ONE = {"generation.max_new_tokens": 1, "runtime.save_kept": True}


def coords(index: torch.Tensor) -> list:
    return torch.stack([index // (H * W), index % (H * W) // W, index % W], dim=1).tolist()


def video_embeds(pipe, prepared) -> torch.Tensor:
    """[T, N, C] the video's tokens as they enter the LLM, before any method (a baseline run)."""
    seen = {}
    hook = pipe.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: None if "x" in seen else seen.update(x=kw["inputs_embeds"][0].detach().clone()), with_kwargs=True)
    try:
        pipe.run(prepared, **{"generation.max_new_tokens": 1})
    finally:
        hook.remove()
    ids = prepared.inputs["input_ids"][0]
    return seen["x"][ids == pipe.model.config.video_token_id].view(T, H * W, -1)


def test_kept_coordinates_equal_each_methods_selection(tiny_pipe, frames8):
    prepared = tiny_pipe.prepare(frames8, "What happens?")
    grid = video_embeds(tiny_pipe, prepared)

    # EVS alone: a drop; its kept set is the retention mask's
    kept = tiny_pipe.run(prepared, **ONE, **{"evs.enabled": True}).method_fields["kept"]
    (video,) = kept["evs"]
    mask = evs.evs_retention_mask(grid, 0.75).flatten()
    assert video["grid"] == [T, H, W] and video["kept"] == coords(torch.nonzero(mask).flatten())
    assert [o >= 0 for o in video["origin"]] == mask.tolist()
    off = tiny_pipe.run(prepared, **{"generation.max_new_tokens": 1, "evs.enabled": True})
    assert "kept" not in off.method_fields and "kept" not in off.to_dict()  # off by default

    # ToMe, then Stage 2 on what it left: the merge's representatives and members, then the kept share
    result = tiny_pipe.run(prepared, **ONE, **{"tome.enabled": True, "tome.budget": 0.5, "stage2.enabled": True,
                                               "stage2.pruning_layer": 1, "stage2.keep_ratio": 0.5})
    kept = result.method_fields["kept"]
    assert list(kept) == ["tome", "prunevid_stage2"]
    intra, inter, _ = tome.tome_budget(T, H * W, 0.5)
    merged = tome.tome_video(grid, intra, inter)
    (video,) = kept["tome"]
    assert video["kept"] == coords(merged.representative) and video["origin"] == merged.token_to_merged.tolist()
    state = tiny_pipe._handle.state
    (video,) = kept["prunevid_stage2"]
    survivors = merged.representative[state.kept_visual]
    assert video["kept"] == coords(survivors) and len(survivors) == result.tokens_after
    row = torch.full((merged.representative.numel(),), -1)
    row[state.kept_visual] = torch.arange(state.kept_visual.numel())
    assert video["origin"] == row[merged.token_to_merged].tolist()  # a dropped row's members are dropped with it


def test_merge_inside_the_llm_is_recorded_as_groups(tiny_pipe, frames8):
    prepared = tiny_pipe.prepare(frames8, "What happens?")
    kept = tiny_pipe.run(prepared, **ONE, **{"merge_nearest.enabled": True, "merge_nearest.pruning_layer": 1}).method_fields["kept"]
    (video,) = kept["merge_nearest"]
    state = tiny_pipe._handle.state
    assert video["origin"] == state.merged_into.tolist() and video["kept"] == coords(state.kept_visual)


def test_show_kept_writes_the_picture(clip8, tmp_path):
    runner = CliRunner()
    base = ["run", str(clip8), "What is happening?", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "1",
            "--results-dir", str(tmp_path)]
    res = runner.invoke(app, [*base, "--preset", "default", "--set", "stage2.pruning_layer=1", "--show-kept"])
    assert res.exit_code == 0, res.output
    (run_dir,) = tmp_path.iterdir()
    record = json.loads((run_dir / "result.json").read_text())
    assert list(record["kept"]) == ["prunevid_stage1", "prunevid_stage2"]
    image = Image.open(run_dir / "kept.png")
    assert image.size == (4 + T * (W * 24 + 4), 4 + 2 * (H * 24 + 4))  # one row per method, one column per step
    assert len(set(image.getdata())) > 100  # the frames themselves, not a blank canvas
    none = runner.invoke(app, [*base, "--show-kept"])
    assert none.exit_code == 2 and "--show-kept needs a method" in none.output
    dataset = runner.invoke(app, ["run", "--dataset", "x.jsonl", "--show-kept"])
    assert dataset.exit_code == 2 and "--show-kept draws one video" in dataset.output
