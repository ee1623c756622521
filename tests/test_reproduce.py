"""`prunevid reproduce`: published tables as data, their grid run through the sweep harness on the
toy model with toy data written in the LongVideoBench and MLVU layouts, our numbers beside theirs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.published import load_benchmarks, load_table, table_names
from prunevid_bench.harness.reproduce import score
from prunevid_bench.toy.world import generate_dataset

runner = CliRunner()
TOY_TABLE = Path(__file__).parent / "fixtures" / "published" / "toy-lvb-mlvu.yaml"
LETTERS = "ABCDE"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "80"})


def write_layouts(root: Path, toy_jsonl: Path) -> None:
    """The toy questions in the files LongVideoBench and MLVU ship (benchmarks.yaml's paths)."""
    import pandas as pd

    rows = [json.loads(line) for line in toy_jsonl.read_text().splitlines()]
    (root / "longvideobench" / "videos").mkdir(parents=True)
    (root / "mlvu" / "mlvu").mkdir(parents=True)
    (root / "mlvu" / "toy").mkdir()
    (root / "videomme" / "videomme").mkdir(parents=True)
    (root / "videomme" / "data").mkdir()
    lvb, mlvu, videomme = [], [], []
    for i, row in enumerate(rows):
        video = toy_jsonl.parent / row["video"]
        for folder in ("longvideobench/videos", "mlvu/toy", "videomme/data"):
            shutil.copy(video, root / folder / video.name)
        videomme.append({"video_id": f"{i:03d}", "duration": ("short", "medium")[i % 2], "domain": "Toy",
                         "videoID": video.stem, "question_id": row["id"], "task_type": row["category"],
                         "question": row["question"], "options": [f"{LETTERS[j]}. {o}" for j, o in enumerate(row["options"])],
                         "answer": row["answer"]})
        options = row["options"] + ["N/A"] * (5 - len(row["options"]))
        lvb.append({"id": row["id"], "video_id": video.stem, "video_path": video.name, "question": row["question"],
                    **{f"option{i}": o for i, o in enumerate(options)}, "correct_choice": LETTERS.index(row["answer"]),
                    "question_category": row["category"], "duration_group": 15})
        lettered = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(row["options"]))
        mlvu.append({"video_name": f"toy/{video.name}", "duration": 2.0, "question": f"{row['question']}\n{lettered}",
                     "candidates": row["options"], "answer": row["answer"], "task_type": row["category"],
                     "question_id": row["id"]})
    pd.DataFrame(lvb).to_parquet(root / "longvideobench" / "validation-00000-of-00001.parquet")
    pd.DataFrame(mlvu).to_parquet(root / "mlvu" / "mlvu" / "test-00000-of-00001.parquet")
    pd.DataFrame(videomme).to_parquet(root / "videomme" / "videomme" / "test-00000-of-00001.parquet")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    toy = generate_dataset(tmp_path_factory.mktemp("toy"), 4, seed=5)
    root = tmp_path_factory.mktemp("benchmarks")
    write_layouts(root, toy)
    return root


def test_shipped_tables_hold_only_sourced_numbers():
    assert {"vidcom2-qwen3vl8b", "fastvid-qwen25vl7b"} <= set(table_names())
    table = load_table("vidcom2-qwen3vl8b")
    assert table.model == "Qwen/Qwen3-VL-8B-Instruct" and table.input["video.num_frames"] == 32
    assert [b.name for b in table.benchmarks] == ["mvbench", "longvideobench", "mlvu", "videomme", "videomme_short",
                                                  "videomme_medium", "videomme_long"]
    by = {r.label: r.scores for r in table.rows}
    assert by["full"] == {"mvbench": 68.6, "longvideobench": 60.3, "mlvu": 63.5, "videomme": 64.5,  # the table
                          "videomme_short": 76.0, "videomme_medium": 60.4, "videomme_long": 57.0}
    assert by["vidcom2 B=0.25"]["videomme"] == 62.4 and by["visionzip B=0.25"]["mvbench"] == 62.2
    assert load_table("fastvid-qwen25vl7b").rows[1].scores == {"videomme": 62.89}
    assert len(load_benchmarks()["mvbench"].files) == 20


