"""ToMe inside the vision tower (``tome_vision``): nothing merged is the vanilla tower on every
family; merging equals a naive block-by-block reference written from ToMe's published rule
(bipartite soft matching on the keys, size-weighted merge, proportional attention, unmerge)
within 1e-5 in float32, for window and full-attention blocks, an inter-frame block, both merger
modes; and that reference is sensitive to what it checks."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

from prunevid_bench.config import RunConfig
from prunevid_bench.families import family_for_type
from prunevid_bench.methods.tome_vision import ToMeVisionConfig
from prunevid_bench.patch.handle import apply_methods
from prunevid_bench.patch.tower import merge_blocks
from prunevid_bench.stages import tome_vision as tv
from tests.test_stage1_model import planted_video, prepare

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe")


def _processor(family):
    if family.model_type.startswith("qwen3_vl"):
        from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_processor

        return build_qwen3vl_processor()
    from prunevid_bench.models.tiny import build_processor

    return build_processor(processor_class=family.processor_class)


_MODELS: dict = {}


def setup(name: str, attn: str = "sdpa", frames: int = 8):
    """(model, family, pixel_values_videos, video_grid_thw) on a planted video."""
    key = (name, attn)
    if key not in _MODELS:
        family = family_for_type(name)
        _MODELS[key] = (family.build_tiny(attn_implementation=attn), family, _processor(family))
    model, family, processor = _MODELS[key]
    inputs = prepare(processor, [planted_video(frames=frames)])
    return model, family, inputs["pixel_values_videos"], inputs["video_grid_thw"]


def tower_output(model, family, pv, grid, cfg: ToMeVisionConfig | None = None):
    """The tower's video features (and DeepStack levels), with ``cfg`` installed or vanilla."""
    handle = apply_methods(model, RunConfig(tome_vision=cfg)) if cfg is not None else None
    try:
        if handle is not None:  # as get_video_features under the pipeline's wrapper
            handle._encoding_videos, handle._encoded_video_grid_thw = True, grid
        with torch.no_grad():
            out = family.vision_encoder(model)(pv, grid_thw=grid)
        return out.pooler_output, [d for d in (getattr(out, "deepstack_features", None) or [])], handle
    finally:
        if handle is not None:
            handle.remove()


