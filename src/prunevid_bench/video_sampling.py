"""Video sampling and resizing: which frames a policy takes and at what size. Decoding is
``prunevid_bench.video`` (``load_clip``), which applies these rules.

Three sampling policies (``video.policy``) decide which frames are taken and at what size:

- ``qwen``: what Qwen's own ``qwen-vl-utils`` (0.0.14) ``fetch_video`` feeds the model. The
  frame count is ``nframes`` rounded to an even number, or ``fps * duration`` clamped to
  [4, 768] and to the clip, floored to even; the frames are ``linspace(first, last, n)``
  rounded; each frame is resized by Qwen's ``smart_resize`` to 128..768 merged tokens and to an
  even share of a total pixel budget. The processor then does not resize again.
- ``lmms-eval``: what lmms-eval 0.7.3's ``qwen2_5_vl`` chat model asks of ``qwen-vl-utils``:
  ``nframes = min(32, frames in the file)`` floored to even, frames of 256..768 merged tokens
  (its ``max_pixels=1605632`` is above qwen-vl-utils' per-frame cap, so the cap decides).
- ``processor``: the original behaviour, kept for comparisons and for the built-in models
  trained with it: frames at the centres of equal bins and the checkpoint processor's own
  pixel bounds.

The sampled frames' real rate (``sampled_fps``) is passed to the processor, which turns it into
``second_per_grid_ts`` and so into the M-RoPE time positions; a wrong rate silently squeezes or
stretches time for the model. The rules here are our own transcription of those tools'
documented behaviour; the tests compare them with the tools themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prunevid_bench.errors import PruneVidError

TEMPORAL_PATCH = 2  # Qwen2.5-VL packs 2 frames into one temporal grid step
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: frame sides are multiples of this
DEFAULT_NUM_FRAMES = 16  # when neither num_frames nor fps is set (lmms-eval: its own 32)

POLICIES = ("qwen", "lmms-eval", "processor")

# qwen-vl-utils 0.0.14 constants (vision_process.py), in merged tokens of 28x28 pixels.
QWEN_VIDEO_MIN_TOKENS = 128
QWEN_VIDEO_MAX_TOKENS = 768
QWEN_IMAGE_MIN_TOKENS = 4
QWEN_IMAGE_MAX_TOKENS = 16384
QWEN_FPS_MIN_FRAMES = 4
QWEN_FPS_MAX_FRAMES = 768
QWEN_MODEL_SEQ_LEN = 128000  # its MODEL_SEQ_LEN default; the total budget is 90% of it
QWEN_MAX_RATIO = 200
QWEN_DEFAULT_FPS = 2.0  # the rate it assumes for a video given as frames

# lmms-eval 0.7.3, models/simple/qwen2_5_vl.py defaults (the chat model inherits them).
LMMS_MAX_NUM_FRAMES = 32
LMMS_MIN_PIXELS = 256 * 28 * 28
LMMS_MAX_PIXELS = 1605632
LMMS_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass
class VideoRequest:
    """What to sample from one video: the policy and its knobs (``None`` = the policy's default)."""

    policy: str = "processor"
    num_frames: int | None = None  # None: the policy's default (16; lmms-eval 32); ignored when fps is set
    fps: float | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    factor: int = PATCH_FACTOR
    decoder: str = "auto"  # video.decoder: auto | pyav | decord | torchcodec (prunevid_bench.decoders)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise PruneVidError(f"unknown video policy '{self.policy}' (use {', '.join(POLICIES)})")

    @classmethod
    def from_config(cls, video, policy: str | None = None, factor: int = PATCH_FACTOR) -> "VideoRequest":
        """From a ``VideoConfig``; ``policy`` is the resolved one (``auto`` resolved by the caller)."""
        return cls(
            policy=policy or video.policy,
            num_frames=video.num_frames if video.fps is None else None,
            fps=video.fps,
            max_frames=video.max_frames,
            min_pixels=video.min_pixels,
            max_pixels=video.max_pixels,
            total_pixels=video.total_pixels,
            factor=factor,
            decoder=getattr(video, "decoder", "auto"),
        )

    def with_lmms_defaults(self, defaults: dict) -> "VideoRequest":
        """The fields a run left unset taken from a family's lmms-eval defaults
        (``Family.lmms_video``); a frame rate only when neither a count nor a rate was set."""
        import dataclasses

        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.num_frames is not None:
            fill.pop("fps", None)
        return dataclasses.replace(self, **fill)

    @property
    def resizes(self) -> bool:
        """Whether this policy resizes the frames itself (the processor must then not)."""
        return self.policy != "processor"


# ---------------------------------------------------------------- qwen-vl-utils' arithmetic
def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor  # Python's round: halves go to even, as in qwen-vl-utils


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """Qwen's resize rule: both sides multiples of ``factor``, area within [min, max] pixels,
    aspect ratio kept as closely as possible (rounded, or scaled down/up then floored/ceiled)."""
    if max_pixels < min_pixels:
        raise PruneVidError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    ratio = max(height, width) / min(height, width)
    if ratio > QWEN_MAX_RATIO:
        raise PruneVidError(
            f"frames of {height}x{width} have an aspect ratio of {ratio:.0f}:1; Qwen's resize accepts at most {QWEN_MAX_RATIO}:1"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def video_pixel_bounds(request: VideoRequest, n_frames: int) -> tuple[float, float]:
    """Per-frame (min, max) pixels of the qwen-style policies: at least ``min_pixels`` (128
    merged tokens), at most 768 merged tokens and an even share (per 2-frame step) of the total
    budget, never below 1.05 x the minimum; a configured ``max_pixels`` can only lower it."""
    f2 = request.factor * request.factor
    lmms = request.policy == "lmms-eval"
    min_pixels = request.min_pixels if request.min_pixels is not None else (LMMS_MIN_PIXELS if lmms else QWEN_VIDEO_MIN_TOKENS * f2)
    total_pixels = request.total_pixels if request.total_pixels is not None else QWEN_MODEL_SEQ_LEN * f2 * 0.9
    max_pixels = max(min(QWEN_VIDEO_MAX_TOKENS * f2, total_pixels / n_frames * TEMPORAL_PATCH), int(min_pixels * 1.05))
    wanted = request.max_pixels if request.max_pixels is not None else (LMMS_MAX_PIXELS if lmms else None)
    if wanted is not None:
        max_pixels = min(wanted, max_pixels)
    return min_pixels, max_pixels


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, height, width, 3] uint8, bicubic with antialiasing (as
    qwen-vl-utils resizes: torchvision on the uint8 frames)."""
    if frames.shape[1:3] == (height, width):
        return frames
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    out = resize(video, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


# ---------------------------------------------------------------- which frames
def sample_indices(
    total: int, native_fps: float, num_frames: int | None = None, fps: float | None = None, max_frames: int | None = 64
) -> tuple[list[int], float]:
    """The ``processor`` policy: frames at the centres of equal bins; returns (indices, sampled_fps).

    ``num_frames`` takes that many frames (refused beyond the clip's length: never silently
    capped); otherwise ``fps`` samples at that rate, capped at ``max_frames`` (the rate then
    drops so the whole video is still covered). The count is rounded down to a multiple of 2
    (one Qwen temporal grid step) so the processor never pads a frame that would shift the
    time positions; a single frame is duplicated into one full step.
    """
    if total < 1:
        raise PruneVidError("the video has no frames")
    if num_frames is not None:
        if num_frames > total:
            raise PruneVidError(f"asked for {num_frames} frames but the clip has only {total}: lower --num-frames or sample by --fps")
        n = num_frames
    elif fps is not None:
        n = int(total * fps / native_fps) if native_fps > 0 else total
        n = min(n, max_frames if max_frames is not None else 64, total)
    else:
        raise PruneVidError("set video.num_frames or video.fps")
    n = max(1, n)
    if n >= TEMPORAL_PATCH:
        n -= n % TEMPORAL_PATCH
    step = total / n
    indices = [min(total - 1, int(step * i + step / 2)) for i in range(n)]
    sampled_fps = native_fps / step if native_fps > 0 else 1.0
    if n == 1:  # one frame is duplicated into a full temporal grid step
        indices = indices * TEMPORAL_PATCH
    return indices, sampled_fps


def qwen_frame_range(total: int, native_fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """First and last source frame of a [start, end] window (seconds), as qwen-vl-utils bounds
    ``video_start`` / ``video_end``: start rounded up, end rounded down, both inside the clip."""
    if start is None and end is None:
        return 0, total - 1
    duration = total / native_fps
    first = math.ceil(max(0.0, min(start, duration)) * native_fps) if start is not None else 0
    last = min(math.floor(max(0.0, min(end, duration)) * native_fps), total - 1) if end is not None else total - 1
    if first >= last:
        raise PruneVidError(f"the window {start}s..{end}s holds no frames of this {duration:.2f} s clip")
    return first, last


def qwen_frame_count(request: VideoRequest, count: int, native_fps: float, file_frames: int) -> int:
    """How many frames the qwen-style policies take from a window of ``count`` frames.

    ``lmms-eval`` first asks for ``min(num_frames or 32, frames in the file)`` floored to even
    (at least 2), as its chat model probes the file; then both follow qwen-vl-utils:
    ``nframes`` rounded to the nearest even number, or ``fps`` times the duration clamped to
    [4, max_frames (768 and the clip)] and to the clip, floored to even.
    """
    num_frames, fps = request.num_frames, request.fps
    if request.policy == "lmms-eval" and fps is None:
        num_frames = max(TEMPORAL_PATCH, floor_by_factor(min(num_frames or LMMS_MAX_NUM_FRAMES, file_frames), TEMPORAL_PATCH))
    if fps is None:
        asked = num_frames if num_frames is not None else DEFAULT_NUM_FRAMES
        n = round_by_factor(asked, TEMPORAL_PATCH)
        what = f"{asked} frames (rounded to an even {n})"
    else:
        low = ceil_by_factor(QWEN_FPS_MIN_FRAMES, TEMPORAL_PATCH)
        cap = request.max_frames if request.max_frames is not None else min(QWEN_FPS_MAX_FRAMES, count)
        high = floor_by_factor(cap, TEMPORAL_PATCH)
        n = floor_by_factor(min(max(count / native_fps * fps, low), high, count), TEMPORAL_PATCH)
        what = f"fps={fps} ({n} frames)"
    if not TEMPORAL_PATCH <= n <= count:
        raise PruneVidError(f"{what} cannot be sampled from a clip of {count} frames: ask for 2..{count} frames")
    return n


def linspace_indices(first: int, last: int, n: int) -> list[int]:
    """``n`` frames evenly from ``first`` to ``last`` inclusive, rounded (halves to even):
    qwen-vl-utils' ``torch.linspace(first, last, n).round()``, computed the same way."""
    import torch

    return torch.linspace(first, last, n).round().long().tolist()


def plan_frames(request: VideoRequest, total: int, native_fps: float, start: float | None = None,
                end: float | None = None) -> tuple[list[int], float]:
    """The source frames a policy takes from a clip of ``total`` frames; returns (indices, sampled_fps)."""
    if total < 1:
        raise PruneVidError("the video has no frames")
    rate = native_fps if native_fps > 0 else 1.0
    if request.policy == "processor":
        lo = 0 if start is None else min(total - 1, max(0, int(start * rate)))
        hi = total if end is None else min(total, max(lo + 1, int(np.ceil(end * rate))))
        num_frames = None if request.fps is not None else (request.num_frames or DEFAULT_NUM_FRAMES)
        indices, sampled_fps = sample_indices(hi - lo, native_fps, num_frames, request.fps, request.max_frames)
        return [lo + i for i in indices], sampled_fps
    first, last = qwen_frame_range(total, rate, start, end)
    count = last - first + 1
    n = qwen_frame_count(request, count, rate, total)
    return linspace_indices(first, last, n), n / count * rate
