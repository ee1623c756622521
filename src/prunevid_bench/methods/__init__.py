"""Token-reduction methods as a registry.

A :class:`Method` declares where it acts (``ACTS``), its config dataclass (one YAML section,
named after the method's ``section``, with an ``enabled`` switch), the ranges of its keys and
the fields it adds to the run record. The patch (``prunevid_bench.patch``) runs the enabled
methods of a run in ``ACTS`` order, and within one place in registration order:

- ``visual_tokens``: on each video's visual tokens after the vision encoder, before the LLM;
  ``reduce(tokens: VideoTokens, cfg) -> VisualReduction``, an operator (``prunevid_bench.tokens``:
  which output row each token went to); the patch applies it to the embeddings, positions,
  sizes and every extra per-token tensor alike.
- ``llm_layer``: after decoder layer K (or, with ``prunes_before``, before it: after layer K-1),
  with the question visible; ``select(ctx: LayerContext, cfg) -> kept`` (indices into the visual
  positions) or a :class:`LayerReduction` (a drop, or a merge into the kept rows). The patch
  applies it to the hidden states, the later layers' inputs and (unless the reduction says
  otherwise) the KV cache of the layers that ran on all tokens. One such method per run.
- ``vision_encoder``: inside the vision tower, on each video's patch features before the patch
  merger: ``reduce(tokens: VideoTokens, cfg) -> VisualReduction`` as for ``visual_tokens``, but
  each token's ``embeds`` row is the merger's input for that LLM token (its merge x merge patch
  features side by side, [V, merge^2 * C_vision]) and the operator acts in that space; the
  patch projects only its output rows through the merger, then drops the others before the LLM.

A method may also carry per-token tensors of its own (``extras``: ``(VideoTokens, cfg) ->
{name: [V, ...]}``): they are added where the video object is made, before any reduction, so
every operator applies to them.

A method whose place depends on its config (PruneVid Stage 1's ``space``) says so with
``placement``: ``cfg -> one of ACTS``; ``Method.where(cfg)`` is the place of one run.

A method may also act at further places of one run (``also``: ``{place: cfg -> on}``; HoliTom's
inner merge at layer K, DyCoke's ``decode`` stage), listed by ``acts_at(cfg)``; its record
entries there are keyed ``name@place`` (``place_key``). ``decode``: at each decoding step, after
layer ``decode_layer(cfg) - 1`` ran on the new token, ``decode(ctx: DecodeContext, cfg) -> kept``
(visual tokens, indices into ``ctx.visual``, that the later layers attend to beside every text
and generated position; None: all); the cache itself is never shortened.

Built-in methods live in this package, one file each; others register with
:func:`register_method` or through the entry point group ``prunevid_bench.methods`` (the entry
point names a module or a callable; loading it registers the method).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods.knobs import BUDGET, UNIT, BudgetKnob, Range, check_budget, fraction_knob  # noqa: F401
from prunevid_bench.tokens import VideoTokens, VisualReduction  # noqa: F401  (what visual-token methods see and return)

ACTS = ("vision_encoder", "visual_tokens", "llm_layer", "decode")
ENTRY_POINT_GROUP = "prunevid_bench.methods"
_BUILTIN_MODULES = (
    "prunevid_bench.methods.prunevid_stage1",
    "prunevid_bench.methods.prunevid_stage2",
    "prunevid_bench.methods.random_keep",
    "prunevid_bench.methods.fastv",
    "prunevid_bench.methods.tome",
    "prunevid_bench.methods.evs",
    "prunevid_bench.methods.vidcom2",
    "prunevid_bench.methods.merge_nearest",
    "prunevid_bench.methods.visionzip",
    "prunevid_bench.methods.fastvid",
    "prunevid_bench.methods.flashvid",
    "prunevid_bench.methods.holitom",
    "prunevid_bench.methods.dycoke",
    "prunevid_bench.methods.tome_vision",
)


@dataclass(frozen=True)
class Method:
    name: str
    acts: str  # one of ACTS
    config: type  # a dataclass with an ``enabled: bool`` field; its YAML section is ``section``
    summary: str  # one line for ``prunevid methods``
    section: str = ""  # the config section; the name by default
    ranges: dict[str, Range] = field(default_factory=dict)
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # string keys and their allowed values
    record_fields: tuple[str, ...] = ()  # what it adds to the run record
    reduce: Callable | None = None  # vision_encoder, visual_tokens
    select: Callable | None = None  # llm_layer
    pruning_layer: Callable[[Any], Any] | None = None  # llm_layer: cfg -> the layer as configured ("K/N" or index)
    extras: Callable[[Any, Any], dict] | None = None  # (VideoTokens, cfg) -> {name: [V, ...]} per-token tensors it carries
    # llm_layer: True when the configured K is the first layer that runs on the kept tokens (FastV:
    # it scores with layer K-1's attention); False when K is scored and pruned after (PruneVid)
    prunes_before: bool = False
    placement: Callable[[Any], str] | None = None  # cfg -> where it acts, when that depends on the config
    integer_seconds: Callable[[Any], bool] | None = None  # cfg -> number video time ids with int(seconds per step) (prunevid_bench.mrope)
    budget_knob: Callable[[Any, float], BudgetKnob] | None = None  # (cfg, kept fraction) -> its settings and promised count
    # llm_layer: cfg -> how its scores read off the scored layer's attention weights (``prunevid verify``):
    # "last_row" (the last prompt row, mean over heads), "query_rows" (max over heads, then over the rows
    # from query_start), or None (this config's scores are not attention weights)
    attention_scores: Callable[[Any], str | None] | None = None
    keeps_everything: dict[str, Any] | None = None  # settings that reduce nothing, where no budget_knob says it (verify)
    departs: str = ""  # where it departs from its original's code, one line (`prunevid methods show`); details in docs
    # cfg -> the vision tower attention rule it reads ("received", "pseudo_cls": stages.vision_attention) or None;
    # the patch captures the last vision block's q/k under any attention kernel and hands each video the
    # per-token extra "vision_<rule>" (patch.vision_attention)
    vision_attention: Callable[[Any], str | None] | None = None
    also: dict[str, Callable[[Any], bool]] = field(default_factory=dict)  # further places: place -> cfg -> acts there
    decode: Callable | None = None  # decode: (DecodeContext, cfg) -> kept visual tokens (indices into ctx.visual; None: all)
    decode_layer: Callable[[Any], Any] | None = None  # decode: cfg -> the first layer that attends to the kept positions
    # (its section's settings as a dict, the layer text) -> how a table names this run's settings, e.g.
    # "tome r=0.5"; None: the section name and its keys (``describe``). The layer text is the
    # resolved layer with the configured depth beside it ("1 (10/28)"), for a method with a layer.
    label: Callable[[dict, str], str] | None = None
    short_keys_first: bool = False  # its keys win short-name lookups (``tau``) over methods registered later
    renamed_keys: dict[str, str] = field(default_factory=dict)  # old key -> new key, still read (one release)
    # (key, its section's config) -> why sweeping that key changed nothing, when the method can tell
    no_effect: Callable[[str, Any], str | None] | None = None
    stream_eviction: Callable[[], type] | None = None  # llm_layer: () -> its question-time eviction in a stream

    def describe(self, values: dict, layer: str = "") -> str:
        """This run's settings of the method in a few words (``compare``'s and the summary's line)."""
        return self.label(values, layer) if self.label is not None else describe_settings(self.section, values, layer)
    # vision_encoder: (handle, cfg) -> an object with remove(), the method's work inside the tower's blocks
    tower: Callable[[Any, Any], Any] | None = None
    # vision_encoder with a tower: cfg -> whether ``reduce`` also acts on the merger's input (else only the tower)
    reduces_merger_input: Callable[[Any], bool] | None = None

    def where(self, cfg: Any) -> str:
        """Where the method acts in a run with ``cfg`` (one of ACTS)."""
        place = self.placement(cfg) if self.placement is not None else self.acts
        if place not in ACTS:
            raise ValueError(f"method {self.name}: placement must give one of {ACTS}, got {place!r}")
        return place

    def acts_at(self, cfg: Any) -> list[str]:
        """Every place the method acts in a run with ``cfg``: its place, then those of ``also`` it turns on."""
        return [self.where(cfg)] + [place for place, on in self.also.items() if on(cfg)]

    def places(self) -> list[str]:
        """Every place the method can act (the places its config's choices lead to, and ``also``), in ACTS order."""
        if self.placement is None:
            return [place for place in ACTS if place == self.acts or place in self.also]
        default = self.config()
        found = {self.where(default)} | {self.where(dataclasses.replace(default, **{key: value}))
                                         for key, values in self.choices.items() for value in values}
        return [place for place in ACTS if place in found or place in self.also]

    def __post_init__(self) -> None:
        if not self.section:
            object.__setattr__(self, "section", self.name)
        if self.acts not in ACTS:
            raise ValueError(f"method {self.name}: acts must be one of {ACTS}, got {self.acts!r}")
        if not dataclasses.is_dataclass(self.config) or "enabled" not in {f.name for f in dataclasses.fields(self.config)}:
            raise ValueError(f"method {self.name}: config must be a dataclass with an 'enabled' field")
        for place in (self.acts, *self.also):
            if place not in ACTS:
                raise ValueError(f"method {self.name}: also must name places of {ACTS}, got {place!r}")
            needed = {"vision_encoder": "reduce", "visual_tokens": "reduce", "llm_layer": "select", "decode": "decode"}[place]
            if getattr(self, needed) is None:
                raise ValueError(f"method {self.name} acts on {place} and needs a {needed} function")

    def validate(self, cfg: Any) -> None:
        """Range and choice checks of one config of this method (names ``section.key``)."""
        for key, rng in self.ranges.items():
            if getattr(cfg, key) is not None:  # an optional key left unset (e.g. a budget)
                rng.check(f"{self.section}.{key}", getattr(cfg, key))
        for key, allowed in self.choices.items():
            value = getattr(cfg, key)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), list(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise PruneVidError(f"{self.section}.{key} must be one of {', '.join(allowed)}, got '{value}'{hint}")

    def keys(self) -> list[tuple[str, str, Any, str]]:
        """(key, type, default, allowed values) of each config key."""
        default = self.config()
        out = []
        for f in dataclasses.fields(self.config):
            allowed = str(self.ranges[f.name]) if f.name in self.ranges else (
                "one of " + ", ".join(self.choices[f.name]) if f.name in self.choices else "")
            if self.pruning_layer is not None and f.name == "pruning_layer":
                allowed = "a 0-based layer index or 'K/N' (the same relative depth)"
            out.append((f.name, str(f.type), getattr(default, f.name), allowed))
        return out


def place_key(method: Method, place: str, cfg: Any) -> str:
    """The name a method's record entries take at ``place``: its name at its own place,
    ``name@place`` at a further one (``Method.also``)."""
    return method.name if place == method.where(cfg) else f"{method.name}@{place}"


def describe_settings(section: str, values: dict, layer: str = "") -> str:
    """A method section's settings in a few words: its name and keys, ``tome budget=0.5 L=...``."""
    keys = [f"L={layer}" if k == "pruning_layer" else f"{k}={v}"
            for k, v in values.items() if k != "enabled" and v is not None]  # unset optional keys (budget) say nothing
    return " ".join([section, *keys])


_METHODS: dict[str, Method] = {}
_BROKEN: dict[str, str] = {}  # entry point name -> why its plug-in failed to load (left out)
_loaded = False


def register_method(method: Method) -> Method:
    """Add a method to the registry (built-in, third-party or a test's); a name or section
    already taken by another method is refused."""
    for other in _METHODS.values():
        if other.name != method.name and other.section == method.section:
            raise PruneVidError(f"method {method.name}: config section '{method.section}' is taken by {other.name}")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Take a method out of the registry (tests; a plug-in being reloaded)."""
    _METHODS.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if isinstance(loaded, Method):
                register_method(loaded)
            elif callable(loaded):
                loaded()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is left out and named once, not a traceback
            text = str(exc).strip().splitlines()
            _BROKEN[ep.name] = (f"the method plug-in '{ep.name}' ({ep.value}) failed to load: "
                                f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))
            import sys

            print(f"warning: {_BROKEN[ep.name]}; it is left out", file=sys.stderr, flush=True)


def all_methods() -> list[Method]:
    """Every registered method, in the order they run (by ``ACTS``, then registration)."""
    _load()
    return sorted(_METHODS.values(), key=lambda m: ACTS.index(m.acts))


def get_method(name: str) -> Method:
    _load()
    if name not in _METHODS and name in _BROKEN:
        raise PruneVidError(_BROKEN[name])
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PruneVidError(f"unknown method '{name}'{hint}; see `prunevid methods`")
    return _METHODS[name]


def method_for_section(section: str) -> Method | None:
    """The registered method whose config section is ``section`` (None: none, e.g. a plug-in
    that a saved run used and this install lacks)."""
    return next((m for m in all_methods() if m.section == section), None)


def method_sections() -> dict[str, type]:
    """Config section -> config dataclass of every registered method."""
    return {m.section: m.config for m in all_methods()}


# ------------------------------------------------------------------ what methods see
@dataclass
class LayerReduction:
    """What an ``llm_layer`` method may return instead of the bare ``kept`` indices: ``keep``
    [V'] ascending indices into the visual positions; ``compact_cache`` False leaves the KV cache
    of the layers that ran on all tokens whole (FastV's own KV-cache code: decoding then still
    sees the dropped tokens there), True drops them there too (PruneVid's Stage 3).
    ``merge_into`` (optional) makes it a merge: each kept row becomes the size-weighted mean of
    itself and the tokens sent to it, in the hidden states and in the KV cache of those layers
    alike (the row keeps the kept token's position); a kept token must be sent to itself.
    ``merge_weights`` replaces the sizes as the weights of that mean (HoliTom's sequential halving)."""

    keep: Any
    compact_cache: bool = True
    merge_into: Any = None  # [V]: the kept token (index into keep) each visual token is averaged into, -1 dropped
    merge_weights: Any = None  # [V] (optional): each visual token's weight in its row's mean, instead of its size



def call_method(method: Method, verb: str, args: tuple, check: Callable[[Any], None]) -> Any:
    """``method.reduce(*args)`` or ``method.select(*args)``. For a plug-in, a failure becomes one
    line naming the method (a run of one video: exit 2; a dataset run: that sample's error row)
    and ``check`` vets what it returned (out-of-range indices would otherwise fail deep in the
    patch, or as a device-side assert on CUDA). A built-in method is neither wrapped nor checked
    (tested, and a check costs host syncs); out of memory passes as it is."""
    fn = getattr(method, verb)
    if getattr(fn, "__module__", "").startswith("prunevid_bench."):
        return fn(*args)
    import torch

    try:
        out = fn(*args)
    except (PruneVidError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise PruneVidError(f"method {method.name} failed in {verb}: {type(exc).__name__}"
                            f"{': ' + text[0] if text else ''}") from None
    check(out)
    return out


def check_indices(method: Method, what: str, index: Any, n: int) -> None:
    """A method's returned indices must be a 1-D integer tensor of distinct values in [0, n)."""
    import torch

    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
        raise PruneVidError(f"method {method.name} returned {what} that is not a 1-D integer tensor")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise PruneVidError(f"method {method.name} returned {what} outside [0, {n - 1}] "
                            f"(min {int(index.min())}, max {int(index.max())})")


def check_reduction(method: Method, red: Any, n: int) -> None:
    """What a ``reduce`` returned, before the patch applies it to ``n`` input tokens: a
    :class:`VisualReduction` whose ``dest`` is an integer tensor with one entry per input token
    (``tokens.apply_reduction`` then checks that it is an operator)."""
    import torch

    if not isinstance(red, VisualReduction):
        raise PruneVidError(f"method {method.name} returned {type(red).__name__}, not a VisualReduction")
    dest = red.dest
    if not isinstance(dest, torch.Tensor) or dest.dim() != 1 or dest.is_floating_point() or dest.dtype == torch.bool \
            or dest.numel() != n:
        raise PruneVidError(f"method {method.name} returned a dest that is not a 1-D integer tensor of {n} entries")
    m = int(red.group.numel()) if isinstance(red.group, torch.Tensor) else -1
    if n and (int(dest.min()) < -1 or int(dest.max()) >= m):
        raise PruneVidError(f"method {method.name} returned output rows outside [-1, {m - 1}] "
                            f"(min {int(dest.min())}, max {int(dest.max())})")


@dataclass
class LayerContext:
    """What an ``llm_layer`` method sees after layer K (one prefill, batch size 1).

    ``q`` [H, L, d] and ``k`` [H_kv, L, d]: the layer's projections BEFORE rotary; ``rotate(q,
    k)``: the same rotated with the layer's M-RoPE; ``visual`` [V] positions of the visual tokens;
    ``groups`` [V]; ``query_start``: the first row after the last visual token of the last video
    (its ``<|vision_end|>``: the official PruneVid query rows start there); ``scaling``: the
    attention scale. A method may leave its [V] scores in ``scores`` for the state (tests, plots)."""

    q: Any
    k: Any
    rotate: Callable
    visual: Any
    groups: Any
    query_start: int
    scaling: float
    seq_len: int
    scores: Any = None
    scored_rows: int = 0  # query rows scored against all keys (analytic FLOPs)
    original_visual: int = 0  # visual tokens before any method (what a budget is a fraction of)
    hidden: Any = None  # [L, D] the layer's output hidden states (before any reduction)


@dataclass
class DecodeContext:
    """A ``decode`` method's view of one step, after layer l - 1 ran on the new token: ``q`` [H, 1, d]
    its query, ``k`` [H_kv, S, d] that layer's cached keys (rotary applied; the new token's last),
    ``visual`` [V] the visual tokens' cache positions, ``step`` (0: the first after the prefill),
    ``memory`` a dict kept across the sample's steps (reset at each prefill)."""

    q: Any
    k: Any
    visual: Any
    scaling: float
    step: int
    memory: dict
