"""
GPT with a choice of feedforward: dense MLP, MoE, LatentMoE, MH-MoE or
Multi-Head LatentMoE (arXiv 2602.04870). Equation and section numbers in the
comments refer to that paper.

Names: attention keeps nanoGPT's n_head / head_dim; the MoE side uses
moe_heads (N_h), moe_head_dim (d_h), n_expert (N_e), topk (k),
expert_dim (d_e) and latent_dim (LatentMoE's width l).
"""

import difflib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

FFN_KINDS = ("mlp", "moe", "latent_moe", "mh_moe", "mh_latent_moe")


@dataclass
class GPTConfig:
    block_size: int = 2048        # T, the context length
    vocab_size: int = 50304       # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 8               # attention heads
    n_embd: int = 1024            # d
    ffn: str = "mlp"              # one of FFN_KINDS
    n_dense_layers: int = 2       # the first layers stay MLPs in MoE models (Sec. 2.2)
    n_expert: int = 384           # N_e, per expert set
    topk: int = 4                 # k
    expert_dim: int = 256         # d_e
    latent_dim: int = 1024        # l, LatentMoE's expert width
    moe_heads: int = 8            # N_h
    moe_head_dim: int = 128       # d_h
    separate_routing_tokens: bool = False  # Sec. 4.4: route on a second set of sub-tokens
    expert_kernel: str = "fused"  # on CUDA: fused Triton, FlexAttention (Sec. 3.4) or grouped GEMM

    def __post_init__(self):
        check_config(self)

    @property
    def is_moe(self):
        return self.ffn != "mlp"


def config_error(field, value, fix):
    return ValueError(f"config: {field}={value!r} is invalid: {fix}")


def did_you_mean(word, choices):
    near = difflib.get_close_matches(str(word), choices, n=1)
    return f"did you mean {near[0]!r}? " if near else ""


