"""`prunevid run --dataset`: the run folder, seeded sampling, preflight, answer modes, errors, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import EXIT_INCOMPLETE as INCOMPLETE
from prunevid_bench.cli import app
from prunevid_bench.config import build_config
from prunevid_bench.errors import PruneVidError
from prunevid_bench.choices import LETTERS, format_mc_prompt
from prunevid_bench.harness.answers import wilson_interval
from prunevid_bench.harness.datasets import load_dataset, sample_rows
from prunevid_bench.harness.evaluate import evaluate_plan, letter_token_ids, plan_dataset
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()


FAST = ["--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4", "--warmup", "0"]  # no warm-up: these count model calls


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """Six toy-world questions with real mp4s (our JSONL format, with categories)."""
    return generate_dataset(tmp_path_factory.mktemp("toy"), 6, seed=3)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def shared_model(tiny_pipe):
    """The CLI's model load is replaced by the session's tiny pipeline: building the model per
    invocation would cost seconds each (model loading is tested in test_cli_run)."""
    import prunevid_bench.pipeline as pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
        yield tiny_pipe


@pytest.fixture(autouse=True)
def _use_shared_model(shared_model):
    return shared_model


@pytest.fixture
def calls(monkeypatch):
    """Count (and optionally sabotage) model calls: calls.fail = {call number: exception}."""

    class Counter:
        n = 0
        fail: dict[int, BaseException] = {}

    original = Pipeline.run

    def counted(self, *args, **kwargs):
        Counter.n += 1
        if Counter.n in Counter.fail:
            raise Counter.fail[Counter.n]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "run", counted)
    Counter.fail = {}
    return Counter


@pytest.fixture(scope="module")
def base_run(toy, tmp_path_factory, shared_model) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("base")
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", out, "--label", "base")
    assert res.exit_code == INCOMPLETE, res.output
    (run_dir,) = out.iterdir()
    return run_dir, res.output


def test_run_folder_contents(base_run, toy):
    run_dir, output = base_run
    assert run_dir.name.startswith("base-data-") and len(run_dir.name) == len("base-data-") + 8
    assert {p.name for p in run_dir.iterdir() if p.name != ".meta-lock"} == {"config.json", "environment.json", "samples.jsonl", "plan.json", "summary.json", "summary.csv"}
    truth = {row["id"]: row for row in read_lines(toy)}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sample_ids"] == list(truth) and config["answer_mode"] == "generate"
    assert config["config"]["model"]["name"] == "tiny" and config["config"]["video"]["num_frames"] == 4
    assert "git_commit" in json.loads((run_dir / "environment.json").read_text())

    rows = read_lines(run_dir / "samples.jsonl")
    assert [r["id"] for r in rows] == list(truth)
    for r in rows:
        assert r["answer"] == truth[r["id"]]["answer"] and r["category"] == truth[r["id"]]["category"]
        assert r["correct"] == (r["prediction"] == r["answer"]) and r["error"] is None
        assert (r["prediction"] is None) == (r["parse_status"] != "parsed")
        assert r["tokens_before_stage1"] == 32 and r["tokens_after"] == 32  # 4 frames of 112x112, nothing pruned
        for key in ("ttft_s", "prefill_s", "decode_s", "peak_memory_bytes", "kv_cache_bytes", "generated_text", "prepare_s"):
            assert key in r, key

    summary = json.loads((run_dir / "summary.json").read_text())
    acc = summary["accuracy"]
    correct = sum(r["correct"] for r in rows)
    assert (acc["n"], acc["correct"]) == (6, correct) and summary["complete"]
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx(wilson_interval(correct, 6))
    assert acc["unparsed"] == sum(r["parse_status"] != "parsed" for r in rows)
    assert set(acc["by_category"]) == {r["category"] for r in rows}
    ttfts = sorted(r["ttft_s"] for r in rows)
    assert summary["metrics"]["ttft_s"]["median"] == pytest.approx((ttfts[2] + ttfts[3]) / 2)
    assert summary["metrics"]["visual_tokens_kept"]["median"] == 32
    (row,) = list(csv.DictReader(open(run_dir / "summary.csv")))
    assert int(row["n"]) == 6 and float(row["ttft_s_median"]) == pytest.approx(summary["metrics"]["ttft_s"]["median"])
    assert "accuracy" in output and "run folder" in output


def test_limit_is_a_seeded_sample_and_recorded(toy, tmp_path):
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--limit", "3", "--seed", "5", "--answer-mode", "logits")
    assert res.exit_code == 0, res.output
    (run_dir,) = tmp_path.iterdir()
    expected = [s.id for s in sample_rows(load_dataset(toy).samples, 3, 5)]
    assert json.loads((run_dir / "config.json").read_text())["sample_ids"] == expected
    assert [r["id"] for r in read_lines(run_dir / "samples.jsonl")] == expected
    all_ids = [row["id"] for row in read_lines(toy)]
    assert expected != all_ids[:3]  # not the file's first rows (seed 5 picks others)


def test_logits_mode_takes_the_best_letter(toy, tmp_path, tiny_pipe):
    tok = tiny_pipe.processor.tokenizer
    assert letter_token_ids(tok, 4) == [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--answer-mode", "logits", "--limit", "2")
    assert res.exit_code == 0, res.output
    (run_dir,) = tmp_path.iterdir()
    rows = read_lines(run_dir / "samples.jsonl")
    sample = next(s for s in load_dataset(toy).samples if s.id == rows[0]["id"])
    cfg = build_config(None, None, {"video.num_frames": 4, "generation.max_new_tokens": 2})
    logits = tiny_pipe.run(tiny_pipe.prepare(sample.video, format_mc_prompt(sample.question, sample.options), cfg), config=cfg).first_token_logits
    letter_logits = logits[letter_token_ids(tok, len(sample.options))]
    assert rows[0]["option_logits"] == pytest.approx(letter_logits.tolist(), abs=1e-4)
    assert rows[0]["prediction"] == LETTERS[int(letter_logits.argmax())] and rows[0]["parse_status"] == "parsed"


def test_resume_after_a_crash_redoes_nothing_and_loses_nothing(toy, tmp_path, calls):
    args = ["run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--label", "r", "--limit", "4"]
    calls.fail = {3: KeyboardInterrupt()}
    res = invoke(*args)
    assert res.exit_code == 130 and "rerun the same command to resume" in res.output
    (run_dir,) = tmp_path.iterdir()
    log = run_dir / "samples.jsonl"
    first = log.read_text()
    assert len(first.splitlines()) == 2 and not (run_dir / "summary.json").exists()
    with open(log, "a") as fh:
        fh.write('{"id": "toy-s3-0000')  # a line torn by a kill mid-write

    calls.n, calls.fail = 0, {}
    res = invoke(*args)
    assert res.exit_code == INCOMPLETE, res.output
    assert calls.n == 2 and "2 of 4 questions already done" in res.output
    text = log.read_text()
    assert text.startswith(first)  # the finished samples are kept as they were
    rows = read_lines(log)
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert json.loads((run_dir / "summary.json").read_text())["accuracy"]["n"] == 4

    calls.n = 0
    assert invoke(*args).exit_code == INCOMPLETE and calls.n == 0  # finished: nothing to do
    calls.n = 0
    res = invoke(*args, "--force")
    assert res.exit_code == INCOMPLETE and calls.n == 4
    assert len(read_lines(log)) == 4 and (run_dir / "backup-1" / "samples.jsonl").read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]


def test_other_settings_get_their_own_folder(toy, tmp_path, calls):
    assert invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--limit", "1").exit_code == INCOMPLETE
    assert invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--limit", "1", "--set", "stage2.keep_ratio=0.3").exit_code == INCOMPLETE
    assert len(list(tmp_path.iterdir())) == 2 and calls.n == 2


def test_refuses_to_resume_into_a_folder_with_other_settings(toy, tmp_path, tiny_pipe):
    plan = plan_dataset(DatasetSpec(toy, limit=1))
    cfg = build_config(None, None, {"video.num_frames": 4, "generation.max_new_tokens": 2})
    evaluate_plan(cfg, plan, tiny_pipe, tmp_path / "run", quiet=True)
    other = build_config(None, None, {"video.num_frames": 4, "generation.max_new_tokens": 3})
    with pytest.raises(PruneVidError, match=r"different settings \(config.generation.max_new_tokens\)"):
        evaluate_plan(other, plan, tiny_pipe, tmp_path / "run", quiet=True)
    with pytest.raises(PruneVidError, match="answer_mode"):
        evaluate_plan(cfg, plan, tiny_pipe, tmp_path / "run", EvalOptions(answer_mode="logits"), quiet=True)


def test_sample_errors_are_recorded_and_the_run_goes_on(toy, tmp_path, calls):
    calls.fail = {2: RuntimeError("boom\nsecond line"), 4: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")}
    args = ["run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--limit", "5"]
    res = invoke(*args)
    assert res.exit_code == INCOMPLETE, res.output
    (run_dir,) = tmp_path.iterdir()
    rows = read_lines(run_dir / "samples.jsonl")
    assert len(rows) == 5
    assert rows[1]["error"] == "RuntimeError: boom" and rows[1]["correct"] is False and rows[1]["prediction"] is None
    assert rows[3]["error"].startswith("CUDA out of memory")
    assert all(r["error"] is None for i, r in enumerate(rows) if i not in (1, 3))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy"]["errors"] == 2 and summary["accuracy"]["n"] == 5 and not summary["complete"]
    assert summary["metrics"]["ttft_s"]["n"] == 3  # errors are not timed

    assert rows[1]["error_transient"] is False and rows[3]["error_transient"] is True

    calls.n, calls.fail = 0, {}
    assert invoke(*args).exit_code == INCOMPLETE and calls.n == 1  # a rerun retries only the transient error (OOM)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy"]["errors"] == 1 and not summary["complete"]  # the final error stays
    calls.n = 0
    assert invoke(*args, "--force").exit_code == INCOMPLETE and calls.n == 5  # tiny's replies never parse
    assert json.loads((run_dir / "summary.json").read_text())["complete"]


def test_preflight_reports_missing_undecodable_and_unanswered_rows(toy, tmp_path, calls):
    rows = read_lines(toy)
    rows[1]["video"] = "videos/missing.mp4"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 50)
    rows[2]["video"] = str(broken)
    del rows[4]["answer"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke("run", "--dataset", data, "--video-root", toy.parent, *FAST, "--results-dir", tmp_path / "out",
                 "--allow-outside-root")  # the broken video lies outside the root
    assert res.exit_code == INCOMPLETE, res.output
    preflight_part = res.output.split("run folder")[0]
    for row_id in (rows[1]["id"], rows[2]["id"], rows[4]["id"]):
        assert row_id in preflight_part
    assert "video not found" in res.output and "cannot decode" in res.output and "no answer" in res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    skipped = {s["id"]: s for s in json.loads((run_dir / "summary.json").read_text())["skipped"]}
    assert skipped.keys() == {rows[1]["id"], rows[2]["id"], rows[4]["id"]}
    assert skipped[rows[4]["id"]]["stage"] == "dataset" and skipped[rows[1]["id"]]["stage"] == "preflight"
    assert calls.n == 3 and len(read_lines(run_dir / "samples.jsonl")) == 3


def test_nothing_loads_when_no_video_passes_preflight(tmp_path, monkeypatch):
    import prunevid_bench.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_config", staticmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "q", "video": "gone.mp4", "question": "Q?", "options": ["a", "b"], "answer": "A"}) + "\n")
    res = invoke("run", "--dataset", data, "--model", "tiny", "--results-dir", tmp_path / "out")
    assert res.exit_code == 2 and "no question of d passed preflight" in res.output
    assert "gone.mp4" in res.output


def test_baseline_agreement_on_shared_ids(base_run, toy, tmp_path):
    base_dir, _ = base_run
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path, "--limit", "3", "--preset", "default",
                 "--set", "stage2.pruning_layer=1", "--baseline", base_dir)
    assert res.exit_code == INCOMPLETE, res.output
    (run_dir,) = tmp_path.iterdir()
    mine = {r["id"]: r for r in read_lines(run_dir / "samples.jsonl")}
    base = {r["id"]: r for r in read_lines(base_dir / "samples.jsonl")}
    agreement = json.loads((run_dir / "summary.json").read_text())["agreement"]
    assert agreement["n"] == 3 and agreement["only_b"] == 3
    assert agreement["agree"] == sum(mine[i]["prediction"] == base[i]["prediction"] for i in mine)
    assert all(r["tokens_after"] < r["tokens_before_stage1"] for r in mine.values())
    assert all((r["pruning_layer"], r["pruning_layer_spec"]) == (1, 1) for r in mine.values())
    assert "agreement with baseline" in res.output


def test_bad_answer_mode_and_baseline(toy, tmp_path):
    res = invoke("run", "--dataset", toy, "--answer-mode", "vote", "--results-dir", tmp_path)
    assert res.exit_code == 2 and "--answer-mode must be one of generate, logits" in res.output
    res = invoke("run", "--dataset", toy, "--baseline", tmp_path, "--results-dir", tmp_path)
    assert res.exit_code == 2 and "is not a dataset run folder" in res.output


def test_clip_bounds_are_sampled_inside(toy, tmp_path):
    """MVBench-style start/end: 4 frames from the first half second (8 fps video) are 8 fps apart."""
    rows = read_lines(toy)[:2]
    rows[0].update(start=0.0, end=0.5)
    data = tmp_path / "bounded.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke("run", "--dataset", data, "--video-root", toy.parent, *FAST, "--results-dir", tmp_path / "out")
    assert res.exit_code == INCOMPLETE, res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    bounded, whole = read_lines(run_dir / "samples.jsonl")
    assert bounded["num_frames"] == whole["num_frames"] == 4
    assert bounded["sampled_fps"] == pytest.approx(8.0) and whole["sampled_fps"] == pytest.approx(2.0)
