"""Multiple-choice video QA datasets: read, validate, sample, preflight.

Rows are read from a JSON list, a JSONL file or a parquet file (``load``); what the rows mean is
a row format, one module each, registered with ``register_format``:

- ``egoschema``: ``q_uid``, ``question``, ``option 0`` .. ``option 4``, answers in a separate file;
- ``mvbench``: ``video``, ``question``, ``candidates``, ``answer`` (a candidate's text), clip bounds;
- ``videomme``: the Video-MME parquet (``videoID``, lettered ``options``, ``answer`` letter);
- ``longvideobench``: ``lvb_val.json`` or lmms-eval's parquet (``correct_choice``, ``video_path``);
- ``mlvu``: lmms-eval's MLVU dev parquet (``video_name``, options in the question, ``task_type``);
- ``jsonl``: our own rows ``id``, ``video``, ``question``, ``options``, ``answer``.

The format is recognised from the keys of the first row (formats are tried in the order they are
registered below), or forced with ``--format``. A new format is one module that calls
``register_format`` plus its import here. A row that cannot be used is never dropped silently: it
lands in ``Dataset.skipped`` with the reason. Nothing here decodes video or imports torch.
"""

from prunevid_bench.harness.datasets.base import Dataset, QASample, Skip
from prunevid_bench.harness.datasets.load import load_dataset, preflight, sample_rows
from prunevid_bench.harness.datasets.registry import RowFormat, format_names, get_format, register_format

# The built-in formats register themselves on import, in detection order (the loosest last).
# longvideobench and mlvu before mvbench: their rows have candidates too.
from prunevid_bench.harness.datasets import egoschema, longvideobench, mlvu, mvbench, videomme, jsonl  # noqa: E402,F401  isort: skip

__all__ = ["Dataset", "QASample", "RowFormat", "Skip", "format_names", "get_format", "load_dataset", "preflight",
           "register_format", "sample_rows"]