def check_config(c):
    """Reject a bad configuration before anything is allocated."""
    if c.ffn not in FFN_KINDS:
        raise config_error("ffn", c.ffn,
                           f"{did_you_mean(c.ffn, FFN_KINDS)}choose one of {', '.join(FFN_KINDS)}")
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        if getattr(c, name) < 1:
            raise config_error(name, getattr(c, name), "it must be at least 1")
    if c.n_embd % c.n_head:
        raise config_error("n_head", c.n_head, f"it must divide n_embd={c.n_embd}")
    if (c.n_embd // c.n_head) % 2:
        raise config_error("n_head", c.n_head, "n_embd // n_head must be even for rotary embeddings")
    if c.expert_kernel not in kernels.EXPERT_KERNELS:
        choices = kernels.EXPERT_KERNELS
        raise config_error("expert_kernel", c.expert_kernel,
                           f"{did_you_mean(c.expert_kernel, choices)}choose one of {', '.join(choices)}")
    if not c.is_moe:
        return
    if not 0 <= c.n_dense_layers <= c.n_layer:
        raise config_error("n_dense_layers", c.n_dense_layers, f"it must lie in 0..n_layer={c.n_layer}")
    for name in ("n_expert", "topk", "expert_dim", "latent_dim", "moe_heads", "moe_head_dim"):
        if getattr(c, name) < 1:
            raise config_error(name, getattr(c, name), "it must be at least 1")
    if c.topk > c.n_expert:
        raise config_error("topk", c.topk, f"a token cannot pick more experts than n_expert={c.n_expert}")
    if c.separate_routing_tokens and c.ffn != "mh_latent_moe":
        raise config_error("separate_routing_tokens", True, "it applies to ffn=mh_latent_moe only")


# Paper presets (Tables 3-5) and small ones that run on a CPU in seconds.
# latent_* keep N_e, k, d_e and the total of MoE (Table 4), so l = d.
# mhmoe_2b pools the 8 x 384 experts of mh_2b into one shared set.
PRESETS = {
    "mlp":       dict(ffn="mlp"),
    "moe_2b":    dict(ffn="moe", n_expert=384, topk=4, expert_dim=256),
    "moe_4b":    dict(ffn="moe", n_expert=768, topk=4, expert_dim=256),
    "latent_2b": dict(ffn="latent_moe", n_expert=384, topk=4, expert_dim=256, latent_dim=1024),
    "latent_4b": dict(ffn="latent_moe", n_expert=768, topk=4, expert_dim=256, latent_dim=1024),
    "mh_2b":     dict(ffn="mh_latent_moe", n_expert=384, topk=4, expert_dim=256),
    "mh_4b":     dict(ffn="mh_latent_moe", n_expert=768, topk=4, expert_dim=256),
    "mh_2b_g":   dict(ffn="mh_latent_moe", n_expert=768, topk=8, expert_dim=128),
    "mh_4b_g":   dict(ffn="mh_latent_moe", n_expert=1536, topk=8, expert_dim=128),
    "mhmoe_2b":  dict(ffn="mh_moe", n_expert=3072, topk=4, expert_dim=256),
}
# Reduced scale for the quality comparison on one GPU (README "Quality"): the same
# ratios, k * d_e = d and N_h * d_h = d, at d = 512; G doubles N_e and k, halves d_e.
REDUCED = dict(block_size=1024, n_layer=8, n_head=8, n_embd=512, n_dense_layers=1,
               moe_heads=8, moe_head_dim=64, latent_dim=512)
PRESETS.update({
    "mlp_small":    dict(REDUCED, ffn="mlp"),
    "moe_small":    dict(REDUCED, ffn="moe", n_expert=64, topk=4, expert_dim=128),
    "latent_small": dict(REDUCED, ffn="latent_moe", n_expert=64, topk=4, expert_dim=128),
    "mh_small":     dict(REDUCED, ffn="mh_latent_moe", n_expert=64, topk=4, expert_dim=128),
    "mh_small_g":   dict(REDUCED, ffn="mh_latent_moe", n_expert=128, topk=8, expert_dim=64),
})
TINY = dict(block_size=128, n_layer=4, n_head=4, n_embd=128, n_dense_layers=1,
            n_expert=16, topk=2, expert_dim=32, latent_dim=64, moe_heads=4, moe_head_dim=32)
PRESETS.update({
    "tiny_mlp":    dict(TINY, ffn="mlp"),
    "tiny_moe":    dict(TINY, ffn="moe", expert_dim=64),
    "tiny_latent": dict(TINY, ffn="latent_moe"),
    "tiny_mhmoe":  dict(TINY, ffn="mh_moe", n_expert=64),
    "tiny_mh":     dict(TINY, ffn="mh_latent_moe"),
})


def preset(name):
    if name not in PRESETS:
        raise ValueError(f"config: preset={name!r} is unknown: {did_you_mean(name, PRESETS)}"
                         f"choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# -----------------------------------------------------------------------------
# Attention (nanoGPT's, with RMSNorm and rotary embeddings, no biases)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rotary_tables(head_dim, seq_len, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # (T, head_dim/2) each


def apply_rotary(x, cos, sin):
    # x: (B, n_head, T, head_dim), rotating pairs (first half, second half)
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj.weight.is_output_projection = True

    def forward(self, x, cos, sin, cache=None):
        """cache: this layer's KVCache entry when generating: the keys and values of the earlier
        positions; then x is the whole prompt (from position 0) or one new token."""
        B, T, C = x.size()
        start = cache.length if cache is not None else 0
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        rope = slice(start, start + T)
        q, k = apply_rotary(q, cos[rope], sin[rope]), apply_rotary(k, cos[rope], sin[rope])
        if cache is not None:
            k, v = cache.append(self, k, v)  # (B, n_head, start + T, head_dim)
        # causal within a prompt; a single new token attends to every cached position
        y = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0)  # (B, n_head, T, head_dim)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class KVCache:
    """The keys and values of every attention layer for the positions generated so far."""

    def __init__(self):
        self.length, self.kv = 0, {}

    def append(self, layer, k, v):
        if layer in self.kv:
            k, v = (torch.cat((old, new), dim=2) for old, new in zip(self.kv[layer], (k, v)))
        self.kv[layer] = (k, v)
        return k, v


# -----------------------------------------------------------------------------
# Feedforward blocks: MLP, MoE, LatentMoE, MH-MoE, Multi-Head LatentMoE

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.c_proj.weight.is_output_projection = True

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class RoutedExperts(nn.Module):
    """
    N_h independent expert sets (Eq. 1-4 each), acting on sub-tokens
    x: (N, N_h, d_h). Every head has its own fp32 router, its own
    load-balancing bias and its own N_e experts of hidden size d_e.
    Single-set MoE is the N_h = 1 case.
    picks: sub-tokens each token routes through one expert set (for counting
    active parameters: N_h in MH-MoE, whose heads share one set; else 1).
    route_dim: width of the vectors routed on, if not the experts' width.
    kernel: the expert path on CUDA, one of kernels.EXPERT_KERNELS.
    """

    def __init__(self, n_sets, dim, n_expert, expert_dim, topk, picks=1, route_dim=None, kernel="fused"):
        super().__init__()
        self.topk, self.n_expert, self.picks, self.kernel = topk, n_expert, picks, kernel
        self.router = nn.Parameter(torch.empty(n_sets, route_dim or dim, n_expert))  # W_r, fp32 always
        self.w1 = nn.Parameter(torch.empty(n_sets, n_expert, expert_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_sets, n_expert, expert_dim, dim))
        self.w2.is_output_projection = True
        # aux-loss-free bias b (Wang et al. 2024a) and the expert counts it is updated from
        self.register_buffer("route_bias", torch.zeros(n_sets, n_expert))
        self.register_buffer("load", torch.zeros(n_sets, n_expert), persistent=False)
        self.expert_parallel = None  # parallel.ExpertParallel when experts are spread over ranks
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)  # GPT.init_weights re-draws w2 with the output scaling

    def forward(self, x, x_route=None):  # compiled whole on CUDA: its kernels are custom ops (kernels.py)
        """x: (N, N_h, d_h) sub-tokens; x_route: the sub-tokens to route on (default x)."""
        x_route = x if x_route is None else x_route
        if torch.is_autocast_enabled(x.device.type):  # inputs in bf16, as a Linear would take them,
            dtype = torch.get_autocast_dtype(x.device.type)  # though MoE's come from RMSNorm in fp32
            x, x_route = x.to(dtype), x_route.to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # router math in fp32 (Sec. 2.2), exact products
            scores, idx, clustering = kernels.topk_route(x_route, self.router, self.route_bias, self.topk)
            gates = torch.softmax(scores, dim=-1)  # Eq. 2-3: softmax over the k unbiased scores
        if self.training:
            self.count_load(clustering[1])
        if self.expert_parallel is not None:  # the experts cluster the pairs they receive
            return self.expert_parallel(x, idx, gates.to(x.dtype), self.w1, self.w2, kernel=self.kernel)
        return kernels.expert_ffn(x, idx, gates.to(x.dtype), self.w1, self.w2, self.kernel, clustering)

    @torch.no_grad()
    def count_load(self, starts):
        # starts: the group bounds of the routing's clustering (cluster_by_expert), so that
        # group h N_e + e's size is head h's count of expert e, added to self.load: no pass
        # over the picks, and no bincount, which reads its largest index back to the host
        self.load += starts.diff().view_as(self.load)

    @torch.no_grad()
    def update_bias(self, rate):
        """b += u * sign(mean load - load), from the counts of the whole global batch."""
        self.route_bias += rate * torch.sign(self.load.mean(dim=-1, keepdim=True) - self.load)
        self.load.zero_()


