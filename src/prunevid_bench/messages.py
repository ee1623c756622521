"""Qwen chat ``messages`` as input: a system prompt, several videos, images, and text before,
between or after them, in the format ``qwen-vl-utils`` reads::

    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": [
         {"type": "video", "video": "a.mp4", "nframes": 16},
         {"type": "image", "image": "b.png"},
         {"type": "video", "video": [frame0, frame1, ...], "fps": 2},
         {"type": "text", "text": "What changes between the videos?"}]}]

Each video element may set its own sampling (``nframes`` or ``fps``, ``max_frames``,
``min_pixels`` / ``max_pixels`` / ``total_pixels``, ``video_start`` / ``video_end``); otherwise
the run's ``video`` config applies. A video given as frames (a list of PIL images or arrays, or
one ``[T, H, W, 3]`` array) takes ``fps`` (or ``sample_fps``) as its rate, 2 when not given.
A bad element is a one-line error naming it (``messages[1].content[2]: ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunevid_bench.errors import PruneVidError
from prunevid_bench.video import (
    LMMS_SYSTEM_PROMPT,
    QWEN_IMAGE_MAX_TOKENS,
    QWEN_IMAGE_MIN_TOKENS,
    Clip,
    VideoRequest,
    clip_from_frames,
    load_clip,
    resize_frames,
    smart_resize,
)

ROLES = ("system", "user", "assistant")
VIDEO_KEYS = ("type", "video", "nframes", "fps", "sample_fps", "max_frames", "min_pixels", "max_pixels",
              "total_pixels", "video_start", "video_end")
IMAGE_KEYS = ("type", "image", "min_pixels", "max_pixels")
TEXT_KEYS = ("type", "text")


@dataclass
class Media:
    """What the processor is given for one prompt, in prompt order per kind."""

    template_messages: list[dict[str, Any]]  # the messages as the chat template reads them
    clips: list[Clip]
    images: list[Any]  # PIL images
    # Each video's and image's own (min_pixels, max_pixels) from its element (None: not set)
    clip_bounds: list[tuple[int | None, int | None]] = dataclasses.field(default_factory=list)
    image_bounds: list[tuple[int | None, int | None]] = dataclasses.field(default_factory=list)

    def size_for_processor(self, video_size: tuple[int, int], image_size: tuple[int, int], factor: int) -> bool:
        """Under the processor policy, an element's own ``min_pixels``/``max_pixels`` apply as
        well: when any element sets them, every video and image of the prompt is sized here by
        Qwen's ``smart_resize`` within its element's bounds, else the processor's (``video_size``,
        ``image_size``: (min, max) pixels), and the processor must not resize (one switch covers
        the whole prompt). Returns whether it did so."""
        if not any(b != (None, None) for b in self.clip_bounds + self.image_bounds):
            return False
        from PIL import Image

        for i, (clip, own) in enumerate(zip(self.clips, self.clip_bounds)):
            h, w = smart_resize(clip.frame_size[0], clip.frame_size[1], factor, *_within(own, video_size))
            self.clips[i] = dataclasses.replace(clip, frames=resize_frames(clip.frames, h, w), resized=True,
                                                decoded_size=clip.decoded_size or clip.frame_size)
        for i, (image, own) in enumerate(zip(self.images, self.image_bounds)):
            h, w = smart_resize(image.height, image.width, factor, *_within(own, image_size))
            self.images[i] = image.resize((w, h), Image.Resampling.BICUBIC)
        return True


def _within(own: tuple[int | None, int | None], default: tuple[int, int]) -> tuple[int, int]:
    """An element's (min, max) pixels, the default filling what it leaves out (and giving way to
    what it sets: a min above the default max raises the max, a max below the default min
    lowers the min)."""
    low, high = own
    if low is None:
        low = default[0] if high is None else min(default[0], high)
    if high is None:
        high = max(default[1], low)
    return low, high


def single_video_messages(video: Any, question: str) -> list[dict[str, Any]]:
    """One video, then the question: the prompt of ``prunevid run VIDEO QUESTION``."""
    if not question or not str(question).strip():
        raise PruneVidError("the question is empty")
    _check_text(str(question), "the question")
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]


def _where(i: int, j: int | None = None) -> str:
    return f"messages[{i}]" + (f".content[{j}]" if j is not None else "")


def _check_keys(part: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in part:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PruneVidError(f"{where}: unknown key '{key}'{hint}; allowed: {', '.join(allowed)}")


def _kind(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise PruneVidError(f"{where}: expected a mapping with a 'type' (video, image or text), got {type(part).__name__}")
    kind = part.get("type") or next((k for k in ("video", "image", "text") if k in part), None)
    if kind not in ("video", "image", "text"):
        raise PruneVidError(f"{where}: type must be video, image or text, got {part.get('type')!r}")
    if kind not in part:
        raise PruneVidError(f"{where}: a {kind} element needs a '{kind}' value")
    return kind


def video_request(part: dict, base: VideoRequest, where: str) -> tuple[VideoRequest, float | None, float | None]:
    """The element's own sampling knobs over the run's; returns (request, start, end)."""
    if "nframes" in part and "fps" in part and not _is_frames(part["video"]):
        raise PruneVidError(f"{where}: give nframes or fps, not both (as qwen-vl-utils requires)")
    changes: dict[str, Any] = {}
    if not _is_frames(part["video"]):
        if "nframes" in part:
            changes.update(num_frames=_number(part, "nframes", int, where), fps=None)
        if "fps" in part:
            changes.update(fps=_number(part, "fps", float, where), num_frames=None)
    for key in ("max_frames", "min_pixels", "max_pixels", "total_pixels"):
        if key in part:
            changes[key] = _number(part, key, int, where)
    start = _number(part, "video_start", float, where) if "video_start" in part else None
    end = _number(part, "video_end", float, where) if "video_end" in part else None
    return dataclasses.replace(base, **changes), start, end


def _check_text(text: str, where: str) -> None:
    """Text the tokenizer can take: UTF-8 encodable (a lone surrogate such as JSON's "\\ud800" is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PruneVidError(f"{where}: the text holds {text[exc.start]!r} at character {exc.start}, "
                            "which is not Unicode text (a lone surrogate); fix the text") from None


