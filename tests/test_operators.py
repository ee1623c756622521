"""Reductions as operators (``prunevid_bench.tokens``): one operator applied to embeddings,
positions, sizes and every extra per-token tensor; a method registered from outside the package
carries its own extra tensor through a ToMe merge and an EVS drop; the family's placeholder
runs (one per video, or one per temporal step with text between them) place every token."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from prunevid_bench import splice
from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import Method, VisualReduction, all_methods, register_method, unregister_method
from prunevid_bench.tokens import VideoTokens, apply_reduction

T, N, W = 4, 16, 4  # the tiny models' 8-frame video: 4 temporal steps of 4 x 4 tokens


# ----------------------------------------------------------------------------- the operator alone
def test_operator_applies_alike_to_everything_a_video_carries():
    gen = torch.Generator().manual_seed(0)
    tokens = VideoTokens.full_grid(torch.randn(6, 3, generator=gen), 2, 3, 3,
                                   positions=torch.arange(18).view(3, 6), extras={"x": torch.randn(6, 2, generator=gen)})
    tokens.sizes = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0])
    # rows: {0, 1} -> 0 (representative 1), 2 dropped, {3} -> 1, {4, 5} -> 2 (representative 4)
    red = VisualReduction(dest=torch.tensor([0, 0, -1, 1, 2, 2]), group=torch.tensor([0, 1, 1]),
                          representative=torch.tensor([1, 3, 4]))
    out = apply_reduction(tokens, red)
    w = tokens.sizes
    for name, before, after in (("embeds", tokens.embeds, out.embeds), ("x", tokens.extras["x"], out.extras["x"])):
        expected = torch.stack([(w[0] * before[0] + w[1] * before[1]) / 3, before[3], (w[4] * before[4] + w[5] * before[5]) / 4])
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(out.extras["x"][1], tokens.extras["x"][3])  # a single member is copied exactly
    assert out.sizes.tolist() == [3.0, 1.0, 4.0]
    assert torch.equal(out.positions, tokens.positions[:, [1, 3, 4]]) and out.index.tolist() == [1, 3, 4]
    assert out.origin.tolist() == [0, 0, -1, 1, 2, 2]
    twice = apply_reduction(out, VisualReduction.keep(torch.tensor([0, 2]), 3, torch.tensor([0, 0])))
    assert twice.origin.tolist() == [0, 0, -1, -1, 1, 1] and twice.sizes.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("dest,m,rep,match", [
    ([0, 5, 1], 2, None, "not an operator"),
    ([0, 0, 2], 3, None, "needs members"),
    ([1, 0, 2], 3, [1, 0, 2], "ascending"),
    ([0, 0, 1], 2, [2, 1], "one of them"),
])
def test_a_reduction_that_is_no_operator_is_refused(dest, m, rep, match):
    tokens = VideoTokens.full_grid(torch.zeros(3, 2), 1, 3, 3)
    red = VisualReduction(dest=torch.tensor(dest), group=torch.zeros(m, dtype=torch.long),
                          representative=None if rep is None else torch.tensor(rep))
    with pytest.raises(PruneVidError, match=match):
        apply_reduction(tokens, red, "mine")


# ----------------------------------------------------------------------------- placeholder runs
def test_runs_per_video_and_per_temporal_step():
    # two touching videos (2 x 3 and 1 x 2 tokens) in one run, as Qwen2.5-VL writes them
    assert splice.assign_runs([(5, 13)], [(2, 3), (1, 2)]) == [[(5, 11)], [(11, 13)]]
    # one run per temporal step with timestamp text between (Qwen3-VL): 2 videos of 2 x 3
    runs = [(4, 7), (9, 12), (20, 23), (25, 28)]
    per_video = splice.assign_runs(runs, [(2, 3), (2, 3)], per_step=True)
    assert per_video == [[(4, 7), (9, 12)], [(20, 23), (25, 28)]]
    assert splice.run_positions(per_video[0]).tolist() == [4, 5, 6, 9, 10, 11]
    with pytest.raises(PruneVidError, match="do not match the videos' grids"):
        splice.assign_runs(runs, [(2, 3)], per_step=True)
    with pytest.raises(PruneVidError, match="do not match"):
        splice.assign_runs([(4, 8)], [(2, 3)], per_step=True)  # a run that is not one step


# ----------------------------------------------------------------------------- a plug-in's own extra tensor
@dataclass
class TagConfig:
    enabled: bool = False


def grid_coordinates(tokens: VideoTokens, cfg) -> dict:
    """(t, h, w) of every token of the full grid, as floats: a tensor only this method knows."""
    t, rest = tokens.index // tokens.n, tokens.index % tokens.n
    return {"coords": torch.stack([t, rest // tokens.w, rest % tokens.w], dim=1).float()}


@contextlib.contextmanager
def tagger():
    """The plug-in registered for one block (after the pipeline exists: a session pipeline built
    meanwhile would keep its section once it is gone)."""
    seen = []

    def reduce(tokens, cfg):  # acts on nothing; only reads what reached it
        seen.append(tokens)
        n = tokens.index.numel()
        return VisualReduction.keep(torch.arange(n, device=tokens.index.device), n, tokens.group)

    all_methods()  # the built-in methods first: the plug-in then runs after them
    register_method(Method(name="tagger", acts="visual_tokens", config=TagConfig, summary="a plug-in with an extra tensor",
                           reduce=reduce, extras=grid_coordinates))
    try:
        yield seen
    finally:
        unregister_method("tagger")


@pytest.mark.parametrize("pipe_fixture", ["tiny_pipe", "tiny_qwen2vl_pipe"])
def test_a_plugins_extra_tensor_follows_a_tome_merge_and_an_evs_drop(request, pipe_fixture, frames8):
    pipe = request.getfixturevalue(pipe_fixture)
    prepared = pipe.prepare(frames8, "What happens?")
    with tagger() as seen:
        check_tagged_runs(pipe, prepared, seen)


def check_tagged_runs(pipe, prepared, seen):
    full = torch.arange(T * N)
    coords = torch.stack([full // N, full % N // W, full % W], dim=1).float()
    one = {"generation.max_new_tokens": 1, "tagger.enabled": True}

    pipe.run(prepared, **one, **{"tome.enabled": True, "tome.budget": 0.5})
    (video,) = pipe._handle.state.videos
    merged = video.origin  # the row each grid token went into
    assert video.index.numel() == 32 and bool((merged >= 0).all())
    expected = torch.zeros(32, 3).index_add_(0, merged, coords) / torch.bincount(merged, minlength=32)[:, None]
    torch.testing.assert_close(video.extras["coords"], expected, rtol=0, atol=1e-6)
    assert torch.equal(video.sizes, torch.bincount(merged, minlength=32).float())
    assert (video.sizes > 1).any()  # a real merge happened
    assert torch.equal(seen[-1].extras["coords"], video.extras["coords"])  # what the plug-in itself saw

    pipe.run(prepared, **one, **{"evs.enabled": True, "evs.video_pruning_rate": 0.75})
    (video,) = pipe._handle.state.videos
    kept = torch.nonzero(video.origin >= 0).flatten()
    assert 0 < kept.numel() < T * N and torch.equal(video.index, kept)
    assert torch.equal(video.extras["coords"], coords[kept])  # a drop gathers, exactly
    assert bool((video.sizes == 1).all())


# ----------------------------------------------------------------------------- a family's own extra tensor
@pytest.mark.parametrize("over", [
    {"tome.enabled": True, "tome.budget": 0.5},  # a merge before the LLM
    {"evs.enabled": True},  # a drop
    {"stage1.enabled": True, "stage1.space": "vision", "cluster_ratio": 0.5, "tau": 0.8},  # inside the encoder
], ids=["tome", "evs", "stage1-vision"])
def test_a_familys_extra_tensor_follows_every_reduction(tiny_pipe, frames8, monkeypatch, over):
    """A family that hands the LLM a per-token tensor beside the embeddings (as Qwen3-VL's
    DeepStack levels) gets it back reduced by the same operators: each row the mean of the grid
    tokens it stands for (the record's origin map), at the rows the video takes in the LLM."""
    import dataclasses

    from prunevid_bench.patch import handle as handle_module

    family = handle_module.family_of(tiny_pipe.model)
    given = {}

    class Tagged(type(family)):
        def visual_extras(self, model, kwargs, runs):
            return [{"level": splice.run_positions(r).float().view(-1, 1).repeat(1, 2)} for r in runs]  # its prompt place

        def put_visual_extras(self, model, kwargs, videos, rows):
            given.update(videos=videos, rows=rows, length=kwargs["inputs_embeds"].shape[1])

    tagged = Tagged(**{f.name: getattr(family, f.name) for f in dataclasses.fields(family)})
    monkeypatch.setattr(handle_module, "family_of", lambda model: tagged)
    prepared = tiny_pipe.prepare(frames8, "What happens?")
    tiny_pipe.remove_stages()
    tiny_pipe.run(prepared, **{"generation.max_new_tokens": 1, **over})
    tiny_pipe.remove_stages()
    (video,), (rows,) = given["videos"], given["rows"]
    start = int(torch.nonzero(prepared.inputs["input_ids"][0] == tiny_pipe.model.config.video_token_id)[0])
    place = (start + torch.arange(T * N)).float()
    went = video.origin >= 0
    m = video.index.numel()
    mean = torch.zeros(m).index_add_(0, video.origin[went], place[went]) / torch.bincount(video.origin[went], minlength=m)
    torch.testing.assert_close(video.extras["level"], mean.view(-1, 1).repeat(1, 2), rtol=0, atol=1e-4)
    assert m < T * N and rows.numel() == m and int(rows.max()) < given["length"]
