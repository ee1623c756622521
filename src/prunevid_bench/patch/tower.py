"""ToMe inside the vision tower (``methods.tome_vision``): each block of a video's tower pass
runs on the merged sequence: attention with the block's own module (its kernel, ``cu_seqlens``
and 2-D rotary, index-selected to the merged tokens, plus ToMe's proportional attention), then
the merge (``stages.tome_vision``), then the MLP, ToMe's order in a block. The patch mergers
(Qwen3-VL's DeepStack mergers too) get the full grid back (ToMe's ``unmerge``: every patch the
row of the token it went into), so their output has its usual shape.

Segments: a merged token lies in its representative's frame and, in Qwen2.5-VL's window blocks,
its representative's window, as it takes its rotary position: the tower's ``cu_seqlens`` for
each block are recomputed from the representatives (``stages.tome_vision.current_seqlens``), the
windows themselves never move. Works with any transformers attention function the tower calls
with ``attention_mask=None`` (SDPA, eager, flash with ``cu_seqlens``)."""

from __future__ import annotations

import sys

import torch

from prunevid_bench.errors import PruneVidError
from prunevid_bench.overrides import InstanceOverride, MappingOverride
from prunevid_bench.patch.key_bias import with_key_bias
from prunevid_bench.stages import tome_vision as tv


def merge_blocks(text: str, depth: int) -> list[int]:
    """``tome_vision.merge_layers`` for a tower of ``depth`` blocks: indices, or ``"K/N"``
    relative depths (``config_layers.resolve_layer``, as an LLM layer K is given)."""
    from prunevid_bench.config_layers import resolve_layer

    return sorted({resolve_layer(spec, depth, "tome_vision.merge_layers") for spec in tv.block_specs(text)})


class TowerPass:
    """One video pass through the tower: the merged sequence and what its blocks need."""

    def __init__(self, tokens: tv.TowerTokens, frame: torch.Tensor, clip: torch.Tensor):
        self.tokens = tokens
        self.frame, self.clip = frame, clip  # [U0] frame / inter-frame clip of each input unit (global ids)
        self.keys: torch.Tensor | None = None  # [L, D] the running block's keys, mean over heads, before rotary
        self.key_log_size: torch.Tensor | None = None  # [L] log(size) of each patch, when some token is merged
        self.cursor = 0  # where the next attention call's keys start in key_log_size (chunked SDPA/eager)
        self.blocks: list[tuple[int, int, int]] = []  # per block: patches in attention, sum of segment^2, in the MLP
        self.marks: list = []  # clock marks around each block's matching and merging (the method's own work)
        self.keep: list[int] = []  # with a budget: units each frame keeps at the last block (tv.frame_keeps)


