"""The one place configuration enters: dataclasses, validated once.

Precedence (highest first): ``--set key=value`` > user YAML (``--config``) > preset > defaults.
Presets, user files and CLI overrides all become one nested dict that ``build_config`` turns
into a validated :class:`RunConfig`. Unknown keys and out-of-range values raise
:class:`PruneVidError` naming the key, with a "did you mean" for typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prunevid_bench.config_files import load_yaml  # noqa: F401  (moved; importable from here as before)
from prunevid_bench.config_layers import LAYER_FORMS, parse_layer, resolve_layer  # noqa: F401  (moved; as above)
from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import all_methods, method_sections

# The checkout (pyproject.toml, git); meaningful only when running from one.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Presets and sweep files are package data, so a wheel install has them too; the checkout's
# top-level presets/ and sweeps/ are links to these folders.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class ModelConfig:
    name: str = "toy"  # "toy" (trained, shipped), "tiny" (random weights), a Hugging Face id, or a local checkpoint directory
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    mrope: str = "transformers"  # M-RoPE numbering: transformers (as installed) | qwen (Qwen's own; prunevid_bench.mrope)
    deepstack: str = "merge"  # Qwen3-VL's DeepStack levels of a merged token: merge (the same mean) | representative


MROPE_MODES = ("transformers", "qwen")  # model.mrope (prunevid_bench.mrope)
DEEPSTACK_MODES = ("merge", "representative")  # model.deepstack (prunevid_bench.patch.deepstack)
VIDEO_POLICIES = ("auto", "qwen", "lmms-eval", "processor")


@dataclass
class VideoConfig:
    policy: str = "auto"  # auto (qwen for checkpoints, processor for the built-in toy/tiny) | qwen | lmms-eval | processor
    num_frames: int | None = None  # frames sampled uniformly; null = the policy's default (16; lmms-eval 32)
    fps: float | None = None  # sample at this rate instead of num_frames (capped by max_frames)
    max_frames: int | None = None  # cap when sampling by fps; null = the policy's (qwen: 768; processor: 64)
    max_pixels: int | None = None  # pixels per frame after resizing; null = the policy's bound
    min_pixels: int | None = None
    total_pixels: int | None = None  # qwen / lmms-eval: pixel budget of the whole video; null = 90% of 128k tokens
    decoder: str = "auto"  # auto (PyAV, then decord or torchcodec if installed) | pyav | decord | torchcodec


@dataclass
class GenerationConfig:
    max_new_tokens: int = 16


@dataclass
class RuntimeConfig:
    # torch intra-op threads; null = torch's default (one per core). Under load, fewer threads than
    # cores can be much faster (no contention); recorded per run. Nothing here is part of a run's identity.
    threads: int | None = None
    save_kept: bool = False  # the record holds each method's kept tokens as grid coordinates (--save-kept)


MATCHES = ("tokens", "flops")


@dataclass
class BudgetConfig:
    # What a budget B (--budget, a sweep's --budgets) matches: "tokens", the knob keeps the fraction B
    # of the visual tokens; "flops", the knob is solved per sample so the prefill FLOPs (vision
    # encoder + LLM, flops.py) are the fraction B of the unreduced run's (budget.match_flops).
    match: str = "tokens"


@dataclass
class PrefillConfig:
    # Run the prefill's decoder layers in chunks of this many rows, each attending to the cache of
    # the chunks before it (patch.chunked): the same logits, a lower peak memory. 0 = in one piece.
    chunk_tokens: int = 0


def renamed_keys() -> dict[str, dict[str, str]]:
    """Keys renamed, still read under their old name (for one release): section -> {old: new},
    as each method declares (``Method.renamed_keys``)."""
    return {m.section: m.renamed_keys for m in all_methods() if m.renamed_keys}


@dataclass(init=False)
class RunConfig:
    """model, video, generation, runtime, and one section per registered method (``methods``, by section
    name: ``tome``, ``evs``, ...), each read as an attribute too (``cfg.tome``).
    ``RunConfig(tome=ToMeConfig(enabled=True))`` sets a method's section by keyword."""

    model: ModelConfig
    video: VideoConfig
    generation: GenerationConfig
    runtime: RuntimeConfig
    budget: BudgetConfig
    methods: dict[str, Any]
    prefill: PrefillConfig

    def __init__(self, model: ModelConfig | None = None, video: VideoConfig | None = None,
                 generation: GenerationConfig | None = None,
                 runtime: RuntimeConfig | None = None, budget: BudgetConfig | None = None,
                 methods: dict[str, Any] | None = None, prefill: PrefillConfig | None = None, **sections: Any):
        self.model = model if model is not None else ModelConfig()
        self.video = video if video is not None else VideoConfig()
        self.generation = generation if generation is not None else GenerationConfig()
        self.runtime = runtime if runtime is not None else RuntimeConfig()
        self.budget = budget if budget is not None else BudgetConfig()
        self.prefill = prefill if prefill is not None else PrefillConfig()
        types = method_sections()
        unknown = [name for name in sections if name not in types]
        if unknown:
            raise TypeError(f"RunConfig got unknown section(s) {', '.join(unknown)}")
        self.methods = {name: cls() for name, cls in types.items()}
        self.methods.update(methods or {})
        self.methods.update(sections)

    def __getattr__(self, name: str) -> Any:
        """A method's section as an attribute (``cfg.tome``); only called for names not found."""
        methods = self.__dict__.get("methods")
        if methods is not None and name in methods:
            return methods[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or section '{name}'")

    def to_dict(self) -> dict[str, Any]:
        """One mapping per section: model, video, generation, then each method's."""
        data = dataclasses.asdict(self)
        data.update(data.pop("methods"))
        return data

    def section(self, name: str) -> Any:
        """The config of one section (``video``, a method's section)."""
        if name in self.methods:
            return self.methods[name]
        if name in _BASE_SECTIONS:
            return getattr(self, name)
        return section_types()[name]()  # a method section this config was built without: its defaults

    @property
    def enabled_methods(self) -> list[str]:
        """The registered methods this run applies, in the order they run."""
        return [m.name for m in all_methods() if self.section(m.section).enabled]


_BASE_SECTIONS = {
    "model": ModelConfig,
    "video": VideoConfig,
    "generation": GenerationConfig,
    "runtime": RuntimeConfig,
    "budget": BudgetConfig,
    "prefill": PrefillConfig,
}


def _core_sections() -> tuple[str, ...]:
    """Short names (``tau``, ``keep_ratio``) resolve in these sections first, so that a method
    registered later with a key of the same name does not make today's short names ambiguous:
    the base sections and those of the methods that ask for it (``Method.short_keys_first``)."""
    return (*_BASE_SECTIONS, *(m.section for m in all_methods() if m.short_keys_first))


def section_types() -> dict[str, type]:
    """Section name -> dataclass: model, video, generation, then each registered method's
    section, read from the method registry (the one place config learns of methods)."""
    return {**_BASE_SECTIONS, **method_sections()}


def all_keys() -> list[str]:
    """Every dotted key, e.g. ``tome.budget``."""
    return [f"{s}.{f.name}" for s, cls in section_types().items() for f in dataclasses.fields(cls)]


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve_key(name: str) -> str:
    """Turn a short (``tau``) or dotted (``video.fps``) name into a dotted key, or raise."""
    keys = all_keys()
    section, _, key = name.rpartition(".")
    for old_section, renames in renamed_keys().items():  # an old name, dotted or short
        if key in renames and section in ("", old_section):
            return f"{old_section}.{renames[key]}"
    if name in keys:
        return name
    short = [k for k in keys if k.split(".", 1)[1] == name]
    core = [k for k in short if k.split(".", 1)[0] in _core_sections()]
    short = core or short
    if len(short) == 1:
        return short[0]
    if len(short) > 1:
        raise PruneVidError(f"'{name}' is ambiguous: use one of {', '.join(short)}")
    raise PruneVidError(f"unknown config key '{name}'{_suggest(name, keys + [k.split('.', 1)[1] for k in keys])}")


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Convert a YAML/CLI value to the field's type, with a one-line error naming the key."""
    if key.endswith(".pruning_layer"):
        return parse_layer(key, value)
    if value is None:
        if "None" in annotation:
            return None
        raise PruneVidError(f"{key} cannot be null")
    if isinstance(value, str) and value.lower() in ("null", "none") and "None" in annotation:
        return None
    base = annotation.replace(" | None", "").strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "on", "1"):
                return True
            if str(value).lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool) or not math.isfinite(float(value)):  # NaN is inside no range; refuse it here
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise PruneVidError(f"{key} must be {'a finite number' if base == 'float' else base}, got {value!r}") from None


