"""``prunevid export-toy DIR``: the built-in ``toy`` model as a standard checkpoint folder.

The folder (weights, config, generation config, tokenizer, processor and chat template) loads
with ``from_pretrained`` / ``AutoProcessor`` like any Qwen2.5-VL checkpoint, so other tools
(lmms-eval's own ``qwen2_5_vl`` model among them) can run the model we test with.

A plain ``save_pretrained`` is not enough: on loading, transformers rebuilds a tokenizer whose
class is ``Qwen2Tokenizer`` from the vocabulary and merges as Qwen's BPE would, which splits the
toy words into bytes. Naming the generic fast tokenizer keeps ``tokenizer.json`` as saved.

The toy saw its videos through the processor's own sampling: ``prunevid.json`` in the folder says
so (``video_policy: processor``), and ``prunevid`` loads the folder with that policy. Other tools
read no such file: give them the same frames (the processor's defaults), or pass
``--set video.policy=processor`` where they take our config.
"""

from __future__ import annotations

import json
from pathlib import Path

from prunevid_bench.errors import PruneVidError, describe_os_error
from prunevid_bench.models.loading import BUILTIN_VIDEO_POLICY, POLICY_FILE

TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def export_toy(out_dir: Path) -> Path:
    """Write the toy checkpoint into ``out_dir`` (created; an existing checkpoint is refused)."""
    from prunevid_bench.toy.model import load_toy_model

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PruneVidError(f"{out_dir} is a file, not a folder; pass a folder for the checkpoint")
    if (out_dir / "config.json").exists():
        raise PruneVidError(f"{out_dir} already holds a checkpoint (config.json); pass an empty or new folder")
    model, processor = load_toy_model()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        config_path = out_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = TOKENIZER_CLASS
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        # The toy was trained on the processor's own frame sampling (128 visual tokens per clip);
        # under Qwen's policy, a checkpoint's default, it would see 1,120 and answer at random.
        (out_dir / POLICY_FILE).write_text(json.dumps({"video_policy": BUILTIN_VIDEO_POLICY, "model": "toy"}) + "\n")
    except OSError as exc:
        raise PruneVidError(f"cannot write {out_dir}: {describe_os_error(exc) or exc.strerror or exc}") from None
    return out_dir
