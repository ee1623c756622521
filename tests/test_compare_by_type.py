"""`prunevid compare --by-type`: per-type counts and Wilson intervals from the runs' own tallies,
the `*` mark against the base run on planted counts, the CSV and Markdown, 80 columns, no types."""

from __future__ import annotations

import csv
import json
import math

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.config import build_config
from prunevid_bench.harness.compare import expand
from prunevid_bench.harness.compare_by_type import by_type
from prunevid_bench.harness.run_stats import summarise


def records(**per_type: tuple[int, int]) -> list[dict]:
    """``color=(right, asked)``: that many questions of the type, the first ``right`` answered right;
    the ids are the same in every run built with the same types and sizes."""
    return [{"id": f"{t}{i}", "category": None if t == "none" else t, "prediction": "A" if i < right else "B",
             "correct": i < right, "parse_status": "parsed", "error": None}
            for t, (right, asked) in per_type.items() for i in range(asked)]


def folder(tmp_path, name, rows, preset=None):
    """A dataset run folder as `prunevid run` leaves it, summarised by the run's own code, no model run."""
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"run": name, "sample_ids": [r["id"] for r in rows],
                                                  "config": build_config(preset).to_dict()}))
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps(summarise(rows, [])))
    return path


def naive_wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's 95% interval from its textbook form: (p + z²/2n ± z√(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    z, p = 1.96, k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


@pytest.fixture
def planted(tmp_path):
    """Base: color 20/20, motion 10/20. The pruned run: color 10/20 (intervals apart), motion 11/20
    and all 21/40 against 30/40 (intervals overlap)."""
    base = folder(tmp_path, "base", records(color=(20, 20), motion=(10, 20)))
    pruned = folder(tmp_path, "pruned", records(color=(10, 20), motion=(11, 20)), "default")
    return base, pruned


def view_of(*paths, baseline=0):
    runs = expand(list(paths))
    return by_type(runs, [r.name for r in runs], runs[baseline] if baseline is not None else None)


def test_counts_intervals_and_marks_on_planted_runs(planted):
    view = view_of(*planted)
    assert view.types == ["color", "motion", "all"]
    rows = {(r["run"], r["type"]): r for r in view.long_rows()}
    expected = {("base", "color"): (20, 20), ("base", "motion"): (10, 20), ("base", "all"): (30, 40),
                ("pruned", "color"): (10, 20), ("pruned", "motion"): (11, 20), ("pruned", "all"): (21, 40)}
    assert {key: (r["correct"], r["n"]) for key, r in rows.items()} == expected
    for (run, t), (k, n) in expected.items():
        assert (rows[run, t]["ci_low"], rows[run, t]["ci_high"]) == pytest.approx(naive_wilson(k, n))
        assert rows[run, t]["accuracy"] == k / n
    # color: [0.30, 0.70] against [0.84, 1]: apart; motion and all overlap; the base run is never marked.
    assert [rows["pruned", t]["separated"] for t in view.types] == [True, False, False]
    assert {rows["base", t]["separated"] for t in view.types} == {None}
    assert view.markdown().splitlines()[2:5] == ["| color | 100.0% (20/20) | 50.0%* (10/20) |",
                                                 "| motion | 50.0% (10/20) | 55.0% (11/20) |",
                                                 "| all | 75.0% (30/40) | 52.5% (21/40) |"]


def test_the_mark_is_the_interval_overlap_at_its_edge(tmp_path):
    """Base 20/20 has Wilson low 0.839; 14/20 reaches 0.857 (overlap), 13/20 only 0.819 (apart)."""
    base = folder(tmp_path, "base", records(color=(20, 20)))
    near = folder(tmp_path, "near", records(color=(14, 20)), "default")
    far = folder(tmp_path, "far", records(color=(13, 20)), "default")
    assert naive_wilson(14, 20)[1] > naive_wilson(20, 20)[0] > naive_wilson(13, 20)[1]
    view = view_of(base, near, far)
    assert [view.cells[i]["color"]["separated"] for i in (1, 2)] == [False, True]
    assert view_of(base, near, far, baseline=None).cells[2]["color"]["separated"] is None  # no base: no mark


