"""Dataset readers, validation, seeded sampling and preflight — no video is decoded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.datasets import QASample, load_dataset, preflight, sample_rows

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
EGO = FIXTURES / "egoschema"


def skipped_reasons(dataset) -> dict[str, str]:
    return dict(dataset.skipped)


# ---------------------------------------------------------------------------------------------
# EgoSchema


def test_egoschema_json_with_answers_beside_it(tmp_path):
    data = load_dataset(EGO / "questions.json", video_root=tmp_path)
    assert data.format == "egoschema"
    assert [s.id for s in data.samples] == ["ego-001", "ego-002", "ego-003"]
    first = data.samples[0]
    assert first.video == (tmp_path / "ego-001.mp4").resolve()
    assert first.options == ("cooking", "cleaning", "painting", "reading", "sleeping")
    assert first.question == "What is C mainly doing?"
    assert [s.answer_index for s in data.samples] == [0, 4, 2]
    assert data.samples[1].answer_letter == "E"
    assert first.category is None and first.start is None and first.end is None
    reasons = skipped_reasons(data)
    assert reasons["ego-004"] == "no answer in subset_answers.json"  # reported, never dropped
    assert reasons["ego-005"] == "no question"
    assert len(data.skipped) == 2


def test_egoschema_default_video_root_is_the_file_folder():
    data = load_dataset(EGO / "questions.json")
    assert data.samples[0].video == (EGO / "ego-001.mp4").resolve()


def test_egoschema_answers_argument_path_and_mapping(tmp_path):
    questions = tmp_path / "questions.json"
    questions.write_text((EGO / "questions.json").read_text())
    with pytest.raises(PruneVidError, match="--answers"):
        load_dataset(questions)  # no answers file beside it
    answers = tmp_path / "my_answers.json"
    answers.write_text(json.dumps({"ego-004": 3, "ego-001": "1", "ego-002": "x"}))
    data = load_dataset(questions, answers=answers)
    assert [(s.id, s.answer_index) for s in data.samples] == [("ego-001", 1), ("ego-004", 3)]
    reasons = skipped_reasons(data)
    assert reasons["ego-002"].startswith("answer 'x'")
    assert reasons["ego-003"] == "no answer in my_answers.json"
    data = load_dataset(questions, answers={"ego-003": 9, "ego-002": 2})
    assert [s.id for s in data.samples] == ["ego-002"]
    assert "outside the 5 options" in skipped_reasons(data)["ego-003"]


def test_egoschema_jsonl(tmp_path):
    rows = json.loads((EGO / "questions.json").read_text())
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_dataset(path, answers=EGO / "subset_answers.json")
    assert data.format == "egoschema"
    assert [s.id for s in data.samples] == ["ego-001", "ego-002", "ego-003"]


# ---------------------------------------------------------------------------------------------
# MVBench


def test_mvbench_task_file(tmp_path):
    data = load_dataset(FIXTURES / "mvbench" / "action_sequence.json", video_root=tmp_path)
    assert data.format == "mvbench" and data.name == "action_sequence"
    assert [s.id for s in data.samples] == ["action_sequence-0", "action_sequence-1", "action_sequence-2"]
    first, second, third = data.samples
    assert first.category == "action_sequence"
    assert first.video == (tmp_path / "3MSZA.mp4").resolve()
    assert (first.start, first.end) == (18.3, 30.5)
    assert len(first.options) == 3 and first.answer_index == 0
    assert second.answer_index == 3 and second.start == 0.0
    assert third.start is None and third.end is None and third.answer_index == 1
    reasons = skipped_reasons(data)
    assert reasons["row 4"] == "answer 'The hat.' is not among the options"
    assert reasons["row 5"].startswith("1 option(s)")
    assert reasons["row 6"] == "end 3.0 is not after start 9.0"


# ---------------------------------------------------------------------------------------------
# Video-MME (parquet written here; no binary is committed)


def write_videomme(path: Path) -> Path:
    import pandas as pd

    rows = [
        ("001", "short", "Knowledge", "fFjv93ACGo8", "001-1", "Counting Problem", "How many?",
         ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "C"),
        ("001", "short", "Knowledge", "fFjv93ACGo8", "001-2", "Object Recognition", "Which object?",
         ["A. A cup.", "B. A ball.", "C. A hat.", "D. A pen."], "A"),
        ("002", "long", "Sports", "Zq7bcQ8n9ts", "002-1", "Action Reasoning", "Why did he run?",
         ["A. Late.", "B. Rain.", "C. Race.", "D. Fun."], "E"),
        ("003", "medium", "Film", "abcDEF12345", "003-1", "Temporal Reasoning", "What came first?",
         ["A. Intro.", "B. Credits.", "C. Fight.", "D. Chase."], None),
    ]
    columns = ["video_id", "duration", "domain", "videoID", "question_id", "task_type", "question", "options", "answer"]
    pd.DataFrame(rows, columns=columns).to_parquet(path / "videomme.parquet")
    return path / "videomme.parquet"


def test_videomme_parquet(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    data = load_dataset(write_videomme(tmp_path), video_root=videos)
    assert data.format == "videomme"
    assert [s.id for s in data.samples] == ["001-1", "001-2"]
    first, second = data.samples
    assert first.options == ("1.", "2.", "3.", "4.")  # "A. " prefix stripped, text kept
    assert second.options[0] == "A cup."  # the article "A" inside the text survives
    assert first.answer_index == 2
    assert first.category == "Counting Problem"
    assert first.video == (videos / "fFjv93ACGo8.mp4").resolve()
    assert first.meta["duration"] == "short" and first.meta["domain"] == "Knowledge"
    reasons = skipped_reasons(data)
    assert "outside the 4 options" in reasons["002-1"]
    assert reasons["003-1"] == "no answer"


# ---------------------------------------------------------------------------------------------
# Our JSONL


def test_own_jsonl_answers_and_malformed_rows():
    data = load_dataset(FIXTURES / "ours.jsonl")
    assert data.format == "jsonl"
    assert [(s.id, s.answer_index) for s in data.samples] == [("q1", 1), ("q2", 0), ("q3", 1), ("q4", 1)]
    # Relative to the JSONL's folder when no video root is given.
    assert data.samples[0].video == (FIXTURES / "clips" / "cat.mp4").resolve()
    assert data.samples[0].category == "animals" and data.samples[2].category is None
    reasons = data.skipped
    assert ("q1", "duplicate id (the first occurrence is kept)") in reasons
    assert dict(reasons)["q5"] == "no answer"
    assert dict(reasons)["q6"] == "answer 'z' is not among the options"
    assert "outside the 2 options" in dict(reasons)["q7"]
    assert dict(reasons)["q8"].startswith("1 option(s)")
    assert "outside the 2 options" in dict(reasons)["q9"]
    assert dict(reasons)["line 11"].startswith("not valid JSON")  # line numbers count blank lines
    assert len(reasons) == 7
    # The first q1 is the one kept.
    assert data.samples[0].question == "What animal is shown?"


def test_own_jsonl_video_root_and_absolute_paths(tmp_path):
    absolute = tmp_path / "elsewhere" / "x.mp4"
    path = tmp_path / "set.jsonl"
    rows = [
        {"id": "a", "video": "v/one.mp4", "question": "?", "options": ["x", "y"], "answer": "A"},
        {"id": "b", "video": str(absolute), "question": "?", "options": ["x", "y"], "answer": 1},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    root = tmp_path / "root"
    root.mkdir()
    data = load_dataset(path, video_root=root, allow_outside_root=True)
    assert data.samples[0].video == (root / "v" / "one.mp4").resolve()
    assert data.samples[1].video == absolute.resolve()
    confined = load_dataset(path, video_root=root)  # the default: an absolute path out of the root is refused
    assert [s.id for s in confined.samples] == ["a"]
    assert confined.skipped[0][0] == "b" and "outside the video root" in confined.skipped[0][1]


def test_rows_out_of_the_video_root_are_refused_unless_allowed(tmp_path, clip8):
    """``../``, an absolute path and a symlink out of the root are skipped naming the row;
    --allow-outside-root admits them; a link inside the root to a file inside it is fine."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside.mp4").symlink_to(clip8)  # clip8 lives elsewhere: the link leads out
    (root / "real.mp4").write_bytes(clip8.read_bytes())
    (root / "alias.mp4").symlink_to(root / "real.mp4")
    outside_clip = tmp_path / "secret.mp4"
    outside_clip.write_bytes(clip8.read_bytes())
    rows = [{"id": "up", "video": "../secret.mp4"}, {"id": "abs", "video": str(outside_clip)},
            {"id": "link", "video": "inside.mp4"}, {"id": "ok", "video": "real.mp4"}, {"id": "alias", "video": "alias.mp4"}]
    path = root / "set.jsonl"
    path.write_text("\n".join(json.dumps({**r, "question": "?", "options": ["x", "y"], "answer": "A"}) for r in rows))
    data = load_dataset(path)  # the root defaults to the file's folder
    assert [s.id for s in data.samples] == ["ok", "alias"]
    reasons = dict(data.skipped)
    assert set(reasons) == {"up", "abs", "link"}
    assert "video ../secret.mp4 resolves to" in reasons["up"] and "--allow-outside-root" in reasons["up"]
    assert str(clip8.resolve()) in reasons["link"]
    assert [s.id for s in load_dataset(path, allow_outside_root=True).samples] == ["up", "abs", "link", "ok", "alias"]


