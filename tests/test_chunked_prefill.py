"""Chunked prefill (``prefill.chunk_tokens``, ``patch.chunked``) on the tiny models, float32, CPU:
for the baseline and every LLM-layer method, under SDPA and eager, a chunked run equals the
unchunked one (the same kept tokens, the same generated tokens, logits within 1e-4) and the
cache-free layer-by-layer reference; with chunk sizes that divide the prompt and that do not,
with a chunk boundary inside the video and one inside the question (checked, not assumed); on
Qwen3-VL with its DeepStack levels too. And the chunks are real: no attention call of the
prefill sees more than N queries, and a wrong mask would be caught."""

from __future__ import annotations

import pytest
import torch

from prunevid_bench.models.tiny import VISION_END_ID
from prunevid_bench.pipeline import load_pipeline
from prunevid_bench.verify.reference import reference_for
from tests.test_stage2 import MAX_NEW, QUESTION, layout, run_traced, video_frames

STAGE1 = {"stage1.enabled": True, "cluster_ratio": 0.5, "tau": 0.8, "min_cluster_tokens": 4}
METHODS = {  # every LLM-layer method, a visual-token method before one, and one alone
    "baseline": {},
    "stage2": {"stage2.enabled": True, "pruning_layer": 1, "keep_ratio": 0.4},
    "stage2-attention-k0": {"stage2.enabled": True, "pruning_layer": 0, "keep_ratio": 0.4, "score": "attention"},
    "stage1+stage2": {**STAGE1, "stage2.enabled": True, "pruning_layer": 2, "keep_ratio": 0.5},
    "fastv": {"fastv.enabled": True, "fastv.pruning_layer": 2, "fastv.keep_ratio": 0.5},
    "fastv-compact": {"fastv.enabled": True, "fastv.pruning_layer": 1, "fastv.keep_ratio": 0.5, "fastv.kv_cache": "compact"},
    "random": {"random.enabled": True, "random.pruning_layer": 1, "random.keep_ratio": 0.5},
    "merge_nearest": {"merge_nearest.enabled": True, "merge_nearest.pruning_layer": 1, "merge_nearest.keep_ratio": 0.4},
    # a visual-token method alone, with proportional attention: chunks carry its log-size bias
    "tome+proportional": {"tome.enabled": True, "tome.budget": 0.5, "tome.proportional_attention": True},
}
CHUNKS = (31, 40)  # the 155-token prompt: 31 divides it, 40 does not (see test_the_chunk_sizes_cover_the_cases)


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for impl in ("sdpa", "eager"):
        pipe = load_pipeline("tiny", device="cpu", dtype="float32", attn_implementation=impl,
                             overrides={"generation.max_new_tokens": MAX_NEW})
        out[impl] = (pipe, pipe.prepare(video_frames(), QUESTION))
    yield out
    for pipe, _ in out.values():
        pipe.remove_stages()


def test_the_chunk_sizes_cover_the_cases(pipes):
    """One size divides the prompt, one does not; each puts a boundary inside the video and one
    inside the question (the text after the video's <|vision_end|>)."""
    ids = pipes["sdpa"][1].inputs["input_ids"]
    length = ids.shape[1]
    start, end = layout(ids)
    question = int(torch.nonzero(ids[0] == VISION_END_ID)[-1]) + 1
    assert [length % n == 0 for n in CHUNKS] == [True, False]
    for n in CHUNKS:
        bounds = range(n, length, n)
        assert any(start < b < end for b in bounds) and any(question < b < length - 1 for b in bounds)


_UNCHUNKED: dict = {}


def unchunked(pipes, impl, name):
    if (impl, name) not in _UNCHUNKED:
        pipe, prepared = pipes[impl]
        _UNCHUNKED[impl, name] = run_traced(pipe, prepared, **METHODS[name])
    return _UNCHUNKED[impl, name]


@pytest.mark.parametrize("n", CHUNKS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(METHODS))
def test_chunked_equals_unchunked_and_the_cache_free_reference(pipes, impl, name, n):
    pipe, prepared = pipes[impl]
    whole = unchunked(pipes, impl, name)
    chunked = run_traced(pipe, prepared, **METHODS[name], **{"prefill.chunk_tokens": n})
    assert chunked.result.prefill_chunk_tokens == n and whole.result.prefill_chunk_tokens == 0
    assert chunked.result.generated_token_ids == whole.result.generated_token_ids
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=0, atol=1e-4)
    if name != "baseline":
        assert min(chunked.state.tokens_after, chunked.state.tokens_after_visual) < chunked.state.tokens_in_prompt
    if whole.state is not None and whole.state.kept_visual is not None:
        assert torch.equal(chunked.state.kept_visual, whole.state.kept_visual)
        if chunked.state.merged_into is not None:
            assert torch.equal(chunked.state.merged_into, whole.state.merged_into)
    if chunked.state is not None and chunked.state.key_log_size is not None:
        pipe.remove_stages()  # the reference runs the bare layers: the patch's bias must not be added twice
    torch.testing.assert_close(chunked.logits, reference_for(pipe, prepared, chunked), rtol=0, atol=1e-4)