def validate(cfg: RunConfig) -> RunConfig:
    """Range checks that need no model. A method's ``pruning_layer`` is only checked for its form
    here: it is resolved against the model's depth (``resolve_layer``) when the patch is applied."""
    v = cfg.video
    layer_methods = []
    for method in all_methods():
        section = cfg.section(method.section)
        method.validate(section)
        if method.pruning_layer is not None:
            parse_layer(f"{method.section}.pruning_layer", method.pruning_layer(section))
            if section.enabled and "llm_layer" in method.acts_at(section):
                layer_methods.append(method.section)
        if method.decode_layer is not None:
            parse_layer(f"{method.section}.decode_layer", method.decode_layer(section))
    if len(layer_methods) > 1:
        raise PruneVidError(f"one LLM-layer method per run: {' and '.join(layer_methods)} are both enabled; disable all but one")
    if v.policy not in VIDEO_POLICIES:
        raise PruneVidError(f"video.policy must be one of {', '.join(VIDEO_POLICIES)}, got '{v.policy}'{_suggest(v.policy, list(VIDEO_POLICIES))}")
    from prunevid_bench.decoders import DECODERS

    if v.decoder not in DECODERS:
        raise PruneVidError(f"video.decoder must be one of {', '.join(DECODERS)}, got '{v.decoder}'{_suggest(v.decoder, list(DECODERS))}")
    if v.num_frames is not None and v.num_frames < 1:
        raise PruneVidError(f"video.num_frames must be >= 1, got {v.num_frames}")
    if v.fps is not None and v.fps <= 0:
        raise PruneVidError(f"video.fps must be > 0, got {v.fps}")
    if v.max_frames is not None and v.max_frames < 1:
        raise PruneVidError(f"video.max_frames must be >= 1, got {v.max_frames}")
    for name in ("max_pixels", "min_pixels", "total_pixels"):
        value = getattr(v, name)
        if value is not None and value < 28 * 28:
            raise PruneVidError(f"video.{name} must be at least {28 * 28} (one 28x28 merged patch), got {value}")
    if cfg.runtime.threads is not None and cfg.runtime.threads < 1:
        raise PruneVidError(f"runtime.threads must be >= 1 (or null for torch's default), got {cfg.runtime.threads}")
    if cfg.budget.match not in MATCHES:
        raise PruneVidError(f"budget.match must be tokens or flops, got '{cfg.budget.match}'")
    if cfg.prefill.chunk_tokens < 0:
        raise PruneVidError(f"prefill.chunk_tokens must be >= 0 (0: no chunking), got {cfg.prefill.chunk_tokens}")
    if cfg.generation.max_new_tokens < 1:
        raise PruneVidError(f"generation.max_new_tokens must be >= 1, got {cfg.generation.max_new_tokens}")
    if cfg.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise PruneVidError(f"model.dtype must be auto, float32, bfloat16 or float16, got '{cfg.model.dtype}'")
    if cfg.model.mrope not in MROPE_MODES:
        raise PruneVidError(f"model.mrope must be transformers or qwen, got '{cfg.model.mrope}'")
    if cfg.model.deepstack not in DEEPSTACK_MODES:
        raise PruneVidError(f"model.deepstack must be merge or representative, got '{cfg.model.deepstack}'")
    if cfg.model.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
        raise PruneVidError(
            f"model.attn_implementation must be sdpa, eager or flash_attention_2, got '{cfg.model.attn_implementation}'"
        )
    return cfg


