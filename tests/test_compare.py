"""`prunevid compare` on saved runs: values, deltas, outputs, and refusing mismatched runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.config import build_config
from prunevid_bench.harness.answers import agreement
from prunevid_bench.harness.evaluate import evaluate_dataset
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()
FAST = {"video.num_frames": 4, "generation.max_new_tokens": 2}




def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})  # the table's full width


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipe) -> dict[str, Path]:
    """Saved dataset runs: a baseline, a pruned run, and two that do not match them."""
    toy = generate_dataset(tmp_path_factory.mktemp("toy"), 6, seed=3)
    out = tmp_path_factory.mktemp("runs")
    quiet = Console(quiet=True)

    def run(label, preset=None, limit=4, **overrides):
        cfg = build_config(preset, None, {**FAST, **overrides})
        options = EvalOptions(preset=preset, results_dir=out, label=label)
        return evaluate_dataset(cfg, DatasetSpec(toy, limit=limit), options, pipeline=tiny_pipe, console=quiet).run_dir

    return {
        "base": run("base"),
        "pruned": run("pruned", "default", **{"stage2.pruning_layer": 1}),
        "fewer_questions": run("fewer", limit=3),
        "fewer_frames": run("frames", **{"video.num_frames": 2}),
    }


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_table_values_and_deltas(runs, tmp_path):
    res = invoke("compare", runs["base"], runs["pruned"], "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert "base" in res.output and "pruned" in res.output
    base_row, pruned_row = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert base_row["is_baseline"] == "True" and pruned_row["is_baseline"] == "False"
    b, p = summary(runs["base"]), summary(runs["pruned"])
    assert float(pruned_row["tokens_in"]) == b["metrics"]["visual_tokens"]["median"] == 32
    kept = p["metrics"]["visual_tokens_kept"]["median"]
    assert float(pruned_row["visual_tokens_kept"]) == kept < float(pruned_row["tokens_after_visual_methods"]) < 32
    assert float(pruned_row["compression"]) == pytest.approx(kept / 32)
    assert float(pruned_row["ttft_s"]) == p["metrics"]["ttft_s"]["median"]
    assert float(pruned_row["ttft_speedup"]) == pytest.approx(b["metrics"]["ttft_s"]["median"] / p["metrics"]["ttft_s"]["median"])
    assert float(pruned_row["kv_ratio"]) == pytest.approx(p["metrics"]["kv_cache_bytes"]["median"] / b["metrics"]["kv_cache_bytes"]["median"])
    assert float(pruned_row["kv_ratio"]) < 1  # Stage 3 really shortened the cache
    assert float(pruned_row["accuracy"]) == p["accuracy"]["accuracy"]
    assert float(pruned_row["delta_accuracy"]) == pytest.approx(p["accuracy"]["accuracy"] - b["accuracy"]["accuracy"])
    assert float(pruned_row["agreement"]) == agreement(samples(runs["pruned"]), samples(runs["base"]))["agreement"]
    assert float(base_row["delta_accuracy"]) == 0 and float(base_row["ttft_speedup"]) == 1
    assert pruned_row["stages"] == "S1 tau=0.8 c=0.5 seg=0.25 + S2 keep=0.4 L=1 prunevid" and base_row["stages"] == "off"
    (base_csv,), (pruned_csv,) = (csv.DictReader(open(runs[k] / "summary.csv")) for k in ("base", "pruned"))
    assert (pruned_csv["pruning_layer"], pruned_csv["pruning_layer_spec"]) == ("1", "1")
    assert (base_csv["pruning_layer"], base_csv["pruning_layer_spec"]) == ("", "")  # no LLM-layer method: no layer
    md = (tmp_path / "compare.md").read_text().splitlines()
    assert md[0].startswith("| run | stages | model |") and len(md) == 4 and md[3].startswith(f"| {runs['pruned'].name} |")


def test_baseline_is_the_run_with_stages_off_or_the_one_named(runs, tmp_path):
    res = invoke("compare", runs["pruned"], runs["base"], "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "a" / "compare.csv")))
    assert [r["is_baseline"] for r in rows] == ["False", "True"]
    res = invoke("compare", runs["pruned"], "--baseline", runs["base"], "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "b" / "compare.csv")))
    assert [r["run"] for r in rows] == [runs["base"].name, runs["pruned"].name] and rows[0]["is_baseline"] == "True"
    res = invoke("compare", runs["pruned"], "--out", tmp_path / "c")
    assert res.exit_code == 0 and "deltas are left empty" in res.output
    (row,) = list(csv.DictReader(open(tmp_path / "c" / "compare.csv")))
    assert row["delta_accuracy"] == "" and row["ttft_speedup"] == ""


def test_markdown_to_stdout(runs):
    res = invoke("compare", runs["base"], runs["pruned"], "--markdown")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("|")]
    assert len(lines) == 4 and lines[1].startswith("|---|---|---|---:")
    assert "+0.0 pt" in lines[2] and "1.00×" in lines[2]


@pytest.mark.parametrize(
    "other,message",
    [("fewer_questions", "(3 vs 4, 3 shared)"), ("fewer_frames", "differ in frames (frames num_frames=2 vs num_frames=4)")],
)
def test_refuses_mismatched_runs_unless_allowed(runs, other, message):
    res = invoke("compare", runs["base"], runs[other])
    assert res.exit_code == 2 and message in res.output and "--allow-mixed" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = invoke("compare", runs["base"], runs[other], "--allow-mixed", "--markdown")
    assert res.exit_code == 0, res.output
    res = invoke("compare", runs["base"], runs[other], "--allow-mismatch", "--markdown")  # the old name still works
    assert res.exit_code == 0, res.output


def _as_other_model(run_dir: Path, dest: Path) -> Path:
    """A copy of a run folder recorded as if another model (the toy) had answered."""
    import shutil

    shutil.copytree(run_dir, dest)
    meta = json.loads((dest / "config.json").read_text())
    meta["config"]["model"]["name"] = "toy"
    meta["run"] = dest.name
    (dest / "config.json").write_text(json.dumps(meta))
    env = json.loads((dest / "environment.json").read_text())
    env["model_name"], env["model_weights"] = "toy", "toy sha256:0123"
    (dest / "environment.json").write_text(json.dumps(env))
    return dest


def test_refuses_another_model_or_video_policy_and_allow_mixed_marks_them(runs, tiny_pipe, tmp_path):
    """The same questions through another model, or through the same model under another video
    policy (other frames, other tokens), are not a pruning effect: refused in one line naming the
    fields; --allow-mixed compares anyway and shows those fields as columns marked ≠."""
    env = json.loads((runs["base"] / "environment.json").read_text())
    assert env["model_weights"] == "tiny (built in code, seeded)" and env["model_family"] == "qwen2_5_vl"
    assert env["video_policy"] == "processor" and len(env["prompt_template"]) == 12
    other = _as_other_model(runs["base"], tmp_path / "other-model")
    res = invoke("compare", runs["base"], other)
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "differ in model, weights (model toy vs tiny)" in res.output and "--allow-mixed" in res.output

    toy = generate_dataset(tmp_path / "toy", 6, seed=3)
    cfg = build_config(None, None, {**FAST, "video.policy": "qwen"})
    qwen = evaluate_dataset(cfg, DatasetSpec(toy, limit=4), EvalOptions(results_dir=tmp_path / "q", label="qwen"),
                            pipeline=tiny_pipe, console=Console(quiet=True)).run_dir
    res = invoke("compare", runs["base"], qwen)
    assert not any(r.get("error") for r in (json.loads(x) for x in (qwen / "samples.jsonl").read_text().splitlines()))
    assert res.exit_code == 2 and "differ in policy (policy qwen vs processor)" in res.output

    res = invoke("compare", runs["base"], qwen, other, "--allow-mixed", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "model≠" in res.output and "policy≠" in res.output and "differs between these runs" in res.output
    rows = list(csv.DictReader(open(tmp_path / "o" / "compare.csv")))
    assert [r["policy"] for r in rows] == ["processor", "qwen", "processor"]
    assert [r["model"] for r in rows] == ["tiny", "tiny", "toy"]
    assert rows[0]["differs_in"] == "model;weights;policy"
    header = (tmp_path / "o" / "compare.md").read_text().splitlines()[0]
    assert header.startswith("| run | stages | model | model≠ | weights≠ | policy≠ | n |")


def test_single_video_runs_compare_too(tmp_path):
    from tests.conftest import write_clip

    clip = write_clip(tmp_path / "c.mp4", 4)
    for extra in ([], ["--preset", "default", "--set", "stage2.pruning_layer=1"], ["--preset", "default"]):
        res = invoke("run", clip, "What?", "--model", "tiny", "--num-frames", "4", "--max-new-tokens", "2", "--results-dir", tmp_path / "r", *extra)
        assert res.exit_code == 0, res.output
    res = invoke("compare", *sorted((tmp_path / "r").iterdir()), "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "o" / "compare.csv")))
    assert [r["n"] for r in rows] == ["1", "1", "1"] and rows[0]["accuracy"] == ""
    assert sum(r["is_baseline"] == "True" for r in rows) == 1
    # The preset's relative "10/28" is labelled with the layer it resolved to on the 4-layer model.
    stages = "S1 tau=0.8 c=0.5 seg=0.25 + S2 keep=0.4 L={} prunevid"
    assert sorted(r["stages"] for r in rows) == sorted(["off", stages.format(1), stages.format("1 (10/28)")])


def test_single_video_runs_with_an_answer_are_scored(tmp_path):
    """`make demo`'s shape: the bundled clip's question (answer (A) left) to the toy model, timed
    over repeats, marked right or wrong, then compared."""
    from tests.conftest import PROJECT_ROOT

    args = ["run", PROJECT_ROOT / "examples" / "toy_sample.mp4", "In which direction does the green circle move?",
            "-o", "left", "-o", "down", "-o", "up", "-o", "right", "--warmup", "1", "--repeats", "2"]
    res = invoke(*args, "--answer", "A", "--results-dir", tmp_path / "r", "--label", "a-right")
    assert res.exit_code == 0, res.output
    assert "choice: (A) left — correct" in res.output and "median of 2 runs after 1 warm-up" in res.output
    res = invoke(*args, "--answer", "b", "--results-dir", tmp_path / "r", "--label", "b-wrong")
    assert res.exit_code == 0, res.output
    assert "choice: (A) left — wrong, the answer is (B) down" in res.output
    right, wrong = sorted((tmp_path / "r").iterdir(), key=lambda p: p.name.endswith("b-wrong"))
    result = json.loads((right / "result.json").read_text())
    assert (result["answer"], result["prediction"], result["correct"]) == ("A", "A", True)
    assert result["ttft_s"] == result["ttft_s_median"] and result["prefill_s"] == result["prefill_s_median"]
    assert json.loads((wrong / "result.json").read_text())["correct"] is False

    res = invoke("compare", right, wrong, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "o" / "compare.csv"))}
    a, b = rows[right.name], rows[wrong.name]
    assert (a["is_baseline"], a["n"], float(a["accuracy"]), float(b["accuracy"])) == ("True", "1", 1.0, 0.0)
    assert float(a["ci_low"]) == pytest.approx(0.2065, abs=1e-3)  # Wilson's interval for 1 of 1
    assert float(b["delta_accuracy"]) == -1.0 and float(b["agreement"]) == 1.0  # the same choice, scored apart


def test_runs_saved_before_the_layer_was_recorded_show_the_configured_one():
    from prunevid_bench.harness.compare import stages_text
    from prunevid_bench.harness.runs import SavedRun

    cfg = build_config("default", None, {"pruning_layer": 10}).to_dict()
    old = SavedRun(Path("old"), {}, cfg, {"metrics": {}}, None)  # a summary.json without "pruning_layer"
    assert old.pruning_layer == 10 and stages_text(cfg, old.pruning_layer).endswith("L=10 prunevid")


def test_not_a_run_folder(tmp_path):
    res = invoke("compare", tmp_path)
    assert res.exit_code == 2 and "is not a run folder" in res.output


def test_another_method_is_named_and_never_taken_for_the_baseline(runs, tiny_pipe, tmp_path):
    """A run with a method other than PruneVid's (the fastv control) is no baseline, says which
    method it ran, and carries the analytic ideal speed-up beside the measured one."""
    toy = generate_dataset(tmp_path / "toy", 6, seed=3)
    cfg = build_config(None, None, {**FAST, "fastv.enabled": True, "fastv.pruning_layer": 1})
    fastv = evaluate_dataset(cfg, DatasetSpec(toy, limit=4), EvalOptions(results_dir=tmp_path / "runs", label="fastv"),
                             pipeline=tiny_pipe, console=Console(quiet=True)).run_dir
    res = invoke("compare", fastv, runs["base"], "--out", tmp_path / "cmp")
    assert res.exit_code == 0, res.output
    fastv_row, base_row = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert (fastv_row["is_baseline"], base_row["is_baseline"]) == ("False", "True")
    assert fastv_row["stages"] == "fastv L=1 keep_ratio=0.5 kv_cache=original"
    assert float(fastv_row["ideal_speedup"]) == summary(fastv)["metrics"]["ideal_speedup"]["median"] > 1
    assert float(base_row["ideal_speedup"]) == 1
    (row,) = csv.DictReader(open(fastv / "summary.csv"))
    assert row["methods"] == "fastv" and row["fastv.keep_ratio"] == "0.5" and "stage1.tau" not in row


def test_lmms_eval_records_compare_and_are_checked_like_any_run(tiny_pipe, tmp_path):
    """The folder the lmms-eval plugin writes beside lmms-eval's output records the same inputs;
    `compare` reads it (medians, no accuracy: lmms-eval scores) and refuses a mismatch."""
    from prunevid_bench.lmms.records import RunRecords
    from tests.conftest import write_clip

    clip = write_clip(tmp_path / "c.mp4", 4)
    folders = []
    for name, preset in (("base", None), ("pruned", "default")):
        cfg = build_config(preset, None, {**FAST, "stage2.pruning_layer": 1})
        records = RunRecords(tmp_path / name, cfg, tiny_pipe, {"preset": preset})
        for doc in range(2):
            records.add("toy_task", doc, "test", "What?", "x", tiny_pipe.run(clip, "What?", config=cfg))
        records.write_summary()
        folders.append(tmp_path / name)
    res = invoke("compare", *folders, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    base, pruned = list(csv.DictReader(open(tmp_path / "o" / "compare.csv")))
    assert base["is_baseline"] == "True" and base["model"] == pruned["model"] == "tiny"
    assert float(pruned["visual_tokens_kept"]) < float(base["visual_tokens_kept"]) and pruned["agreement"] == ""
    env = json.loads((folders[1] / "environment.json").read_text())
    env["dtype"] = "bfloat16"
    (folders[1] / "environment.json").write_text(json.dumps(env))
    res = invoke("compare", *folders)
    assert res.exit_code == 2 and "differ in dtype (dtype bfloat16 vs float32)" in res.output


def test_a_baseline_with_other_inputs_gets_no_agreement(runs, tiny_pipe, tmp_path):
    """`run --dataset --baseline B` (and `summarize`) over a baseline that saw other inputs (here
    another video policy) reports no agreement or paired test, and says why."""
    toy = generate_dataset(tmp_path / "toy", 6, seed=3)
    options = dict(results_dir=tmp_path / "r", label="vs-base", baseline=runs["base"])
    same = evaluate_dataset(build_config(None, None, FAST), DatasetSpec(toy, limit=4), EvalOptions(**options),
                            pipeline=tiny_pipe, console=Console(quiet=True))
    assert "agreement" in same.summary and "paired" in same.summary and "baseline_mismatch" not in same.summary
    cfg = build_config(None, None, {**FAST, "video.policy": "qwen"})
    other = evaluate_dataset(cfg, DatasetSpec(toy, limit=4), EvalOptions(**{**options, "label": "qwen-vs-base"}),
                             pipeline=tiny_pipe, console=Console(quiet=True))
    assert "agreement" not in other.summary and "paired" not in other.summary
    assert other.summary["complete"] and "differ in policy (policy qwen vs processor)" in other.summary["baseline_mismatch"]
    res = invoke("summarize", other.run_dir)
    assert "not computed: cannot compare with --baseline" in " ".join(res.output.split())


def test_a_folder_written_with_the_old_stage_names_compares_and_summarizes_the_same(runs, tmp_path):
    """A run folder from before the record named places (only ``tokens_before_stage1`` & co. in
    its records and summary): ``compare`` and ``summarize`` read it through the old names
    (``report.RECORD_ALIASES``) and give the same tokens as the folder they were made from."""
    import shutil

    from prunevid_bench.report import RECORD_ALIASES

    old = tmp_path / "old-run"
    shutil.copytree(runs["pruned"], old)
    new_names = set(RECORD_ALIASES.values())
    stage_names = [k for k in RECORD_ALIASES if "stage" in k]
    lines = [json.loads(line) for line in (old / "samples.jsonl").read_text().splitlines()]
    (old / "samples.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k not in new_names}) + "\n"
                                               for r in lines))
    s = summary(old)
    s["metrics"] = {("tokens_before_stage1" if k == "visual_tokens" else "tokens_after_stage1"
                     if k == "tokens_after_visual_methods" else "tokens_after" if k == "visual_tokens_kept" else k): v
                    for k, v in s["metrics"].items()}
    (old / "summary.json").write_text(json.dumps(s))
    assert all(k in lines[0] for k in stage_names)  # the copy holds the old names only
    res = invoke("compare", runs["base"], runs["pruned"], old, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    _, want, got = list(csv.DictReader(open(tmp_path / "o" / "compare.csv")))  # in the order given
    for key in ("tokens_in", "tokens_after_visual_methods", "visual_tokens_kept", "stages"):
        assert got[key] == want[key] and got[key] not in ("", "None"), key
    res = invoke("summarize", old)
    assert res.exit_code in (0, 3), res.output  # recomputed from the old records (3: the tiny model leaves answers unparsed)
    metrics = summary(old)["metrics"]
    assert metrics["visual_tokens_kept"] == summary(runs["pruned"])["metrics"]["visual_tokens_kept"]
