"""The checks of ``prunevid verify`` on one loaded pipeline: every registered method, in every
place its config can put it, on whatever model the pipeline holds (its family says where
everything is), so a new method or family is verified without editing this file.

- ``vanilla``: every method off, the engine gives vanilla ``generate``'s tokens and logits;
- ``reference`` (method ``none``): the engine, cache and all, equals the cache-free
  reference with nothing dropped (the reference's own agreement on this setup);
- ``nothing``: each method at a kept fraction of 1 (its ``budget_knob``, else the settings it
  declares in ``keeps_everything``) reduces nothing and gives the vanilla tokens and logits;
- ``reference``: each method's reduced run equals the cache-free reference on the same LLM input
  (its kept rows, layer, proportional attention and decode ids, all read off the patch's state);
- ``inputs`` (``inputs.py``): a video file's model inputs equal qwen-vl-utils' (qwen policy);
- ``scores``: an LLM-layer method whose scores are attention weights (``Method.attention_scores``)
  leaves the scored layer's eager attention weights, read by the rule it names;
- ``chunked``: the baseline and each LLM-layer method with ``prefill.chunk_tokens`` (chunks of a
  third of the prompt) give the whole prefill's tokens and logits (on this device's attention).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from prunevid_bench.families import family_of
from prunevid_bench.verify.reference import Traced, reference_for, trace

# Logit tolerance by dtype: absolute + relative to the largest |logit| of the reference. fp32: the
# tests' bound. bf16/fp16: 8 units in the last place of a logit of magnitude max(1, largest |logit|)
# (2**-5 for bf16's 8-bit mantissa, 2**-8 for fp16's 11); docs/verify.md gives the measurements.
TOLERANCES = {"float32": (1e-4, 0.0), "float16": (2**-8, 2**-8), "bfloat16": (2**-5, 2**-5)}
# Scores are attention probabilities in [0, 1]: an absolute bound, 8 ulp at 1 in bf16/fp16.
SCORE_TOLERANCES = {"float32": 1e-5, "float16": 2**-8, "bfloat16": 2**-5}


@dataclass
class Check:
    check: str  # vanilla | nothing | reference | scores
    method: str  # "none", or a method (with the choice that moved it: name[key=value])
    diff: float | None  # the measured max |difference|; None when it did not run
    tol: float | None
    passed: bool | None  # None: could not run (``note`` says why)
    note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def logit_tolerance(dtype: str, reference: torch.Tensor) -> float:
    absolute, relative = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
    return absolute + relative * float(reference.abs().max())


def compare(name: str, label: str, got: Traced | tuple, want: Traced | tuple, tol: float, note: str = "") -> Check:
    """Tokens equal and logits within ``tol`` over the steps both runs share. A low-precision run
    may part on a near tie (the two tokens' logits closer than 2 * tol): compared up to there."""
    got_ids, got_logits = _tokens_logits(got)
    want_ids, want_logits = _tokens_logits(want)
    n = min(len(got_ids), len(want_ids))
    part = next((i for i in range(n) if got_ids[i] != want_ids[i]), None)
    steps = n if part is None else part + 1
    diff = float((got_logits[:steps] - want_logits[:steps]).abs().max()) if steps else 0.0
    passed = diff <= tol
    if part is not None:
        margin = float((got_logits[part, got_ids[part]] - got_logits[part, want_ids[part]]).abs())
        tie = margin <= 2 * tol
        passed = passed and tie
        note = f"tokens part at step {part} ({'a near tie' if tie else 'not a tie'}: margin {margin:.2g})"
    elif len(got_ids) != len(want_ids):
        passed, note = False, f"{len(got_ids)} tokens against {len(want_ids)}"
    return Check(name, label, diff, tol, passed, note)


def _tokens_logits(run) -> tuple[list[int], torch.Tensor]:
    if isinstance(run, Traced):
        return list(run.result.generated_token_ids), run.logits
    return run


def variants(method) -> list[tuple[str, dict]]:
    """(label, its own overrides) for the method's default config and for each choice value that
    moves it to another place (PruneVid Stage 1's ``space``)."""
    default = method.config()
    out, places = [(method.name, {})], {method.where(default)}
    for key, values in method.choices.items():
        for value in values:
            place = method.where(dataclasses.replace(default, **{key: value}))
            if place not in places:
                places.add(place)
                out.append((f"{method.name}[{key}={value}]", {key: value}))
    return out


def score_variants(method) -> list[tuple[str, dict, str]]:
    """(label, overrides, rule) for each distinct attention-weight rule the method's configs give."""
    if method.attention_scores is None:
        return []
    default = method.config()
    options = [({}, default)] + [({key: value}, dataclasses.replace(default, **{key: value}))
                                 for key, values in method.choices.items() for value in values]
    out, rules = [], set()
    for over, cfg in options:
        rule = method.attention_scores(cfg)
        if rule is not None and rule not in rules:
            rules.add(rule)
            label = method.name + "".join(f"[{k}={v}]" for k, v in over.items())
            out.append((label, over, rule))
    return out


def score_rule(rule: str, weights: torch.Tensor, visual: torch.Tensor, query_start: int) -> torch.Tensor:
    """[V] scores read off one layer's attention weights [H, L, L] by ``rule``."""
    if rule == "last_row":
        return weights[:, -1, visual].mean(dim=0)
    if rule == "query_rows":
        return weights[:, query_start:][:, :, visual].amax(dim=0).amax(dim=0)
    raise ValueError(f"unknown attention-score rule {rule!r}")


class Verifier:
    """The checks on one pipeline and one prepared sample; ``dtype`` names the tolerances."""

    def __init__(self, pipe, prepared, dtype: str, n_tokens: int):
        self.pipe, self.prepared, self.dtype = pipe, prepared, dtype
        base = pipe.config.to_dict()
        base.setdefault("generation", {})["max_new_tokens"] = n_tokens
        from prunevid_bench.methods import all_methods

        for m in all_methods():
            base.setdefault(m.section, {})["enabled"] = False
        self.base = base
        self.vanilla: Traced | None = None

    def config(self, method=None, **settings):
        from prunevid_bench.pipeline import _with_overrides

        over = {} if method is None else {f"{method.section}.enabled": True,
                                          **{f"{method.section}.{k}": v for k, v in settings.items()}}
        return _with_overrides(self.base, over)

    def run(self, method=None, **settings) -> Traced:
        return trace(self.pipe, self.prepared, self.config(method, **settings))

    # -------------------------------------------------------------- the checks
    def baseline(self) -> list[Check]:
        self.vanilla = self.run()
        model, inputs = self.pipe.model, self.prepared.inputs
        self.pipe.remove_stages()
        n = len(self.vanilla.logits)
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        ids = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        theirs = (ids, torch.cat(gen.logits).float().cpu())
        tol = logit_tolerance(self.dtype, theirs[1])
        checks = [compare("vanilla", "none", self.vanilla, theirs, tol, "engine against transformers' generate")]
        ref = reference_for(self.pipe, self.prepared, self.vanilla)
        return checks + [self._against_reference("none", self.vanilla, ref)]

    def method(self, method) -> list[Check]:
        out = []
        for label, over in variants(method):
            out.append(self._refusable("nothing", label, self._nothing, method, label, over))
            out.append(self._refusable("reference", label, self._reference, method, label, over))
        for label, over, rule in score_variants(method):
            out.append(self._refusable("scores", label, self._scores, method, label, over, rule))
        return out

    def chunked(self, methods) -> list[Check]:
        """The baseline and each LLM-layer method among ``methods``, chunked against whole."""
        n = self.prepared.inputs["input_ids"].shape[1] // 3 + 1  # a boundary inside the video, one after it
        layer_methods = [m for m in methods if m.pruning_layer is not None]
        return [self._refusable("chunked", m.name if m else "none", self._chunked, m, n) for m in [None, *layer_methods]]

    def _chunked(self, method, n: int) -> Check:
        whole = self.run(method)
        cfg = self.config(method)
        cfg.prefill.chunk_tokens = n
        tol = logit_tolerance(self.dtype, whole.logits)
        return compare("chunked", method.name if method else "none", trace(self.pipe, self.prepared, cfg), whole, tol,
                       f"chunks of {n} against the whole prefill")

    @staticmethod
    def _refusable(name: str, label: str, check, *args) -> Check:
        """A check whose run the method or the family refuses (e.g. a place a family does not
        support): not run, with the refusal as its reason."""
        from prunevid_bench.errors import PruneVidError

        try:
            return check(*args)
        except PruneVidError as exc:
            return Check(name, label, None, None, None, f"refused: {exc}")

    def _nothing(self, method, label: str, over: dict) -> Check:
        if method.budget_knob is not None:
            cfg = dataclasses.replace(method.config(), **over)
            settings = {**over, **method.budget_knob(cfg, 1.0).settings}
        elif method.keeps_everything is not None:
            settings = {**over, **method.keeps_everything}
        else:
            return Check("nothing", label, None, None, None, "no budget_knob or keeps_everything: no setting "
                         "known to reduce nothing")
        run = self.run(method, **settings)
        r = run.result
        kept = r.visual_tokens_kept if r.visual_tokens_kept is not None else r.tokens_after_visual_methods
        tol = logit_tolerance(self.dtype, self.vanilla.logits)
        if kept != r.visual_tokens:
            return Check("nothing", label, None, tol, False, f"kept fraction 1 still removed {r.visual_tokens - kept} "
                         f"of {r.visual_tokens} tokens")
        return compare("nothing", label, run, self.vanilla, tol)

    def _reference(self, method, label: str, over: dict) -> Check:
        run = self.run(method, **over)
        r = run.result
        kept = r.visual_tokens_kept if r.visual_tokens_kept is not None else r.tokens_after_visual_methods
        if kept == r.visual_tokens and method.tower is None:  # (a tower method may change the tokens, not their count)
            return Check("reference", label, None, None, None, "its default settings reduced nothing on this clip")
        ref = reference_for(self.pipe, self.prepared, run)
        return self._against_reference(label, run, ref, f"{r.visual_tokens} -> {kept} tokens")

    def _against_reference(self, label: str, run: Traced, ref: torch.Tensor, note: str = "") -> Check:
        tol = logit_tolerance(self.dtype, ref)
        diff = float((run.logits - ref).abs().max())
        return Check("reference", label, diff, tol, diff <= tol, note or "cache-free, nothing dropped")

    def _scores(self, method, label: str, over: dict, rule: str) -> Check:
        model, inputs = self.pipe.model, self.prepared.inputs
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        note = "" if impl == "eager" else f"{impl} gives no weights: eager's of the same layer"
        handle = self.pipe._apply_stages(self.config(method, **over))
        if impl != "eager":
            model.set_attn_implementation("eager")
        try:
            with torch.inference_mode():
                position_ids = family_of(model).prefill_position_ids(model, inputs)
                out = model(**inputs, position_ids=position_ids, output_attentions=True)
        finally:
            if impl != "eager":
                model.set_attn_implementation(impl)
            self.pipe.remove_stages()
        st = handle.state
        if st.scores is None or out.attentions is None:
            return Check("scores", label, None, None, False, "the method left no scores, or the model no weights")
        # one entry per softmax-attention layer (a hybrid model records its full-attention ones only)
        attending = family_of(model).attention_layers(model.config)
        weights = out.attentions[attending.index(handle.score_layer) if len(out.attentions) < len(
            family_of(model).decoder_layers(model)) else handle.score_layer][0].float()
        want = score_rule(rule, weights, st.visual_positions.to(weights.device), int(st.query_start))
        diff = float((st.scores.float() - want).abs().max())
        tol = SCORE_TOLERANCES.get(self.dtype, SCORE_TOLERANCES["bfloat16"])
        return Check("scores", label, diff, tol, diff <= tol, note or f"rule {rule}, layer {handle.score_layer}")
