"""The engine: one prepared sample through the model, prefill then a greedy decode loop.

Positions are passed explicitly, exactly as transformers' ``generate`` builds them for
Qwen2-VL and Qwen2.5-VL: at prefill four rows (a text row ``arange(L)`` and the three M-RoPE rows
the model's family computes on the full, unpruned prompt); at decode step i every row advances by one
from the last prompt position. Decode positions therefore never depend on the KV-cache length,
which is what lets Stages 1-3 shorten the cache while decoding continues the unpruned numbering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunevid_bench.families import family_of
from prunevid_bench.measure import Clock, PeakMemory, cache_bytes, state_bytes


@dataclass
class EngineOutput:
    token_ids: list[int]
    first_logits: torch.Tensor  # [V] float32, logits of the first generated token (on CPU)
    ttft_s: float
    vision_encoder_s: float
    prefill_s: float  # TTFT minus the vision encoder: merging, LLM layers, pruning, first logits
    decode_s: float
    decode_tokens_per_s: float | None
    prefill_peak_memory_bytes: int
    decode_peak_memory_bytes: int
    memory_kind: str
    kv_cache_bytes: int  # after prefill, after any compression
    prefill_peak_by_phase: dict  # peak of each phase of the prefill the patch closed (``PeakMemory.phase``), else {}
    prompt_tokens: int
    visual_tokens: int
    state_bytes: int = 0  # a hybrid model's linear layers' conv and recurrent states after prefill
    vision_mergers_s: float = 0.0  # of vision_encoder_s: the patch merger(s) (Qwen3-VL: with its DeepStack mergers)


def prefill_position_ids(model, inputs: dict) -> torch.Tensor:
    """Position ids ``(4, 1, L)`` for the full prompt, as ``generate`` builds them; also sets
    the model's ``rope_deltas`` (see ``Family.prefill_position_ids``)."""
    return family_of(model).prefill_position_ids(model, inputs)


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def cache_keyword(model) -> str:
    """The name the model's forward takes the KV cache under: ``cache`` from transformers 5.24 on
    (which deprecates ``past_key_values``, to be removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_decode(first: torch.Tensor, step, max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding of one sample after its prefill, shared by the engine and streams: ``first``
    is the first token (a 0-d or [1] tensor), ``step(token [1, 1])`` runs one forward on the last
    token and returns the next logits [V]; stops at ``max_new_tokens`` or a stop token."""
    token = first
    tokens = [int(token)]
    while len(tokens) < max_new_tokens and tokens[-1] not in stop:
        token = step(token.view(1, 1)).argmax(-1)
        tokens.append(int(token))  # int() syncs: the loop is host-driven like generate's
    return tokens


@torch.inference_mode()
def run_greedy(model, inputs: dict, max_new_tokens: int, clock: Clock | None = None,
               memory: PeakMemory | None = None) -> EngineOutput:
    """Prefill + greedy decode of one sample (batch size 1). ``inputs`` is the processor output,
    already on the model's device. ``memory``: the patch's reader, which closes the prefill's
    phases (``ReductionHandle.memory``)."""
    from transformers import DynamicCache

    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError("the engine runs one sample per forward (batch size 1)")
    device = input_ids.device
    clock = clock or Clock(device)
    memory = memory or PeakMemory(device)
    stop = eos_ids(model)
    marks: dict = {}

    def mark(name):
        def hook(*_):
            marks[name] = clock.mark()

        return hook

    family = family_of(model)
    visual = family.vision_encoder(model)
    hooks = [visual.register_forward_pre_hook(mark("vision_start")), visual.register_forward_hook(mark("vision_end"))]
    merger_marks: list = []  # (start, end) of every merger call: the tower's time splits into blocks and mergers
    for merger in [family.vision_merger(model), *getattr(visual, "deepstack_merger_list", [])]:
        hooks += [merger.register_forward_pre_hook(lambda *_: merger_marks.append([clock.mark(), None])),
                  merger.register_forward_hook(lambda *_: merger_marks[-1].__setitem__(1, clock.mark()))]
    try:
        position_ids = prefill_position_ids(model, inputs)
        cache = DynamicCache(config=model.config.get_text_config())
        with_cache = {cache_keyword(model): cache}  # looked up once, outside the timed region
        model_inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
        model_inputs.update(position_ids=position_ids, **with_cache, use_cache=True, logits_to_keep=1)

        memory.reset(phases=True)
        start = clock.start()
        out = model(input_ids=input_ids, **model_inputs)
        first_logits = out.logits[:, -1, :]
        token = first_logits.argmax(-1)
        first = clock.mark()
        ttft_s = clock.elapsed(start, first)
        prefill_peak = memory.read()
        phases = memory.take_phases()
        kv_bytes, held_states = cache_bytes(cache), state_bytes(cache)
    finally:
        for h in hooks:
            h.remove()
    vision_s = clock.elapsed(marks.get("vision_start"), marks.get("vision_end"))

    next_pos = [position_ids[:, :, -1:] + 1]  # every row continues from the last prompt position

    def step(last):
        out = model(input_ids=last, position_ids=next_pos[0], **with_cache, use_cache=True, logits_to_keep=1)
        next_pos[0] = next_pos[0] + 1
        return out.logits[0, -1]

    memory.reset()
    decode_start = clock.mark()
    tokens = greedy_decode(token, step, max_new_tokens, stop)
    decode_end = clock.mark()
    decode_s = clock.elapsed(decode_start, decode_end)
    decode_peak = memory.read()
    steps = len(tokens) - 1
    return EngineOutput(
        token_ids=tokens,
        first_logits=first_logits[0].float().cpu(),
        ttft_s=ttft_s,
        vision_encoder_s=vision_s,
        vision_mergers_s=sum(clock.elapsed(a, b) for a, b in merger_marks) if vision_s else 0.0,
        prefill_s=max(0.0, ttft_s - vision_s),
        decode_s=decode_s,
        decode_tokens_per_s=(steps / decode_s) if steps > 0 and decode_s > 0 else None,
        prefill_peak_memory_bytes=prefill_peak,
        decode_peak_memory_bytes=decode_peak,
        memory_kind=memory.kind,
        kv_cache_bytes=kv_bytes,
        prefill_peak_by_phase=phases,
        prompt_tokens=int(input_ids.shape[1]),
        visual_tokens=int((input_ids == family.video_token_id(model)).sum()),
        state_bytes=held_states,
    )
