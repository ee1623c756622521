"""Hostile inputs and failing disks: each ends in one line saying what to do, a non-zero exit and
nothing lost, never a traceback or a long silent run."""

from __future__ import annotations

import errno
import json
import os
import pathlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import EXIT_INCOMPLETE as INCOMPLETE
from prunevid_bench.cli import app
from prunevid_bench.harness.datasets import load_dataset
from prunevid_bench.harness.runs import SampleLog
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.report import write_json
from prunevid_bench.toy.world import generate_dataset
from tests.conftest import write_clip

runner = CliRunner()
FAST = ["--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4", "--warmup", "0"]  # no warm-up: these count model calls


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, *fragments: str) -> str:
    """Exit 2 and stderr is exactly one `error:` line holding every fragment; returns it."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("toy"), 3, seed=5)


@pytest.fixture(scope="module")
def clip16(clip_dir) -> Path:
    """Single runs on the shared pipeline sample its own 16 frames (the CLI's --num-frames goes
    into the config of a pipeline it would load), so the clip must hold 16."""
    return write_clip(clip_dir / "clip16.mp4", 16)


@pytest.fixture
def shared_model(tiny_pipe, monkeypatch):
    """The session's tiny pipeline instead of a model load per command (loading is tested below)."""
    import prunevid_bench.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
    return tiny_pipe


@pytest.fixture
def no_model(monkeypatch):
    import prunevid_bench.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_config", staticmethod(lambda *a, **k: pytest.fail("the model was loaded")))


def fail_mkdir_under(monkeypatch, root: Path, code: int) -> None:
    """Creating a folder under ``root`` fails with ``code`` (as on a read-only mount; we run as root,
    so permissions alone cannot make a folder unwritable)."""
    original = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(Path(self).absolute()).startswith(str(root.absolute())):
            raise OSError(code, os.strerror(code), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


# ---------------------------------------------------------------- disks


def test_read_only_results_dir_dataset(toy, tmp_path, monkeypatch, shared_model):
    fail_mkdir_under(monkeypatch, tmp_path / "ro", errno.EROFS)
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path / "ro")
    one_line_error(res, "Read-only", "--results-dir")
    assert not (tmp_path / "ro").exists()


def test_read_only_results_dir_single_run(clip16, tmp_path, monkeypatch, shared_model):
    fail_mkdir_under(monkeypatch, tmp_path / "ro", errno.EROFS)
    one_line_error(invoke("run", clip16, "Q", *FAST, "--results-dir", tmp_path / "ro"), "read-only")


def test_unwritable_results_dir_is_refused_before_the_model_loads(clip8, tmp_path, monkeypatch, no_model):
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: not mode & os.W_OK and access(path, mode, **k))
    one_line_error(invoke("run", clip8, "Q", *FAST, "--results-dir", tmp_path), "cannot write to", "--results-dir")
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    one_line_error(invoke("run", clip8, "Q", *FAST, "--results-dir", tmp_path / "file" / "sub"), "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x"


def test_full_disk_mid_run_loses_nothing(toy, tmp_path, monkeypatch, shared_model):
    """The disk fills while the second sample's line is written (half of it reaches the file)."""
    original = SampleLog.write
    written = []

    def full_after_one(self, record):
        if written:
            self._fh.write(json.dumps(record)[:25])
            self._fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        written.append(record["id"])
        original(self, record)

    monkeypatch.setattr(SampleLog, "write", full_after_one)
    args = ["run", "--dataset", toy, *FAST, "--results-dir", tmp_path]
    one_line_error(invoke(*args), "samples.jsonl", "disk is full", "rerun the same command")
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "samples.jsonl").read_text().splitlines()[0].startswith('{"id": "' + written[0])

    monkeypatch.setattr(SampleLog, "write", original)
    res = invoke(*args)
    assert res.exit_code == INCOMPLETE, res.output
    assert "1 of 3 questions already done" in res.output
    rows = read_lines(run_dir / "samples.jsonl")  # the torn line was cut, every line parses
    assert [r["id"] for r in rows][0] == written[0] and len({r["id"] for r in rows}) == len(rows) == 3


