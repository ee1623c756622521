"""Inputs that used to end in a traceback end in one `error:` line (exit 2) naming the input:
hostile --messages files, NaN and infinity wherever a number enters, a plug-in method that
fails or returns nonsense, wrongly typed run logs under `summarize`, lmms-eval generation
settings that are not numbers; a plug-in that fails to import is reported once and stops only
the commands that need it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import VisualReduction

from tests.test_faults import one_line_error

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"
FAST = ["--model", "tiny", "--max-new-tokens", "1"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def messages_file(folder: Path, clip: Path, video_extra: str = "", text: str = "Q") -> Path:
    local = folder / "clip.mp4"
    if not local.exists():
        local.write_bytes(clip.read_bytes())  # inside the messages file's folder
    path = folder / "m.json"
    path.write_text('[{"role": "user", "content": [{"type": "video", "video": "%s"%s}, {"type": "text", "text": "%s"}]}]'
                    % (local, video_extra, text))
    return path


def test_messages_nested_100000_deep(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(invoke("run", "--messages", path, *FAST, "--results-dir", tmp_path), "nested too deeply")


@pytest.mark.parametrize("extra", [', "nframes": NaN', ', "nframes": Infinity', ', "fps": NaN', ', "fps": -Infinity'])
def test_message_numbers_that_are_not_finite(tmp_path, clip8, extra):
    key = extra.split('"')[1]
    one_line_error(invoke("run", "--messages", messages_file(tmp_path, clip8, extra), *FAST, "--results-dir", tmp_path),
                   f"messages[0].content[0]: {key} must be a positive number")


def test_a_lone_surrogate_in_a_text_element(tmp_path, clip8):
    path = messages_file(tmp_path, clip8, ', "nframes": 4', "Q \\ud800")
    one_line_error(invoke("run", "--messages", path, *FAST, "--results-dir", tmp_path),
                   "messages[0].content[1]:", "lone surrogate")


@pytest.mark.parametrize("args, fragment", [
    (["--fps", "nan"], "video.fps must be a finite number, got nan"),
    (["--set", "video.fps=.nan"], "video.fps must be a finite number"),
    (["--set", "stage2.keep_ratio=.inf"], "stage2.keep_ratio must be a finite number"),
])
def test_nan_and_infinity_are_refused_at_validation(tmp_path, clip8, args, fragment):
    one_line_error(invoke("run", clip8, "Q", *FAST, *args, "--results-dir", tmp_path), fragment)
    assert not any(tmp_path.iterdir())


def test_stream_ask_at_nan_seconds(clip8):
    one_line_error(invoke("stream", clip8, "--ask", "nan:Q", *FAST), "--ask takes SECONDS:QUESTION", "nan:Q")


def test_feature_cache_gb_nan(tmp_path):
    one_line_error(invoke("sweep", "tau", "--values", "tau=0.7", "--dataset", tmp_path / "x.jsonl", *FAST,
                          "--feature-cache-gb", "nan"), "--feature-cache-gb must be >= 0")


# ---------------------------------------------------------------- a plug-in method that fails
@dataclass
class FailingConfig:
    enabled: bool = False
    mode: int = 0  # 0 raises RuntimeError, 1 sends tokens to output rows out of range, 2 raises OSError, 3 is fine


def failing_reduce(tokens, cfg):
    n = tokens.index.numel()
    if cfg.mode == 0:
        raise RuntimeError("the plug-in's own bug")
    if cfg.mode == 2:
        raise OSError(5, "Input/output error")
    keep = torch.arange(0, n, 2)
    if cfg.mode == 1:  # every token sent past the last output row
        return VisualReduction(dest=torch.arange(n) + n, group=torch.zeros(n // 2, dtype=torch.long))
    return VisualReduction.keep(keep, n, torch.zeros_like(keep))


@pytest.fixture
def failing_method():
    from prunevid_bench.methods import Method, Range, register_method, unregister_method

    register_method(Method(name="failing", acts="visual_tokens", config=FailingConfig, summary="fails on purpose",
                           ranges={"mode": Range(0, 3)}, reduce=failing_reduce))
    yield
    unregister_method("failing")


@pytest.mark.parametrize("mode, fragment", [
    (0, "method failing failed in reduce: RuntimeError: the plug-in's own bug"),
    (1, "method failing returned output rows outside [-1, 31] (min 64, max 127)"),
    (2, "method failing failed in reduce: OSError: [Errno 5] Input/output error"),
])
def test_a_plugin_method_that_fails_in_a_single_run(failing_method, tmp_path, clip8, mode, fragment):
    res = invoke("run", clip8, "Q", *FAST, "--num-frames", "8", "--set", "failing.enabled=true",
                 "--set", f"failing.mode={mode}", "--results-dir", tmp_path)
    one_line_error(res, fragment)


def test_a_working_plugin_is_not_checked_away(failing_method, tmp_path, clip8):
    res = invoke("run", clip8, "Q", *FAST, "--num-frames", "8", "--set", "failing.enabled=true",
                 "--set", "failing.mode=3", "--results-dir", tmp_path)
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- summarize on damaged logs
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_pipe):
    from prunevid_bench.config import build_config
    from prunevid_bench.harness.evaluate import evaluate_dataset
    from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
    from prunevid_bench.toy.world import generate_dataset

    folder = tmp_path_factory.mktemp("summarize")
    toy = generate_dataset(folder / "toy", 2, seed=4)
    cfg = build_config(None, None, {"model.name": "tiny", "video.num_frames": 4, "generation.max_new_tokens": 1})
    return evaluate_dataset(cfg, DatasetSpec(toy), EvalOptions(results_dir=folder / "runs"), pipeline=tiny_pipe,
                            console=Console(quiet=True)).run_dir


@pytest.mark.parametrize("target, key, value, fragment", [
    ("samples.jsonl", "ttft_s", "fast", "samples.jsonl: line 1: ttft_s must be a number, got 'fast'"),
    ("samples.jsonl", "ttft_s", [1, 2], "samples.jsonl: line 1: ttft_s must be a number, got [1, 2]"),
    ("samples.jsonl", "rank", "a", "samples.jsonl: line 1: rank must be a number, got 'a'"),
    ("plan.json", "runnable", 5, "plan.json: runnable has the wrong type"),
])
def test_summarize_on_wrongly_typed_logs(finished_run, tmp_path, target, key, value, fragment):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    path = run_dir / target
    if target == "plan.json":
        data = json.loads(path.read_text())
        data[key] = value
        path.write_text(json.dumps(data))
    else:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        lines[0][key] = value
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    one_line_error(invoke("summarize", run_dir), fragment)


def test_lmms_generation_settings_must_be_numbers():
    from prunevid_bench.lmms.args import check_generation

    for kwargs, fragment in [({"temperature": "abc"}, "temperature='abc' in --gen_kwargs is not a number"),
                             ({"temperature": float("nan")}, "temperature=nan in --gen_kwargs is not a number"),
                             ({"num_beams": "x"}, "num_beams='x' in --gen_kwargs is not a whole number"),
                             ({"max_new_tokens": "lots"}, "max_new_tokens='lots' in --gen_kwargs is not a whole number")]:
        with pytest.raises(PruneVidError, match=rf"^task t: {fragment.replace('[', '.').replace('(', '.')}"):
            check_generation(kwargs, "task t")
    check_generation({"temperature": "0", "num_beams": "1", "max_new_tokens": "16"}, "task t")


# ---------------------------------------------------------------- a plug-in that fails to import
def test_a_plugin_that_fails_to_import_stops_only_what_needs_it(tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[prunevid_bench.methods]\nbroken = broken_plugin_module\n")
    (site / "broken_plugin_module.py").write_text("raise ImportError('needs libfoo 2')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(site)])}
    script = ("import sys; from typer.testing import CliRunner; from prunevid_bench.cli import app\n"
              "r = CliRunner()\n"
              "for args in (['presets'], ['methods'], ['methods', 'show', 'broken']):\n"
              "    res = r.invoke(app, args)\n"
              "    print('EXIT', res.exit_code, repr(res.stderr), flush=True)\n")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    exits = [line for line in run.stdout.splitlines() if line.startswith("EXIT")]
    assert [e.split()[1] for e in exits] == ["0", "0", "2"], run.stdout + run.stderr
    warned = "the method plug-in 'broken' (broken_plugin_module) failed to load: ImportError: needs libfoo 2"
    assert (run.stdout + run.stderr).count(f"warning: {warned}; it is left out") == 1  # once per process
    assert warned in exits[2] and "Traceback" not in run.stdout + run.stderr
