"""
The paper's per-component benchmarks (Sec. 4.2), on one GPU.

  python bench.py router     # Fig. 4: naive (matmul + topk) vs IO-aware Triton router
  python bench.py experts    # Fig. 5: grouped GEMM vs FlexAttention experts, plus a training shape
  python bench.py all
  torchrun --standalone --nproc_per_node=2 bench.py a2a   # Fig. 3: EP vs HP all-to-all, P = 2 GPUs
  python bench.py e2e --preset=mh_2b [train.py options]   # Table 1: training throughput (torchrun for more GPUs)
      [--bench_warmup=3 --bench_steps=10 --bench_balance=20]  # 0 balancing steps: the initialised routing
  python bench.py quality out/run1 out/run2 ...            # Table 1 at reduced scale: val loss of finished runs
  python bench.py zeroshot out/run [--tasks=...]           # Table 1's zero-shot accuracy under lm-eval

Each prints a markdown table and writes bench_results/<name>.json, .md and .png.
Times are medians of CUDA-event timings after warm-up (triton.testing.do_bench);
"extra memory" is the peak allocated during the call above what was allocated before it.
"""

import dataclasses
import json
import os
import re
import sys

import torch
import triton

import kernels
import parallel

OUT = os.environ.get("BENCH_OUT", "bench_results")


def timed(fn):
    """(median ms, extra peak MiB) of fn()."""
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def device_ms(fn, calls=10):
    """
    ms a call in which the device ran any of fn's kernels (torch.profiler): fn's time on the
    device alone. do_bench's time is the longer of it and the host's, which launches each call
    afresh: an eager expert_ffn_fused forward+backward at 32,768 tokens x 8 heads took the host
    2.2-3.0 ms against 2.67 on the device (H200).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    _, busy, _, _ = device_timeline(device_kernels(prof.events()))
    return busy / calls


def rel_error(got, want):
    return (torch.linalg.norm(got.double() - want.double()) / torch.linalg.norm(want.double())).item()


def report(name, rows, columns, plot, device=None):
    """device: where the figures were measured, if not on this machine."""
    os.makedirs(OUT, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    device = device or f"{gpu} | torch {torch.__version__} | triton {triton.__version__}"
    lines = [f"{name} ({device}; command: python bench.py {name})", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "-")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(OUT, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump({"device": device, "rows": rows}, f, indent=1)
    try:
        plot(rows, os.path.join(OUT, f"{name}.png"))
    except ImportError:  # the table and JSON are written; the figure needs matplotlib
        print(f"bench.py: matplotlib is not installed, so no {name}.png (pip install matplotlib)")


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def line_plot(x_key, series, ylabel, log_x=True):
    def plot(rows, path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4))
        for ax, (title, keys) in zip(axes, series.items()):
            for key in keys:
                pts = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), float)]
                ax.plot(*zip(*pts), marker="o", label=key)
            ax.set(title=title, xlabel=x_key, ylabel=ylabel[title])
            if log_x:
                ax.set_xscale("log", base=2)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return plot


# -----------------------------------------------------------------------------
# Fig. 4: routing, B=40, T=2048, N_h=8, d_h=128, k=4

def routing_bias(n_heads, n_expert, k, routing, score_std):
    """
    A router bias that skews the choice: "uniform" none; "zipf2" expert e about (e + 1)^-2 as
    likely (-2 beta log(e + 1), beta the scale of the largest of N_e Gaussian scores of std
    score_std, as for Gumbel noise); "hot" every token on experts 0..k-1.
    """
    e = torch.arange(n_expert, device="cuda", dtype=torch.float32)
    beta = score_std / (2 * torch.log(torch.tensor(float(n_expert)))) ** 0.5
    bias = {"uniform": 0 * e, "zipf2": -2 * beta * torch.log1p(e), "hot": 100.0 * (e < k)}[routing]
    return bias.expand(n_heads, -1).contiguous()


def load_max_over_mean(idx, n_expert):
    """The busiest expert's picks over the mean, worst head: 1 balanced, N_e / k all on k experts."""
    heads = idx.flatten(0, -3)  # (tokens, N_h, k)
    counts = torch.stack([torch.bincount(heads[:, h].flatten(), minlength=n_expert) for h in range(heads.size(1))])
    return (counts.max(-1).values / counts.float().mean(-1)).max().item()


