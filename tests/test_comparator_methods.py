"""ToMe, EVS and VidCom2 as methods on the tiny model (float32, CPU): keep everything equals the
baseline token for token; exact token counts; and the pruned run equals the cache-free
layer-by-layer reference run on inputs rebuilt here from the baseline's visual tokens with the
pure algorithm (so both the splicing and the positions are checked, not only the LLM).

The video is test_stage2's: 4 temporal grid steps of 16 tokens (64 visual tokens)."""

from __future__ import annotations

import pytest
import torch

from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.stages import evs, tome, vidcom2
from tests.test_stage2 import MAX_NEW, N_FRAMES, N_LAYERS, N_VISUAL, PER_FRAME, QUESTION, cache_free_logits, layout, run_traced, video_frames


@pytest.fixture(scope="module")
def case(tiny_pipe):
    prepared = tiny_pipe.prepare(video_frames(), QUESTION)
    return tiny_pipe, prepared, run_traced(tiny_pipe, prepared, **{"generation.max_new_tokens": MAX_NEW})


def run(case, **overrides):
    pipe, prepared, _ = case
    return run_traced(pipe, prepared, **{"generation.max_new_tokens": MAX_NEW}, **overrides)


def video_tokens(case) -> torch.Tensor:
    """The baseline's visual tokens entering the LLM, [T, N, C]."""
    _, prepared, base = case
    start, end = layout(prepared.inputs["input_ids"])
    return base.embeds[0, start:end].reshape(N_FRAMES, PER_FRAME, -1)


IDENTITY = [
    {"tome.enabled": True, "tome.intra_ratio": 0.0, "tome.inter_ratio": 0.0},
    {"tome.enabled": True, "tome.budget": 1.0},
    {"evs.enabled": True, "evs.video_pruning_rate": 0.0},
    {"evs.enabled": True, "evs.budget": 1.0},
    {"vidcom2.enabled": True, "vidcom2.budget": 1.0},
]


@pytest.mark.parametrize("overrides", IDENTITY, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items() if "enabled" not in k))
def test_keep_everything_equals_the_baseline(case, overrides):
    base = case[2]
    out = run(case, **overrides)
    assert out.result.generated_token_ids == base.result.generated_token_ids
    assert out.state.tokens_after_stage1 == N_VISUAL
    torch.testing.assert_close(out.embeds, base.embeds, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, base.logits, rtol=0, atol=1e-6)


def vidcom2_budget_count(case, budget: float) -> int:
    return vidcom2.vidcom2_budget(vidcom2.vidcom2_scores(video_tokens(case))[1], PER_FRAME, budget)[1]


@pytest.mark.parametrize("overrides,expected", [
    # TempMe's counts: 4 per frame (int(16 * 0.25)), then int(24 * 0.25) = 6 per 2-frame clip
    ({"tome.enabled": True, "tome.intra_ratio": 0.25, "tome.inter_ratio": 0.25}, 64 - 16 - 12),
    ({"tome.enabled": True, "tome.budget": 0.25}, 16),
    ({"tome.enabled": True, "tome.budget": 0.1}, 6),  # round(6.4)
    ({"evs.enabled": True, "evs.video_pruning_rate": 0.75}, 16),
    ({"evs.enabled": True, "evs.video_pruning_rate": 0.6}, 25),  # int(64 * 0.4)
    ({"evs.enabled": True, "evs.budget": 0.5}, 32),
    ({"evs.enabled": True, "evs.budget": 0.1}, 16),  # EVS keeps at least one whole step
    ({"vidcom2.enabled": True, "vidcom2.budget": 0.5}, "vidcom2"),
])
def test_exact_token_counts(case, overrides, expected):
    if expected == "vidcom2":
        expected = vidcom2_budget_count(case, overrides["vidcom2.budget"])
    out = run(case, **overrides)
    method = next(k.split(".")[0] for k in overrides)
    assert out.state.tokens_after_stage1 == expected
    assert out.result.methods == [method]
    red = out.result.reductions[0]
    assert (red.method, red.tokens_in, red.tokens_out) == (method, N_VISUAL, expected)
    assert out.embeds.shape[1] == case[2].embeds.shape[1] - (N_VISUAL - expected)


