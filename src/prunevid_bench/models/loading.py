"""Load a model and processor by name: ``tiny``, ``tiny-qwen2vl``, ``toy``, a Hugging Face id or a path.

Built-in names are listed here; a typo gets a "did you mean". Everything else goes to the
``from_pretrained`` of its family (``prunevid_bench.families``, keyed by the checkpoint's
``model_type``); a model type no family covers is refused with one line listing the supported.
"""

from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunevid_bench.errors import PruneVidError


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    name: str
    video_policy: str = "qwen"  # what video.policy "auto" means for this model


# Built-in models: name -> "module:function", the function (attn_implementation) -> (model,
# processor). Imported by name when asked for, so this module depends on none of them (the toy
# package sits above it). They were all trained and tested with the processor's own sampling,
# which is what video.policy "auto" means for them.
BUILTIN: dict[str, str] = {
    "tiny": "prunevid_bench.models.tiny:build_tiny",
    "tiny-qwen2vl": "prunevid_bench.models.tiny_qwen2vl:build_tiny_qwen2vl",
    "tiny-qwen3vl": "prunevid_bench.models.tiny_qwen3vl:build_tiny_qwen3vl",
    "tiny-qwen3vl-moe": "prunevid_bench.models.tiny_qwen3vl:build_tiny_qwen3vl_moe",
    "toy": "prunevid_bench.toy.model:load_toy_model",
    "tiny-qwen3_5": "prunevid_bench.models.tiny_qwen3_5:build_tiny_qwen3_5",
    "tiny-qwen3_5-moe": "prunevid_bench.models.tiny_qwen3_5:build_tiny_qwen3_5_moe",
    "toy8": "prunevid_bench.toy.model:load_toy8_model",
    "toy-qwen3vl": "prunevid_bench.toy.model:load_toy_qwen3vl_model",
}
BUILTIN_VIDEO_POLICY = "processor"


def _load_builtin(name: str, attn_implementation: str) -> LoadedModel:
    module, function = BUILTIN[name].split(":")
    model, processor = getattr(importlib.import_module(module), function)(attn_implementation=attn_implementation)
    return LoadedModel(model, processor, name, video_policy=BUILTIN_VIDEO_POLICY)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PruneVidError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):  # meta holds no data; others are untested backends
        raise PruneVidError(f"device '{device}' cannot run the benchmark (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PruneVidError(f"device '{device}' requested but CUDA is not available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PruneVidError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on GPUs that support it, float32 on the CPU (bf16 matmuls are slow there).
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# A Hugging Face repo id: "org/name" of letters, digits, "-", "_", "." (no "..", "--", or a
# leading "." or "-"), as huggingface_hub validates it. "../models/x" is a path, not an id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and len(name) <= 96


def _load_pretrained(name: str, dtype: torch.dtype, attn_implementation: str) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoProcessor

    from prunevid_bench.families import family_for_type

    path = Path(name).expanduser()
    if not path.exists() and not _looks_like_hub_id(name):
        if "/" in name or name.startswith((".", "~")):
            raise PruneVidError(f"model directory {name} not found; check the path")
        hint = difflib.get_close_matches(name, list(BUILTIN), n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise PruneVidError(f"model '{name}' not found: not a built-in name, a directory, or a Hugging Face id{extra}")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise PruneVidError(_load_error(name, exc)) from None
    family = family_for_type(getattr(config, "model_type", "?"), name)
    try:
        model = family.load_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, SafetensorError) as exc:
        message = _load_error(name, exc)
        if isinstance(exc, SafetensorError):  # the header or the tensors run past the end of the file
            message = f"{message}; the checkpoint's weights look truncated or corrupt: download or save them again"
        raise PruneVidError(message) from None
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise PruneVidError(_load_error(name, exc)) from None
    return LoadedModel(model.eval(), processor, name, video_policy=_saved_video_policy(path))


# A checkpoint folder may say which video policy it was trained with (``prunevid export-toy``
# writes it): ``{"video_policy": "processor"}``. Without it a checkpoint gets Qwen's own.
POLICY_FILE = "prunevid.json"


def _saved_video_policy(path: Path) -> str:
    import json

    file = path / POLICY_FILE
    if not file.is_file():
        return "qwen"
    try:
        policy = json.loads(file.read_text()).get("video_policy", "qwen")
    except (ValueError, AttributeError):
        raise PruneVidError(f"{file} is damaged (not a JSON object with video_policy); fix or delete it") from None
    return policy


def _load_error(name: str, exc: BaseException) -> str:
    """One line for a failed load; a Hub id that could not be fetched says how to work offline."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    chain, cause = [], exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    from_hub = _looks_like_hub_id(name) and not Path(name).expanduser().exists()
    if from_hub and any(isinstance(c, (LocalEntryNotFoundError, ConnectionError)) for c in chain):
        if constants.HF_HUB_OFFLINE:
            return (f"model '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                    "download it once online, or pass a local directory with --model")
        return (f"cannot reach the Hugging Face Hub for '{name}' and it is not in the local cache: pass a "
                "local directory with --model, or download it where the Hub is reachable and set HF_HUB_OFFLINE=1")
    text = str(exc).strip()
    return f"cannot load model '{name}': {text.splitlines()[0] if text else type(exc).__name__}"


def load_model(name: str, dtype: str = "auto", device: str = "auto", attn_implementation: str = "sdpa") -> LoadedModel:
    """Load, cast and place a model; returns it with its processor."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if attn_implementation == "flash_attention_2":
        import importlib.util

        if dev.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
            raise PruneVidError("flash_attention_2 needs a CUDA device and the flash-attn package (use --attn-implementation sdpa)")
        if torch_dtype == torch.float32:
            raise PruneVidError("flash_attention_2 runs in bfloat16 or float16 (use --dtype bfloat16)")
    if name in BUILTIN:
        loaded = _load_builtin(name, attn_implementation)
        loaded.model.to(dtype=torch_dtype)
    else:
        loaded = _load_pretrained(name, torch_dtype, attn_implementation)
    loaded.model.to(dev)
    return loaded
