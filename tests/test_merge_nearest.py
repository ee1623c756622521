"""A merge at layer K (the ``merge_nearest`` control) against a cache-free reference computed
layer by layer, on both tiny families: the prompt runs through layers 0..K on every token; each
merged row is the size-weighted mean of its members in the hidden states and in layers 0..K's
keys and values (post-rotary, as cached); every generated token recomputes from scratch,
attending in layers 0..K to the merged prompt keys and values and in K+1.. to the merged rows."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.verify.reference import reference_for
from tests.test_stage2 import pipes, run_traced, tiny_name  # noqa: F401


def merge(k, keep=0.4) -> dict:
    return {"merge_nearest.enabled": True, "merge_nearest.pruning_layer": k, "merge_nearest.keep_ratio": keep}


# the reference: prunevid_bench.verify.merged (one implementation, shared with `prunevid verify`)


@pytest.mark.parametrize("impl,k", [("sdpa", 1), ("eager", 0), ("sdpa", 2)])
def test_merge_at_layer_k_matches_the_cache_free_reference(pipes, impl, k):
    pipe, prepared = pipes[impl]
    traced = run_traced(pipe, prepared, **merge(k))
    st = traced.state
    assert 0 < st.tokens_after < st.tokens_before and bool((st.merged_into >= 0).all())
    assert torch.bincount(st.merged_into).max() > 1  # some kept rows really average several tokens
    ref = reference_for(pipe, prepared, traced)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    dropped = reference_for(pipe, prepared, traced, merged=False)  # the same rows kept, nothing averaged
    assert (dropped - traced.logits).abs().max() > 1e-3


def test_merge_nearest_is_listed_and_runs_from_the_cli(clip8, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["methods"])
    assert listed.exit_code == 0 and any(line.startswith("merge_nearest [llm_layer]") for line in listed.output.splitlines())
    res = runner.invoke(app, ["run", str(clip8), "What is happening?", "--model", "tiny", "--num-frames", "8",
                              "--max-new-tokens", "2", "--set", "merge_nearest.enabled=true",
                              "--set", "merge_nearest.pruning_layer=1", "--results-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
