"""The paired accuracy test of a run against its baseline: exact McNemar p (scipy's binomial
test, and a hand sum of the binomial tail), Newcombe's interval checked by exact enumeration of
its coverage, and `compare` reporting both over the shared questions."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
from scipy.stats import binomtest

from prunevid_bench.harness.answers import paired_difference, paired_text


def records(pattern: str, prefix: str = "q") -> list[dict]:
    """One record per character: "1" right, "0" wrong, "e" an error."""
    return [{"id": f"{prefix}{i}", "correct": c == "1", "error": "boom" if c == "e" else None}
            for i, c in enumerate(pattern)]


def naive_mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar: twice the smaller binomial tail at 1/2, capped at 1."""
    n, k = gained + lost, min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_mcnemar_p_equals_scipy_and_the_hand_sum_on_a_built_example():
    # 20 questions: 9 both right, 2 gained (run right, base wrong), 7 lost, 2 neither.
    run = records("1" * 9 + "11" + "0" * 7 + "00")
    base = records("1" * 9 + "00" + "1" * 7 + "00")
    paired = paired_difference(run, base)
    assert (paired["n"], paired["both"], paired["gained"], paired["lost"], paired["neither"]) == (20, 9, 2, 7, 2)
    assert paired["p"] == pytest.approx(binomtest(2, 9, 0.5).pvalue, abs=1e-12)
    assert paired["p"] == pytest.approx(naive_mcnemar_p(2, 7), abs=1e-12) == pytest.approx(0.1796875)
    assert paired["difference"] == pytest.approx((2 - 7) / 20)
    assert paired["ci_low"] < paired["difference"] < paired["ci_high"] and paired["ci_high"] > 0
    assert not paired["significant"]  # the interval covers zero, and p > 0.05 agrees
    assert paired_text(paired).startswith("-25.0 pt [") and paired_text(paired).endswith("p=0.18")


def test_mcnemar_p_equals_scipys_binomtest_for_every_small_table():
    for n in range(1, 30):
        for gained in range(n + 1):
            paired = paired_difference(records("1" * gained + "0" * (n - gained)), records("0" * gained + "1" * (n - gained)))
            assert paired["p"] == pytest.approx(binomtest(gained, n, 0.5).pvalue, abs=1e-12), (gained, n)


def test_errors_count_wrong_only_shared_questions_pair_and_no_discordance_gives_p_1():
    run = records("1e1") + records("1", prefix="only-run")
    base = records("111")
    paired = paired_difference(run, base)
    assert (paired["n"], paired["gained"], paired["lost"]) == (3, 0, 1)
    same = paired_difference(records("1100"), records("1100"))
    assert same["p"] == 1.0 and same["difference"] == 0 and same["ci_low"] < 0 < same["ci_high"]


def test_a_large_paired_loss_is_significant():
    paired = paired_difference(records("0" * 30 + "1" * 10), records("1" * 40))
    assert paired["significant"] and paired["ci_high"] < 0 and paired["p"] == pytest.approx(naive_mcnemar_p(0, 30))


@pytest.mark.parametrize("probs", [(0.5, 0.1, 0.2, 0.2), (0.7, 0.05, 0.15, 0.1), (0.4, 0.2, 0.2, 0.2)])
def test_newcombe_interval_coverage_by_exact_enumeration(probs):
    """Newcombe's method 10 keeps close to its 95%: its coverage, summed exactly over every
    2×2 table of 25 pairs under the multinomial, stays within a few points of it."""
    n, (p11, p10, p01, p00) = 25, probs
    theta = (p11 + p01) - (p11 + p10)  # run accuracy - base accuracy; "10": base right, run wrong
    covered = 0.0
    for both, lost, gained in itertools.product(range(n + 1), repeat=3):
        neither = n - both - lost - gained
        if neither < 0:
            continue
        prob = (math.factorial(n) / (math.factorial(both) * math.factorial(lost) * math.factorial(gained) * math.factorial(neither))
                * p11 ** both * p10 ** lost * p01 ** gained * p00 ** neither)
        run = records("1" * both + "0" * lost + "1" * gained + "0" * neither)
        base = records("1" * both + "1" * lost + "0" * gained + "0" * neither)
        paired = paired_difference(run, base)
        covered += prob * (paired["ci_low"] - 1e-12 <= theta <= paired["ci_high"] + 1e-12)
    assert 0.92 <= covered <= 0.995, covered


def test_compare_reports_the_paired_test_over_the_shared_questions(tmp_path):
    from typer.testing import CliRunner

    from prunevid_bench.cli import app
    from prunevid_bench.config import build_config

    def folder(name, pattern, cfg):
        path = tmp_path / name
        path.mkdir()
        rows = [{**r, "prediction": "A" if r["correct"] else "B", "parse_status": "parsed"} for r in records(pattern)]
        (path / "config.json").write_text(json.dumps({"run": name, "sample_ids": [r["id"] for r in rows], "config": cfg}))
        (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (path / "summary.json").write_text(json.dumps({"accuracy": {"n": len(rows), "accuracy": pattern.count("1") / len(rows),
                                                                    "ci_low": 0, "ci_high": 1, "unparsed": 0}, "metrics": {}}))
        return path

    base = folder("base", "1" * 9 + "00" + "1" * 7 + "00", build_config(None).to_dict())
    pruned = folder("pruned", "1" * 9 + "11" + "0" * 7 + "00", build_config("default").to_dict())
    res = CliRunner().invoke(app, ["compare", str(base), str(pruned), "--out", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    _, row = list(csv.DictReader(open(tmp_path / "o" / "compare.csv")))
    assert (row["gained"], row["lost"], row["paired_n"]) == ("2", "7", "20")
    assert float(row["mcnemar_p"]) == pytest.approx(binomtest(2, 9, 0.5).pvalue)
    assert "-25.0 p=0.18" in res.output and "exact McNemar" in res.output
