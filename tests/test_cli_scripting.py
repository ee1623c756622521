"""Output that scripts and batch jobs can use: --version, --json, --quiet, exit codes, plain
progress lines off a terminal, flags refused where they do not apply, and sweep grids checked
before anything runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prunevid_bench import __version__
from prunevid_bench.cli import EXIT_INCOMPLETE, app
from prunevid_bench.harness import progress
from prunevid_bench.harness.progress import PlainProgress, RichProgress, progress_for
from prunevid_bench.config import build_config
from prunevid_bench.harness.sweep import expand_cells, grid_spec
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()
FAST = ["--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("toy"), 4, seed=3)


@pytest.fixture(scope="module")
def clip16(tmp_path_factory) -> Path:
    """Enough frames for the shared tiny pipeline's own config (a single-video run takes the
    loaded pipeline's video settings, and the loader is replaced below)."""
    from tests.conftest import write_clip

    return write_clip(tmp_path_factory.mktemp("clip") / "clip16.mp4", 16)


@pytest.fixture(autouse=True)
def calls(tiny_pipe, monkeypatch):
    """The session's tiny pipeline for every load, and a count of samples run."""
    import prunevid_bench.pipeline as pipeline

    counter = SimpleNamespace(n=0)
    original = Pipeline.run

    def counted(self, *args, **kwargs):
        counter.n += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
    monkeypatch.setattr(Pipeline, "run", counted)
    return counter


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"prunevid-bench {__version__}"


def test_help_names_the_exit_codes():
    for command in ([], ["run"], ["sweep"]):
        res = invoke(*command, "--help")
        assert res.exit_code == 0
        text = " ".join(res.output.split())
        assert "Exit codes: 0 every selected sample gave a parsed answer; 3 finished, but samples were skipped" in text


# ---------------------------------------------------------------------------------------------
# Exit codes


def test_exit_0_only_when_every_sample_is_answered(toy, tmp_path):
    res = invoke("run", "--dataset", toy, *FAST, "--answer-mode", "logits", "--results-dir", tmp_path)
    assert res.exit_code == 0, res.output  # logits mode always yields a letter
    assert "incomplete" not in res.output


def test_exit_3_when_replies_are_unparsed(toy, tmp_path):
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path)
    (run_dir,) = tmp_path.iterdir()
    unparsed = json.loads((run_dir / "summary.json").read_text())["accuracy"]["unparsed"]
    assert unparsed > 0  # the tiny model's random weights give no letter
    assert res.exit_code == EXIT_INCOMPLETE and f"incomplete: {unparsed} unparsed (exit code 3)" in res.stderr


def test_exit_2_for_usage_errors(toy, tmp_path):
    assert invoke("run", "--dataset", toy, "--no-such-flag").exit_code == 2
    assert invoke("run", "--dataset", toy, "--limit", "many").exit_code == 2


def test_single_video_with_options_exits_3_when_unparsed(clip16, tmp_path):
    res = invoke("run", clip16, "Which?", "-o", "red", "-o", "blue", *FAST, "--results-dir", tmp_path)
    assert res.exit_code in (0, EXIT_INCOMPLETE), res.output
    (run_dir,) = tmp_path.iterdir()
    status = json.loads((run_dir / "result.json").read_text())["parse_status"]
    assert res.exit_code == (0 if status == "parsed" else EXIT_INCOMPLETE), res.output
    res = invoke("run", clip16, "What is happening?", *FAST, "--results-dir", tmp_path)
    assert res.exit_code == 0  # a free-form question has nothing to parse


@pytest.mark.parametrize("flag", [["--limit", "3"], ["--answer-mode", "logits"], ["--baseline", "."], ["--force"],
                                  ["--wait"], ["--seed", "1"], ["--video-root", "."], ["--format", "jsonl"]])
def test_dataset_only_flags_are_refused_for_one_video(flag, clip16, tmp_path, calls):
    res = invoke("run", clip16, "Q", *FAST, *flag, "--results-dir", tmp_path)
    assert res.exit_code == 2
    assert res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1, res.output
    assert f"{flag[0]} only apply to --dataset" in res.output
    assert calls.n == 0 and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# --json and --quiet


