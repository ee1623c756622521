"""Text from data files (ids, questions, paths) made safe to print on a terminal."""

from __future__ import annotations

import re

# C0 controls (ESC starts colour and cursor sequences; newlines would break one-line errors),
# DEL, C1 controls, and the bidirectional overrides that can make text read backwards.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``str(text)`` with every control character written as its escape (``\\x1b``, ``\\n``)."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
