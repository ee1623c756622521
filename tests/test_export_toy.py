"""`prunevid export-toy`: the toy model as a checkpoint folder any tool can load."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "toy_sample.mp4"
QUESTION = "In which direction does the green circle move?\n(A) left\n(B) down\n(C) up\n(D) right"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "toy-ckpt"
    res = CliRunner().invoke(app, ["export-toy", str(out)], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "loads it with the toy's own video policy (processor" in res.output and "prunevid.json" in res.output
    return out


def test_the_folder_loads_with_auto_classes_and_keeps_the_word_vocabulary(checkpoint):
    from transformers import AutoProcessor, AutoTokenizer

    from prunevid_bench.toy.model import build_toy_processor

    reference = build_toy_processor().tokenizer
    for tokenizer in (AutoProcessor.from_pretrained(checkpoint).tokenizer, AutoTokenizer.from_pretrained(checkpoint)):
        assert len(tokenizer) == len(reference)
        assert tokenizer.encode(QUESTION) == reference.encode(QUESTION)
        assert len(tokenizer.encode(" green")) == 1  # a toy word, not its bytes


@pytest.mark.parametrize("policy", [{"video.policy": "processor"}, {}])  # {}: auto, as a user would run it
def test_the_checkpoint_answers_as_the_builtin_toy_model(checkpoint, policy):
    """The folder says which video policy the toy saw (prunevid.json): under auto, the loader
    takes it, so the exported model gets the toy's 128 tokens, not Qwen's policy's 1,120."""
    from prunevid_bench.pipeline import load_pipeline

    overrides = {**policy, "model.device": "cpu", "model.dtype": "float32"}
    toy = load_pipeline("toy", preset="default", overrides=overrides).run(EXAMPLE, QUESTION)
    exported = load_pipeline(str(checkpoint), preset="default", overrides=overrides).run(EXAMPLE, QUESTION)
    assert exported.generated_token_ids == toy.generated_token_ids
    assert exported.generated_text == toy.generated_text
    assert (exported.tokens_after_stage1, exported.tokens_after) == (toy.tokens_after_stage1, toy.tokens_after)
    assert exported.tokens_before_stage1 == toy.tokens_before_stage1 == 128 and exported.video_policy == "processor"


def test_an_existing_checkpoint_is_not_overwritten(checkpoint):
    res = CliRunner().invoke(app, ["export-toy", str(checkpoint)])
    assert res.exit_code == 2
    assert "already holds a checkpoint" in res.output


def test_a_file_in_the_way_is_one_line(tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    res = CliRunner().invoke(app, ["export-toy", str(target)])
    assert res.exit_code == 2
    assert "is a file, not a folder" in res.output and "Traceback" not in res.output


def test_quiet_silences_transformers_progress_bars(checkpoint, tmp_path):
    """Loading a checkpoint draws transformers' "Loading weights" bar; -q prints nothing at all."""
    import os
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    quieting = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")  # an in-process -q set them
    env = {**{k: v for k, v in os.environ.items() if k not in quieting}, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    for flag in ([], ["-q"]):
        done = subprocess.run([sys.executable, "-m", "prunevid_bench", "run", str(EXAMPLE), "Where?", "--model", str(checkpoint),
                               "--max-new-tokens", "1", "--results-dir", str(tmp_path), *flag],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        if flag:
            assert done.stdout == "" and done.stderr == ""
        else:
            assert "Loading weights" in done.stderr  # what -q has to silence (the test would pass vacuously without)
