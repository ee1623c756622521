"""The toy world "v2": the original five question types, plus three where the answer lives in a
few percent of the visual tokens and the question says which.

Every v2 scene is busy: a textured background, 1-2 static shapes in corners and 2-3 objects
moving independently, all of distinct colours. The question names one object, and only that
object decides the answer (``answer_word``; planted checks in ``tests/test_toy_world_v2.py``):

| type | question | where the answer is |
|---|---|---|
| ``busy_direction`` | In which direction does the red triangle move? | one of three movers |
| ``end_corner_color`` | What colour is the object in the top-left corner at the end? | the last frames of one corner; another object leaves it |
| ``flash_shape`` | What appears briefly in the middle? | one of the four middle tokens, in 4 of the 16 frames |

The object asked about is drawn last, so nothing covers it; the others may cross each other.
``prunevid toy-data --world v2`` writes this world; the default ("v1") is unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from prunevid_bench.toy.world import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    CORNERS,
    DIRECTIONS,
    LETTERS,
    MOVER_START,
    SHAPES,
    TEXTURE_AMPLITUDE,
    ObjectSpec,
    QuestionSpec,
    VideoSpec,
    _pick,
    _question,
    _scene,
    _schedule,
)

V2_CATEGORIES: tuple[str, ...] = ("busy_direction", "end_corner_color", "flash_shape")
ALL_CATEGORIES: tuple[str, ...] = CATEGORIES + V2_CATEGORIES
V2_TEMPLATES: dict[str, str] = {
    "busy_direction": "In which direction does the {colour} {shape} move?",
    "end_corner_color": "What colour is the object in the {corner} corner at the end?",
    "flash_shape": "What appears briefly in the middle?",
}

V2_SIZE = (0.15, 0.18)  # smaller than v1's shapes: six of them share the frame
LANES = (0.36, 0.64)  # rows of the horizontal movers (clear of the corner statics, which end by 0.23)
CORNER_CENTRE = 0.13  # the centre of a mover in a corner, from the frame's edges
FLASH_SIZE = (0.12, 0.15)
FLASH_WINDOW = (0.4, 0.6)  # clip times: frames 6-9 of 16, two of the eight temporal grid steps
# The flash sits in the middle of one of the four middle merged tokens (28 x 28 px cells of the
# 112-px frame), not at the frame's centre: there it fell on the corner of four tokens, each
# holding a quarter of it, too little to be labelled as showing it (``token_labels``: a tenth of
# the token's pixels) or for the tower to tell its shape.
FLASH_CELLS = (0.375, 0.625)


def _moving(rng, colour: str, shape: str, start, end, direction: str) -> ObjectSpec:
    return ObjectSpec(colour, shape, float(rng.uniform(*V2_SIZE)), start, end, direction=direction)


def _lane_mover(rng, colour: str, shape: str, lane: float, horizontal: bool) -> ObjectSpec:
    """A mover crossing the frame along a row (horizontal) or a column at ``lane``."""
    direction = _pick(rng, ("left", "right") if horizontal else ("up", "down"))
    a, b = float(rng.uniform(*MOVER_START)), 1.0 - float(rng.uniform(*MOVER_START))
    if direction in ("left", "up"):
        a, b = b, a
    across = lane + float(rng.uniform(-0.02, 0.02))
    start, end = ((a, across), (b, across)) if horizontal else ((across, a), (across, b))
    return _moving(rng, colour, shape, start, end, direction)


def _corner_centre(corner: str) -> tuple[float, float]:
    x = CORNER_CENTRE if corner.endswith("left") else 1.0 - CORNER_CENTRE
    y = CORNER_CENTRE if corner.startswith("top") else 1.0 - CORNER_CENTRE
    return x, y


def _statics(rng, colours: list[str], free: list[str]) -> list[ObjectSpec]:
    """One or two static shapes (of the given colours, in order) in corners chosen from ``free``."""
    statics = []
    for colour, corner in zip(colours, sorted(_pick(rng, free, int(rng.integers(1, 3))), key=CORNERS.index)):
        size = float(rng.uniform(*V2_SIZE))
        near = float(rng.uniform(0.02, 0.04)) + size / 2
        x = near if corner.endswith("left") else 1.0 - near
        y = near if corner.startswith("top") else 1.0 - near
        statics.append(ObjectSpec(colour, _pick(rng, SHAPES), size, (x, y), (x, y), corner=corner))
    return statics


def _v2_scene(rng, category: str) -> tuple[VideoSpec, int, str | None]:
    """(scene, index of the object asked about in ``statics + movers``, the corner named or None)."""
    colours = _pick(rng, COLOURS, 6)
    shapes = lambda k: _pick(rng, SHAPES, k)  # noqa: E731 - distinct shapes for k objects
    corner = None
    if category == "busy_direction":
        s = shapes(3)
        movers = [_lane_mover(rng, colours[0], s[0], LANES[0], True), _lane_mover(rng, colours[1], s[1], LANES[1], True),
                  _lane_mover(rng, colours[2], s[2], 0.5, False)]
        movers.append(movers.pop(int(rng.integers(3))))  # the one asked about, drawn last
        statics = _statics(rng, colours[3:], list(CORNERS))
    elif category == "end_corner_color":
        corner = _pick(rng, CORNERS)
        (cx, cy), top, left = _corner_centre(corner), corner.startswith("top"), corner.endswith("left")
        s = shapes(3)
        # One object leaves the corner along its row, another arrives down or up its column.
        leaving = _moving(rng, colours[1], s[1], (cx, cy), (0.5, cy), "right" if left else "left")
        arriving = _moving(rng, colours[0], s[0], (cx, 0.5), (cx, cy), "up" if top else "down")
        lane = _lane_mover(rng, colours[2], s[2], LANES[1] if top else LANES[0], True)
        movers = [leaving, lane, arriving]
        statics = _statics(rng, colours[3:], [k for k in CORNERS if k != corner])
    else:  # flash_shape
        s = shapes(2)
        flash = ObjectSpec(colours[0], _pick(rng, SHAPES), float(rng.uniform(*FLASH_SIZE)), (0.5, 0.5), (0.5, 0.5),
                           visible=FLASH_WINDOW)  # moved to one of the FLASH_CELLS below
        movers = [_lane_mover(rng, colours[1], s[0], LANES[0], True),
                  _lane_mover(rng, colours[2], s[1], LANES[1], True), flash]
        statics = _statics(rng, colours[3:], list(CORNERS))
    texture = (float(rng.uniform(*TEXTURE_AMPLITUDE)), float(rng.uniform(0.5, 2.0)),
               float(rng.uniform(0.5, 2.0)), float(rng.uniform(0, 2 * np.pi)))
    if category == "flash_shape":  # drawn last, so every earlier draw is as before the flash moved
        x, y = (float(FLASH_CELLS[int(rng.integers(2))]) for _ in range(2))
        movers[-1] = dataclasses.replace(movers[-1], start=(x, y), end=(x, y))
    video = VideoSpec(_pick(rng, BACKGROUNDS), texture, tuple(statics), tuple(movers))
    return video, len(statics) + len(movers) - 1, corner


def answer_word(video: VideoSpec, category: str, target: int) -> str:
    """The answer of a v2 question from the object it names alone."""
    obj = (video.statics + video.movers)[target]
    return {"busy_direction": obj.direction, "end_corner_color": obj.colour, "flash_shape": obj.shape}[category]


def _v2_question(rng, video: VideoSpec, category: str, target: int, corner: str | None, position: int) -> QuestionSpec:
    obj = (video.statics + video.movers)[target]
    correct = answer_word(video, category, target)
    if category == "end_corner_color":
        # The colour that leaves the corner first, then the scene's other colours: every option is on screen.
        scene = [o.colour for o in video.movers[:-1] + video.statics]
        distractors = _pick(rng, scene[1:], len(scene) - 1)[:2]
        distractors = _pick(rng, [scene[0], *distractors], 3)
    else:
        pool = DIRECTIONS if category == "busy_direction" else SHAPES
        distractors = _pick(rng, [x for x in pool if x != correct], 3)
    options = tuple(distractors[:position] + [correct] + distractors[position:])
    text = V2_TEMPLATES[category].format(colour=obj.colour, shape=obj.shape, corner=corner)
    return QuestionSpec(category, text, options, LETTERS[position], target)


def sample_v2(seed: int, index: int) -> tuple[VideoSpec, QuestionSpec]:
    """Example ``index`` of the v2 set drawn with ``seed``: every run of len(ALL_CATEGORIES) examples
    holds each type once (the v1 types drawn as in v1)."""
    category, position = _schedule(seed, index, ALL_CATEGORIES)
    if category in CATEGORIES:
        rng = np.random.default_rng([seed, 1, index])
        video = _scene(rng, category)
        return video, _question(rng, video, category, position)
    rng = np.random.default_rng([seed, 3, index])
    video, target, corner = _v2_scene(rng, category)
    return video, _v2_question(rng, video, category, target, corner, position)
