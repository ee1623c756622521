"""The feature cache never serves the wrong features: new weights in the old folder, an entry
edited or moved under another key, a same-size same-mtime video swap are all recomputed (with a
warning for a damaged entry); a folder or entry other users can write to is refused."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.errors import PruneVidError
from prunevid_bench.feature_cache import FeatureCache
from prunevid_bench.toy.world import generate_dataset

from tests.conftest import write_clip

SETTINGS = {"stage1.enabled": True, "stage2.enabled": True, "pruning_layer": 1, "keep_ratio": 0.5,
            "generation.max_new_tokens": 4, "video.num_frames": 4}


@pytest.fixture
def towered(tiny_pipe):
    """The tiny pipe, and how often its vision tower ran."""
    calls = [0]
    hook = tiny_pipe.model.model.visual.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    yield tiny_pipe, calls
    hook.remove()
    tiny_pipe.feature_cache = None


def cached_run(pipe, calls, folder, video, question="What is happening?"):
    """One run through a fresh disk-only cache (as a new process would): (result, stats, tower runs)."""
    pipe.feature_cache = FeatureCache(0, folder)
    calls[0] = 0
    result = pipe.run(str(video), question, **SETTINGS)
    stats, pipe.feature_cache = pipe.feature_cache.stats, None
    return result, stats, calls[0]


def plain_run(pipe, video, question="What is happening?"):
    pipe.feature_cache = None
    return pipe.run(str(video), question, **SETTINGS)


def test_weights_replaced_in_place_are_recomputed(tmp_path, clip8):
    from prunevid_bench.models.tiny import build_processor, build_tiny_model
    from prunevid_bench.pipeline import load_pipeline

    folder = tmp_path / "ckpt"
    build_tiny_model(seed=0).save_pretrained(folder)
    build_processor().save_pretrained(folder)

    def run(label):
        pipe = load_pipeline(str(folder), device="cpu", dtype="float32")
        calls = [0]
        pipe.model.model.visual.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        plain = plain_run(pipe, clip8)
        return plain, *cached_run(pipe, calls, tmp_path / "features", clip8)

    _, first, stats, tower = run("old")
    assert (stats["misses"], tower) == (1, 1)
    _, again, stats, tower = run("old again")
    assert (stats["disk_hits"], tower) == (1, 0)

    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    build_tiny_model(seed=1).save_pretrained(folder)  # retrained into the same folder...
    os.utime(weights, ns=(mtime, mtime))  # ...and its mtime kept (cp -p, rsync -a)
    fresh, changed, stats, tower = run("new")
    assert (stats["misses"], stats["disk_hits"], tower, changed.vision_cached) == (1, 0, 1, False)
    assert changed.first_token_logits.tolist() == fresh.first_token_logits.tolist()
    assert changed.first_token_logits.tolist() != first.first_token_logits.tolist()


def test_the_builtin_weights_are_part_of_the_key(tiny_pipe, clip8, monkeypatch):
    import torch

    import prunevid_bench
    from prunevid_bench import content_id
    from prunevid_bench.feature_cache import sample_key

    key = sample_key(tiny_pipe, str(clip8), "What?", tiny_pipe.config, None)[0]
    monkeypatch.setattr(prunevid_bench, "__version__", "0.0.0-other")
    content_id._model_ids.clear()
    assert sample_key(tiny_pipe, str(clip8), "What?", tiny_pipe.config, None)[0] != key
    monkeypatch.undo()
    content_id._model_ids.clear()
    weight = next(tiny_pipe.model.parameters())
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
        content_id._model_ids.clear()
        changed = sample_key(tiny_pipe, str(clip8), "What?", tiny_pipe.config, None)[0]
        weight.copy_(kept)
    content_id._model_ids.clear()
    assert changed != key and sample_key(tiny_pipe, str(clip8), "What?", tiny_pipe.config, None)[0] == key


def _rewrite(entry: Path, edit) -> None:
    """Rewrite a safetensors entry with ``edit(tensors, metadata)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(entry), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(entry), metadata=meta)


@pytest.mark.parametrize("damage", ["reversed", "zeroed", "moved"])
def test_an_edited_or_moved_entry_is_recomputed_with_a_warning(towered, tmp_path, capsys, damage):
    pipe, calls = towered
    clips = [write_clip(tmp_path / f"clip{i}.mp4", 8, seed=i) for i in range(2)]
    folder = tmp_path / "features"
    expected = plain_run(pipe, clips[0], "Which way?")
    entries = []
    for clip, question in ((clips[0], "Which way?"), (clips[1], "What colour?")):
        before = set(folder.glob("*.safetensors"))
        cached_run(pipe, calls, folder, clip, question)
        (entry,) = set(folder.glob("*.safetensors")) - before
        entries.append(entry)
    if damage == "reversed":
        _rewrite(entries[0], lambda t, m: t.__setitem__("video.0", t["video.0"].flip(0).contiguous()))
    elif damage == "zeroed":
        _rewrite(entries[0], lambda t, m: t.__setitem__("video.0", t["video.0"] * 0))
    else:  # the other sample's entry, under this sample's name, its key rewritten
        entries[0].write_bytes(entries[1].read_bytes())
        _rewrite(entries[0], lambda t, m: m.__setitem__("key", entries[0].stem))
    capsys.readouterr()
    result, stats, tower = cached_run(pipe, calls, folder, clips[0], "Which way?")
    err = capsys.readouterr().err
    assert (stats["rejected"], stats["misses"], tower, result.vision_cached) == (1, 1, 1, False)
    assert err.count("\n") == 1 and err.startswith("warning: feature cache entry") and "recomputed" in err
    assert ("request" in err) if damage == "moved" else ("tensors" in err)
    assert result.generated_token_ids == expected.generated_token_ids
    assert result.first_token_logits.tolist() == expected.first_token_logits.tolist()
    _, stats, tower = cached_run(pipe, calls, folder, clips[0], "Which way?")
    assert (stats["disk_hits"], tower) == (1, 0)  # rewritten whole


