"""An analytic model of a prefill's peak memory, per phase, with and without chunked prefill
(``prefill.chunk_tokens``, ``patch.chunked``): the bytes the prefill allocates beyond the weights
and its inputs, counted from the tensors transformers' Qwen2-VL / Qwen2.5-VL decoder layers and
our patch hold (batch 1, SDPA). The LLM-layer benchmark (``benchmarks/``, ``--chunk-tokens``) prints
it beside each measured peak.

What is held, by phase (b bytes per element, C hidden, I MLP width, H / G query / key-value
heads of d channels):
- before the LLM: the prompt's embeddings and the tower's video features (one copy each), and
  a visual-token method's spliced copy of the LLM input;
- layers 0..K on L rows: the layer's input, and chunked the output buffer it fills; the KV cache
  of the layers so far; at layer K the captured queries and keys (when a method scores there);
  and one layer call's working set on m rows after p cached ones: the MLP's three m x I tensors
  and two m x C, or the attention's q/k/v and rotary copies and the grown cache of the layer (a
  chunk after the first, on the CPU: its two flash outputs and their float32 join);
- the method: the captured q/k joined, the compacted cache of layers 0..K;
- layers K+1.. on the kept rows, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    bytes: int = 4  # per element: 4 float32, 2 bfloat16 / float16

    @classmethod
    def from_config(cls, config, bytes_per_element: int) -> "MemoryShape":
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads,
                   head_dim, text.num_hidden_layers, bytes_per_element)


def layer_call(s: MemoryShape, rows: int, past: int, masked: bool) -> int:
    """Bytes one decoder layer call allocates at its peak, on ``rows`` queries after ``past``
    cached rows (the larger of its attention and its MLP)."""
    b, kv_row = s.bytes, 2 * s.kv_heads * s.head_dim * s.bytes
    qkv = rows * (s.heads + 2 * s.kv_heads) * s.head_dim * b
    attention = rows * s.hidden * b + 2 * qkv + (past + rows) * kv_row  # normed input, q/k/v + rotary, the grown cache
    if masked:  # patch.chunked on the CPU: the two flash outputs and their float32 join
        attention += 2 * rows * s.heads * s.head_dim * b + 2 * rows * s.heads * s.head_dim * 4
    mlp = 3 * rows * s.intermediate * b + 2 * rows * s.hidden * b  # act(gate), up, their product; residual, normed
    return max(attention, mlp)


def layers_peak(s: MemoryShape, rows: int, n_layers: int, chunk: int, cached_before: int = 0) -> int:
    """Peak of ``n_layers`` layers on ``rows`` rows, in chunks of ``chunk`` (0: whole), with
    ``cached_before`` bytes of earlier layers' cache held: the last layer, at its largest chunk."""
    kv_row = 2 * s.kv_heads * s.head_dim * s.bytes
    chunked = 0 < chunk < rows
    # the layer's input and, chunked, the output buffer it fills (whole: the output is in the call)
    hidden = rows * s.hidden * s.bytes * (2 if chunked else 1)
    held = hidden + cached_before + (n_layers - 1) * rows * kv_row
    if not chunked:
        return held + layer_call(s, rows, 0, masked=False)
    return held + max(past * kv_row + layer_call(s, min(chunk, rows - past), past, masked=past > 0)
                      for past in range(0, rows, chunk))


def prefill_peaks(s: MemoryShape, prompt: int, visual: int, llm_rows: int, kept_rows: int | None = None,
                  k: int | None = None, chunk: int = 0, query_rows: int = 0, compact: bool = True) -> dict[str, int]:
    """Peak bytes of each phase: ``before_llm``, then ``llm_layers`` (no LLM-layer method: ``k``
    None), or ``layers_0_to_k``, ``method`` and ``layers_after_k`` (``kept_rows`` rows after
    layer ``k``). ``prompt`` tokens, ``visual`` of them video tokens, ``llm_rows`` entering the
    LLM (fewer after a visual-token method)."""
    b, row, kv_row = s.bytes, s.hidden * s.bytes, 2 * s.kv_heads * s.head_dim * s.bytes
    # the model's embeddings (and, while the video's are scattered in, those before), the tower's
    # features joined; a visual-token method's spliced LLM input; the rotary cos / sin of every row
    before = (2 * prompt + visual) * row
    held = (prompt + visual) * row + (llm_rows * row if llm_rows != prompt else 0) + 2 * llm_rows * s.head_dim * b
    if k is None:
        return {"before_llm": before, "llm_layers": held + layers_peak(s, llm_rows, s.layers, chunk)}
    kept = kept_rows if kept_rows is not None else llm_rows
    captured = llm_rows * (s.heads + s.kv_heads) * s.head_dim * b  # layer K's q and k, every row
    first = held + captured + layers_peak(s, llm_rows, k + 1, chunk)
    early_cache = (k + 1) * llm_rows * kv_row
    # the score (PruneVid's max-of-max scorer in stages/): the keys reordered, and the logits and softmax of
    # the query rows over every key, in row chunks of at most 2^24 elements
    scoring = llm_rows * s.kv_heads * s.head_dim * 4 + 2 * min(query_rows * s.heads * llm_rows, 1 << 24) * 4
    compaction = (k + 1) * kept * kv_row * compact + kept * row  # the new cache of layers 0..K, the kept rows
    method = held + early_cache + llm_rows * row + captured + max(scoring, compaction)
    early_after = (k + 1) * (kept if compact else llm_rows) * kv_row
    final_norm = 2 * kept * row  # the last layer's output and its norm, every kept row
    later = held + (layers_peak(s, kept, s.layers - k - 1, chunk, early_after) if k + 1 < s.layers
                    else early_after + final_norm)
    return {"before_llm": before, "layers_0_to_k": first, "method": method, "layers_after_k": later}
