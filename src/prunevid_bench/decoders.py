"""Video decoders: PyAV (installed with the package, the default), decord and torchcodec
(optional extras: ``pip install 'prunevid-bench[decord]'`` / ``[torchcodec]``).

``video.decoder`` chooses: ``auto`` tries PyAV, then whichever of the others is installed (a
file PyAV cannot read may still decode there); a named decoder is used alone and must be
installed. Each decoder returns the sampled frames as ``[T, H, W, 3]`` uint8 with their source
indices, the native rate and the frame count; ``tests/test_video.py`` checks that the three give
the same pixels on our test clips. decord (last release 2021) has no wheel for aarch64 or
macOS-arm64, which is why it is no longer required.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from prunevid_bench.errors import PruneVidError

DECODERS = ("auto", "pyav", "decord", "torchcodec")
MODULES = {"pyav": "av", "decord": "decord", "torchcodec": "torchcodec"}
EXTRAS = {"decord": "decord", "torchcodec": "torchcodec"}  # the pip extra that installs each


def installed(name: str) -> bool:
    module = MODULES[name]
    if module in sys.modules:  # a test may block one: sys.modules[name] = None
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def order(decoder: str) -> list[str]:
    """The decoders to try, in order, for ``video.decoder``."""
    if decoder not in DECODERS:
        raise PruneVidError(f"unknown video decoder '{decoder}' (use {', '.join(DECODERS)})")
    if decoder == "auto":
        return [name for name in DECODERS[1:] if name == "pyav" or installed(name)]
    if not installed(decoder):
        extra = f"pip install 'prunevid-bench[{EXTRAS[decoder]}]'" if decoder in EXTRAS else "pip install av"
        raise PruneVidError(f"video.decoder={decoder} needs the {MODULES[decoder]} package ({extra}), or use "
                            "video.decoder=auto")
    return [decoder]


# ---------------------------------------------------------------- decoding sampled frames
def _decode_decord(path: Path, sampler) -> tuple[np.ndarray, list[int], float, int]:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total = len(reader)
    native_fps = float(reader.get_avg_fps() or 0.0)
    indices, _ = sampler(total, native_fps)
    frames = reader.get_batch(indices).asnumpy()
    return frames, indices, native_fps, total


def _decode_torchcodec(path: Path, sampler) -> tuple[np.ndarray, list[int], float, int]:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=1)
    meta = decoder.metadata
    total = int(meta.num_frames)
    native_fps = float(meta.average_fps or 0.0)
    indices, _ = sampler(total, native_fps)
    frames = decoder.get_frames_at(indices=list(indices)).data.numpy()
    return frames, indices, native_fps, total


def _decode_pyav(path: Path, sampler) -> tuple[np.ndarray, list[int], float, int]:
    """Count the frames without decoding, sample, then decode once keeping only the sampled
    frames: memory holds the sample, never the whole video."""
    import av

    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        native_fps = float(rate) if rate else 0.0
    total = _count_packets(path)
    indices, _ = sampler(total, native_fps)
    kept, decoded = _decode_frames_at(path, set(indices))
    if decoded != total:  # a packet held more or fewer than one frame: sample the true count
        total = decoded
        indices, _ = sampler(total, native_fps)
        kept, _ = _decode_frames_at(path, set(indices))
    return np.stack([kept[i] for i in indices]), indices, native_fps, total


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise PruneVidError(f"no video stream in {path}")
    return container.streams.video[0]


def _count_packets(path: Path) -> int:
    """Frames counted without decoding: header counts are unreliable, while the usual containers
    hold one frame per packet, and demuxing reads no pixels."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(_video_stream(container, path)) if packet.size)


def _decode_frames_at(path: Path, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode the whole stream, converting only the frames at ``wanted`` (0-based, presentation
    order) to RGB arrays; returns those arrays and how many frames were decoded."""
    import av

    kept: dict[int, np.ndarray] = {}
    count = 0
    with av.open(str(path)) as container:
        for frame in container.decode(_video_stream(container, path)):
            if count in wanted:
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
    return kept, count


BACKENDS = {"pyav": _decode_pyav, "decord": _decode_decord, "torchcodec": _decode_torchcodec}


# ---------------------------------------------------------------- one frame, to check a file
def _probe_decord(path: Path) -> tuple[int, int]:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)  # reads the index only
    if len(reader) < 1:
        raise PruneVidError("the video has no frames")
    height, width = reader[0].shape[:2]  # one decoded frame proves the stream decodes
    return int(height), int(width)


def _probe_pyav(path: Path) -> tuple[int, int]:
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(_video_stream(container, path)):
            return frame.height, frame.width
    raise PruneVidError("the video has no frames")


def _probe_torchcodec(path: Path) -> tuple[int, int]:
    from torchcodec.decoders import VideoDecoder

    frame = VideoDecoder(str(path), dimension_order="NHWC").get_frame_at(0).data
    return int(frame.shape[0]), int(frame.shape[1])


PROBES = {"pyav": _probe_pyav, "decord": _probe_decord, "torchcodec": _probe_torchcodec}


@contextlib.contextmanager
def quiet_native_stderr():
    """decord and FFmpeg print their own complaints straight to file descriptor 2; a bad file
    should end in our one-line error only, so silence the descriptor while decoding."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured by a test runner)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