def expected_video(case, method: str, grid: torch.Tensor):
    """(kept flat indices, their embeddings) by the pure algorithm, written out per method."""
    flat = grid.reshape(N_VISUAL, -1)
    if method == "tome":
        intra, inter = tome.tome_video_removals(N_FRAMES, PER_FRAME, 0.25, 0.25)
        res = tome.tome_video(grid, intra, inter)
        return res.representative, res.merged
    if method == "evs":
        keep = torch.nonzero(evs.evs_retention_mask(grid, 0.6)).flatten()
    else:
        keep = vidcom2.vidcom2_keep(grid, 0.4)
    return keep, flat[keep]


@pytest.mark.parametrize("method,overrides", [
    ("tome", {"tome.enabled": True, "tome.intra_ratio": 0.25, "tome.inter_ratio": 0.25}),
    ("evs", {"evs.enabled": True, "evs.video_pruning_rate": 0.6}),
    ("vidcom2", {"vidcom2.enabled": True, "vidcom2.retention_ratio": 0.4}),
])
def test_pruned_run_matches_cache_free_reference(case, method, overrides):
    pipe, prepared, base = case
    start, end = layout(prepared.inputs["input_ids"])
    keep, merged = expected_video(case, method, video_tokens(case))
    assert 0 < keep.numel() < N_VISUAL
    source = torch.cat([torch.arange(start), start + keep, torch.arange(end, base.embeds.shape[1])])
    embeds = base.embeds[:, source].clone()
    embeds[0, start : start + keep.numel()] = merged
    full = prefill_position_ids(pipe.model, prepared.inputs)  # the unpruned ids
    out = run(case, **overrides)
    torch.testing.assert_close(out.embeds, embeds, rtol=0, atol=1e-6)
    assert torch.equal(out.position_ids[1:], full[1:, :, source])  # original ids (ToMe: the destination's)
    ref = cache_free_logits(pipe.model, embeds, full[1:, :, source], torch.arange(source.numel()), N_LAYERS - 1,
                            out.result.generated_token_ids, full[1:, :, -1:] + 1)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    assert (out.logits[0] - base.logits[0]).abs().max() > 1e-3  # the reduction changed the computation


@pytest.mark.parametrize("preset,method,kept", [("fastv", "fastv", 32), ("evs-75", "evs", 16), ("tome-50", "tome", 32),
                                                ("vidcom2-25", "vidcom2", None)])
def test_comparator_presets(case, preset, method, kept):
    from prunevid_bench.config import build_config

    cfg = build_config(preset)
    assert cfg.enabled_methods == [method]
    overrides = {f"{method}.{key}": value for key, value in vars(cfg.section(method)).items()}
    if method == "fastv":
        overrides["fastv.pruning_layer"] = 1  # "2/28" is layer 0 of the tiny model's 4; any K serves the count
    out = run(case, **overrides)
    if kept is None:  # the official count: per-frame rounding of 0.25 * 16 shifted by frame uniqueness
        kept = int(vidcom2.frame_keep_counts(vidcom2.vidcom2_scores(video_tokens(case))[1], 0.25, PER_FRAME).sum())
    assert out.result.reductions[0].tokens_out == kept


# ----------------------------------------------------------------------------- matched budgets
def test_prunevid_budget_mode_spreads_round_b_times_original_over_stage1_groups(case):
    from prunevid_bench.stages.tome import spread_counts
    from tests.test_stage2 import STAGE1

    over = {**STAGE1, "stage2.enabled": True, "pruning_layer": 1}
    official = run(case, **over)
    budget = run(case, **over, **{"stage2.budget": 0.3})
    st = budget.state
    assert st.tokens_after_stage1 == official.state.tokens_after_stage1 < N_VISUAL  # Stage 1 keeps its own settings
    assert st.tokens_after == round(0.3 * N_VISUAL) == 19
    sizes = torch.bincount(st.visual_groups)
    kept = torch.bincount(st.visual_groups[st.kept_visual], minlength=sizes.numel())
    assert kept.tolist() == spread_counts(19, sizes.tolist())
    assert budget.result.method_fields["budget"] == 0.3 and "budget" not in official.result.method_fields
    assert official.state.tokens_after == int((torch.floor(sizes.double() * 0.4)).sum())  # default stays official


def test_fastv_budget_keeps_round_b_times_v(case):
    out = run(case, **{"fastv.enabled": True, "fastv.pruning_layer": 1, "fastv.budget": 0.3})
    assert out.state.tokens_after == 19 and out.result.to_dict()["visual_tokens_kept_ratio"] == 19 / 64