ROUTER_ROWS = [(64, "uniform"), (256, "uniform"), (384, "uniform"), (384, "zipf2"), (384, "hot"),
               (1024, "uniform"), (1024, "zipf2"), (1024, "hot"), (4096, "uniform")]


def bench_router(B=40, T=2048, n_heads=8, dim=128, k=4, cases=ROUTER_ROWS):
    """Skewed rows time only ours: the naive path's matmul + topk does not depend on the routing."""
    rows = []
    for n_expert, routing in cases:
        x = torch.randn(B, T, n_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(n_heads, dim, n_expert, device="cuda") * 0.02).requires_grad_()
        b = torch.randn(n_heads, n_expert, device="cuda") * 1e-3 + routing_bias(n_heads, n_expert, k, routing,
                                                                                 0.02 * dim ** 0.5)
        row = {"N_e": n_expert, "routing": routing}
        routes = {"naive": kernels.topk_route_reference, "ours": kernels.topk_route_triton}
        for name, route in routes.items() if routing == "uniform" else [("ours", kernels.topk_route_triton)]:
            scores, idx = route(x, w, b, k)[:2]
            g = torch.randn_like(scores)
            row[f"{name} fwd ms"], row[f"{name} fwd MiB"] = timed(lambda: route(x, w, b, k))

            def fwd_bwd():
                torch.autograd.backward(route(x, w, b, k)[0], g)
            row[f"{name} fwd+bwd ms"], row[f"{name} fwd+bwd MiB"] = timed(fwd_bwd)
            row[f"{name} idx"] = idx
            row[f"{name} scores"] = scores
        row["load max/mean"] = load_max_over_mean(row["ours idx"], n_expert)
        if routing == "uniform":
            ref_scores = row.pop("naive scores")
            row["same experts"] = f"{(row.pop('naive idx') == row['ours idx']).float().mean().item():.6f}"
            row["score rel err"] = rel_error(row["ours scores"], ref_scores)
        del row["ours idx"], row["ours scores"]
        row["fp32 floor ms"] = 2 * B * T * n_heads * dim * n_expert / 51e12 * 1e3  # at ~51 TFLOP/s FMA
        rows.append(row)
        del x, w, b
    cols = ["N_e", "routing", "load max/mean", "naive fwd ms", "naive fwd+bwd ms", "naive fwd+bwd MiB", "ours fwd ms",
            "ours fwd+bwd ms", "ours fwd+bwd MiB", "fp32 floor ms", "same experts", "score rel err"]
    uniform = [r for r in rows if r["routing"] == "uniform"]
    report("router", rows, cols, lambda _, path: line_plot("N_e", {
        "latency": ["naive fwd ms", "naive fwd+bwd ms", "ours fwd ms", "ours fwd+bwd ms"],
        "memory": ["naive fwd+bwd MiB", "ours fwd+bwd MiB"]}, {"latency": "ms", "memory": "MiB"})(uniform, path))


# -----------------------------------------------------------------------------
# Fig. 5: experts, 8 heads of d_h=128, k=4

EXPERT_ROWS = [(2048, 64, 256, "uniform"), (2048, 256, 128, "uniform"), (2048, 1024, 128, "uniform"),
               (2048, 4096, 128, "uniform"), (32768, 384, 256, "uniform"), (32768, 384, 256, "zipf2"),
               (32768, 384, 256, "hot")]


def expert_routing(tokens, n_heads, n_expert, k, routing):
    """(tokens, N_h, k) distinct experts: uniform, Zipf s = 2, or every token on experts 0..k-1."""
    if routing == "hot":
        return torch.arange(k, device="cuda").expand(tokens, n_heads, k).contiguous()
    s = {"uniform": 0, "zipf2": 2}[routing]
    return zipf_routing(tokens * n_heads, n_expert, k, s, torch.Generator().manual_seed(0)).view(
        tokens, n_heads, k).cuda()


