"""Multiple-choice prompts, a letter parser that never guesses, and accuracy statistics.

The parser reads the model's reply as a choice only when the reply says so: a bare letter, a
letter marking the start of a line, a letter after "answer"/"option", the exact text of one
option, a bracketed letter, or a capital letter standing alone. The first of those rules that
finds anything decides; two different letters found by the same rule are "ambiguous". There is
no fallback to a random or default letter (lmms-eval's MMMU parser guesses; we count instead).

The English words "A"/"a" (article) and "I" (pronoun) are also option letters. They are read as
letters only when marked: alone, bracketed, followed by punctuation, or (for A) followed by a
word an article can never precede ("A or B", "A is correct"). "A dog is running" is unparsed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prunevid_bench.errors import PruneVidError

LETTERS = "ABCDEFGHIJ"
PROMPT_INSTRUCTION = "Answer with the option's letter from the given choices directly."
PARSE_STATUSES = ("parsed", "unparsed", "ambiguous", "out_of_range")


def format_mc_prompt(question: str, options: Sequence[str]) -> str:
    """Question, one "(A) option" line per choice, then the lmms-eval instruction."""
    if not 2 <= len(options) <= len(LETTERS):
        raise PruneVidError(f"a question needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [question.strip()]
    lines += [f"({LETTERS[i]}) {str(option).strip()}" for i, option in enumerate(options)]
    lines.append(PROMPT_INSTRUCTION)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Letter parser

_OPEN, _CLOSE = r"[\(\[\{]", r"[\)\]\}]"
# A letter inside brackets: "(B)", "[c]", "{D}" (the last covers "\boxed{D}").
_BRACKETED = rf"{_OPEN}\s*([A-Ja-j])\s*{_CLOSE}"
# A letter that is a whole word: not part of "CD", "B2", "don't", "A-frame", "E.g.", "D.C.".
_WORD_BEFORE, _WORD_AFTER = r"(?<![\w'’\-])(?<!\w\.)", r"(?![\w'’\-])(?!\.\w)"
_BARE = rf"{_WORD_BEFORE}([A-Ja-j]){_WORD_AFTER}"
# Punctuation or a line end right after a letter marks it as a choice ("A.", "A,", "A -", "A/B").
_MARKED_AFTER = re.compile(r"[ \t]*(?:$|\n|[.,;:!?)\]}/&\-–—])")
# Words the article "a" can never precede; after them "A" must be the letter ("A or B", "A is").
_CONNECTIVE_AFTER = re.compile(r"\s+(?:or|and|nor|is|because|since|vs\.?|versus)\b", re.IGNORECASE)
# "or B" / "and (C)" / "/ D" right after a chosen letter: a hedge between two letters.
_ALTERNATIVE = re.compile(rf"\s*(?:(?i:or|and)\b|[/&])\s*(?:(?i:option)\s*)?(?:{_BRACKETED}|{_BARE})")
_CUE_TAIL = rf"\s*[:=\-]?\s*(?:{_BRACKETED}|{_BARE})"

# The rules, strongest first: (name, pattern, groups whose bare letter must pass the
# article/pronoun guard, whether a following "or B" makes it a hedge). Each pattern has one
# letter group per alternative; exactly one of them matches.
_RULES: list[tuple[str, re.Pattern[str] | None, frozenset[int], bool]] = [
    # 1. The whole reply is one letter, any case: "B", "B.", "(B)", " c", "**B**" (stars removed).
    ("bare", re.compile(rf"^{_OPEN}?\s*([A-Ja-j])\s*{_CLOSE}?[.:,;!]?$"), frozenset(), False),
    # 2. A line starts with a marked letter: "(C) blue", "B) red", "D. green", "A: ...", or a line
    #    is just "B". Several lines starting with different letters (an echoed option list) are
    #    ambiguous. "A dog ..." has no mark, so it is not a letter.
    (
        "line start",
        re.compile(rf"^[ \t]*(?:{_BRACKETED}|([A-Ja-j])\)|([A-J])[.:](?!\w)|([A-Ja-j])[ \t]*$)", re.MULTILINE),
        frozenset(),
        True,
    ),
    # 3. After the word "answer": "Answer: B", "The answer is (C).", "the correct answer is
    #    option d", "Final answer: C because ...". Not "The answer is a dog" (guard).
    (
        "answer cue",
        re.compile(
            r"(?i:\banswer\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?)"
            rf"\s*[:=\-]?\s*(?:(?i:option|choice)\b)?{_CUE_TAIL}"
        ),
        frozenset({2}),
        True,
    ),
    # 4. After "option"/"choice": "Option D", "Best option: (A)", "the correct option is B".
    ("option cue", re.compile(rf"(?i:\b(?:option|choice)\b(?:\s+is)?){_CUE_TAIL}"), frozenset({2}), True),
    # 5. The reply is exactly one option's text, when options are given (no pattern): it beats
    #    a letter that merely occurs in that text ("Vitamin C"), not an explicit letter answer.
    ("option text", None, frozenset(), False),
    # 6. A bracketed letter anywhere: "I think (B) is right", "\\boxed{C}".
    ("bracketed", re.compile(_BRACKETED), frozenset(), False),
    # 7. A capital letter standing alone anywhere: "I think it's C", "C is correct", "A or B".
    #    Never "I" (the pronoun); "A" only when the guard says it is not the article.
    ("capital", re.compile(rf"{_WORD_BEFORE}([A-HJ]){_WORD_AFTER}"), frozenset({1}), False),
]


def _normalise(text: str) -> str:
    """Drop Markdown emphasis and code marks, map full-width brackets, trim."""
    text = text.replace("（", "(").replace("）", ")").replace("【", "[").replace("】", "]")
    text = text.replace("**", "").replace("__", "").replace("*", "").replace("`", "")
    return text.strip()


def _letter_ok(letter: str, after: str) -> bool:
    """Is a whole-word letter a choice rather than the article "A"/"a" or the pronoun "I"?"""
    if _MARKED_AFTER.match(after):
        return True  # "A.", "I,", "a" at the end: no article or pronoun ends a clause like that
    if letter in "Ii":
        return False  # "I think ..." — only a marked I is a letter
    if _CONNECTIVE_AFTER.match(after):
        return True  # "A or B", "A is correct", "c because ..."
    return letter in "BCDEFGHJ"  # a capital B..J followed by a word: "C because", "B the man"


def _letters_of(rule: re.Pattern[str], text: str, guarded: frozenset[int], hedge: bool) -> list[str]:
    """Every letter the rule finds (upper case), with the letter of an "or B" hedge after it."""
    letters = []
    for match in rule.finditer(text):
        group = next(g for g in range(1, rule.groups + 1) if match.group(g) is not None)
        letter = match.group(group)
        if group in guarded and not _letter_ok(letter, text[match.end(group) :]):
            continue
        letters.append(letter.upper())
        alternative = _ALTERNATIVE.match(text, match.end()) if hedge else None
        if alternative:
            bracketed, bare = alternative.group(1), alternative.group(2)
            if bracketed or _letter_ok(bare, text[alternative.end() :]):
                letters.append((bracketed or bare).upper())
    return letters


def _option_text_key(text: str) -> str:
    return " ".join(text.strip().strip("\"'“”").rstrip(".!").split()).casefold()


def parse_choice(text: str | None, n_options: int, options: Sequence[str] | None = None) -> tuple[int | None, str]:
    """Read a reply as one of ``n_options`` choices; return (0-based index or None, status).

    status: "parsed", "unparsed" (no choice found, including empty text), "ambiguous" (two
    different letters from the same rule, or the reply equals two options' text) or
    "out_of_range" (a letter beyond the options, e.g. E of 4). ``options`` enables matching a
    reply that is exactly one option's text (case-insensitive).
    """
    if not 1 <= n_options <= len(LETTERS):
        raise ValueError(f"n_options must be 1..{len(LETTERS)}, got {n_options}")
    if options is not None and len(options) != n_options:
        raise ValueError(f"{len(options)} options given for n_options={n_options}")
    reply = _normalise(text or "")
    if not reply:
        return None, "unparsed"
    for _name, rule, guarded, hedge in _RULES:
        if rule is None:
            if options is None:
                continue
            key = _option_text_key(reply)
            matches = [i for i, option in enumerate(options) if _option_text_key(str(option)) == key]
            if len(matches) == 1:
                return matches[0], "parsed"
            if len(matches) > 1:
                return None, "ambiguous"
            continue
        letters = set(_letters_of(rule, reply, guarded, hedge))
        if len(letters) > 1:
            return None, "ambiguous"
        if letters:
            index = LETTERS.index(letters.pop())
            return (index, "parsed") if index < n_options else (None, "out_of_range")
    return None, "unparsed"


# ---------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% for z=1.96); n=0 gives (nan, nan).

    Unlike the normal approximation it stays inside [0, 1] and is sane at k=0 or k=n, which
    matters for small --limit runs.
    """
    if n == 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _tally(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(records)
    errors = sum(1 for r in records if r.get("error"))
    correct = sum(1 for r in records if not r.get("error") and r.get("correct"))
    not_parsed = sum(1 for r in records if not r.get("error") and r.get("parse_status") != "parsed")
    low, high = wilson_interval(correct, n)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else math.nan,
        "ci_low": low,
        "ci_high": high,
        "unparsed": not_parsed,
        "errors": errors,
    }


def accuracy_summary(records: Iterable[Mapping[str, Any]], by: str = "category") -> dict[str, Any]:
    """Accuracy with a 95% Wilson CI, overall and per ``by`` value (when any record has one).

    Every record counts in n. A record with an ``error`` counts as wrong and is reported under
    ``errors``; a reply that was not parsed (any status but "parsed") counts as wrong and is
    reported under ``unparsed``, with the split by status in ``parse_status``.
    """
    records = list(records)
    summary = _tally(records)
    summary["parse_status"] = dict(
        sorted(Counter(str(r.get("parse_status")) for r in records if not r.get("error")).items())
    )
    if any(r.get(by) is not None for r in records):
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for r in records:
            groups.setdefault("(none)" if r.get(by) is None else str(r[by]), []).append(r)
        summary[f"by_{by}"] = {name: _tally(groups[name]) for name in sorted(groups)}
    return summary


def _by_id(records: Iterable[Mapping[str, Any]], side: str) -> dict[str, Mapping[str, Any]]:
    table: dict[str, Mapping[str, Any]] = {}
    for r in records:
        key = str(r["id"])
        if key in table:
            raise PruneVidError(f"id {key} appears twice in run {side}; remove the duplicate line")
        table[key] = r
    return table


def agreement(
    records_a: Iterable[Mapping[str, Any]], records_b: Iterable[Mapping[str, Any]], key: str = "prediction"
) -> dict[str, Any]:
    """How often two runs chose the same option on the questions both answered.

    Compares ``key`` (the parsed index; None when unparsed) on the shared ids. Rows with an
    ``error`` in either run are left out and counted; two unparsed replies count as agreeing
    (neither run chose) and are counted under ``both_unparsed``.
    """
    a, b = _by_id(records_a, "A"), _by_id(records_b, "B")
    shared = [i for i in a if i in b]
    errored = [i for i in shared if a[i].get("error") or b[i].get("error")]
    compared = [i for i in shared if not (a[i].get("error") or b[i].get("error"))]
    agree = sum(1 for i in compared if a[i].get(key) == b[i].get(key))
    low, high = wilson_interval(agree, len(compared))
    return {
        "n": len(compared),
        "agree": agree,
        "agreement": agree / len(compared) if compared else math.nan,
        "ci_low": low,
        "ci_high": high,
        "both_unparsed": sum(1 for i in compared if a[i].get(key) is None and b[i].get(key) is None),
        "errors_excluded": len(errored),
        "only_a": len(a) - len(shared),
        "only_b": len(b) - len(shared),
    }