def test_letter_that_is_also_another_options_text_is_skipped(tmp_path):
    path = tmp_path / "grades.jsonl"
    rows = [
        {"id": "g1", "video": "v.mp4", "question": "Grade?", "options": ["B", "A", "C"], "answer": "A"},
        {"id": "g2", "video": "v.mp4", "question": "Grade?", "options": ["A", "B", "C"], "answer": "B"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_dataset(path)
    assert [(s.id, s.answer_index) for s in data.samples] == [("g2", 1)]
    assert "both a letter and the text of another option" in dict(data.skipped)["g1"]


# ---------------------------------------------------------------------------------------------
# Format detection and user errors


def test_explicit_format_override(tmp_path):
    rows = [{"id": "a", "video": "v.mp4", "question": "?", "options": ["x", "y"], "answer": "B"}]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(rows))
    assert load_dataset(path).format == "jsonl"  # our rows in a JSON list are fine too
    assert load_dataset(path, format="jsonl").samples[0].answer_index == 1
    with pytest.raises(PruneVidError, match="no usable questions"):
        load_dataset(path, format="mvbench")  # forced wrong: every row skipped, and said so
    with pytest.raises(PruneVidError, match="unknown dataset format 'csv'"):
        load_dataset(path, format="csv")
    with pytest.raises(PruneVidError, match="only applies to EgoSchema"):
        load_dataset(path, answers=EGO / "subset_answers.json")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.json", "[{", "not valid JSON"),
        ("answers.json", '{"ego-1": 1}', "not a list of questions"),
        ("odd.json", '[{"foo": 1, "bar": 2}]', "cannot tell the dataset format"),
        ("empty.json", "[]", "holds no question rows"),
        ("all_bad.jsonl", '{"id": "a", "video": "v", "question": "?", "options": ["x"], "answer": 0}\n',
         r"no usable questions .*1 option\(s\)"),
        ("bad.parquet", "not parquet", "cannot read .* as parquet"),
    ],
)
def test_unusable_files_raise_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PruneVidError, match=message) as err:
        load_dataset(path)
    assert "\n" not in str(err.value)


