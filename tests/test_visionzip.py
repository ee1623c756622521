"""VisionZip (VidCom2's Qwen port): the pure rule against a naive transcription of the port on
planted inputs, counts and identity; on the tiny model of each family (Qwen2.5-VL, Qwen2-VL,
Qwen3-VL), nothing to reduce == the baseline, exact counts, the LLM input rebuilt by hand and
the cache-free reference, and the ``attention`` score from the tower's last block equal to
transformers' eager attention weights."""

from __future__ import annotations

import pytest
import torch

from prunevid_bench.stages import visionzip
from prunevid_bench.tokens import weighted_rows
from tests.reduced_video import N, T, case, check_identity, check_run, eager_vision_scores, grid_tokens, run  # noqa: F401


def naive_port(x: torch.Tensor, scores: torch.Tensor, r: float, share: float = 0.6, k: int = 5):
    """The port's rule written out, step by step, with Python loops: {flat index: row}."""
    n_steps, n, _ = x.shape
    out = {}
    for t in range(n_steps):
        keep = max(1, int(n * r))
        n_dom = max(1, int(keep * share))
        n_ctx = keep - n_dom
        order = sorted(range(n), key=lambda i: (-float(scores[t, i]), i))
        dominant = sorted(order[:n_dom])
        for i in dominant:
            out[t * n + i] = x[t, i]
        rest = [i for i in range(n) if i not in dominant]
        if n_ctx == 0:
            continue

        def cos(a, b):
            return float(torch.dot(x[t, a], x[t, b]) / (x[t, a].norm() * x[t, b].norm()))

        density = {}
        for i in rest:
            sims = sorted((cos(i, j) for j in rest if j != i), reverse=True)[:k]
            density[i] = sum(sims) / len(sims)
        anchors = sorted(sorted(rest, key=lambda i: (-density[i], i))[:n_ctx])
        members = {a: [a] for a in anchors}
        for i in rest:
            if i not in anchors:
                best = max(anchors, key=lambda a: (cos(i, a), -a))
                members[best].append(i)
        for a in anchors:
            out[t * n + a] = torch.stack([x[t, i] for i in members[a]]).mean(0)
    return dict(sorted(out.items()))


def as_rows(x: torch.Tensor, res) -> dict:
    flat = x.reshape(-1, x.shape[-1])
    rows = weighted_rows(flat, res.dest, torch.ones(flat.shape[0]), res.representative.numel())
    return dict(zip(res.representative.tolist(), rows))


@pytest.mark.parametrize("r", [0.1, 0.25, 0.5, 0.8])
def test_equals_the_naive_port_on_random_tokens(r):
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(1))
    scores = x.norm(dim=-1)
    got, want = as_rows(x, visionzip.visionzip_keep(x, scores, r)), naive_port(x, scores, r)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_planted_dominant_and_contextual_tokens():
    """One step of 10 tokens, r = 0.2: keep 2, one dominant (the largest norm, token 9) and one
    contextual anchor, taken from the dense cluster (tokens 0..5, near-copies; 6..8 stand
    apart); every other token joins it, and the row is the plain mean of all nine (the port's
    rule; VisionZip's CLIP original would add the anchor to the mean: that sum would show)."""
    g = torch.Generator().manual_seed(0)
    dense = torch.eye(8)[0] + 0.01 * torch.randn(6, 8, generator=g)
    apart = torch.eye(8)[1:4] + 0.3 * torch.eye(8)[0]
    x = torch.cat([dense, apart, 10 * torch.eye(8)[5:6]])[None]
    res = visionzip.visionzip_keep(x, x.norm(dim=-1), 0.2)
    anchor = int(res.representative[0])
    assert res.representative.tolist() == [anchor, 9] and anchor < 6 and res.dominant.tolist() == [False, True]
    assert res.dest.tolist() == [0] * 9 + [1]
    row = as_rows(x, res)[anchor]
    torch.testing.assert_close(row, x[0, :9].mean(0))
    assert (row - (x[0, anchor] + x[0, :9].mean(0))).abs().max() > 0.5


