"""``python -m lmms_eval --model prunevid`` end to end on the toy task (needs the [lmms] extra).

lmms-eval exits 0 even when a model raised, so every run here is judged by its output files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from typer.testing import CliRunner  # noqa: E402

from prunevid_bench.cli import app  # noqa: E402

TASK_DIR = Path(__file__).resolve().parents[1] / "lmms_tasks" / "prunevid_toy"
N = 20
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """The repository's toy task beside 20 freshly generated questions."""
    folder = tmp_path_factory.mktemp("lmms") / "prunevid_toy"
    shutil.copytree(TASK_DIR, folder, ignore=shutil.ignore_patterns("data", "__pycache__"))
    res = CliRunner().invoke(app, ["toy-data", "--out", str(folder / "data"), "--n", str(N)])
    assert res.exit_code == 0, res.output
    return folder


def lmms_eval(task: Path, out: Path, model_args: str, *extra: str, model: str = "prunevid",
              launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(launcher or ("-m",)), "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", "prunevid_toy",
           "--include_path", str(task), "--output_path", str(out), "--log_samples", "--device", "cpu", *extra]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=out.parent, env={**os.environ, **OFFLINE}, timeout=900)


def scores(out: Path) -> tuple[dict, list[dict]]:
    """lmms-eval's results.json and its logged samples (in doc order); fails when it wrote none."""
    results = sorted(out.glob("*/*_results.json"))
    samples = sorted(out.glob("*/*_samples_prunevid_toy.jsonl"))
    assert results and samples, f"lmms-eval wrote no results under {out}"
    rows = sorted((json.loads(line) for line in samples[-1].read_text().splitlines()), key=lambda r: r["doc_id"])
    return json.loads(results[-1].read_text()), rows


def our_records(out: Path) -> tuple[Path, list[dict]]:
    folders = sorted((out / "prunevid").iterdir())
    assert len(folders) == 1
    return folders[0], [json.loads(line) for line in (folders[0] / "samples.jsonl").read_text().splitlines()]


def harness_run(task: Path, preset: str, results_dir: Path) -> dict[str, dict]:
    """``prunevid run --dataset`` on the same rows: its sample records by id."""
    res = CliRunner().invoke(app, ["run", "--dataset", str(task / "data" / "data.jsonl"), "--preset", preset,
                                   "--model", "toy", "--device", "cpu", "--results-dir", str(results_dir), "--quiet"])
    assert res.exit_code in (0, 3), res.output  # 3: some replies did not parse (counted as wrong)
    (folder,) = results_dir.iterdir()
    return {r["id"]: r for r in map(json.loads, (folder / "samples.jsonl").read_text().splitlines())}


def test_the_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from prunevid_bench.lmms.model import PruneVidLMM

    assert get_model("prunevid") is PruneVidLMM


@pytest.mark.parametrize("preset", ["baseline", "default"])
def test_same_answers_as_our_own_harness(task, tmp_path, preset):
    out = tmp_path / "out"
    run = lmms_eval(task, out, f"pretrained=toy,preset={preset}")
    results, logged = scores(out)
    ours = harness_run(task, preset, tmp_path / "harness")
    docs = [json.loads(line) for line in (task / "data" / "data.jsonl").read_text().splitlines()]
    assert len(logged) == N, run.stdout[-2000:]
    for row in logged:
        mine = ours[docs[row["doc_id"]]["id"]]
        assert row["filtered_resps"] == mine["generated_text"]
        assert row["accuracy"] == float(mine["correct"])
    accuracy = sum(r["correct"] for r in ours.values()) / N
    assert results["results"]["prunevid_toy"]["accuracy,none"] == pytest.approx(accuracy)

    # Our records beside lmms-eval's: the same token counts as our harness measured, per sample
    # in its log and as means in its results.json.
    folder, records = our_records(out)
    assert [(r["task"], r["doc_id"]) for r in records] == [("prunevid_toy", i) for i in range(N)]
    for record, row in zip(records, logged):
        mine = ours[docs[record["doc_id"]]["id"]]
        for key in ("prompt_tokens", "tokens_before_stage1", "tokens_after_stage1", "tokens_after", "kv_cache_bytes"):
            assert record[key] == mine[key], key
        assert row["token_counts"][0]["prunevid"]["tokens_after"] == mine["tokens_after"]
        assert row["token_counts"][0]["input_tokens"] == mine["prompt_tokens"]
    mean_kept = sum(r["tokens_after"] for r in records) / N
    assert results["throughput"]["avg_prunevid_tokens_after"] == pytest.approx(mean_kept)
    assert results["throughput"]["avg_prunevid_ttft_s"] > 0
    elapsed = sum(r["ttft_s"] + r["decode_s"] for r in records)  # lmms-eval's own latency field, from our count
    assert results["throughput"]["avg_latency"] == pytest.approx(elapsed / N)
    assert "avg_total_requests" not in results["throughput"]
    config = json.loads((folder / "config.json").read_text())
    assert config["config"]["stage2"]["enabled"] is (preset == "default")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["by_task"]["prunevid_toy"]["n"] == N
    assert summary["metrics"]["visual_tokens_kept"]["mean"] == pytest.approx(mean_kept)


