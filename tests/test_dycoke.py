"""DyCoke: TTM and the dynamic KV pruning against naive transcriptions of the original's code
(written here as it is written there, on planted inputs), exact counts, nothing to reduce ≡
vanilla, and the runs on the tiny models of each family against a cache-free reference that
recomputes every decoding step with no cache over the positions that step kept (Qwen3-VL: with
its DeepStack levels added by hand). All float32 on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import DecodeContext, get_method
from prunevid_bench.stages import dycoke as d
from prunevid_bench.verify.reference import reference_for
from tests.test_stage2 import QUESTION, run_traced, video_frames


# ----------------------------------------------------------------------------- naive transcriptions
def naive_ttm(x: torch.Tensor, k: float):
    """``dycole_ttm`` as the original writes it, carrying each token's flat index beside it."""
    t, n, _ = x.shape
    flat, index = x.reshape(t * n, -1), torch.arange(t * n)
    num_frames, keep_ratio = flat.shape[0] // n, 1 - k
    sims = []
    for i in range(0, num_frames - 1, 2):
        a, b = F.normalize(flat[i * n : (i + 1) * n], p=2, dim=1), F.normalize(flat[(i + 1) * n : (i + 2) * n], p=2, dim=1)
        sims.append(F.cosine_similarity(a, b, dim=1))
    out = []
    for i in range(0, num_frames - 1, 2):
        keep = sims[i // 2].topk(int(keep_ratio * n), largest=False).indices
        out.append(index[i * n : (i + 1) * n])
        out.append(index[(i + 1) * n : (i + 2) * n][keep])
    for i in range(0, num_frames - 4, 4):
        sim = F.cosine_similarity(flat[i * n : (i + 1) * n], flat[(i + 2) * n : (i + 3) * n], dim=1)
        keep = sim.topk(int(keep_ratio * n), largest=False).indices
        out[i] = index[i * n : (i + 1) * n]
        out[i + 2] = index[(i + 2) * n : (i + 3) * n][keep]
    return torch.cat(out)


def naive_kv_steps(rows: list[torch.Tensor], start: int, length: int, p: float, seq_len: int):
    """``dycoke_pruning`` + ``update_cache`` over the decoding steps: the attention rows (head
    mean) of the new token; returns each step's ``kv_cache`` list (None: the whole cache)."""
    previous, out = None, []
    for row in rows:
        image = row[start : start + length]
        sim = F.cosine_similarity(image, previous, dim=0) if previous is not None else 0
        previous, kv = image, None
        if sim < 0.9:
            top = torch.topk(image, int(length * (1 - p)), sorted=False)[1] + start
            full = torch.arange(seq_len)
            kv = torch.cat([full[:start], top, full[start + length :]]).tolist()
        out.append(kv)
    return out


def planted(t: int, seed: int = 0) -> torch.Tensor:
    """t steps of 16 tokens; each odd step repeats the step before except tokens 3 and 9, which move."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 16, 8, generator=g)
    x[1::2] = x[0::2][: t // 2] + 0.05 * torch.randn(t // 2, 16, 8, generator=g)
    x[1::2, [3, 9]] = torch.randn(t // 2, 2, 8, generator=g)
    return x


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("t,k", [(8, 0.75), (9, 0.7), (16, 0.5), (5, 0.875)])
def test_ttm_equals_the_naive_transcription_and_the_count_formula(t, k):
    x = planted(t)
    n_keep = d.ttm_keep_per_step(16, k)
    ours = d.ttm_keep(x, n_keep)
    assert torch.equal(ours, torch.sort(naive_ttm(x, k)).values)  # the same tokens, in position order
    assert ours.numel() == d.ttm_count(t, 16, n_keep)
    odd = ours.reshape(-1)[(ours // 16) % 2 == 1] % 16
    if n_keep == 2:
        assert sorted(set(odd.tolist())) == [3, 9]  # the changed tokens of each repeated pair are what stays


def test_odd_step_is_dropped_by_default_and_kept_whole_on_request():
    x = planted(9)
    dropped, kept = d.ttm_keep(x, 4), d.ttm_keep(x, 4, odd_step="keep")
    assert int((dropped // 16 == 8).sum()) == 0 and int((kept // 16 == 8).sum()) == 16
    assert kept.numel() - dropped.numel() == 16 == d.ttm_count(9, 16, 4, "keep") - d.ttm_count(9, 16, 4)
    assert d.ttm_keep(planted(1)[:1], 4).numel() == 16  # one step: whole (the original raises at T <= 4)


def test_ttm_budget_is_the_closest_reachable_count():
    for t, frac in [(8, 0.5), (16, 0.6), (4, 0.75)]:
        m = d.ttm_budget(t, 16, frac)
        best = min(abs(d.ttm_count(t, 16, j) - round(frac * t * 16)) for j in range(17))
        assert abs(d.ttm_count(t, 16, m) - round(frac * t * 16)) == best


def test_kv_pruning_equals_the_naive_transcription_over_steps():
    """Planted rows: step 1 repeats step 0's attention (stable: the whole cache), step 2 moves it."""
    g = torch.Generator().manual_seed(0)
    start, length, seq = 5, 100, 120
    base = torch.rand(seq, generator=g)
    rows = [base, base + 0.001 * torch.rand(seq, generator=g), torch.rand(seq, generator=g)]
    want = naive_kv_steps(rows, start, length, 0.8, seq)
    assert [w is None for w in want] == [False, True, False]
    assert d.kv_keep_count(100, 0.8) == 19  # 1 - 0.8 = 0.19999999999999996, as the original
    previous = None
    for row, w in zip(rows, want):
        got = d.kv_keep(row[start : start + length], previous, 19)
        previous = row[start : start + length]
        assert (got is None) == (w is None)
        if got is not None:
            assert sorted(w) == [*range(start), *(got + start).tolist(), *range(start + length, seq)]


def test_decode_leaves_the_last_visual_token_outside_the_span_as_the_original():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 4, generator=g), torch.randn(1, 30, 4, generator=g)
    visual = torch.arange(4, 24)
    ctx = DecodeContext(q=q, k=k, visual=visual, scaling=0.5, step=0, memory={})
    cfg = get_method("dycoke").config(prune_ratio=0.5)
    kept = get_method("dycoke").decode(ctx, cfg)
    weights = torch.softmax((q @ k.repeat(2, 1, 1).transpose(1, 2)) * 0.5, dim=-1)[:, 0].mean(0)  # calculate_attention_weights
    top = weights[4 : 4 + 19].topk(int(19 * 0.5)).indices
    assert torch.equal(kept, torch.cat([torch.sort(top).values, torch.tensor([19])]))


