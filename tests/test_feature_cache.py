"""The vision-feature cache: a sweep encodes each video once and answers token for token as
without it; TTFT carries the recorded vision time; disk entries are reused, and a corrupt entry
or a changed file is recomputed, never served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.feature_cache import FeatureCache
from prunevid_bench.harness.runs import read_samples
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.toy.world import generate_dataset

from tests.conftest import write_clip

runner = CliRunner()
SAME = ("reply_raw", "generated_text", "generated_tokens", "prompt_tokens", "visual_tokens", "tokens_after_stage1",
        "tokens_after", "llm_prefill_tokens", "prediction", "video_grid_thw", "frame_indices")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("toy"), 4, seed=5)


@pytest.fixture
def counted(monkeypatch, tiny_pipe):
    """The session's tiny model for every load, and how often its vision tower and the video
    decoder ran."""
    import prunevid_bench.messages as messages

    calls = {"tower": 0, "decode": 0}
    hook = tiny_pipe.model.model.visual.register_forward_hook(lambda *_: calls.__setitem__("tower", calls["tower"] + 1))
    original = messages.load_clip

    def load_clip(*args, **kwargs):
        calls["decode"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(messages, "load_clip", load_clip)
    monkeypatch.setattr(Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
    yield calls
    hook.remove()
    tiny_pipe.feature_cache = None


def sweep(toy, out, *extra):
    args = ["sweep", "tau", "keep_ratio", "--values", "tau=0.7,0.95", "--values", "keep_ratio=0.3,0.6",
            "--dataset", toy, "--model", "tiny", "--max-new-tokens", "4", "--num-frames", "4", "--preset", "default",
            "--set", "stage2.pruning_layer=1", "--results-dir", out, "--warmup", "0", *extra]  # counts calls
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code in (0, 3), res.output  # 3: some replies unparsed (random weights)
    (sweep_dir,) = Path(out).iterdir()
    return {cell.name: read_samples(cell / "samples.jsonl") for cell in sorted((sweep_dir / "cells").iterdir())}


def test_sweep_with_the_cache_answers_token_for_token_and_encodes_each_video_once(toy, tmp_path, counted):
    plain = sweep(toy, tmp_path / "plain", "--feature-cache-gb", "0")
    assert len(plain) == 5 and counted["tower"] == 5 * 4 and counted["decode"] == 5 * 4
    counted.update(tower=0, decode=0)
    cached = sweep(toy, tmp_path / "cached")
    assert counted["tower"] == 4 and counted["decode"] == 4  # once per video, for the baseline cell

    assert plain.keys() == cached.keys()
    for name, records in cached.items():
        for sample_id, record in records.items():
            before = plain[name][sample_id]
            assert {k: record[k] for k in SAME} == {k: before[k] for k in SAME}, (name, sample_id)
            assert before["vision_cached"] is False
            assert record["vision_cached"] is (name != "baseline")
            # honest TTFT: the baseline's measured tower time + this cell's post-vision time
            vision = cached["baseline"][sample_id]["vision_encoder_s"]
            assert vision > 0 and record["vision_encoder_s"] == vision
            assert record["ttft_s"] == pytest.approx(vision + record["prefill_s"], abs=1e-12)


def test_disk_entries_are_reused_and_corrupt_or_changed_ones_recomputed(tiny_pipe, tmp_path, counted):
    clip = write_clip(tmp_path / "clip.mp4", 32, seed=1)
    settings = {"stage1.enabled": True, "stage2.enabled": True, "pruning_layer": 1, "keep_ratio": 0.5,
                "generation.max_new_tokens": 4}
    question = "What is happening?"
    tiny_pipe.feature_cache = None
    expected = tiny_pipe.run(str(clip), question, **settings)

    def cached_run():
        tiny_pipe.feature_cache = FeatureCache(0, tmp_path / "features")  # disk only: a new process
        counted["tower"] = 0
        result = tiny_pipe.run(str(clip), question, **settings)
        return result, tiny_pipe.feature_cache.stats, counted["tower"]

    first, stats, tower = cached_run()
    assert (stats["misses"], tower, first.vision_cached) == (1, 1, False)
    (entry,) = (tmp_path / "features").glob("*.safetensors")
    again, stats, tower = cached_run()
    assert (stats["disk_hits"], tower, again.vision_cached) == (1, 0, True)
    for result in (first, again):
        assert result.generated_token_ids == expected.generated_token_ids
        assert (result.tokens_after_stage1, result.tokens_after) == (expected.tokens_after_stage1, expected.tokens_after)
    assert again.vision_encoder_s == first.vision_encoder_s

    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a half-written file
    repaired, stats, tower = cached_run()
    assert (stats["corrupt"], stats["misses"], tower, repaired.vision_cached) == (1, 1, 1, False)
    assert repaired.generated_token_ids == expected.generated_token_ids
    _, stats, tower = cached_run()
    assert (stats["disk_hits"], tower) == (1, 0)  # rewritten whole

    write_clip(clip, 32, seed=2)  # another video under the same name
    os.utime(clip, ns=(entry.stat().st_mtime_ns + 10**9,) * 2)
    tiny_pipe.feature_cache = None
    fresh = tiny_pipe.run(str(clip), question, **settings)
    changed, stats, tower = cached_run()
    assert (stats["misses"], tower, changed.vision_cached) == (1, 1, False)
    assert changed.generated_token_ids == fresh.generated_token_ids
    assert changed.first_token_logits.tolist() != expected.first_token_logits.tolist()


def test_dataset_run_reuses_the_disk_cache(toy, tmp_path, counted):
    base = ["run", "--dataset", toy, "--model", "tiny", "--max-new-tokens", "3", "--num-frames", "4",
            "--preset", "default", "--set", "stage2.pruning_layer=1", "--results-dir", tmp_path / "runs",
            "--feature-cache", tmp_path / "features", "--warmup", "0"]  # counts calls
    logs = []
    for label in ("first", "second"):
        res = runner.invoke(app, [str(a) for a in base + ["--label", label]])
        assert res.exit_code in (0, 3), res.output
        (run_dir,) = (tmp_path / "runs").glob(f"{label}-*")
        logs.append(read_samples(run_dir / "samples.jsonl"))
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 4
    assert counted["tower"] == 4  # the second run read every sample's features from disk
    for sample_id, record in logs[1].items():
        assert record["vision_cached"] and not logs[0][sample_id]["vision_cached"]
        assert {k: record[k] for k in SAME} == {k: logs[0][sample_id][k] for k in SAME}


def test_cache_flags_are_checked(tmp_path, clip8):
    res = runner.invoke(app, ["run", str(clip8), "What?", "--model", "tiny", "--feature-cache", str(tmp_path)])
    assert res.exit_code != 0 and "--feature-cache" in res.output and "only apply to --dataset" in res.output
    res = runner.invoke(app, ["sweep", "tau", "--values", "tau=0.7", "--dataset", str(tmp_path / "x.jsonl"),
                              "--feature-cache-gb", "-1", "--model", "tiny"])
    assert res.exit_code == 2 and "--feature-cache-gb must be >= 0" in res.output
    assert FeatureCache.from_options(0, None) is None  # off: no cache at all
    assert FeatureCache.from_options(0, tmp_path).max_bytes == 0  # disk only


def test_the_key_holds_what_the_features_depend_on_and_nothing_per_process(tiny_pipe, clip8):
    import copy

    from prunevid_bench.feature_cache import sample_key
    from prunevid_bench.models.tiny import build_processor
    from prunevid_bench.pipeline import _with_overrides

    cfg = tiny_pipe.config
    key = sample_key(tiny_pipe, str(clip8), "What?", cfg, None)[0]
    rebuilt = copy.copy(tiny_pipe)
    rebuilt.processor = build_processor()  # a new processor object (as in another process): same key
    assert sample_key(rebuilt, str(clip8), "What?", cfg, None)[0] == key
    rebuilt.processor = build_processor(max_pixels=56 * 56)
    assert sample_key(rebuilt, str(clip8), "What?", cfg, None)[0] != key
    assert sample_key(tiny_pipe, str(clip8), "Why?", cfg, None)[0] != key
    fewer = _with_overrides(cfg.to_dict(), {"video.num_frames": 4})
    assert sample_key(tiny_pipe, str(clip8), "What?", fewer, None)[0] != key
    stages = _with_overrides(cfg.to_dict(), {"stage2.enabled": True, "stage2.keep_ratio": 0.2})
    assert sample_key(tiny_pipe, str(clip8), "What?", stages, None)[0] == key  # pruning never changes the features


def test_a_full_cache_keeps_the_first_samples_for_the_next_cell():
    """Samples come in the same order in every cell: with room for 3 of 5, the next cell finds
    the first 2 (and the one just run), instead of missing every time as LRU would."""
    import torch

    from prunevid_bench.feature_cache import Entry

    def entry():
        return Entry({"input_ids": torch.zeros(256, dtype=torch.int32)}, [], "", "qwen", "")  # 1 KiB

    cache = FeatureCache(3 * 1024)
    for key in "abcde":
        cache._put(key, entry(), to_disk=False)
    assert list(cache._memory) == ["a", "b", "e"]
    hits = [key for key in "abcde" if cache._get(key, "") is not None or cache._put(key, entry(), to_disk=False)]
    assert hits == ["a", "b", "e"]
