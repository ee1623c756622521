"""The toy world v2: opt-in, deterministic, and its answers come from the named object alone
(planted checks: changing another object leaves the answer; changing the named one moves it),
read back from the rendered pixels."""

import dataclasses
import hashlib
import json
from collections import Counter

import numpy as np
import torch
import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.toy.world import COLOURS, DIRECTIONS, SHAPES, iter_examples, iter_specs, render_video, sample_example
from prunevid_bench.toy.train_data import token_labels
from prunevid_bench.toy.world_v2 import ALL_CATEGORIES, FLASH_WINDOW, V2_CATEGORIES, answer_word

N = 48  # six rounds of the eight types


def v2_questions(category: str, n: int = N, seed: int = 7):
    return [(v, q) for _, v, q in iter_specs(n, seed, "v2") if q.category == category]


def colour_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frame.astype(int) == COLOURS[colour], axis=-1)


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_default_world_is_unchanged():
    # sha256 of the first 10 examples of seed 7 (frames, question, options, answer, category),
    # computed with the code before world v2 existed: the shipped toy's data stays the same.
    digest = hashlib.sha256()
    for e in iter_examples(10, 7):
        digest.update(e.frames.tobytes())
        digest.update(repr((e.question, e.options, e.answer, e.category)).encode())
    assert digest.hexdigest() == "e490d69521859502caea25a6806a9e2a021b56fd7a1c5659b3669787a5268a38"
    assert [q for _, _, q in iter_specs(10, 7)] == [q for _, _, q in iter_specs(10, 7, "v1")]


def test_v2_is_deterministic_and_balanced():
    first = list(iter_specs(N, 7, "v2"))
    assert first == list(iter_specs(N, 7, "v2"))
    assert first != list(iter_specs(N, 8, "v2"))
    counts = Counter(q.category for _, _, q in first)
    assert counts == {c: N // len(ALL_CATEGORIES) for c in ALL_CATEGORIES}
    video, _ = sample_example(7, 5, "v2")
    assert np.array_equal(render_video(video), render_video(sample_example(7, 5, "v2")[0]))
    for _, video, q in first:
        objects = video.statics + video.movers
        assert len({o.colour for o in objects}) == len(objects)  # "the red triangle" names one object
        if q.category in V2_CATEGORIES:
            assert 4 <= len(objects) <= 6 and video.texture[0] > 0
            assert q.answer_text == answer_word(video, q.category, q.target)
            assert q.target == len(objects) - 1  # drawn last: nothing covers it


@pytest.mark.parametrize("category", V2_CATEGORIES)
def test_answer_depends_on_the_named_object_only(category):
    field = {"busy_direction": "direction", "end_corner_color": "colour", "flash_shape": "shape"}[category]
    pool = {"direction": DIRECTIONS, "colour": tuple(COLOURS), "shape": SHAPES}[field]
    for video, q in v2_questions(category):
        objects = list(video.statics + video.movers)
        for i, obj in enumerate(objects):
            current = getattr(obj, field) or "left"
            other = next(x for x in pool if x != current)
            changed = objects.copy()
            changed[i] = dataclasses.replace(obj, **{field: other})
            scene = dataclasses.replace(video, statics=tuple(changed[:len(video.statics)]),
                                        movers=tuple(changed[len(video.statics):]))
            answer = answer_word(scene, category, q.target)
            if i == q.target:
                assert answer == other != q.answer_text
            else:
                assert answer == q.answer_text


def test_answers_follow_from_the_pixels():
    for video, q in v2_questions("busy_direction"):
        frames = render_video(video)
        colour = q.question.split()[-3]
        dx, dy = centroid(colour_mask(frames[-1], colour)) - centroid(colour_mask(frames[0], colour))
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == q.answer_text
    for video, q in v2_questions("end_corner_color"):
        frames = render_video(video)
        corner = q.question.split()[-5]
        rows = slice(0, 34) if corner.startswith("top") else slice(78, 112)
        cols = slice(0, 34) if corner.endswith("left") else slice(78, 112)
        at_end = [c for c in COLOURS if colour_mask(frames[-1][rows, cols], c).sum() > 50]
        at_start = [c for c in COLOURS if colour_mask(frames[0][rows, cols], c).sum() > 50]
        assert at_end == [q.answer_text] and at_start and q.answer_text not in at_start
        assert at_start[0] in q.options  # the object that leaves the corner is an option
    positions = set()
    for video, q in v2_questions("flash_shape"):
        positions.add(video.movers[-1].start)
        frames = render_video(video)
        colour = video.movers[-1].colour
        shown = [f for f in range(16) if colour_mask(frames[f], colour).sum() > 0]
        assert shown == [f for f in range(16) if FLASH_WINDOW[0] <= f / 15 <= FLASH_WINDOW[1]] == [6, 7, 8, 9]
        centre = centroid(colour_mask(frames[7], colour))
        assert np.all(np.abs(centre - np.array(q_cell_centre(centre))) < 4)  # the middle of a middle token
        # Two of the 128 visual tokens (28 x 28 px cells, two frames each) show it: one cell, two steps.
        cells = {(f // 2, int(y) // 28, int(x) // 28) for f in shown for y, x in zip(*np.nonzero(colour_mask(frames[f], colour)))}
        assert len(cells) == 2 and {c[1:] for c in cells} <= {(1, 1), (1, 2), (2, 1), (2, 2)}
        # and at least one of them is labelled as showing it, so training can point at it
        labels = token_labels(video, torch.tensor([8, 8, 8]), 16, 112)
        assert (labels[:, -1] == q.target + 1).sum() >= 1
    assert len(positions) == 4  # every middle token is used


def q_cell_centre(centre) -> tuple[float, float]:
    """The centre of the middle token nearest to a pixel position (the flash's cells, 42 or 70 px)."""
    return tuple(42.0 if c < 56 else 70.0 for c in centre)


def test_cli_writes_v2_and_rejects_an_unknown_world(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["toy-data", "--out", str(tmp_path / "d"), "--n", "8", "--world", "v2"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "d" / "data.jsonl").read_text().splitlines()]
    assert {r["category"] for r in rows} == set(ALL_CATEGORIES)
    bad = runner.invoke(app, ["toy-data", "--out", str(tmp_path / "e"), "--n", "1", "--world", "v3"])
    assert bad.exit_code == 2 and "unknown toy world 'v3'" in bad.stderr and "Traceback" not in bad.output
