"""`prunevid run` through typer's CliRunner: exit codes, files written, messages for bad input."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_writes_run_folder(clip8, tmp_path):
    res = invoke("run", clip8, "What is happening?", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "3", "--results-dir", tmp_path, "--label", "t")
    assert res.exit_code == 0, res.output
    assert "answer:" in res.output and "TTFT" in res.output
    (run_dir,) = tmp_path.iterdir()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["config"]["model"]["name"] == "tiny" and cfg["config"]["generation"]["max_new_tokens"] == 3
    env = json.loads((run_dir / "environment.json").read_text())
    for key in ("python", "torch", "transformers", "device", "dtype", "attn_implementation", "git_commit"):
        assert key in env
    result = json.loads((run_dir / "result.json").read_text())
    for key in ("generated_text", "visual_tokens", "prompt_tokens", "ttft_s", "prefill_s", "vision_encoder_s",
                "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_bytes", "video_grid_thw",
                "tokens_before_stage1", "tokens_after_stage1", "tokens_before", "tokens_after", "total_compression_ratio"):
        assert key in result, key
    assert result["video_grid_thw"] == [[4, 8, 8]] and result["visual_tokens"] == 64
    assert result["video_backend"] in ("decord", "pyav")
    rows = list(csv.DictReader(open(run_dir / "result.csv")))
    assert len(rows) == 1 and int(rows[0]["visual_tokens"]) == 64


def test_default_preset_runs_on_the_default_toy_model(clip8, tmp_path):
    """The headline command needs no pruning-layer override: the preset's "10/28" resolves to
    layer 1 of the toy model's 4, and the record says so next to the value as written."""
    res = invoke("run", clip8, "What is happening?", "--preset", "default", "--num-frames", "8", "--max-new-tokens", "2", "--results-dir", tmp_path)
    assert res.exit_code == 0, res.output
    assert "1 (10/28)" in res.output
    (run_dir,) = tmp_path.iterdir()
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert cfg["model"]["name"] == "toy" and cfg["stage2"]["pruning_layer"] == "10/28"  # the config as written
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["pruning_layer"], result["pruning_layer_spec"]) == (1, "10/28")
    assert result["tokens_after"] < result["tokens_after_stage1"] < result["tokens_before_stage1"]
    (row,) = csv.DictReader(open(run_dir / "result.csv"))
    assert (row["pruning_layer"], row["pruning_layer_spec"]) == ("1", "10/28")


def test_the_record_and_tables_name_places_and_methods_not_prunevid_stages(clip8, tmp_path):
    """A ToMe + FastV run: the counts by place, the methods that acted at each, the old names as
    aliases; the run's table and `compare` name the methods, never S1/S2."""
    res = invoke("run", clip8, "What is happening?", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "2",
                 "--preset", "tome-50", "--set", "fastv.enabled=true", "--set", "fastv.pruning_layer=1",
                 "--results-dir", tmp_path, "--label", "tf")
    assert res.exit_code == 0, res.output
    assert "entering the LLM (tome)" in res.output and "after the LLM layer (fastv)" in res.output
    assert "Stage" not in res.output
    assert "model (family)" in res.output and "tiny (qwen2_5_vl)" in res.output  # which model ran, in the table
    (run_dir,) = tmp_path.iterdir()
    r = json.loads((run_dir / "result.json").read_text())
    assert (r["visual_tokens"], r["tokens_after_visual_methods"], r["visual_tokens_kept"]) == (64, 32, 16)
    assert (r["visual_methods"], r["layer_method"]) == (["tome"], "fastv")
    aliases = {"tokens_before_stage1": "visual_tokens", "tokens_after_stage1": "tokens_after_visual_methods",
               "stage2_tokens_before": "tokens_after_visual_methods", "stage2_tokens_after": "visual_tokens_kept",
               "tokens_after": "visual_tokens_kept", "stage1_s": "visual_methods_s", "stage2_s": "layer_method_s"}
    assert all(r[old] == r[new] for old, new in aliases.items())
    res = invoke("compare", run_dir, "--markdown")
    assert res.exit_code == 0, res.output
    assert "tome " in res.output and "fastv " in res.output and "S1" not in res.output and "S2" not in res.output
    assert "tokens in → LLM → kept" in res.output


def test_run_with_options_parses_a_choice(clip8, tmp_path):
    res = invoke("run", clip8, "Which?", "-o", "red", "-o", "blue", "--model", "tiny", "--num-frames", "8", "--results-dir", tmp_path, "--max-new-tokens", "2")
    assert "choice:" in res.output
    (run_dir,) = tmp_path.iterdir()
    status = json.loads((run_dir / "result.json").read_text())["parse_status"]
    assert status in ("parsed", "unparsed", "ambiguous", "out_of_range")
    assert res.exit_code == (0 if status == "parsed" else 3), res.output  # 3: no parsed answer


