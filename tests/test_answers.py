"""Prompt format, the letter parser (which must never guess) and the accuracy statistics."""

from __future__ import annotations

import math

import pytest

from prunevid_bench.errors import PruneVidError
from prunevid_bench.choices import LETTERS, format_mc_prompt, parse_choice
from prunevid_bench.harness.answers import accuracy_summary, agreement, wilson_interval


def test_format_mc_prompt_exact():
    prompt = format_mc_prompt("  What colour is the car? ", ["red", " blue ", "green"])
    assert prompt == (
        "What colour is the car?\n"
        "(A) red\n"
        "(B) blue\n"
        "(C) green\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert prompt == format_mc_prompt("What colour is the car?", ("red", "blue", "green"))
    with pytest.raises(PruneVidError):
        format_mc_prompt("?", ["only one"])
    with pytest.raises(PruneVidError):
        format_mc_prompt("?", [str(i) for i in range(len(LETTERS) + 1)])


# (reply, n_options, expected index, expected status)
PARSE_TABLE = [
    # --- bare letters
    ("B", 4, 1, "parsed"),
    ("B.", 4, 1, "parsed"),
    ("(B)", 4, 1, "parsed"),
    ("(B).", 4, 1, "parsed"),
    (" c", 4, 2, "parsed"),
    ("c\n", 4, 2, "parsed"),
    ("**B**", 4, 1, "parsed"),
    ("`D`", 4, 3, "parsed"),
    ("[D]", 4, 3, "parsed"),
    ("（B）", 4, 1, "parsed"),
    ("A", 4, 0, "parsed"),
    ("a", 4, 0, "parsed"),
    ("A.", 4, 0, "parsed"),
    # --- a letter marking the start of a line
    ("B) red", 4, 1, "parsed"),
    ("b) red", 4, 1, "parsed"),
    ("(C) the man is cooking", 4, 2, "parsed"),
    ("D. green", 4, 3, "parsed"),
    ("A. A dog is running.", 4, 0, "parsed"),
    ("A: red", 4, 0, "parsed"),
    ("B\nBecause the car is red.", 4, 1, "parsed"),
    ("B. Option A is wrong.", 4, 1, "parsed"),
    ("(A) red\n(B) blue\n(C) green", 4, None, "ambiguous"),  # an echoed option list
    # --- after "answer"
    ("Answer: B", 4, 1, "parsed"),
    ("Answer:B", 4, 1, "parsed"),
    ("Answer:\nB", 4, 1, "parsed"),
    ("The answer is (C).", 4, 2, "parsed"),
    ("The best answer is: D", 4, 3, "parsed"),
    ("**Answer:** (C)", 4, 2, "parsed"),
    ("the correct answer is option d", 4, 3, "parsed"),
    ("answer is c.", 4, 2, "parsed"),
    ("Final answer: C because the car is red", 4, 2, "parsed"),
    ("Answer: A because the dog runs", 4, 0, "parsed"),
    ("The answer is B, not C.", 4, 1, "parsed"),
    ("I think the answer is B", 4, 1, "parsed"),
    ("Answer: I think B", 4, 1, "parsed"),
    ("The answer is I.", 10, 8, "parsed"),
    ("Answer: A or B", 4, None, "ambiguous"),
    ("Answer: B\nAnswer: C", 4, None, "ambiguous"),
    ("The answer is a dog.", 4, None, "unparsed"),
    ("Answer: A man is cooking.", 4, None, "unparsed"),
    ("The answer is E", 4, None, "out_of_range"),
    # --- after "option" / "choice"
    ("Best option: (A)", 4, 0, "parsed"),
    ("Best option:(A)", 4, 0, "parsed"),
    ("Option D", 4, 3, "parsed"),
    ("option d", 4, 3, "parsed"),
    ("The correct option is B", 4, 1, "parsed"),
    ("Option A is correct.", 4, 0, "parsed"),
    ("Choice C.", 4, 2, "parsed"),
    ("Option A or B", 4, None, "ambiguous"),
    ("(A) or (B)", 4, None, "ambiguous"),
    # --- a bracketed letter anywhere
    ("I think (B) is right", 4, 1, "parsed"),
    ("\\boxed{C}", 4, 2, "parsed"),
    ("It could be (A) or maybe (C)", 4, None, "ambiguous"),
    # --- a capital standing alone
    ("I think it is C", 4, 2, "parsed"),
    ("I would say B.", 4, 1, "parsed"),
    ("C - the man is cooking", 4, 2, "parsed"),
    ("It's A.", 4, 0, "parsed"),
    ("A, because the dog runs", 4, 0, "parsed"),
    ("A or B", 4, None, "ambiguous"),
    ("A/B", 4, None, "ambiguous"),
    ("Both A and C", 4, None, "ambiguous"),
    ("B and D are both possible", 4, None, "ambiguous"),
    ("I think C. Actually D.", 4, None, "ambiguous"),
    # --- out of range
    ("E", 4, None, "out_of_range"),
    ("(F)", 4, None, "out_of_range"),
    ("C", 2, None, "out_of_range"),
    ("E", 5, 4, "parsed"),
    ("J", 10, 9, "parsed"),
    # --- must stay unparsed: articles, pronouns, letters inside words, nothing at all
    ("", 4, None, "unparsed"),
    ("   ", 4, None, "unparsed"),
    ("A dog is running", 4, None, "unparsed"),
    ("A man is cooking in a kitchen.", 4, None, "unparsed"),
    ("a dog", 4, None, "unparsed"),
    ("a or b", 4, None, "unparsed"),
    ("I don't know", 4, None, "unparsed"),
    ("I am not sure.", 4, None, "unparsed"),
    ("The video shows a dog. A cat appears later.", 4, None, "unparsed"),
    ("A-frame house", 4, None, "unparsed"),
    ("CD player", 4, None, "unparsed"),
    ("E.g., the dog runs", 4, None, "unparsed"),
    ("He flew from D.C. to the U.S. coast", 4, None, "unparsed"),
    ("Plan A dog walker", 4, None, "unparsed"),
    ("B2 is a vitamin", 4, None, "unparsed"),
    ("None of the above", 4, None, "unparsed"),
    ("The answers vary.", 4, None, "unparsed"),
    ("There are many options here.", 4, None, "unparsed"),
]


@pytest.mark.parametrize("reply, n_options, index, status", PARSE_TABLE)
def test_parse_choice_table(reply, n_options, index, status):
    assert parse_choice(reply, n_options) == (index, status)


def test_parse_table_is_large_and_covers_every_status():
    assert len(PARSE_TABLE) >= 40
    assert {row[3] for row in PARSE_TABLE} == {"parsed", "unparsed", "ambiguous", "out_of_range"}


OPTIONS = ["a dog is running", "Vitamin C", "the red car", "two"]


@pytest.mark.parametrize(
    "reply, index, status",
    [
        ("A dog is running", 0, "parsed"),  # the option's text, not the letter A
        ("A dog is running.", 0, "parsed"),
        ("  THE RED CAR ", 2, "parsed"),
        ('"two"', 3, "parsed"),
        ("Vitamin C", 1, "parsed"),  # the text wins over the capital C inside it
        ("C", 2, "parsed"),  # an explicit letter still wins over option text
        ("Answer: B", 1, "parsed"),
        ("A dog is running fast", None, "unparsed"),  # only an exact match counts
        ("the car", None, "unparsed"),
    ],
)
def test_parse_choice_option_text(reply, index, status):
    assert parse_choice(reply, len(OPTIONS), OPTIONS) == (index, status)


def test_parse_choice_duplicate_option_text_is_ambiguous():
    assert parse_choice("red", 3, ["red", "blue", "Red"]) == (None, "ambiguous")


def test_parse_choice_is_deterministic_and_validates_arguments():
    assert parse_choice(None, 4) == (None, "unparsed")
    assert all(parse_choice("I think it is C", 4) == (2, "parsed") for _ in range(3))
    with pytest.raises(ValueError):
        parse_choice("A", 0)
    with pytest.raises(ValueError):
        parse_choice("A", 11)
    with pytest.raises(ValueError):
        parse_choice("A", 3, ["x", "y"])


# ---------------------------------------------------------------------------------------------
# Wilson interval


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
        (50, 100, 0.4038, 0.5962),
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_known_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


@pytest.mark.parametrize("k, n", [(3, 17), (81, 263), (199, 200)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    # Wilson's bounds are the p with (k/n - p)^2 = z^2 p (1 - p) / n.
    z = 1.96
    for p in wilson_interval(k, n, z):
        assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9)
    narrow = wilson_interval(k, n, z=1.0)
    wide = wilson_interval(k, n, z=2.576)
    assert wide[0] < narrow[0] < k / n < narrow[1] < wide[1]


def test_wilson_edge_cases():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


# ---------------------------------------------------------------------------------------------
# Accuracy and agreement


def record(i, correct, status="parsed", category=None, error=None, prediction=0):
    row = {"id": f"q{i}", "correct": correct, "parse_status": status, "category": category, "prediction": prediction}
    if error:
        row["error"] = error
    return row


def test_accuracy_summary_overall_and_per_category():
    records = [
        record(1, True, category="counting"),
        record(2, False, category="counting"),
        record(3, False, "unparsed", category="counting", prediction=None),
        record(4, True, category="ocr"),
        record(5, True, category="ocr"),
        record(6, False, "ambiguous", category=None, prediction=None),
        record(7, True, category="ocr", error="CUDA out of memory"),  # an error is wrong
    ]
    summary = accuracy_summary(records)
    assert summary["n"] == 7
    assert summary["correct"] == 3
    assert summary["accuracy"] == pytest.approx(3 / 7)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(wilson_interval(3, 7))
    assert summary["unparsed"] == 2
    assert summary["errors"] == 1
    assert summary["parse_status"] == {"ambiguous": 1, "parsed": 4, "unparsed": 1}
    by = summary["by_category"]
    assert set(by) == {"counting", "ocr", "(none)"}
    assert (by["counting"]["n"], by["counting"]["correct"], by["counting"]["unparsed"]) == (3, 1, 1)
    assert (by["ocr"]["n"], by["ocr"]["correct"], by["ocr"]["errors"]) == (3, 2, 1)
    assert by["ocr"]["accuracy"] == pytest.approx(2 / 3)
    assert by["(none)"]["unparsed"] == 1


def test_accuracy_summary_without_categories_and_empty():
    summary = accuracy_summary([record(1, True), record(2, False)])
    assert summary["accuracy"] == 0.5 and "by_category" not in summary
    empty = accuracy_summary([])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and math.isnan(empty["ci_low"])


def test_accuracy_summary_other_grouping():
    rows = [dict(record(1, True), duration="short"), dict(record(2, False), duration="long")]
    summary = accuracy_summary(rows, by="duration")
    assert summary["by_duration"]["short"]["accuracy"] == 1.0
    assert summary["by_duration"]["long"]["accuracy"] == 0.0


def test_agreement_on_shared_ids():
    a = [
        record(1, True, prediction=0),
        record(2, True, prediction=1),
        record(3, False, prediction=2),
        record(4, False, "unparsed", prediction=None),
        record(5, True, prediction=3),
        record(6, True, prediction=0),  # only in A
    ]
    b = [
        record(1, True, prediction=0),
        record(2, False, prediction=3),  # changed its answer
        record(3, False, prediction=2),
        record(4, False, "unparsed", prediction=None),
        record(5, False, prediction=3, error="timeout"),  # left out
        record(7, True, prediction=1),  # only in B
    ]
    result = agreement(a, b)
    assert result["n"] == 4
    assert result["agree"] == 3
    assert result["agreement"] == pytest.approx(0.75)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    assert result["both_unparsed"] == 1
    assert result["errors_excluded"] == 1
    assert (result["only_a"], result["only_b"]) == (1, 1)


def test_agreement_rejects_duplicate_ids_and_handles_no_overlap():
    with pytest.raises(PruneVidError, match="appears twice"):
        agreement([record(1, True), record(1, False)], [])
    result = agreement([record(1, True)], [record(2, True)])
    assert result["n"] == 0 and math.isnan(result["agreement"])
