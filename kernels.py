"""
The two MoE hot spots of Multi-Head LatentMoE (arXiv 2602.04870, Sec. 3.3-3.4),
each next to its plain-PyTorch twin. The twins are the specification: they
run on the CPU, serve as the tests' oracle and as bench.py's naive baseline.

  topk_route  : scores = x W_r, top-k of (scores + b), the k unbiased scores
  expert_ffn  : sum_j g_j W2[e_j]^T gelu(W1[e_j] x), dropless
"""

import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Routing (Eq. 2-4, Sec. 3.3)

def check_route_args(x, weight, bias, k):
    n_sets, dim, n_expert = weight.shape
    if x.shape[-2:] != (n_sets, dim):
        raise ValueError(f"topk_route: x has shape {tuple(x.shape)}, expected (..., {n_sets}, {dim}) "
                         f"to match router weight {tuple(weight.shape)} (N_h, d_h, N_e)")
    if bias.shape != (n_sets, n_expert):
        raise ValueError(f"topk_route: bias has shape {tuple(bias.shape)}, expected ({n_sets}, {n_expert})")
    if not 1 <= k <= n_expert:
        raise ValueError(f"topk_route: k={k} must lie in 1..N_e={n_expert}")


def topk_route(x, weight, bias, k):
    """
    x: (..., N_h, d_h); weight: (N_h, d_h, N_e) fp32; bias: (N_h, N_e) fp32.
    Returns the k scores with the bias removed, (..., N_h, k) fp32, and their
    expert indices (..., N_h, k), ordered by biased score, descending.
    """
    check_route_args(x, weight, bias, k)
    return topk_route_reference(x, weight, bias, k)


def topk_route_reference(x, weight, bias, k):
    dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 at least (Sec. 2.2)
    scores = torch.einsum("...hd,hde->...he", x.to(dtype), weight.to(dtype))  # (..., N_h, N_e)
    idx = torch.topk(scores + bias, k, dim=-1).indices  # the bias picks experts (Alg. 1 line 7) ...
    return scores.gather(-1, idx), idx                   # ... but never enters the scores (line 13)


# -----------------------------------------------------------------------------
# Expert computation (Eq. 1, Sec. 3.4)

def check_expert_args(x, idx, gates, w1, w2):
    n_sets, n_expert, expert_dim, dim = w1.shape
    if w2.shape != w1.shape:
        raise ValueError(f"expert_ffn: w2 has shape {tuple(w2.shape)}, expected w1's {tuple(w1.shape)}")
    if x.dim() != 3 or x.shape[1:] != (n_sets, dim):
        raise ValueError(f"expert_ffn: x has shape {tuple(x.shape)}, expected (N, {n_sets}, {dim})")
    if idx.shape != gates.shape or idx.shape[:2] != x.shape[:2]:
        raise ValueError(f"expert_ffn: idx {tuple(idx.shape)} and gates {tuple(gates.shape)} "
                         f"must both be (N, N_h, k) with N, N_h = {tuple(x.shape[:2])}")


def cluster_by_expert(idx, n_expert):
    """
    Fig. 2's clustering: sort the (token, head, slot) pairs by (head, expert).
    idx: (N, N_h, k). Returns, in clustered order, the flat pair index
    (into N*N_h*k), and the number of pairs of each (head, expert) group,
    (N_h * N_e,).
    """
    N, n_sets, k = idx.shape
    head = torch.arange(n_sets, device=idx.device).view(1, -1, 1)
    group = (idx + head * n_expert).flatten()
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=n_sets * n_expert)
    return order, counts


def expert_ffn(x, idx, gates, w1, w2):
    """
    x: (N, N_h, d_h) sub-tokens; idx, gates: (N, N_h, k);
    w1, w2: (N_h, N_e, d_e, d_h). Returns (N, N_h, d_h).
    """
    check_expert_args(x, idx, gates, w1, w2)
    return expert_ffn_reference(x, idx, gates, w1, w2)


def expert_ffn_reference(x, idx, gates, w1, w2):
    # a per-expert loop over the clustered pairs: dropless, every pair computed
    N, n_sets, dim = x.shape
    k = idx.size(-1)
    order, counts = cluster_by_expert(idx, w1.size(1))
    rows = order // k                                   # pair -> row of x.view(N * N_h, d_h)
    xs = x.reshape(N * n_sets, dim)[rows]
    w1g, w2g = w1.flatten(0, 1), w2.flatten(0, 1)       # (N_h * N_e, d_e, d_h)
    ys = [F.gelu(chunk @ w1g[g].T) @ w2g[g]
          for g, chunk in enumerate(torch.split(xs, counts.tolist())) if chunk.numel()]
    y = torch.cat(ys) * gates.flatten()[order, None].to(x.dtype)
    out = torch.zeros(N * n_sets, dim, device=x.device, dtype=y.dtype).index_add(0, rows, y)
    return out.view(N, n_sets, dim)
