"""The cache-free reference of a merge at layer K (the ``merge_nearest`` control, any
``LayerReduction`` with ``merge_into``), layer by layer: the prompt runs through layers 0..K on
every row; each merged row is the size-weighted mean of its members (or the mean with the
method's own weights, HoliTom's halving) in the hidden states and in layers 0..K's keys and values
(post-rotary, as cached; or, when the method leaves that cache whole, their own keys and values);
every generated token recomputes from scratch, attending in layers 0..K to those prompt keys and
values (attention written out) and in K+1.. to the merged rows."""

from __future__ import annotations

import torch

from prunevid_bench.families import family_of
from prunevid_bench.patch.layer import merge_along


def _normed(family, attn, which: int, x):
    """``x`` [1, n, heads, d] through the family's QK-norm (Qwen3: ``q_norm``/``k_norm`` per head,
    before rotary) when it has one (``Family.query_key`` names the norms instead of the projections)."""
    module = family.query_key(attn)[which]
    return x if module is (attn.q_proj, attn.k_proj)[which] else module(x)


def project_kv(layer, family, x, rotary):
    """The keys (after rotary) and values a layer caches for the rows ``x`` [1, n, D]."""
    attn = family.attention(layer)
    a = layer.input_layernorm(x)
    n, d = x.shape[1], attn.head_dim
    k = _normed(family, attn, 1, attn.k_proj(a).view(1, n, -1, d)).transpose(1, 2)
    v = attn.v_proj(a).view(1, n, -1, d).transpose(1, 2)
    _, k = family.apply_rotary(k, k, *rotary)
    return k, v


