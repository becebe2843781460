"""
Process groups and all communication of training: data parallel gradient
averaging, the global load counts of the router bias, and the two ways of
spreading experts over P ranks (Sec. 2.3 and 3.2):

  Expert Parallel (EP): each rank owns N_e / P experts of every expert set.
    Route locally, exchange per-destination counts (metadata), send k copies
    of each token to the experts' owners (uneven splits), compute, send back.
  Head Parallel (HP): each rank owns N_h / P heads of a Multi-Head LatentMoE.
    One all-to-all of fixed, equal size before routing gives each rank its
    heads' sub-tokens of every rank's tokens; one reverse all-to-all after.
    No metadata, and the traffic does not depend on routing or on k.
  HP x EP (beyond the paper, which names it in Sec. 3.2): the P ranks of a group
    split the heads over H = P / E ranks and each head's experts over E ranks, by
    their hidden units. Rank h E + e of a group holds heads h and the e-th E-th of
    the hidden units of every expert of them: HP's all-to-all runs among the H
    ranks of shard e, then, among the E ranks of heads h, every row is gathered to
    each of them, static like HP's, and their partial outputs are summed. Every
    rank does 1/E of each pair's work, however the routing skews. So HP scales
    past N_h GPUs without replicating every expert.

With W ranks and P-way EP or HP, the W ranks form W / P = R groups of P
consecutive ranks; an expert shard is replicated over the R ranks holding the
same place in their group, and its gradients are averaged over those R only
(a head's router over the E R ranks that hold its heads).
Under torchrun (WORLD_SIZE > 1) it uses NCCL on GPUs and gloo on CPUs; in one
process everything here is a no-op.
"""

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch._inductor.config as inductor_config
import torch.nn as nn

import kernels


