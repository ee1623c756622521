"""LongVideoBench and MLVU rows in the layouts the datasets ship with (lmms-eval's task files say
which fields it reads: longvideobench/utils.py, mlvu/utils.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.datasets import load_dataset
from prunevid_bench.harness.datasets.mlvu import split_options

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def reasons(data):
    return dict(data.skipped)


def test_longvideobench_json(tmp_path):
    data = load_dataset(FIXTURES / "longvideobench" / "lvb_val.json", video_root=tmp_path)
    assert data.format == "longvideobench"  # before mvbench: these rows have candidates too
    first, second = data.samples
    assert first.id == "86CxyhFV9MI_0" and first.video == (tmp_path / "86CxyhFV9MI.mp4").resolve()
    assert first.options == ("A cup", "A book", "A lamp", "A phone") and first.answer_letter == "B"
    assert first.category == "TOS" and first.meta["duration_group"] == "600"
    assert second.answer_letter == "E" and len(second.options) == 5
    assert reasons(data) == {"abcDEF12345_0": "answer index 2 is outside the 2 options",
                             "abcDEF12345_1": "correct_choice 'first' is not an option index"}


def test_longvideobench_parquet_as_lmms_eval_reads_it(tmp_path):
    """The parquet: option0..option4 with "N/A" past the last, as lmms-eval's doc_to_text skips."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rows = [{"id": "v1_0", "video_id": "v1", "video_path": "v1.mp4", "question": "Q?", "option0": "red",
             "option1": "blue", "option2": "green", "option3": "N/A", "option4": "N/A", "correct_choice": 2,
             "question_category": "S2E", "duration_group": 15},
            {"id": "v2_0", "video_id": "v2", "video_path": "v2.mp4", "question": "Q2?", "option0": "a",
             "option1": "b", "option2": "c", "option3": "d", "option4": "e", "correct_choice": 3,
             "question_category": "T3O", "duration_group": 3600}]
    path = tmp_path / "validation-00000-of-00001.parquet"
    pd.DataFrame(rows).to_parquet(path)
    data = load_dataset(path, video_root=tmp_path)
    assert data.format == "longvideobench"
    assert [s.options for s in data.samples] == [("red", "blue", "green"), ("a", "b", "c", "d", "e")]
    assert [s.answer_letter for s in data.samples] == ["C", "D"]


def test_mlvu_dev_rows(tmp_path):
    data = load_dataset(FIXTURES / "mlvu" / "mlvu_dev.json", video_root=tmp_path)
    assert data.format == "mlvu"  # before mvbench: these rows have candidates too
    plot, ego, count = data.samples
    # The options come off the question (our prompt letters them itself), the answer "(A)" is a letter.
    assert plot.question == "What color is the main male character in the video?"
    assert plot.options == ("Yellow", "Red", "Green", "Blue") and plot.answer_letter == "A"
    assert plot.video == (tmp_path / "1_plotQA" / "movie101_66.mp4").resolve() and plot.category == "plotQA"
    assert ego.answer_letter == "C"
    # No candidates: the options are read from the question; an answer given as text is looked up.
    assert count.options == ("2", "3", "4", "5") and count.answer_letter == "C"
    assert reasons(data) == {"order_0": "the question lists 3 options but candidates has 4",
                             "needle_0": "answer 'A fish' is not among the options"}


def test_mlvu_option_block_must_be_lettered_in_order():
    assert split_options("Q?\n(A) x\n(B) y") == ("Q?", ["x", "y"])
    assert split_options("Q?\n(B) x\n(A) y") == ("Q?\n(B) x\n(A) y", [])  # not A, B, ...: left whole
    assert split_options("Which (A) is it?") == ("Which (A) is it?", [])


def test_forced_format_names_the_new_ones(tmp_path):
    with pytest.raises(PruneVidError, match="longvideobench, mlvu"):
        load_dataset(FIXTURES / "mlvu" / "mlvu_dev.json", format="mlvux")