# ---------------------------------------------------------------- the naive reference
def _vanilla_block_inputs(model, family, pv, grid):
    """Block 0's input, each block's cu_seqlens and the rotary (cos, sin), from a vanilla pass."""
    tower = family.vision_encoder(model)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"], k)),
                                         with_kwargs=True) for b in tower.blocks]
    try:
        with torch.no_grad():
            tower(pv, grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    return seen[0][0], [k["cu_seqlens"] for _, k in seen], seen[0][1]["position_embeddings"]


class Token:
    """One token of the reference: its representative unit (tower order) and its members."""

    def __init__(self, rep: int, members: list[int]):
        self.rep, self.members = rep, members


def _naive_matching(metric_rows: list[torch.Tensor], r: int) -> list[tuple[int, int]]:
    """ToMe's bipartite soft matching, written out: A = even places, B = odd, cosine of every
    A to every B, each A's best B (first on ties), the r best A's merge (stable on ties).
    Returns (a place, b place) pairs."""
    a, b = list(range(0, len(metric_rows), 2)), list(range(1, len(metric_rows), 2))
    r = min(r, len(b))
    if r <= 0:
        return []
    best = []
    for i in a:
        scores = [float(torch.dot(metric_rows[i], metric_rows[j]) /
                        (metric_rows[i].norm().clamp(min=1e-12) * metric_rows[j].norm().clamp(min=1e-12))) for j in b]
        j = max(range(len(b)), key=lambda q: (scores[q], -q))
        best.append((scores[j], i, b[j]))
    ranked = sorted(range(len(best)), key=lambda q: -best[q][0])  # Python's sort is stable
    return [(best[q][1], best[q][2]) for q in ranked[:r]]


def reference(model, family, pv, grid, cfg: ToMeVisionConfig, proportional=True, renumber=False):
    """ToMe in the tower, block by block, with lists of members and explicit softmax attention.
    ``proportional`` / ``renumber`` (rotary from contiguous positions) only for the sensitivity
    checks. Returns (features in raster order, DeepStack levels)."""
    tower = family.vision_encoder(model)
    x, cus, (cos, sin) = _vanilla_block_inputs(model, family, pv, grid)
    rotary = sys.modules[type(tower.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
    unit = family.geometry(model.config).merge ** 2 if cfg.merger == "groups" else 1
    t, h, w = grid[0].tolist()
    per_frame = h * w // unit
    frame_of = [u // per_frame for u in range(t * per_frame)]
    depth = len(tower.blocks)
    removals = tv.block_removals(cfg.r, depth, cfg.schedule)
    keeps = tv.frame_keeps(t, per_frame, cfg.budget) if cfg.budget is not None else None  # a budget: per-frame plan
    inter = merge_blocks(cfg.merge_layers, depth)
    tokens = [Token(u, [u]) for u in range(t * per_frame)]
    c = x.shape[-1]
    rows = [x[u * unit : (u + 1) * unit].reshape(-1) for u in range(len(tokens))]
    levels = []
    deepstack_at = list(getattr(tower, "deepstack_visual_indexes", []) or [])

    def unmerged(rows):
        full = [None] * (t * per_frame)
        for tok, row in zip(tokens, rows):
            for m in tok.members:
                full[m] = row
        return torch.stack(full).reshape(-1, c)

    with torch.no_grad():
        for b, blk in enumerate(tower.blocks):
            x = torch.stack(rows).reshape(-1, c)
            patches = [tok.rep * unit + i for tok in tokens for i in range(unit)]
            sizes = torch.tensor([float(len(tok.members)) for tok in tokens for _ in range(unit)])
            segment_of = [int(torch.searchsorted(cus[b], torch.tensor(p), right=True)) - 1 for p in patches]
            qkv = blk.attn.qkv(blk.norm1(x)).reshape(len(patches), 3, blk.attn.num_heads, -1)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            at = torch.arange(len(patches)) if renumber else torch.tensor(patches)
            q_rot, k_rot = rotary(q, k, cos[at], sin[at])
            out = torch.zeros_like(q)
            for s in sorted(set(segment_of)):
                idx = torch.tensor([i for i, g in enumerate(segment_of) if g == s])
                logits = torch.einsum("qhd,khd->hqk", q_rot[idx], k_rot[idx]) * blk.attn.head_dim**-0.5
                if proportional:
                    logits = logits + sizes[idx].log()[None, None, :]
                out[idx] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[idx])
            x = x + blk.attn.proj(out.reshape(len(patches), -1))
            rows = list(x.reshape(len(tokens), -1))
            metric = list(k.mean(1).reshape(len(tokens), -1))
            if b in inter:
                plan = [(lambda tok: frame_of[tok.rep], lambda n, lab: int(n * cfg.intra_proportion)),
                        (lambda tok: frame_of[tok.rep] // cfg.clip_frames, lambda n, lab: int(n * cfg.inter_proportion))]
            elif keeps is not None:
                plan = [(lambda tok: frame_of[tok.rep], lambda n, lab, b=b: tv.budget_removal(n, keeps[lab], depth - b))]
            else:
                plan = [(lambda tok: frame_of[tok.rep], lambda n, lab, r=removals[b]: r)]
            for label, count in plan:
                gone = set()
                for lab in sorted({label(tok) for tok in tokens}):
                    places = [i for i, tok in enumerate(tokens) if label(tok) == lab]
                    for ai, bi in _naive_matching([metric[i] for i in places], count(len(places), lab)):
                        src, dst = places[ai], places[bi]
                        s_src, s_dst = len(tokens[src].members), len(tokens[dst].members)
                        rows[dst] = (rows[dst] * s_dst + rows[src] * s_src) / (s_dst + s_src)
                        tokens[dst] = Token(tokens[dst].rep, tokens[dst].members + tokens[src].members)
                        gone.add(src)
                keep = [i for i in range(len(tokens)) if i not in gone]
                tokens, rows, metric = [tokens[i] for i in keep], [rows[i] for i in keep], [metric[i] for i in keep]
            x = torch.stack(rows).reshape(-1, c)
            x = x + blk.mlp(blk.norm2(x))
            rows = list(x.reshape(len(tokens), -1))
            if b in deepstack_at:
                levels.append(tower.deepstack_merger_list[deepstack_at.index(b)](unmerged(rows)))
        if cfg.merger == "groups":  # the merger projects one row per merged group, at its representative
            order = family.merger_order(model, grid)
            projected = tower.merger(torch.stack(rows).reshape(-1, c))
            out = projected.new_zeros(t * per_frame, projected.shape[-1])
            out[order[torch.tensor([tok.rep for tok in tokens])]] = projected
            return out, levels
        merged = tower.merger(unmerged(rows))
    inverse = torch.argsort(family.merger_order(model, grid))
    return merged[inverse], levels


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


# ---------------------------------------------------------------- nothing merged
@pytest.mark.parametrize("name", FAMILIES)
def test_nothing_merged_is_the_vanilla_tower(name):
    model, family, pv, grid = setup(name)
    vanilla, vanilla_levels, _ = tower_output(model, family, pv, grid)
    for cfg in (ToMeVisionConfig(enabled=True, r=0), ToMeVisionConfig(enabled=True, r=0, merger="groups")):
        if cfg.merger == "groups" and family.deepstack_levels(model):
            continue
        out, levels, _ = tower_output(model, family, pv, grid, cfg)
        assert torch.equal(out, vanilla), (name, cfg.merger)
        assert all(torch.equal(a, b) for a, b in zip(levels, vanilla_levels))
    again, _, _ = tower_output(model, family, pv, grid)  # removed: the tower is vanilla again
    assert torch.equal(again, vanilla)


# ---------------------------------------------------------------- with merging
CASES = {
    # Qwen2.5-VL's tiny tower: block 0 window attention, block 1 full attention
    "window+full": ToMeVisionConfig(enabled=True, r=5),
    "inter-frame": ToMeVisionConfig(enabled=True, r=3, merge_layers="1", inter_proportion=0.3, intra_proportion=0.1),
    "decreasing": ToMeVisionConfig(enabled=True, r=6, schedule="decreasing"),
    "groups": ToMeVisionConfig(enabled=True, r=2, merge_layers="1", inter_proportion=0.25, merger="groups"),
    # a budget: each frame's own removals (0.3 of 4 frames: one frame keeps one unit fewer than the others)
    "budget": ToMeVisionConfig(enabled=True, budget=0.3),
    "budget-groups": ToMeVisionConfig(enabled=True, budget=0.3, merger="groups"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_merging_equals_the_naive_reference(name, case):
    cfg = CASES[case]
    model, family, pv, grid = setup(name)
    if cfg.merger == "groups" and family.deepstack_levels(model):
        with pytest.raises(Exception, match="DeepStack"):
            apply_methods(model, RunConfig(tome_vision=cfg))
        return
    out, levels, _ = tower_output(model, family, pv, grid, cfg)
    ref, ref_levels = reference(model, family, pv, grid, cfg)
    vanilla, _, _ = tower_output(model, family, pv, grid)
    assert not _close(vanilla, ref, 1e-3)  # something was merged
    assert _close(out, ref)
    assert len(levels) == len(ref_levels) == family.deepstack_levels(model)
    assert all(_close(a, b) for a, b in zip(levels, ref_levels))


def test_eager_attention_equals_the_reference_too():
    model, family, pv, grid = setup("qwen2_5_vl", attn="eager")
    cfg = CASES["inter-frame"]
    out, _, _ = tower_output(model, family, pv, grid, cfg)
    assert _close(out, reference(model, family, pv, grid, cfg)[0])


def test_the_reference_would_catch_a_mistake():
    """Without proportional attention, or with rotary renumbered after merging, the result moves
    far beyond the tolerance: the reference checks both."""
    model, family, pv, grid = setup("qwen2_5_vl")
    model = copy.deepcopy(model)  # sharper attention than the tiny random weights give, so rotary matters
    with torch.no_grad():
        for block in family.vision_encoder(model).blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.weight.shape[1]] *= 6
    cfg = ToMeVisionConfig(enabled=True, r=8)
    out = tower_output(model, family, pv, grid, cfg)[0]
    assert _close(out, reference(model, family, pv, grid, cfg)[0])
    assert not _close(out, reference(model, family, pv, grid, cfg, proportional=False)[0], 1e-4)
    assert not _close(out, reference(model, family, pv, grid, cfg, renumber=True)[0], 1e-4)
    off = ToMeVisionConfig(enabled=True, r=8, proportional_attention=False)
    assert _close(tower_output(model, family, pv, grid, off)[0],
                  reference(model, family, pv, grid, off, proportional=False)[0])


def test_groups_mode_hands_the_llm_fewer_tokens():
    model, family, pv, grid = setup("qwen2_5_vl")
    cfg = ToMeVisionConfig(enabled=True, r=2, merger="groups")
    _, _, handle = tower_output(model, family, pv, grid, cfg)
    encoded = handle._before_merger
    t, h, w = grid[0].tolist()
    groups = t * h * w // 4
    removed = 2 * t * len(tower_blocks := family.vision_encoder(model).blocks)
    assert encoded.videos[0][0].index.numel() == groups - removed == groups - encoded.rows_skipped
    assert len(tower_blocks) == 2


# ---------------------------------------------------------------- the schedule
def test_schedules_follow_tome():
    assert tv.block_removals(4, 3) == [4, 4, 4]
    assert tv.block_removals(8, 5, "decreasing") == [12, 10, 8, 6, 4]  # ToMe's parse_r(5, (8, -0.5))
    assert sum(tv.block_removals(16, 32, "decreasing")) == pytest.approx(16 * 32, rel=0.05)
    assert merge_blocks("3, 6,9", 12) == [3, 6, 9]
    assert merge_blocks("8/32,16/32", 2) == [1] and merge_blocks("8/32,16/32", 32) == [8, 16]
    with pytest.raises(Exception, match=r"\[0, 11\]"):
        merge_blocks("12", 12)
    with pytest.raises(Exception, match="block indices"):
        merge_blocks("a", 12)
    assert math.isclose(sum(tv.block_removals(6, 2, "decreasing")), 12, abs_tol=1)


# ---------------------------------------------------------------- through the pipeline
ONE_TOKEN = {"generation.max_new_tokens": 3}


def test_pipeline_record_counts_the_towers_blocks(tiny_pipe, frames8):
    prepared = tiny_pipe.prepare(frames8, "What happens?")
    base = tiny_pipe.run(prepared, **ONE_TOKEN)
    nothing = tiny_pipe.run(prepared, **{"tome_vision.enabled": True, "tome_vision.r": 0}, **ONE_TOKEN)
    assert nothing.generated_token_ids == base.generated_token_ids
    assert torch.equal(nothing.first_token_logits, base.first_token_logits)
    t, h, w = base.video_grid_thw[0]
    patches = t * h * w
    merged = tiny_pipe.run(prepared, **{"tome_vision.enabled": True, "tome_vision.r": 8}, **ONE_TOKEN)
    assert merged.tome_vision_block_patches == [patches, patches - 8 * t]
    assert merged.tome_vision_tower_tokens_out == patches - 16 * t
    assert merged.tokens_after_visual_methods == base.visual_tokens  # unmerge: the LLM sees every token
    assert merged.prefill_flops < base.prefill_flops == merged.prefill_flops_baseline
    assert 0 < merged.vision_mergers_s < merged.vision_encoder_s
    assert [r.method for r in merged.reductions] == ["tome_vision"]
    groups = tiny_pipe.run(prepared, **{"tome_vision.enabled": True, "tome_vision.r": 2,
                                        "tome_vision.merger": "groups"}, **ONE_TOKEN)
    assert groups.tokens_after_visual_methods == base.visual_tokens - 2 * 2 * t  # 2 groups per frame and block
    assert groups.tome_vision_merged_groups == 4 * t


def test_bad_merge_layers_is_one_line(tiny_pipe, frames8):
    prepared = tiny_pipe.prepare(frames8, "What happens?")
    with pytest.raises(Exception, match=r"tome_vision.merge_layers must be in \[0, 1\]"):
        tiny_pipe.run(prepared, **{"tome_vision.enabled": True, "tome_vision.merge_layers": "5"}, **ONE_TOKEN)


def test_cli_runs_the_preset_and_records_the_tower(clip8, tmp_path):
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    res = CliRunner().invoke(app, ["run", str(clip8), "What is happening?", "--model", "tiny", "--preset", "tome-vision",
                                   "--num-frames", "8", "--max-new-tokens", "2", "--results-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "blocks / merger(s)" in res.output and "tome_vision" in res.output
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    # the preset on the tiny tower's 2 blocks: r = 8 per frame in block 0; block 1 (8/32..24/32 of 2) merges across frames
    assert result["tome_vision_block_patches"] == [256, 256 - 4 * 8]
    assert result["tome_vision_tower_tokens_out"] == 256 - 32 - 2 * int(2 * 56 * 0.25)
    assert result["vision_mergers_s"] > 0 and result["ideal_speedup"] > 1


def test_removed_with_llm_side_tome_leaves_no_wrapper():
    """The tower's and the LLM side's SDPA wrappers stack; removing the handle takes both off,
    and the tower's eager function too."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from prunevid_bench.methods.tome import ToMeConfig

    model, family, pv, grid = setup("qwen2_5_vl")
    module = sys.modules[type(family.vision_encoder(model).blocks[0].attn).__module__]
    sdpa, eager = ALL_ATTENTION_FUNCTIONS["sdpa"], module.eager_attention_forward
    handle = apply_methods(model, RunConfig(tome_vision=ToMeVisionConfig(enabled=True), tome=ToMeConfig(enabled=True)))
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa and module.eager_attention_forward is not eager
    handle.remove()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa and module.eager_attention_forward is eager


# ---------------------------------------------------------------- the budget knob
def _fewest_by_search(length: int, blocks: int) -> int:
    """The fewest units any sequence of ToMe merges (0 to half the units in each block) leaves."""
    reach = {length}
    for _ in range(blocks):
        reach = {c - x for c in reach for x in range(c // 2 + 1)}
    return min(reach)


def test_the_budget_plan_reaches_every_reachable_count_within_tomes_cap():
    for length in range(1, 41):
        for blocks in range(1, 5):
            fewest = _fewest_by_search(length, blocks)
            assert tv.fewest_after(length, blocks) == fewest
            for keep in range(1, length + 1):
                c, gone = length, []
                for b in range(blocks):
                    x = tv.budget_removal(c, keep, blocks - b)
                    assert 0 <= x <= c // 2
                    gone.append(x)
                    c -= x
                assert c == max(keep, fewest), (length, blocks, keep, gone)
    deep = [tv.budget_removal(1024 - 24 * b, 256, 32 - b) for b in range(32)]  # a 32-block tower: ToMe's even spread
    assert deep == [24] * 32
    assert tv.frame_keeps(4, 16, 0.3) == [5, 5, 5, 4] and sum(tv.frame_keeps(7, 100, 0.37)) == round(0.37 * 700)
    assert tv.frame_keeps(3, 10, 0.01) == [1, 1, 1] and tv.frame_keeps(3, 10, 1.0) == [10, 10, 10]


@pytest.mark.parametrize("merger", ["unmerge", "groups"])
def test_budget_one_is_the_vanilla_run(tiny_pipe, frames8, merger):
    from prunevid_bench.budget import budget_overrides
    from prunevid_bench.config import build_config

    prepared = tiny_pipe.prepare(frames8, "What happens?")
    base = tiny_pipe.run(prepared, **ONE_TOKEN)
    cfg = build_config(None, None, {"tome_vision.enabled": True, "tome_vision.merger": merger, "budget.match": "flops"})
    settings = budget_overrides(cfg, 1.0)
    assert settings == {"tome_vision.budget": 1.0}
    one = tiny_pipe.run(prepared, **{"tome_vision.enabled": True, "tome_vision.merger": merger, **settings}, **ONE_TOKEN)
    assert one.generated_token_ids == base.generated_token_ids
    assert torch.equal(one.first_token_logits, base.first_token_logits)
    assert one.prefill_flops == base.prefill_flops and one.visual_tokens_kept == base.visual_tokens


@pytest.mark.parametrize("budget", [0.5, 0.3, 0.25])
def test_groups_budget_keeps_the_promised_count_on_tiny_qwen2_5_vl(tiny_pipe, frames8, budget):
    prepared = tiny_pipe.prepare(frames8, "What happens?")
    r = tiny_pipe.run(prepared, **{"tome_vision.enabled": True, "tome_vision.merger": "groups",
                                   "tome_vision.budget": budget}, **ONE_TOKEN)
    assert r.visual_tokens_kept == r.method_fields["budget_promised_tokens"] == round(budget * r.visual_tokens)
    assert "budget_note" not in r.method_fields and r.method_fields["budget_method"] == "tome_vision"
    low = tiny_pipe.run(prepared, **{"tome_vision.enabled": True, "tome_vision.merger": "groups",
                                     "tome_vision.budget": 0.1}, **ONE_TOKEN)  # 2 blocks halve twice at most
    assert low.visual_tokens_kept == low.visual_tokens // 4
    assert "kept 16 visual tokens, not the 6 its budget promised" in low.method_fields["budget_note"]


@pytest.mark.parametrize("merger", ["unmerge", "groups"])
def test_the_knobs_tower_blocks_are_the_passs_counts(tiny_pipe, frames8, merger):
    """What ``match_flops`` predicts for the tower's blocks: the pass's patches in attention and
    in the MLP exactly, and its full-attention block's pairs (Qwen2.5-VL's tiny tower: block 1)."""
    from prunevid_bench.families import family_of
    from prunevid_bench.methods.tome_vision import budget_knob

    prepared = tiny_pipe.prepare(frames8, "What happens?")
    cfg = RunConfig(tome_vision=ToMeVisionConfig(enabled=True, budget=0.3, merger=merger))
    tiny_pipe.run(prepared, config=cfg)
    real = tiny_pipe._apply_stages(cfg).state.tower_blocks  # the run's handle (cached by its config)
    vision = family_of(tiny_pipe.model).vision_shape(tiny_pipe.model.config)
    grids = prepared.inputs["video_grid_thw"].tolist()
    predicted = budget_knob(ToMeVisionConfig(merger=merger), 0.3).tower_blocks(vision, grids)
    assert [(b[0], b[2]) for b in predicted] == [(b[0], b[2]) for b in real]
    assert vision.fullatt_block_indexes == (1,) and predicted[1][1] == real[1][1]


def test_a_budget_with_inter_frame_blocks_is_one_line(tiny_pipe, frames8):
    prepared = tiny_pipe.prepare(frames8, "What happens?")
    with pytest.raises(Exception, match="tome_vision.budget plans every block's merges within frames; unset merge_layers"):
        tiny_pipe.run(prepared, **{"tome_vision.enabled": True, "tome_vision.budget": 0.5,
                                   "tome_vision.merge_layers": "1"}, **ONE_TOKEN)
