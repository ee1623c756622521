"""The toy-world task's functions: the rows `prunevid toy-data` writes (``data/data.jsonl``, with
``videos/`` beside it), asked and scored exactly as ``prunevid run --dataset`` asks and scores them."""

from pathlib import Path

from prunevid_bench.choices import LETTERS, format_mc_prompt, parse_choice

DATA_DIR = Path(__file__).resolve().parent / "data"


def doc_to_visual(doc):
    return [str(DATA_DIR / doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return format_mc_prompt(doc["question"], doc["options"])


def prediction(doc, reply):
    """The option letter the reply names, or None (our parser never guesses)."""
    index, _status = parse_choice(reply, len(doc["options"]), doc["options"])
    return None if index is None else LETTERS[index]


def process_results(doc, results):
    return {"accuracy": float(prediction(doc, results[0]) == doc["answer"])}
