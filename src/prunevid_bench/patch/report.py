"""The handle's report of the last prefill: a typed record of token counts by place, what the
methods added, and each method's tokens and seconds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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

    ALIASES = {"tokens_before_stage1": "tokens_in_prompt", "tokens_after_stage1": "tokens_after_visual"}

    def get(self, key: str, default: Any = None) -> Any:
        """A field, an alias or a method's record field by name (the record reads its fields so;
        ``methods`` as plain dicts)."""
        key = self.ALIASES.get(key, key)
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
            method_stats=dict(st.method_stats),
            methods={m.name: MethodReport(list(st.method_tokens.get(m.name, [0, 0])), self.seconds(m.name))
                     for m, _ in self.methods},
            tower_blocks=st.tower_blocks,
        )
