"""A seeded toy world of short synthetic videos with 4-option multiple-choice questions.

Each clip has a static background, 2-3 static shapes in distinct corners and one or two objects
crossing the frame left/right/up/down. Every question is answerable from the pixels alone, so a
tiny Qwen2.5-VL trained from scratch on it gives PruneVid something real to prune.

Scenes are described in fractions of the frame side (`VideoSpec`), so the same example renders at
any size; `render_video` draws it, `encode_mp4` writes it, and `generate_dataset` does both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np

from prunevid_bench.errors import PruneVidError

# Saturated, far apart in RGB and in YUV chroma, so they survive yuv420p and 14-px patching.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 185, 60),
    "cyan": (40, 210, 225),
    "blue": (45, 80, 235),
    "purple": (150, 60, 205),
    "white": (240, 240, 240),
}
# Dark neutral tones: never mistaken for a palette colour, even with texture on top.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((30, 30, 30), (55, 55, 60), (80, 80, 80), (40, 48, 60))
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
CATEGORIES: tuple[str, ...] = ("moving_color", "moving_shape", "direction", "corner_color", "corner_shape")
LETTERS: str = "ABCD"
# "v1": the original five types; "v2": those and the question-guided types of ``toy.world_v2``.
WORLDS: tuple[str, ...] = ("v1", "v2")

# Geometry in fractions of the frame side (20-28 px statics, 22-31 px movers at 112 px). Statics
# hug the corners and movers ride the central row/column, so at 112 px there are >= 3 px between
# a mover and any static shape: the corner questions never suffer occlusion.
STATIC_SIZE = (0.18, 0.25)
STATIC_MARGIN = (0.03, 0.06)
MOVER_SIZE = (0.20, 0.28)
MOVER_START = (0.15, 0.20)  # centre in the first frame, along the direction of travel
MOVER_JITTER = 0.02  # off-centre offset across the direction of travel
TEXTURE_AMPLITUDE = (4.0, 10.0)
# A fixed ramp on the background, red across and blue down (grey levels over the whole side):
# a patch's own pixels then say where in the frame it is, as a real scene's layout does (a
# vision tower with only relative positions cannot tell a corner from the centre otherwise).
POSITION_RAMP = 36.0

# One template per category; the fields come from the target object.
QUESTION_TEMPLATES: dict[str, str] = {
    "moving_color": "What colour is the moving object?",
    "moving_shape": "What shape is the moving object?",
    "direction": "In which direction does the {colour} {shape} move?",
    "corner_color": "What colour is the shape in the {corner} corner?",
    "corner_shape": "What shape is in the {corner} corner?",
}


@dataclass(frozen=True)
class ObjectSpec:
    """One shape. Positions are (x, y) centres in fractions of the frame side."""

    colour: str
    shape: str
    size: float  # side of the bounding box, fraction of the frame side
    start: tuple[float, float]  # centre in the first frame
    end: tuple[float, float]  # centre in the last frame; equal to `start` for static objects
    corner: str | None = None  # static objects: which corner they sit in
    direction: str | None = None  # moving objects: left/right/up/down
    visible: tuple[float, float] | None = None  # drawn only for clip times in [lo, hi] (None: always)

    def centre(self, t: float) -> tuple[float, float]:
        """Centre at clip time t in [0, 1] (linear motion)."""
        (x0, y0), (x1, y1) = self.start, self.end
        return (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)


@dataclass(frozen=True)
class VideoSpec:
    """A whole scene; `render_video` turns it into frames at any length and size."""

    background: tuple[int, int, int]
    texture: tuple[float, float, float, float]  # (amplitude, x freq, y freq, phase); amplitude 0 = plain
    statics: tuple[ObjectSpec, ...]
    movers: tuple[ObjectSpec, ...]


@dataclass(frozen=True)
class QuestionSpec:
    category: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # letter A-D
    target: int = -1  # the object asked about, as an index into the scene's ``statics + movers``

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]


class ToyExample(NamedTuple):
    frames: np.ndarray  # [T, H, W, 3] uint8
    question: str
    options: tuple[str, ...]
    answer: str
    category: str


# ---------------------------------------------------------------------------------------------
# Sampling


def example_id(seed: int, index: int) -> str:
    return f"toy-s{seed}-{index:05d}"


def _schedule(seed: int, index: int, categories: tuple[str, ...] = CATEGORIES) -> tuple[str, int]:
    """(category, answer position) for one example.

    Every run of len(CATEGORIES) examples holds each category once, and every 4 questions of a
    category hold each position once, both in seeded order: any prefix of the set is balanced
    within one, and the position says nothing about the category.
    """
    round_, slot = divmod(index, len(categories))
    category = int(np.random.default_rng([seed, 0, round_]).permutation(len(categories))[slot])
    # Each round holds this category once, so `round_` counts its earlier questions.
    block, turn = divmod(round_, len(LETTERS))
    position = int(np.random.default_rng([seed, 2, category, block]).permutation(len(LETTERS))[turn])
    return categories[category], position


def _pick(rng: np.random.Generator, items, k: int | None = None):
    """k distinct items in random order (one item when k is None)."""
    items = list(items)
    if k is None:
        return items[int(rng.integers(len(items)))]
    return [items[i] for i in rng.permutation(len(items))[:k]]


def _mover(rng: np.random.Generator, colour: str, shape: str, direction: str) -> ObjectSpec:
    a = float(rng.uniform(*MOVER_START))
    b = 1.0 - float(rng.uniform(*MOVER_START))
    across = 0.5 + float(rng.uniform(-MOVER_JITTER, MOVER_JITTER))
    along = {"right": (a, b), "left": (b, a), "down": (a, b), "up": (b, a)}[direction]
    if direction in ("left", "right"):
        start, end = (along[0], across), (along[1], across)
    else:
        start, end = (across, along[0]), (across, along[1])
    size = float(rng.uniform(*MOVER_SIZE))
    return ObjectSpec(colour, shape, size, start, end, direction=direction)


def _static(rng: np.random.Generator, colour: str, shape: str, corner: str) -> ObjectSpec:
    size = float(rng.uniform(*STATIC_SIZE))
    near = float(rng.uniform(*STATIC_MARGIN)) + size / 2
    x = near if corner.endswith("left") else 1.0 - near
    y = near if corner.startswith("top") else 1.0 - near
    return ObjectSpec(colour, shape, size, (x, y), (x, y), corner=corner)


def _scene(rng: np.random.Generator, category: str) -> VideoSpec:
    # "The moving object" must name exactly one object; other questions may face two movers, one
    # horizontal and one vertical, so direction questions need the colour-shape binding.
    two_movers = category not in ("moving_color", "moving_shape") and bool(rng.integers(2))
    n_static = int(rng.integers(2, 4))
    colours = _pick(rng, COLOURS, n_static + 1 + two_movers)
    mover_shapes = _pick(rng, SHAPES, 1 + two_movers)
    static_shapes = [s for s in SHAPES if s not in mover_shapes]  # so "the <colour> <shape>" is unique

    first_direction = _pick(rng, DIRECTIONS)
    directions = [first_direction]
    if two_movers:
        horizontal = first_direction in ("left", "right")
        directions.append(_pick(rng, ("up", "down") if horizontal else ("left", "right")))
    movers = tuple(_mover(rng, colours[n_static + i], mover_shapes[i], d) for i, d in enumerate(directions))
    corners = sorted(_pick(rng, CORNERS, n_static), key=CORNERS.index)
    statics = tuple(_static(rng, colours[i], _pick(rng, static_shapes), c) for i, c in enumerate(corners))

    if rng.integers(2):
        texture = (float(rng.uniform(*TEXTURE_AMPLITUDE)), float(rng.uniform(0.5, 2.0)),
                   float(rng.uniform(0.5, 2.0)), float(rng.uniform(0, 2 * np.pi)))
    else:
        texture = (0.0, 0.0, 0.0, 0.0)
    return VideoSpec(_pick(rng, BACKGROUNDS), texture, statics, movers)


def _question(rng: np.random.Generator, video: VideoSpec, category: str, position: int) -> QuestionSpec:
    scene_colours = [o.colour for o in video.statics + video.movers]
    if category in ("moving_color", "moving_shape", "direction"):
        target = _pick(rng, video.movers)
    else:
        target = _pick(rng, video.statics)

    text = QUESTION_TEMPLATES[category].format(colour=target.colour, shape=target.shape, corner=target.corner)
    correct = {"moving_color": target.colour, "moving_shape": target.shape, "direction": target.direction,
               "corner_color": target.colour, "corner_shape": target.shape}[category]

    if category in ("moving_color", "corner_color"):
        # Other colours from the scene first: then every option is on screen and only looking at
        # the right object tells them apart.
        others = _pick(rng, [c for c in scene_colours if c != correct], len(scene_colours) - 1)
        rest = _pick(rng, [c for c in COLOURS if c not in scene_colours], len(COLOURS))
        distractors = (others + rest)[:3]
    else:
        pool = SHAPES if category != "direction" else DIRECTIONS
        distractors = [x for x in pool if x != correct]
    distractors = _pick(rng, distractors, 3)
    options = tuple(distractors[:position] + [correct] + distractors[position:])
    return QuestionSpec(category, text, options, LETTERS[position], (video.statics + video.movers).index(target))


def sample_example(seed: int, index: int, world: str = "v1") -> tuple[VideoSpec, QuestionSpec]:
    """Scene and question of example `index` of the set drawn with `seed` in `world` (independent of n)."""
    if world != "v1":
        from prunevid_bench.toy.world_v2 import sample_v2

        _check_world(world)
        return sample_v2(seed, index)
    category, position = _schedule(seed, index)
    rng = np.random.default_rng([seed, 1, index])
    video = _scene(rng, category)
    return video, _question(rng, video, category, position)


def iter_specs(n: int, seed: int, world: str = "v1") -> Iterator[tuple[str, VideoSpec, QuestionSpec]]:
    """(id, scene, question) for the first n examples of the set drawn with `seed`."""
    _check_set(n, seed)
    for index in range(n):
        yield (example_id(seed, index), *sample_example(seed, index, world))


# ---------------------------------------------------------------------------------------------
# Rendering


def shape_mask(shape: str, side: int) -> np.ndarray:
    """[side, side] bool mask of a shape filling its bounding box."""
    c = np.arange(side) + 0.5 - side / 2  # pixel centres, origin at the box centre
    y, x = c[:, None], c[None, :]
    half = side / 2
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = x**2 + y**2 <= half**2
    elif shape == "triangle":  # apex up, base along the bottom edge
        mask = np.abs(x) <= (y + half) / 2
    elif shape == "cross":
        mask = (np.abs(x) <= side / 6) | (np.abs(y) <= side / 6)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.broadcast_to(mask, (side, side))


def _paste(image: np.ndarray, obj: ObjectSpec, t: float, value) -> None:
    """Paint ``obj`` at clip time t into image [S, S, ...] with ``value`` (a colour or a label)."""
    size = image.shape[0]
    side = max(2, round(obj.size * size))
    cx, cy = obj.centre(t)
    x0, y0 = round(cx * size - side / 2), round(cy * size - side / 2)
    mask = shape_mask(obj.shape, side)
    # Clip to the frame (the spec keeps objects inside, but rounding at small sizes may not).
    mx0, my0 = max(0, -x0), max(0, -y0)
    mx1, my1 = min(side, size - x0), min(side, size - y0)
    if mx1 <= mx0 or my1 <= my0:
        return
    region = image[y0 + my0:y0 + my1, x0 + mx0:x0 + mx1]
    region[mask[my0:my1, mx0:mx1]] = value


def _draw(spec: VideoSpec, frames: int, background: np.ndarray, paint) -> np.ndarray:
    """[T, *background.shape]: the statics on the background, then the movers frame by frame."""
    still = background.copy()
    for i, obj in enumerate(spec.statics):
        _paste(still, obj, 0.0, paint(i, obj))
    video = np.repeat(still[None], frames, axis=0)
    for f in range(frames):
        t = f / (frames - 1) if frames > 1 else 0.0
        for i, obj in enumerate(spec.movers, start=len(spec.statics)):
            if obj.visible is None or obj.visible[0] <= t <= obj.visible[1]:  # flashes: a time window
                _paste(video[f], obj, t, paint(i, obj))
    return video


def render_video(spec: VideoSpec, frames: int = 16, size: int = 112) -> np.ndarray:
    """Draw a scene: [T, H, W, 3] uint8 with T = frames, H = W = size."""
    amplitude, fx, fy, phase = spec.texture
    coords = np.arange(size) / size
    wave = amplitude * np.sin(2 * np.pi * (fx * coords[None, :] + fy * coords[:, None]) + phase)
    background = np.asarray(spec.background, dtype=np.float64) + wave[..., None]
    background[..., 0] += POSITION_RAMP * (coords[None, :] - 0.5)
    background[..., 2] += POSITION_RAMP * (coords[:, None] - 0.5)
    still = np.round(np.clip(background, 0, 255)).astype(np.uint8)
    return _draw(spec, frames, still, lambda i, obj: COLOURS[obj.colour])


def render_labels(spec: VideoSpec, frames: int = 16, size: int = 112) -> np.ndarray:
    """Which object covers each pixel: [T, H, W] int8, the index into ``statics + movers``, -1 for
    the background. Drawn by the same code as ``render_video``, so it matches the pixels."""
    return _draw(spec, frames, np.full((size, size), -1, dtype=np.int8), lambda i, obj: i)


def iter_examples(n: int, seed: int, *, frames: int = 16, size: int = 112, world: str = "v1") -> Iterator[ToyExample]:
    """The examples `generate_dataset` would write, rendered in memory (no files, no codec)."""
    _check_clip(frames, size)
    for _, video, question in iter_specs(n, seed, world):
        yield ToyExample(render_video(video, frames, size), question.question, question.options,
                         question.answer, question.category)


# ---------------------------------------------------------------------------------------------
# Writing


def _encoder_available(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # PyAV raises UnknownCodecError or ValueError depending on version
        return False
    return True


def video_codec() -> str:
    """The codec `encode_mp4` uses here: libx264 when this FFmpeg build has it, else mpeg4."""
    return "libx264" if _encoder_available("libx264") else "mpeg4"


def encode_mp4(video: np.ndarray, path: Path, fps: float = 8.0, *, codec: str | None = None) -> str:
    """Write [T, H, W, 3] uint8 RGB frames to an mp4; returns the codec used."""
    codec = codec or video_codec()
    _, height, width, _ = video.shape
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1  # the shipped toy model was trained on single-thread encodes
        if codec == "libx264":
            # Near-lossless so palette colours survive. One thread and x264's C code (asm=0) keep
            # the bytes reproducible: with its SIMD code, 30 encodes of the same frames in one
            # process gave 4 different files; in C (twice as slow, 50 ms a clip) they are all the same.
            stream.options = {"crf": "12", "preset": "medium", "threads": "1", "x264-params": "asm=0"}
        else:
            stream.bit_rate = 8_000_000  # far above what 112-px flat shapes need: near-lossless
        for index, frame in enumerate(video):
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(format="yuv420p")
            image.pts = index  # frame i at i / fps, in the stream's time base
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    return codec


def generate_dataset(out_dir: Path, n: int, seed: int, *, frames: int = 16, size: int = 112,
                     fps: float = 8.0, world: str = "v1") -> Path:
    """Write out_dir/videos/<id>.mp4 and out_dir/data.jsonl; returns the JSONL path."""
    _check_set(n, seed)
    _check_world(world)
    _check_clip(frames, size)
    if fps <= 0:
        raise PruneVidError(f"fps must be positive, got {fps}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PruneVidError(f"{out_dir} is a file, not a folder; pass a folder for the dataset (it is created if missing)")
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for example, video, question in iter_specs(n, seed, world):
        relative = f"videos/{example}.mp4"
        encode_mp4(render_video(video, frames, size), out_dir / relative, fps)
        rows.append({"id": example, "video": relative, "question": question.question,
                     "options": list(question.options), "answer": question.answer,
                     "category": question.category})
    jsonl = out_dir / "data.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return jsonl


def _check_set(n: int, seed: int) -> None:
    if n < 1:
        raise PruneVidError(f"n must be at least 1, got {n}")
    if seed < 0:
        raise PruneVidError(f"seed must be a non-negative integer, got {seed}")


def _check_world(world: str) -> None:
    if world not in WORLDS:
        raise PruneVidError(f"unknown toy world {world!r}; expected one of {', '.join(WORLDS)}")

def _check_clip(frames: int, size: int) -> None:
    if frames < 2:
        raise PruneVidError(f"frames must be at least 2 so objects can move, got {frames}")
    if size < 32 or size % 2:
        raise PruneVidError(f"size must be an even number of pixels >= 32 (yuv420p), got {size}")
