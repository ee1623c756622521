"""Video decoding and frame sampling: decord first, PyAV as the fallback.

The sampled frames' real rate (``sampled_fps``) is passed to the processor, which turns it into
``second_per_grid_ts`` and so into the M-RoPE time positions; a wrong rate silently squeezes or
stretches time for the model.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prunevid_bench.errors import PruneVidError

TEMPORAL_PATCH = 2  # Qwen2.5-VL packs 2 frames into one temporal grid step


@dataclass
class Clip:
    """Sampled frames and how they were obtained."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    indices: list[int]  # source frame index of each sampled frame
    native_fps: float
    total_frames: int
    sampled_fps: float  # rate of the sampled frames, for the processor's time positions
    backend: str  # "decord" or "pyav"
    path: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def sample_indices(
    total: int, native_fps: float, num_frames: int | None = None, fps: float | None = None, max_frames: int = 64
) -> tuple[list[int], float]:
    """Choose frames evenly over the whole video; return (indices, sampled_fps).

    ``num_frames`` takes that many frames; otherwise ``fps`` samples at that rate, capped at
    ``max_frames`` (the rate then drops so the whole video is still covered). The count is
    rounded down to a multiple of 2 (one Qwen temporal grid step) so the processor never pads a
    frame that would shift the time positions. Frames sit at the centre of equal bins.
    """
    if total < 1:
        raise PruneVidError("the video has no frames")
    if num_frames is not None:
        n = num_frames
    elif fps is not None:
        n = int(total * fps / native_fps) if native_fps > 0 else total
    else:
        raise PruneVidError("set video.num_frames or video.fps")
    n = max(1, min(n, max_frames, total))
    if n >= TEMPORAL_PATCH:
        n -= n % TEMPORAL_PATCH
    step = total / n
    indices = [min(total - 1, int(step * i + step / 2)) for i in range(n)]
    sampled_fps = native_fps / step if native_fps > 0 else 1.0
    if n == 1:  # one frame is duplicated into a full temporal grid step
        indices = indices * TEMPORAL_PATCH
    return indices, sampled_fps


def _check_path(path: Path) -> None:
    if not path.exists():
        raise PruneVidError(f"video not found: {path}")
    if path.is_dir():
        raise PruneVidError(f"expected a video file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise PruneVidError(f"video file is empty: {path}")


def _decode_decord(path: Path, sampler) -> tuple[np.ndarray, list[int], float, int]:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total = len(reader)
    native_fps = float(reader.get_avg_fps() or 0.0)
    indices, _ = sampler(total, native_fps)
    frames = reader.get_batch(indices).asnumpy()
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


BACKENDS = {"decord": _decode_decord, "pyav": _decode_pyav}


@contextlib.contextmanager
def _quiet_native_stderr():
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


def load_clip(
    path: str | Path,
    num_frames: int | None = 16,
    fps: float | None = None,
    max_frames: int = 64,
    backend: str = "auto",
    start: float | None = None,
    end: float | None = None,
) -> Clip:
    """Decode and sample a video. ``backend="auto"`` tries decord, then PyAV.
    ``start``/``end`` (seconds) restrict sampling to a window, as MVBench's clip bounds do."""
    path = Path(path)
    _check_path(path)
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    if any(name not in BACKENDS for name in order):
        raise PruneVidError(f"unknown video backend '{backend}' (use auto, decord or pyav)")

    def window(total: int, native_fps: float) -> tuple[int, int]:
        rate = native_fps if native_fps > 0 else 1.0
        lo = 0 if start is None else min(total - 1, max(0, int(start * rate)))
        hi = total if end is None else min(total, max(lo + 1, int(np.ceil(end * rate))))
        return lo, hi

    def sampler(total: int, native_fps: float) -> tuple[list[int], float]:
        lo, hi = window(total, native_fps)
        indices, rate = sample_indices(hi - lo, native_fps, num_frames, fps, max_frames)
        return [lo + i for i in indices], rate

    failures = []
    for name in order:
        try:
            with _quiet_native_stderr():
                frames, indices, native_fps, total = BACKENDS[name](path, sampler)
        except PruneVidError as exc:
            failures.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt input
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))
            continue
        if frames.ndim != 4 or frames.shape[0] == 0:
            failures.append(f"{name}: decoded no frames")
            continue
        if native_fps <= 0:
            native_fps = 1.0
        lo, hi = window(total, native_fps)
        _, sampled_fps = sample_indices(hi - lo, native_fps, num_frames, fps, max_frames)
        notes = [f"{f}" for f in failures]
        return Clip(frames.astype(np.uint8), list(map(int, indices)), native_fps, total, sampled_fps, name, str(path), notes)
    raise PruneVidError(f"cannot decode video {path} ({'; '.join(failures)})")


# Qwen2-VL/2.5-VL's smart_resize refuses a frame whose long side is more than 200x its short side.
QWEN_MAX_RATIO = 200


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


PROBES = {"decord": _probe_decord, "pyav": _probe_pyav}


def check_video(path: str | Path) -> None:
    """Cheap preflight, decoding one frame: raise PruneVidError when the file is missing, cannot
    be decoded, or has frames of a shape the processor refuses."""
    path = Path(path)
    _check_path(path)
    failures = []
    for name, probe in PROBES.items():
        try:
            with _quiet_native_stderr():
                height, width = probe(path)
            break
        except PruneVidError as exc:
            failures.append(f"{name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt input
            first = str(exc).splitlines()[0] if str(exc) else ""
            failures.append(f"{name}: {type(exc).__name__}: {first}".rstrip(": "))
    else:
        raise PruneVidError(f"cannot decode video {path} ({'; '.join(failures)})")
    ratio = max(height, width) / max(1, min(height, width))
    if ratio > QWEN_MAX_RATIO:
        raise PruneVidError(
            f"video {path} is {width}x{height} pixels (aspect ratio {ratio:.0f}:1), but Qwen2.5-VL's processor "
            f"takes at most {QWEN_MAX_RATIO}:1; crop or pad the video"
        )