def layer_on_new_rows(layer, family, x, rotary, past_k, past_v):
    """One decoder layer for the rows ``x`` [1, t, D] that see all of ``past_k/v`` and each other
    causally: attention written out (eager, grouped heads repeated), then the MLP."""
    attn = family.attention(layer)
    a = layer.input_layernorm(x)
    t, d = x.shape[1], attn.head_dim
    q = _normed(family, attn, 0, attn.q_proj(a).view(1, t, -1, d)).transpose(1, 2)
    k, v = project_kv(layer, family, x, rotary)
    q, _ = family.apply_rotary(q, q, *rotary)
    keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    rep = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    logits = (q @ keys.transpose(-1, -2)).float() * attn.scaling
    n_past = past_k.shape[2]
    future = torch.arange(n_past + t, device=x.device).view(1, -1) > (n_past + torch.arange(t, device=x.device)).view(-1, 1)
    out = torch.softmax(logits.masked_fill(future, float("-inf")), -1).to(values.dtype) @ values
    x = x + attn.o_proj(out.transpose(1, 2).reshape(1, t, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


@torch.no_grad()
def merged_reference(model, embeds, mrope, dest, sizes, keep_index, k, tokens, first_decode_pos, deepstack=None,
                     mode: str = "merge", compact: bool = True):
    """Logits [T, vocab] behind ``tokens``: ``dest`` [L] the output row of every LLM-input row
    (-1 dropped), ``sizes`` [L] their weights, ``keep_index`` [L'] the rows kept (whose ids the
    merged rows take), ``k`` the last layer on every row. ``deepstack`` (rows [R], levels [D] of
    [R, C]): level i added after layer i at those rows; after K at the merged rows, each the
    size-weighted mean of its DeepStack members' levels (``mode`` representative: the kept row's own).
    ``compact=False``: layers 0..k keep every prompt row's own keys and values (the merge is in the
    hidden states only)."""
    from prunevid_bench.verify.reference import _add_level, _layer, additive_mask

    if family_of(model).is_hybrid(model):
        return hybrid_merged_reference(model, embeds, mrope, dest.to(embeds.device), sizes.to(embeds.device),
                                       keep_index.to(embeds.device), k, tokens, first_decode_pos.to(embeds.device))
    lm, family = family_of(model).language_model(model), family_of(model)
    layers, device, dtype = list(lm.layers), embeds.device, embeds.dtype
    dest, sizes, keep_index = dest.to(device), sizes.to(device), keep_index.to(device)
    mrope, first_decode_pos = mrope.to(device), first_decode_pos.to(device)
    n_out = keep_index.numel()
    x, rotary = embeds, lm.rotary_emb(embeds, mrope)
    mask = additive_mask(torch.ones(embeds.shape[1], embeds.shape[1], dtype=torch.bool, device=device).tril(), dtype)
    rows, levels = deepstack if deepstack is not None else (torch.zeros(0, dtype=torch.long), [])
    rows, levels = rows.to(device), [level.to(device, dtype) for level in levels]
    cached = []
    for i, layer in enumerate(layers[: k + 1]):  # the prompt on every token, and its merged keys/values
        kk, vv = project_kv(layer, family, x, rotary)
        cached.append((merge_along(kk, dest, sizes, n_out, -2), merge_along(vv, dest, sizes, n_out, -2)) if compact
                      else (kk, vv))
        x = _add_level(_layer(layer, x, mask, rotary), i, rows, levels)
    prompt = merge_along(x, dest, sizes, n_out, 1)
    later = []  # the levels still due after K, on the merged rows
    for level in levels[k + 1:]:
        full = torch.zeros(embeds.shape[1], level.shape[-1], device=device, dtype=torch.float32)
        full[rows] = level.float()
        if mode == "merge":  # the size-weighted mean over the merged row's members that carry levels
            weight = torch.zeros(embeds.shape[1], device=device)
            weight[rows] = sizes[rows].float()
            went = dest >= 0
            num = torch.zeros(n_out, level.shape[-1], device=device).index_add_(0, dest[went], full[went] * weight[went, None])
            den = torch.zeros(n_out, device=device).index_add_(0, dest[went], weight[went])
            later.append((num / den.clamp(min=1e-12)[:, None]).to(dtype))
        else:
            later.append(full[keep_index].to(dtype))
    out = []
    for t in range(len(tokens)):
        gen = lm.embed_tokens(torch.tensor(tokens[:t], dtype=torch.long, device=device)).unsqueeze(0).to(dtype)
        gen_pos = first_decode_pos + torch.arange(t, device=device).view(1, 1, -1)
        if t:
            rotary_gen = lm.rotary_emb(gen, gen_pos)
            for layer, (kk, vv) in zip(layers[: k + 1], cached):
                gen = layer_on_new_rows(layer, family, gen, rotary_gen, kk, vv)
        y = torch.cat([prompt, gen], 1)
        pos = torch.cat([mrope[..., keep_index], gen_pos], -1)
        rotary_y, n = lm.rotary_emb(y, pos), y.shape[1]
        mask = additive_mask(torch.ones(n, n, dtype=torch.bool, device=device).tril(), dtype)
        for i, layer in enumerate(layers[k + 1 :]):
            y = _add_level(_layer(layer, y, mask, rotary_y), i, torch.arange(n_out, device=device), later)
        out.append(model.lm_head(lm.norm(y[:, -1]))[0].float().cpu())
    return torch.stack(out)


def merge_dest(state, n: int, keep_index: torch.Tensor, merged: bool = True) -> torch.Tensor:
    """[n] the output row of every LLM-input row: the kept rows their own, a merged visual token
    its kept row's (``merged=False``: dropped instead), from the method's ``kept_visual`` and
    ``merged_into`` alone."""
    dest = torch.full((n,), -1, dtype=torch.long)
    dest[keep_index] = torch.arange(keep_index.numel())
    if merged:
        into, visual = state.merged_into.cpu(), state.visual_positions.cpu()
        goes = into >= 0
        dest[visual[goes]] = dest[visual[state.kept_visual.cpu()][into[goes]]]
    return dest


class _PastKV:
    """A stand-in cache for one full-attention layer: the merged prompt's keys and values, to
    which ``update`` appends a step's own (what the patch's compacted cache holds)."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def update(self, keys, values, layer_idx, **kwargs):
        return torch.cat([self.keys, keys], -2), torch.cat([self.values, values], -2)


@torch.no_grad()
def hybrid_merged_reference(model, embeds, mrope, dest, sizes, keep_index, k, tokens, first_decode_pos):
    """``merged_reference`` on a hybrid model (Qwen3.5), from scratch: the prompt through layers
    0..K on every row (the full-attention layers' keys/values, after QK-norm and rotary, then
    merged size-weighted like the hidden states); every generated token runs through the full-attention layers 0..K
    against those merged keys/values, through the linear layers 0..K after the whole prompt
    (their state holds every row), and through K+1.. with the merged prompt."""
    from prunevid_bench.verify.reference import additive_mask

    family = family_of(model)
    lm, full = family.language_model(model), set(family.attention_layers(model.config))
    x, n, n_out = embeds, embeds.shape[1], keep_index.numel()

    def causal(q, kv):  # q new rows after kv - q earlier ones
        return additive_mask(torch.ones(q, kv, dtype=torch.bool, device=x.device).tril(kv - q), x.dtype)

    rotary, inputs, cached = lm.rotary_emb(x, mrope), [], {}
    for i, layer in enumerate(lm.layers[: k + 1]):
        inputs.append(x)
        if i in full:
            kk, vv = project_kv(layer, family, x, rotary)
            cached[i] = (merge_along(kk, dest, sizes, n_out, -2), merge_along(vv, dest, sizes, n_out, -2))
        x = layer(x, attention_mask=causal(n, n) if i in full else None, position_embeddings=rotary)
    prompt, out = merge_along(x, dest, sizes, n_out, 1), []
    for t in range(len(tokens)):
        gen = lm.embed_tokens(torch.tensor(tokens[:t], dtype=torch.long, device=x.device)).unsqueeze(0).to(x.dtype)
        gen_pos = first_decode_pos + torch.arange(t, device=x.device).view(1, 1, -1)
        if t:
            rot = lm.rotary_emb(gen, gen_pos)
            for i, layer in enumerate(lm.layers[: k + 1]):
                if i in full:
                    gen = layer(gen, attention_mask=causal(t, n_out + t), position_embeddings=rot, cache=_PastKV(*cached[i]))
                else:
                    whole = torch.cat([inputs[i], gen], 1)  # a linear layer reads no rotary
                    gen = layer(whole, attention_mask=None, position_embeddings=rotary)[:, -t:]
        y = torch.cat([prompt, gen], 1)
        rot, m = lm.rotary_emb(y, torch.cat([mrope[..., keep_index], gen_pos], -1)), y.shape[1]
        for i, layer in enumerate(lm.layers[k + 1 :], start=k + 1):
            y = layer(y, attention_mask=causal(m, m) if i in full else None, position_embeddings=rot)
        out.append(model.lm_head(lm.norm(y[:, -1]))[0].float().cpu())
    return torch.stack(out)
