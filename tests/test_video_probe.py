"""The PyAV fallback keeps only the sampled frames; the preflight probe decodes one frame.

Peak memory itself is a benchmark figure (benchmarks/bench_video_memory.py, docs/benchmarks.md).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from prunevid_bench.errors import PruneVidError
from prunevid_bench import decoders
from prunevid_bench.decoders import _decode_frames_at
from prunevid_bench.video import check_video, load_clip
from tests.conftest import write_clip


def test_pyav_decodes_the_same_sampled_frames_as_decord(clip_dir):
    pytest.importorskip("decord")  # an optional extra
    path = write_clip(clip_dir / "c30.mp4", 30, fps=10, seed=3)
    a = load_clip(path, num_frames=6, backend="decord")
    b = load_clip(path, num_frames=6, backend="pyav")
    assert a.indices == b.indices == [2, 7, 12, 17, 22, 27]
    assert b.total_frames == 30 and b.frames.shape == (6, 112, 112, 3)
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 3
    one = load_clip(path, num_frames=1, backend="pyav")  # a duplicated index is one decoded frame, twice
    assert one.indices == [15, 15] and np.array_equal(one.frames[0], one.frames[1])


@pytest.mark.parametrize("miscount", [-4, 5])
def test_pyav_resamples_when_packets_are_not_one_frame_each(clip_dir, monkeypatch, miscount):
    from prunevid_bench import decoders

    path = write_clip(clip_dir / "c20.mp4", 20, fps=10, seed=4)
    monkeypatch.setattr(decoders, "_count_packets", lambda p: 20 + miscount)
    clip = load_clip(path, num_frames=4, backend="pyav")
    assert clip.total_frames == 20 and clip.indices == [2, 7, 12, 17]
    assert clip.sampled_fps == pytest.approx(2.0)
    reference = load_clip(path, num_frames=4, backend="decord" if "decord" in decoders.order("auto") else "pyav")
    assert np.abs(clip.frames.astype(int) - reference.frames.astype(int)).mean() < 3


def test_only_wanted_frames_are_converted(clip_dir):
    path = write_clip(clip_dir / "c10.mp4", 10)
    kept, decoded = _decode_frames_at(path, {0, 9, 42})
    assert decoded == 10 and sorted(kept) == [0, 9]


@pytest.fixture
def no_decord(monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord fails, as when it is missing


@pytest.mark.parametrize("decord", ["available", "missing"])
def test_probe_refuses_a_frame_shape_the_processor_cannot_take(clip_dir, request, decord):
    if decord == "missing":
        request.getfixturevalue("no_decord")
    check_video(write_clip(clip_dir / "ok.mp4", 4))
    tall = write_clip(clip_dir / "tall.mp4", 4, size=(4096, 16))
    with pytest.raises(PruneVidError, match=r"16x4096 pixels \(aspect ratio 256:1\).*at most 200:1; crop or pad"):
        check_video(tall)


def test_probe_errors(tmp_path, no_decord):
    with pytest.raises(PruneVidError, match="video not found"):
        check_video(tmp_path / "nope.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    with pytest.raises(PruneVidError, match=r"cannot decode video .*\(pyav: "):
        check_video(corrupt)