class TowerMerging:
    """Installed by the handle for ``tome_vision``; ``remove()`` undoes it. ``last`` keeps the
    last video pass (its ``TowerPass``) for the ``groups`` mode's merger reduction and for tests."""

    def __init__(self, handle, cfg):
        self.handle, self.cfg = handle, cfg
        self.method_name = "tome_vision"
        model, fam = handle.model, handle.family
        self.tower = fam.vision_encoder(model)
        self.blocks = list(self.tower.blocks)
        depth = len(self.blocks)
        self.unit = handle.merge**2 if cfg.merger == "groups" else 1
        self.budget = getattr(cfg, "budget", None)  # a kept fraction: each frame's removals planned (tv.budget_removal)
        if self.budget is not None and cfg.merge_layers:
            raise PruneVidError("tome_vision.budget plans every block's merges within frames; unset merge_layers "
                                f"('{cfg.merge_layers}') to use it")
        self.removals = [1] * depth if self.budget is not None else tv.block_removals(cfg.r, depth, cfg.schedule)
        self.inter_blocks = set(merge_blocks(cfg.merge_layers, depth))
        self.active: TowerPass | None = None
        self.last: TowerPass | None = None
        self.video_rows: list | None = None  # (merger order, first unit) of each video of the last pass (groups)
        self.attention_ids = {id(b.attn) for b in self.blocks}
        self._hooks: list = []
        self.on_remove = lambda: None  # what the method's registry forgets with it
        self._install()

    # ------------------------------------------------------------------ install
    def _install(self) -> None:
        add = self._hooks.append
        add(self.tower.register_forward_pre_hook(self._start, with_kwargs=True))
        add(self.tower.register_forward_hook(self._end))
        for i, block in enumerate(self.blocks):
            add(InstanceOverride(block, "forward", self._block_forward(i, block, block.forward)))
            if i in self.inter_blocks or self.removals[i] > 0:  # only a block that merges needs its keys
                add(block.attn.qkv.register_forward_hook(self._capture_keys(block.attn)))
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        add(MappingOverride(ALL_ATTENTION_FUNCTIONS, "sdpa", self._biased(ALL_ATTENTION_FUNCTIONS["sdpa"])))
        module = sys.modules[type(self.blocks[0].attn).__module__]
        add(InstanceOverride(module, "eager_attention_forward", self._biased(module.eager_attention_forward, scaling_next=True)))
        mergers = [self.handle.family.vision_merger(self.handle.model), *getattr(self.tower, "deepstack_merger_list", [])]
        for merger in mergers:
            add(merger.register_forward_pre_hook(self._unmerge))

    def remove(self) -> None:
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks.clear()
        self.on_remove()

    # ------------------------------------------------------------------ one pass
    def _start(self, module, args, kwargs):
        self.active = None
        grids = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        if not self.handle._encoding_videos or grids is None:
            return None  # images (and calls outside get_video_features) run as they are
        frames, clips, keeps, video_frames = [], [], [], 0
        clip_base = 0
        for t, h, w in grids.tolist():
            n_units = h * w // self.unit
            step = torch.arange(t).repeat_interleave(n_units)
            frames.append(video_frames + step)
            if self.budget is not None:
                keeps.extend(tv.frame_keeps(t, n_units, self.budget))
            clips.append(clip_base + step // self.cfg.clip_frames)
            video_frames += t
            clip_base += -(-t // self.cfg.clip_frames)
        frame, clip = torch.cat(frames).to(grids.device), torch.cat(clips).to(grids.device)
        n = frame.numel()
        tokens = tv.TowerTokens(x=torch.empty(0), size=torch.ones(n, device=grids.device),
                                pos=torch.arange(n, device=grids.device), to_current=torch.arange(n, device=grids.device))
        self.active = TowerPass(tokens, frame, clip)
        self.active.keep = keeps
        if self.unit > 1:  # merger: groups: each video's groups in tower order, for ``tome_vision.reduce``
            order = self.handle.family.merger_order(self.handle.model, grids)
            starts = torch.tensor([0, *[t * h * w // self.unit for t, h, w in grids.tolist()]]).cumsum(0).tolist()
            self.video_rows = [(order, start) for start in starts[:-1]]
        return None

    def _end(self, module, args, output):
        """The pass's counts into the prefill's state (the record and the FLOPs model read them)."""
        p, self.last, self.active = self.active, self.active, None
        if p is not None:
            st, name = self.handle.state, self.method_name
            st.tower_blocks = [tuple(b) for b in p.blocks]
            st.method_stats["tome_vision_block_patches"] = [b[0] for b in p.blocks]
            st.method_stats["tome_vision_tower_tokens_out"] = int(p.tokens.pos.numel() * self.unit)
            st.method_marks.setdefault(name, []).extend(p.marks)
            if self.unit == 1:  # unmerge: the LLM's tokens are as many as before (groups: the merger's reduction counts)
                n = p.tokens.to_current.numel() // self.handle.merge**2
                counts = st.method_tokens.setdefault(name, [0, 0])
                counts[0], counts[1] = counts[0] + n, counts[1] + n
        return None

    def _block_forward(self, index: int, block, original):
        def forward(hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
            p = self.active
            if p is None:
                return original(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
            tokens = p.tokens
            patches = tv.patch_positions(tokens.pos, self.unit)
            merged = patches.numel() != tokens.to_current.numel() * self.unit  # (no device sync)
            if merged:  # the tower's segments and rotary for the merged sequence
                cu_seqlens = tv.current_seqlens(cu_seqlens, patches)
                position_embeddings = tuple(e[patches.to(e.device)] for e in position_embeddings)
                if "max_seqlen" in kwargs:
                    kwargs["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            sizes = tokens.size.repeat_interleave(self.unit) if self.unit > 1 else tokens.size
            proportional = self.cfg.proportional_attention and merged  # some size > 1
            p.key_log_size, p.cursor = (sizes.float().log() if proportional else None), 0
            p.keys = None
            h = hidden_states + block.attn(block.norm1(hidden_states), cu_seqlens=cu_seqlens,
                                           position_embeddings=position_embeddings, **kwargs)
            p.key_log_size = None
            start = self.handle.clock.mark()
            h = self._merge(index, p, h)
            p.marks.append((start, self.handle.clock.mark()))
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            p.blocks.append((int(patches.numel()), int((lengths * lengths).sum()), int(h.shape[0])))
            return h + block.mlp(block.norm2(h))

        return forward

    def _merge(self, index: int, p: TowerPass, h: torch.Tensor) -> torch.Tensor:
        """The merges of block ``index`` on its post-attention states ``h`` [L, C]: intra-frame
        (r of the schedule, a budget's planned share, or the intra proportion at an inter-frame
        block), then inter-frame across each clip at an inter-frame block."""
        steps = []
        if index in self.inter_blocks:
            inter, intra = self.cfg.inter_proportion, self.cfg.intra_proportion
            steps = [(p.frame, lambda n, _: int(n * intra)), (p.clip, lambda n, _: int(n * inter))]
        elif self.budget is not None:
            left = len(self.blocks) - index
            steps = [(p.frame, lambda n, frame: tv.budget_removal(n, p.keep[frame], left))]
        elif self.removals[index] > 0:
            steps = [(p.frame, lambda n, _, r=self.removals[index]: r)]
        if not steps or p.keys is None:
            return h
        channels = h.shape[-1]
        tokens = tv.TowerTokens(h.reshape(-1, channels * self.unit), p.tokens.size, p.tokens.pos, p.tokens.to_current)
        metric = p.keys.reshape(tokens.x.shape[0], -1)
        for labels, removals in steps:
            before = tokens.pos
            tokens = tv.merge_runs(tokens, metric, labels[tokens.pos], removals)
            if tokens.pos.numel() != before.numel():  # the next step matches on the merged keys' survivors
                metric = metric[torch.searchsorted(before, tokens.pos)]
        p.tokens = tokens
        return tokens.x.reshape(-1, channels)

    def _capture_keys(self, attention):
        def hook(module, args, output):
            p = self.active
            if p is not None:
                dim = output.shape[-1] // 3
                p.keys = output[:, dim : 2 * dim].reshape(output.shape[0], attention.num_heads, -1).mean(1)
            return None

        return hook

    def _biased(self, original, scaling_next: bool = False):
        """The attention function with ToMe's proportional attention for the tower's modules:
        log(size) of each key on every logit, in extra q/k channels (``with_key_bias``), so no
        dense mask is built. Chunked calls (one per segment) take the next keys' sizes."""
        def attention(module, query, key, value, attention_mask=None, *args, **kwargs):
            p = self.active
            if p is None or p.key_log_size is None or id(module) not in self.attention_ids or attention_mask is not None:
                return original(module, query, key, value, attention_mask, *args, **kwargs)  # as it was called
            dim, n_kv = query.shape[-1], key.shape[-2]
            scaling = kwargs.pop("scaling", None)
            if scaling is None and args and scaling_next:  # eager's order: (..., attention_mask, scaling, dropout)
                scaling, args = args[0], args[1:]
            scale = scaling if scaling is not None else dim**-0.5
            bias = p.key_log_size[p.cursor : p.cursor + n_kv].to(key.device)
            p.cursor = (p.cursor + n_kv) % p.key_log_size.numel()
            out, weights = original(module, *with_key_bias(query, key, value, bias, scale), None, *args,
                                    scaling=scale, **kwargs)
            return out[..., :dim], weights

        return attention

    def _unmerge(self, module, args):
        """A merger's input back on the full grid: each patch the row of the token it went into
        (a pre-hook, so that any wrapper of the merger's ``forward`` sees the full grid)."""
        p, x = self.active, args[0]
        if p is None or x.shape[0] == p.tokens.to_current.numel() * self.unit:
            return None
        full = x.reshape(-1, x.shape[-1] * self.unit)[p.tokens.to_current].reshape(-1, x.shape[-1])
        return (full, *args[1:])
