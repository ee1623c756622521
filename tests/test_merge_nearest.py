"""A merge at layer K (the ``merge_nearest`` control) against a cache-free reference computed
layer by layer, on both tiny families: the prompt runs through layers 0..K on every token; each
merged row is the size-weighted mean of its members in the hidden states and in layers 0..K's
keys and values (post-rotary, as cached); every generated token recomputes from scratch,
attending in layers 0..K to the merged prompt keys and values and in K+1.. to the merged rows."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.families import family_of
from prunevid_bench.patch.layer import merge_along
from tests.test_stage2 import additive_mask, pipes, prefill_position_ids, run_traced, tiny_name  # noqa: F401


def merge(k, keep=0.4) -> dict:
    return {"merge_nearest.enabled": True, "merge_nearest.pruning_layer": k, "merge_nearest.keep_ratio": keep}


def project_kv(layer, family, x, rotary):
    """The keys (after rotary) and values a layer caches for the rows ``x`` [1, n, D]."""
    attn = layer.self_attn
    a = layer.input_layernorm(x)
    n, d = x.shape[1], attn.head_dim
    k = attn.k_proj(a).view(1, n, -1, d).transpose(1, 2)
    v = attn.v_proj(a).view(1, n, -1, d).transpose(1, 2)
    _, k = family.apply_rotary(k, k, *rotary)
    return k, v


def layer_on_new_rows(layer, family, x, rotary, past_k, past_v):
    """One decoder layer for the rows ``x`` [1, t, D] that see all of ``past_k/v`` and each other
    causally: attention written out (eager, grouped heads repeated), then the MLP."""
    attn = layer.self_attn
    a = layer.input_layernorm(x)
    t, d = x.shape[1], attn.head_dim
    q = attn.q_proj(a).view(1, t, -1, d).transpose(1, 2)
    k, v = project_kv(layer, family, x, rotary)
    q, _ = family.apply_rotary(q, q, *rotary)
    keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    rep = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    logits = q @ keys.transpose(-1, -2) * attn.scaling
    n_past = past_k.shape[2]
    future = torch.arange(n_past + t).view(1, -1) > (n_past + torch.arange(t)).view(-1, 1)
    out = torch.softmax(logits.masked_fill(future, float("-inf")), -1) @ values
    x = x + attn.o_proj(out.transpose(1, 2).reshape(1, t, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


@torch.no_grad()
def merged_reference(model, embeds, mrope, dest, sizes, keep_index, k, tokens, first_decode_pos):
    lm, family = model.model.language_model, family_of(model)
    n_out = keep_index.numel()
    x, rotary = embeds, lm.rotary_emb(embeds, mrope)
    mask = additive_mask(torch.ones(embeds.shape[1], embeds.shape[1], dtype=torch.bool).tril())
    cached = []
    for layer in lm.layers[: k + 1]:  # the prompt on every token, and its merged keys/values
        kk, vv = project_kv(layer, family, x, rotary)
        cached.append((merge_along(kk, dest, sizes, n_out, -2), merge_along(vv, dest, sizes, n_out, -2)))
        x = layer(x, attention_mask=mask, position_embeddings=rotary, position_ids=None, past_key_values=None)
    prompt = merge_along(x, dest, sizes, n_out, 1)
    out = []
    for t in range(len(tokens)):
        gen = lm.embed_tokens(torch.tensor(tokens[:t], dtype=torch.long)).unsqueeze(0)
        gen_pos = first_decode_pos + torch.arange(t).view(1, 1, -1)
        if t:
            rotary_gen = lm.rotary_emb(gen, gen_pos)
            for layer, (kk, vv) in zip(lm.layers[: k + 1], cached):
                gen = layer_on_new_rows(layer, family, gen, rotary_gen, kk, vv)
        y = torch.cat([prompt, gen], 1)
        pos = torch.cat([mrope[..., keep_index], gen_pos], -1)
        rotary_y, n = lm.rotary_emb(y, pos), y.shape[1]
        mask = additive_mask(torch.ones(n, n, dtype=torch.bool).tril())
        for layer in lm.layers[k + 1 :]:
            y = layer(y, attention_mask=mask, position_embeddings=rotary_y, position_ids=None, past_key_values=None)
        out.append(model.lm_head(lm.norm(y[:, -1]))[0].float())
    return torch.stack(out)


def reference(pipe, prepared, traced, k, merged=True):
    st = traced.state
    n = traced.embeds.shape[1]
    dest = torch.full((n,), -1, dtype=torch.long)
    dest[st.keep_index] = torch.arange(st.keep_index.numel())
    if merged:
        goes = st.merged_into >= 0
        dest[st.visual_positions[goes]] = dest[st.visual_positions[st.kept_visual][st.merged_into[goes]]]
    full = prefill_position_ids(pipe.model, prepared.inputs)
    return merged_reference(pipe.model, traced.embeds, traced.position_ids[1:], dest, torch.ones(n), st.keep_index, k,
                            traced.result.generated_token_ids, full[1:, :, -1:] + 1)


@pytest.mark.parametrize("impl,k", [("sdpa", 1), ("eager", 0), ("sdpa", 2)])
def test_merge_at_layer_k_matches_the_cache_free_reference(pipes, impl, k):
    pipe, prepared = pipes[impl]
    traced = run_traced(pipe, prepared, **merge(k))
    st = traced.state
    assert 0 < st.tokens_after < st.tokens_before and bool((st.merged_into >= 0).all())
    assert torch.bincount(st.merged_into).max() > 1  # some kept rows really average several tokens
    ref = reference(pipe, prepared, traced, k)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    dropped = reference(pipe, prepared, traced, k, merged=False)  # the same rows kept, nothing averaged
    assert (dropped - traced.logits).abs().max() > 1e-3


def test_merge_nearest_is_listed_and_runs_from_the_cli(clip8, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["methods"])
    assert listed.exit_code == 0 and any(line.startswith("merge_nearest [llm_layer]") for line in listed.output.splitlines())
    res = runner.invoke(app, ["run", str(clip8), "What is happening?", "--model", "tiny", "--num-frames", "8",
                              "--max-new-tokens", "2", "--set", "merge_nearest.enabled=true",
                              "--set", "merge_nearest.pruning_layer=1", "--results-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