def _number(part: dict, key: str, kind: type, where: str):
    value = part[key]
    zero_ok = key == "video_start"
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            or (value == 0 and not zero_ok)):
        raise PruneVidError(f"{where}: {key} must be a positive number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise PruneVidError(f"{where}: {key} must be a whole number, got {value!r}")
    return kind(value)


def _is_frames(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _load_video(part: dict, base: VideoRequest, where: str) -> Clip:
    value = part["video"]
    request, start, end = video_request(part, base, where)
    try:
        if isinstance(value, Clip):
            return value
        if _is_frames(value):
            if start is not None or end is not None:
                raise PruneVidError("video_start / video_end apply to a video file, not to frames")
            return clip_from_frames(value, request, part.get("fps", part.get("sample_fps")))
        if isinstance(value, (str, Path)):
            path = str(value)
            return load_clip(path[7:] if path.startswith("file://") else path, request=request, start=start, end=end)
    except PruneVidError as exc:
        raise PruneVidError(f"{where}: {exc}") from None
    raise PruneVidError(f"{where}: a video is a file path, a list of frames or an array, got {type(value).__name__}")


def _load_image(part: dict, policy: str, factor: int, where: str):
    from PIL import Image

    value = part["image"]
    try:
        if isinstance(value, (str, Path)):
            path = str(value)
            path = path[7:] if path.startswith("file://") else path
            if not Path(path).is_file():
                raise PruneVidError(f"image not found: {path}")
            image = Image.open(path)
            image.load()
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value.astype(np.uint8))
        elif isinstance(value, Image.Image):
            image = value
        else:
            raise PruneVidError(f"an image is a file path, a PIL image or an array, got {type(value).__name__}")
    except PruneVidError as exc:
        raise PruneVidError(f"{where}: {exc}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise PruneVidError(f"{where}: cannot read the image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    image = _rgb(image)
    if policy == "processor":
        return image
    # qwen-vl-utils' fetch_image: 4..16384 merged tokens unless the element says otherwise
    min_pixels = _number(part, "min_pixels", int, where) if "min_pixels" in part else QWEN_IMAGE_MIN_TOKENS * factor * factor
    max_pixels = _number(part, "max_pixels", int, where) if "max_pixels" in part else QWEN_IMAGE_MAX_TOKENS * factor * factor
    try:
        height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    except PruneVidError as exc:
        raise PruneVidError(f"{where}: {exc}") from None
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _rgb(image):
    """As qwen-vl-utils converts: transparent pixels over white, everything else to RGB."""
    from PIL import Image

    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def prepare_media(messages: Any, base: VideoRequest, system_prompt: str | None = None, name_elements: bool = True) -> Media:
    """Validate ``messages``, load every video and image, and return what the template and the
    processor need. ``system_prompt`` is added first when the messages have none (lmms-eval's).
    Errors name the bad element (``messages[0].content[1]: ...``) unless ``name_elements`` is
    off (the messages were built from one video and a question)."""
    if not name_elements:
        try:
            return prepare_media(messages, base, system_prompt)
        except PruneVidError as exc:
            raise PruneVidError(re.sub(r"^messages\[\d+\](\.content\[\d+\])?: ", "", str(exc))) from None
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PruneVidError("messages must be a non-empty list of {'role', 'content'} mappings")
    template: list[dict[str, Any]] = []
    clips: list[Clip] = []
    images: list[Any] = []
    bounds: dict[str, list] = {"video": [], "image": []}
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PruneVidError(f"{_where(i)}: expected a mapping with 'role' and 'content'")
        _check_keys(message, ("role", "content"), _where(i))
        if message["role"] not in ROLES:
            raise PruneVidError(f"{_where(i)}: role must be one of {', '.join(ROLES)}, got {message['role']!r}")
        content = message["content"]
        if isinstance(content, str):
            _check_text(content, _where(i))
            template.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, (list, tuple)):
            raise PruneVidError(f"{_where(i)}: content must be a string or a list of elements")
        parts = []
        for j, part in enumerate(content):
            where = _where(i, j)
            kind = _kind(part, where)
            if kind == "text":
                _check_keys(part, TEXT_KEYS, where)
                if not isinstance(part["text"], str):
                    raise PruneVidError(f"{where}: text must be a string")
                _check_text(part["text"], where)
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "video":
                _check_keys(part, VIDEO_KEYS, where)
                clips.append(_load_video(part, base, where))
                parts.append({"type": "video"})
            else:
                _check_keys(part, IMAGE_KEYS, where)
                images.append(_load_image(part, base.policy, base.factor, where))
                parts.append({"type": "image"})
            if kind != "text":
                bounds[kind].append(tuple(_number(part, k, int, where) if k in part else None
                                          for k in ("min_pixels", "max_pixels")))
        template.append({"role": message["role"], "content": parts})
    if not clips:
        raise PruneVidError("messages hold no video: prunevid-bench measures video token reduction")
    if system_prompt and template[0]["role"] != "system":
        template.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return Media(template, clips, images, bounds["video"], bounds["image"])


def confine_media(messages: Any, folder: Path) -> None:
    """Refuse a ``--messages`` file that names a video or image file resolving outside its own
    folder (``prunevid_bench.confine``); frames given in memory name no file."""
    from prunevid_bench.confine import outside, refusal

    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            for kind in ("video", "image"):
                value = part.get(kind) if isinstance(part, dict) else None
                if isinstance(value, str) and value:
                    real = outside(value[7:] if value.startswith("file://") else value, folder)
                    if real is not None:
                        raise PruneVidError(f"{_where(i, j)}: {refusal(f'{kind} {value}', real, folder, 'the messages file folder')}")


def lmms_system_prompt(policy: str) -> str | None:
    """The system prompt a policy adds when the messages have none."""
    return LMMS_SYSTEM_PROMPT if policy == "lmms-eval" else None


def processor_size_kwargs(video_processor, video, presized: bool) -> dict[str, Any]:
    """What the processor is told about frame sizes, offline and in streams alike: nothing to
    resize when the policy sized the frames already (qwen, lmms-eval), else the processor's own
    per-frame rule with ``video.max_pixels`` / ``min_pixels`` as its bounds."""
    if presized:
        return {"do_resize": False}
    if not (video.max_pixels or video.min_pixels):
        return {}
    size = dict(video_processor.size)
    if video.max_pixels:
        size["longest_edge"] = video.max_pixels
    if video.min_pixels:
        size["shortest_edge"] = video.min_pixels
    return {"size": size}