class MoE(nn.Module):
    """Eq. 1-4: route each token over N_e experts of width d, hidden d_e."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.experts = RoutedExperts(1, c.n_embd, c.n_expert, c.expert_dim, c.topk, kernel=c.expert_kernel)

    def forward(self, x):
        B, T, C = x.size()
        return self.experts(x.view(B * T, 1, C)).view(B, T, C)


class LatentMoE(nn.Module):
    """Elango et al.: route on x, run the experts in a latent width l between W_down and W_up."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.experts = RoutedExperts(1, c.latent_dim, c.n_expert, c.expert_dim, c.topk, route_dim=c.n_embd,
                                     kernel=c.expert_kernel)
        self.w_down = nn.Linear(c.n_embd, c.latent_dim, bias=False)
        self.w_up = nn.Linear(c.latent_dim, c.n_embd, bias=False)
        self.w_up.weight.is_output_projection = True

    def forward(self, x):
        B, T, C = x.size()
        latent = self.w_down(x).view(B * T, 1, -1)
        y = self.experts(latent, x_route=x.view(B * T, 1, C))
        return self.w_up(y.view(B, T, -1))


class MHMoE(nn.Module):
    """Huang et al. 2024: split into N_h sub-tokens, but ONE router and ONE expert set for all heads."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.moe_heads = c.moe_heads
        self.w_in = nn.Linear(c.n_embd, c.moe_heads * c.moe_head_dim, bias=False)
        self.experts = RoutedExperts(1, c.moe_head_dim, c.n_expert, c.expert_dim, c.topk, picks=c.moe_heads,
                                     kernel=c.expert_kernel)
        self.w_out = nn.Linear(c.moe_heads * c.moe_head_dim, c.n_embd, bias=False)
        self.w_out.weight.is_output_projection = True

    def forward(self, x):
        B, T, C = x.size()
        sub = self.w_in(x).view(B * T * self.moe_heads, 1, -1)  # every sub-token is a token of one MoE
        return self.w_out(self.experts(sub).view(B, T, -1))


class MultiHeadLatentMoE(nn.Module):
    """Eq. 5-6: N_h sub-tokens, each through its own independent MoE, then W_out."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.moe_heads, self.moe_head_dim = c.moe_heads, c.moe_head_dim
        self.separate_routing_tokens = c.separate_routing_tokens
        n_in = (2 if c.separate_routing_tokens else 1) * c.moe_heads * c.moe_head_dim
        self.w_in = nn.Linear(c.n_embd, n_in, bias=False)
        self.experts = RoutedExperts(c.moe_heads, c.moe_head_dim, c.n_expert, c.expert_dim, c.topk,
                                     kernel=c.expert_kernel)
        self.w_out = nn.Linear(c.moe_heads * c.moe_head_dim, c.n_embd, bias=False)
        self.w_out.weight.is_output_projection = True
        self.head_parallel = None  # parallel.HeadParallel when heads are spread over ranks (Sec. 3.2)
        self.overlap = False       # under HP: two halves, each one's exchanges beside the other's experts

    def forward(self, x):
        B, T, C = x.size()
        sub = self.w_in(x).view(B * T, -1, self.moe_head_dim)  # Eq. 5: (B*T, N_h or 2 N_h, d_h)
        hp = self.head_parallel
        if hp is None:
            y = self.route(sub)  # (B*T, N_h, d_h)
        else:  # the halves' exchanges start first, so that each runs while the other half computes
            sent = [hp.dispatch(half) for half in (sub.chunk(2) if self.overlap else (sub,))]
            returned = [hp.start_combine(self.route(s)) for s in sent]
            y = torch.cat([hp.finish_combine(r) for r in returned])
        return self.w_out(y.reshape(B, T, -1))  # Eq. 6

    def route(self, sub):
        """The heads' independent MoEs on sub-tokens (N, N_h or 2 N_h, d_h) -> (N, N_h, d_h)."""
        x_sub, x_route = sub.chunk(2, dim=1) if self.separate_routing_tokens else (sub, None)
        return self.experts(x_sub, x_route)


