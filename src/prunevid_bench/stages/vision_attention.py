"""Attention scores of the vision tower's patches, per temporal step, from a block's q and k (after
the vision rotary): what FastVID, FlashVID and VisionZip's ``score: attention`` rank tokens by.
Computed in float32 from q and k alone, so the tower itself keeps its SDPA / FlashAttention
kernel (no ``output_attentions``, no eager pass); ``patch.vision_attention`` captures q and k.

Shapes: H heads, P patches of one temporal step (in the block's row order, each merge unit's
``unit`` patches consecutive), d head size, U = P / unit merged (LLM) tokens.

Rules (read for the facts, the code is ours):
- ``received`` (FlashVID ``*VisionAttention_forward`` with ``return_logits``; VisionZip's earlier
  Qwen3-VL port): ``softmax(q kᵀ/√d)`` over the step's patches, mean over heads, then over the
  queries (the attention each patch receives), then the mean of each merge unit's patches.
- ``pseudo_cls`` (FastVID ``Qwen2_5_VLVisionFlashAttention2.forward``): one query per step, the
  mean of its patches' queries, against the keys averaged over each merge unit; softmax over
  the units, mean over heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

RULES = ("received", "pseudo_cls")


CHUNK = 1 << 22  # logits per chunk of heads: a few MiB, so the softmax runs in cache (2.5x on a CPU)


def attention_received(q: Tensor, k: Tensor, unit: int) -> Tensor:
    """q, k [H, P, d] of one temporal step -> [U] the attention each merged token receives."""
    heads, patches, dim = q.shape
    step = max(1, CHUNK // (patches * patches))
    received = torch.zeros(patches, device=q.device)
    for h in range(0, heads, step):
        logits = torch.bmm(q[h : h + step].float() * dim**-0.5, k[h : h + step].float().transpose(1, 2))
        received += logits.softmax(dim=-1).sum(dim=(0, 1))  # over these heads and every query
    return (received / (heads * patches)).view(-1, unit).mean(dim=-1)  # the mean over heads and queries


def pseudo_cls_attention(q: Tensor, k: Tensor, unit: int) -> Tensor:
    """q, k [H, P, d] of one temporal step -> [U]: the step's mean query attending to its merge
    units' mean keys, averaged over heads."""
    heads, patches, dim = k.shape
    query = q.float().mean(dim=1, keepdim=True)  # [H, 1, d]
    keys = k.float().view(heads, patches // unit, unit, dim).mean(dim=2)  # [H, U, d]
    logits = (query @ keys.transpose(1, 2)) * dim**-0.5  # [H, 1, U]
    return logits.softmax(dim=-1).mean(dim=0)[0]


def step_scores(q: Tensor, k: Tensor, steps: list[int], unit: int, rule: str) -> Tensor:
    """q, k [H, sum(steps), d]: consecutive temporal steps of ``steps[i]`` patches each -> [sum /
    unit] the rule's score of every merged token, step after step."""
    fn = {"received": attention_received, "pseudo_cls": pseudo_cls_attention}[rule]
    out, start = [], 0
    for size in steps:
        out.append(fn(q[:, start : start + size], k[:, start : start + size], unit))
        start += size
    return torch.cat(out) if out else q.new_zeros(0, dtype=torch.float32)