def test_full_disk_keeps_the_previous_json_whole(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"n": 1})
    original = pathlib.Path.write_text

    def full(self, data, *args, **kwargs):
        original(self, data[:5], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError):
        write_json(path, {"n": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"n": 1} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# ---------------------------------------------------------------- damaged run folders

DAMAGED = ["{bad", '{"run": "x", "config": {"model"', "[]"]


@pytest.fixture(scope="module")
def finished_run(toy, tmp_path_factory, tiny_pipe) -> Path:
    from prunevid_bench.config import build_config
    from prunevid_bench.harness.evaluate import evaluate_plan, plan_dataset
    from prunevid_bench.harness.specs import DatasetSpec

    cfg = build_config(None, None, {"video.num_frames": 4, "generation.max_new_tokens": 2})
    return evaluate_plan(cfg, plan_dataset(DatasetSpec(toy)), tiny_pipe, tmp_path_factory.mktemp("runs") / "run", quiet=True).run_dir


def damaged_copy(run: Path, tmp_path: Path, name: str, content: str) -> Path:
    import shutil

    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    (copy / name).write_text(content)
    return copy


@pytest.mark.parametrize("content", DAMAGED)
def test_damaged_config_on_resume_is_refused(finished_run, toy, tmp_path, content, monkeypatch, shared_model):
    run = damaged_copy(finished_run, tmp_path, "config.json", content)
    before = (run / "samples.jsonl").read_bytes()
    from prunevid_bench.harness import evaluate

    monkeypatch.setattr(evaluate, "default_run_dir", lambda *a, **k: run)  # resume exactly this folder
    res = invoke("run", "--dataset", toy, *FAST, "--results-dir", tmp_path)
    one_line_error(res, "config.json is damaged", "--force")
    assert (run / "samples.jsonl").read_bytes() == before and (run / "config.json").read_text() == content


@pytest.mark.parametrize("name", ["config.json", "summary.json"])
@pytest.mark.parametrize("content", DAMAGED)
def test_damaged_run_folder_in_compare(finished_run, tmp_path, name, content):
    run = damaged_copy(finished_run, tmp_path, name, content)
    one_line_error(invoke("compare", finished_run, run), f"{name} is damaged")


# ---------------------------------------------------------------- models and devices


def test_truncated_safetensors(clip8, tmp_path):
    from prunevid_bench.models.tiny import build_processor, build_tiny_model

    model_dir = tmp_path / "ckpt"
    build_tiny_model().save_pretrained(model_dir)
    build_processor().save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    res = invoke("run", clip8, "Q", "--model", model_dir, "--results-dir", tmp_path / "out")
    one_line_error(res, "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_missing_local_model_directory(clip8, tmp_path):
    line = one_line_error(invoke("run", clip8, "Q", "--model", "../nomodeldir", "--results-dir", tmp_path), "not found")
    assert "Repo id" not in line


def test_hub_id_while_offline(clip8, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    one_line_error(invoke("run", clip8, "Q", "--model", "prunevid-test/not-cached", "--results-dir", tmp_path),
                   "HF_HUB_OFFLINE", "local directory")


def test_hub_unreachable(clip8, tmp_path, monkeypatch):
    """What transformers raises when the Hub cannot be reached and nothing is cached (observed with
    HF_ENDPOINT on a closed port, after 25 s of retries)."""
    import transformers
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from ConnectionRefusedError(111, "Connection refused")
        except LocalEntryNotFoundError as exc:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from exc

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    one_line_error(invoke("run", clip8, "Q", "--model", "prunevid-test/not-cached", "--results-dir", tmp_path),
                   "cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE=1", "local directory")


def test_meta_device(clip8, tmp_path):
    one_line_error(invoke("run", clip8, "Q", *FAST, "--device", "meta", "--results-dir", tmp_path),
                   "device 'meta' cannot run")


def test_environment_records_packages_and_the_cuda_build_apart_from_the_device(clip16, tmp_path, shared_model):
    assert invoke("run", clip16, "Q", *FAST, "--results-dir", tmp_path).exit_code == 0
    (run_dir,) = tmp_path.iterdir()
    env = json.loads((run_dir / "environment.json").read_text())
    assert "cuda" not in env and env["device"] == "cpu" and env["cuda_device_capability"] is None
    assert env["torch_cuda_build"] == torch.version.cuda
    packages = env["packages"]
    for name in ("torch", "transformers", "typer", "rich", "pyyaml", "pandas", "av", "safetensors", "numpy", "scipy"):
        assert isinstance(packages[name], str) and packages[name][0].isdigit(), (name, packages.get(name))


# ---------------------------------------------------------------- config, toy data


def test_non_utf8_yaml(clip8, tmp_path):
    config = tmp_path / "my.yaml"
    config.write_bytes(b"stage1:\n  tau: 0.8\n# caf\xe9\n")
    one_line_error(invoke("run", clip8, "Q", "--config", config, "--results-dir", tmp_path / "out"),
                   "line 3 is not UTF-8", "save the file as UTF-8")


def test_toy_data_out_is_a_file_or_read_only(tmp_path, monkeypatch):
    target = tmp_path / "data.txt"
    target.write_text("keep me")
    one_line_error(invoke("toy-data", "--out", target, "--n", "1"), "is a file, not a folder")
    assert target.read_text() == "keep me"
    one_line_error(invoke("toy-data", "--out", target / "sub", "--n", "1"), "is a file, not a folder")
    fail_mkdir_under(monkeypatch, tmp_path / "ro", errno.EROFS)
    one_line_error(invoke("toy-data", "--out", tmp_path / "ro", "--n", "1"), "read-only", "--out")


# ---------------------------------------------------------------- videos and rows


def test_tall_video_single_run_fails_before_the_model_loads(clip_dir, tmp_path, no_model):
    tall = write_clip(clip_dir / "tall.mp4", 4, size=(4096, 16))
    one_line_error(invoke("run", tall, "Q", *FAST, "--results-dir", tmp_path), "aspect ratio 256:1", "crop or pad")
    assert not any(tmp_path.iterdir())


def test_tall_video_in_a_dataset_is_skipped_in_preflight(toy, clip_dir, tmp_path, shared_model):
    tall = write_clip(clip_dir / "tall.mp4", 4, size=(4096, 16))
    rows = read_lines(toy)
    rows[0]["video"] = str(tall)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke("run", "--dataset", data, "--video-root", toy.parent, *FAST, "--results-dir", tmp_path / "out",
                 "--allow-outside-root")  # the tall clip lies outside the root
    assert res.exit_code == INCOMPLETE, res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    (skipped,) = json.loads((run_dir / "summary.json").read_text())["skipped"]
    assert skipped["id"] == rows[0]["id"] and skipped["stage"] == "preflight" and "aspect ratio" in skipped["reason"]


def test_symlink_loop_row_is_skipped_not_fatal(toy, tmp_path):
    rows = read_lines(toy)
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    rows[1]["video"] = str(tmp_path / "a.mp4")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(data, video_root=toy.parent)
    assert [s.id for s in ds.samples] == [rows[0]["id"], rows[2]["id"]]
    ((row_id, reason),) = ds.skipped
    assert row_id == rows[1]["id"] and "cannot be resolved" in reason


def test_non_utf8_rows_are_reported_by_line(toy, tmp_path):
    lines = toy.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"question": "', b'"question": "\xff\xfe')
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\n".join(lines))
    ds = load_dataset(data, video_root=toy.parent)
    assert len(ds.samples) == 2 and ds.skipped[0][0] == "line 2" and "not UTF-8" in ds.skipped[0][1]
    listed = tmp_path / "d.json"
    listed.write_bytes(b'[\n{"id": "a",\n "question": "\xff"}\n]')
    with pytest.raises(Exception, match="line 3 is not UTF-8"):
        load_dataset(listed)


def test_format_hint_names_the_flag(tmp_path):
    odd = tmp_path / "odd.json"
    odd.write_text('[{"foo": 1}]')
    with pytest.raises(Exception, match="pass --format with one of"):
        load_dataset(odd)


def test_escape_sequences_in_data_are_printed_escaped(toy, tmp_path, shared_model, monkeypatch):
    rows = read_lines(toy)
    rows[0]["id"] = "evil\x1b[2J\x1b]0;title\x07"
    del rows[0]["answer"]  # skipped: its id is printed in the preflight list
    rows[1]["id"] = "err\x1b[31m"

    def failing(self, *args, **kwargs):  # an error line prints the id and the message
        raise ValueError("bad \x1b[5m reply")

    monkeypatch.setattr(Pipeline, "run", failing)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke("run", "--dataset", data, "--video-root", toy.parent, *FAST, "--results-dir", tmp_path / "out")
    assert res.exit_code == INCOMPLETE, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert "evil\\x1b[2J\\x1b]0;title\\x07" in res.output and "err\\x1b[31m" in res.output
    assert "bad \\x1b[5m reply" in res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    assert {r["id"] for r in read_lines(run_dir / "samples.jsonl")} == {rows[1]["id"], rows[2]["id"]}  # stored as given
    missing = invoke("run", "--dataset", tmp_path / "gone\x1b[2J.jsonl", *FAST)
    one_line_error(missing, "gone\\x1b[2J.jsonl")


def test_prompt_longer_than_the_model_is_refused_fast_and_final(toy, tmp_path, shared_model, monkeypatch):
    rows = read_lines(toy)
    rows[1]["question"] = " ".join(["what"] * 5000)  # 25k byte-level tokens; the tiny model has 4096 positions
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = []
    original = Pipeline.run
    monkeypatch.setattr(Pipeline, "run", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))
    args = ["run", "--dataset", data, "--video-root", toy.parent, *FAST, "--results-dir", tmp_path / "out"]
    res = invoke(*args)
    assert res.exit_code == INCOMPLETE, res.output
    assert rows[1]["id"] in res.output and "max_position_embeddings is 4096" in res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    row = {r["id"]: r for r in read_lines(run_dir / "samples.jsonl")}[rows[1]["id"]]
    assert "the prompt is" in row["error"] and row["error_transient"] is False
    assert len(runs) == 2  # the long one never reached the model

    runs.clear()
    assert invoke(*args).exit_code == INCOMPLETE and runs == []  # a final error is not retried on rerun

    single = invoke("run", toy.parent / rows[0]["video"], rows[1]["question"], *FAST, "--results-dir", tmp_path / "one")
    one_line_error(single, "max_position_embeddings is 4096", "shorten the question")
