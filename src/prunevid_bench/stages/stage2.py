"""Stage 2 (question-guided scoring and stratified selection) as pure tensor functions (Stage 3,
the KV compaction, is the patch's: ``patch.layer``). Nothing here builds the L x L attention
matrix: only the R query rows (the video's ``<|vision_end|>`` and the text after it) are scored
against the keys, in row chunks, so the extra memory is O(H * chunk * L), never O(L^2).

Shapes: H query heads, H_kv key/value heads (grouped-query attention), R query rows,
L keys (the whole prefill sequence), V visual tokens, d head dim.
"""

from __future__ import annotations

import torch

ROW_CHUNK_ELEMENTS = 1 << 24  # score rows per chunk are bounded to ~16M floats (64 MB in fp32)


def repeat_kv(keys: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[H_kv, L, d] -> [H_kv * n_rep, L, d]; query head h uses key head h // n_rep (as transformers)."""
    return keys if n_rep == 1 else keys.repeat_interleave(n_rep, dim=0)


def _row_chunks(n_heads: int, n_rows: int, n_keys: int):
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, n_heads * n_keys))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def attention_probs(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, query_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of some query rows over all keys, in float32.

    queries [H, R, d], keys [H_kv, L, d]; returns [H, R, L]. With ``query_positions`` [R] (each
    row's index in the key sequence) the mask is causal: row r sees keys 0..query_positions[r].
    Without it there is no mask (the official PruneVid score). Use on small R only; the scoring
    functions below call it chunk by chunk.
    """
    n_rep = queries.shape[0] // keys.shape[0]
    k = repeat_kv(keys.float(), n_rep)
    logits = torch.matmul(queries.float(), k.transpose(-1, -2)) * scaling
    if query_positions is not None:
        key_index = torch.arange(keys.shape[1], device=keys.device)
        future = key_index.view(1, 1, -1) > query_positions.view(1, -1, 1)
        logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


def max_max_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    visual_index: torch.Tensor,
    scaling: float,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of each visual token: max over heads, then max over query rows, of the
    attention the rows pay it (as in the official code's text-to-video max-max).

    queries [H, R, d]; keys [H_kv, L, d]; visual_index [V] (key positions of the visual tokens);
    returns [V] float32. ``query_positions`` switches on the causal mask (``attention`` mode);
    without it, this is the official ``prunevid`` score (pre-rotary q, k and no mask).

    Equal to ``attention_probs(...)[..., visual_index].amax((0, 1))``, computed cheaper: the keys
    are reordered once, visual first, so the visual columns of every chunk are a slice (a view),
    not a gather of the products (the other columns still feed the softmax's normaliser);
    grouped-query heads are a reshape of q instead of repeated keys; the scale is folded into q.
    """
    n_heads, n_rows, d = queries.shape
    n_kv, n_visual = keys.shape[0], visual_index.numel()
    ordered_keys, key_positions = _visual_first(keys.float(), visual_index)
    # query head h uses key head h // n_rep (as transformers' repeat_kv): heads group by key head
    grouped = (queries.float() * scaling).view(n_kv, n_heads // n_kv, n_rows, d)
    best = torch.full((n_visual,), float("-inf"), device=keys.device)
    for rows in _row_chunks(n_heads, n_rows, keys.shape[1]):
        pos = None if query_positions is None else query_positions[rows]
        probs = _grouped_probs(grouped[:, :, rows], ordered_keys, key_positions, pos)  # [H_kv, n_rep * r, L]
        best = torch.maximum(best, probs[..., :n_visual].amax(dim=(0, 1)))
    return best


def _visual_first(keys: torch.Tensor, visual_index: torch.Tensor):
    """[H_kv, L, d] -> the same keys with the visual ones first [H_kv, L, d], and each reordered
    key's original position [L] (for the causal mask)."""
    is_other = torch.ones(keys.shape[1], dtype=torch.bool, device=keys.device)
    is_other[visual_index] = False
    positions = torch.cat([visual_index.to(keys.device), is_other.nonzero().squeeze(1)])
    return keys.index_select(1, positions), positions


def _grouped_probs(grouped_q: torch.Tensor, keys: torch.Tensor, key_positions, query_positions) -> torch.Tensor:
    """grouped_q [H_kv, n_rep, r, d] (scaled), keys [H_kv, L, d] -> softmax [H_kv, n_rep * r, L]:
    one batched matmul per key head, its n_rep query heads stacked as rows (no repeated keys)."""
    n_kv, n_rep, r, d = grouped_q.shape
    logits = torch.bmm(grouped_q.reshape(n_kv, n_rep * r, d), keys.transpose(1, 2))
    if query_positions is not None:
        future = key_positions.view(1, 1, -1) > query_positions.repeat(n_rep).view(1, -1, 1)
        logits.masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


def last_token_scores(
    last_query: torch.Tensor, keys: torch.Tensor, visual_index: torch.Tensor, scaling: float, position: int
) -> torch.Tensor:
    """FastV-style control: the last prompt token's causal attention to each visual token,
    averaged over heads. last_query [H, 1, d] (rotary applied); keys [H_kv, L, d]; returns [V]."""
    pos = torch.tensor([position], device=keys.device)
    return attention_probs(last_query, keys, scaling, pos)[:, 0, visual_index].mean(dim=0)


def random_scores(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded uniform scores: the random-pruning control."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(n, generator=gen).to(device)


def stratified_keep(scores: torch.Tensor, groups: torch.Tensor, keep_ratio: float, total: int | None = None) -> torch.Tensor:
    """Keep int(n * keep_ratio) top-scoring tokens of every group (as the official code does
    per segment's static set and per frame's dynamic set); not a global top-k.

    ``total`` (budget mode, not in the official code): keep exactly ``min(total, V)`` instead,
    spread over the groups in proportion to their sizes (largest remainder; ``keep_ratio`` unused).

    scores [V], groups [V] (any integer ids). Returns sorted positions [V'] into 0..V-1, so the
    kept tokens stay in their original order. Ties go to the lower index (stable sorts).
    Vectorised (no loop over groups), so a GPU waits on the host once, in ``unique``.
    """
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    _, group_id, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    by_score = torch.sort(-scores.float(), stable=True).indices  # best first, lower index on ties
    order = by_score[torch.sort(group_id[by_score], stable=True).indices]  # grouped, best first within
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=scores.device) - starts[group_id[order]]
    # the official count, Python's int(n * keep_ratio) in double precision: 90 * 0.7 is
    # 62.99999999999999, so 62 are kept
    n_keep = torch.floor(counts.double() * keep_ratio).long()
    if total is not None:
        from prunevid_bench.stages.tome import spread_counts

        n_keep = torch.tensor(spread_counts(total, counts.tolist()), device=scores.device)
    return torch.sort(order[rank < n_keep[group_id[order]]]).values

