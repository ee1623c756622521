"""Config precedence (--set > --config YAML > preset > defaults), validation messages, presets CLI."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from prunevid_bench.cli import app, collect_overrides
from prunevid_bench.config import RunConfig, build_config, preset_names, resolve_key
from prunevid_bench.errors import PruneVidError

runner = CliRunner()


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_have_every_stage_off():
    cfg = build_config()
    assert cfg == RunConfig()
    assert not cfg.stage1.enabled and not cfg.stage2.enabled and not cfg.stage3_enabled
    assert cfg.video.num_frames == 16 and cfg.generation.max_new_tokens == 16


def test_default_preset_is_the_paper_setting():
    cfg = build_config("default")
    assert (cfg.stage1.enabled, cfg.stage1.tau, cfg.stage1.cluster_ratio, cfg.stage1.temporal_segment_ratio) == (True, 0.8, 0.5, 0.25)
    assert (cfg.stage2.enabled, cfg.stage2.keep_ratio, cfg.stage2.pruning_layer, cfg.stage2.score) == (True, 0.4, 10, "prunevid")


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
    assert cfg.video.num_frames == 8  # the user file beats the default (16)
    assert cfg.stage2.keep_ratio == 0.4  # the preset beats the default, untouched by the others
    assert cfg.video.max_frames == 64  # the default where nobody says anything


def test_cli_flags_and_set_reach_the_config(tmp_path, monkeypatch):
    """Through the real `run --dataset` command: what evaluate_dataset receives."""
    import prunevid_bench.harness.evaluate as evaluate

    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_dataset", lambda cfg, dataset, **kw: seen.update(cfg=cfg, kw=kw))
    user = write_yaml(tmp_path / "my.yaml", {"stage2": {"keep_ratio": 0.3}, "video": {"num_frames": 8}})
    res = runner.invoke(app, ["run", "--dataset", str(tmp_path / "d.jsonl"), "--preset", "default", "--config", str(user),
                              "--set", "keep_ratio=0.2", "--num-frames", "6", "--set", "video.max_frames=10", "--limit", "3"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.stage2.keep_ratio == 0.2 and cfg.video.num_frames == 6 and cfg.video.max_frames == 10
    assert cfg.stage1.tau == 0.8 and seen["kw"]["preset"] == "default" and seen["kw"]["limit"] == 3


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
        ({"stage1": {"tau": "high"}}, "stage1.tau must be float, got 'high'"),
        ({"stage1": {"enabled": "maybe"}}, "stage1.enabled must be bool"),
        ({"stage2": {"pruning_layer": 2.5}}, "stage2.pruning_layer must be int"),
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

    assert cells("baseline")[2:4] == ["off", "off"]
    assert cells("default")[2:4] == ["on", "on"]
    assert cells("stage1_only")[2:4] == ["on", "off"]


def test_presets_show_prints_the_resolved_config():
    res = runner.invoke(app, ["presets", "show", "aggressive"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert shown == build_config("aggressive").to_dict()  # every key, defaults filled in
    assert shown["stage1"]["tau"] == 0.7 and shown["video"]["num_frames"] == 16


def test_presets_show_unknown_name():
    res = runner.invoke(app, ["presets", "show", "agressive"])
    assert res.exit_code == 2 and "did you mean 'aggressive'" in res.output