def test_budget_flag_sets_each_methods_knob(clip8, tmp_path):
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    args = ["run", str(clip8), "What is happening?", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "2",
            "--results-dir", str(tmp_path), "--json", "-q", "--budget", "0.25"]
    for method in ("tome", "evs", "fastv", "stage2", "random", "vidcom2"):
        res = CliRunner().invoke(app, [*args, "--set", f"{method}.enabled=true"])
        assert res.exit_code == 0, res.output
        record = json.loads(res.stdout)
        assert (record["budget"], record["budget_promised_tokens"]) == (0.25, 16), method  # the knob's promise
        assert record["budget_method"] == {"stage2": "prunevid_stage2"}.get(method, method)
        if method != "vidcom2":  # exact knobs: the promise is kept
            assert record["visual_tokens_kept"] == 16 and "budget_note" not in record, method
            assert record["visual_tokens_kept_ratio"] == 0.25
        else:  # VidCom2's count steps: kept or said so
            assert ("budget_note" in record) == (record["visual_tokens_kept"] != 16)
    # Stage 1 leaves fewer than Stage 2's promise: the record says so
    res = CliRunner().invoke(app, [*args[:-2], "--budget", "0.95", "--preset", "default", "--set", "stage1.min_cluster_tokens=4"])
    record = json.loads(res.stdout)
    assert record["budget_promised_tokens"] == round(0.95 * 64) > record["visual_tokens_kept"]
    assert record["budget_note"] == (f"prunevid_stage2 kept {record['visual_tokens_kept']} visual tokens, "
                                     f"not the {record['budget_promised_tokens']} its budget promised")
    res = CliRunner().invoke(app, [*args[:-2], "--budget", "0.25"])
    assert res.exit_code != 0 and "--budget needs a method that takes one" in res.output
    res = CliRunner().invoke(app, [*args[:-2], "--budget", "1.5", "--set", "evs.enabled=true"])
    assert res.exit_code != 0 and "--budget must be in (0, 1], got 1.5" in res.output


def test_every_budget_knob_promises_what_its_pure_rule_gives():
    """``Method.budget_knob(cfg, B)``: the settings and the promised count, per video grid."""
    from prunevid_bench.methods import get_method
    from prunevid_bench.stages import evs, tome

    grids = [(4, 16), (3, 12)]
    for name in ("prunevid_stage2", "fastv", "random", "vidcom2"):
        method = get_method(name)
        knob = method.budget_knob(method.config(), 0.3)
        assert knob.settings == {"budget": 0.3} and knob.promise(grids) == round(0.3 * 100)
    t = get_method("tome")
    assert t.budget_knob(t.config(), 0.01).promise(grids) == sum(tome.tome_budget(a, b, 0.01)[2] for a, b in grids) > 1
    e = get_method("evs")
    assert e.budget_knob(e.config(), 0.01).promise(grids) == 16 + 12  # at least one step per video
    assert e.budget_knob(e.config(), 0.5).promise(grids) == sum(evs.evs_budget(b, a, 0.5)[1] for a, b in grids) == 50
    assert get_method("prunevid_stage1").budget_knob is None  # Stage 1 keeps its own settings


# ----------------------------------------------------------------------------- ToMe's proportional attention
TOME = {"tome.enabled": True, "tome.intra_ratio": 0.25, "tome.inter_ratio": 0.25}


@pytest.mark.parametrize("proportional", [False, True])
def test_tome_proportional_attention_matches_the_cache_free_reference(case, proportional):
    """With it on, every layer's logits get log(size) of each merged key, prefill and decode; the
    reference adds that bias to its own dense additive mask (a generated token's bias is 0)."""
    pipe, prepared, base = case
    start, end = layout(prepared.inputs["input_ids"])
    intra, inter = tome.tome_video_removals(N_FRAMES, PER_FRAME, 0.25, 0.25)
    res = tome.tome_video(video_tokens(case), intra, inter)
    source = torch.cat([torch.arange(start), start + res.representative, torch.arange(end, base.embeds.shape[1])])
    bias = torch.zeros(source.numel())
    if proportional:
        bias[start : start + res.size.numel()] = res.size.log()
        assert bias.max() > 0
    out = run(case, **TOME, **{"tome.proportional_attention": proportional})
    pipe.remove_stages()  # the reference runs the bare layers: the patch's bias must not be added a second time
    full = prefill_position_ids(pipe.model, prepared.inputs)
    ref = cache_free_logits(pipe.model, out.embeds, full[1:, :, source], torch.arange(source.numel()), N_LAYERS - 1,
                            out.result.generated_token_ids, full[1:, :, -1:] + 1,
                            key_log_size=bias if proportional else None)  # the reference's own bias on the prompt keys
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    if proportional:  # the bias changed the computation
        plain = run(case, **TOME)
        assert (out.logits[0] - plain.logits[0]).abs().max() > 1e-3