def test_missing_file_and_missing_video_root(tmp_path):
    with pytest.raises(PruneVidError, match="dataset file not found"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(PruneVidError, match="video root not found"):
        load_dataset(FIXTURES / "ours.jsonl", video_root=tmp_path / "no-such-dir")


# ---------------------------------------------------------------------------------------------
# Seeded sampling


def make_samples(n: int) -> list[QASample]:
    return [QASample(f"s{i}", Path(f"/v/{i}.mp4"), "?", ("x", "y"), 0) for i in range(n)]


def test_sample_rows_is_seeded_random_and_keeps_file_order():
    samples = make_samples(100)
    first = sample_rows(samples, 10, seed=0)
    assert len(first) == 10
    assert first == sample_rows(samples, 10, seed=0)  # same seed, same rows
    assert first != sample_rows(samples, 10, seed=1)  # another seed, other rows
    assert first != samples[:10]  # not a prefix
    positions = [samples.index(s) for s in first]
    assert positions == sorted(positions)  # file order kept
    assert len(set(positions)) == 10


def test_sample_rows_limits():
    samples = make_samples(5)
    assert sample_rows(samples, 5) == samples
    assert sample_rows(samples, 50) == samples
    assert sample_rows(samples, None) == samples
    with pytest.raises(PruneVidError, match=r"a number of questions \(>= 1\) or a fraction in \(0, 1\)"):
        sample_rows(samples, 0)
    with pytest.raises(PruneVidError, match="or a fraction"):
        sample_rows(samples, 2.5)


def test_lmms_eval_conventions_fraction_first_and_offset():
    """--limit 0.1 is a tenth of the rows rounded up, --sample first the first ones, --offset
    skips rows first: what lmms-eval's --limit and --offset do."""
    import math

    samples = make_samples(23)
    assert sample_rows(samples, 0.1, how="first") == samples[:3]  # ceil(2.3)
    assert len(sample_rows(samples, 0.1)) == math.ceil(23 * 0.1) and sample_rows(samples, 0.1) != samples[:3]
    assert sample_rows(samples, 4, how="first", offset=5) == samples[5:9]
    assert sample_rows(samples, None, offset=20) == samples[20:]
    picked = sample_rows(samples, 4, seed=3, offset=5)
    assert len(picked) == 4 and all(s in samples[5:] for s in picked)
    with pytest.raises(PruneVidError, match="--sample must be random or first"):
        sample_rows(samples, 4, how="last")


def test_cli_limit_fraction_first_and_offset_select_those_rows(tmp_path, tiny_pipe, monkeypatch):
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app
    from prunevid_bench.pipeline import Pipeline
    from prunevid_bench.toy.world import generate_dataset

    monkeypatch.setattr(Pipeline, "from_config", classmethod(lambda cls, cfg: tiny_pipe))
    data = generate_dataset(tmp_path / "toy", 10, seed=4)
    ids = [json.loads(line)["id"] for line in data.read_text().splitlines()]
    res = CliRunner().invoke(app, ["run", "--dataset", str(data), "--limit", "0.25", "--sample", "first", "--offset", "2",
                                   "--model", "tiny", "--num-frames", "4", "--max-new-tokens", "1", "--warmup", "0",
                                   "--results-dir", str(tmp_path / "r")], env={"COLUMNS": "200"})
    assert res.exit_code in (0, 3), res.output
    assert "2 selected (the first from row 2)" in res.output
    (run_dir,) = (tmp_path / "r").iterdir()
    assert json.loads((run_dir / "config.json").read_text())["sample_ids"] == ids[2:4]  # ceil(0.25 * 8) = 2


# ---------------------------------------------------------------------------------------------
# Preflight


def test_preflight_checks_each_video_once_and_reports_every_question():
    samples = [
        QASample("a", Path("/v/good.mp4"), "?", ("x", "y"), 0),
        QASample("b", Path("/v/bad.mp4"), "?", ("x", "y"), 0),
        QASample("c", Path("/v/good.mp4"), "?", ("x", "y"), 1),
        QASample("d", Path("/v/bad.mp4"), "?", ("x", "y"), 1),
        QASample("e", Path("/v/gone.mp4"), "?", ("x", "y"), 1),
    ]
    calls: list[Path] = []

    def check(path: Path) -> None:
        calls.append(path)
        if path.name == "bad.mp4":
            raise PruneVidError(f"cannot decode {path}")
        if path.name == "gone.mp4":
            raise PruneVidError(f"video not found: {path}")

    ok, problems = preflight(samples, check=check)
    assert [s.id for s in ok] == ["a", "c"]
    assert problems == [
        ("b", "cannot decode /v/bad.mp4"),
        ("d", "cannot decode /v/bad.mp4"),
        ("e", "video not found: /v/gone.mp4"),
    ]
    assert sorted(calls) == sorted({Path("/v/good.mp4"), Path("/v/bad.mp4"), Path("/v/gone.mp4")})


def test_preflight_default_checks_existence(tmp_path):
    (tmp_path / "here.mp4").write_bytes(b"\0")
    samples = [
        QASample("a", tmp_path / "here.mp4", "?", ("x", "y"), 0),
        QASample("b", tmp_path / "missing.mp4", "?", ("x", "y"), 0),
    ]
    ok, problems = preflight(samples)
    assert [s.id for s in ok] == ["a"]
    assert problems[0][0] == "b" and "video not found" in problems[0][1]


def test_preflight_does_not_hide_checker_bugs():
    def broken(path: Path) -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        preflight(make_samples(2), check=broken)


def test_unknown_format_suggests_the_closest(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "video": "v.mp4", "question": "Q?", "options": ["x", "y"], "answer": "A"}) + "\n")
    with pytest.raises(PruneVidError, match=r"unknown dataset format 'mvbenc' \(did you mean 'mvbench'\?\); use one of egoschema, longvideobench, mlvu, mvbench, videomme, jsonl"):
        load_dataset(path, format="mvbenc")


