"""``ReductionHandle``: the run's methods installed on a loaded model as hooks, one
``SampleState`` per prefill. The work of each place lives in its own module (``encoder``,
``llm_input``, ``layer``, ``key_bias``, ``report``); this one installs and removes the hooks and
keeps the prefill's bookkeeping at the model's entry and exit."""

from __future__ import annotations

import functools

import torch

from prunevid_bench import splice
from prunevid_bench.config import RunConfig
from prunevid_bench.config_layers import method_layers
from prunevid_bench.errors import PruneVidError
from prunevid_bench.families import family_of
from prunevid_bench.measure import Clock, PeakMemory
from prunevid_bench.methods import all_methods, place_key
from prunevid_bench.patch.decode import DecodeMethod
from prunevid_bench.patch.chunked import ChunkedPrefill
from prunevid_bench.patch.deepstack import DeepStack
from prunevid_bench.patch.encoder import EncoderSide
from prunevid_bench.patch.key_bias import KeyBias
from prunevid_bench.patch.layer import LayerMethod
from prunevid_bench.patch.llm_input import LLMInput
from prunevid_bench.patch.report import Reporting
from prunevid_bench.patch.state import BeforeMerger, SampleState
from prunevid_bench.patch.vision_attention import VisionAttention


class ReductionHandle(EncoderSide, LLMInput, LayerMethod, KeyBias, Reporting, DeepStack, VisionAttention, DecodeMethod,
                      ChunkedPrefill):
    def __init__(self, model, config: RunConfig):
        self.model = model
        self.family = family_of(model)
        self.state = SampleState()
        self._encoded_video_grid_thw = None  # grids of the last get_video_features call (see _remember_video_grids)
        self.clock = Clock(next(model.parameters()).device)
        self.memory = PeakMemory(next(model.parameters()).device)  # the engine's, so the prefill's phases are read
        self.chunk_tokens = config.prefill.chunk_tokens  # 0: the prefill in one piece (patch.chunked)
        self._hooks: list = []
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.video_token_id = self.family.video_token_id(model)
        self.vision_end_token_id = self.family.vision_end_token_id(model)
        self.merge = self.family.geometry(model.config).merge
        text = model.config.get_text_config()
        self.attn_implementation = str(getattr(text, "_attn_implementation", None) or
                                       getattr(model.config, "_attn_implementation", ""))
        enabled = [(m, config.section(m.section)) for m in all_methods() if config.section(m.section).enabled]
        self.tower_methods = [(m, c) for m, c in enabled if m.where(c) == "vision_encoder" and m.tower is not None]
        self.encoder_methods = [(m, c) for m, c in enabled if m.where(c) == "vision_encoder" and (
            m.reduces_merger_input is None or m.reduces_merger_input(c))]  # those reducing the merger's input
        self.visual_methods = [(m, c) for m, c in enabled if m.where(c) == "visual_tokens"]
        self.vision_rules = self._vision_rules(enabled)  # the tower attention the methods read (patch.vision_attention)
        self._vision_scores = None
        self._encoding_videos = False  # inside get_video_features: the merger is projecting video tokens
        self._before_merger: BeforeMerger | None = None  # what the encoder methods did in the last video pass
        self.deepstack_mode = config.model.deepstack  # a merged token's DeepStack levels (patch.deepstack)
        if self.encoder_methods and self.family.deepstack_levels(model):
            raise PruneVidError(f"{self.encoder_methods[0][0].name} inside the vision encoder is not supported on "
                                f"{self.family.model_type} (DeepStack); place it on the LLM's visual tokens instead")
        layer = [(m, c) for m, c in enabled if "llm_layer" in m.acts_at(c)]
        if len(layer) > 1:
            raise PruneVidError("one LLM-layer method per run; disable all but one")
        self.layer_method = layer[0] if layer else None
        self.layer_key = place_key(layer[0][0], "llm_layer", layer[0][1]) if layer else None  # its record entries' name
        decode = [(m, c) for m, c in enabled if "decode" in m.acts_at(c)]
        if len(decode) > 1:
            raise PruneVidError("one decode method per run; disable all but one")
        self.decode_method = decode[0] if decode else None
        self.decode_key = place_key(decode[0][0], "decode", decode[0][1]) if decode else None
        self.decode_at = None  # l: the first layer that attends to a decode method's kept positions
        if self.decode_method is not None:
            self._check_decode()
        # The absolute layer K, resolved here once (an index or "K/N"); everything downstream reads
        # this, and score_layer: the last layer on every token (K, or K-1 for a method pruning before K).
        self.pruning_layer_spec = self.layer_method[0].pruning_layer(self.layer_method[1]) if layer else None
        self.pruning_layer = self.score_layer = self.requested_layer = None
        # the layers with softmax attention and a KV cache: all, or a hybrid model's full-attention ones
        self.attention_layers = self.family.attention_layers(model.config)
        if layer:
            self.pruning_layer, self.score_layer, self.requested_layer = method_layers(
                layer[0][0], self.pruning_layer_spec, self.num_layers, self.attention_layers)

    @property
    def methods(self) -> list:
        """(method, config) of each enabled method, in the order they run (once each)."""
        out = []
        for method, cfg, _ in self.placed:
            if all(m is not method for m, _ in out):
                out.append((method, cfg))
        return out

    @property
    def placed(self) -> list:
        """(method, config, place) of each place an enabled method acts at, in the order they run."""
        tower_only = [mc for mc in self.tower_methods if mc not in self.encoder_methods]  # inside the blocks only
        return ([(m, c, "vision_encoder") for m, c in tower_only + self.encoder_methods]
                + [(m, c, "visual_tokens") for m, c in self.visual_methods]
                + ([(*self.layer_method, "llm_layer")] if self.layer_method else [])
                + ([(*self.decode_method, "decode")] if self.decode_method else []))

    def _install(self) -> None:
        fam, model = self.family, self.model
        base, lm = fam.base(model), fam.language_model(model)
        add = self._hooks.append
        add(base.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        add(self._remember_video_grids(base))
        if self.encoder_methods:
            add(self._wrap_merger(fam.vision_merger(model)))
        if self.vision_rules:
            self._install_vision_attention(add)
        for method, cfg in self.tower_methods:  # inside the tower's blocks (after the merger's wrapper)
            add(method.tower(self, cfg))
        add(lm.register_forward_pre_hook(self._on_llm_input, with_kwargs=True))
        add(lm.register_forward_hook(self._on_llm_output))
        if self.visual_methods:  # proportional attention, when a method's reduction asks for it
            attending = [(i, fam.decoder_layers(model)[i]) for i in self.attention_layers]  # a linear layer has no logits
            for i, layer in attending:
                add(layer.register_forward_pre_hook(functools.partial(self._add_key_bias, i), with_kwargs=True))
            add(self._wrap_sdpa({id(fam.attention(layer)) for _, layer in attending}))
        if self.layer_method is not None:
            layers = fam.decoder_layers(model)
            k = self.score_layer
            q_at, k_at = fam.query_key(fam.attention(layers[k]))
            add(q_at.register_forward_hook(self._capture("q")))
            add(k_at.register_forward_hook(self._capture("k")))
            add(layers[k].register_forward_pre_hook(self._capture_layer_inputs, with_kwargs=True))
            add(layers[k].register_forward_hook(self._reduce_at_layer, with_kwargs=True))
            for i, later in enumerate(layers[k + 1 :], start=k + 1):
                add(later.register_forward_pre_hook(functools.partial(self._slice_layer_inputs, i), with_kwargs=True))

        if self.decode_method is not None:
            self._install_decode(fam.decoder_layers(model), add)
        if fam.deepstack_levels(model):
            self._install_deepstack(fam.decoder_layers(model), add)
        self._install_chunking(fam.decoder_layers(model), add)

    def remove(self) -> None:
        for h in reversed(self._hooks):  # last in, first out: stacked overrides each find their own
            h.remove()
        self._hooks.clear()

    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        cache = splice.cache_kwarg(kwargs)
        if input_ids is not None and input_ids.shape[1] > 1 and (cache is None or cache.get_seq_length() == 0):
            if input_ids.shape[0] != 1:
                raise PruneVidError("PruneVid runs one sample per forward (batch size 1); shard the dataset instead")
            grids = kwargs.get("video_grid_thw")
            if grids is None and (kwargs.get("mm_encoder_outputs") or {}).get("video") is not None:
                grids = self._encoded_video_grid_thw  # generate(): the tower already ran
            self.state = SampleState(input_ids=input_ids[0], video_grid_thw=grids, prefill=True)
            return None
        shift, pos = self.state.decode_position_shift, kwargs.get("position_ids")
        if shift and pos is not None and cache is not None and cache.get_seq_length() > 0:
            # A caller's explicit decode positions continue the unpruned numbering (the engine
            # and generate alike); loops that leave them to the model get it from rope_deltas.
            kwargs["position_ids"] = splice.shift_positions(pos, 0, shift)
            return args, kwargs
        return None

    def _on_llm_output(self, module, args, output):
        st = self.state
        self._phase("layers_after_k" if st.keep_index is not None else "llm_layers")
        if st.prefill and st.source_index is not None:
            # Decode loops that let the model derive positions (position_ids=None) use
            # cache length + rope_deltas; the cache is shorter by the dropped tokens, so the delta
            # grows by as much and decoding continues the unpruned numbering (what layer 0's
            # cache holds: a method that leaves the early layers whole keeps it unpruned). Our
            # engine and generate() pass explicit positions and never read it.
            final_len = st.keep_index.numel() if st.keep_index is not None and st.compacted else st.source_index.numel()
            base = self.family.base(self.model)
            deltas = getattr(base, "rope_deltas", None)
            if deltas is not None and st.prompt_max_id is not None:  # renumbered: continue after its largest id
                base.rope_deltas = torch.full_like(deltas, st.prompt_max_id + 1 - final_len)
            elif deltas is not None:
                base.rope_deltas = deltas + (st.input_ids.shape[0] - final_len)
        st.prefill = False  # whatever follows is decoding
        st.captured.clear()
        return None


def apply_methods(model, config: RunConfig) -> ReductionHandle:
    """Install the hooks for the run's enabled methods on a loaded model; returns the handle."""
    handle = ReductionHandle(model, config)
    try:
        handle._install()
    except BaseException:  # a refusal or error while installing leaves the model as it was
        handle.remove()
        raise
    return handle