def fresh_backward(out, grad, inputs):
    for t in inputs:
        t.grad = None
    out.backward(grad)


def bench_experts(cases=EXPERT_ROWS, n_heads=8, dim=128, k=4):
    """Skewed rows time the fused kernels only, against their own uniform row."""
    rows = []
    for tokens, n_expert, expert_dim, routing in cases:
        x = torch.randn(tokens, n_heads, dim, device="cuda", dtype=torch.bfloat16)
        x = (x * 0.64).requires_grad_()  # sub-token scale at init: W_in of N(0, 0.02) on unit-RMS inputs
        idx = expert_routing(tokens, n_heads, n_expert, k, routing)
        gates = torch.softmax(torch.randn(tokens, n_heads, k, device="cuda"), -1).bfloat16().requires_grad_()
        w1 = (torch.randn(n_heads, n_expert, expert_dim, dim, device="cuda") * 0.02).bfloat16().requires_grad_()
        w2 = (torch.randn(n_heads, n_expert, expert_dim, dim, device="cuda") * 0.02 / 24 ** 0.5).bfloat16()
        w2.requires_grad_()
        inputs = (x, idx, gates, w1, w2)
        want = kernels.expert_ffn_reference(*(t.float() if t.is_floating_point() else t for t in inputs))
        useful = 4 * tokens * k * expert_dim * dim * n_heads  # forward flops
        row = {"tokens/head": tokens, "N_e": n_expert, "d_e": expert_dim, "routing": routing,
               "load max/mean": load_max_over_mean(idx, n_expert)}
        ffns = {"fused": kernels.expert_ffn_fused}
        if routing == "uniform":
            ffns |= {"flex": kernels.expert_ffn_flex, "grouped_mm": kernels.expert_ffn_grouped}
        if routing == "uniform" and n_heads * n_expert <= 4096:  # the plain path is a Python loop over groups
            ffns["plain"] = kernels.expert_ffn_reference
        for name, ffn in ffns.items():
            try:
                out = ffn(*inputs)
            except Exception as e:  # grouped_mm refuses some shapes: say so in the table
                row[f"{name} fwd ms"] = f"refuses ({type(e).__name__})"
                continue
            g = torch.randn_like(out)
            row[f"{name} rel err"] = rel_error(out, want)
            row[f"{name} fwd ms"], _ = timed(lambda: ffn(*inputs))
            # into empty .grad buffers, as a step's first micro-batch: fused writes them itself
            row[f"{name} fwd+bwd ms"], row[f"{name} MiB"] = timed(lambda: fresh_backward(ffn(*inputs), g, inputs))
            row[f"{name} fwd TFLOP/s"] = useful / row[f"{name} fwd ms"] / 1e9
            if name == "fused":
                row["fused fwd+bwd device ms"] = device_ms(lambda: fresh_backward(ffn(*inputs), g, inputs))
        rows.append(row)
        del inputs, x, w1, w2, want
    report("experts", rows, EXPERT_COLUMNS, lambda _, path: line_plot("N_e", {
        "forward": ["fused fwd ms", "flex fwd ms", "grouped_mm fwd ms", "plain fwd ms"],
        "forward+backward": ["fused fwd+bwd ms", "flex fwd+bwd ms", "grouped_mm fwd+bwd ms", "plain fwd+bwd ms"]},
        {"forward": "ms", "forward+backward": "ms"})([r for r in rows if r["tokens/head"] == 2048], path))


EXPERT_COLUMNS = ["tokens/head", "N_e", "d_e", "routing", "load max/mean", "fused fwd ms", "fused fwd+bwd ms",
                  "fused fwd+bwd device ms", "fused rel err", "fused fwd TFLOP/s",
                  "flex fwd ms", "flex fwd+bwd ms", "flex rel err", "grouped_mm fwd ms", "grouped_mm fwd+bwd ms",
                  "grouped_mm rel err", "plain fwd ms", "plain fwd+bwd ms"]


# -----------------------------------------------------------------------------
# Fig. 3: dispatch + combine of EP and HP, 16 x 2048 tokens per rank, d = 1024, bf16