@pytest.mark.parametrize("text, message", [
    ("rows: []", "missing 'source'"),
    ("source: {cite: x}\nmodel: m\ninput: {}\nbenchmarks: [lvb]\nrows: []", "unknown benchmark 'lvb'"),
    ("source: {cite: x}\nmodel: m\ninput: {video.num_frame: 8}\nbenchmarks: [mlvu]\nrows: [{method: full}]",
     "num_frame"),
    ("source: {cite: x}\nmodel: m\ninput: {}\nbenchmarks: [mlvu]\nrows: [{method: tome, scores: {mlvu: 50}}]",
     "tome needs a budget"),
    ("source: {cite: x}\nmodel: m\ninput: {}\nbenchmarks: [mlvu]\nrows: [{method: full, scores: {mlvu: 150}}]",
     "not a percent"),
    ("source: {cite: x}\nmodel: m\ninput: {}\nbenchmarks: [mlvu]\nrows: [{method: full, scores: {videomme: 50}}]",
     "does not list"),
    ("source: {cite: x}\nmodel: m\ninput: {}\nbenchmarks: [mlvu]\nrows: [{method: tome, budgte: 0.5}]",
     "unknown key 'budgte'"),
    ("source: {cite: x}\nmodel: m\ninput: {}\nbenchmarks: [mlvu]\nrows: [{method: tome, budget: 1.5}]", "budget"),
    ("title: [unclosed", "cannot read"),
])
def test_a_bad_table_fails_in_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PruneVidError, match=message):
        load_table(str(path))


