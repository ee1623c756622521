"""A third-party token-reduction method, as a plug-in would ship it: keep every other visual
token of each video. Importing this module registers it (``prunevid_bench.register_method``);
``tests/test_third_party_method.py`` loads it in-process and through the entry point group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import prunevid_bench
from prunevid_bench.methods import Range, VisualReduction


@dataclass
class EveryOtherConfig:
    enabled: bool = False
    offset: int = 0  # 0 keeps tokens 0, 2, 4, ...; 1 keeps 1, 3, 5, ...


def reduce(tokens, cfg: EveryOtherConfig) -> VisualReduction:
    keep = torch.arange(cfg.offset, tokens.index.numel(), 2, device=tokens.index.device)
    _, group = torch.unique(tokens.group[keep], return_inverse=True)  # numbered from 0
    return VisualReduction.keep(keep, tokens.index.numel(), group,
                                stats={"every_other_dropped": tokens.index.numel() - keep.numel()})


METHOD = prunevid_bench.register_method(prunevid_bench.Method(
    name="every_other",
    acts="visual_tokens",
    config=EveryOtherConfig,
    summary="keep every other visual token (a plug-in example)",
    ranges={"offset": Range(0, 1)},
    record_fields=("every_other_dropped",),
    reduce=reduce,
))