def test_the_phases_of_the_prefill_are_measured(pipes):
    pipe, prepared = pipes["sdpa"]
    r = run_traced(pipe, prepared, **METHODS["stage2"], **{"prefill.chunk_tokens": 40}).result
    phases = r.prefill_peak_memory_by_phase
    assert list(phases) == ["before_llm", "layers_0_to_k", "method", "layers_after_k", "lm_head"]
    assert max(phases.values()) == r.prefill_peak_memory_bytes and all(v > 0 for v in phases.values())
    base = run_traced(pipe, prepared, **{"prefill.chunk_tokens": 40}).result.prefill_peak_memory_by_phase
    assert list(base) == ["before_llm", "llm_layers", "lm_head"]


@pytest.mark.parametrize("name", ["baseline", "stage2"])
def test_no_attention_call_of_the_prefill_sees_more_than_n_queries(pipes, name, monkeypatch):
    """The chunks are real: every SDPA call of the language model's prefill has at most N
    queries, and every chunk after the first is masked (``is_causal`` would align it top-left)."""
    import torch.nn.functional as F

    from prunevid_bench.families import family_of

    pipe, prepared = pipes["sdpa"]
    text = pipe.model.config.get_text_config()
    calls, real, inside = [], F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, **kwargs):
        if inside:
            calls.append((q.shape[-2], k.shape[-2], attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    lm = family_of(pipe.model).language_model(pipe.model)
    hooks = [lm.register_forward_pre_hook(lambda *a: inside.append(1)), lm.register_forward_hook(lambda *a: inside.clear())]
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    try:
        run_traced(pipe, prepared, **METHODS[name], **{"prefill.chunk_tokens": 40})
    finally:
        for h in hooks:
            h.remove()
    prefill = [c for c in calls if c[0] > 1 or c[1] == 1]
    assert prefill and all(n_q <= 40 for n_q, _, _ in prefill)
    assert all(masked for n_q, n_kv, masked in prefill if n_kv > n_q)
    assert sum(1 for c in prefill if c[1] == c[0]) == text.num_hidden_layers  # one unmasked first chunk per layer


@pytest.mark.parametrize("name", ["baseline", "stage2", "merge_nearest"])
def test_the_masked_row_blocks_equal_the_whole_prefill_too(pipes, name, monkeypatch):
    """Without torch's CPU flash op (or on a GPU) a chunk's SDPA call runs in masked row blocks."""
    from prunevid_bench.patch import chunked

    pipe, prepared = pipes["sdpa"]
    monkeypatch.setattr(chunked, "CPU_FLASH", None)
    monkeypatch.setattr(chunked, "MASK_BLOCK_ELEMENTS", 2000)  # several blocks per chunk
    out = run_traced(pipe, prepared, **METHODS[name], **{"prefill.chunk_tokens": 40})
    whole = unchunked(pipes, "sdpa", name)
    assert out.result.generated_token_ids == whole.result.generated_token_ids
    torch.testing.assert_close(out.logits, whole.logits, rtol=0, atol=1e-4)


def test_a_chunk_that_loses_its_past_or_aligns_top_left_would_be_caught(pipes, monkeypatch):
    """Sensitivity: a chunk attending to its own keys only (the split's first half dropped), or
    with its causal mask aligned top-left (as ``is_causal`` would), gives other logits."""
    from prunevid_bench.patch import chunked

    pipe, prepared = pipes["sdpa"]
    whole = unchunked(pipes, "sdpa", "baseline").logits
    own_only = staticmethod(lambda q, k, v, past, scaling: chunked.CPU_FLASH(
        q, k[:, :, past:], v[:, :, past:], 0.0, True, scale=scaling)[0].transpose(1, 2).contiguous())
    monkeypatch.setattr(chunked.ChunkedPrefill, "_split_attention", own_only)
    assert (run_traced(pipe, prepared, **{"prefill.chunk_tokens": 40}).logits - whole).abs().max() > 1e-3
    monkeypatch.setattr(chunked, "CPU_FLASH", None)
    top_left = staticmethod(lambda first, n_q, n_kv, like: torch.full((n_q, n_kv), torch.finfo(like.dtype).min).triu_(1))
    monkeypatch.setattr(chunked.ChunkedPrefill, "_block_mask", top_left)
    assert (run_traced(pipe, prepared, **{"prefill.chunk_tokens": 40}).logits - whole).abs().max() > 1e-3


def test_a_negative_chunk_size_is_a_one_line_error(clip8, tmp_path):
    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    out = CliRunner().invoke(app, ["run", str(clip8), "What?", "--model", "tiny", "--chunk-tokens", "-1",
                                   "--results-dir", str(tmp_path)])
    assert out.exit_code == 2 and "prefill.chunk_tokens must be >= 0" in out.output and "Traceback" not in out.output


def test_the_cli_records_the_chunk_size(clip8, tmp_path):
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    out = CliRunner().invoke(app, ["run", str(clip8), "What?", "--model", "tiny", "--chunk-tokens", "16",
                                   "--num-frames", "8", "--max-new-tokens", "2", "--json", "--results-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["prefill_chunk_tokens"] == 16 and "llm_layers" in record["prefill_peak_memory_by_phase"]


# ----------------------------------------------------------------------------- Qwen3-VL (DeepStack)
QWEN3_CASES = {
    "baseline": ({}, None),
    "stage2-below-deepstack": ({"stage2.enabled": True, "stage2.pruning_layer": 0, "stage2.keep_ratio": 0.4}, 0),
    "stage2-past-deepstack": ({"stage2.enabled": True, "stage2.pruning_layer": 2, "stage2.keep_ratio": 0.4}, 2),
    "fastv": ({"fastv.enabled": True, "fastv.pruning_layer": 1, "fastv.keep_ratio": 0.5}, 0),
    "stage1+stage2": ({**{k if "." in k else f"stage1.{k}": v for k, v in STAGE1.items()},
                       "stage2.enabled": True, "stage2.pruning_layer": 1, "stage2.keep_ratio": 0.5}, 1),
}


@pytest.fixture(scope="module")
def qwen3_pipes():
    from tests.test_qwen3_vl import MAX_NEW as Q3_NEW
    from tests.test_qwen3_vl import QUESTION as Q3_QUESTION
    from tests.test_qwen3_vl import frames

    out = {}
    for impl in ("sdpa", "eager"):
        pipe = load_pipeline("tiny-qwen3vl", device="cpu", dtype="float32", attn_implementation=impl,
                             overrides={"generation.max_new_tokens": Q3_NEW})
        out[impl] = (pipe, pipe.prepare(frames(), Q3_QUESTION))
    yield out
    for pipe, _ in out.values():
        pipe.remove_stages()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(QWEN3_CASES))
def test_qwen3vl_chunked_equals_unchunked_and_the_reference_with_deepstack(qwen3_pipes, impl, name):
    from tests.test_qwen3_vl import N_LAYERS, deepstack_rows, reference
    from tests.test_qwen3_vl import run_traced as run_q3

    pipe, prepared = qwen3_pipes[impl]
    overrides, k = QWEN3_CASES[name]
    length = prepared.inputs["input_ids"].shape[1]
    n = 29  # divides no prompt length here; boundaries in the video and the question
    assert length % n and length > 3 * n
    whole = run_q3(pipe, prepared, **overrides)
    chunked = run_q3(pipe, prepared, **overrides, **{"prefill.chunk_tokens": n})
    assert chunked.result.generated_token_ids == whole.result.generated_token_ids
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=0, atol=1e-4)
    st = chunked.state
    if k is not None:
        assert torch.equal(st.kept_visual, whole.state.kept_visual)
    rows, levels = deepstack_rows(pipe, prepared, st)
    keep = st.keep_index if k is not None else torch.arange(chunked.embeds.shape[1])
    sees = k is not None and not st.compacted
    ref = reference(pipe.model, chunked, prepared, rows, levels, k if k is not None else N_LAYERS - 1, keep,
                    decode_sees_dropped=sees)
    torch.testing.assert_close(chunked.logits, ref, rtol=0, atol=1e-4)


def test_prunevid_verify_checks_chunking_and_catches_a_broken_chunk(monkeypatch):
    from prunevid_bench.patch import chunked
    from tests.test_verify import verify

    result, (rep,) = verify("--model", "tiny", "--methods", "fastv", "--tokens", "3")
    mine = [c for c in rep["checks"] if c["check"] == "chunked"]
    assert result.exit_code == 0 and [c["method"] for c in mine] == ["none", "fastv"] and all(c["passed"] for c in mine)
    own_only = staticmethod(lambda q, k, v, past, scaling: chunked.CPU_FLASH(
        q, k[:, :, past:], v[:, :, past:], 0.0, True, scale=scaling)[0].transpose(1, 2).contiguous())
    monkeypatch.setattr(chunked.ChunkedPrefill, "_split_attention", own_only)
    result, (rep,) = verify("--model", "tiny", "--methods", "fastv", "--tokens", "3")
    assert result.exit_code != 0 and not any(c["passed"] for c in rep["checks"] if c["check"] == "chunked")