FFN_CLASSES = {"mlp": MLP, "moe": MoE, "latent_moe": LatentMoE, "mh_moe": MHMoE,
               "mh_latent_moe": MultiHeadLatentMoE}


# -----------------------------------------------------------------------------
# The loss: cross-entropy of the lm_head's logits, never formed whole

CE_CHUNK = 4096  # rows of logits at a time: 0.4 GB in bf16 at GPT-2's vocabulary


def add_matmul(out, a, b):
    """out += a @ b, out in fp32 and a, b in the compute dtype. On CUDA the GEMM adds in its epilogue;
    a product in the compute dtype, cast and then added, moved 1 GB a chunk of the loss."""
    if out.is_cuda and out.dtype != a.dtype:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out += (a @ b).to(out.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """
    Mean cross-entropy of the rows of x @ weight^T, chunk by chunk of rows, so that the
    (N, V) logits never exist whole, nor in fp32 (a micro-batch of 16,384 tokens held 3.3 GB
    of them). Each chunk's logits give its losses and at once their gradient, which goes
    into dX and dW before the next chunk (liger-kernel's fused linear cross-entropy, in
    PyTorch); backward only scales them. On CUDA a chunk's softmax is one Triton kernel
    (kernels.softmax_cross_entropy), and its dW is added in fp32 by the GEMM itself.
    """
    @staticmethod
    def forward(ctx, x, weight, targets):
        n, w = x.size(0), kernels.compute_copy(weight, x.dtype)
        total = torch.zeros((), device=x.device)
        grads = any(ctx.needs_input_grad)  # not when evaluating
        dx, dw = (torch.empty_like(x), torch.zeros_like(weight)) if grads else (None, None)
        for i in range(0, n, CE_CHUNK):
            xc = x[i:i + CE_CHUNK]
            # each row's loss, and d mean / d logits
            loss, dlogits = kernels.softmax_cross_entropy(xc @ w.t(), targets[i:i + CE_CHUNK], 1 / n)
            total += loss.sum()
            if grads:
                dx[i:i + CE_CHUNK] = dlogits @ w
                add_matmul(dw, dlogits.t(), xc)
        ctx.save_for_backward(dx, dw)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return dx * grad.to(dx.dtype), dw * grad, None


@torch.compiler.disable  # a loop of chunks, each a few kernels
def linear_cross_entropy(x, weight, targets):
    """The language model's loss, F.cross_entropy(x @ weight^T, targets), with x and weight in
    the autocast dtype where autocast is on."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd)
        ffn = config.ffn if layer >= config.n_dense_layers else "mlp"
        self.ffn = FFN_CLASSES[ffn](config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.ln_1(x), cos, sin, cache)
        return x + self.ffn(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.shard_dims = {}  # state-dict name -> (heads dim, dim split E ways) along which parallel.shard_model split it
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # Appendix A: N(0, 0.02) everywhere, output projections scaled by 1/sqrt(2L)
        out_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for p in self.parameters():
            if p.dim() >= 2:
                std = out_std if getattr(p, "is_output_projection", False) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.size()
        end = T + (cache.length if cache is not None else 0)
        if end > self.config.block_size:
            raise ValueError(f"sequence length {end} exceeds block_size={self.config.block_size}: keep the last "
                             f"{self.config.block_size} tokens (generate does), or train with a larger --block_size")
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin, cache)
        if cache is not None:
            cache.length = end
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x), None
        return None, linear_cross_entropy(x, self.lm_head.weight, targets)  # no (B, T, V) logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """
        Continues idx (B, T) by max_new_tokens tokens, sampled at the temperature from the
        top_k most likely (temperature 0: greedy). Routing uses the scores plus the bias, as
        in training, and counts no load (eval mode). With use_cache the prompt runs once and
        each new token attends to the cached keys and values; when the context is full the
        cache restarts from the last block_size // 2 tokens. Without it every step reruns the
        last block_size tokens (nanoGPT's way).
        """
        was_training = self.training
        self.eval()
        cache, fed = KVCache() if use_cache else None, idx
        for _ in range(max_new_tokens):
            if use_cache and cache.length + fed.size(1) > self.config.block_size:
                cache, fed = KVCache(), idx[:, -(self.config.block_size // 2):]
            context = fed if use_cache else idx[:, -self.config.block_size:]
            logits = self(context, cache=cache)[0][:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1)
            idx, fed = torch.cat((idx, nxt), dim=1), nxt
        self.train(was_training)
        return idx

    def routed_experts(self):
        return [m for m in self.modules() if isinstance(m, RoutedExperts)]

    def num_params(self):
        """(active, total): the tied embedding counts once; a token activates k of N_e experts per pick."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        for m in self.modules():
            if isinstance(m, RoutedExperts):
                expert = m.w1.numel() + m.w2.numel()
                active -= expert - expert * m.topk * m.picks // m.n_expert
        return active, total

    def flops_per_token(self):
        # 6 flops per active weight (fwd + bwd; the tied table is the lm_head matmul),
        # plus attention's 12 L d T (nanoGPT / PaLM)
        c = self.config
        return 6 * self.num_params()[0] + 12 * c.n_layer * c.n_embd * c.block_size

    def configure_optimizer(self, weight_decay, lr, betas, fused):
        # weight decay on matrices (and expert / router tensors), none on norms
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
