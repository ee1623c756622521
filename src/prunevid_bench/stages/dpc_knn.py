"""DPC-KNN clustering (density peaks, k-nearest-neighbour density) as pure tensor functions.

The TCFormer-style DPC-KNN that the official PruneVid code uses for both temporal segmentation and
spatial merging (docs/algorithm.md, DPC-KNN), with one deliberate change: the official code adds
U(0, 1)·1e-6 noise to the density to break ties; we add none and break every tie by token index,
so two runs on the same input give the same clusters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prunevid_bench.errors import PruneVidError


def pairwise_distances(x: Tensor) -> Tensor:
    """Scaled Euclidean distances ``D[b, i, j] = ||x[b, i] - x[b, j]|| / sqrt(C)``, in float32.

    x: [B, N, C] (any float dtype) -> D: [B, N, N] float32, symmetric up to rounding, zero diagonal.

    Computed as ``||a||² + ||b||² - 2·a·b``: one batched matmul and no [N, N, C] difference
    tensor, which is what makes clustering 576 tokens of 3584 dims cheap (the squared norms are
    the Gram matrix's diagonal). Two guards keep it equal to the direct difference within float32
    tolerance (tests/test_stage1.py checks it against ``torch.cdist`` without the matmul
    shortcut): the rows are centred first, which leaves every distance unchanged but shrinks the
    norms whose cancellation the expansion suffers from, and the squared distance is clamped at 0
    before the square root. The diagonal is set to exactly 0 so that each token is its own
    nearest neighbour, as the density below assumes.
    """
    x = x.float()
    x = x - x.mean(dim=1, keepdim=True)
    gram = torch.bmm(x, x.transpose(1, 2))  # [B, N, N]
    sq_norms = gram.diagonal(dim1=1, dim2=2)  # free, and consistent with the off-diagonal terms
    sq_dist = (sq_norms.unsqueeze(2) + sq_norms.unsqueeze(1)).sub_(gram, alpha=2.0)
    sq_dist.clamp_(min=0.0)
    sq_dist.diagonal(dim1=1, dim2=2).zero_()
    # 1/sqrt(C) scaling as in the official code.
    return sq_dist.sqrt_().div_(math.sqrt(x.shape[-1]))


def dpc_knn(x: Tensor, n_clusters: int, k: int = 7) -> tuple[Tensor, Tensor]:
    """Cluster each batch element's tokens with DPC-KNN.

    x: [B, N, C] features (any float dtype; the maths runs in float32).
    Returns ``(labels, centers)``:
      - labels: LongTensor [B, N], the cluster of each token, numbered by its centre's rank
        0..n_clusters-1 (as in the official code, the id is the rank, not a position);
      - centers: LongTensor [B, n_clusters], the token index of each centre, best score first.

    Rules (D = ``pairwise_distances(x)``):
      1. Density: ``rho_i = exp(-mean of D[i, j]² over the k nearest j)``; the k nearest include
         i itself at distance 0, as in the official code (k is clipped to N).
      2. "Denser than": j is denser than i when ``rho_j > rho_i``, or when ``rho_j == rho_i`` and
         ``j < i``. This index rule replaces the official random noise, so exactly one token (the
         densest, lowest index among equals) has no denser token.
      3. Indicator: ``delta_i = min D[i, j]`` over the tokens j denser than i; the peak gets the
         maximum of D over the whole batch element (not just its row), as in the official code.
      4. Score ``rho_i * delta_i``; the centres are the n_clusters best scores in descending
         order, ties to the lower index.
      5. Each token joins its nearest centre (ties to the lower rank); each centre is then forced
         into its own cluster, as in the official code (duplicates of a centre could otherwise
         pull it into another cluster).

    Density and score are compared in log space (``log rho = -mean D²``, ``log rho + log delta``).
    The order is the same as comparing ``rho`` and ``rho * delta`` themselves wherever float32 can
    hold ``rho``; unlike them it does not collapse to all-zero ties when ``exp(-mean D²)``
    underflows, which happens for large-norm embeddings (mean D² above ~100).
    """
    if x.dim() != 3:
        raise PruneVidError(f"dpc_knn expects features of shape [B, N, C], got {tuple(x.shape)}")
    batch, n_tokens, _ = x.shape
    if not 1 <= n_clusters <= n_tokens:
        raise PruneVidError(
            f"dpc_knn n_clusters must be in [1, N={n_tokens}], got {n_clusters}"
        )
    if k < 1:
        raise PruneVidError(f"dpc_knn k must be >= 1, got {k}")
    k = min(k, n_tokens)

    dist = pairwise_distances(x)  # [B, N, N]
    knn_dist = torch.topk(dist, k, dim=-1, largest=False).values  # [B, N, k], self included
    log_density = -knn_dist.square().mean(dim=-1)  # [B, N]

    index = torch.arange(n_tokens, device=x.device)
    density_i = log_density.unsqueeze(2)  # row i
    density_j = log_density.unsqueeze(1)  # column j
    j_before_i = index.view(1, 1, -1) < index.view(1, -1, 1)
    denser = (density_j > density_i) | ((density_j == density_i) & j_before_i)  # [B, i, j]
    delta = dist.masked_fill(~denser, math.inf).amin(dim=-1)  # [B, N]
    # The peak's indicator is the batch element's largest distance, as in the official code. (Any
    # value >= its row maximum ranks it first: every other token's delta is at most its distance
    # to the peak, and its density is not higher.)
    peak_delta = dist.flatten(1).amax(dim=-1, keepdim=True).expand_as(delta)
    delta = torch.where(denser.any(dim=-1), delta, peak_delta)

    # log(0) = -inf for a duplicate of a denser token: it ranks last, like a zero score would.
    log_score = log_density + torch.log(delta)
    # A stable descending sort keeps equal scores in index order.
    centers = torch.sort(log_score, dim=-1, descending=True, stable=True).indices[:, :n_clusters]

    centre_dist = torch.gather(dist, 1, centers.unsqueeze(-1).expand(batch, n_clusters, n_tokens))
    labels = centre_dist.argmin(dim=1)  # [B, N]; argmin returns the first (lowest rank) minimum
    ranks = torch.arange(n_clusters, device=x.device).expand(batch, n_clusters)
    labels.scatter_(1, centers, ranks)
    return labels, centers
