"""lmms-eval's ``model_args`` for ``--model prunevid``, read without lmms-eval installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunevid_bench.config import build_config
from prunevid_bench.errors import PruneVidError
from prunevid_bench.lmms.args import check_generation, cut_at_stop, parse_model_args, stop_strings
from prunevid_bench.lmms.records import default_records_dir, output_path_from_argv, throughput


def test_model_preset_and_keys_dotted_or_short():
    # What lmms-eval hands over for "pretrained=toy,preset=default,stage2.keep_ratio=0.3,tau=0.7,pruning_layer=2"
    args = parse_model_args({"pretrained": "toy", "preset": "default", "stage2.keep_ratio": 0.3, "tau": 0.7,
                             "pruning_layer": 2, "batch_size": "1", "device": "cpu"})
    assert args.preset == "default"
    assert args.overrides == {"model.name": "toy", "stage2.keep_ratio": 0.3, "stage1.tau": 0.7,
                              "stage2.pruning_layer": 2, "model.device": "cpu"}
    cfg = build_config(args.preset, args.config_file, args.overrides)
    assert (cfg.stage2.keep_ratio, cfg.stage1.tau, cfg.stage1.enabled) == (0.3, 0.7, True)


def test_values_are_read_as_yaml_so_quotes_carry_commas():
    # lmms-eval keeps quoted and bracketed text whole (quotes included): we read it as --set does.
    args = parse_model_args({"model": "toy", "label": '"fast,small"', "config": "'/runs/a,b.yaml'",
                             "video.policy": "lmms-eval", "max_num_frames": 8, "video.max_pixels": "null"})
    assert args.label == "fast,small"
    assert args.config_file == Path("/runs/a,b.yaml")
    assert args.overrides == {"model.name": "toy", "video.policy": "lmms-eval", "video.num_frames": 8,
                              "video.max_pixels": None}


def test_the_device_flag_yields_to_model_args():
    assert parse_model_args({"device": "cuda", "model.device": "cpu"}).overrides == {"model.device": "cpu"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_ratoi": 0.3}, "unknown config key 'keep_ratoi' (did you mean 'keep_ratio'?)"),
        ({"pretrained": "toy", "model": "tiny"}, "give pretrained= or model=, not both"),
        ({"batch_size": "2"}, "--batch_size 2 is refused: prunevid runs one sample per forward"),
        ({"batch_size": "auto"}, "--batch_size auto is refused"),
        ({"max_batch_size": 8}, "--max_batch_size 8 is refused"),
    ],
)
def test_refused_in_one_line(kwargs, message):
    with pytest.raises(PruneVidError) as info:
        parse_model_args(kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("gen_kwargs", [{"temperature": 0.7}, {"do_sample": True}, {"num_beams": 4}])
def test_sampling_and_beams_are_refused(gen_kwargs):
    with pytest.raises(PruneVidError, match="greedily"):
        check_generation(gen_kwargs, "task t")


def test_greedy_settings_pass():
    check_generation({"temperature": 0, "do_sample": False, "num_beams": 1, "max_new_tokens": 16}, "task t")
    check_generation({}, "task t")


def test_stop_strings_cut_the_reply_but_not_at_the_default_blank_line():
    assert stop_strings({"until": ["\n\n"]}) == []  # lmms-eval's default few-shot delimiter
    assert stop_strings({"until": "Q:"}) == ["Q:"]
    assert cut_at_stop("B. the cat\nQ: next", stop_strings({"until": ["Q:", "\n\n", ""]})) == "B. the cat\n"
    assert cut_at_stop("A\n\nbecause", stop_strings({"until": ["\n\n"]})) == "A\n\nbecause"


def test_records_go_beside_the_output_path():
    assert output_path_from_argv(["lmms_eval", "--tasks", "x", "--output_path", "out"]) == Path("out")
    assert output_path_from_argv(["lmms_eval", "--output_path=o2"]) == Path("o2")
    assert output_path_from_argv(["lmms_eval"]) is None
    assert default_records_dir("my run", None, Path("out")).parent == Path("out/prunevid")
    assert default_records_dir(None, "default", Path("out")).name.startswith("default-")
    assert default_records_dir(None, None, None).parent == Path("results")


def test_throughput_sums_time_and_tokens_and_averages_fields():
    rows = [{"generated_tokens": 4, "ttft_s": 0.5, "decode_s": 1.5, "tokens_after": 10, "kv_cache_bytes": 100},
            {"generated_tokens": 6, "ttft_s": 1.0, "decode_s": 1.0, "tokens_after": 30, "kv_cache_bytes": None}]
    out = throughput(rows)
    assert (out["total_gen_tokens"], out["total_elapsed_time"], out["avg_speed"]) == (10, 4.0, 2.5)
    assert out["additional_metrics"]["prunevid_tokens_after"] == 20
    assert out["additional_metrics"]["total_requests"] == 2  # lmms-eval 0.7.3 derives its avg_latency from it
    assert out["additional_metrics"]["prunevid_kv_cache_bytes"] == 100
    assert "prunevid_peak_memory_bytes" not in out["additional_metrics"]
