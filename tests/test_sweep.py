"""`prunevid sweep`: grid expansion, controls, the Pareto front, dry run, resume cell by cell."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import EXIT_INCOMPLETE as INCOMPLETE
from prunevid_bench.cli import app
from prunevid_bench.methods import get_method
from prunevid_bench.config import build_config
from tests.conftest import PROJECT_ROOT
from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.sweep import (
    expand_cells,
    frames_controls,
    grid_spec,
    load_sweep_file,
    pareto_front,
    parse_values,
)
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()


STAGE1_FILE = PROJECT_ROOT / "sweeps" / "stage1.yaml"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# Expansion (no model)


def test_shipped_stage1_sweep_expands_to_18_cells_plus_baseline():
    spec = grid_spec([], None, STAGE1_FILE)
    assert spec == {"stage1.tau": [0.7, 0.8, 0.9], "stage1.cluster_ratio": [0.3, 0.5, 0.7],
                    "stage1.temporal_segment_ratio": [0.25, 0.5]}
    cells = expand_cells(build_config(), spec)
    assert [c.kind for c in cells] == ["baseline"] + ["grid"] * 18
    assert len({c.name for c in cells}) == 19
    grid = cells[1:]
    # Sweeping Stage-1 keys switches Stage 1 on; Stage 2 stays as the base has it (off).
    assert all(c.config.stage1.enabled and not c.config.stage2.enabled for c in grid)
    assert {(c.config.stage1.tau, c.config.stage1.cluster_ratio, c.config.stage1.temporal_segment_ratio) for c in grid} == {
        (t, c, s) for t in (0.7, 0.8, 0.9) for c in (0.3, 0.5, 0.7) for s in (0.25, 0.5)}
    assert cells[1].name == "tau=0.7,cluster_ratio=0.3,temporal_segment_ratio=0.25"
    base = cells[0].config
    assert not base.stage1.enabled and not base.stage2.enabled


def test_stage2_keys_switch_stage2_on_and_random_controls_follow():
    base = build_config("stage1_only")
    cells = expand_cells(base, parse_values(["keep_ratio=0.3,0.5", "stage2.pruning_layer=1"]), ["random"])
    grid = [c for c in cells if c.kind == "grid"]
    assert [c.name for c in grid] == ["keep_ratio=0.3,pruning_layer=1", "keep_ratio=0.5,pruning_layer=1"]
    assert all(c.config.stage2.enabled and c.config.stage1.enabled for c in grid)  # Stage 1 from the preset
    controls = [c for c in cells if c.kind == "control_random"]
    assert [c.name for c in controls] == [f"{c.name}+random" for c in grid]
    for cell, control in zip(grid, controls):
        assert control.config.stage2.score == "random"
        assert control.config.stage2.keep_ratio == cell.config.stage2.keep_ratio  # the same token budget


def test_another_methods_keys_switch_it_on_and_the_baseline_has_it_off():
    base = build_config(overrides={"fastv.enabled": True, "fastv.pruning_layer": 1})
    cells = expand_cells(base, parse_values(["fastv.keep_ratio=0.3,0.6"]))
    assert cells[0].kind == "baseline" and cells[0].config.enabled_methods == []
    assert [(c.config.enabled_methods, c.config.section("fastv").keep_ratio) for c in cells[1:]] == [
        (["fastv"], 0.3), (["fastv"], 0.6)]
    cells = expand_cells(build_config(), parse_values(["fastv.keep_ratio=0.3"]))
    assert cells[1].config.enabled_methods == ["fastv"]  # sweeping a method's key switches it on
    assert cells[0].overrides == {}  # no method was on in the base: nothing to switch off


def test_an_explicitly_swept_enabled_flag_wins():
    cells = expand_cells(build_config(), parse_values(["stage1.enabled=false,true", "tau=0.8"]), ["random"])
    assert [c.config.stage1.enabled for c in cells if c.kind == "grid"] == [False, True]
    assert not any(c.kind == "control_random" for c in cells)  # no Stage 2, no random control


def test_values_are_typed_and_validated():
    assert parse_values(["tau=0.7,0.9", "score=prunevid,random", "num_frames=8"]) == {
        "stage1.tau": [0.7, 0.9], "stage2.score": ["prunevid", "random"], "video.num_frames": [8]}
    with pytest.raises(PruneVidError, match=r"stage1.tau must be in \(0, 1\], got 1.5"):
        expand_cells(build_config(), parse_values(["tau=0.8,1.5"]))
    with pytest.raises(PruneVidError, match="stage2.pruning_layer must be a 0-based layer index .* got '29/28'"):
        expand_cells(build_config(), parse_values(["pruning_layer=10/28,29/28"]))


def test_pruning_layer_sweeps_over_indices_and_relative_depths():
    assert grid_spec(["pruning_layer"], None, None) == {"stage2.pruning_layer": ["2/28", "10/28", "20/28"]}  # shipped
    cells = expand_cells(build_config(), parse_values(["pruning_layer=1,10/28"]))
    assert [(c.name, c.config.stage2.pruning_layer) for c in cells[1:]] == [("pruning_layer=1", 1), ("pruning_layer=10/28", "10/28")]
    assert all(c.config.stage2.enabled for c in cells[1:])


@pytest.mark.parametrize(
    "params,values,message",
    [
        (["min_cluster_tokens"], [], "no values for stage1.min_cluster_tokens: give --values min_cluster_tokens=v1,v2"),
        (["tau"], ["tau=0.7", "keep_ratio=0.3"], "--values given for stage2.keep_ratio"),
        ([], ["tua=0.7"], "did you mean 'tau'"),
        ([], ["model.dtype=float32,bfloat16"], "model.dtype cannot be swept"),
        ([], [], "nothing to sweep"),
        ([], ["tau"], "--values expects name=v1,v2"),
    ],
)
def test_grid_errors(params, values, message):
    with pytest.raises(PruneVidError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid_spec(params, values, None)


def test_params_pick_a_subset_of_a_sweep_file():
    assert list(grid_spec(["tau"], ["tau=0.75"], STAGE1_FILE)) == ["stage1.tau"]
    assert grid_spec(["tau"], ["tau=0.75"], STAGE1_FILE)["stage1.tau"] == [0.75]  # --values win over the file


def test_a_shipped_sweep_file_by_name():
    assert load_sweep_file("stage1") == load_sweep_file(STAGE1_FILE)
    with pytest.raises(PruneVidError, match="config file not found: stage9"):
        load_sweep_file("stage9")


def test_pareto_front_lower_cost_higher_quality():
    points = [(100, 0.60), (20, 0.50), (40, 0.50), (40, 0.55), (10, 0.30), (None, 0.9), (100, 0.60)]
    assert pareto_front(points) == [True, True, False, True, True, False, True]


def test_frames_control_matches_the_kept_tokens():
    def result(**medians):
        return SimpleNamespace(summary={"metrics": {k: {"median": v} for k, v in medians.items()}})

    base = build_config(None, None, {"video.num_frames": 16})
    cells = expand_cells(base, parse_values(["keep_ratio=0.25,0.5,0.9"]))
    # 16 frames = 8 temporal steps of 16 tokens: 32 kept tokens ~ 2 steps = 4 frames.
    results = {"baseline": result(num_frames=16, visual_tokens=128, visual_tokens_kept=128),
               cells[1].name: result(visual_tokens_kept=32), cells[2].name: result(visual_tokens_kept=64),
               cells[3].name: result(visual_tokens_kept=120)}
    controls = frames_controls(base, cells, results)
    assert [(c.name, c.matches) for c in controls] == [("frames=4", [cells[1].name]), ("frames=8", [cells[2].name])]
    assert all(c.config.video.num_frames == int(c.name[7:]) and not c.config.stage1.enabled and not c.config.stage2.enabled
               for c in controls)


def test_random_is_a_line_of_a_matched_budget_sweep():
    from prunevid_bench.harness.sweep import method_budget_cells, parse_method_grid

    names, budgets = parse_method_grid("random,tome", "0.25,0.5")
    cells = method_budget_cells(build_config("default"), list(names), list(budgets))
    random_cells = [c for c in cells if c.method == "random"]
    assert [(c.config.enabled_methods, c.config.section("random").budget) for c in random_cells] == [
        (["random"], 0.25), (["random"], 0.5)]
    with pytest.raises(PruneVidError, match=r"--budgets values must be in \(0, 1\], got 1.5"):
        parse_method_grid("random", "1.5")


@pytest.mark.parametrize("preset, method", [("tome-50", "tome"), ("evs-75", "evs"), ("default", "prunevid_stage1")])
def test_frames_controls_and_the_baseline_switch_off_every_method(preset, method):
    """From a ToMe or EVS base the frames control is the baseline with fewer frames: no method on."""
    def result(**medians):
        return SimpleNamespace(summary={"metrics": {k: {"median": v} for k, v in medians.items()}})

    base = build_config(preset, None, {"video.num_frames": 16})
    assert method in base.enabled_methods
    cells = expand_cells(base, parse_values(["keep_ratio=0.25"]))
    results = {"baseline": result(num_frames=16, visual_tokens=128, visual_tokens_kept=128),
               cells[1].name: result(visual_tokens_kept=32)}
    controls = frames_controls(base, cells, results)
    assert [c.name for c in controls] == ["frames=4"]
    for cell in (cells[0], *controls):
        assert cell.config.enabled_methods == []
        assert not cell.config.section(get_method(method).section).enabled


# ---------------------------------------------------------------------------------------------
# End to end with the tiny model


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("toy"), 6, seed=3)


@pytest.fixture
def calls(monkeypatch, tiny_pipe):
    counter = SimpleNamespace(n=0, fail={}, loads=0)
    original = Pipeline.run

    def counted(self, *args, **kwargs):
        counter.n += 1
        if counter.n in counter.fail:
            raise counter.fail[counter.n]
        return original(self, *args, **kwargs)

    import prunevid_bench.pipeline as pipeline

    def load(*args, **kwargs):  # the session's tiny model: building one per invocation costs seconds
        counter.loads += 1
        return tiny_pipe

    monkeypatch.setattr(Pipeline, "run", counted)
    monkeypatch.setattr(pipeline.Pipeline, "from_config", staticmethod(load))
    return counter


def sweep_args(toy, out, *extra):
    return ["sweep", "tau", "--values", "tau=0.7,0.95", "--dataset", toy, "--limit", "3", "--model", "tiny",
            "--max-new-tokens", "2", "--num-frames", "4", "--preset", "default", "--set", "stage2.pruning_layer=1",
            "--results-dir", out, "--warmup", "0", *extra]  # no warm-up: the tests count model calls


def test_dry_run_lists_cells_and_runs_nothing(toy, tmp_path, calls):
    res = invoke(*sweep_args(toy, tmp_path, "--controls", "random", "--controls", "frames", "--dry-run"))
    assert res.exit_code == 0, res.output
    for name in ("baseline", "tau=0.7", "tau=0.95", "tau=0.7+random", "tau=0.95+random", "frames=N"):
        assert name in res.output
    assert "5 cells; nothing run" in res.output
    assert calls.n == 0 and calls.loads == 0
    assert not any(tmp_path.iterdir())  # nothing written either


def test_sweep_runs_resumes_cell_by_cell_and_summarises(toy, tmp_path, calls):
    args = sweep_args(toy, tmp_path, "--controls", "random", "--controls", "frames")
    calls.fail = {5: KeyboardInterrupt()}  # baseline done (3), second cell has 1 done
    res = invoke(*args)
    assert res.exit_code == 130, res.output
    (sweep_dir,) = tmp_path.iterdir()
    assert sweep_dir.name.startswith("sweep-tau-data-")
    assert len((sweep_dir / "cells" / "tau=0.7" / "samples.jsonl").read_text().splitlines()) == 1

    calls.n, calls.fail, calls.loads = 0, {}, 0
    res = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "80"})
    assert res.exit_code == INCOMPLETE, res.output
    assert ("Sweep of tau {0.7, 0.95} with random and frames controls on data (3 questions), from preset default, "
            "model tiny") in " ".join(res.output.split())  # the table's title, as the plot's
    assert max(len(line) for line in res.output.splitlines() if line[:1] in "┏┃┡│└") <= 80
    cells = json.loads((sweep_dir / "sweep.json").read_text())["cells"]
    names = [c["name"] for c in cells]
    assert names[:5] == ["baseline", "tau=0.7", "tau=0.95", "tau=0.7+random", "tau=0.95+random"]
    frames = [c for c in cells if c["kind"] == "control_frames"]
    assert frames and all(c["overrides"]["video.num_frames"] < 4 for c in frames)
    assert calls.n == 3 * len(cells) - 4  # nothing finished before the crash is redone
    assert calls.loads == 1  # one model for every cell

    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [r["cell"] for r in rows] == names
    by_name = {r["cell"]: r for r in rows}
    assert float(by_name["baseline"]["agreement"]) == 1.0
    assert 0 < float(by_name["baseline"]["agreement_ci_low"]) < 1 == float(by_name["baseline"]["agreement_ci_high"])
    assert float(by_name["tau=0.7"]["kept_tokens"]) < float(by_name["baseline"]["kept_tokens"]) == 32
    assert by_name["tau=0.7+random"]["kept_tokens"] == by_name["tau=0.7"]["kept_tokens"]
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert summary["accuracy"]["n"] == 3 and float(row["ttft_s"]) == summary["metrics"]["ttft_s"]["median"]
    assert any(r["pareto_kept_tokens"] == "True" for r in rows)
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    calls.n, calls.loads = 0, 0
    res = invoke(*args)
    assert res.exit_code == INCOMPLETE and calls.n == 0 and calls.loads == 0  # finished: no model at all
    res = invoke(*args, "--dry-run")
    assert res.output.count("done") >= 5

    res = invoke("compare", sweep_dir, "--markdown")
    assert res.exit_code == 0, res.output
    table = [line for line in res.output.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(cells) and "baseline" in table[1]


def test_sweep_table_shows_the_resolved_layer_beside_the_swept_value(toy, tmp_path, calls):
    res = invoke("sweep", "pruning_layer", "--values", "pruning_layer=10/28,27/28,2", "--dataset", toy, "--limit", "1",
                 "--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4", "--results-dir", tmp_path)
    assert res.exit_code == INCOMPLETE, res.output
    (sweep_dir,) = tmp_path.iterdir()
    rows = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    assert [(c, r["pruning_layer"], r["pruning_layer_spec"]) for c, r in rows.items()] == [
        ("baseline", "", ""), ("pruning_layer=10/28", "1", "10/28"), ("pruning_layer=27/28", "3", "27/28"),
        ("pruning_layer=2", "2", "2")]
    cell = Path(rows["pruning_layer=10/28"]["run_dir"])
    assert cell.name == "pruning_layer=10-28"
    (cell_row,) = csv.DictReader(open(cell / "summary.csv"))
    assert (cell_row["pruning_layer"], cell_row["pruning_layer_spec"]) == ("1", "10/28")
    assert json.loads((cell / "summary.json").read_text())["pruning_layer"] == 1
    res = invoke("compare", sweep_dir, "--markdown")
    assert res.exit_code == 0 and "L=1 (10/28)" in res.output and "L=3 (27/28)" in res.output and "L=2 prunevid" in res.output


def test_params_without_values_take_the_shipped_sweep_files():
    from prunevid_bench.harness.sweep import grid_spec

    spec = grid_spec(["tau", "cluster_ratio"], None, None)
    assert spec == {"stage1.tau": [0.7, 0.8, 0.9], "stage1.cluster_ratio": [0.3, 0.5, 0.7]}
    assert grid_spec(["tau"], ["tau=0.5,0.6"], None) == {"stage1.tau": [0.5, 0.6]}


def test_methods_by_budgets_grid_runs_each_method_at_each_budget(toy, tmp_path):
    res = invoke("sweep", "--methods", "prunevid,tome,fastv", "--budgets", "0.25,0.5", "--dataset", toy, "--limit", "1",
                 "--model", "tiny", "--max-new-tokens", "2", "--num-frames", "8", "--results-dir", tmp_path)
    assert res.exit_code in (0, INCOMPLETE), res.output
    (sweep_dir,) = tmp_path.iterdir()
    rows = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    assert list(rows) == ["baseline"] + [f"{m},budget={b}" for m in ("prunevid", "tome", "fastv") for b in ("0.25", "0.5")]
    for name in ("tome", "fastv"):  # both set their count exactly: round(B * 64) of the 64 tokens
        for budget in (0.25, 0.5):
            row = rows[f"{name},budget={budget}"]
            assert (row["method"], float(row["budget"]), float(row["kept_tokens"])) == (name, budget, 64 * budget)
            assert float(row["retention"]) == budget
            assert float(row["ttft_ideal_s"]) == pytest.approx(float(rows["baseline"]["ttft_s"]) / float(row["ideal_speedup"]))
    cells = json.loads((sweep_dir / "sweep.json").read_text())["cells"]
    tome_cell = next(c for c in cells if c["name"] == "tome,budget=0.25")["overrides"]
    assert tome_cell["tome.enabled"] and tome_cell["tome.budget"] == 0.25 and not tome_cell["stage1.enabled"]
    prunevid = next(c for c in cells if c["name"] == "prunevid,budget=0.5")["overrides"]
    assert prunevid["stage1.enabled"] and prunevid["stage2.budget"] == 0.5  # Stage 1 keeps its own settings
    assert float(rows["prunevid,budget=0.5"]["kept_tokens"]) <= 32
    assert (sweep_dir / "pareto.png").is_file()
    res = invoke("compare", sweep_dir, "--markdown")
    assert res.exit_code == 0 and "| tome,budget=0.25 | tome " in res.output and "| fastv,budget=0.5 | fastv " in res.output


def test_tome_vision_lines_by_tokens_in_groups_mode_and_by_flops_in_unmerge_mode(toy, tmp_path):
    """``--set tome_vision.merger=groups`` reaches the ``tome_vision`` line (the cells keep the
    base config's keys); the default unmerge mode takes a FLOPs budget."""
    common = ("--dataset", toy, "--limit", "1", "--model", "toy", "--max-new-tokens", "2")
    res = invoke("sweep", "--methods", "tome,tome_vision", "--budgets", "0.5,0.25", "--set", "tome_vision.merger=groups",
                 *common, "--results-dir", tmp_path / "tokens")
    assert res.exit_code in (0, INCOMPLETE), res.output
    (sweep_dir,) = (tmp_path / "tokens").iterdir()
    rows = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    for name in ("tome", "tome_vision"):
        for budget in (0.5, 0.25):
            assert float(rows[f"{name},budget={budget}"]["kept_tokens"]) == 128 * budget
    assert float(rows["tome_vision,budget=0.5"]["flops_fraction"]) < float(rows["tome,budget=0.5"]["flops_fraction"])
    res = invoke("sweep", "--methods", "tome_vision", "--budgets", "0.9", "--match", "flops", *common,
                 "--results-dir", tmp_path / "flops")
    assert res.exit_code in (0, INCOMPLETE), res.output
    (sweep_dir,) = (tmp_path / "flops").iterdir()
    row = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}["tome_vision,budget=0.9"]
    assert float(row["kept_tokens"]) == 128 and abs(float(row["flops_fraction"]) - 0.9) <= 0.005