# ----------------------------------------------------------------------------- the models
@pytest.fixture(scope="module", params=["tiny", "tiny-qwen2vl"])
def case(request):
    from prunevid_bench.pipeline import load_pipeline

    pipe = load_pipeline(request.param, device="cpu", dtype="float32", overrides={"generation.max_new_tokens": 5})
    prepared = pipe.prepare(video_frames(), QUESTION)
    yield pipe, prepared, run_traced(pipe, prepared)
    pipe.remove_stages()


def knob(fraction: float) -> dict:
    method = get_method("dycoke")
    return {"dycoke.enabled": True, **{f"dycoke.{k}": v for k, v in method.budget_knob(method.config(), fraction).settings.items()}}


def test_a_budget_of_one_reduces_nothing(case):
    pipe, prepared, base = case
    out = run_traced(pipe, prepared, **knob(1.0))
    assert out.result.tokens_after_visual_methods == 64 and out.result.methods == ["dycoke"]
    assert out.result.generated_token_ids == base.result.generated_token_ids
    torch.testing.assert_close(out.logits, base.logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("over", [{}, {"dycoke.decode_layer": 2, "dycoke.prune_ratio": 0.5, "dycoke.on_stable": "reuse"},
                                  {"dycoke.decode_layer": 1, "dycoke.threshold": 1.0}])
def test_run_counts_and_the_cache_free_decode_reference(case, over):
    pipe, prepared, base = case
    out = run_traced(pipe, prepared, **{"dycoke.enabled": True, **over})
    r, st = out.result, out.state
    assert r.tokens_after_visual_methods == d.ttm_count(4, 16, 4) == 40  # exact count
    fields = r.method_fields
    steps = len(r.generated_token_ids) - 1
    assert len(fields["decode_attended_per_step"]) == len(fields["decode_cached_per_step"]) == steps
    pruned = [kept is not None for kept in st.decode_kept_steps]
    assert fields["decode_steps_pruned"] == sum(pruned) >= 1
    span = 39  # the last visual token stays outside the span
    for kept, attended, cached in zip(st.decode_kept_steps, fields["decode_attended_per_step"], fields["decode_cached_per_step"]):
        hidden = span - d.kv_keep_count(span, get_method("dycoke").config(**{k.split(".")[1]: v for k, v in over.items()}).prune_ratio)
        assert attended == (cached if kept is None else cached - hidden)
    assert fields["decode_kv_bytes_attended"] < fields["decode_kv_bytes_full"]
    assert [x.acts for x in r.reductions] == ["visual_tokens", "decode"]
    ref = reference_for(pipe, prepared, out)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    unpruned = reference_for(pipe, prepared, out, prune=False)
    assert (unpruned - out.logits).abs().max() > 1e-3  # the check sees the pruning


def test_eager_attention_slices_the_decode_mask(case):
    pipe, prepared, _ = case
    pipe.model.set_attn_implementation("eager")
    try:
        out = run_traced(pipe, prepared, **{"dycoke.enabled": True, "dycoke.decode_layer": 1})
        ref = reference_for(pipe, prepared, out)
    finally:
        pipe.model.set_attn_implementation("sdpa")
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)