def test_counts_identity_and_budget():
    x = torch.randn(4, 30, 6, generator=torch.Generator().manual_seed(2))
    for r, n_keep in [(0.25, 7), (0.01, 1), (0.5, 15)]:
        res = visionzip.visionzip_keep(x, x.norm(dim=-1), r)
        assert res.representative.numel() == 4 * n_keep
        assert int(res.dominant.sum()) == 4 * max(1, int(n_keep * 0.6))
    full = visionzip.visionzip_keep(x, x.norm(dim=-1), 1.0)
    assert torch.equal(full.dest, torch.arange(120)) and torch.equal(full.representative, torch.arange(120))
    assert visionzip.visionzip_budget(30, 0.25) == 8 and visionzip.visionzip_budget(30, 0.001) == 1
    res = visionzip.visionzip_keep(x, x.norm(dim=-1), keep_count=visionzip.visionzip_budget(30, 0.25))
    assert res.representative.numel() == 32


def test_a_step_left_with_one_token_is_its_own_anchor():
    x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(3))
    res = visionzip.visionzip_keep(x, torch.tensor([[3.0, 2.0, 1.0]]), 1.0, dominant_share=0.67)  # 2 dominant, 1 left
    assert res.representative.tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- on the tiny models
def test_nothing_to_reduce_equals_the_baseline(case):
    pipe, prepared, _ = case
    check_identity(case, run(pipe, prepared, **{"visionzip.enabled": True, "visionzip.budget": 1.0}))
    check_identity(case, run(pipe, prepared, **{"visionzip.enabled": True, "visionzip.retention_ratio": 1.0,
                                                "visionzip.score": "attention"}))


@pytest.mark.parametrize("overrides,kept", [({}, T * 4), ({"visionzip.budget": 0.5}, T * 8),
                                            ({"visionzip.retention_ratio": 0.1}, T * 1)])
def test_exact_counts(case, overrides, kept):
    pipe, prepared, _ = case
    out = run(pipe, prepared, **{"visionzip.enabled": True, **overrides})
    red = out.result.reductions[0]
    assert (red.method, red.tokens_in, red.tokens_out) == ("visionzip", T * N, kept)
    record = out.result.to_dict()
    assert record["visionzip_dominant_tokens"] + record["visionzip_contextual_tokens"] == kept


@pytest.mark.parametrize("score", ["norm", "attention"])
def test_llm_input_and_logits_equal_the_references(case, score):
    pipe, prepared, _ = case
    x = grid_tokens(case)
    scores = x.norm(dim=-1) if score == "norm" else eager_vision_scores(pipe, prepared)["received"]
    res = visionzip.visionzip_keep(x, scores, 0.25)
    out = run(pipe, prepared, **{"visionzip.enabled": True, "visionzip.score": score})
    check_run(case, out, res.dest, res.representative)


def test_the_attention_score_is_not_the_norm(case):
    """The two scores pick different dominant tokens here, so the test above can tell them apart."""
    pipe, prepared, _ = case
    x = grid_tokens(case)
    by_norm = visionzip.visionzip_keep(x, x.norm(dim=-1), 0.25)
    by_attention = visionzip.visionzip_keep(x, eager_vision_scores(pipe, prepared)["received"], 0.25)
    assert not torch.equal(by_norm.representative, by_attention.representative)


def test_preset_is_the_published_setting(case):
    from prunevid_bench.config import build_config

    cfg = build_config("visionzip-25")
    assert cfg.enabled_methods == ["visionzip"]
    assert (cfg.visionzip.retention_ratio, cfg.visionzip.score) == (0.25, "norm")
    pipe, prepared, _ = case
    out = run(pipe, prepared, **{f"visionzip.{k}": v for k, v in vars(cfg.visionzip).items()})
    assert out.result.reductions[0].tokens_out == T * max(1, int(N * 0.25))


def test_cli_runs_it_and_records_the_score(clip8, tmp_path):
    import json

    from typer.testing import CliRunner

    from prunevid_bench.cli import app

    args = ["run", str(clip8), "What is happening?", "--model", "tiny", "--num-frames", "8", "--max-new-tokens", "2",
            "--results-dir", str(tmp_path), "--json", "-q", "--preset", "visionzip-25"]
    res = CliRunner().invoke(app, [*args, "--set", "visionzip.score=attention"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["visual_tokens_kept"] == 16 and record["methods"] == ["visionzip"]
    config = json.loads(next(tmp_path.rglob("config.json")).read_text())
    assert config["config"]["visionzip"]["score"] == "attention"  # recorded per run
    res = CliRunner().invoke(app, [*args, "--set", "visionzip.score=atention"])
    assert res.exit_code == 2 and "visionzip.score must be one of norm, attention" in res.output
    assert "did you mean 'attention'" in res.output and "Traceback" not in res.output
