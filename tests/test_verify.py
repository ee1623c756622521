"""``prunevid verify`` through the CLI: every check passes on each built-in model (one tiny model
per family, and the trained toy) on the CPU; a deliberately broken patch fails the check it
breaks (exit 1, the check and method named); bad input is one line and exit 2; bf16 from a saved
checkpoint runs with its stated tolerances."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.methods import all_methods
from prunevid_bench.verify import default_models
from prunevid_bench.verify.checks import TOLERANCES, logit_tolerance


def verify(*args):
    result = CliRunner().invoke(app, ["verify", "--json", "-q", *args])
    reports = json.loads(result.stdout) if result.exit_code in (0, 1) else None
    return result, reports


def rows(report, check=None, passed="any"):
    return [c for c in report["checks"] if (check is None or c["check"] == check)
            and (passed == "any" or c["passed"] is passed)]


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen2vl", "toy"])
def test_verify_passes_on_every_builtin_model(model):
    result, reports = verify("--model", model)
    assert result.exit_code == 0, result.output
    (rep,) = reports
    assert rep["passed"] and rep["dtype"] == "float32" and rep["device"] == "cpu"
    assert not rows(rep, passed=False)
    # every check ran, but the inputs one: it needs --video and the qwen policy (built-ins use the processor's)
    assert [(c["check"], c["note"]) for c in rows(rep, passed=None)] == [
        ("inputs", "needs --video: qwen-vl-utils reads a file")]
    checked = {c["method"].split("[")[0] for c in rows(rep, "reference")}
    assert checked == {"none"} | {m.name for m in all_methods()}  # every registered method
    assert {c["method"] for c in rows(rep, "scores")} >= {"fastv", "prunevid_stage2[score=attention]"}
    assert "prunevid_stage1[space=vision]" in {c["method"] for c in rows(rep, "nothing")}  # every place
    for c in rows(rep, passed=True):
        assert c["diff"] <= c["tol"]


def test_default_models_are_one_tiny_per_family():
    from prunevid_bench.families import supported_model_types

    assert default_models()[:2] == ["tiny", "tiny-qwen2vl"]
    assert len(default_models()) == len(supported_model_types())


def test_an_off_by_one_drop_fails_the_reference_check(monkeypatch):
    """The patch drops the visual token after each one the method dropped: its run no longer
    equals the reference built from the method's own kept tokens."""
    from prunevid_bench import splice

    original = splice.drop_index

    def off_by_one(seq_len, visual, kept):
        return original(seq_len, visual + 1, kept)

    monkeypatch.setattr(splice, "drop_index", off_by_one)
    result, (rep,) = verify("--model", "tiny", "--methods", "prunevid_stage2")
    assert result.exit_code == 1
    failed = rows(rep, passed=False)
    assert [(c["check"], c["method"]) for c in failed] == [("reference", "prunevid_stage2")]
    assert failed[0]["diff"] > 100 * failed[0]["tol"]
    assert not rep["passed"]


def test_a_broken_scorer_fails_the_scores_check(monkeypatch):
    """FastV's scores shifted by one token (the scores of the wrong tokens): the scores check fails;
    the run itself still equals its reference (it drops what its scores say)."""
    from prunevid_bench.stages import stage2 as s2

    original = s2.last_token_scores
    monkeypatch.setattr(s2, "last_token_scores", lambda *a, **kw: original(*a, **kw).roll(1))
    result, (rep,) = verify("--model", "tiny-qwen2vl", "--methods", "fastv")
    assert result.exit_code == 1
    assert [(c["check"], c["method"]) for c in rows(rep, passed=False)] == [("scores", "fastv")]
    assert rows(rep, "reference")[-1]["passed"]


def test_the_table_names_the_failing_check_within_80_columns(monkeypatch):
    from prunevid_bench.stages import stage2 as s2

    original = s2.last_token_scores
    monkeypatch.setattr(s2, "last_token_scores", lambda *a, **kw: original(*a, **kw).roll(1))
    result = CliRunner().invoke(app, ["verify", "--model", "tiny", "--methods", "fastv"], env={"COLUMNS": "80"})
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any("scores" in line and "fastv" in line and "FAIL" in line for line in lines)
    assert "tiny: 1 check(s) FAILED" in result.output
    assert all(len(line) <= 80 for line in lines if line.startswith(("┃", "│", "┏", "└")))


def test_verify_on_a_video_of_ones_own(tmp_path):
    from tests.conftest import write_clip

    clip = write_clip(tmp_path / "clip16.mp4", 16)  # the default video policy samples 16 frames
    result, (rep,) = verify("--model", "tiny-qwen2vl", "--video", str(clip), "--methods", "fastv", "--tokens", "3")
    assert result.exit_code == 0, result.output
    assert [c["check"] for c in rep["checks"]] == ["vanilla", "reference", "inputs", "nothing", "reference", "scores",
                                                   "chunked", "chunked"]
    assert all(c["passed"] for c in rep["checks"] if c["check"] != "inputs")
    assert "'processor'" in rep["checks"][2]["note"]  # the built-ins' policy is not qwen-vl-utils'