def test_an_llm_layer_method_beside_the_decoding_stage_is_refused(case):
    pipe, prepared, _ = case
    with pytest.raises(PruneVidError, match="decoding stage cannot run with an LLM-layer method"):
        run_traced(pipe, prepared, **{"dycoke.enabled": True, "fastv.enabled": True, "fastv.pruning_layer": 1})


def test_preset_runs_from_the_cli_and_records_the_decode_cost(clip8, tmp_path):
    from prunevid_bench.cli import app

    res = CliRunner().invoke(app, ["run", str(clip8), "What is happening?", "--model", "tiny", "--num-frames", "8",
                                   "--max-new-tokens", "4", "--preset", "dycoke-25", "--results-dir", str(tmp_path),
                                   "--json", "-q"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["tokens_after_visual_methods"] == d.ttm_count(4, 16, 4)
    assert len(record["decode_attended_per_step"]) == record["generated_tokens"] - 1
    assert [r["acts"] for r in record["reductions"]] == ["visual_tokens", "decode"]
    listed = CliRunner().invoke(app, ["methods"])
    assert any(line.startswith("dycoke [visual_tokens|decode]") for line in listed.output.splitlines())


# ----------------------------------------------------------------------------- Qwen3-VL (DeepStack)
@pytest.mark.parametrize("model", ["tiny-qwen3vl", "tiny-qwen3vl-moe"])
def test_qwen3_vl_run_matches_the_decode_reference_with_deepstack(model):
    from prunevid_bench.pipeline import load_pipeline
    from tests.test_qwen3_vl import deepstack_rows, frames

    pipe = load_pipeline(model, device="cpu", dtype="float32", overrides={"generation.max_new_tokens": 5})
    prepared = pipe.prepare(frames(), QUESTION)
    out = run_traced(pipe, prepared, **{"dycoke.enabled": True, "dycoke.decode_layer": 2, "dycoke.threshold": 1.0})
    st = out.state
    assert st.tokens_after_visual < st.tokens_in_prompt and sum(k is not None for k in st.decode_kept_steps) >= 1
    rows, levels = deepstack_rows(pipe, prepared, st)
    ref = reference_for(pipe, prepared, out, deepstack=(rows, levels))
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    without = reference_for(pipe, prepared, out, deepstack=(rows, levels), prune=False)
    assert (without - out.logits).abs().max() > 1e-3
    base, same = run_traced(pipe, prepared), run_traced(pipe, prepared, **knob(1.0))  # nothing to reduce
    assert same.result.generated_token_ids == base.result.generated_token_ids
    torch.testing.assert_close(same.logits, base.logits, rtol=0, atol=1e-5)
    pipe.remove_stages()


def test_generate_runs_the_decoding_stage_as_the_engine_does(case):
    """transformers' ``generate`` passes its own cache through the same hooks: the same logits."""
    pipe, prepared, base = case
    out = run_traced(pipe, prepared, **{"dycoke.enabled": True, "dycoke.threshold": 1.0, "dycoke.decode_layer": 1})
    with torch.no_grad():
        gen = pipe.model.generate(**prepared.inputs, max_new_tokens=len(out.logits), do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    torch.testing.assert_close(torch.cat(gen.logits).float(), out.logits, rtol=0, atol=1e-5)
    assert sum(k is not None for k in pipe._handle.state.decode_kept_steps) >= 1  # generate's own steps pruned
    assert (out.logits - base.logits[: len(out.logits)]).abs().max() > 1e-3


def test_a_matched_budget_sweep_runs_holitom_and_dycoke(tmp_path):
    """Both are lines of ``--methods``: at B = 1 nothing is reduced (DyCoke's knob also turns its
    decoding stage off), at B = 0.5 each keeps what its knob promised (DyCoke exactly)."""
    import csv

    from prunevid_bench.cli import EXIT_INCOMPLETE, app
    from prunevid_bench.toy.world import generate_dataset

    toy = generate_dataset(tmp_path / "toy", 1, seed=3)
    res = CliRunner().invoke(app, ["sweep", "--methods", "holitom,dycoke", "--budgets", "0.5,1", "--dataset", str(toy),
                                   "--limit", "1", "--model", "tiny", "--max-new-tokens", "3", "--num-frames", "8",
                                   "--results-dir", str(tmp_path / "runs")])
    assert res.exit_code in (0, EXIT_INCOMPLETE), res.output
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    rows = {r["cell"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    assert float(rows["holitom,budget=1.0"]["kept_tokens"]) == float(rows["dycoke,budget=1.0"]["kept_tokens"]) == 64
    assert float(rows["dycoke,budget=0.5"]["kept_tokens"]) == d.ttm_count(4, 16, d.ttm_budget(4, 16, 0.5)) == 32
    assert float(rows["holitom,budget=0.5"]["kept_tokens"]) < 64
    cells = json.loads((sweep_dir / "sweep.json").read_text())["cells"]
    assert next(c for c in cells if c["name"] == "dycoke,budget=1.0")["overrides"]["dycoke.kv_prune"] is False