def test_a_format_registered_from_one_module_is_detected_and_forced(tmp_path, monkeypatch):
    """A new row format is one function plus its registration: detected from its keys or forced,
    listed in the errors, and its rows go through the shared checks."""
    from prunevid_bench.harness.datasets import Skip, format_names, get_format, register_format, registry
    from prunevid_bench.harness.datasets.base import build_sample

    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))  # the registration ends with the test

    @register_format("clipqa", title="ClipQA", detect=lambda keys: "clip" in keys)
    def open_clipqa(path, root, answers):
        def read(row, position):
            if "right" not in row:
                raise Skip("no right choice")
            return build_sample(f"c{position}", root / row["clip"], row["ask"], row["choices"], row["right"], None, None, None)

        return read

    path = tmp_path / "clips.json"
    path.write_text(json.dumps([{"clip": "a.mp4", "ask": "Q?", "choices": ["x", "y"], "right": 1},
                                {"clip": "b.mp4", "ask": "Q?", "choices": ["x", "y", "z"], "right": 5},
                                {"clip": "c.mp4", "ask": "Q?", "choices": ["x", "y"]}]))
    data = load_dataset(path)
    assert data.format == "clipqa" and [s.answer_letter for s in data.samples] == ["B"]
    assert dict(data.skipped) == {"row 2": "answer index 5 is outside the 3 options", "row 3": "no right choice"}
    assert format_names()[-1] == "clipqa" and get_format("clipqa").title == "ClipQA"
    with pytest.raises(PruneVidError, match="use one of egoschema, longvideobench, mlvu, mvbench, videomme, jsonl, clipqa"):
        load_dataset(path, format="clip")
    with pytest.raises(ValueError, match="registered twice"):
        register_format("clipqa", title="again", detect=lambda keys: False)(open_clipqa)


def test_each_builtin_format_is_its_own_module():
    from prunevid_bench.harness.datasets import format_names, get_format

    assert format_names() == ["egoschema", "longvideobench", "mlvu", "mvbench", "videomme", "jsonl"]
    assert {name: get_format(name).open.__module__ for name in format_names()} == {
        name: f"prunevid_bench.harness.datasets.{name}" for name in format_names()}
