"""Shared checks of a visual-token method on the tiny model of each family (float32, CPU): the
LLM input rebuilt by hand from the baseline's visual tokens and the pure algorithm, and the
cache-free layer-by-layer reference (with DeepStack added by hand on Qwen3-VL), plus the vision
tower's attention recomputed independently with transformers' own eager attention function.

Used by tests/test_visionzip.py, tests/test_fastvid.py, tests/test_flashvid.py."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from prunevid_bench import splice
from prunevid_bench.families import family_of
from prunevid_bench.pipeline import _with_overrides, load_pipeline
from prunevid_bench.tokens import weighted_rows
from prunevid_bench.verify.reference import reference_for, trace

FAMILIES = ("tiny", "tiny-qwen2vl", "tiny-qwen3vl")  # Qwen2.5-VL, Qwen2-VL, Qwen3-VL
QUESTION = "What is happening in this video?"
MAX_NEW = 3
T, N = 4, 16  # 8 frames of 112 px (Qwen2/2.5-VL) or 128 px (Qwen3-VL): 4 temporal steps of 4 x 4 tokens


def frames(name: str, seed: int = 0) -> np.ndarray:
    side = 128 if "qwen3" in name else 112
    out = np.random.default_rng(seed).integers(0, 256, (8, side, side, 3), dtype=np.uint8)
    out[:, : side // 4] = out[0, : side // 4]  # a static strip
    out[4:6] = out[2:4]  # a repeated temporal step: something for the temporal segmentation to find
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    pipe = load_pipeline(request.param, device="cpu", dtype="float32", overrides={"generation.max_new_tokens": MAX_NEW})
    prepared = pipe.prepare(frames(request.param), QUESTION)
    yield pipe, prepared, run(pipe, prepared)
    pipe.remove_stages()


def run(pipe, prepared, **overrides):
    return trace(pipe, prepared, _with_overrides(pipe.config.to_dict(), overrides))


def video_place(pipe, prepared) -> torch.Tensor:
    """[T * N] the prompt position of each grid token of the (one) video."""
    ids = prepared.inputs["input_ids"][0]
    runs = family_of(pipe.model).video_runs(pipe.model, ids, prepared.inputs["video_grid_thw"].tolist())
    return splice.run_positions(runs[0])


def grid_tokens(case) -> torch.Tensor:
    """The baseline's visual tokens entering the LLM, [T, N, C]."""
    pipe, prepared, base = case
    return base.embeds[0, video_place(pipe, prepared)].reshape(T, N, -1)


def check_run(case, traced, dest: torch.Tensor, representative: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """``traced`` (a run of one visual-token method) against the operator (dest [T*N],
    representative [M]) computed here by the pure algorithm on the baseline's tokens: the LLM
    input (``rows`` [M, C] the method's own rows, else the operator's means), the positions
    (the representatives' unpruned ids) and the logits of the cache-free reference."""
    pipe, prepared, base = case
    place = video_place(pipe, prepared)
    flat = grid_tokens(case).reshape(T * N, -1)
    if rows is None:
        rows = weighted_rows(flat, dest, torch.ones(T * N), representative.numel())
    ids = prepared.inputs["input_ids"][0]
    is_text = torch.ones(ids.numel(), dtype=torch.bool)
    is_text[place] = False
    source = torch.sort(torch.cat([torch.nonzero(is_text).flatten(), place[representative]])).values
    embeds = base.embeds[:, source].clone()
    embeds[0, torch.searchsorted(source, place[representative])] = rows
    torch.testing.assert_close(traced.embeds, embeds, rtol=0, atol=1e-5)
    full = family_of(pipe.model).prefill_position_ids(pipe.model, prepared.inputs)
    assert torch.equal(traced.position_ids[1:], full[1:, :, source])
    assert torch.equal(traced.state.videos[0].origin.cpu(), dest)  # the operator the patch applied
    if "qwen3" in pipe.model.config.model_type:
        from tests.test_qwen3_vl import N_LAYERS, deepstack_rows, reference

        at, levels = deepstack_rows(pipe, prepared, traced.state)
        ref = reference(pipe.model, traced, prepared, at, levels, N_LAYERS - 1, torch.arange(source.numel()))
    else:
        ref = reference_for(pipe, prepared, traced)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    assert (traced.logits[0] - base.logits[0]).abs().max() > 1e-3  # the reduction changed the computation


def check_identity(case, traced) -> None:
    base = case[2]
    assert traced.result.generated_token_ids == base.result.generated_token_ids
    assert traced.state.tokens_after_visual == T * N
    torch.testing.assert_close(traced.embeds, base.embeds, rtol=0, atol=0)
    torch.testing.assert_close(traced.logits, base.logits, rtol=0, atol=1e-5)


@torch.no_grad()
def eager_vision_scores(pipe, prepared) -> dict[str, torch.Tensor]:
    """{rule: [T, N]} recomputed here with transformers' own eager attention of the tower's last
    block, from its input: ``received`` (softmax weights per temporal step, mean over heads and
    queries, mean per merge unit) and ``pseudo_cls`` (FastVID's rule written on the whole video:
    q viewed [H, T, hw, d] and averaged over hw, k viewed [H, T, hw/4, 4, d] and averaged)."""
    model = pipe.model
    fam = family_of(model)
    block = fam.vision_encoder(model).blocks[-1]
    seen = {}

    def grab(module, args, kwargs):
        seen["x"], seen["pe"] = args[0].clone(), kwargs["position_embeddings"]

    hook = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.model.get_video_features(prepared.inputs["pixel_values_videos"], prepared.inputs["video_grid_thw"])
    finally:
        hook.remove()
    modeling = importlib.import_module(type(block.attn).__module__)
    attn = block.attn
    x = block.norm1(seen["x"])
    q, k, v = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = modeling.apply_rotary_pos_emb_vision(q, k, *seen["pe"])
    q, k, v = (a.transpose(0, 1).unsqueeze(0) for a in (q, k, v))  # [1, H, P, d]
    hw = x.shape[0] // T
    received = []
    for t in range(T):
        part = slice(t * hw, (t + 1) * hw)
        _, weights = modeling.eager_attention_forward(attn, q[:, :, part], k[:, :, part], v[:, :, part], None, attn.scaling)
        received.append(weights[0].mean(0).mean(0).view(-1, 4).mean(-1))
    heads, d = q.shape[1], q.shape[-1]
    cls_q = q[0].reshape(heads, T, hw, d).mean(-2)  # [H, T, d]
    unit_k = k[0].reshape(heads, T, hw // 4, 4, d).mean(-2)  # [H, T, U, d]
    pseudo = torch.softmax(torch.einsum("htd,htud->htu", cls_q, unit_k) / d**0.5, dim=-1).mean(0)  # [T, U]
    order = fam.merger_order(model, prepared.inputs["video_grid_thw"])
    out = {}
    for rule, rows in (("received", torch.cat(received)), ("pseudo_cls", pseudo.reshape(-1))):
        raster = torch.empty_like(rows)
        raster[order] = rows
        out[rule] = raster.reshape(T, N)
    return out
