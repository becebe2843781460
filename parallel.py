"""
Process groups and the communication of training: data parallel gradient
averaging and the global load counts of the router bias. Under torchrun
(WORLD_SIZE > 1) it uses NCCL on GPUs and gloo on CPUs; in one process every
function here is a no-op.
"""

import os

import torch
import torch.distributed as dist


def init_distributed(device="auto"):
    """Returns (rank, world_size, device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.py: --device=cuda but no CUDA device is visible; use --device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_backend_available(backend):
        raise SystemExit(f"train.py: the {backend} backend is not available in this PyTorch build")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend)
    return rank, world, torch.device(device)


def distributed():
    return dist.is_available() and dist.is_initialized()


def shutdown():
    if distributed():
        dist.destroy_process_group()


def mean_over_ranks(t):
    if distributed():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def average_gradients(model):
    """Data parallel: average every gradient over all ranks, in one flat buffer."""
    if not distributed():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def update_router_biases(model, rate):
    """
    Aux-loss-free, global load balancing (Wang et al. 2024a; Qiu et al. 2025):
    sum each router's expert counts over the whole global batch (all
    micro-batches, all ranks), then b += u * sign(mean - load). Returns the
    max/mean load of each MoE layer, for the log.
    """
    stats = []
    for experts in model.routed_experts():
        if distributed():
            dist.all_reduce(experts.load)
        load = experts.load
        stats.append((load.max(dim=-1).values / load.mean(dim=-1).clamp_min(1e-9)).max())
        experts.update_bias(rate)
    return torch.stack(stats).tolist() if stats else []