def test_run_json_is_the_summary_on_stdout(toy, tmp_path):
    res = invoke("run", "--dataset", toy, *FAST, "--answer-mode", "logits", "--results-dir", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # nothing but the JSON on stdout
    (run_dir,) = tmp_path.iterdir()
    assert data["run_dir"] == str(run_dir)
    assert {k: v for k, v in data.items() if k != "run_dir"} == json.loads((run_dir / "summary.json").read_text())
    assert "dataset data (jsonl)" in res.stderr and "accuracy" in res.stderr  # human text went to stderr


def test_single_run_json_is_the_record(clip16, tmp_path):
    res = invoke("run", clip16, "What is happening?", *FAST, "--results-dir", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    (run_dir,) = tmp_path.iterdir()
    assert data["run_dir"] == str(run_dir) and data["generated_text"] == json.loads((run_dir / "result.json").read_text())["generated_text"]
    assert "answer:" in res.stderr


def test_quiet_prints_nothing_and_json_still_comes(toy, tmp_path):
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--quiet")
    assert res.exit_code == EXIT_INCOMPLETE and res.output == ""
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--quiet", "--json")
    assert res.stderr == "" and json.loads(res.stdout)["accuracy"]["n"] == 4


def test_sweep_and_compare_json(toy, tmp_path):
    res = invoke("sweep", "tau", "--values", "tau=0.7", "--dataset", toy, "--limit", "2", *FAST, "--answer-mode",
                 "logits", "--results-dir", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["cell"] for r in data["rows"]] == ["baseline", "tau=0.7"] and data["rows"][0]["n"] == 2
    assert "cell 1/2" in res.stderr
    res = invoke("compare", data["sweep_dir"], "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["runs"]
    assert [r["run"] for r in rows] == ["baseline", "tau=0.7"] and rows[0]["is_baseline"]
    assert "Comparison" in res.stderr


# ---------------------------------------------------------------------------------------------
# Progress off a terminal


def test_a_log_file_gets_plain_progress_lines(toy, tmp_path):
    res = invoke("run", "--dataset", toy, *FAST, "--answer-mode", "logits", "--results-dir", tmp_path)
    lines = [line for line in res.output.splitlines() if line.startswith("progress ")]
    assert len(lines) == 4  # 4 questions: each one is more than 5% of the run
    assert lines[-1].split(": ", 1)[1].startswith("4/4 (100%), accuracy so far ")
    assert "samples/s, ETA 0 s" in lines[-1]
    assert "\x1b" not in res.output  # no bar, no escape codes


def test_plain_progress_every_5_percent_or_30_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    console = Console(file=__import__("io").StringIO(), width=200)
    bar = PlainProgress(console, "run", 1000, 0, 0)
    for i in range(49):  # 49 of 1000 samples in 10 s: under 5% and under 30 s
        now[0] += 10 / 49
        bar.advance({"correct": i % 2 == 0})
    assert console.file.getvalue() == ""
    now[0] += 0.1
    bar.advance({"correct": True})  # the 50th: 5%
    assert console.file.getvalue() == "progress run: 50/1000 (5%), accuracy so far 52.0% (26/50), 4.95 samples/s, ETA 3 min 12 s\n"
    now[0] += 31
    bar.advance({"correct": False})  # one more sample, but 30 s have passed
    assert console.file.getvalue().count("\n") == 2 and "51/1000" in console.file.getvalue()


def test_a_terminal_keeps_the_rich_bar():
    assert isinstance(progress_for(Console(force_terminal=True), "r", 3, 0, 0), RichProgress)
    assert isinstance(progress_for(Console(force_terminal=False), "r", 3, 0, 0), PlainProgress)


# ---------------------------------------------------------------------------------------------
# Sweep grids


def test_duplicate_sweep_values_run_once_with_a_note(toy, tmp_path):
    notes: list[str] = []
    assert grid_spec(["tau"], ["tau=0.7,0.7,0.70,0.8"], None, notes) == {"stage1.tau": [0.7, 0.8]}
    assert notes == ["tau=0.7 is given more than once; it runs once"] * 2
    assert grid_spec([], ["stage1.enabled=true,1"], None) == {"stage1.enabled": [True, 1]}  # true is not 1
    cells = expand_cells(build_config("stage2_only"), {"stage2.keep_ratio": [0.3]}, ["random", "random"])
    assert [c.name for c in cells] == ["baseline", "keep_ratio=0.3", "keep_ratio=0.3+random"]
    res = invoke("sweep", "tau", "--values", "tau=0.7,0.7", "--dataset", toy, "--limit", "1", *FAST,
                 "--results-dir", tmp_path, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "note: tau=0.7 is given more than once; it runs once" in res.output and "2 cells; nothing run" in res.output


def test_an_invalid_cell_stops_the_sweep_before_any_cell_runs(toy, tmp_path, calls):
    res = invoke("sweep", "pruning_layer", "--values", "pruning_layer=1,99", "--dataset", toy, "--limit", "1", *FAST,
                 "--results-dir", tmp_path)
    assert res.exit_code == 2
    error = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert error == ["error: sweep cell pruning_layer=99: stage2.pruning_layer must be in [0, 3] for this model "
                     "(4 layers), got 99; or give a relative depth such as '10/28'"]
    assert calls.n == 0  # not even the baseline ran
    assert not any(p.name == "cells" for p in tmp_path.rglob("*"))


def test_sweep_csv_leaves_stage2_values_blank_where_stage2_is_off(toy, tmp_path):
    res = invoke("sweep", "--values", "keep_ratio=0.5", "--values", "stage2.enabled=false,true", "--dataset", toy,
                 "--limit", "1", *FAST, "--set", "stage2.pruning_layer=1", "--results-dir", tmp_path)
    assert res.exit_code == EXIT_INCOMPLETE, res.output
    (sweep_dir,) = tmp_path.iterdir()
    rows = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    assert {c: (r["keep_ratio"], r["stage2.enabled"]) for c, r in rows.items()} == {
        "baseline": ("", "False"),
        "keep_ratio=0.5,stage2.enabled=false": ("", "False"),
        "keep_ratio=0.5,stage2.enabled=true": ("0.5", "True"),
    }
