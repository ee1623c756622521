"""Decoding a video into a ``Clip``: a file by ``prunevid_bench.decoders`` (PyAV by default,
decord or torchcodec when installed and chosen with ``video.decoder``), or frames given in
memory; and the cheap preflight ``check_video``.

Which frames are taken and at what size (the ``video.policy`` rules, ``VideoRequest``) is
``prunevid_bench.video_sampling``; its names are importable from here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prunevid_bench import decoders
from prunevid_bench.errors import PruneVidError
from prunevid_bench.video_sampling import (  # noqa: F401 - importable from here too
    DEFAULT_NUM_FRAMES,
    LMMS_MAX_NUM_FRAMES,
    LMMS_MAX_PIXELS,
    LMMS_MIN_PIXELS,
    LMMS_SYSTEM_PROMPT,
    PATCH_FACTOR,
    POLICIES,
    QWEN_DEFAULT_FPS,
    QWEN_FPS_MAX_FRAMES,
    QWEN_FPS_MIN_FRAMES,
    QWEN_IMAGE_MAX_TOKENS,
    QWEN_IMAGE_MIN_TOKENS,
    QWEN_MAX_RATIO,
    QWEN_MODEL_SEQ_LEN,
    QWEN_VIDEO_MAX_TOKENS,
    QWEN_VIDEO_MIN_TOKENS,
    TEMPORAL_PATCH,
    VideoRequest,
    ceil_by_factor,
    floor_by_factor,
    linspace_indices,
    plan_frames,
    qwen_frame_count,
    qwen_frame_range,
    resize_frames,
    round_by_factor,
    sample_indices,
    smart_resize,
    video_pixel_bounds,
)


@dataclass
class Clip:
    """Sampled (and, for the qwen-style policies, resized) frames and how they were obtained."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    indices: list[int]  # source frame index of each sampled frame
    native_fps: float
    total_frames: int
    sampled_fps: float  # rate of the sampled frames, for the processor's time positions
    backend: str  # "decord", "pyav", or "frames" / "array" for frames given in memory
    path: str = ""
    notes: list[str] = field(default_factory=list)
    policy: str = "processor"
    resized: bool = False  # frames are already at the model's input size: the processor must not resize
    decoded_size: list[int] | None = None  # [h, w] as decoded (or given), before any resize

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frame_size(self) -> list[int]:
        """``[h, w]`` of the frames as given to the processor."""
        return [int(self.frames.shape[1]), int(self.frames.shape[2])]


# ---------------------------------------------------------------- decoding
def _check_path(path: Path) -> None:
    if not path.exists():
        raise PruneVidError(f"video not found: {path}")
    if path.is_dir():
        raise PruneVidError(f"expected a video file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise PruneVidError(f"video file is empty: {path}")


def _fit(frames: np.ndarray, request: VideoRequest) -> tuple[np.ndarray, bool]:
    """Resize sampled frames as the policy does; returns (frames, resized by us)."""
    if not request.resizes:
        return frames, False
    min_pixels, max_pixels = video_pixel_bounds(request, frames.shape[0])
    height, width = smart_resize(int(frames.shape[1]), int(frames.shape[2]), request.factor, min_pixels, max_pixels)
    return resize_frames(frames, height, width), True


def load_clip(
    path: str | Path,
    num_frames: int | None = DEFAULT_NUM_FRAMES,
    fps: float | None = None,
    max_frames: int | None = None,
    backend: str = "auto",
    start: float | None = None,
    end: float | None = None,
    request: VideoRequest | None = None,
) -> Clip:
    """Decode, sample and (for the qwen-style policies) resize a video. ``backend="auto"``
    takes the request's ``decoder`` (``auto``: PyAV, then decord or torchcodec when installed). ``start``/``end`` (seconds) restrict sampling to a window, as
    MVBench's clip bounds do. ``request`` carries the policy and its knobs; without it the
    ``processor`` policy runs with ``num_frames`` / ``fps`` / ``max_frames``."""
    if request is None:
        request = VideoRequest("processor", num_frames=num_frames, fps=fps, max_frames=max_frames)
    path = Path(path)
    _check_path(path)
    order = decoders.order(request.decoder if backend == "auto" else backend)
    planned: dict = {}

    def sampler(total: int, native_fps: float) -> tuple[list[int], float]:
        try:
            indices, rate = plan_frames(request, total, native_fps, start, end)
        except PruneVidError as exc:  # the request does not fit this clip: not a decoding failure
            planned["refused"] = exc
            raise
        planned["sampled_fps"] = rate
        return indices, rate

    failures = []
    for name in order:
        try:
            with decoders.quiet_native_stderr():
                frames, indices, native_fps, total = decoders.BACKENDS[name](path, sampler)
        except PruneVidError as exc:
            if planned.get("refused") is exc:
                raise
            failures.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt input
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))
            continue
        if frames.ndim != 4 or frames.shape[0] == 0:
            failures.append(f"{name}: decoded no frames")
            continue
        decoded = [int(frames.shape[1]), int(frames.shape[2])]
        frames, resized = _fit(frames.astype(np.uint8), request)
        return Clip(frames, list(map(int, indices)), native_fps if native_fps > 0 else 1.0, total,
                    planned["sampled_fps"], name, str(path), list(failures), request.policy, resized, decoded)
    raise PruneVidError(f"cannot decode video {path} ({'; '.join(failures)})")


