"""``--model_args`` of ``--model prunevid``, read into our config.

lmms-eval splits ``model_args`` on commas that are outside quotes and brackets, splits each part
at its first ``=`` and turns ``true``/``false`` and numbers into Python values; what reaches us is
a dict of keyword arguments. We read each string value once more as YAML, as ``--set`` does, so a
value with a comma is written in quotes (``config="/runs/a,b.yaml"``) or as a bracketed list, and
a quoted number stays text.

Keys:

- ``pretrained`` (lmms-eval's name) or ``model``: ``toy``, ``tiny``, a Hugging Face id or a folder;
- ``preset``, and ``config``: a YAML config of ours (precedence: model_args > config > preset);
- ``records``: the folder our run records go to (default: ``<--output_path>/prunevid/<run>``);
- ``label``: names the run folder;
- ``system_prompt``: a system prompt (or a file holding one) replacing the task's, as lmms-eval's
  own models take it;
- ``max_num_frames``: lmms-eval's ``qwen2_5_vl`` name for ``video.num_frames``;
- any config key, dotted (``tome.budget=0.5``) or short (``keep_ratio=0.3``).

``batch_size`` and ``max_batch_size`` come from lmms-eval's own flags: anything but one sample
per forward is refused (DESIGN section 2), as is ``batch_size=auto``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunevid_bench.errors import PruneVidError

OWN_KEYS = ("pretrained", "model", "preset", "config", "records", "label", "system_prompt")
ALIASES = {"max_num_frames": "video.num_frames"}


@dataclass
class ModelArgs:
    preset: str | None = None
    config_file: Path | None = None
    records: Path | None = None
    label: str | None = None
    system_prompt: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys


def read_value(value: Any) -> Any:
    """A ``model_args`` value as ``--set`` reads it: YAML, so ``"a,b"`` -> ``a,b`` and ``[1, 2]`` a list."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return value


def parse_model_args(kwargs: dict[str, Any]) -> ModelArgs:
    """Split lmms-eval's keyword arguments into our own keys and config overrides; unknown keys
    are one-line errors with a "did you mean"."""
    from prunevid_bench.config import resolve_key

    kwargs = dict(kwargs)
    check_batch(kwargs.pop("batch_size", 1), kwargs.pop("max_batch_size", None))
    device = kwargs.pop("device", None)  # lmms-eval's --device; model_args' device= wins
    out = ModelArgs()
    if "pretrained" in kwargs and "model" in kwargs:
        raise PruneVidError("model_args: give pretrained= or model=, not both")
    for key, raw in kwargs.items():
        value = read_value(raw)
        if key in ("pretrained", "model"):
            out.overrides["model.name"] = str(value)
        elif key == "preset":
            out.preset = str(value)
        elif key == "config":
            out.config_file = Path(str(value))
        elif key == "records":
            out.records = Path(str(value))
        elif key == "label":
            out.label = str(value)
        elif key == "system_prompt":
            out.system_prompt = str(value)
        else:
            try:
                dotted = ALIASES.get(key) or resolve_key(key)
            except PruneVidError as exc:
                raise PruneVidError(f"model_args: {exc} (own keys: {', '.join(OWN_KEYS)})") from None
            out.overrides[dotted] = value
    if device is not None and "model.device" not in out.overrides:
        out.overrides["model.device"] = str(device)
    return out


def check_batch(batch_size: Any, max_batch_size: Any = None) -> None:
    """One sample per forward: lmms-eval's ``--batch_size`` must be 1."""
    text = str(batch_size).strip()
    if text != "1":
        raise PruneVidError(
            f"--batch_size {text} is refused: prunevid runs one sample per forward (its pruning and timings are "
            "per sample); use --batch_size 1 and shard across GPUs with accelerate for throughput"
        )
    if max_batch_size not in (None, 1, "1"):
        raise PruneVidError(f"--max_batch_size {max_batch_size} is refused: prunevid runs one sample per forward")


def check_generation(gen_kwargs: dict[str, Any], where: str) -> None:
    """Greedy decoding only: sampling would make pruned and unpruned runs incomparable. Every
    number is checked here, before lmms-eval could swallow a failure to read one."""
    temperature = _gen_number(gen_kwargs, "temperature", float, 0, where)
    if temperature > 0 or gen_kwargs.get("do_sample"):
        raise PruneVidError(
            f"{where}: sampling (temperature={gen_kwargs.get('temperature')}) is refused: prunevid decodes greedily; "
            "set temperature=0 in --gen_kwargs"
        )
    if _gen_number(gen_kwargs, "num_beams", int, 1, where) != 1:
        raise PruneVidError(f"{where}: num_beams={gen_kwargs['num_beams']} is refused: prunevid decodes greedily (num_beams=1)")
    if _gen_number(gen_kwargs, "max_new_tokens", int, 1, where) < 1:
        raise PruneVidError(f"{where}: max_new_tokens must be >= 1, got {gen_kwargs['max_new_tokens']!r}")


def _gen_number(gen_kwargs: dict[str, Any], key: str, kind: type, default: float, where: str) -> float:
    """A generation setting as a finite number (``default`` when absent or empty)."""
    raw = gen_kwargs.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
        if isinstance(raw, bool) or not math.isfinite(value) or (kind is int and not value.is_integer()):
            raise ValueError
    except (TypeError, ValueError):
        raise PruneVidError(f"{where}: {key}={raw!r} in --gen_kwargs is not a "
                            f"{'whole number' if kind is int else 'number'}") from None
    return kind(value)


def stop_strings(gen_kwargs: dict[str, Any]) -> list[str]:
    """The task's ``until``: a string or a list. Empty strings are dropped, and so is the blank line,
    (two newlines) the few-shot delimiter lmms-eval fills in when a task names none (its Qwen2.5-VL model drops
    it too, or every multi-paragraph reply would be cut)."""
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    return [term for term in until if isinstance(term, str) and term and term != "\n\n"]


def cut_at_stop(text: str, until: list[str]) -> str:
    """The reply up to the first stop string, as lmms-eval's own models cut it."""
    for term in until:
        text = text.split(term)[0]
    return text
