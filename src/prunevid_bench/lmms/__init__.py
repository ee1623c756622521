"""lmms-eval integration: any lmms-eval task runs through our pipeline, pruning included.

``pip install 'prunevid-bench[lmms]'`` then::

    python -m lmms_eval --model prunevid --model_args pretrained=toy,preset=default,keep_ratio=0.3 \\
        --tasks videomme --output_path OUT --log_samples

lmms-eval finds the model through the ``lmms_eval.models`` entry point (``manifest`` below);
``args`` reads ``model_args``, ``model`` is the lmms-eval model class and ``records`` writes
our run folder beside lmms-eval's output. Only ``model`` imports lmms-eval.
"""

from __future__ import annotations


def manifest():
    """The entry point's payload: lmms-eval's registry calls it and registers what it returns."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prunevid", chat_class_path="prunevid_bench.lmms.model.PruneVidLMM")