def test_task_mean_is_the_mean_over_tasks_with_its_interval():
    parts = [{"correct": 9, "n": 10, "by_category": {"a": {"correct": 9, "n": 10}}},
             {"correct": 10, "n": 40, "by_category": {"a": {"correct": 0, "n": 0}, "b": {"correct": 10, "n": 40}}}]
    mean, low, high, n = score(parts, "task_mean")
    assert n == 50 and mean == pytest.approx((0.9 + 0.25) / 2)  # not the pooled 19/50
    a, b = 11 / 14, 12 / 44  # each task's (c + 2) / (k + 4)
    half = 1.96 * math.sqrt(a * (1 - a) / 14 + b * (1 - b) / 44) / 2
    assert (low, high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    # A task at 100% still has width (the plain p(1 - p) would make the interval a point).
    _, low, high, _ = score([{"correct": 4, "n": 4, "by_category": {"a": {"correct": 4, "n": 4}}}], "task_mean")
    assert high == 1.0 and low < 0.8
    accuracy, low, high, _ = score(parts, "accuracy")
    assert accuracy == pytest.approx(19 / 50) and low < accuracy < high


def test_cli_errors_are_one_line(data_root, tmp_path):
    for args, message in [(["nosuch", "--data-root", data_root], "unknown published table 'nosuch'"),
                          (["vidcom2-qwen3vl8", "--dry-run"], "did you mean 'vidcom2-qwen3vl8b'"),
                          (["vidcom2-qwen3vl8b"], "needs --data-root"),
                          (["vidcom2-qwen3vl8b", "--data-root", tmp_path / "none"], "data root not found"),
                          (["vidcom2-qwen3vl8b", "--data-root", tmp_path], "data missing: "),
                          ([TOY_TABLE, "--data-root", data_root, "--limit", "nan"], "--limit must be"),
                          ([], "name a published table")]:
        res = cli("reproduce", *args)
        assert res.exit_code == 2, res.output
        assert message in res.output and len(res.output.strip().splitlines()) <= 2, res.output


def test_dry_run_says_what_it_would_run_and_needs(tmp_path):
    res = cli("reproduce", "vidcom2-qwen3vl8b", "--dry-run", "--data-root", tmp_path)
    assert res.exit_code == 0, res.output
    out = res.output
    cells = next(line for line in out.splitlines() if line.startswith("cells per benchmark file:"))
    assert cells.startswith("cells per benchmark file: full, vidcom2 B=0.25")
    for method in ("fastvid", "holitom", "visionzip"):  # in the grid once its branch is in, named as missing until then
        assert f"{method} B=0.25" in cells or f"{method} B=0.25: method not available in this version" in out
    assert "huggingface-cli download Qwen/Qwen3-VL-8B-Instruct" in out and "note: The `qwen` branch README" in out
    assert "data MVBench: missing (20 files)" in out and "TFLOP/s (an H100 at 40%" in out
    assert "11520 visual tokens (32 frames, lmms-eval policy" in out  # 16 steps x 20 x 36 merged patches
    assert max(len(line) for line in out.splitlines()[:1]) <= 80


def test_toy_reproduction_end_to_end(data_root, tmp_path):
    dry = cli("reproduce", TOY_TABLE, "--dry-run", "--data-root", data_root, "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output[dry.output.index("{"):])
    assert plan["questions_found"] == 12 and plan["cells"] == ["full", "vidcom2 B=0.5", "tome B=0.5"]
    assert plan["unavailable"][0].startswith("futuremethod B=0.5: method not available in this version")

    res = cli("reproduce", TOY_TABLE, "--data-root", data_root, "--results-dir", tmp_path)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert sum("method not available in this version" in line for line in lines) == 1
    assert max(len(line) for line in lines if "│" in line or "┃" in line) <= 80
    saved = json.loads((tmp_path / "reproduce-toy-lvb-mlvu.json").read_text())
    rows = {(r["method"], r["benchmark"]): r for r in saved["rows"]}
    benchmarks = ("longvideobench", "mlvu", "videomme", "videomme_short")
    assert set(rows) == {(m, b) for m in ("full", "vidcom2", "tome") for b in benchmarks}
    for row in saved["rows"]:
        assert row["n"] == (2 if row["benchmark"] == "videomme_short" else 4)
        assert row["ci_low"] <= row["ours"] <= row["ci_high"]
        if row["published"] is None:
            assert row["delta"] is None and row["inside"] is None
        else:
            assert row["delta"] == pytest.approx(row["ours"] - row["published"], abs=0.01)
            assert row["inside"] == (row["ci_low"] <= row["published"] <= row["ci_high"])
    # Each benchmark's rows come from its own sweep folder, one run per cell (resumable).
    # Video-MME and its short subset are one sweep: the subset is scored on the short videos' records.
    sweeps = sorted(p.name for p in tmp_path.glob("sweep-reproduce-toy-lvb-mlvu-*"))
    assert len(sweeps) == 3 and all((tmp_path / s / "cells" / "baseline").is_dir() for s in sweeps)
    # MLVU's score is the mean over its task types of the cell's own records.
    from prunevid_bench.harness.runs import read_run_samples

    mlvu = next(tmp_path / s for s in sweeps if "-mlvu-test-00000" in s)
    records = list(read_run_samples(mlvu / "cells" / "baseline").values())
    tasks = {r["category"] for r in records}
    by_task = [sum(bool(r["correct"]) for r in records if r["category"] == t) / sum(r["category"] == t for r in records)
               for t in tasks]
    assert rows["full", "mlvu"]["ours"] == pytest.approx(100 * sum(by_task) / len(tasks), abs=0.01)
    videomme = next(tmp_path / s for s in sweeps if "-videomme-" in s)
    records = read_run_samples(videomme / "cells" / "tome,budget=0.5")
    short = [records[f"toy-s5-0000{i}"]["correct"] for i in (0, 2)]  # the even rows were written as short
    assert rows["tome", "videomme_short"]["ours"] == pytest.approx(100 * sum(short) / 2, abs=0.01)
    again = cli("reproduce", TOY_TABLE, "--data-root", data_root, "--results-dir", tmp_path, "--json")
    assert again.exit_code == 0 and "0 samples run now" in again.output  # resumed: nothing reruns
    assert json.loads(again.stdout[again.stdout.index("{"):])["rows"] == saved["rows"]