def zipf_routing(tokens, n_expert, k, s, generator):
    """k distinct experts per token, expert e drawn with probability ~ (e + 1)^-s (s = 0: uniform)."""
    probs = (torch.arange(n_expert, dtype=torch.float32) + 1) ** -float(s)
    return torch.multinomial(probs.expand(tokens, -1), k, generator=generator)


def timed_collective(fn, iters=20):
    """(ms, extra peak MiB), each the max over ranks: a collective is as slow as its slowest rank."""
    import torch.distributed as dist
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    out = torch.tensor([sorted(times)[iters // 2], (torch.cuda.max_memory_allocated() - base) / 2 ** 20],
                       device="cuda")
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.tolist()


def ep_round_trip(ep, x, idx, gates):
    """EP's dispatch, then its combine of the received rows (their k gate columns dropped)."""
    received, plan = ep.dispatch(x, idx, gates)
    return ep.combine(received[:, :x.size(-1)], plan)


def bench_a2a(tokens=16 * 2048, dim=1024, heads=8, n_expert=384, ks=(1, 2, 4, 8), skews=(0, 1, 2)):
    rank, world, _ = parallel.init_distributed("cuda")
    if world < 2:
        sys.exit("bench.py a2a: run it under torchrun with 2 or more GPUs")
    layout = parallel.make_layout("hp", world, rank, world)
    hp = parallel.HeadParallel(layout.head_group, world, heads)
    ep = parallel.ExpertParallel(layout.head_group, world, n_expert // world)  # the same P ranks
    x = torch.randn(tokens, 1, dim, device="cuda", dtype=torch.bfloat16)
    sub = x.view(tokens, heads, dim // heads)  # HP moves the same bytes, split into heads
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k in ks:
        for s in skews:
            idx = zipf_routing(tokens, n_expert, k, s, gen).view(tokens, 1, k).cuda()
            gates = torch.ones(tokens, 1, k, device="cuda", dtype=torch.bfloat16)
            row = {"k": k, "zipf s": s}
            row["EP ms"], row["EP MiB"] = timed_collective(lambda: ep_round_trip(ep, x, idx, gates))
            row["HP ms"], row["HP MiB"] = timed_collective(lambda: hp.combine(hp.dispatch(sub)))
            row["EP rows to busiest rank"] = max(ep.splits[1]) if rank == 0 else None
            row["HP / EP time"] = row["HP ms"] / row["EP ms"]
            rows.append(row)
    if rank == 0:
        cols = ["k", "zipf s", "EP ms", "HP ms", "HP / EP time", "EP MiB", "HP MiB", "EP rows to busiest rank"]

        def plot(rows, path):
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for ax, unit in zip(axes, ("ms", "MiB")):
                for s in skews:
                    pts = [r for r in rows if r["zipf s"] == s]
                    ax.plot([r["k"] for r in pts], [r[f"EP {unit}"] for r in pts], "o-", label=f"EP, zipf {s}")
                    ax.plot([r["k"] for r in pts], [r[f"HP {unit}"] for r in pts], "s--", label=f"HP, zipf {s}")
                ax.set(xlabel="k", ylabel=unit, title=f"dispatch + combine, {world} GPUs", xscale="log")
                ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        report("a2a", rows, cols, plot)
    parallel.shutdown()


# -----------------------------------------------------------------------------
# Table 1: end-to-end training throughput, through train.py's own loop

# the parts of a training step, told apart by kernel name (the first pattern that matches)
STEP_PARTS = (
    ("router", r"_route_|topk"),
    ("experts", r"_fused_experts_|flex|triton_tem|grouped|groupproblemshape"),  # the last: CUTLASS grouped GEMMs
    ("clustering", r"sort|searchsorted|bincount|histogram"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("all-to-all", r"alltoall|sendrecv"),
    ("all-reduce", r"allreduce"),
    ("optimizer", r"adam|multi_tensor"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas"),
)


def kernel_part(name):
    """The part of a step a kernel belongs to; "other" if no pattern names it."""
    return next((part for part, pattern in STEP_PARTS if re.search(pattern, name.lower())), "other")


def merged(intervals):
    """The union of (start, end) intervals, as sorted disjoint ones."""
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


COLLECTIVES = ("all-to-all", "all-reduce")


def device_kernels(events):
    """The kernels among profiled events (the host's own events left out)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]


def device_timeline(gpu_events):
    """
    Of profiled kernels: (ms from the first one's start to the last one's end, ms in which
    any ran, ms in which any but a collective ran, ms in which an all-to-all ran beside
    another kernel). A collective's kernel runs from its launch until its peers reach it,
    so a rank waiting for another is busy by the second count and idle by the third.
    """
    spans = [(e.time_range.start, e.time_range.end) for e in gpu_events]
    parts = [kernel_part(e.name) for e in gpu_events]
    busy = merged(spans)
    exchange = merged(s for s, part in zip(spans, parts) if part == "all-to-all")
    compute = merged(s for s, part in zip(spans, parts) if part != "all-to-all")
    work = merged(s for s, part in zip(spans, parts) if part not in COLLECTIVES)
    beside, i = 0.0, 0
    for start, end in exchange:  # the length of exchange intersected with compute, by a sweep
        while i < len(compute) and compute[i][1] <= start:
            i += 1
        j = i
        while j < len(compute) and compute[j][0] < end:
            beside += min(end, compute[j][1]) - max(start, compute[j][0])
            j += 1
    span = busy[-1][1] - busy[0][0]
    return span / 1e3, sum(e - s for s, e in busy) / 1e3, sum(e - s for s, e in work) / 1e3, beside / 1e3


IDLE_GAP_CLASSES = ((0.05, "under 50 us"), (1.0, "50 us to 1 ms"), (float("inf"), "1 ms or more"))


def idle_gaps(gpu_events, n=5):
    """
    Where the device idles (no kernel running) among profiled kernels: {class: ms} of the
    gaps by length (IDLE_GAP_CLASSES), and the n longest as (ms, the kernel before, the
    kernel after). Short gaps are launch latencies between kernels; long ones, the host behind.
    """
    ending = {e.time_range.end: e.name for e in gpu_events}      # a busy span ends with the kernel ending last
    starting = {e.time_range.start: e.name for e in gpu_events}
    spans = merged((e.time_range.start, e.time_range.end) for e in gpu_events)
    gaps = [((b[0] - a[1]) / 1e3, ending[a[1]], starting[b[0]]) for a, b in zip(spans, spans[1:])]
    by_class = {label: 0.0 for _, label in IDLE_GAP_CLASSES}
    for ms, *_ in gaps:
        by_class[next(label for bound, label in IDLE_GAP_CLASSES if ms < bound)] += ms
    return by_class, sorted(gaps, key=lambda gap: -gap[0])[:n]


def step_split(kernel_times):
    """{part: ms} from {kernel name: ms}."""
    split = {part: 0.0 for part, _ in STEP_PARTS} | {"other": 0.0}
    for name, ms in kernel_times.items():
        split[kernel_part(name)] += ms
    return split


def bench_e2e(argv):
    """
    Runs bench_warmup + bench_steps steps of train.py with the given options (warm-up
    includes compilation), no validation, no checkpoints, every step at the learning
    rate of the schedule's first, and reports the median timed step and the worst
    layer's expert load; on a GPU one more step runs under torch.profiler to split the
    step's device time by part. Every run adds or replaces its row in bench_results/e2e.*.
    """
    import tempfile

    import train
    from model import GPT
    counts, rest = {"bench_warmup": 3, "bench_steps": 10, "bench_balance": 20}, []
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key in counts:
            counts[key] = int(value)
        else:
            rest.append(arg)
    a, config = train.parse_args(rest)
    # the routing timed: balanced by the bias first (frozen weights), the initialised one, or forced skew
    routing = (f"route_skew={a['route_skew']:g}" if a["route_skew"] else
               "balanced" if counts["bench_balance"] and config.is_moe else "init")
    timed_end = counts["bench_warmup"] + counts["bench_steps"]
    gpu = torch.cuda.is_available() and a["device"] != "cpu"
    total = timed_end + gpu  # the profiled step comes after the timed ones
    # every step at the learning rate of the schedule's first step, as in the warm-up of a
    # real run: at full rate from step 1, routing collapses onto k experts within a few steps
    first_lr = a["lr"] / max(a["warmup_steps"], 1)
    fixed = [f"--max_steps={total}", f"--lr={first_lr}", "--min_lr=0", "--warmup_steps=0", "--decay_steps=0",
             "--eval_interval=0", "--ckpt_interval=0", f"--log_interval={total}",
             f"--balance_steps={counts['bench_balance'] if routing == 'balanced' else 0}"]
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if gpu else None

    def on_step(step):
        if prof is not None and step == timed_end:
            prof.start()
    with tempfile.TemporaryDirectory() as out:
        train.main(rest + fixed + [f"--out_dir={out}"], on_step=on_step)
        if prof is not None:
            prof.stop()
        if int(os.environ.get("RANK", "0")):
            return
        with open(os.path.join(out, "log.jsonl")) as f:
            steps = [json.loads(line) for line in f if '"step_ms"' in line]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ms = sorted(s["step_ms"] for s in steps[counts["bench_warmup"]:timed_end])[counts["bench_steps"] // 2]
    tps = a["batch_tokens"] / ms * 1e3
    with torch.device("meta"):
        flops = GPT(config).flops_per_token()
    # what tells rows apart: the model's fields and the layout's options given
    fields = {f.name for f in dataclasses.fields(config)} | {"parallel_size", "ep_size", "overlap"}
    changed = [arg.removeprefix("--") for arg in rest if arg.removeprefix("--").partition("=")[0] in fields]
    row = {"model": " ".join([a["preset"] or config.ffn] + changed), "parallel": a["parallel"], "GPUs": world,
           "routing": routing,
           "global batch": a["batch_tokens"], "micro-batch": a["batch_size"], "step ms": ms, "tokens/s": tps,
           "MFU %": 100 * flops * tps / (world * a["peak_tflops"] * 1e12) if gpu else "-",
           "peak GiB": steps[-1]["peak_gib"] or "-",
           # the worst layer's, in the last step: the profiled one on a GPU, whose columns follow
           "load max/mean": max(steps[-1]["load_max_over_mean"], default="-"),
           "command": "python bench.py e2e " + " ".join(argv)}
    if prof is not None:
        kernel_times = {e.key: e.self_device_time_total / 1e3 for e in prof.key_averages()
                        if e.device_type == torch.autograd.DeviceType.CUDA}
        row.update({f"{part} ms": v for part, v in step_split(kernel_times).items()})
        gpu_events = device_kernels(prof.events())
        # shares of the profiled step's own span: the timed steps' median is another batch's step
        span, busy, working, beside = device_timeline(gpu_events)
        row["device idle %"] = 100 * (1 - busy / span)  # no kernel ran
        row["no compute %"] = 100 * (1 - working / span)  # idle, or waiting inside a collective
        row["exchange beside compute ms"] = beside
        print("longest kernels of the profiled step (ms), by part:")
        for name, v in sorted(kernel_times.items(), key=lambda kv: -kv[1])[:30]:
            print(f"  {v:9.2f}  {kernel_part(name):10s}  {name[:110]}")
        by_class, longest = idle_gaps(gpu_events)
        print("device idle in the profiled step: " + ", ".join(f"{ms:.1f} ms in gaps {label}"
                                                                for label, ms in by_class.items()) + "; the longest:")
        for ms, before, after in longest:
            print(f"  {ms:9.2f}  after {before[:60]}  before {after[:60]}")
    path = os.path.join(OUT, "e2e.json")
    rows = json.load(open(path))["rows"] if os.path.exists(path) else []
    key = ("model", "parallel", "GPUs", "routing", "micro-batch")
    rows = [r for r in rows if [r.get(c) for c in key] != [row[c] for c in key]]
    report("e2e", rows + [row], E2E_COLUMNS, throughput_bars)


E2E_COLUMNS = (["model", "parallel", "GPUs", "routing", "global batch", "micro-batch", "step ms", "tokens/s", "MFU %",
                "peak GiB", "load max/mean"] + [f"{part} ms" for part, _ in STEP_PARTS]
               + ["other ms", "device idle %", "no compute %", "exchange beside compute ms"])


def throughput_bars(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(rows)), 4.5))
    colors = {"hp": "C0", "ep": "C1", "dp": "C2"}
    ax.bar([f"{r['model'].replace(' ', chr(10))}\n{r['parallel']} x{r['GPUs']}\n{r.get('routing', 'init')}"
            + (f"\nB={r['micro-batch']}" if "micro-batch" in r else "")  # rows older than the column lack it
            for r in rows], [r["tokens/s"] for r in rows], color=[colors[r["parallel"]] for r in rows])
    ax.tick_params(axis="x", labelsize=8)
    ax.set(ylabel="tokens/s", title="training throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -----------------------------------------------------------------------------
# Quality at reduced scale: validation curves of finished train.py runs

def bench_quality(run_dirs):
    """
    Reads the config.json and log.jsonl of each train.py run directory and tables
    the final validation loss per model (mean and spread over the seeds it was run
    with), its parameters and throughput; plots the validation curves.
    """
    import math
    from model import GPT, GPTConfig
    runs = {}
    for d in run_dirs:
        try:
            config = json.load(open(os.path.join(d, "config.json")))
            log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
        except (OSError, ValueError) as e:
            sys.exit(f"bench.py quality: {d} is not a finished train.py run ({e})")
        val = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
        step_ms = sorted(e["step_ms"] for e in log if "step_ms" in e)
        if not val or not step_ms:
            sys.exit(f"bench.py quality: {d}/log.jsonl has no validation or step entries; "
                     f"run train.py with --eval_interval > 0")
        t = config["train"]
        runs.setdefault(t["preset"] or config["model"]["ffn"], []).append(
            {"dir": d, "config": config, "curve": [(s * t["batch_tokens"], v) for s, v in val],
             "tokens/s": t["batch_tokens"] / step_ms[len(step_ms) // 2] * 1e3})
    rows = []
    for name, group in runs.items():
        with torch.device("meta"):
            active, total = GPT(GPTConfig(**group[0]["config"]["model"])).num_params()
        final = [r["curve"][-1][1] for r in group]
        mean = sum(final) / len(final)
        rows.append({"model": name, "active M": active / 1e6, "total M": total / 1e6, "seeds": len(group),
                     "tokens": group[0]["curve"][-1][0], "val loss": mean,
                     "spread": max(final) - min(final) if len(final) > 1 else "-",
                     "val ppl": math.exp(mean), "tokens/s": sum(r["tokens/s"] for r in group) / len(group),
                     "curves": [r["curve"] for r in group]})

    def plot(rows, path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, r in enumerate(rows):
            for j, curve in enumerate(r["curves"]):
                tokens, loss = zip(*curve[1:])  # from the first evaluation after step 0
                ax.plot(tokens, loss, color=f"C{i}", alpha=1 if j == 0 else 0.5, label=r["model"] if j == 0 else None)
        ax.set(xlabel="training tokens", ylabel="validation loss", title="docs corpus, reduced scale")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    devices = sorted({r["config"].get("device", "device not recorded") for g in runs.values() for r in g})
    report("quality", rows, ["model", "active M", "total M", "seeds", "tokens", "val loss", "spread", "val ppl",
                             "tokens/s"], plot, device=", ".join(devices))


# -----------------------------------------------------------------------------
# Table 1's zero-shot accuracy: our checkpoints through lm-eval-harness

def zeroshot_lm(model, batch_size=16):
    """
    Our GPT as an lm-eval LM: loglikelihood (batched), loglikelihood_rolling (lm-eval's
    own rolling windows) and generate_until (greedy). Text is GPT-2 tokens; an empty
    context is the end-of-text token, as between documents in training.
    """
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    import prepare
    enc, device, block = prepare.encoder(), next(model.parameters()).device, model.config.block_size
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def score(pairs):
        """(sum of log p(continuation | context), whether greedy decoding gives it) per (context, continuation)."""
        out = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(block + 1):] for i in batch]
            width = max(len(q) for q in seqs) - 1
            x = torch.tensor([q[:-1] + [prepare.EOT] * (width - len(q) + 1) for q in seqs], device=device)
            with autocast:
                logp = torch.log_softmax(model(x)[0].float(), dim=-1)
            for row, i in enumerate(batch):
                cont, n = pairs[i][1], len(seqs[row]) - 1   # the last len(cont) predictions score it
                target = torch.tensor(cont, device=device)
                lp = logp[row, n - len(cont):n]
                out[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
        return out

    def split(context, continuation):
        # a context's trailing spaces belong to the continuation's first token, as GPT-2 tokenizes
        spaces = len(context) - len(context.rstrip(" "))
        context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
        whole, ctx = enc.encode_ordinary(context + continuation), enc.encode_ordinary(context)
        return ctx or [prepare.EOT], whole[len(ctx):]

    class GPTLM(LM):
        def loglikelihood(self, requests):
            return score([split(*r.args) for r in requests])

        def loglikelihood_rolling(self, requests):
            totals = []
            for r in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    enc.encode_ordinary(r.args[0]), prefix_token=prepare.EOT, max_seq_len=block, context_len=1)]
                totals.append(sum(lp for lp, _ in score(windows)))
            return totals

        def generate_until(self, requests):
            texts = []
            for r in requests:
                context, kwargs = r.args
                prompt = torch.tensor([enc.encode_ordinary(context)[-block:] or [prepare.EOT]], device=device)
                with autocast:
                    out = model.generate(prompt, kwargs.get("max_gen_toks", 256), temperature=0)
                text = enc.decode([t for t in out[0, prompt.size(1):].tolist() if t < enc.n_vocab])
                for stop in kwargs.get("until", []):
                    text = text.split(stop)[0]
                texts.append(text)
            return texts

    return GPTLM()


ZEROSHOT = dict(tasks="hellaswag,piqa,lambada_openai,arc_easy,arc_challenge", limit=0, batch_size=16,
                include_path="", device="auto")


def bench_zeroshot(argv):
    """
    python bench.py zeroshot CKPT_OR_OUT_DIR [--tasks=...] [--limit=N] [--include_path=DIR]: zero-shot
    accuracy under lm-eval (the paper's five tasks by default; they download from the Hugging
    Face hub), one row per model, accuracy normalised by length where the task has it.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    import train
    if not argv or argv[0].startswith("--"):
        sys.exit("usage: python bench.py zeroshot out/run [--tasks=hellaswag,piqa,...] [--limit=N] [--include_path=DIR]")
    o = train.parse_options(argv[1:], ZEROSHOT, "zeroshot")
    device = parallel.pick_device(o["device"])
    model = train.load_model(argv[0], device)
    tasks = o["tasks"].split(",")
    manager = TaskManager(include_path=o["include_path"] or None)
    results = simple_evaluate(model=zeroshot_lm(model, o["batch_size"]), tasks=tasks, task_manager=manager,
                              limit=o["limit"] or None, log_samples=False)["results"]
    row = {"model": argv[0]}
    for task in tasks:
        metrics = results[task]
        row[task] = metrics.get("acc_norm,none", metrics.get("acc,none"))
    row["average"] = sum(row[t] for t in tasks) / len(tasks)
    report("zeroshot", [row], ["model"] + tasks + ["average"], lambda rows, path: None)
    return row


BENCHES = {"router": bench_router, "experts": bench_experts, "a2a": bench_a2a}
COMMANDS = {"e2e": bench_e2e, "quality": bench_quality, "zeroshot": bench_zeroshot}  # take their own arguments

if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in COMMANDS:
        parallel.errors_once(COMMANDS[sys.argv[1]], sys.argv[2:])
        sys.exit()
    names = sys.argv[1:] or ["all"]
    for name in ([n for n in BENCHES if n != "a2a"] if names == ["all"] else names):
        if name not in BENCHES:
            sys.exit(f"bench.py: unknown benchmark {name!r}; choose from {', '.join(BENCHES)} or all")
        if not torch.cuda.is_available():
            sys.exit("bench.py: the benchmarks time CUDA kernels; run them on a GPU")
        BENCHES[name]()
