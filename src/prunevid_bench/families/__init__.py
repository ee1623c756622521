"""Model families, keyed by the checkpoint's ``model_type``.

A family says where a model keeps what the hooks need (the language model, its decoder layers,
layer K's q/k projections, the vision encoder and its merger), how the unpruned prompt's M-RoPE
ids are computed, how rotary cos/sin are applied, and the patch geometry. ``engine``,
``pipeline``, ``models.loading``, ``flops`` and the patch ask :func:`family_of` or
:func:`family_for_type`; none imports a family module by name. A new family is one module that
calls :func:`register_family`, listed in ``_MODULES`` below, plus its tiny model.
"""

from __future__ import annotations

import importlib

from prunevid_bench.errors import PruneVidError
from prunevid_bench.families.base import Family, PatchGeometry

__all__ = ["Family", "PatchGeometry", "family_for_type", "family_of", "register_family", "supported_model_types"]

# The family modules shipped with the package, imported on first use (they import transformers).
_MODULES = ("prunevid_bench.families.qwen2_5_vl", "prunevid_bench.families.qwen2_vl", "prunevid_bench.families.qwen3_vl",
            "prunevid_bench.families.qwen3_5")
_FAMILIES: dict[str, Family] = {}
_loaded = False


def register_family(family: Family) -> Family:
    _FAMILIES[family.model_type] = family
    return family


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _MODULES:
            importlib.import_module(module)


def supported_model_types() -> list[str]:
    _load()
    return list(_FAMILIES)


def family_for_type(model_type: str, name: str | None = None) -> Family:
    """The family of ``model_type``; an unsupported one is a one-line error listing the supported."""
    _load()
    if model_type not in _FAMILIES:
        what = f"model '{name}' is a {model_type} model" if name else f"model type '{model_type}' is not supported"
        raise PruneVidError(f"{what}; prunevid-bench supports the model types {', '.join(_FAMILIES)}")
    return _FAMILIES[model_type]


def family_of(model) -> Family:
    """The family of a loaded model (read off ``model.config.model_type``)."""
    return family_for_type(getattr(model.config, "model_type", "?"))
