"""The handle's report of the last prefill: a typed record of token counts by place, what the
methods added, and each method's tokens and seconds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from prunevid_bench.methods import place_key


@dataclass
class MethodReport:
    tokens: list[int]  # [tokens in, tokens out], summed over videos
    seconds: float


@dataclass
class HandleReport:
    tokens_in_prompt: int  # visual tokens of the videos in the prompt
    tokens_after_visual: int  # after the vision-encoder and visual-token methods
    tokens_before: int  # entering the LLM-layer method
    tokens_after: int  # leaving it
    llm_prefill_tokens: int  # rows that entered the LLM
    kv_bytes_layers_0_to_k: int  # the layers that ran on every token, before pruning
    scored_rows: int  # query rows the LLM-layer method scored
    merger_rows_skipped: int  # merger rows a vision-encoder method spared
    method_stats: dict[str, int] = field(default_factory=dict)  # record fields the methods reported
    methods: dict[str, MethodReport] = field(default_factory=dict)
    tower_blocks: list | None = None  # per vision block (patches in attention, sum of segment^2, in MLP), a merging tower

    def get(self, key: str, default: Any = None) -> Any:
        """A field or a method's record field by name (the record reads its fields so; ``methods``
        as plain dicts)."""
        if key == "methods":
            return {name: dataclasses.asdict(m) for name, m in self.methods.items()}
        if key in self.method_stats:
            return self.method_stats[key]
        return getattr(self, key) if key in {f.name for f in dataclasses.fields(self)} else default

    def __getitem__(self, key: str) -> Any:
        return self.get(key)


class Reporting:
    """The handle's report (mixed into ``ReductionHandle``)."""

    def seconds(self, name: str) -> float:
        """Seconds the method ``name`` took in the last prefill (all videos)."""
        return sum(self.clock.elapsed(a, b) for a, b in self.state.method_marks.get(name, []))

    def _decode_stats(self) -> dict[str, Any]:
        """A decode method's cost: positions the layers from l attended and positions cached, per
        step; the steps it pruned; the key/value bytes all layers read, and would have read."""
        st = self.state
        if getattr(self, "decode_method", None) is None:
            return {}
        steps = len(st.decode_cached)
        return {"decode_attended_per_step": list(st.decode_attended), "decode_cached_per_step": list(st.decode_cached),
                "decode_tokens_attended_mean": sum(st.decode_attended) / steps if steps else None,
                "decode_tokens_cached_mean": sum(st.decode_cached) / steps if steps else None,
                "decode_steps_pruned": sum(k is not None for k in st.decode_kept_steps),
                "decode_kv_bytes_attended": st.decode_kv_bytes_attended, "decode_kv_bytes_full": st.decode_kv_bytes_full}

    def report(self) -> HandleReport:
        st = self.state
        return HandleReport(
            tokens_in_prompt=st.tokens_in_prompt,
            tokens_after_visual=st.tokens_after_visual,
            tokens_before=st.tokens_before,
            tokens_after=st.tokens_after,
            llm_prefill_tokens=int(st.source_index.numel()) if st.source_index is not None else 0,
            kv_bytes_layers_0_to_k=st.kv_bytes_layers_0_to_k,
            scored_rows=st.scored_rows,
            merger_rows_skipped=st.merger_rows_skipped,
            method_stats={**st.method_stats, **self._decode_stats()},
            methods={key: MethodReport(list(st.method_tokens.get(key, [0, 0])), self.seconds(key))
                     for key in (place_key(m, place, c) for m, c, place in self.placed)},
            tower_blocks=st.tower_blocks,
        )