def pick_device(device="auto"):
    """'cuda' or 'cpu' for --device=auto|cuda|cpu: auto takes the GPU where there is one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.py: --device=cuda but no CUDA device is visible; use --device=cpu")
    return device


def init_distributed(device="auto"):
    """Returns (rank, world_size, device)."""
    device = pick_device(device)
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


def errors_once(fn, *args):
    """
    Runs fn(*args). Under torchrun a configuration or data error is met by every rank alike:
    a rank other than 0 waits a moment before it says its error, since torchrun stops every
    rank once one has failed, so the error is printed once, by rank 0, while an error that
    only another rank meets is still printed, by it.
    """
    try:
        return fn(*args)
    except SystemExit as e:
        if isinstance(e.code, str) and int(os.environ.get("RANK", "0")) > 0:
            time.sleep(5)
        raise


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


def grads_by_replicas(params):
    """The parameters' gradients, in order, grouped by the process group of the ranks that hold
    the same copy of each (`replicas`, set by shard_model; None: every rank)."""
    groups = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p, "replicas", None), []).append(p.grad)
    return groups


def average_gradients(model):
    """
    Average gradients as one process holding the whole global batch would see
    them: dense weights over all W ranks; expert shards over the R ranks that
    hold the same shard (their gradient already sums the P ranks of the group,
    whose tokens passed through them), divided by W as well.
    """
    if not distributed():
        return
    for p in model.parameters():
        if p.grad is None:  # e.g. experts that received no token: every rank must send the same sizes
            p.grad = torch.zeros_like(p)
    for group, grads in grads_by_replicas(model.parameters()).items():
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def grad_norm(params):
    """
    The gradients' global 2-norm, as one process holding the whole model computes it, for
    clipping: every rank holds only its expert shards, so a rank's own norm misses the others'
    (and ranks clipping by their own norms would step their dense replicas apart). After
    average_gradients a shard's gradient is the same on each of the r ranks replicating it, so
    summing ||g||^2 / r over all ranks counts every shard once.
    """
    groups = grads_by_replicas(params)
    if not distributed():
        return torch.nn.utils.get_total_norm([g for grads in groups.values() for g in grads])
    square = sum(torch.nn.utils.get_total_norm(grads) ** 2 / dist.get_world_size(group)
                 for group, grads in groups.items())
    dist.all_reduce(square)
    return square.sqrt()


@torch.no_grad()
def global_loads(model):
    """
    Sums each router's expert counts in place over the whole global batch (all micro-batches,
    all ranks), the counts aux-loss-free, global load balancing (Wang et al. 2024a; Qiu et
    al. 2025) moves the biases by (update_router_biases). Returns each MoE layer's max/mean
    load, for the log, on the device, so that the trainer reads it with the step's loss, in
    one wait.
    """
    stats = []
    for experts in model.routed_experts():
        if distributed():  # under HP each rank counted all tokens of its group for its heads
            dist.all_reduce(experts.load, group=getattr(experts.route_bias, "replicas", None))
        load = experts.load
        stats.append((load.max(dim=-1).values / load.mean(dim=-1).clamp_min(1e-9)).max())
    if not stats:
        return torch.zeros(0)
    stats = torch.stack(stats)
    if distributed():  # under HP each rank saw its own heads: report the worst head of all
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return stats


@torch.no_grad()
def update_router_biases(model, rate):
    """b += u * sign(mean - load) for every router, from the counts global_loads summed."""
    for experts in model.routed_experts():
        experts.update_bias(rate)


# -----------------------------------------------------------------------------
# Layout: P-way expert or head parallelism times R-way data parallelism

@dataclass
class Layout:
    """Rank h E + e of each group of P = H E ranks holds heads h (of H) and hidden units e (of E) of their experts."""
    mode: str                     # "dp", "ep" or "hp"
    heads: int = 1                # H: HP's ranks (1 under EP)
    experts: int = 1              # E: EP's ranks (1 under plain HP)
    head_index: int = 0           # h
    expert_index: int = 0         # e
    head_group: object = None     # the H ranks of HP's all-to-all: same e, every h
    expert_group: object = None   # the E ranks of EP's all-to-all (HP x EP's gather): same h, every e
    replicas: object = None       # the R ranks that hold the same shard (h, e)
    head_replicas: object = None  # the E R ranks that hold heads h (their routers)

    @property
    def size(self):
        return self.heads * self.experts


def make_layout(mode, size, rank, world, ep_size=1):
    """Every rank must call this (new_group is collective). P = 1 is plain data parallel."""
    if mode == "dp" or size == 1:
        return Layout("dp")
    E = size if mode == "ep" else ep_size
    H, R = size // E, world // size

    def groups(key):  # one process group of the ranks r P + h E + e for each value of key(r, h, e)
        members = {}
        for r in range(R):
            for h in range(H):
                for e in range(E):
                    members.setdefault(key(r, h, e), []).append(r * size + h * E + e)
        return {k: dist.new_group(ranks) for k, ranks in members.items()}
    r, h, e = rank // size, rank % size // E, rank % E
    return Layout(mode, H, E, h, e, head_group=groups(lambda r, h, e: (r, e))[r, e],
                  expert_group=groups(lambda r, h, e: (r, h))[r, h], replicas=groups(lambda r, h, e: (h, e))[h, e],
                  head_replicas=groups(lambda r, h, e: h)[h])


def check_layout(mode, size, world, config, ep_size=1):
    """Fail before anything is allocated if P ranks (E of them for the experts) cannot split this model."""
    if mode not in ("dp", "ep", "hp"):
        raise SystemExit(f"train.py: --parallel={mode!r} is unknown; choose dp, ep or hp")
    if ep_size != 1 and mode != "hp":
        raise SystemExit(f"train.py: --ep_size={ep_size} applies to --parallel=hp (Head Parallel x Expert "
                         f"Parallel); --parallel=ep already spreads the experts over all P ranks: drop --ep_size")
    if mode == "dp":
        return
    if size < 1 or world % size:
        raise SystemExit(f"train.py: --parallel_size={size} must divide the world size {world}")
    if mode == "hp" and config.ffn != "mh_latent_moe":
        raise SystemExit(f"train.py: --parallel=hp needs ffn=mh_latent_moe (independent heads); "
                         f"ffn={config.ffn!r} has one expert set per layer: use --parallel=ep")
    if mode == "hp" and (ep_size < 1 or size % ep_size):
        raise SystemExit(f"train.py: --ep_size={ep_size} must divide --parallel_size P={size}")
    if mode == "hp" and config.moe_heads % (size // ep_size):
        raise SystemExit(f"train.py: --parallel=hp over P={size} ranks, {size // ep_size} for the heads "
                         f"(P / ep_size), needs them to divide moe_heads={config.moe_heads}; change moe_heads, "
                         f"--parallel_size or --ep_size")
    if mode == "hp" and config.expert_dim % ep_size:
        raise SystemExit(f"train.py: --ep_size={ep_size} must divide expert_dim={config.expert_dim} (HP x EP "
                         f"splits every expert's hidden units over the E ranks); change expert_dim or --ep_size")
    if mode == "hp" and ep_size > 1 and config.n_expert > 2 ** 15:
        raise SystemExit(f"train.py: --ep_size={ep_size} sends expert indices as 16-bit integers inside the "
                         f"bf16 rows' message; n_expert={config.n_expert} is above 32768: use --ep_size=1")
    if mode == "ep" and not config.is_moe:
        raise SystemExit("train.py: --parallel=ep needs a MoE ffn; ffn='mlp' has no experts: use dp")
    if mode == "ep" and config.n_expert % size:
        raise SystemExit(f"train.py: --parallel=ep over P={size} ranks needs P to divide "
                         f"n_expert={config.n_expert}; change n_expert or --parallel_size")


def shard_model(model, layout, overlap=False):
    """
    Keep this rank's shard of every MoE layer; remember, for the checkpoints, the dims along
    which it was split: (heads dim, dim of the E-way split: experts under EP, hidden units
    under HP x EP), None where it was not. overlap: under HP or EP, each micro-batch's
    halves exchange while the other half computes.
    """
    from model import MultiHeadLatentMoE, RoutedExperts
    if overlap and layout.mode == "hp":
        wait_where_used()
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadLatentMoE) and layout.mode == "hp":
            m.head_parallel = HeadParallel(layout.head_group, layout.heads, m.moe_heads)
            m.overlap = overlap
            if layout.experts > 1:
                m.experts.expert_parallel = GatheredExpertParallel(layout.expert_group, layout.experts)
            # the heads; of each head, its experts' hidden units (HP x EP); the routers go with their heads
            sharded = {"router": (0, None), "w1": (0, 2), "w2": (0, 2), "route_bias": (0, None), "load": (0, None)}
        elif isinstance(m, RoutedExperts) and layout.mode == "ep":
            m.expert_parallel = ExpertParallel(layout.expert_group, layout.experts, m.n_expert // layout.experts)
            m.expert_parallel.overlap = overlap
            sharded = {"w1": (None, 1), "w2": (None, 1)}  # the experts; routers stay whole and replicated
        else:
            continue
        experts = m.experts if isinstance(m, MultiHeadLatentMoE) else m
        prefix = f"{name}.experts." if isinstance(m, MultiHeadLatentMoE) else f"{name}."
        for attr, dims in sharded.items():
            setattr(experts, attr, take_shard(getattr(experts, attr), dims, layout))
            getattr(experts, attr).replicas = layout.replicas if dims[1] is not None else layout.head_replicas
            model.shard_dims[prefix + attr] = dims


def wait_where_used():
    """Compiled, HP's exchanges are awaited right after they start: inductor places each
    functional collective's wait there. Moved to its result's first use, one half's exchange
    runs while the other half computes."""
    inductor_config.reorder_for_compute_comm_overlap = True
    inductor_config.reorder_for_compute_comm_overlap_passes = ["sink_waits"]


def take_shard(t, dims, layout):
    """This rank's piece of t: heads h of H along dims[0], part e of E along dims[1]."""
    piece = t.detach()
    for dim, n, i in zip(dims, (layout.heads, layout.experts), (layout.head_index, layout.expert_index)):
        if dim is not None:
            piece = piece.chunk(n, dim)[i]
    return nn.Parameter(piece.clone()) if isinstance(t, nn.Parameter) else piece.clone()


