"""The methods that read the vision tower's attention (VisionZip with ``score: attention``,
FastVID, FlashVID) in the harness: a matched-budget sweep of the new methods on the toy world,
the feature cache neither serving nor keeping their runs' tower output, and a one-line refusal
when the tower did not run (features given precomputed)."""

from __future__ import annotations

import csv

import pytest
import torch

from prunevid_bench.errors import PruneVidError
from tests.reduced_video import QUESTION, frames


def test_a_matched_budget_sweep_runs_each_new_method(tmp_path):
    from typer.testing import CliRunner

    from prunevid_bench.cli import app
    from prunevid_bench.cli import EXIT_INCOMPLETE
    from prunevid_bench.toy.world import generate_dataset

    toy = generate_dataset(tmp_path / "toy", 2, seed=3)
    res = CliRunner().invoke(app, [str(a) for a in (
        "sweep", "--methods", "visionzip,fastvid,flashvid", "--budgets", "0.1,0.25", "--dataset", toy, "--limit", "1",
        "--model", "tiny", "--max-new-tokens", "2", "--num-frames", "8", "--results-dir", tmp_path / "runs")])
    assert res.exit_code in (0, EXIT_INCOMPLETE), res.output
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    rows = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    names = [f"{m},budget={b}" for m in ("visionzip", "fastvid", "flashvid") for b in ("0.1", "0.25")]
    assert list(rows) == ["baseline", *names]
    for b, per_frame in ((0.1, 2), (0.25, 4)):  # max(1, round(B * 16)) per temporal step, 4 steps
        assert float(rows[f"visionzip,budget={b}"]["kept_tokens"]) == 4 * per_frame
        assert 0 < float(rows[f"fastvid,budget={b}"]["kept_tokens"]) <= 4 * per_frame
        assert 4 * per_frame <= float(rows[f"flashvid,budget={b}"]["kept_tokens"]) <= 4 * per_frame + 4


def test_the_feature_cache_is_neither_used_nor_filled(tmp_path):
    from prunevid_bench.feature_cache import FeatureCache
    from prunevid_bench.pipeline import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", dtype="float32", overrides={"generation.max_new_tokens": 2})
    try:
        video = frames("tiny")
        plain = pipe.run(pipe.prepare(video, QUESTION), **{"fastvid.enabled": True})
        pipe.feature_cache = FeatureCache(max_bytes=1 << 30, directory=tmp_path)
        for _ in range(2):
            cached = pipe.run(pipe.prepare(video, QUESTION), **{"fastvid.enabled": True})
            assert not cached.vision_cached and cached.generated_token_ids == plain.generated_token_ids
    finally:
        pipe.remove_stages()


@pytest.mark.parametrize("overrides", [{"fastvid.enabled": True}, {"flashvid.enabled": True},
                                       {"visionzip.enabled": True, "visionzip.score": "attention"}])
def test_features_given_precomputed_are_refused_in_one_line(tiny_pipe, overrides):
    from prunevid_bench.config import build_config
    from prunevid_bench.engine import run_greedy
    from prunevid_bench.patch import apply_methods

    model = tiny_pipe.model
    tiny_pipe.remove_stages()
    inputs = dict(tiny_pipe.prepare(frames("tiny"), QUESTION).inputs)
    with torch.no_grad():
        features = model.model.get_video_features(inputs.pop("pixel_values_videos"), inputs["video_grid_thw"])
    handle = apply_methods(model, build_config(overrides=overrides))
    try:
        with pytest.raises(PruneVidError, match="needs the vision tower's attention, and the tower did not run"):
            run_greedy(model, {**inputs, "mm_encoder_outputs": {"video": features}}, 1)
    finally:
        handle.remove()


@pytest.mark.parametrize("overrides", [{"fastvid.enabled": True}, {"flashvid.enabled": True},
                                       {"visionzip.enabled": True, "visionzip.score": "attention"}])
def test_a_stream_refuses_them_in_one_line(overrides):
    from prunevid_bench.config import build_config
    from prunevid_bench.stream_methods import check_stream_methods

    with pytest.raises(PruneVidError, match="reads the vision tower's attention, which a stream does not capture"):
        check_stream_methods(build_config(overrides=overrides))
    check_stream_methods(build_config(overrides={"visionzip.enabled": True}))  # the port's norm score needs no tower