def test_timing_mode_reports_median(clip8, tmp_path):
    res = invoke("run", clip8, "Q", "--model", "tiny", "--num-frames", "8", "--repeats", "3", "--warmup", "1", "--max-new-tokens", "2", "--results-dir", tmp_path)
    assert res.exit_code == 0, res.output
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["repeats"] == 3 and result["ttft_s"] == result["ttft_s_median"]


def test_widely_spread_repeats_are_flagged():
    from prunevid_bench.single import timing_note

    assert timing_note({"ttft_s_median": 0.1, "ttft_s_p90": 0.14}) is None
    assert "p90 7.6x the median" in timing_note({"ttft_s_median": 0.1, "ttft_s_p90": 0.76})
    assert timing_note({"ttft_s": 0.1}) is None  # one run: no spread to judge


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "missing.mp4", "Q"], "video not found"),
        (["run", ".", "Q"], "directory"),
        (["run", "CLIP", "Q", "--set", "stage1.tua=0.5"], "did you mean 'stage1.tau'"),
        (["run", "CLIP", "Q", "--set", "stage2.keep_ratio=1.5"], "stage2.keep_ratio must be in (0, 1]"),
        (["run", "CLIP", "Q", "--set", "stage1.cluster_ratio=0"], "stage1.cluster_ratio must be in (0, 1]"),
        (["run", "CLIP", "Q", "--set", "stage1.k=0"], "stage1.dpc_neighbours must be >= 1"),  # the old name still loads
        (["run", "CLIP", "Q", "--set", "stage1.dpc_neighbours=0"], "stage1.dpc_neighbours must be >= 1"),
        (["run", "CLIP", "Q", "--preset", "defualt"], "did you mean 'default'"),
        (["run", "CLIP", "Q", "--model", "tiny", "--num-frames", "8", "--set", "stage2.enabled=true", "--set", "stage2.pruning_layer=4"], "stage2.pruning_layer must be in [0, 3]"),
        (["run", "CLIP", "Q", "--model", "tiny", "--num-frames", "96"], "asked for 96 frames but the clip has only 8"),  # never silently capped
        (["run", "CLIP", "Q", "--model", "tiny", "--set", "video.policy=qwne"], "did you mean 'qwen'"),
        (["run", "CLIP", "Q", "--set", "stage2.pruning_layer=29/28"], "stage2.pruning_layer must be a 0-based layer index (e.g. 10) or a relative depth 'K/N' with 0 <= K < N"),
        (["run", "CLIP", "Q", "--model", "no-such-model"], "not found"),
        (["run", "CLIP", "Q", "--model", "tiny", "--device", "cuda:99"], "cuda:99"),
        (["run", "CLIP", "Q", "--model", "tiny", "--device", "tpu"], "unknown device 'tpu'"),
        (["run", "CLIP"], "give a VIDEO and a QUESTION"),
        (["run", "CLIP", "Q", "--answer", "A"], "--answer is the letter of the right --option: give the options too"),
        (["run", "CLIP", "Q", "-o", "x", "-o", "y", "--answer", "C"], "--answer must be one of A, B (the --option letters), got 'C'"),
        (["run", "--dataset", "data.jsonl", "--answer", "A"], "a dataset's rows carry their own answers"),
    ],
)
def test_bad_input_one_line_error(args, message, clip8, tmp_path):
    args = [str(clip8) if a == "CLIP" else a for a in args]
    res = invoke(*args, "--results-dir", tmp_path)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:"), res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output
    if message:
        assert message in res.output
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_corrupt_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    res = invoke("run", bad, "Q", "--model", "tiny", "--results-dir", tmp_path / "out")
    assert res.exit_code == 2 and "cannot decode video" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_presets_listed():
    res = invoke("presets")
    assert res.exit_code == 0
    for name in ("baseline", "default", "stage1_only", "stage2_only", "conservative", "aggressive"):
        assert name in res.output


def test_a_model_that_is_not_qwen25vl_is_refused(clip8, tmp_path):
    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
    res = invoke("run", clip8, "Q", "--model", model_dir, "--results-dir", tmp_path / "out")
    assert res.exit_code == 2
    assert "is a llama model; prunevid-bench supports the model types qwen2_5_vl, qwen2_vl" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_flash_attention_without_its_package_is_one_line(clip8, tmp_path):
    res = invoke("run", clip8, "Q", "--model", "tiny", "--attn-implementation", "flash_attention_2", "--results-dir", tmp_path)
    assert res.exit_code == 2 and "flash_attention_2 needs a CUDA device and the flash-attn package" in res.output
