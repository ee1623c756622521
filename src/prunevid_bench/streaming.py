"""Streaming: append video chunks to a live KV cache and answer questions mid-stream.

``StreamSession(pipe, video_fps=2)``: ``append(frames)`` encodes a chunk with the vision tower and
prefills its tokens into the cache; ``ask(question)`` answers from that cache and leaves it as it
was. Nothing already cached is ever re-encoded.

Why a stream with no pruning is *exactly* the offline prefill, computed in pieces:
- Qwen2.5-VL's vision tower attends within one temporal step only (per-frame ``cu_seqlens`` and
  windows in transformers 5.24), so a chunk cut at temporal-step boundaries encodes to the same
  features those frames get inside the whole video (``tests/test_streaming.py`` checks it).
- Every token takes the M-RoPE ids it has in the whole video's prompt: they are read off
  ``get_rope_index`` on the prompt as it would be offline with the frames seen so far (a video's
  token ids never depend on later frames; the text after it does, and is computed at ``ask``).
- Causal attention over a cache filled in pieces equals one prefill of the whole prompt.
Position ids therefore never drift, unlike engines that renumber each chunk from an offset.

The model is reached through its family (``prunevid_bench.families``: the base model, the patch
geometry, the prompt's M-RoPE ids), so a stream runs on every family: a chunk appends the prompt
tokens the processor writes for its frames (Qwen3-VL's and Qwen3.5's per-step timestamps and
markers included) and its DeepStack levels (Qwen3-VL); an ask restores a hybrid model's
linear-attention states (Qwen3.5), which cannot be cropped (docs/streaming.md, "Families"). The
chunk encoder (``stream_parts.encode_chunk``) is the one place that calls the vision tower. Which methods run per chunk and at each question: ``stream_methods``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np
import torch

from prunevid_bench.engine import cache_keyword, eos_ids, greedy_decode
from prunevid_bench.errors import PruneVidError
from prunevid_bench.families import family_of
from prunevid_bench.measure import Clock, cache_bytes
from prunevid_bench.stream_parts import (  # noqa: F401 (encode_chunk: part of this module's API)
    VIDEO_MARK, ChunkRecord, StreamAnswer, _Layers, add_deepstack, cache_length, chunk_ids, crop_cache, encode_chunk, merge_size,
    prompt_positions, recurrent_states, restore_states, select_cache, state_bytes, temporal_patch,
)

# ============================================================ the session
class StreamSession:
    """A live video stream over one model. Chunks must hold a multiple of the temporal patch size
    (2 frames); an odd frame at the end of a chunk is held back and prepended to the next chunk,
    so it is not seen by a question asked before then (``cache_info()["pending_frames"]``).

    ``config`` (the pipeline's by default) says which methods run (``prunevid_bench.stream_methods``):
    every enabled visual-token method on each chunk as it arrives (question-agnostic; PruneVid
    Stage 1's segments, ToMe's merges, VidCom2's frame budgets never cross a chunk, EVS compares
    a chunk's first step with the previous chunk's last), and the LLM-layer method at each ask
    (question-time eviction, the method's ``stream_eviction``). What a stream cannot run is refused.
    ``cache_tokens``: at most this many visual tokens stay cached; beyond it, the tokens most
    similar to the same slot of the previous temporal step are evicted (EVS-style, question-agnostic).
    ``presized``: the frames come at the model's input size (a qwen-style policy sized them), so the
    processor does not resize them, as offline.
    """

    def __init__(self, pipe, video_fps: float, chunk_frames: int | None = None, *, config=None,
                 cache_tokens: int | None = None, presized: bool = False):
        from prunevid_bench.stream_methods import check_stream_methods, enabled_methods

        if video_fps <= 0:
            raise PruneVidError(f"video_fps must be > 0, got {video_fps}")
        self.family = family = family_of(pipe.model)
        self.pipe = pipe
        # the layers with a KV cache, all an eviction can edit: on a hybrid model (Qwen3.5) the
        # full-attention ones; its linear-attention layers' recurrent states keep every token
        self.kv_layers = family.attention_layers(pipe.model.config)
        self.fps = float(video_fps)
        self.step = temporal_patch(pipe)
        if chunk_frames is not None and (chunk_frames <= 0 or chunk_frames % self.step):
            raise PruneVidError(f"--chunk-frames must be a positive multiple of {self.step} (the temporal patch size), got {chunk_frames}")
        self.chunk_frames = chunk_frames
        if cache_tokens is not None and cache_tokens <= 0:
            raise PruneVidError(f"--cache-tokens must be > 0, got {cache_tokens}")
        config = config if config is not None else pipe.config
        check_stream_methods(config, cache_tokens)
        self.visual_methods, layer, _ = enabled_methods(config)
        self.deepstack_mode = config.model.deepstack  # a merged token's levels: merge (averaged) | representative
        self.cache_tokens = cache_tokens
        self.eviction_layers = self.kv_layers if cache_tokens or layer else None
        self.presized = presized
        self.eviction = None
        if layer:
            method, section = layer[0]
            self.eviction = method.stream_eviction()(pipe.model, section)
        self._answering = False
        self.clock = Clock(pipe.device)
        self._cache_kw = cache_keyword(pipe.model)
        self._stop = eos_ids(pipe.model)
        prefix, _ = self._split_template("?")
        self._prefix_ids = self._tokens(prefix)
        if family.video_layout == "video" and pipe.model.config.vision_start_token_id not in self._prefix_ids[-1:]:
            raise PruneVidError("the chat template does not put <|vision_start|> right before the video")
        self.reset()

    # ----------------------------------------------------------- state
    @torch.inference_mode()
    def reset(self) -> None:
        """Empty the stream: a fresh cache holding only the tokens before the video."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.pipe.model.config.get_text_config())
        self.chunks: list[ChunkRecord] = []
        self.grid_hw: tuple[int, int] | None = None
        self.steps = 0  # temporal steps (2 frames each) in the cache
        self._video_ids: list[int] = []  # the offline prompt's video tokens so far (placeholders, timestamps)
        self.pending: np.ndarray | None = None  # a held-back odd frame
        self.frames_seen = 0
        self.visual_index = torch.zeros(0, dtype=torch.long)  # cache slot of each cached visual token
        self.visual_groups = torch.zeros(0, dtype=torch.long)  # the group an LLM-layer method keeps a share of
        if self.eviction is not None:
            self.eviction.keys = self.eviction.tail_q = None
        self.redundancy = torch.zeros(0)  # per cached visual token, for --cache-tokens
        self._last_step_features: torch.Tensor | None = None  # the previous chunk's last step [n, C]
        self.tokens_in = 0  # the video's visual tokens before any method (what a budget is a fraction of)
        ids = torch.tensor([self._prefix_ids], device=self.pipe.device)
        positions = prompt_positions(self.pipe, self._prefix_ids, (0, 0, 0), self.fps)
        self._prefill(ids=ids, positions=positions)

    @property
    def visual_tokens(self) -> int:
        return int(self.visual_index.numel())

    def cache_info(self) -> dict[str, Any]:
        per_layer = [cache_bytes(_Layers([layer])) for layer in self.cache.layers]
        return {
            "tokens": cache_length(self.cache),
            "visual_tokens": self.visual_tokens,
            "frames": self.frames_seen,
            "temporal_steps": self.steps,
            "pending_frames": 0 if self.pending is None else len(self.pending),
            "bytes": sum(per_layer),
            "bytes_per_layer": per_layer,
            "recurrent_state_bytes": state_bytes(self.cache),
            "chunks": [c.record() for c in self.chunks],
        }

    # ----------------------------------------------------------- appending
    @torch.inference_mode()
    def append(self, frames) -> ChunkRecord | None:
        """Encode a chunk ``[T, H, W, 3]`` uint8 and prefill its tokens. Returns its record, or
        None when only a held-back frame is left (nothing was encoded)."""
        frames = _as_frames(frames)
        if self.pending is not None:
            frames = np.concatenate([self.pending, frames])
            self.pending = None
        if len(frames) % self.step:
            self.pending, frames = frames[-1:], frames[:-1]
        if len(frames) == 0:
            return None
        if self.chunk_frames is not None and len(frames) > self.chunk_frames:
            raise PruneVidError(f"a chunk of {len(frames)} frames is longer than chunk_frames={self.chunk_frames}")
        start = self.clock.start()
        features, (t, h, w), levels = encode_chunk(self.pipe, frames, self.fps, self.presized, levels=True)
        vision_end = self.clock.mark()
        if self.grid_hw is None:
            self.grid_hw = (h, w)
        elif self.grid_hw != (h, w):
            raise PruneVidError(f"a chunk's frames encode to a {h}x{w} grid, the stream's are {self.grid_hw[0]}x{self.grid_hw[1]}: keep the frame size")
        merge = merge_size(self.pipe)
        per_step = (h // merge) * (w // merge)
        before = cache_length(self.cache)
        ids = chunk_ids(self.pipe, (t, h, w), self.frames_seen, len(frames), self.fps)
        at = len(self._prefix_ids) + len(self._video_ids)
        self._video_ids += ids
        positions = prompt_positions(self.pipe, self._prefix_ids + self._video_ids, (self.steps + t, h, w),
                                     self.fps)[:, at:]
        from prunevid_bench.stream_methods import reduce_chunk

        extras = {f"deepstack.{i}": level for i, level in enumerate(levels)}
        reduced = reduce_chunk(self.visual_methods, features, t, per_step, w // merge, self._last_step_features, extras)
        embeds, rows, visual_rows = self._chunk_rows(ids, reduced)
        positions = positions[:, rows.to(positions.device)]
        deepstack = [reduced.extras[f"deepstack.{i}"] if self.deepstack_mode == "merge"
                     else level[reduced.keep.to(level.device)] for i, level in enumerate(levels)]
        offset = int(self.visual_groups.max()) + 1 if self.visual_groups.numel() else 0
        self.visual_groups = torch.cat([self.visual_groups, reduced.groups.cpu() + offset])
        scores = self._redundancy(features.view(t, per_step, -1)) if self.cache_tokens else None
        self._last_step_features = features.view(t, per_step, -1)[-1].clone()
        self._prefill(embeds=embeds.unsqueeze(0), positions=positions, deepstack=(visual_rows, deepstack))
        added = visual_rows.numel()
        self.visual_index = torch.cat([self.visual_index, before + visual_rows])
        if scores is not None:
            self.redundancy = torch.cat([self.redundancy, scores])
        evicted = self._enforce_cache_tokens()
        end = self.clock.mark()
        record = ChunkRecord(
            index=len(self.chunks), first_frame=self.frames_seen, frames=len(frames),
            tokens_in=t * per_step, tokens_cached=added, evicted=evicted,
            append_s=self.clock.elapsed(start, end), vision_s=self.clock.elapsed(start, vision_end),
            visual_tokens=self.visual_tokens, kv_bytes=cache_bytes(self.cache),
            methods=reduced.methods, method_stats=reduced.stats, recurrent_state_bytes=state_bytes(self.cache),
        )
        self.chunks.append(record)
        self.steps += t
        self.tokens_in += t * per_step
        self.frames_seen += len(frames)
        return record

    def _chunk_rows(self, ids: list[int], reduced) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A chunk's LLM input in prompt order: its text tokens (timestamps and markers, where the
        family writes them) embedded, and the reduced visual tokens at their placeholders' rows.
        Returns the embeddings ``[R, C]``, each row's index in ``ids`` ``[R]`` and the visual rows
        among them."""
        ids_t = torch.tensor(ids)
        is_pad = ids_t == self.pipe.model.config.video_token_id
        text_rows = torch.nonzero(~is_pad).flatten()
        rows = torch.cat([text_rows, torch.nonzero(is_pad).flatten()[reduced.keep.cpu()]])
        order = torch.argsort(rows, stable=True)
        embeds = reduced.embeds
        if text_rows.numel():
            text = self.pipe.model.get_input_embeddings()(ids_t[text_rows].to(self.pipe.device)).to(embeds.dtype)
            embeds = torch.cat([text, embeds])
        order_dev = order.to(embeds.device)
        visual = torch.nonzero(order >= text_rows.numel()).flatten()
        return embeds[order_dev], rows[order], visual

    def _prefill(self, *, positions: torch.Tensor, ids: torch.Tensor | None = None,
                 embeds: torch.Tensor | None = None, deepstack: tuple | None = None):
        """One forward over new tokens with explicit positions: row 0 (the text row, used only to
        detect packed sequences) is the physical cache slot; rows 1-3 the M-RoPE ids.
        ``deepstack``: (the rows of the visual tokens, their levels): level i is added to those
        rows after decoder layer i, as offline."""
        past = cache_length(self.cache)
        n = positions.shape[-1]
        text_row = torch.arange(past, past + n, device=positions.device).view(1, -1)
        position_ids = torch.cat([text_row, positions]).unsqueeze(1)
        feed = {"input_ids": ids} if ids is not None else {"inputs_embeds": embeds}
        recording = self.eviction.recording() if self.eviction is not None and not self._answering else nullcontext()
        with recording, add_deepstack(self.family.decoder_layers(self.pipe.model), deepstack):
            return self.pipe.model(**feed, position_ids=position_ids, **{self._cache_kw: self.cache},
                                   use_cache=True, logits_to_keep=1)

    # ----------------------------------------------------------- --cache-tokens
    def _redundancy(self, steps: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each token ``[t, n, C]`` to the same slot one temporal step
        earlier (the previous chunk's last step for the first); the stream's first step scores -1
        (never the first to go)."""
        x = steps.float()
        prev = torch.cat([self._last_step_features.float().unsqueeze(0) if self._last_step_features is not None
                          else x[:1] * 0, x[:-1]])
        sim = torch.nn.functional.cosine_similarity(x, prev, dim=-1)
        if self._last_step_features is None:
            sim[0] = -1.0
        return sim.flatten().cpu()

    def _enforce_cache_tokens(self) -> int:
        over = self.visual_tokens - (self.cache_tokens or self.visual_tokens)
        if over <= 0:
            return 0
        # Evict the most redundant; ties go to the oldest (stable sort on slot order).
        order = torch.sort(self.redundancy, descending=True, stable=True).indices
        drop = torch.zeros(self.visual_tokens, dtype=torch.bool)
        drop[order[:over]] = True
        keep_slots = torch.ones(cache_length(self.cache), dtype=torch.bool)
        keep_slots[self.visual_index[drop]] = False
        select_cache(self.cache, torch.nonzero(keep_slots).flatten())
        if self.eviction is not None:
            self.eviction.select(torch.nonzero(keep_slots).flatten())
        self.visual_groups = self.visual_groups[~drop]
        kept_visual = self.visual_index[~drop]
        # Slots shift down by the evicted tokens before each survivor.
        self.visual_index = torch.searchsorted(torch.nonzero(keep_slots).flatten(), kept_visual)
        self.redundancy = self.redundancy[~drop]
        return over

    # ----------------------------------------------------------- asking
    @torch.inference_mode()
    def ask(self, question: str, max_new_tokens: int = 32) -> StreamAnswer:
        """Close the video, add the question and the assistant prefix, decode greedily; the cache
        is then cropped back to the video, so the session is exactly as before."""
        if not question or not str(question).strip():
            raise PruneVidError("the question is empty")
        if self.steps == 0:
            raise PruneVidError("no video in the stream yet: append at least one chunk of 2 frames before asking")
        start = self.clock.start()
        _, suffix = self._split_template(question)
        suffix_ids = self._tokens(suffix)
        h, w = self.grid_hw
        ids = self._prefix_ids + self._video_ids + suffix_ids
        positions = prompt_positions(self.pipe, ids, (self.steps, h, w), self.fps)[:, -len(suffix_ids):]
        # The offline prompt's length (before any pruning), refused where run() would refuse it.
        self.pipe._check_length(len(ids), max_new_tokens)
        length = cache_length(self.cache)
        bytes_before = cache_bytes(self.cache)
        originals = list(self.cache.layers)
        states = recurrent_states(self.cache)
        answering = (self.eviction.answering(self.cache, self.visual_index, self.visual_groups, self.tokens_in)
                     if self.eviction is not None else nullcontext())
        self._answering = True
        try:
            with answering:
                first_logits, tokens, marks, kv_bytes = self._answer(suffix_ids, positions, max_new_tokens)
                held = cache_bytes(self.cache)  # with eviction: the answer's pruned copies ...
                if any(a is not b for a, b in zip(self.cache.layers, originals)):
                    held += cache_bytes(_Layers(originals))  # ... besides the stream's own layers
        finally:
            self._answering = False
            crop_cache(self.cache, length)
            restore_states(self.cache, states)
            if self.eviction is not None:
                self.eviction.crop(length)
        text = self.pipe.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        first, decode_end = marks
        return StreamAnswer(
            text=text, token_ids=tokens, first_logits=first_logits.float().cpu(),
            ttft_s=self.clock.elapsed(start, first), decode_s=self.clock.elapsed(first, decode_end),
            question_tokens=len(suffix_ids), kv_bytes=kv_bytes, extra_kv_bytes=held - bytes_before,
            cached_tokens=length, visual_tokens=self.visual_tokens, frames_seen=self.frames_seen,
            visual_tokens_kept=self.eviction.last.get("visual_tokens_kept") if self.eviction is not None else None,
            recurrent_state_bytes=state_bytes(self.cache), eviction_layers=self.eviction_layers,
        )

    def _answer(self, suffix_ids: list[int], positions: torch.Tensor, max_new_tokens: int):
        """Prefill the question, then decode greedily; every position row advances by one per
        token from the question's last, as the engine does."""
        out = self._prefill(ids=torch.tensor([suffix_ids], device=self.pipe.device), positions=positions)
        first_logits = out.logits[0, -1]
        token = first_logits.argmax(-1)
        first = self.clock.mark()
        kv_bytes = cache_bytes(self.cache)
        next_pos = [positions[:, -1:] + 1]

        def step(last):
            logits = self._prefill(ids=last, positions=next_pos[0]).logits[0, -1]
            next_pos[0] = next_pos[0] + 1
            return logits

        tokens = greedy_decode(token, step, max_new_tokens, self._stop)
        return first_logits, tokens, (first, self.clock.mark()), kv_bytes

    def ask_choice(self, question: str, options: Sequence[str], max_new_tokens: int | None = None) -> StreamAnswer:
        """A multiple-choice question (lettered options, the lmms-eval instruction). By default
        the answer is the option whose letter has the highest first-token logit (one forward);
        with ``max_new_tokens`` the reply is generated and its letter parsed, as ``run`` does
        (``choice`` None when no letter can be read; ``parse_status`` says why)."""
        from prunevid_bench.choices import LETTERS, format_mc_prompt, parse_choice
        from prunevid_bench.choices import letter_token_ids

        prompt = format_mc_prompt(question, options)
        if max_new_tokens is not None:
            answer = self.ask(prompt, max_new_tokens=max_new_tokens)
            answer.choice, answer.parse_status = parse_choice(answer.text, len(options), list(options))
            return answer
        answer = self.ask(prompt, max_new_tokens=1)
        letters = letter_token_ids(self.pipe.processor.tokenizer, len(options))
        answer.choice = int(answer.first_logits[letters].argmax())
        answer.text, answer.parse_status = LETTERS[answer.choice], "logits"
        return answer

    # ----------------------------------------------------------- prompt pieces
    def _split_template(self, question: str) -> tuple[str, str]:
        """The chat prompt around the video: text up to ``<|vision_start|>`` and from
        ``<|vision_end|>`` to the assistant prefix, as the offline run's template writes it."""
        prompt = self.pipe.build_prompt(question)
        if prompt.count(VIDEO_MARK) != 1:
            raise PruneVidError("the chat template must write exactly one video placeholder")
        prefix, suffix = prompt.split(VIDEO_MARK)
        return prefix, suffix

    def _tokens(self, text: str) -> list[int]:
        return list(self.pipe.processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_frames(frames) -> np.ndarray:
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise PruneVidError(f"a chunk must be frames [T, H, W, 3] with T >= 1, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise PruneVidError(f"a chunk's frames must be uint8 pixel values, got {array.dtype}")
    return array