def merge_into(base: dict[str, Any], layer: dict[str, Any], source: str) -> dict[str, Any]:
    """Overlay one nested config dict on another, refusing unknown sections and keys."""
    if not isinstance(layer, dict):
        raise PruneVidError(f"{source}: expected a mapping of sections (model, video, tome, ...)")
    out = {s: dict(v) for s, v in base.items()}
    for section, values in layer.items():
        if section in ("name", "description"):
            continue  # preset metadata
        if section not in section_types():
            raise PruneVidError(f"{source}: unknown section '{section}'{_suggest(str(section), list(section_types()))}")
        if not isinstance(values, dict):
            raise PruneVidError(f"{source}: section '{section}' must be a mapping")
        names = [f.name for f in dataclasses.fields(section_types()[section])]
        for key, value in values.items():
            key = renamed_keys().get(section, {}).get(key, key)
            if key not in names:
                raise PruneVidError(f"{source}: unknown key '{section}.{key}'{_suggest(str(key), names)}")
            out.setdefault(section, {})[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``video.fps=2`` -> ("video.fps", 2); the value is parsed as YAML."""
    if "=" not in text:
        raise PruneVidError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = resolve_key(key.strip())
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def overrides_to_layer(overrides: dict[str, Any]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for key, value in overrides.items():
        section, name = resolve_key(key).split(".", 1)
        layer.setdefault(section, {})[name] = value
    return layer


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PruneVidError(f"unknown preset '{name}'{_suggest(name, preset_names())}; see `prunevid presets`")
    return path


def build_config(
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve defaults < preset < user YAML < overrides into a validated RunConfig."""
    layered: dict[str, Any] = {s: {} for s in section_types()}
    if preset:
        layered = merge_into(layered, load_yaml(preset_path(preset)), f"preset '{preset}'")
    if config_file:
        layered = merge_into(layered, load_yaml(Path(config_file)), str(config_file))
    if overrides:
        layered = merge_into(layered, overrides_to_layer(overrides), "--set")
    return from_dict(layered)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a (possibly partial) nested dict, coercing and validating."""
    data = merge_into({s: {} for s in section_types()}, data, "config")
    sections, methods = {}, {}
    for section, cls in section_types().items():
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data.get(section, {}):
                default = getattr(cls(), f.name)
                kwargs[f.name] = _coerce(f"{section}.{f.name}", data[section][f.name], default, str(f.type))
        (sections if section in _BASE_SECTIONS else methods)[section] = cls(**kwargs)
    return validate(RunConfig(**sections, methods=methods))


def __getattr__(name: str) -> Any:
    """A method's config class (and its module's constants) under its old home, ``config.<Name>``,
    for one release: the method files own them now."""
    import sys

    for method in all_methods():
        if method.config.__name__ == name:
            return method.config
        module = sys.modules[method.config.__module__]
        if name.isupper() and hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
