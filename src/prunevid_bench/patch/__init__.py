"""Token-reduction methods on a loaded model, applied with hooks (no copied forward).

``apply_methods(model, config) -> ReductionHandle`` installs the hooks for the run's enabled
methods (``prunevid_bench.methods``); ``handle.remove()`` restores the model, so the baseline and
the reduced runs share one loaded model. Works with our engine and with ``model.generate``
alike, because both pass explicit position ids that continue the unpruned numbering (see
``Family.prefill_position_ids``). Every module is reached through the model's family
(``prunevid_bench.families``); the splicing itself is family-agnostic (``prunevid_bench.splice``).

Where the hooks sit (transformers 5.x Qwen2-VL / Qwen2.5-VL), one module each:

- ``handle``: the base model's pre-hook (a prefill starts: remember ``input_ids``, which the
  text model does not get, and the video grids) and the language model's output hook (decode
  bookkeeping).
- ``encoder``: ``get_video_features`` and the merger, for the ``vision_encoder`` methods.
- ``llm_input``: the language model's pre-hook, after the placeholder ``masked_scatter`` and the
  M-RoPE ids of the UNPRUNED prompt. Each video becomes one ``tokens.VideoTokens`` (embeddings,
  ids, sizes, extras) found by the family's placeholder runs; the ``visual_tokens`` methods'
  operators reduce it; the result is spliced back (ids never renumbered, unless a reduction
  sets ``positions_after``).
- ``layer``: the last layer on every token (K, or K-1 for a method pruning before K): q/k
  captured before rotary, the ``llm_layer`` method's drop or merge applied to its output and to
  the KV cache of the layers before; later layers' rotary/mask inputs sliced.
- ``key_bias``: proportional attention (log(size) on the keys), when a reduction asks for it.
- ``report``: ``HandleReport``, the typed record of the last prefill.
"""

from __future__ import annotations

from prunevid_bench.patch.handle import ReductionHandle, apply_methods
from prunevid_bench.patch.key_bias import EXTRA_CHANNELS
from prunevid_bench.patch.report import HandleReport, MethodReport
from prunevid_bench.patch.state import BeforeMerger, SampleState

__all__ = ["EXTRA_CHANNELS", "BeforeMerger", "HandleReport", "MethodReport", "ReductionHandle", "SampleState",
           "apply_methods", "apply_prunevid"]


def apply_prunevid(model, *configs):
    """Methods' configs on a loaded model, each in its own section (the entry point of earlier
    releases, kept as an alias, called with PruneVid's two): ``apply_methods`` with only those set."""
    from prunevid_bench.config import RunConfig
    from prunevid_bench.methods import method_sections

    section_of = {cls: section for section, cls in method_sections().items()}
    return apply_methods(model, RunConfig(methods={section_of[type(c)]: c for c in configs}))