def test_inputs_equal_qwen_vl_utils_under_the_qwen_policy(tmp_path):
    """The inputs check on a qwen-policy pipeline: our frames, ids, grid and M-RoPE ids equal
    qwen-vl-utils' through the processor; another clip's inputs fail it."""
    import importlib.util

    from prunevid_bench.pipeline import load_pipeline
    from prunevid_bench.verify import QUESTION
    from prunevid_bench.verify.inputs import inputs_check
    from tests.conftest import write_clip

    pytest.importorskip("qwen_vl_utils")
    if not any(importlib.util.find_spec(name) for name in ("decord", "torchcodec")):
        pytest.skip("qwen-vl-utils needs decord or torchcodec to read videos")
    pipe = load_pipeline("tiny", device="cpu", dtype="float32", overrides={"video.policy": "qwen"})
    clip, other = write_clip(tmp_path / "a.mp4", 32, seed=1), write_clip(tmp_path / "b.mp4", 32, seed=2)
    check = inputs_check(pipe, pipe.prepare(str(clip), QUESTION), str(clip))
    assert check.passed and check.diff <= check.tol and "nframes=16" in check.note, check
    wrong = inputs_check(pipe, pipe.prepare(str(other), QUESTION), str(clip))
    assert wrong.passed is False and wrong.diff > wrong.tol


@pytest.mark.parametrize("args,message", [
    (["--methods", "fastvv"], "did you mean 'fastv'"),
    (["--model", "tinyy"], "tiny"),
    (["--video", "/no/such/video.mp4"], "no such file"),
    (["--tokens", "0"], "--tokens must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(app, ["verify", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_bf16_from_a_saved_checkpoint_with_its_stated_tolerances(tmp_path):
    from prunevid_bench.models.tiny import build_tiny

    model, processor = build_tiny()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result, (rep,) = verify("--model", str(tmp_path), "--dtype", "bfloat16", "--methods", "prunevid_stage2,tome")
    assert result.exit_code == 0, result.output
    assert rep["dtype"] == "bfloat16" and rep["family"] == "qwen2_5_vl"
    absolute, relative = TOLERANCES["bfloat16"]
    for c in rows(rep, "reference"):
        assert absolute <= c["tol"] < 1.0 and c["diff"] <= c["tol"]
    # bf16 really rounds the cached run and the reference differently: the tolerance is not idle
    assert max(c["diff"] for c in rows(rep, "reference")) > 0
    assert logit_tolerance("bfloat16", torch.tensor([4.0])) == absolute + 4 * relative


def test_a_plugin_method_is_verified_without_editing_verify():
    """A method registered from outside the package gets the checks it can: its reduced run
    against the reference; "nothing" says in one line why it cannot run (no knob declared)."""
    import importlib

    from prunevid_bench.methods import unregister_method

    importlib.reload(importlib.import_module("tests.every_other_method"))  # registers "every_other"
    try:
        result, (rep,) = verify("--model", "tiny", "--methods", "every_other")
    finally:
        unregister_method("every_other")
    assert result.exit_code == 0, result.output
    by_check = {c["check"]: c for c in rep["checks"] if c["method"] == "every_other"}
    assert by_check["reference"]["passed"] and by_check["reference"]["note"] == "64 -> 32 tokens"
    assert by_check["nothing"]["passed"] is None and "no budget_knob or keeps_everything" in by_check["nothing"]["note"]


def test_a_refused_run_is_not_run_with_the_refusal_as_its_reason():
    """A method (or a family) that refuses a run, in one line, makes that check "not run"
    with the refusal as its reason; the other checks still run."""
    from dataclasses import dataclass

    import prunevid_bench
    from prunevid_bench.errors import PruneVidError
    from prunevid_bench.methods import unregister_method

    @dataclass
    class RefuserConfig:
        enabled: bool = False

    def reduce(tokens, cfg):
        raise PruneVidError("refuser does not run on this family")

    prunevid_bench.register_method(prunevid_bench.Method(
        name="refuser", acts="visual_tokens", config=RefuserConfig, summary="refuses", reduce=reduce,
        keeps_everything={}))
    try:
        result, (rep,) = verify("--model", "tiny", "--methods", "refuser")
    finally:
        unregister_method("refuser")
    assert result.exit_code == 0, result.output
    mine = [c for c in rep["checks"] if c["method"] == "refuser"]
    assert [(c["check"], c["passed"]) for c in mine] == [("nothing", None), ("reference", None)]
    assert all(c["note"] == "refused: refuser does not run on this family" for c in mine)
    assert rows(rep, "vanilla")[0]["passed"]


@pytest.mark.parametrize("model", ["tiny-qwen3vl", "tiny-qwen3vl-moe"])
def test_verify_runs_the_reference_checks_on_qwen3vl_with_deepstack(model):
    """The package's reference adds Qwen3-VL's DeepStack levels, so every reference check runs
    and passes there; only what the family refuses (methods inside the vision encoder) and the
    inputs check (no --video) are not run."""
    result, reports = verify("--model", model)
    assert result.exit_code == 0, result.output
    (rep,) = reports
    assert rep["passed"] and not rows(rep, passed=False)
    checked = {c["method"] for c in rows(rep, "reference", passed=True)}
    assert checked == {"none"} | {m.name for m in all_methods()}  # every registered method, at its default place
    for c in rows(rep, passed=None):
        assert c["check"] == "inputs" or "inside the vision encoder is not supported" in c["note"], c


def test_a_patch_that_skips_deepstack_fails_the_reference_check(monkeypatch):
    """The patch's DeepStack add left out after layer 0 (levels 1.. still added): the run no
    longer equals the reference, which adds every level from the towers itself."""
    from prunevid_bench.patch.deepstack import DeepStack

    original = DeepStack._add_level
    monkeypatch.setattr(DeepStack, "_add_level", lambda self, i, output: None if i == 0 else original(self, i, output))
    result, (rep,) = verify("--model", "tiny-qwen3vl", "--methods", "tome")
    assert result.exit_code == 1
    failed = {(c["check"], c["method"]) for c in rows(rep, passed=False)}
    # the unpatched vanilla run still passes; chunking the baseline's prefill runs the patch's add
    assert failed == {("reference", "tome"), ("nothing", "tome"), ("chunked", "none")}
    assert next(c for c in rows(rep, "reference") if c["method"] == "none")["passed"]
