"""What one sample's prefill learned (reset when the next prefill starts), and what the
``vision_encoder`` methods did in the last tower call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SampleState:
    """One prefill, by place: the prompt, the visual-token methods (LLM input), layer K."""

    input_ids: torch.Tensor | None = None  # [L] unpruned prompt
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    prefill: bool = False
    tokens_in_prompt: int = 0  # visual tokens of the videos in the prompt, before any method
    tokens_after_visual: int = 0  # ... after the vision-encoder and visual-token methods
    method_stats: dict = field(default_factory=dict)  # record fields the visual-token methods reported
    method_tokens: dict = field(default_factory=dict)  # method name -> [tokens in, tokens out]
    method_marks: dict = field(default_factory=dict)  # method name -> [(start mark, end mark), ...]
    videos: list = field(default_factory=list)  # each video's VideoTokens as they entered the LLM (embeds dropped: spliced)
    kept_by_method: dict = field(default_factory=dict)  # method name -> per video (grid index [M], origin [T*N]) after it
    source_index: torch.Tensor | None = None  # [L1] prompt index of each LLM-input row
    row_sizes: torch.Tensor | None = None  # [L1] how many prompt tokens each LLM-input row stands for
    merge_weights: torch.Tensor | None = None  # [L1] the weights of an LLM-layer merge's means (row_sizes unless the method gave its own)
    visual_positions: torch.Tensor | None = None  # [V] LLM-input rows of the visual tokens
    visual_groups: torch.Tensor | None = None  # [V] group of each visual token (an LLM-layer method keeps shares)
    query_start: int | None = None  # first LLM-input row after the last video's last visual token: its <|vision_end|>
    scores: torch.Tensor | None = None  # [V] the LLM-layer method's importance, when it keeps one
    keep_index: torch.Tensor | None = None  # [L2] LLM-input rows that survive the LLM-layer method
    kept_visual: torch.Tensor | None = None  # [V'] indices into visual_positions
    merged_into: torch.Tensor | None = None  # [V] the kept row (index into kept_visual) each visual token went into, -1 dropped
    compacted: bool = True  # the LLM-layer method also shortened the early layers' cache
    tokens_before: int = 0  # visual tokens entering the LLM-layer method
    tokens_after: int = 0  # ... and leaving it
    kv_bytes_layers_0_to_k: int = 0  # the layers that ran on every token, read before pruning
    scored_rows: int = 0  # query rows the LLM-layer method scored (analytic FLOPs)
    merger_rows_skipped: int = 0  # video tokens the merger did not project (a vision-encoder method merged them)
    key_log_size: torch.Tensor | None = None  # [L1] log(size) of each prompt key (proportional attention), else None
    key_bias_mask: tuple | None = None  # (the layer's own mask, shape, the mask built from it): proportional attention, per forward
    prompt_max_id: int | None = None  # largest M-RoPE id of the prompt, when a reduction renumbered it (positions_after)
    decode_position_shift: int = 0  # then added to the M-RoPE rows of a caller's explicit decode positions
    deepstack: tuple | None = None  # (LLM-input rows [R], levels [D] of [R, C], rows they were made for): DeepStack's adds
    decode_kept: torch.Tensor | None = None  # [S'] cache positions the layers from l attend to at this decoding step (None: all)
    decode_kept_steps: list = field(default_factory=list)  # ... at every decoding step (the reference replays them)
    decode_attended: list = field(default_factory=list)  # positions those layers attended, per decoding step
    decode_cached: list = field(default_factory=list)  # positions cached, per decoding step
    decode_kv_bytes_attended: int = 0  # key/value bytes every layer read over the decoding steps
    decode_kv_bytes_full: int = 0  # ... had every layer attended to the whole cache
    decode_memory: dict = field(default_factory=dict)  # a decode method's own memory across this sample's steps
    captured: dict = field(default_factory=dict)
    tower_blocks: list | None = None  # per vision block (patches in attention, sum of segment^2, patches in MLP) of a merging tower

    def __getattr__(self, name: str):
        """The old names of the counts (one release), as the record's (``report.RECORD_ALIASES``)."""
        from prunevid_bench.report import RECORD_ALIASES

        own = {"visual_tokens": "tokens_in_prompt", "tokens_after_visual_methods": "tokens_after_visual"}
        if own.get(RECORD_ALIASES.get(name)):
            return getattr(self, own[RECORD_ALIASES[name]])
        raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")


@dataclass
class BeforeMerger:
    """What the ``vision_encoder`` methods did in one tower call: per video its ``VideoTokens``
    (grid index, groups, sizes, extras, origin; embeddings in the merger's input space) and its
    group count, their record, and the merger rows not computed. Made when the tower runs
    (inside the prefill, or before it under ``generate``) and taken over by the next prefill."""

    videos: list
    record: SampleState
    rows_skipped: int