def test_same_inputs_as_lmms_evals_own_qwen_model(task, tmp_path):
    """On the exported toy checkpoint lmms-eval's qwen2_5_vl (bfloat16, its frames and pixel
    bounds, its system prompt) and ours with pruning off give the same replies."""
    checkpoint = tmp_path / "toy-ckpt"
    assert CliRunner().invoke(app, ["export-toy", str(checkpoint)]).exit_code == 0
    (checkpoint / "prunevid.json").unlink()  # the toy's own policy note: without it, a checkpoint like any other
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    lmms_eval(task, theirs, f"pretrained={checkpoint},device_map=cpu", model="qwen2_5_vl")
    lmms_eval(task, ours, f"pretrained={checkpoint},preset=baseline,dtype=bfloat16")
    _, their_rows = scores(theirs)
    _, our_rows = scores(ours)
    assert [r["filtered_resps"] for r in our_rows] == [r["filtered_resps"] for r in their_rows]
    _, records = our_records(ours)
    assert {r["video_policy"] for r in records} == {"lmms-eval"}  # auto means lmms-eval's policy for a checkpoint
    assert records[0]["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert records[0]["frame_size"] == [448, 448]  # lmms-eval's 256-token minimum upscales the 112 px clips


def test_two_processes_share_the_questions_and_one_records_folder(task, tmp_path):
    """torchrun's rank and world size, as lmms-eval's own models take them (gloo on the CPU)."""
    out = tmp_path / "out"
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m")
    run = lmms_eval(task, out, "pretrained=toy,preset=default", launcher=launcher)
    results, logged = scores(out)
    assert len(logged) == N, run.stderr[-2000:]
    (folder,) = (out / "prunevid").iterdir()
    shares = [[json.loads(line) for line in (folder / f"samples.rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)]
    assert sorted(r["doc_id"] for share in shares for r in share) == list(range(N))
    assert all(len(share) == N // 2 for share in shares)
    everyone = [r for share in shares for r in share]
    mean_kept = sum(r["tokens_after"] for r in everyone) / N
    assert results["throughput"]["avg_prunevid_tokens_after"] == pytest.approx(mean_kept)  # both ranks' samples


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch_size", "2"], "prunevid: --batch_size 2 is refused: prunevid runs one sample per forward"),
        (["--gen_kwargs", "temperature=0.7"], "prunevid: task prunevid_toy: sampling (temperature=0.7) is refused"),
        (["--gen_kwargs", "temperature=abc"], "prunevid: task prunevid_toy: temperature='abc' in --gen_kwargs is not a number"),
    ],
)
def test_refusals_are_one_line_and_fail_the_run(task, tmp_path, extra, message):
    out = tmp_path / "out"
    run = lmms_eval(task, out, "pretrained=toy", *extra)
    assert run.returncode == 1
    assert message in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert not list(out.glob("*/*_results.json"))


def test_a_request_the_pipeline_refuses_ends_the_run_naming_it(task, tmp_path):
    broken = tmp_path / "broken"  # not the task's name: lmms-eval reads a task name that is a folder as a path
    shutil.copytree(task, broken)
    docs = [json.loads(line) for line in (broken / "data" / "data.jsonl").read_text().splitlines()]
    (broken / "data" / docs[3]["video"]).write_bytes(b"not a video")
    out = tmp_path / "out"
    run = lmms_eval(broken, out, "pretrained=toy")
    assert run.returncode == 1
    assert "prunevid: task prunevid_toy, doc 3:" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert not list(out.glob("*/*_results.json"))
    _, records = our_records(out)
    assert [r["doc_id"] for r in records] == [0, 1, 2]  # what ran before it is kept


def test_model_args_reach_the_config_and_loglikelihood_is_refused(tmp_path):
    from prunevid_bench.lmms.model import PruneVidLMM

    records = tmp_path / "records"
    model = PruneVidLMM.create_from_arg_string(
        f'pretrained=toy,preset=default,stage2.keep_ratio=0.2,tau=0.9,label="a,b",records={records},system_prompt=Be brief.',
        {"batch_size": 1, "device": "cpu"},
    )

    # One request in-process: the model_args' system prompt comes first, the task's stop string cuts the reply.
    from lmms_eval.api.instance import Instance

    example = Path(__file__).resolve().parents[1] / "examples" / "toy_sample.mp4"
    doc = {"video": str(example), "question": "In which direction does the green circle move?\n(A) left\n(B) down"}
    model.task_dict = {"t": {"test": [doc]}}

    def doc_to_messages(d):
        return [{"role": "user", "content": [{"type": "video", "url": d["video"]}, {"type": "text", "text": d["question"]}]}]

    request = Instance("generate_until", ("", doc_to_messages, {"max_new_tokens": 8, "until": ["("]}, 0, "t", "test"), 0,
                       metadata={"task": "t", "doc_id": 0, "repeats": 1})
    (reply,) = model.generate_until([request])
    record = json.loads((records / "samples.jsonl").read_text().splitlines()[-1])
    assert record["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert record["generated_tokens"] == reply.token_counts.output_tokens <= 8
    assert reply.text == record["reply"] == record["generated_text"].split("(")[0]
    config = json.loads((records / "config.json").read_text())
    assert (config["config"]["stage2"]["keep_ratio"], config["config"]["stage1"]["tau"]) == (0.2, 0.9)
    assert config["label"] == "a,b" and config["config"]["model"]["device"] == "cpu"
    with pytest.raises(SystemExit, match="prunevid: loglikelihood requests .* are not supported"):
        model.loglikelihood([])
    with pytest.raises(SystemExit, match="prunevid: model_args: unknown config key 'keep_ratoi'"):
        PruneVidLMM.create_from_arg_string("pretrained=toy,keep_ratoi=0.2", {"batch_size": 1})
