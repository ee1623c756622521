"""No silent no-ops: a swept key that changed nothing is named, with why."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("toy"), 3, seed=11)


def sweep(toy, out, *params):
    args = ["sweep", *params, "--dataset", str(toy), "--preset", "default", "--limit", "2", "--warmup", "0",
            "--results-dir", str(out)]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code in (0, 3), res.output
    return " ".join(res.output.split())


def test_the_readmes_old_sweep_says_cluster_ratio_changed_nothing_on_the_toy_model(toy, tmp_path):
    """`prunevid sweep tau cluster_ratio --preset default` (the README's example until now) on the
    shipped toy model: a frame holds 16 tokens, and at tau=0.9 every Stage-1 set is at most 14, so
    the three cluster ratios gave identical cells. The sweep says so, and why; tau itself moved the
    tokens."""
    out = sweep(toy, tmp_path, "tau", "cluster_ratio")
    assert ("warning: cluster_ratio had no effect at tau=0.9: every token set is at most "
            "stage1.min_cluster_tokens=14, so no set was clustered") in out
    assert "tau had no effect" not in out


def test_the_readmes_new_sweep_moves_both_keys(toy, tmp_path):
    out = sweep(toy, tmp_path, "tau", "keep_ratio")
    assert "had no effect" not in out


def test_values_that_resolve_to_one_layer_are_named(toy, tmp_path):
    out = sweep(toy, tmp_path, "pruning_layer", "--values", "pruning_layer=10/28,1")
    assert "pruning_layer had no effect: the values resolve to the same layer of this model (1)" in out


def test_a_sweep_of_a_video_key_is_no_input_mismatch(toy, tmp_path):
    """Sweeping video.num_frames changes the frames on purpose: the cells are tabulated (and
    compared) without --allow-mixed."""
    out = sweep(toy, tmp_path, "num_frames", "--values", "num_frames=4,8")
    assert "cannot tabulate" not in out and "num_frames=4" in out
    (folder,) = tmp_path.iterdir()
    res = runner.invoke(app, ["compare", str(folder), "--markdown"])
    assert res.exit_code == 0, res.output
