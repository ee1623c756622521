"""Video loading through both backends, frame sampling and bad input."""

from __future__ import annotations

import pytest

from prunevid_bench.errors import PruneVidError
from prunevid_bench.video import load_clip, sample_indices
from tests.conftest import write_clip


@pytest.mark.parametrize("backend", ["decord", "pyav"])
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


def test_backends_decode_same_frames(clip_dir):
    path = write_clip(clip_dir / "c6.mp4", 6)
    a = load_clip(path, num_frames=6, backend="decord").frames.astype(int)
    b = load_clip(path, num_frames=6, backend="pyav").frames.astype(int)
    assert abs(a - b).mean() < 3


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
