"""Question-time eviction in a stream: PruneVid's Stage 2 + 3 for one answer, on a live cache.

At ``ask`` the question is prefilled through layers 0..K over the whole cache. At layer K its
rows (``<|vision_end|>`` on) score every cached visual token with PruneVid's score (pre-rotary
q and k, no mask, max over rows and heads); ``int(n * keep_ratio)`` are kept per group. From
there the answer runs on a pruned copy of every layer's cache: layers K+1.. attend only to the
kept tokens (the question's own rows included) and decoding sees the kept tokens in every layer,
as offline. The copies hold only the kept tokens; the stream's own cache is never edited.

How it relates to offline PruneVid: the scores, and so the kept tokens, are exactly offline's
(without Stage 1 the cache is the offline prefill in pieces). What differs is the video tokens'
own KV in layers K+1..: offline they were computed among the kept tokens only; here they were
computed at append time, before any question, among all tokens (``docs/streaming.md``).

On a hybrid model (Qwen3.5) K is a full-attention layer (resolved as offline: a relative depth
moves down to the nearest one, an absolute K at a linear-attention layer is refused) and the
pruned copies are of the full-attention layers' caches only: a linear-attention layer's recurrent
state has absorbed every token and cannot drop one (the session restores it after the answer).

Model-specific pieces (layer access, the modules giving q and k before rotary, head size) are in
``layer_parts``. The method
names this class as its ``stream_eviction``; the stream asks the method for it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from prunevid_bench import splice
from prunevid_bench.methods.prunevid_stage2 import Stage2Config
from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages import stage2 as s2


def layer_parts(model, k: int):
    """The decoder layers, layer K's attention, its head dim and scaling (through the family)."""
    from prunevid_bench.families import family_of

    family = family_of(model)
    layers = family.decoder_layers(model)
    attn = family.attention(layers[k])
    return layers, attn, attn.head_dim, attn.scaling


class QuestionEviction:
    """Keeps layer K's pre-rotary keys of every cached token (PruneVid scores before rotary) and
    prunes one answer's cache. ``keys``: ``[H_kv, L, d]``, one row per cache slot."""

    @staticmethod
    def check(cfg: Stage2Config) -> None:
        if cfg.score != "prunevid":
            raise PruneVidError(f"a stream's question-time eviction scores with stage2.score=prunevid only, got '{cfg.score}'")

    def __init__(self, model, cfg: Stage2Config):
        self.check(cfg)
        self.model = model
        self.cfg = cfg
        from prunevid_bench.config_layers import method_layers
        from prunevid_bench.families import family_of
        from prunevid_bench.methods import get_method

        family = family_of(model)
        method = get_method("prunevid_stage2")
        self.layer, _, _ = method_layers(method, method.pruning_layer(cfg), model.config.get_text_config().num_hidden_layers,
                                   family.attention_layers(model.config))
        self.layers, self.attn, self.head_dim, self.scaling = layer_parts(model, self.layer)
        self.query, self.key = family.query_key(self.attn)  # q and k before rotary, as offline's scorer
        # offline's query rows start at the video's last <|vision_end|>: on a per-step layout
        # (Qwen3-VL, Qwen3.5) the last chunk's last token, so its q is kept from the append
        self.step_layout = family.video_layout == "step"
        self.keys: torch.Tensor | None = None
        self.tail_q: torch.Tensor | None = None
        self.last: dict = {}  # the last answer's kept count and scores, for its record

    # ----------------------------------------------------------- the key store
    @contextmanager
    def recording(self, tail: bool = True):
        """While active, layer K's pre-rotary keys of every forward are appended to ``keys`` (and,
        with ``tail``, its last row's query kept as ``tail_q``)."""
        def grab(module, args, output):
            k = output[0].view(output.shape[1], -1, self.head_dim).transpose(0, 1)
            self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=1)

        def grab_q(module, args, output):
            self.tail_q = output[0].view(output.shape[1], -1, self.head_dim).transpose(0, 1)[:, -1:]

        hooks = [self.key.register_forward_hook(grab)] + ([self.query.register_forward_hook(grab_q)] if tail else [])
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def crop(self, length: int) -> None:
        if self.keys is not None:
            self.keys = self.keys[:, :length]

    def select(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(1, index.to(self.keys.device))

    # ----------------------------------------------------------- one answer
    @contextmanager
    def answering(self, cache, visual_index: torch.Tensor, groups: torch.Tensor, original: int = 0):
        """Around the question's prefill and decode: prune at layer K, answer on copies, and put
        the stream's own layers back afterwards (the caller then crops them to the video).
        ``original``: the video's visual tokens before any method (``stage2.budget`` keeps
        ``round(budget * original)`` of them, as offline)."""
        budget_total = None if self.cfg.budget is None else round(self.cfg.budget * original)
        past = splice.kv_length(cache)
        originals = list(cache.layers)
        state: dict = {}

        def capture_q(module, args, output):
            if output.shape[1] > 1 and "keep" not in state:
                state["q"] = output[0].view(output.shape[1], -1, self.head_dim).transpose(0, 1)

        def prune(module, args, output):
            if "q" not in state or "keep" in state:
                return None
            rows = state.pop("q")  # <|vision_end|> and the text after it, as offline's query rows
            if self.step_layout:
                rows = torch.cat([self.tail_q.to(rows.device), rows], dim=1)
            visual = visual_index.to(self.keys.device)
            scores = s2.max_max_scores(rows, self.keys, visual, self.scaling)
            kept = s2.stratified_keep(scores, groups.to(scores.device), self.cfg.keep_ratio, budget_total)
            total = self.keys.shape[1]
            is_dropped = torch.zeros(total, dtype=torch.bool, device=self.keys.device)
            is_dropped[visual] = True
            is_dropped[visual[kept]] = False
            keep = torch.nonzero(~is_dropped).flatten()
            state["keep"] = keep
            for i, layer in enumerate(cache.layers):
                if getattr(layer, "keys", None) is not None:  # a linear-attention layer has no tokens to drop
                    cache.layers[i] = _pruned_copy(layer, keep if i <= self.layer else keep[keep < past])
            self.last = {"visual_tokens_kept": int(kept.numel()), "kept": kept, "scores": scores}
            return None

        def slice_mask(module, args, kwargs):
            keep = state.get("keep")
            mask = kwargs.get("attention_mask")
            if keep is not None and isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] == past + args[0].shape[1]:
                kwargs["attention_mask"] = mask.index_select(-1, keep.to(mask.device))
                return args, kwargs
            return None

        hooks = [self.query.register_forward_hook(capture_q), self.layers[self.layer].register_forward_hook(prune)]
        hooks += [layer.register_forward_pre_hook(slice_mask, with_kwargs=True) for layer in self.layers[self.layer + 1 :]]
        try:
            with self.recording(tail=False):
                yield
        finally:
            for h in hooks:
                h.remove()
            cache.layers[:] = originals


def _pruned_copy(layer, index: torch.Tensor):
    """A cache layer holding only the tokens at ``index`` (new tensors; the original is kept)."""
    new = copy.copy(layer)
    new.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
    new.values = layer.values.index_select(-2, index.to(layer.values.device))
    return new