def test_tome_proportional_attention_with_nothing_merged_equals_the_baseline(case):
    base = case[2]
    out = run(case, **{"tome.enabled": True, "tome.intra_ratio": 0.0, "tome.inter_ratio": 0.0, "tome.proportional_attention": True})
    assert out.result.generated_token_ids == base.result.generated_token_ids
    torch.testing.assert_close(out.logits, base.logits, rtol=0, atol=1e-5)


def test_tome_proportional_attention_refuses_an_llm_layer_method(case):
    from prunevid_bench.errors import PruneVidError

    with pytest.raises(PruneVidError, match="proportional attention cannot be combined with an LLM-layer method"):
        run(case, **TOME, **{"tome.proportional_attention": True, "fastv.enabled": True, "fastv.pruning_layer": 1})


def test_tome_proportional_attention_agrees_under_eager_and_sdpa(case):
    from prunevid_bench.pipeline import load_pipeline

    eager = load_pipeline("tiny", device="cpu", dtype="float32", attn_implementation="eager")
    try:
        prepared = eager.prepare(video_frames(), QUESTION)
        over = {**TOME, "tome.proportional_attention": True, "generation.max_new_tokens": MAX_NEW}
        by_eager = run_traced(eager, prepared, **over)
    finally:
        eager.remove_stages()
    by_sdpa = run(case, **TOME, **{"tome.proportional_attention": True})
    assert by_eager.result.generated_token_ids == by_sdpa.result.generated_token_ids
    torch.testing.assert_close(by_eager.logits, by_sdpa.logits, rtol=0, atol=1e-4)


def test_tome_proportional_attention_keeps_sdpa_causal_and_unmasked(case, monkeypatch):
    """Under SDPA the bias rides in one extra q/k channel, so the language model's prefill calls
    the kernel causal with no mask (a mask would make it compute the whole L x L), and removing
    the patch puts back the ``sdpa`` function it found."""
    import torch.nn.functional as F
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    pipe = case[0]
    head_dim = pipe.model.config.get_text_config().hidden_size // pipe.model.config.get_text_config().num_attention_heads
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[-1], q.shape[-2], attn_mask is None, kwargs.get("is_causal", False)))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    pipe.remove_stages()
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]  # transformers' own, or another live handle's wrapper
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    run(case, **TOME, **{"tome.proportional_attention": True})
    llm = [c for c in calls if c[0] == head_dim + 8]  # the language model's calls, with the 8 extra channels
    prefill = [c for c in llm if c[1] > 1]
    assert len(prefill) == N_LAYERS and all(unmasked and causal for _, _, unmasked, causal in prefill)
    assert len(llm) == N_LAYERS * MAX_NEW  # decoding goes through it too
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
    pipe.remove_stages()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    calls.clear()
    plain = run(case)  # after removal nothing is added, even if the wrapper stays under a later one
    assert all(c[0] == head_dim for c in calls if c[0] in (head_dim, head_dim + 8)) and plain.result.generated_token_ids


def test_a_removed_handles_sdpa_wrapper_adds_nothing_under_a_later_one(case):
    """Handle A (this pipeline) wraps ``sdpa``, handle B (another pipeline) wraps A's wrapper;
    removing A leaves its wrapper inside B's, and it must then pass every call through."""
    from prunevid_bench.pipeline import load_pipeline

    pipe, prepared, base = case
    other = load_pipeline("tiny", device="cpu", dtype="float32")
    try:
        pipe.remove_stages()
        run(case, **TOME, **{"tome.proportional_attention": True})  # A
        other.run(other.prepare(video_frames(), QUESTION), **TOME, **{"tome.proportional_attention": True,
                                                                       "generation.max_new_tokens": 2})  # B
        pipe.remove_stages()  # A goes; its wrapper stays under B's
        again = run(case)
        assert again.result.generated_token_ids == base.result.generated_token_ids
        torch.testing.assert_close(again.logits, base.logits, rtol=0, atol=0)
    finally:
        other.remove_stages()
