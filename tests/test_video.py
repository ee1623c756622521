"""Video loading through every decoder installed, frame sampling and bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from prunevid_bench import decoders
from tests.conftest import PROJECT_ROOT
from prunevid_bench.errors import PruneVidError
from prunevid_bench.video import load_clip, sample_indices
from tests.conftest import write_clip


def installed(name):
    """A decoder's param, skipped where its optional package is not installed."""
    return pytest.param(name, marks=pytest.mark.skipif(not decoders.installed(name), reason=f"{name} not installed"))


DECODERS = [installed(name) for name in ("pyav", "decord", "torchcodec")]


@pytest.mark.parametrize("backend", DECODERS)
def test_known_frame_count(clip_dir, backend):
    path = write_clip(clip_dir / "c12.mp4", 12, size=(56, 84), fps=6)
    clip = load_clip(path, num_frames=None, fps=6, max_frames=100, backend=backend)
    assert clip.backend == backend
    assert clip.total_frames == 12
    assert clip.frames.shape == (12, 56, 84, 3)
    assert clip.native_fps == pytest.approx(6.0)
    assert clip.sampled_fps == pytest.approx(6.0)
    sampled = load_clip(path, num_frames=4, backend=backend)
    assert sampled.num_frames == 4 and sampled.indices == [1, 4, 7, 10]
    assert sampled.sampled_fps == pytest.approx(2.0)  # every third frame of a 6 fps video


@pytest.mark.parametrize("backend", DECODERS[1:])
def test_every_decoder_gives_pyavs_pixels_on_our_clips(clip_dir, backend):
    """The bundled toy clip and the toy world's clips (what the README's table runs on) decode to
    the same pixels, the same frames at the same rate, whichever decoder reads them; the noise
    clips of the tests (libx264 at crf 18) within a few levels."""
    from prunevid_bench.toy.world import generate_dataset

    toy = generate_dataset(clip_dir / "toy-decoders", 2, seed=1).parent / "videos"
    for path in [PROJECT_ROOT / "examples" / "toy_sample.mp4", *sorted(toy.glob("*.mp4"))]:
        a, b = load_clip(path, num_frames=16, backend="pyav"), load_clip(path, num_frames=16, backend=backend)
        assert (a.indices, a.native_fps, a.total_frames) == (b.indices, b.native_fps, b.total_frames)
        assert np.array_equal(a.frames, b.frames), path
    path = write_clip(clip_dir / "c6.mp4", 6)
    a = load_clip(path, num_frames=6, backend=backend).frames.astype(int)
    b = load_clip(path, num_frames=6, backend="pyav").frames.astype(int)
    assert abs(a - b).mean() < 3


def test_pyav_is_the_default_and_a_missing_decoder_is_one_line(clip_dir, monkeypatch):
    path = write_clip(clip_dir / "c4.mp4", 4)
    assert load_clip(path, num_frames=4).backend == "pyav"
    assert decoders.order("auto")[0] == "pyav"
    monkeypatch.setitem(sys.modules, "decord", None)  # as when decord is not installed
    assert "decord" not in decoders.order("auto") and load_clip(path, num_frames=4).backend == "pyav"
    with pytest.raises(PruneVidError, match=r"video.decoder=decord needs the decord package \(pip install 'prunevid-bench\[decord\]'\)"):
        load_clip(path, num_frames=4, backend="decord")
    with pytest.raises(PruneVidError, match="unknown video decoder 'opencv'"):
        decoders.order("opencv")


def test_the_configured_decoder_reaches_the_record(clip_dir, tiny_pipe):
    from prunevid_bench.config import build_config

    path = write_clip(clip_dir / "c8d.mp4", 8)
    for decoder in ["pyav"] + [d for d in ("decord", "torchcodec") if decoders.installed(d)]:
        cfg = build_config(None, None, {"video.decoder": decoder, "video.num_frames": 4, "generation.max_new_tokens": 1})
        assert tiny_pipe.run(path, "What?", config=cfg).video_backend == decoder
    with pytest.raises(PruneVidError, match="video.decoder must be one of auto, pyav, decord, torchcodec"):
        build_config(None, None, {"video.decoder": "decrod"})


def test_sampling_rules():
    assert sample_indices(100, 25.0, num_frames=8)[0] == [6, 18, 31, 43, 56, 68, 81, 93]
    idx, fps = sample_indices(100, 25.0, fps=2.0, max_frames=64)  # 4 s at 2 fps
    assert len(idx) == 8 and fps == pytest.approx(2.0)
    idx, fps = sample_indices(1000, 25.0, fps=2.0, max_frames=16)  # capped: rate drops
    assert len(idx) == 16 and fps == pytest.approx(25.0 * 16 / 1000)
    assert len(sample_indices(100, 25.0, num_frames=7)[0]) == 6  # whole temporal grid steps
    assert sample_indices(1, 25.0, num_frames=1)[0] == [0, 0]  # a still is one full step
    with pytest.raises(PruneVidError, match="asked for 8 frames but the clip has only 1"):
        sample_indices(1, 25.0, num_frames=8)  # refused, never silently capped
    assert len(sample_indices(100, 25.0, num_frames=96, max_frames=64)[0]) == 96  # max_frames caps --fps only


def test_bad_files(tmp_path):
    with pytest.raises(PruneVidError, match="not found"):
        load_clip(tmp_path / "nope.mp4")
    with pytest.raises(PruneVidError, match="directory"):
        load_clip(tmp_path)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(PruneVidError, match="empty"):
        load_clip(empty)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    with pytest.raises(PruneVidError, match="cannot decode"):
        load_clip(corrupt)


def test_zero_frame_video(tmp_path):
    import av

    path = tmp_path / "zero.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height = 32, 32
    with pytest.raises(PruneVidError):
        load_clip(path)


def test_time_window(clip_dir):
    path = write_clip(clip_dir / "c24.mp4", 24, fps=4)  # 6 s
    clip = load_clip(path, num_frames=4, start=2.0, end=4.0)  # frames 8..15
    assert clip.indices == [9, 11, 13, 15]
    assert clip.sampled_fps == pytest.approx(2.0)
    assert min(load_clip(path, num_frames=4, start=5.0).indices) >= 20
    with pytest.raises(PruneVidError, match="only 4"):
        load_clip(path, num_frames=24, start=5.0)  # the window holds 4 frames