def render(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text().splitlines()


def test_six_runs_with_long_names_fit_80_columns_in_one_table(tmp_path):
    base = folder(tmp_path, "toy-baseline-data-1e7ab461", records(direction=(20, 20), colour=(19, 20), count=(18, 20)))
    others = [folder(tmp_path, f"toy-prunevid-stage2-keep-0.1-{name}-8308aa7{i}",
                     records(direction=(i, 20), colour=(19 - i, 20), count=(18, 20)), "default")
              for i, name in enumerate(["own", "random", "fastv", "tome", "evs"])]
    lines = render(view_of(base, *others), 80)
    assert max(len(line) for line in lines) <= 80
    assert sum(line.startswith("┏") for line in lines) == 1  # one table: every run side by side
    assert "does not overlap the base run's (toy-baseline-data-1e7ab461) on" in " ".join(" ".join(lines).split())
    at = next(k for k, line in enumerate(lines) if line.startswith("│ direction"))
    cells = [[part.strip() for part in lines[k].strip("│").split("│")] for k in (at, at + 1)]
    assert cells == [["direction", "100.0%", "0.0%*", "5.0%*", "10.0%*", "15.0%*", "20.0%*"],
                     ["", "20/20", "0/20", "1/20", "2/20", "3/20", "4/20"]]
    assert "*" not in lines[at - 2] + lines[at - 4]  # colour (19-i of 20) and count (18 of 20) overlap the base
    narrow = render(view_of(base, *others), 50)  # too narrow for six: several tables, each in width
    assert max(len(line) for line in narrow) <= 50 and sum(line.startswith("┏") for line in narrow) > 1
    assert "(runs 1-" in " ".join(narrow)


def test_runs_without_types_show_only_all(tmp_path):
    base = folder(tmp_path, "base", records(none=(3, 4)))
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(json.dumps({"run": "single", "video": "v.mp4", "question": "What?",
                                                    "config": build_config(None).to_dict()}))
    (single / "result.json").write_text(json.dumps({"prediction": "A", "answer": "A", "correct": True}))
    for path in (base, single):
        view = view_of(path)
        assert view.types == ["all"] and "no run records a question type" in view.note()
        assert render(view, 80)
    assert [(r["correct"], r["n"]) for r in view_of(single).long_rows()] == [(1, 1)]


def test_cli_by_type_prints_writes_and_refuses_mismatched_runs(planted, tmp_path):
    base, pruned = planted
    res = CliRunner().invoke(app, ["compare", str(base), str(pruned), "--by-type", "--out", str(tmp_path / "o")],
                             env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "Comparison" in res.output and "Accuracy by question type" in res.output  # after the usual table
    assert max(len(line) for line in res.output.splitlines()) <= 80
    with open(tmp_path / "o" / "compare_by_type.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["run", "type", "correct", "n", "accuracy", "ci_low", "ci_high", "separated"]
    assert [(r["run"], r["type"], r["correct"], r["n"], r["separated"]) for r in rows] == [
        ("base", "color", "20", "20", ""), ("base", "motion", "10", "20", ""), ("base", "all", "30", "40", ""),
        ("pruned", "color", "10", "20", "True"), ("pruned", "motion", "11", "20", "False"),
        ("pruned", "all", "21", "40", "False")]
    assert float(rows[3]["ci_high"]) == pytest.approx(naive_wilson(10, 20)[1])

    res = CliRunner().invoke(app, ["compare", str(base), str(pruned), "--by-type", "--markdown", "--json", "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [r["run"] for r in data["runs"]] == ["base", "pruned"] and len(data["by_type"]) == 6
    res = CliRunner().invoke(app, ["compare", str(base), str(pruned), "--by-type", "--markdown"])
    assert "| type | base (base) | pruned |" in res.output
    assert "| color | 100.0% (20/20) | 50.0%* (10/20) |" in res.output

    fewer = folder(tmp_path, "fewer", records(color=(10, 20), motion=(1, 2)), "default")
    res = CliRunner().invoke(app, ["compare", str(base), str(fewer), "--by-type"])
    assert res.exit_code == 2 and "asked different questions" in res.output and "Accuracy by" not in res.output