def checkpoint_mesh(layout, world, device):
    """The (R replicas, H heads, E experts) device mesh of the layout, for the checkpoint's DTensors (collective)."""
    if layout.mode == "dp":
        return None
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (world // layout.size, layout.heads, layout.experts),
                            mesh_dim_names=("replica", "head", "expert"))


def sharded_state(model, optimizer, mesh):
    """
    The model and AdamW state as torch.distributed.checkpoint sees it. An expert shard is a
    DTensor placed on the mesh (Replicate over the data-parallel replicas, Shard along the
    dims split by heads and by E within a group, Replicate along a mesh dim it is not split by);
    everything else is a plain tensor, which DCP takes as replicated and writes once. The
    tensors are this rank's own, not copies: saving reads them, loading fills them in place,
    and DCP reshards a checkpoint of one layout into any other.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def place(name, t):
        dims = model.shard_dims.get(name)
        if dims is None or not t.dim():
            return t
        placements = [Replicate()] + [Replicate() if d is None else Shard(d) for d in dims]
        return DTensor.from_local(t, mesh, placements, run_check=False)
    return {"model": {n: place(n, t) for n, t in model.state_dict().items()},
            "optimizer": {n: {key: place(n, v) for key, v in optimizer.state[p].items()}
                          for n, p in model.named_parameters()}}


# -----------------------------------------------------------------------------
# All-to-all with autograd: the backward pass is the same exchange, reversed

class Exchange:
    """
    An all-to-all started now and awaited by result() (called once), so that work queued
    between the two runs while it is in flight (async_op: the host never waits, the device
    stream waits only at result()). Its backward is the reverse exchange, started as soon as
    the gradient of the result exists and awaited only where the gradient of x is needed.
    """

    def __init__(self, x, out_splits, in_splits, group):
        self.splits, self.group = (out_splits, in_splits), group
        self.out = ExchangeStart.apply(x, self)

    def result(self):
        out, self.out = self.out, None  # nothing of the autograd graph stays on self: no reference cycle
        return ExchangeWait.apply(out, self)

    def start(self, x, splits):
        out = x.new_empty((sum(splits[0]), *x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), splits[0], splits[1], group=self.group, async_op=True)
        return out, work


class ExchangeStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, exchange):
        ctx.exchange = exchange
        out, exchange.work = exchange.start(x, exchange.splits)
        return out

    @staticmethod
    def backward(ctx, _):  # the reverse exchange, started by ExchangeWait.backward, is awaited here
        e = ctx.exchange
        e.grad_work.wait()
        grad_x, e.grad_x, e.grad_work = e.grad_x, None, None
        return grad_x, None


class ExchangeWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, exchange):
        ctx.exchange = exchange
        exchange.work.wait()
        exchange.work = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        e = ctx.exchange
        e.grad_x, e.grad_work = e.start(grad, e.splits[::-1])
        return grad, None  # passed on to ExchangeStart.backward, which returns grad_x instead


def all_to_all(t, splits, group):
    """t's rows, splits[q] of them to rank q, and as many back from each (HP's and HP x EP's
    static splits): a functional collective, in flight until its result is first used, and
    traced by torch.compile."""
    return funcol.all_to_all_single_autograd(t.contiguous(), splits, splits, group)


class HeadParallel:
    """
    Sec. 3.2: the all-to-all moves before routing; its splits are static and equal.
    Its exchanges are functional collectives: each returns at once, and its result is
    awaited where it is first used, so that a caller can compute on one part of a
    micro-batch while another part's exchange runs; torch.compile traces them, so under
    HP a block compiles as one graph.
    """

    def __init__(self, group, size, moe_heads):
        self.group, self.size, self.moe_heads = group, size, moe_heads  # the P (or H, under HP x EP) ranks
        self.splits = None  # the last exchange's splits (rows per peer), kept for inspection

    def dispatch(self, sub):
        """Sends (N, G*N_h, d_h), this rank's tokens, to the heads' ranks: (P*N, G*N_h/P, d_h),
        its heads of every rank's tokens (rows: rank 0's, rank 1's, ...), in flight."""
        P, (N, _, dim) = self.size, sub.shape
        # rank p owns heads [p N_h/P, (p+1) N_h/P) of each of the G groups (sub-tokens, routing tokens)
        parts = sub.view(N, -1, P, self.moe_heads // P, dim).permute(2, 0, 1, 3, 4)  # (P, N, G, N_h/P, d_h)
        self.splits = [N] * P
        return all_to_all(parts.reshape(P * N, -1, dim), self.splits, self.group)

    def start_combine(self, y):
        """Starts returning (P*N, N_h/P, d_h), the heads' outputs, to their tokens' ranks."""
        splits = [y.size(0) // self.size] * self.size
        return all_to_all(y, splits, self.group)

    def finish_combine(self, out):
        """(N, N_h, d_h): every head's output for this rank's tokens (out: start_combine's; block q: rank q's heads)."""
        return out.view(self.size, -1, *out.shape[1:]).transpose(0, 1).reshape(-1, self.size * out.size(1), out.size(2))

    def combine(self, y):
        return self.finish_combine(self.start_combine(y))


@dataclass
class Dispatch:
    """
    One EP exchange. Each (token, set) row goes once to every rank holding some of its
    experts, with its gates for those; the rank sums the row's gated outputs and returns
    one row.
    """
    sent: torch.Tensor   # the rows sent, as flat slots row * P + peer of an (N * S, P) layout, by peer
    gated: torch.Tensor  # (rows sent, k): which of each sent row's k experts its peer holds
    splits: tuple        # rows per peer, (sent, received)
    pairs: torch.Tensor  # the received pairs, as flat slots row * k + slot of the (rows received, k) layout
    local: torch.Tensor  # their experts in this rank's flat list of S * N_e/P
    tokens: tuple        # (N, S)


class ExpertParallel:
    """
    Sec. 2.3: dispatch each (sub-)token to the ranks owning its chosen experts. It crosses
    once to each such rank, with the gates of the experts it has there (as DeepEP sends
    it; the paper's EP sends k copies), and one row, their gated outputs summed, comes back.
    With overlap, a micro-batch's two halves exchange their metadata first (the host waits
    for it), then each half's experts run while the other half's exchange is in flight.
    """

    def __init__(self, group, size, local_experts):
        self.group, self.size, self.local_experts = group, size, local_experts  # the P ranks of --parallel=ep
        self.overlap = False
        self.splits = None  # (sent, received) rows per peer of the last exchange, kept for inspection

    @torch.compiler.disable  # collectives, awaited in Python
    def __call__(self, x, idx, gates, w1, w2, kernel="fused"):
        # x: (N, S, d_h); idx, gates: (N, S, k); w1, w2: (S, N_e/P, d_e, d_h), this rank's experts
        halves = list(zip(*(t.chunk(2) for t in (x, idx, gates)))) if self.overlap else [(x, idx, gates)]
        plans = [self.plan(i) for _, i, _ in halves]
        sent = [self.start_dispatch(h, g, p) for (h, _, g), p in zip(halves, plans)]
        back = [self.start_combine(self.experts(s.result(), p, w1, w2, kernel), p) for s, p in zip(sent, plans)]
        return torch.cat([self.finish_combine(b, p) for b, p in zip(back, plans)])

    def plan(self, idx):
        """The Dispatch of the pairs idx (N, S, k): the metadata exchange HP does without."""
        P, E, (N, S, k) = self.size, self.local_experts, idx.shape
        choice = idx.reshape(N * S, k)
        owner = choice // E
        holds = owner[:, :, None] == torch.arange(P, device=idx.device)  # (N S, k, P)
        to_peer = holds.any(1)                                            # (N S, P): the rows each peer gets
        counts = torch.stack((to_peer.sum(0), holds.sum((0, 1))), 1)      # rows and pairs per peer
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        sent_counts, recv_counts = torch.stack((counts, recv)).tolist()  # the host's one wait
        self.splits = ([rows for rows, _ in sent_counts], [rows for rows, _ in recv_counts])
        by_peer = torch.nonzero_static(to_peer.t().flatten(), size=sum(self.splits[0]))[:, 0]  # peer * N S + row
        row, peer = by_peer % (N * S), by_peer // (N * S)
        gated = owner[row] == peer[:, None]
        # each sent row's k slots: the expert in the peer's flat list of S * N_e/P, or -1
        local = torch.where(gated, (row % S * E)[:, None] + choice[row] % E, -1)
        local_recv = local.new_empty(sum(self.splits[1]), k)
        dist.all_to_all_single(local_recv, local, self.splits[1], self.splits[0], group=self.group)
        pairs = torch.nonzero_static(local_recv.flatten() >= 0, size=sum(p for _, p in recv_counts))[:, 0]
        return Dispatch(row * P + peer, gated, self.splits, pairs, local_recv.flatten()[pairs], (N, S))

    def start_dispatch(self, x, gates, plan):
        """Starts sending each row of x (N, S, d_h) to the peers holding its experts, once to each,
        with its k gates (0 for the experts another rank holds) as k more columns."""
        P = self.size
        rows = kernels.pair_rows(x.reshape(-1, x.size(-1)), plan.sent, P)
        g = kernels.pair_rows(gates.reshape(-1, gates.size(-1)), plan.sent, P) * plan.gated
        return Exchange(torch.cat((rows, g.to(rows.dtype)), 1), plan.splits[1], plan.splits[0], self.group)

    def experts(self, received, plan, w1, w2, kernel):
        """The received rows' pairs through this rank's experts (all S sets as one flat list),
        each row's gated outputs summed (Eq. 1): one row to send back per row received."""
        dim = w1.size(-1)
        k = received.size(1) - dim
        x, gates = received.split([dim, k], 1)
        xs = kernels.pair_rows(x, plan.pairs, k)[:, None]
        g = kernels.pair_rows(gates.reshape(-1, 1), plan.pairs, 1).view(-1, 1, 1)
        y = kernels.expert_ffn(xs, plan.local.view(-1, 1, 1), g, w1.reshape(1, -1, *w1.shape[2:]),
                               w2.reshape(1, -1, *w2.shape[2:]), kernel)
        return kernels.scatter_sum(y, plan.pairs, received.size(0), k)

    def start_combine(self, y_recv, plan):
        """Starts returning the summed outputs to their tokens' ranks."""
        return Exchange(y_recv, plan.splits[0], plan.splits[1], self.group)

    def finish_combine(self, exchange, plan):
        """Each (token, set)'s output, summed over the peers that computed it: (N, S, d_h)."""
        N, S = plan.tokens
        return kernels.scatter_sum(exchange.result(), plan.sent, N * S, self.size).view(N, S, -1)

    def dispatch(self, x, idx, gates):
        plan = self.plan(idx)
        return self.start_dispatch(x, gates, plan).result(), plan

    def combine(self, y_recv, plan):
        return self.finish_combine(self.start_combine(y_recv, plan), plan)


INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # the integer dtype of each float's width


def index_columns(index, like):
    """Integer indices as columns of like's float dtype, bit for bit (int16 in bf16), so that
    they travel in like's message unrounded; index_values reads them back."""
    return index.to(INT_OF_SIZE[like.element_size()]).view(like.dtype)


def index_values(columns):
    return columns.detach().view(INT_OF_SIZE[columns.element_size()]).long()


class GatheredExpertParallel:
    """
    EP among the few ranks E of HP x EP, with no metadata: each of the E ranks holds an
    E-th of the hidden units of every expert of its heads (Eq. 1 is a sum over hidden
    units), every rank's rows go to each of the E ranks (an all-gather, as an all-to-all of
    equal splits), each rank runs every pair on its hidden units, and the partial outputs
    go back to their rows' ranks, to be summed in rank order (a reduce-scatter). Its splits
    are static, as HP's: no counts cross and the host never waits, where ExpertParallel
    waits for the counts in every layer of every micro-batch; and each rank's work is 1/E
    of every pair's, however the routing skews, where a split by experts leaves the hot
    experts' rank with all of it (mh_4b at one rank of HP 2 x EP 2, every token on the
    same 4 experts, H200: experts forward+backward 6.31 ms split by experts, 3.71 split by
    hidden units; 3.86 and 3.89 under uniform routing). The price is traffic: a row
    crosses to every peer, where EP's sends it only to those holding one of its k experts.
    """

    def __init__(self, group, size):
        self.group, self.size = group, size  # the E ranks
        self.splits = None  # rows per peer of the last exchange, kept for inspection

    def __call__(self, x, idx, gates, w1, w2, kernel="fused"):
        # x: (N, S, d_h); idx, gates: (N, S, k); w1, w2: (S, N_e, d_e/E, d_h), this rank's hidden units
        rows, idx, gates = self.dispatch(x, idx, gates)
        return self.combine(kernels.expert_ffn(rows, idx, gates, w1, w2, kernel))

    def dispatch(self, x, idx, gates):
        """Every peer's rows x, (E N, S, d_h), block q rank q's, and their experts and gates,
        (E N, S, k). The rows travel in a message of their own, so that they arrive
        contiguous for the expert kernels."""
        E, N = self.size, x.size(0)
        slots = torch.cat((gates.to(x.dtype), index_columns(idx, x)), -1)
        self.splits = [N] * E
        rows, slots = (all_to_all(t.expand(E, *t.shape).flatten(0, 1), self.splits, self.group) for t in (x, slots))
        gates, idx = slots.split(idx.size(-1), -1)
        return rows, index_values(idx), gates

    def combine(self, y):
        """y (E N, S, d_h), this rank's partial outputs for every peer's rows -> (N, S, d_h):
        each of this rank's rows summed over the peers' partial outputs, in rank order."""
        out = all_to_all(y, self.splits, self.group)
        return out.view(self.size, -1, *out.shape[1:]).sum(0)
