"""Accuracy statistics over a run's sample records: Wilson intervals, per-category accuracy,
agreement between two runs. The prompt and the letter parser live in ``prunevid_bench.choices``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from prunevid_bench.errors import PruneVidError


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


def paired_difference(records: Iterable[Mapping[str, Any]], base_records: Iterable[Mapping[str, Any]],
                      z: float = 1.96) -> dict[str, Any]:
    """Accuracy of a run minus its baseline's on the questions both answered, as a paired test.

    Both runs answered the same questions, so their correctness is paired: only the discordant
    questions (one right, the other wrong) carry information. ``difference`` = (gained - lost) / n;
    the 95% interval is Newcombe's (1998, Stat Med 17:2635, method 10: Wilson intervals of the two
    marginal accuracies combined with the phi correlation of the pairs, its numerator corrected as
    there), which stays inside [-1, 1] and keeps a width when nothing differs; ``p`` is the exact McNemar test: a
    two-sided binomial test of ``gained`` among the discordant pairs at 1/2: twice scipy's binomial
    CDF at the smaller count, capped at 1 (equal to ``scipy.stats.binomtest`` at 1/2, which is
    symmetric; scipy.special loads in a fraction of scipy.stats' time).
    An errored row counts as wrong, as in the accuracy. ``significant``: the interval leaves out 0.
    """
    from scipy.special import bdtr

    a, b = _by_id(records, "A"), _by_id(base_records, "B")
    shared = [i for i in a if i in b]
    right = {i: (bool(a[i].get("correct")) and not a[i].get("error"),
                 bool(b[i].get("correct")) and not b[i].get("error")) for i in shared}
    both = sum(1 for r, s in right.values() if r and s)
    gained = sum(1 for r, s in right.values() if r and not s)  # the run right, the baseline wrong
    lost = sum(1 for r, s in right.values() if s and not r)
    neither = len(shared) - both - gained - lost
    n = len(shared)
    out: dict[str, Any] = {"n": n, "both": both, "gained": gained, "lost": lost, "neither": neither,
                           "difference": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan,
                           "significant": False}
    if n == 0:
        return out
    p_run, p_base = (both + gained) / n, (both + lost) / n
    (l1, u1), (l2, u2) = wilson_interval(both + gained, n, z), wilson_interval(both + lost, n, z)
    margins = (both + gained) * (neither + lost) * (both + lost) * (neither + gained)
    cross = both * neither - gained * lost  # Newcombe's phi, its numerator pulled N/2 towards 0 when positive
    phi = (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins) if margins else 0.0
    theta = p_run - p_base
    below = math.sqrt(max(0.0, (p_run - l1) ** 2 - 2 * phi * (p_run - l1) * (u2 - p_base) + (u2 - p_base) ** 2))
    above = math.sqrt(max(0.0, (u1 - p_run) ** 2 - 2 * phi * (u1 - p_run) * (p_base - l2) + (p_base - l2) ** 2))
    low, high = max(-1.0, theta - below), min(1.0, theta + above)
    p = min(1.0, 2.0 * float(bdtr(min(gained, lost), gained + lost, 0.5))) if gained + lost else 1.0
    out.update(difference=theta, ci_low=low, ci_high=high, p=float(p), significant=not low <= 0.0 <= high)
    return out


def paired_text(paired: Mapping[str, Any] | None) -> str:
    """``-4.0 pt [-11, +3] p=0.45`` (points; the interval in whole points), ``-`` without one."""
    if not paired or not paired.get("n") or paired["difference"] != paired["difference"]:
        return "-"
    return (f"{100 * paired['difference']:+.1f} pt [{100 * paired['ci_low']:+.0f}, {100 * paired['ci_high']:+.0f}] "
            f"p={_p_text(paired['p'])}")


def paired_short(difference: float | None, p: float | None) -> str:
    """``-5.0 p=0.03``: the paired difference in points and McNemar's p, for a narrow column."""
    if difference is None or difference != difference or p is None:
        return "-"
    return f"{100 * difference:+.1f} p={_p_text(p)}"


def _p_text(p: float) -> str:
    return "1" if p >= 0.995 else f"{p:.2f}" if p >= 0.01 else f"{p:.0e}"
