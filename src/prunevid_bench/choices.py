"""Multiple-choice prompts and a letter parser that never guesses.

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

import re
from collections.abc import Sequence

from prunevid_bench.errors import PruneVidError

LETTERS = "ABCDEFGHIJ"
PROMPT_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def letter_token_ids(tokenizer, n: int) -> list[int]:
    """Token id of each option letter "A", "B", ... as the reply's first token (no leading space:
    the assistant turn starts on a new line)."""
    ids = []
    for letter in LETTERS[:n]:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise PruneVidError(
                f"--answer-mode logits needs every option letter to be one token; '{letter}' is "
                f"{len(encoded)} tokens for this tokenizer: use --answer-mode generate"
            )
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise PruneVidError("--answer-mode logits: two option letters share a token; use --answer-mode generate")
    return ids


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
