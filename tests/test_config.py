"""Config precedence (--set > --config YAML > preset > defaults), validation messages, presets CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.cli_options import collect_overrides
from prunevid_bench.config import RunConfig, build_config, parse_override, preset_names, resolve_key, resolve_layer
from prunevid_bench.errors import PruneVidError

runner = CliRunner()


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_have_every_stage_off():
    cfg = build_config()
    assert cfg == RunConfig()
    assert not cfg.stage1.enabled and not cfg.stage2.enabled and cfg.enabled_methods == []
    assert cfg.video.num_frames is None and cfg.generation.max_new_tokens == 16  # None: the policy's default (16)
    assert cfg.video.policy == "auto"


def test_default_preset_is_the_paper_setting():
    cfg = build_config("default")
    assert (cfg.stage1.enabled, cfg.stage1.tau, cfg.stage1.cluster_ratio, cfg.stage1.temporal_segment_ratio) == (True, 0.8, 0.5, 0.25)
    assert (cfg.stage2.enabled, cfg.stage2.keep_ratio, cfg.stage2.pruning_layer, cfg.stage2.score) == (True, 0.4, "10/28", "prunevid")
    assert resolve_layer(cfg.stage2.pruning_layer, 28) == 10  # the paper's layer on the 7B's 28 layers


def test_every_shipped_preset_resolves():
    names = preset_names()
    assert {"baseline", "stage1_only", "stage2_only", "default", "conservative", "aggressive"} <= set(names)
    for name in names:
        build_config(name)  # raises on an unknown key or a bad value
    assert not build_config("baseline").stage1.enabled and not build_config("baseline").stage2.enabled
    assert build_config("stage1_only").stage1.enabled and not build_config("stage1_only").stage2.enabled
    assert build_config("stage2_only").stage2.enabled and not build_config("stage2_only").stage1.enabled


def test_precedence_set_over_yaml_over_preset_over_defaults(tmp_path):
    user = write_yaml(tmp_path / "my.yaml", {"stage1": {"tau": 0.6, "cluster_ratio": 0.3}, "video": {"num_frames": 8}})
    cfg = build_config("default", user, {"stage1.tau": 0.65})
    assert cfg.stage1.tau == 0.65  # --set beats the user file
    assert cfg.stage1.cluster_ratio == 0.3  # the user file beats the preset (0.5)
    assert cfg.video.num_frames == 8  # the user file beats the default (None: the policy's)
    assert cfg.stage2.keep_ratio == 0.4  # the preset beats the default, untouched by the others
    assert cfg.video.max_frames is None and cfg.video.policy == "auto"  # the defaults where nobody says anything


def test_cli_flags_and_set_reach_the_config(tmp_path, monkeypatch):
    """Through the real `run --dataset` command: what evaluate_dataset receives."""
    import prunevid_bench.harness.evaluate as evaluate

    seen = {}
    answered = SimpleNamespace(run_dir=tmp_path, summary={"accuracy": {"errors": 0, "unparsed": 0}, "skipped": []})
    monkeypatch.setattr(evaluate, "evaluate_dataset",
                        lambda cfg, dataset, options, **kw: seen.update(cfg=cfg, dataset=dataset, options=options) or answered)
    user = write_yaml(tmp_path / "my.yaml", {"stage2": {"keep_ratio": 0.3}, "video": {"num_frames": 8}})
    res = runner.invoke(app, ["run", "--dataset", str(tmp_path / "d.jsonl"), "--preset", "default", "--config", str(user),
                              "--set", "keep_ratio=0.2", "--num-frames", "6", "--set", "video.max_frames=10", "--limit", "3"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.stage2.keep_ratio == 0.2 and cfg.video.num_frames == 6 and cfg.video.max_frames == 10
    assert cfg.stage1.tau == 0.8 and seen["options"].preset == "default" and seen["dataset"].limit == 3


def test_set_wins_over_dedicated_flag():
    assert collect_overrides(["video.num_frames=4"], num_frames=8)["video.num_frames"] == 4
    assert collect_overrides(None, fps=1.0) == {"video.fps": 1.0, "video.num_frames": None}


@pytest.mark.parametrize(
    "name,key",
    [("tau", "stage1.tau"), ("stage1.tau", "stage1.tau"), ("keep_ratio", "stage2.keep_ratio"), ("num_frames", "video.num_frames")],
)
def test_short_and_dotted_names(name, key):
    assert resolve_key(name) == key


@pytest.mark.parametrize(
    "name,message",
    [
        ("tua", "did you mean 'tau'"),
        ("stage1.tua", "did you mean 'stage1.tau'"),
        ("keep_ration", "did you mean 'keep_ratio'"),
        ("enabled", "ambiguous"),
        ("zzz", "unknown config key 'zzz'"),
    ],
)
def test_unknown_or_ambiguous_keys(name, message):
    with pytest.raises(PruneVidError, match=message):
        resolve_key(name)


@pytest.mark.parametrize(
    "layer,message",
    [
        ({"stage1": {"tua": 0.5}}, "unknown key 'stage1.tua' (did you mean 'tau'?)"),
        ({"stag1": {"tau": 0.5}}, "unknown section 'stag1' (did you mean 'stage1'?)"),
        ({"stage1": {"tau": 1.5}}, "stage1.tau must be in (0, 1], got 1.5"),
        ({"stage1": {"tau": "high"}}, "stage1.tau must be a finite number, got 'high'"),
        ({"video": {"fps": float("nan")}}, "video.fps must be a finite number, got nan"),
        ({"stage1": {"tau": float("inf")}}, "stage1.tau must be a finite number, got inf"),
        ({"stage1": {"enabled": "maybe"}}, "stage1.enabled must be bool"),
        ({"stage2": {"pruning_layer": 2.5}}, "stage2.pruning_layer must be a 0-based layer index (e.g. 10) or a relative depth 'K/N'"),
        ({"stage2": {"pruning_layer": "29/28"}}, "stage2.pruning_layer must be a 0-based layer index"),
        ({"stage2": {"score": "randon"}}, "did you mean 'random'"),
        ({"video": {"num_frames": 0}}, "video.num_frames must be >= 1"),
        ({"video": {"max_pixels": 100}}, "video.max_pixels must be at least 784"),
        ({"generation": {"max_new_tokens": None}}, "generation.max_new_tokens cannot be null"),
        ({"model": {"dtype": "float8"}}, "model.dtype must be"),
        ({"stage1": "yes"}, "section 'stage1' must be a mapping"),
    ],
)
def test_bad_user_yaml_names_the_key(tmp_path, layer, message):
    path = write_yaml(tmp_path / "bad.yaml", layer)
    with pytest.raises(PruneVidError) as err:
        build_config(None, path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


LAYER_ERROR = ("stage2.pruning_layer must be a 0-based layer index (e.g. 10) or a relative depth 'K/N' "
               "with 0 <= K < N (e.g. '10/28': layer 10 of 28), got ")


@pytest.mark.parametrize(
    "text,value",
    [("10", 10), ("0", 0), ("10/28", "10/28"), ("0/28", "0/28"), ("27/28", "27/28"), (" 3 / 4 ", "3/4"), ("'7'", 7)],
)
def test_pruning_layer_accepts_an_index_or_a_relative_depth(tmp_path, text, value):
    assert build_config(None, None, dict([parse_override(f"stage2.pruning_layer={text}")])).stage2.pruning_layer == value
    path = tmp_path / "my.yaml"
    path.write_text(f"stage2:\n  pruning_layer: {text}\n")  # unquoted 10/28 is a YAML string too
    assert build_config(None, path).stage2.pruning_layer == value


@pytest.mark.parametrize(
    "text,shown",
    [("10/28x", "'10/28x'"), ("29/28", "'29/28'"), ("28/28", "'28/28'"), ("0/0", "'0/0'"), ("-1", "-1"),
     ("-1/28", "'-1/28'"), ("abc", "'abc'"), ("1.5", "1.5"), ("true", "True"), ("", "None"), ("10/28/2", "'10/28/2'")],
)
def test_pruning_layer_rejects_other_values_in_one_line(tmp_path, text, shown):
    with pytest.raises(PruneVidError) as err:
        build_config(None, None, dict([parse_override(f"stage2.pruning_layer={text}")]))
    assert str(err.value) == LAYER_ERROR + shown
    if text:
        path = tmp_path / "bad.yaml"
        path.write_text(f"stage2:\n  pruning_layer: {text}\n")
        with pytest.raises(PruneVidError, match="stage2.pruning_layer must be a 0-based layer index"):
            build_config(None, path)
    res = runner.invoke(app, ["run", "--dataset", str(tmp_path / "d.jsonl"), "--set", f"stage2.pruning_layer={text}"])
    assert res.exit_code == 2 and res.output.strip() == "error: " + LAYER_ERROR + shown, res.output


@pytest.mark.parametrize(
    "spec,num_layers,layer",
    [
        ("10/28", 28, 10), ("10/28", 4, 1), ("10/28", 36, 13), ("10/28", 64, 23), ("10/28", 80, 29),
        ("0/28", 4, 0), ("27/28", 4, 3), ("27/28", 80, 77),  # 3.86 -> 4 is clamped to the last layer
        ("1/2", 3, 2), ("1/2", 5, 3), ("1/4", 2, 1),  # exact halves round up: 1.5 -> 2, 2.5 -> 3, 0.5 -> 1
        ("2/28", 4, 0), ("8/28", 4, 1), ("12/28", 4, 2), ("20/28", 4, 3),
        (0, 4, 0), (3, 4, 3), (10, 28, 10),  # an index is taken as is
    ],
)
def test_resolve_layer_on_several_depths(spec, num_layers, layer):
    assert resolve_layer(spec, num_layers) == layer


def test_resolve_layer_refuses_an_index_the_model_lacks():
    with pytest.raises(PruneVidError, match=r"stage2.pruning_layer must be in \[0, 3\] for this model \(4 layers\), got 4; "
                                            "or give a relative depth such as '10/28'"):
        resolve_layer(4, 4, "stage2.pruning_layer")
    with pytest.raises(PruneVidError, match="got '10/28x'"):
        resolve_layer("10/28x", 28)  # a spec that never went through the config is checked too


def test_presets_keep_their_28_layer_meaning_and_fit_the_toy_model():
    layers = {name: build_config(name).stage2.pruning_layer for name in ("default", "stage2_only", "aggressive", "conservative")}
    assert {name: resolve_layer(spec, 28) for name, spec in layers.items()} == {
        "default": 10, "stage2_only": 10, "aggressive": 8, "conservative": 12}
    assert {name: resolve_layer(spec, 4) for name, spec in layers.items()} == {
        "default": 1, "stage2_only": 1, "aggressive": 1, "conservative": 2}


def test_bad_set_value_names_the_key():
    with pytest.raises(PruneVidError, match=r"stage2.keep_ratio must be in \(0, 1\], got 0.0"):
        build_config("default", None, {"keep_ratio": 0.0})


def test_yaml_syntax_error_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage1:\n  tau: [0.8\n")
    with pytest.raises(PruneVidError, match="not valid YAML"):
        build_config(None, broken)
    with pytest.raises(PruneVidError, match="config file not found"):
        build_config(None, tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "defualt"], "did you mean 'default'"),
        (["--set", "stage1.tua=0.5"], "did you mean 'stage1.tau'"),
        (["--set", "keep_ratio"], "--set expects key=value"),
        (["--config", "BAD"], "unknown key 'stage2.keep'"),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, args, message):
    bad = write_yaml(tmp_path / "bad.yaml", {"stage2": {"keep": 0.3}})
    args = [str(bad) if a == "BAD" else a for a in args]
    res = runner.invoke(app, ["run", "--dataset", str(tmp_path / "d.jsonl"), *args])
    assert res.exit_code == 2
    assert res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1, res.output
    assert message in res.output


def test_presets_command_lists_every_preset_with_its_stages():
    res = runner.invoke(app, ["presets"])
    assert res.exit_code == 0, res.output
    for name in preset_names():
        assert name in res.output

    def cells(name):
        return [c.strip() for c in next(line for line in res.output.splitlines() if f" {name} " in line).split("│")]

    assert cells("baseline")[2] == "none"
    assert cells("default")[2] == "stage1, stage2"
    assert cells("stage1_only")[2] == "stage1"
    assert cells("evs-75")[2] == "evs" and cells("fastv")[2] == "fastv"  # the comparators' presets too


def test_presets_show_prints_the_resolved_config():
    res = runner.invoke(app, ["presets", "show", "aggressive"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert shown == build_config("aggressive").to_dict()  # every key, defaults filled in
    assert shown["stage1"]["tau"] == 0.7 and shown["video"]["policy"] == "auto"


def test_presets_show_unknown_name():
    res = runner.invoke(app, ["presets", "show", "agressive"])
    assert res.exit_code == 2 and "did you mean 'aggressive'" in res.output


def test_pipeline_from_config_keeps_the_config_it_was_given():
    """The harness hands its resolved RunConfig straight to the pipeline (no flattening to
    overrides and rebuilding); load_pipeline resolves one the same way and gets an equal config."""
    import torch

    from prunevid_bench.pipeline import Pipeline, load_pipeline

    cfg = build_config("default", overrides={"model.name": "tiny", "model.device": "cpu", "model.dtype": "float32",
                                             "stage2.keep_ratio": 0.3})
    pipe = Pipeline.from_config(cfg)
    assert pipe.config is cfg
    assert next(pipe.model.parameters()).dtype == torch.float32 and pipe.device.type == "cpu"
    again = load_pipeline("tiny", preset="default", device="cpu", dtype="float32", overrides={"stage2.keep_ratio": 0.3})
    assert again.config == cfg


def test_sweep_flags_reach_the_grid_dataset_and_options(tmp_path, monkeypatch):
    """`sweep` takes the same shared option groups as `run` and hands the harness three values."""
    import prunevid_bench.harness.sweep as sweep

    seen = {}

    def fake(cfg, dataset, grid, options, **kw):
        seen.update(cfg=cfg, dataset=dataset, grid=grid, options=options, launch=kw["launch"])
        return SimpleNamespace(sweep_dir=tmp_path, cells=[], rows=[], summaries={}, failed={})

    monkeypatch.setattr(sweep, "run_sweep", fake)
    res = runner.invoke(app, ["sweep", "tau", "--values", "tau=0.7,0.9", "--dataset", str(tmp_path / "d.jsonl"),
                              "--video-root", str(tmp_path), "--format", "jsonl", "--limit", "4", "--seed", "3",
                              "--answer-mode", "logits", "--wait", "--force", "--label", "mine", "--results-dir",
                              str(tmp_path / "out"), "--preset", "default", "--model", "tiny", "--device", "cpu",
                              "--attn-implementation", "eager", "--num-frames", "6", "--controls", "random", "--dry-run",
                              "--launcher", "slurm", "--slurm-partition", "gpu", "--slurm-time", "30", "--no-wait"])
    assert res.exit_code == 0, res.output
    d, g, o, cfg = seen["dataset"], seen["grid"], seen["options"], seen["cfg"]
    assert (d.path, d.video_root, d.format, d.limit, d.seed, d.answers) == (tmp_path / "d.jsonl", tmp_path, "jsonl", 4, 3, None)
    assert (g.params, g.values, g.controls, g.metric, g.dry_run) == (("tau",), ("tau=0.7,0.9",), ("random",), "accuracy", True)
    assert (o.answer_mode, o.wait, o.force, o.label, o.results_dir, o.preset, o.baseline) == (
        "logits", True, True, "mine", tmp_path / "out", "default", None)
    assert (cfg.model.name, cfg.model.device, cfg.model.attn_implementation, cfg.video.num_frames) == ("tiny", "cpu", "eager", 6)
    assert cfg.stage1.tau == 0.8  # the preset's: the grid is applied per cell by the harness
    launch = seen["launch"]
    assert (launch.launcher, launch.slurm_partition, launch.slurm_gpus_per_cell, launch.slurm_time, launch.wait) == (
        "slurm", "gpu", 1, "30", False)


def test_run_target_is_the_model_section():
    from prunevid_bench.harness.specs import RunTarget

    target = RunTarget(model="tiny", attention="eager")
    assert target.overrides() == {"model.name": "tiny", "model.attn_implementation": "eager"}
    cfg = build_config("default", overrides=target.overrides())
    assert RunTarget.of(cfg) == RunTarget("tiny", cfg.model.device, cfg.model.dtype, "eager")


def test_bad_answer_mode_is_refused_when_the_options_are_built():
    from prunevid_bench.harness.specs import EvalOptions

    with pytest.raises(PruneVidError, match="--answer-mode must be one of generate, logits, got 'logit'"):
        EvalOptions(answer_mode="logit")


def test_config_reads_its_sections_from_the_method_registry_and_no_method_imports_config():
    """One direction only: config.py imports the registry at module level; no module of methods/
    or stages/ imports config, not even inside a function (a hidden cycle), and the registry
    loads every built-in method without config in sys.modules."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import prunevid_bench
    from prunevid_bench.config import section_types
    from prunevid_bench.methods import all_methods
    from prunevid_bench.methods.prunevid_stage1 import Stage1Config
    from prunevid_bench.methods.prunevid_stage2 import SCORE_MODES, Stage2Config

    root = Path(prunevid_bench.__file__).parent
    for path in [*(root / "methods").glob("*.py"), *(root / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[:2] == ["prunevid_bench", "config"] for n in names), f"{path.name} imports config"
    assert {m.section: m.config for m in all_methods()}.items() <= section_types().items()
    assert section_types()["stage1"] is Stage1Config and section_types()["stage2"] is Stage2Config
    from prunevid_bench import config

    assert (config.Stage1Config, config.Stage2Config, config.SCORE_MODES) == (Stage1Config, Stage2Config, SCORE_MODES)  # old home
    code = "import sys, prunevid_bench.methods as m; m.all_methods(); print('prunevid_bench.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_method_section_by_keyword_and_as_an_attribute():
    from prunevid_bench.methods.prunevid_stage1 import Stage1Config

    cfg = RunConfig(stage1=Stage1Config(enabled=True, tau=0.5))
    assert cfg.stage1.tau == 0.5 and cfg.section("stage1") is cfg.stage1 and cfg.enabled_methods == ["prunevid_stage1"]
    assert cfg.tome.enabled is False and RunConfig() == RunConfig()
    with pytest.raises(TypeError, match="unknown section"):
        RunConfig(stage3=Stage1Config())
    with pytest.raises(AttributeError):
        cfg.stage3  # noqa: B018