def clip_from_frames(frames, request: VideoRequest, fps: float | None = None) -> Clip:
    """A video given in memory (an array ``[T, H, W, 3]`` or a list of PIL images / arrays) at
    ``fps`` (2 when not given, as qwen-vl-utils assumes). An odd count is padded with the last
    frame to whole temporal steps, as qwen-vl-utils does; the policy's resize then applies."""
    try:
        if isinstance(frames, np.ndarray):
            array = frames
        else:
            array = np.stack([np.asarray(_rgb(frame)) for frame in frames])
    except (TypeError, ValueError) as exc:
        raise PruneVidError(f"video frames must be same-sized RGB images or arrays ({_first_line(exc)})") from None
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise PruneVidError(f"video frames must form an array [T, H, W, 3] with T >= 1, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or array.min() < 0 or array.max() > 255:
            raise PruneVidError(f"video frames must be uint8 pixel values (0..255), got {array.dtype}")
        array = array.astype(np.uint8)
    rate = float(fps) if fps is not None else QWEN_DEFAULT_FPS
    if not 0 < rate < float("inf"):  # NaN too
        raise PruneVidError(f"a video's fps must be > 0, got {fps}")
    indices = list(range(len(array)))
    if pad := -len(array) % TEMPORAL_PATCH:
        array = np.concatenate([array, np.repeat(array[-1:], pad, axis=0)])
        indices += [indices[-1]] * pad
    decoded = [int(array.shape[1]), int(array.shape[2])]
    array, resized = _fit(array, request)
    return Clip(array, indices, rate, len(array), rate, "frames", "", [], request.policy, resized, decoded)


def _rgb(frame):
    """A PIL image as RGB (alpha dropped), anything else as is."""
    return frame.convert("RGB") if hasattr(frame, "convert") else frame


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_video(path: str | Path, decoder: str = "auto") -> None:
    """Cheap preflight, decoding one frame: raise PruneVidError when the file is missing, cannot
    be decoded, or has frames of a shape the processor refuses."""
    path = Path(path)
    _check_path(path)
    failures = []
    for name in decoders.order(decoder):
        try:
            with decoders.quiet_native_stderr():
                height, width = decoders.PROBES[name](path)
            break
        except PruneVidError as exc:
            failures.append(f"{name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt input
            failures.append(f"{name}: {type(exc).__name__}: {_first_line(exc)}")
    else:
        raise PruneVidError(f"cannot decode video {path} ({'; '.join(failures)})")
    ratio = max(height, width) / max(1, min(height, width))
    if ratio > QWEN_MAX_RATIO:
        raise PruneVidError(
            f"video {path} is {width}x{height} pixels (aspect ratio {ratio:.0f}:1), but Qwen2.5-VL's processor "
            f"takes at most {QWEN_MAX_RATIO}:1; crop or pad the video"
        )
