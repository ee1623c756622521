"""The LLM's input: each video's tokens as one object (``tokens.VideoTokens``: embeddings, M-RoPE
ids, sizes, extras), reduced by the ``visual_tokens`` methods' operators, and spliced back into
the prompt by the family's placeholder runs (never "first index + offset")."""

from __future__ import annotations

import dataclasses

import torch

from prunevid_bench import splice
from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import call_method, check_reduction
from prunevid_bench.patch.state import SampleState
from prunevid_bench.tokens import VideoTokens, apply_reduction, weighted_rows


class LLMInput:
    """Mixed into ``ReductionHandle``."""

    def _with_extras(self, tokens: VideoTokens) -> VideoTokens:
        """The per-token tensors the run's methods carry (``Method.extras``), added where the
        video object is made, so that every reduction applies to them."""
        for method, cfg in self.methods:
            if method.extras is not None:
                tokens.extras.update(method.extras(tokens, cfg))
        return tokens

    def _reduce_video(self, tokens: VideoTokens, n_groups: int, methods, st: SampleState
                      ) -> tuple[VideoTokens, int, bool, int | None]:
        """Run ``methods`` on one video (its tokens in ``n_groups`` groups) in order, applying
        each one's operator and recording into ``st``; returns the tokens, the number of groups
        they are in, whether a method asked for proportional attention and the renumbering of
        what follows the video (``VisualReduction.positions_after``)."""
        proportional, after = False, None
        for method, cfg in methods:
            start = self.clock.mark()
            red = call_method(method, "reduce", (tokens, cfg),
                              lambda out: check_reduction(method, out, int(tokens.index.numel())))
            counts = st.method_tokens.setdefault(method.name, [0, 0])
            counts[0] += int(tokens.index.numel())
            tokens = apply_reduction(tokens, red, method.name)
            st.kept_by_method.setdefault(method.name, []).append((tokens.index, tokens.origin))
            counts[1] += int(tokens.index.numel())
            for key, value in red.stats.items():
                st.method_stats[key] = st.method_stats.get(key, 0) + int(value)
            proportional = proportional or red.proportional_attention
            after = red.positions_after if red.positions_after is not None else after
            n_groups = int(tokens.group.max()) + 1 if tokens.group.numel() else 0
            st.method_marks.setdefault(method.name, []).append((start, self.clock.mark()))
        return tokens, n_groups, proportional, after

    def _on_llm_input(self, module, args, kwargs):
        st = self.state
        embeds = kwargs.get("inputs_embeds")
        if not st.prefill or embeds is None or st.input_ids is None or embeds.shape[1] != st.input_ids.shape[0]:
            return None
        ids, device = st.input_ids, st.input_ids.device
        grids = st.video_grid_thw.tolist() if st.video_grid_thw is not None else []
        runs = self.family.video_runs(self.model, ids, grids)
        st.tokens_in_prompt = int((ids == self.video_token_id).sum())
        encoded = self._take_before_merger(len(grids))
        deepstack = self._take_deepstack(kwargs)  # DeepStack's levels: added by the patch (patch.deepstack)
        unpruned = kwargs.get("position_ids")
        mrope = unpruned[-3:, 0] if unpruned is not None else None
        videos, n_groups, proportional, shifts = [], [], False, []
        family_extras = self.family.visual_extras(self.model, kwargs, runs)
        for extras, scores in zip(family_extras, self._take_vision_scores(len(grids))):
            extras.update(scores)  # the tower's attention, for the methods that read it
        for i, (video_runs, (t, h, w)) in enumerate(zip(runs, grids)):
            place = splice.run_positions(video_runs, device)  # prompt position of each grid token
            if encoded is not None:  # the encoder methods chose these tokens; the merger projected only them
                tokens, groups = encoded.videos[i]
                extras = {key: weighted_rows(value, tokens.origin.to(value.device), torch.ones(place.numel()),
                                             tokens.index.numel()) for key, value in family_extras[i].items()}
                tokens = dataclasses.replace(tokens, embeds=embeds[0, place[tokens.index]], extras={**tokens.extras, **extras})
            else:
                levels = self._video_levels(deepstack, place) if self.deepstack_mode == "merge" else {}
                tokens = self._with_extras(VideoTokens.full_grid(embeds[0, place], t, place.numel() // t, w // self.merge,
                                                                 extras={**family_extras[i], **levels}))
                groups = t
            if mrope is not None:
                tokens.positions = mrope[:, place[tokens.index]]
            if self.visual_methods:
                tokens, groups, asked, after = self._reduce_video(tokens, groups, self.visual_methods, st)
                proportional = proportional or asked
                if after is not None and self.family.video_layout == "step":
                    raise PruneVidError(f"positions_after (EVS's positions: vllm) is not supported on "
                                        f"{self.family.model_type} yet; use positions: original")
                if after is not None:  # the video's first and end prompt positions, what it adds for the next token
                    shifts.append((video_runs[0][0], video_runs[-1][1], after))
            videos.append((place[tokens.index], tokens))
            n_groups.append(groups)
        st.videos = [v for _, v in videos]

        is_text = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
        for video_runs in runs:
            is_text[splice.run_positions(video_runs, device)] = False
        kept = [p for p, _ in videos]
        source = torch.sort(torch.cat([torch.nonzero(is_text).flatten(), *kept])).values
        rows = [torch.searchsorted(source, p) for p in kept]  # each video's rows in the LLM input
        if self.visual_methods or encoded is not None:
            new_embeds = embeds[:, source]  # a copy (index-selected), so written in place below
            for r, (_, tokens) in zip(rows, videos):
                new_embeds[0, r] = tokens.embeds.to(new_embeds.dtype)
            splice.select_llm_inputs(kwargs, source, new_embeds)
            for r, (_, tokens) in zip(rows, videos):  # the operators' positions (the representatives' ids)
                kwargs["position_ids"][-3:, 0, r] = tokens.positions.to(kwargs["position_ids"].dtype)
        self.family.put_visual_extras(self.model, kwargs, st.videos, rows)
        if shifts:
            self._renumber_after_videos(kwargs, [(int(torch.searchsorted(source, end)), start, end, after)
                                                 for start, end, after in shifts], unpruned)
        st.source_index = source
        self._set_deepstack(deepstack, source, videos, rows)
        # the videos' working copies are in the LLM input (and DeepStack's levels in st.deepstack)
        # now: let them go, so the prefill holds no second copy of the video
        st.videos = [dataclasses.replace(v, embeds=None, extras={k: x for k, x in v.extras.items()
                                                                 if not k.startswith("deepstack.")}) for v in st.videos]
        st.row_sizes = torch.ones(source.numel(), device=device)
        for r, (_, tokens) in zip(rows, videos):
            st.row_sizes[r] = tokens.sizes.to(device).float()
        if proportional:
            if self.layer_method is not None:
                raise PruneVidError("proportional attention cannot be combined with an LLM-layer method yet; turn one off")
            if "flash" in self.attn_implementation:
                raise PruneVidError("proportional attention needs an additive mask: use --attn-implementation sdpa or eager")
            st.key_log_size = st.row_sizes.log()
        visual = torch.zeros(source.numel(), dtype=torch.bool, device=device)
        if rows:
            visual[torch.cat(rows)] = True
        st.visual_positions = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=device)
        offsets = torch.tensor([0, *n_groups], device=device).cumsum(0).tolist()
        st.visual_groups = (torch.cat([v.group.to(device) + o for (_, v), o in zip(videos, offsets)]) if videos
                            else torch.zeros(0, dtype=torch.long, device=device))
        st.tokens_after_visual = int(st.visual_positions.numel())
        st.tokens_before = st.tokens_after = st.tokens_after_visual
        # the query rows: every row after the last visual token of the last video, its
        # <|vision_end|> included (the official code's img_end + 1 on)
        st.query_start = int(torch.searchsorted(source, runs[-1][-1][1])) if runs else None
        if self.layer_method is not None and st.tokens_after_visual > 0:
            question = splice.text_start(ids[source], visual, self.vision_end_token_id)
            if question is None or question >= source.numel():
                raise PruneVidError(
                    f"{self.layer_method[0].name} needs text after the video (the question); the prompt ends with the video"
                )
        self._phase("before_llm")
        return args, kwargs

    def _renumber_after_videos(self, kwargs, shifts, unpruned) -> None:
        """Apply the reductions' ``positions_after``: shifts [(index after the video in the LLM
        input, the video's start and end in the prompt, n)]; unpruned (4 or 3, 1, L) ids. Each
        move is read off the unpruned ids, so later moves add to earlier ones unchanged."""
        st, ids = self.state, unpruned[-3:, 0]
        pos = kwargs["position_ids"]
        for new_end, start, end, after in shifts:
            if end < ids.shape[1]:
                pos = splice.shift_positions(pos, new_end, int(ids[0, start]) + after - int(ids[0, end]))
        kwargs["position_ids"] = pos
        # Decoding continues from the largest id + 1 (vLLM's mrope_position_delta); callers pass
        # positions continuing the unpruned last id + 1 (the engine, generate), so they move by this.
        st.prompt_max_id = int(pos[-3:].max())
        st.decode_position_shift = st.prompt_max_id - int(ids[:, -1].max())