def _pad_mp4(path: Path, size: int) -> None:
    """Grow an mp4 to ``size`` bytes with a trailing ``free`` box (demuxers skip it)."""
    extra = size - path.stat().st_size
    assert extra >= 8
    with open(path, "ab") as f:
        f.write(struct.pack(">I", extra) + b"free" + b"\0" * (extra - 8))


def test_a_same_size_same_mtime_video_swap_is_recomputed(towered, tmp_path):
    pipe, calls = towered
    a, b = write_clip(tmp_path / "a.mp4", 8, seed=1), write_clip(tmp_path / "b.mp4", 8, seed=2)
    size = max(a.stat().st_size, b.stat().st_size) + 64
    _pad_mp4(a, size)
    _pad_mp4(b, size)
    video = tmp_path / "video.mp4"
    video.write_bytes(a.read_bytes())
    first, stats, tower = cached_run(pipe, calls, tmp_path / "features", video)
    assert (stats["misses"], tower) == (1, 1)
    mtime = video.stat().st_mtime_ns
    video.write_bytes(b.read_bytes())  # cp -p: same path, inode and size, mtime kept
    os.utime(video, ns=(mtime, mtime))
    assert video.stat().st_size == size and video.stat().st_mtime_ns == mtime
    fresh = plain_run(pipe, b)
    swapped, stats, tower = cached_run(pipe, calls, tmp_path / "features", video)
    assert (stats["misses"], stats["disk_hits"], tower, swapped.vision_cached) == (1, 0, 1, False)
    assert swapped.first_token_logits.tolist() == fresh.first_token_logits.tolist()
    assert swapped.first_token_logits.tolist() != first.first_token_logits.tolist()


def test_the_folder_is_private_and_a_writable_or_foreign_one_refused(tmp_path, capsys):
    folder = tmp_path / "new" / "features"
    FeatureCache(0, folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    with pytest.raises(PruneVidError, match=r"writable by other users \(mode 777\).*--feature-cache-shared"):
        FeatureCache(0, open_folder)
    capsys.readouterr()
    assert FeatureCache(0, open_folder, shared=True).shared
    err = capsys.readouterr().err
    assert err.startswith("warning: --feature-cache-shared") and "change the features" in err
    if os.geteuid() == 0:  # root can hand the folder to another user
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(PruneVidError, match="owned by another user"):
            FeatureCache(0, foreign)
    with pytest.raises(PruneVidError, match="applies to a --feature-cache folder"):
        FeatureCache.from_options(1, None, shared=True)


def test_an_entry_others_can_write_is_not_used(towered, tmp_path, clip8, capsys):
    pipe, calls = towered
    folder = tmp_path / "features"
    cached_run(pipe, calls, folder, clip8)
    (entry,) = folder.glob("*.safetensors")
    assert entry.stat().st_mode & 0o777 == 0o600
    entry.chmod(0o666)
    capsys.readouterr()
    _, stats, tower = cached_run(pipe, calls, folder, clip8)
    assert (stats["rejected"], tower) == (1, 1) and "writable by other users" in capsys.readouterr().err
    assert entry.stat().st_mode & 0o777 == 0o600  # replaced by a fresh entry of ours


def test_the_cli_refuses_a_world_writable_cache_and_shared_accepts_it(tmp_path, tiny_pipe, monkeypatch):
    from prunevid_bench.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
    toy = generate_dataset(tmp_path / "toy", 1, seed=5)
    folder = tmp_path / "features"
    folder.mkdir()
    folder.chmod(0o777)
    args = ["run", "--dataset", str(toy), "--model", "tiny", "--max-new-tokens", "2", "--num-frames", "4",
            "--results-dir", str(tmp_path / "runs"), "--feature-cache", str(folder)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "writable by other users" in res.output and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("error: --feature-cache")
    res = CliRunner().invoke(app, args + ["--feature-cache-shared"])
    tiny_pipe.feature_cache = None
    assert res.exit_code in (0, 3), res.output
    assert "--feature-cache-shared" in res.output and len(list(folder.glob("*.safetensors"))) == 1