def test_a_sweep_folder_held_by_another_sweep_is_refused(toy, tmp_path):
    from prunevid_bench.harness.runlock import RunLock

    args = ("sweep", "--methods", "fastv", "--budgets", "0.5", "--dataset", toy, "--limit", "1", "--model", "tiny",
            "--max-new-tokens", "2", "--num-frames", "8", "--results-dir", tmp_path)
    first = invoke(*args)
    assert first.exit_code in (0, INCOMPLETE), first.output
    (sweep_dir,) = tmp_path.iterdir()
    with RunLock(sweep_dir):  # another sweep (here: this process) holds the folder
        held = invoke(*args)
    assert held.exit_code == 2 and f"{sweep_dir} is in use by" in held.output, held.output
    assert held.output.strip().splitlines()[-1].startswith("error:")  # one line, after the dataset's preflight line
    again = invoke(*args)  # released: the rerun resumes (every cell done)
    assert again.exit_code in (0, INCOMPLETE) and "0 samples run now" in again.output


@pytest.mark.parametrize("args,message", [
    (["--budgets", "0.5"], "--budgets needs --methods"),
    (["--methods", "tome"], "--methods needs --budgets"),
    (["--methods", "tomee", "--budgets", "0.5"], "did you mean 'tome'"),
    (["--methods", "tome", "--budgets", "0,0.5"], "--budgets values must be in (0, 1], got 0.0"),
    (["--methods", "prunevid_stage1", "--budgets", "0.5"], "--budget needs a method that takes one (prunevid_stage1 take no budget)"),
    (["--methods", "tome", "--budgets", "0.5", "--controls", "random"], "--methods/--budgets make their own grid"),
    (["--methods", "tome_vision", "--budgets", "0.5"], "merger: unmerge hands the LLM every visual token"),
])
def test_methods_grid_refuses_what_it_cannot_run(toy, tmp_path, args, message):
    res = invoke("sweep", *args, "--dataset", toy, "--model", "tiny", "--results-dir", tmp_path)
    assert res.exit_code != 0 and message in res.output, res.output


def test_sweep_budget_fixes_every_cells_kept_fraction(toy, tmp_path):
    res = invoke("sweep", "pruning_layer", "--values", "pruning_layer=1,2", "--preset", "stage2_only", "--budget", "0.25",
                 "--dataset", toy, "--limit", "1", "--model", "tiny", "--max-new-tokens", "2", "--num-frames", "8",
                 "--results-dir", tmp_path)
    assert res.exit_code in (0, INCOMPLETE), res.output
    (sweep_dir,) = tmp_path.iterdir()
    rows = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    assert [(c, r["kept_tokens"]) for c, r in rows.items()] == [
        ("baseline", "64.0"), ("pruning_layer=1", "16.0"), ("pruning_layer=2", "16.0")]
    res = invoke("sweep", "--methods", "tome", "--budgets", "0.5", "--budget", "0.5", "--dataset", toy, "--model", "tiny")
    assert res.exit_code != 0 and "with --methods give --budgets instead" in res.output
