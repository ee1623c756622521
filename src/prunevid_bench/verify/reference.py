"""The references the proofs compare with, one implementation for the tests and ``prunevid verify``.

``trace`` runs one prepared sample through a pipeline and records what entered the LLM and the
logits behind every generated token. ``cache_free_logits`` recomputes those logits from scratch,
step by step, layer by layer, with no KV cache: the LLM-layer method's drop written as a mask
and a slice, proportional attention as an additive bias on the keys, and a family's DeepStack
levels (Qwen3-VL) added by hand after layers 0..D-1 (``deepstack_inputs``: taken from the towers
themselves and averaged over each merged row's members, never from the patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunevid_bench.families import family_of


@dataclass
class Traced:
    result: object  # RunResult
    state: object  # the patch's SampleState (None when no method ran)
    logits: torch.Tensor  # [steps, vocab] float32: the logits behind every generated token
    embeds: torch.Tensor  # [1, L1, D] what entered the LLM (after the visual-token methods)
    position_ids: torch.Tensor  # (4, 1, L1) ditto
    handle: object = None  # the ReductionHandle (None when no method ran)


def trace(pipe, prepared, cfg) -> Traced:
    """``pipe.run(prepared, config=cfg)`` with two listeners: the language model's input (hooked
    AFTER the patch, so it sees the reduced input) and the lm_head output of every step."""
    model = pipe.model
    handle = pipe._apply_stages(cfg)  # install the patch first: our pre-hook must run after it
    seen, logits = {}, []

    def on_llm_input(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] > 1:
            seen["embeds"] = kwargs["inputs_embeds"].detach().clone()
            seen["position_ids"] = kwargs["position_ids"].clone()

    hooks = [
        family_of(model).language_model(model).register_forward_pre_hook(on_llm_input, with_kwargs=True),
        model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[0, -1].detach().float().cpu())),
    ]
    try:
        result = pipe.run(prepared, config=cfg)
    finally:
        for h in hooks:
            h.remove()
    state = handle.state if handle is not None else None
    return Traced(result, state, torch.stack(logits), seen["embeds"], seen["position_ids"], handle)


def additive_mask(allowed: torch.Tensor, dtype=torch.float32, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """bool [q, k] (True = may attend) -> 4D additive mask [1, 1, q, k] (+ ``key_bias`` [k])."""
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    if key_bias is not None:
        mask = mask + key_bias.float().to(allowed.device)
    return mask.masked_fill(~allowed, lowest).clamp(min=lowest).to(dtype).view(1, 1, *allowed.shape)


@torch.no_grad()
def cache_free_logits(model, embeds, mrope, keep_index, k, tokens, first_decode_pos, decode_sees_dropped=False,
                      key_log_size=None, drop_from_linear=False, deepstack=None):
    """Logits [T, vocab] behind ``tokens`` [T], each recomputed from scratch, with no cache.

    embeds [1, L, D] and mrope (3, 1, L): the LLM input. keep_index [L'] (or None: all): the rows
    that survive the LLM-layer method, which runs after layer ``k``. Step t runs prompt +
    tokens[:t] through layers 0..k with a causal mask in which the generated tokens cannot see
    the dropped rows (unless ``decode_sees_dropped``: the early layers kept their whole cache);
    then keeps the kept prompt rows and the generated ones and runs layers k+1.. on them; final
    norm + lm_head on the last row. Generated token i sits at ``first_decode_pos + i`` (3, 1, 1)
    on every M-RoPE row. ``key_log_size`` [L]: proportional attention, log(size) added to every
    logit of that prompt key in every layer. ``deepstack`` (rows [R], levels [D] of [R, C]): level i
    is added after layer i at those LLM-input rows (after K, at the kept rows' new places).

    A hybrid model's linear-attention layers (Qwen3.5) take no mask: causal by construction, and
    blind to a drop, as the model is -- a linear layer 0..k folded every prompt row into the
    recurrent state the generated tokens continue from. ``drop_from_linear`` (a wrong reference,
    to show the check can fail): their generated rows are computed without the dropped rows.
    """
    family = family_of(model)
    lm = family.language_model(model)
    layers = list(lm.layers)
    attends = set(family.attention_layers(model.config))
    device, dtype = embeds.device, embeds.dtype
    n_prompt = embeds.shape[1]
    if keep_index is None:
        keep_index, k = torch.arange(n_prompt, device=device), len(layers) - 1
    keep_index = keep_index.to(device)
    dropped = torch.ones(n_prompt, dtype=torch.bool, device=device)
    dropped[keep_index] = False
    rows, levels = deepstack if deepstack is not None else (torch.zeros(0, dtype=torch.long), [])
    rows, levels = rows.to(device), [level.to(device, dtype) for level in levels]
    new_place = torch.full((n_prompt,), -1, dtype=torch.long, device=device)
    new_place[keep_index] = torch.arange(keep_index.numel(), device=device)
    later_rows = new_place[rows]  # where each level's row is after the LLM-layer method (-1: dropped)
    out = []
    for t in range(len(tokens)):
        new = lm.embed_tokens(torch.tensor(tokens[:t], dtype=torch.long, device=device)).unsqueeze(0)
        x = torch.cat([embeds, new.to(dtype)], dim=1)
        pos = torch.cat([mrope.to(device), first_decode_pos.to(device) + torch.arange(t, device=device).view(1, 1, -1)], dim=-1)
        n = n_prompt + t
        allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        if not decode_sees_dropped:
            allowed[n_prompt:, :n_prompt] &= ~dropped
        bias = None
        if key_log_size is not None:
            bias = torch.zeros(n, device=device)
            bias[:n_prompt] = key_log_size.to(device).float()
        mask, rotary = additive_mask(allowed, dtype, bias), lm.rotary_emb(x, pos)
        kept = torch.cat([keep_index, torch.arange(n_prompt, n, device=device)])
        for i, layer in enumerate(layers[: k + 1]):
            if i in attends:
                y = _layer(layer, x, mask, rotary)
            elif drop_from_linear and t > 0:
                y = torch.cat([_layer(layer, x, None, rotary)[:, :n_prompt], _layer(layer, x[:, kept], None, rotary)[:, -t:]], 1)
            else:
                y = _layer(layer, x, None, rotary)
            x = _add_level(y, i, rows, levels)
        x, pos = x[:, kept], pos[..., kept]
        bias = None if bias is None else bias[kept]
        allowed = torch.ones(len(kept), len(kept), dtype=torch.bool, device=device).tril()
        mask, rotary = additive_mask(allowed, dtype, bias), lm.rotary_emb(x, pos)
        went = later_rows >= 0
        for i, layer in enumerate(layers[k + 1 :], start=k + 1):
            y = _layer(layer, x, mask if i in attends else None, rotary)
            x = _add_level(y, i, later_rows[went], [lv[went] for lv in levels])
        out.append(model.lm_head(lm.norm(x[:, -1]))[0].float().cpu())
    return torch.stack(out)


def _layer(layer, x, mask, rotary):
    out = layer(x, attention_mask=mask, position_embeddings=rotary, position_ids=None)
    return out[0] if isinstance(out, tuple) else out


def _add_level(x, i: int, rows, levels):
    """``x`` with DeepStack level ``i`` added at ``rows`` (as transformers does: h + level)."""
    if i >= len(levels):
        return x
    x = x.clone()
    x[0, rows] = x[0, rows] + levels[i]
    return x


@torch.no_grad()
def deepstack_inputs(pipe, prepared, state, mode: str = "merge"):
    """(LLM-input rows [R], levels [D] of [R, C]) of a DeepStack family's visual tokens, straight
    from the towers; None for a family without DeepStack. Each video's rows are its tokens as they
    entered the LLM (``state``: the patch's record of the reduction; None: nothing reduced), a
    merged row's level the mean of its members' (``mode`` merge) or its representative's own
    (representative); images' rows and levels as the towers gave them."""
    model = pipe.model
    family = family_of(model)
    if not family.deepstack_levels(model):
        return None
    from prunevid_bench import splice

    inputs, base = prepared.inputs, model.model
    ids = inputs["input_ids"][0].cpu()
    rows, parts = [], []
    if "pixel_values_videos" in inputs:
        videos = base.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).deepstack_features
        runs = family.video_runs(model, ids, inputs["video_grid_thw"].tolist())
        for i, video_runs in enumerate(runs):
            place = splice.run_positions(video_runs)
            levels = [level[i].float().cpu() for level in videos]
            if state is None:
                rows.append(place)
                parts.append(levels)
                continue
            tokens = state.videos[i]
            index, origin = tokens.index.cpu(), tokens.origin.cpu()
            rows.append(torch.searchsorted(state.source_index.cpu(), place[index]))
            if mode == "merge":
                members = torch.nn.functional.one_hot(origin.clamp(min=0), index.numel()).float()
                members[origin < 0] = 0
                parts.append([(members.T @ level) / members.sum(0)[:, None] for level in levels])
            else:
                parts.append([level[index] for level in levels])
    if "pixel_values" in inputs:
        images = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).deepstack_features
        place = torch.nonzero(ids == model.config.image_token_id).flatten()
        rows.append(place if state is None else torch.searchsorted(state.source_index.cpu(), place))
        parts.append([torch.cat(level).float().cpu() for level in images])
    if not rows:
        return None
    levels = [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]
    return torch.cat(rows), levels


def reference_for(pipe, prepared, traced: Traced, **kwargs) -> torch.Tensor:
    """The cache-free logits of a traced run: its LLM input, the LLM-layer method's kept rows and
    layer (if one ran), its proportional attention (if any), decode ids continuing the unpruned
    numbering (shifted when a reduction renumbered the prompt). An LLM-layer merge goes to
    ``merged.merged_reference`` (``merged=False``: the same rows kept, nothing averaged), a decode
    method to ``decode.decode_reference`` (``prune=False``: every step attends to everything); both
    take ``deepstack=(rows, levels)`` to add Qwen3-VL's levels (tests/test_qwen3_vl.py builds them)."""
    model = pipe.model
    full = family_of(model).prefill_position_ids(model, prepared.inputs)  # unpruned ids, as generate builds them
    mode = traced.handle.deepstack_mode if traced.handle is not None else "merge"
    kwargs.setdefault("deepstack", deepstack_inputs(pipe, prepared, traced.state, mode))
    st, handle = traced.state, traced.handle
    first_decode_pos = full[1:, :, -1:] + 1 + (st.decode_position_shift if st is not None else 0)
    keep_index, k = None, None
    if st is not None and st.keep_index is not None:
        # the kept rows, from the method's kept visual tokens alone (not the patch's own index)
        keep = torch.ones(traced.embeds.shape[1], dtype=torch.bool)
        gone = torch.ones(st.visual_positions.numel(), dtype=torch.bool)
        gone[st.kept_visual.cpu()] = False
        keep[st.visual_positions.cpu()[gone]] = False
        keep_index, k = torch.nonzero(keep).flatten(), handle.score_layer
        kwargs.setdefault("decode_sees_dropped", not st.compacted)
    key_log_size = st.key_log_size if st is not None else None
    if handle is not None and handle.decode_method is not None:  # a decode method's kept positions, step by step
        from prunevid_bench.verify.decode import decode_reference

        return decode_reference(model, traced.embeds, traced.position_ids[1:], st.decode_kept_steps, handle.decode_at,
                                traced.result.generated_token_ids, first_decode_pos, prune=kwargs.pop("prune", True),
                                deepstack=kwargs.pop("deepstack", None))
    if st is not None and st.merged_into is not None:  # an LLM-layer merge
        from prunevid_bench.verify.merged import merge_dest, merged_reference

        merged = kwargs.pop("merged", True)
        n = traced.embeds.shape[1]
        weights = st.merge_weights if st.merge_weights is not None else st.row_sizes
        sizes = kwargs.pop("weights", weights.float() if weights is not None else torch.ones(n))
        return merged_reference(model, traced.embeds, traced.position_ids[1:], merge_dest(st, n, keep_index, merged),
                                sizes, keep_index, k, traced.result.generated_token_ids, first_decode_pos,
                                kwargs.get("deepstack"), mode, compact=st.compacted)
    return cache_free_logits(model, traced.embeds, traced.position_ids[1:], keep_index, k,
                             traced.result.generated_token_ids, first_decode_pos, key_log_size=key_log_size, **kwargs)
