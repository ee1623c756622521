"""The cache-free reference of a ``decode`` method (DyCoke's KV pruning): every generated token's
logits recomputed from scratch, layer by layer, with no cache. Each row attends causally, except
in the layers from l, where the row of the token fed at decoding step s attends only to the
positions that step kept (``SampleState.decode_kept_steps``); prompt rows and unpruned steps see
everything before them. So a generated token's keys and values in those layers are what its own
step computed, as in the cached run."""

from __future__ import annotations

import torch

from prunevid_bench.families import family_of
from prunevid_bench.verify.reference import _layer, additive_mask


@torch.no_grad()
def decode_reference(model, embeds, mrope, kept_steps, layer: int, tokens, first_decode_pos, prune: bool = True,
                     deepstack=None):
    """Logits [T, vocab] behind ``tokens``: embeds [1, L, D] and mrope (3, 1, L) the LLM input;
    ``kept_steps[s]`` the positions the token fed at step s (``tokens[s]``, at position L + s)
    attended to in layers ``layer``.. (None: all). ``prune=False``: every row sees everything
    (the check's sensitivity). ``deepstack`` (Qwen3-VL): (rows [R], levels [D] of [R, C]), level
    i added at those prompt rows after layer i."""
    lm = family_of(model).language_model(model)
    layers, device, dtype = list(lm.layers), embeds.device, embeds.dtype
    n_prompt, out = embeds.shape[1], []
    for t in range(len(tokens)):
        new = lm.embed_tokens(torch.tensor(tokens[:t], dtype=torch.long, device=device)).unsqueeze(0).to(dtype)
        x = torch.cat([embeds, new], dim=1)
        pos = torch.cat([mrope.to(device), first_decode_pos.to(device) + torch.arange(t, device=device).view(1, 1, -1)], dim=-1)
        n = n_prompt + t
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        pruned = causal.clone()
        for s in range(t):  # the row of tokens[s] was the query of decoding step s
            kept = kept_steps[s] if prune and s < len(kept_steps) else None
            if kept is not None:
                row = torch.zeros(n, dtype=torch.bool, device=device)
                row[kept.to(device)] = True
                pruned[n_prompt + s] &= row
        rotary = lm.rotary_emb(x, pos)
        for i, block in enumerate(layers):
            x = _layer(block, x, additive_mask(pruned if i >= layer else causal, dtype), rotary)
            if deepstack is not None and i < len(deepstack[1]):
                x = x.clone()
                x[0, deepstack[0]] += deepstack[1][i]
        out.append(model.lm_head(lm.norm(x[:, -1]))[0].float().cpu())
    return torch.stack(out)
