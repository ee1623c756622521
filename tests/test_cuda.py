"""The CUDA path (events, per-phase peak memory, tensors on the model's device). Skipped where
no GPU is present, which includes CI; run on a lent GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunevid_bench.engine import run_greedy

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STAGES = {"stage1.enabled": True, "min_cluster_tokens": 4, "stage2.enabled": True, "pruning_layer": 1}


@pytest.fixture(scope="module")
def cuda_pipe():
    from prunevid_bench.pipeline import load_pipeline

    return load_pipeline("tiny", device="cuda", dtype="float32")


def frames(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)


def test_engine_equals_generate_on_cuda(cuda_pipe):
    cuda_pipe.remove_stages()
    prepared = cuda_pipe.prepare(frames(), "What is happening?")
    assert prepared.inputs["pixel_values_videos"].is_cuda
    out = run_greedy(cuda_pipe.model, prepared.inputs, 16)
    with torch.inference_mode():
        ref = cuda_pipe.model.generate(**prepared.inputs, max_new_tokens=16, do_sample=False)
    assert out.token_ids == ref[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    assert out.memory_kind == "cuda_max_allocated" and out.prefill_peak_memory_bytes > 0
    assert 0 < out.vision_encoder_s < out.ttft_s


def test_pruned_run_on_cuda_matches_cpu_token_counts(cuda_pipe, tiny_pipe):
    gpu = cuda_pipe.run(frames(1), "What is happening?", **STAGES)
    cpu = tiny_pipe.run(frames(1), "What is happening?", **STAGES)
    for key in ("tokens_before_stage1", "tokens_after_stage1", "tokens_after", "prompt_tokens", "llm_prefill_tokens"):
        assert getattr(gpu, key) == getattr(cpu, key), key
    assert tiny_pipe.device.type == "cpu"
    assert gpu.kv_cache_bytes == cpu.kv_cache_bytes < gpu.kv_cache_bytes_uncompressed
    assert gpu.stage1_s > 0 and gpu.stage2_s > 0 and gpu.memory_kind == "cuda_max_allocated"
    torch.testing.assert_close(gpu.first_token_logits, cpu.first_token_logits, rtol=0, atol=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_runs_with_both_attention_implementations(attn):
    from prunevid_bench.pipeline import load_pipeline

    pipe = load_pipeline("tiny", device="cuda", dtype="bfloat16", attn_implementation=attn)
    r = pipe.run(frames(2), "What is happening?", **STAGES)
    assert r.tokens_after < r.tokens_before_stage1 and r.generated_tokens >= 1
