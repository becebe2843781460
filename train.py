"""
Pretrain a GPT with an MLP, MoE, LatentMoE, MH-MoE or Multi-Head LatentMoE feedforward.

  python train.py --preset=tiny_mh --data_dir=data/builtin          # one process (CPU or GPU)
  torchrun --standalone --nproc_per_node=8 train.py --preset=mh_2b   # data parallel
  python train.py sample out --prompt="Hello"      # text from a run's newest checkpoint
  python train.py export out/ckpt_00015000 model.pt  # the model alone, one file

Every setting below, and every GPTConfig field in model.py, is overridable
with --key=value; --preset=NAME loads a model preset first. The defaults are
the paper's recipe (Appendix A): AdamW (0.9, 0.95), weight decay 0.1, lr 5e-4,
trapezoidal schedule, 0.66M-token global batch.
"""

import dataclasses
import difflib
import glob
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
import warnings
import zlib
from contextlib import nullcontext

import numpy as np
import torch

import parallel
from model import GPT, GPTConfig, preset
from prepare import EOT, encoder, open_shard

DEFAULTS = dict(
    # data and output
    data_dir="data/fineweb", out_dir="out",
    resume="",                 # "" starts fresh, "auto" takes the newest good checkpoint in out_dir, or a path
    ckpt_interval=1000, keep_last_n=2,  # ckpt_interval=0: none but on SIGTERM/SIGINT (benchmarks)
    max_bad_steps=10,          # consecutive non-finite steps (skipped) before the run stops
    collapse_share=0.5, collapse_steps=100,  # warn when one expert takes this share of a layer for so long
    deterministic=False,       # bitwise-repeatable runs (torch.use_deterministic_algorithms)
    eval_interval=500, eval_tokens=2_097_152, log_interval=10,  # eval_interval=0: no validation
    # batch: micro-batches of batch_size sequences, accumulated to batch_tokens per step
    batch_size=16, batch_tokens=655_360,
    # optimizer and trapezoidal schedule (warmup, constant, linear decay)
    lr=5e-4, min_lr=0.0, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,  # grad_clip=0: none
    max_steps=15_000, warmup_steps=8000, decay_steps=2000,
    bias_update_rate=1e-3,     # u of the aux-loss-free load balancing
    balance_steps=0,           # forward-only steps before training that move only the router biases
    route_skew=0.0,            # stress test: start every router bias this much higher on experts 0..k-1
    # system
    device="auto", compile=False, seed=1337, peak_tflops=989.0,  # peak for MFU: H100 dense bf16
    # parallelism: "dp" data parallel only; "ep" expert or "hp" head parallel over parallel_size
    # ranks (0: all of them) times data parallel over the rest; with "hp", ep_size > 1 splits
    # each head's experts over ep_size of those ranks by hidden units (HP x EP), the heads over the others
    parallel="dp", parallel_size=0, ep_size=1,
    overlap=False,             # hp, ep: a micro-batch's halves, each one's all-to-alls beside the other's experts
)


# -----------------------------------------------------------------------------
# Configuration: defaults < --preset < --key=value

def parse_args(argv):
    """Returns (train settings, GPTConfig) from --key=value arguments."""
    model_fields = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    known = {**DEFAULTS, **model_fields, "preset": ""}
    overrides = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"train.py: bad argument {arg!r}: write --key=value")
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean --{near[0]}?)" if near else ""
            raise SystemExit(f"train.py: unknown option --{key}{hint}; the options are listed in "
                             f"train.py DEFAULTS and model.py GPTConfig")
        overrides[key] = convert(key, value, known[key])
    args = {**DEFAULTS, "preset": overrides.get("preset", "")}
    args.update({k: v for k, v in overrides.items() if k in DEFAULTS})
    try:
        model_args = preset(args["preset"]) if args["preset"] else {}
        model_args.update({k: v for k, v in overrides.items() if k in model_fields})
        config = GPTConfig(**model_args)
    except ValueError as e:
        raise SystemExit(f"train.py: {e}") from None
    check_args(args)
    return args, config


def convert(key, value, default):
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise SystemExit(f"train.py: --{key}={value!r} is not a boolean; write 1/0 or true/false")
    try:
        return type(default)(value)
    except ValueError:
        raise SystemExit(f"train.py: --{key}={value!r} is not a {type(default).__name__} "
                         f"(default {default!r})") from None


def check_args(a):
    def bad(key, fix):
        raise SystemExit(f"train.py: --{key}={a[key]!r} is invalid: {fix}")
    for key in ("batch_size", "batch_tokens", "max_steps", "log_interval", "keep_last_n", "eval_tokens",
                "max_bad_steps", "collapse_steps"):
        if a[key] < 1:
            bad(key, "it must be at least 1")
    for key in ("eval_interval", "ckpt_interval", "balance_steps"):
        if a[key] < 0:
            bad(key, "it must be at least 0 (0 turns it off)")
    if a["warmup_steps"] < 0 or a["decay_steps"] < 0:
        bad("warmup_steps" if a["warmup_steps"] < 0 else "decay_steps", "it cannot be negative")
    if a["warmup_steps"] + a["decay_steps"] > a["max_steps"]:
        bad("max_steps", f"it must be at least warmup_steps + decay_steps = "
                         f"{a['warmup_steps'] + a['decay_steps']}")
    if a["lr"] <= 0 or a["min_lr"] < 0 or a["min_lr"] > a["lr"]:
        bad("lr" if a["lr"] <= 0 else "min_lr", "need 0 <= min_lr <= lr and lr > 0")
    if a["route_skew"] < 0:
        bad("route_skew", "it must be at least 0 (0 turns it off)")
    if a["grad_clip"] < 0:
        bad("grad_clip", "it must be at least 0 (0 turns clipping off)")
    for key in ("beta1", "beta2"):
        if not 0 <= a[key] < 1:
            bad(key, "AdamW's betas lie in [0, 1)")
    for key in ("weight_decay", "bias_update_rate"):
        if a[key] < 0:
            bad(key, "it cannot be negative")
    if not 0 < a["collapse_share"] <= 1:
        bad("collapse_share", "it is a share of a layer's tokens, in (0, 1]")
    if a["peak_tflops"] <= 0:
        bad("peak_tflops", "the device's peak TFLOP/s, for MFU, is positive (989 for an H100's dense bf16)")
    if a["device"] not in ("auto", "cpu", "cuda"):
        bad("device", "choose auto, cpu or cuda")
    if a["overlap"] and a["parallel"] == "dp":
        bad("overlap", "it hides the all-to-all of --parallel=hp or ep; data parallel has none")


# -----------------------------------------------------------------------------
# Data: all shards of a split read as one stream

class TokenStream:
    """
    Each step of the stream covers world * batch_size * block_size tokens;
    rank r reads its own disjoint slice. At the end of the data it starts the
    next epoch from the beginning, and says so.
    """

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world=1, vocab_size=50304):
        if not os.path.isdir(data_dir):
            raise SystemExit(f"train.py: data_dir={data_dir!r} does not exist; make it with prepare.py "
                             f"(e.g. python prepare.py --source=builtin) or pass --data_dir")
        paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
        if not paths:
            raise SystemExit(f"train.py: no {split}_*.bin shards in {data_dir}; run prepare.py into it")
        try:
            self.shards = [open_shard(p, vocab_size) for p in paths]
        except ValueError as e:
            raise SystemExit(f"train.py: {e}") from None
        self.ends = np.cumsum([len(s) for s in self.shards])
        self.rows, self.rank, self.split = batch_size * block_size, rank, split
        self.shape = (batch_size, block_size)
        self.step_tokens = world * self.rows
        if self.ends[-1] < self.step_tokens + 1:
            raise SystemExit(f"train.py: {data_dir} has {self.ends[-1]:,} {split} tokens, fewer than one "
                             f"step of {world} rank(s) x batch_size x block_size + 1 = "
                             f"{self.step_tokens + 1:,}; lower --batch_size or prepare more data")
        self.pos, self.epoch = 0, 0

    def read(self, start, n):
        pieces, i = [], int(np.searchsorted(self.ends, start, side="right"))
        while n > 0:
            begin = start - (self.ends[i - 1] if i else 0)
            piece = self.shards[i][begin:begin + n]
            pieces.append(piece)
            start, n, i = start + len(piece), n - len(piece), i + 1
        return np.concatenate(pieces).astype(np.int64)

    def next_batch(self):
        if self.pos + self.step_tokens + 1 > self.ends[-1]:
            self.pos, self.epoch = 0, self.epoch + 1
            if self.split == "train" and self.rank == 0:
                print(f"data: the train split is used up; epoch {self.epoch} starts from its beginning")
        buf = torch.from_numpy(self.read(self.pos + self.rank * self.rows, self.rows + 1))
        self.pos += self.step_tokens
        return buf[:-1].view(self.shape), buf[1:].view(self.shape)

    def state_dict(self):
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.pos, self.epoch = state["pos"], state["epoch"]


def to_device(batch, device):
    # from pinned memory the copy runs asynchronously: the host never waits for the GPU here
    return batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch


# -----------------------------------------------------------------------------
# Schedule, evaluation, checkpoints

def learning_rate(step, a):
    """Trapezoid: linear warmup, constant, linear decay to min_lr at max_steps."""
    if step < a["warmup_steps"]:
        return a["lr"] * (step + 1) / a["warmup_steps"]
    decay_start = a["max_steps"] - a["decay_steps"]
    if step < decay_start:
        return a["lr"]
    return a["min_lr"] + (a["lr"] - a["min_lr"]) * (a["max_steps"] - step) / a["decay_steps"]


@torch.no_grad()
def evaluate(model, stream, n_batches, autocast, device):
    model.eval()
    stream.load_state_dict({"pos": 0, "epoch": 0})  # the same validation tokens every time
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        x, y = (to_device(t, device) for t in stream.next_batch())
        with autocast:
            total += model(x, y)[1].float()
    model.train()
    return parallel.mean_over_ranks(total / n_batches).item()


# -----------------------------------------------------------------------------
# Checkpoints: sharded and asynchronous, through torch.distributed.checkpoint (DCP)
#
# A checkpoint is a directory ckpt_<step>: DCP's files (each rank writes its own expert
# shards, the replicated tensors are written once), train.json (step, data position, the
# run's config) and integrity.json (every file's size and CRC32, which DCP does not keep).
# It is written as ckpt_<step>.tmp and renamed once complete. Only tensors go through DCP,
# and DCP's metadata is unpickled here with DCP's own classes alone before DCP reads it,
# so that a checkpoint from elsewhere cannot run code when it is loaded.

# one process saves and loads through DCP without a process group, as intended: no warning
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"ckpt_{step:08d}")


def complete_checkpoints(out_dir):
    """The complete checkpoints in out_dir, oldest first."""
    return sorted(p for p in glob.glob(os.path.join(out_dir, "ckpt_*")) if re.fullmatch(r"ckpt_\d{8}", os.path.basename(p)))


def file_crc(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": os.path.getsize(path), "crc32": crc}


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


class Checkpointer:
    """
    Writes checkpoints in the background: training waits only while the state is copied to
    CPU memory; at most one checkpoint is in flight. On a GPU the copy goes to pinned buffers
    made once, at the first save or at warm_up, and reused (DCP's BlockingAsyncStager with
    its cache). Collective: every rank calls every method.
    """

    def __init__(self, out_dir, keep_last_n, master, device):
        from torch.distributed.checkpoint.staging import BlockingAsyncStager
        self.out_dir, self.keep_last_n, self.master, self.device = out_dir, keep_last_n, master, device
        # DCP's collectives run in the background on a group of their own, never on NCCL's
        self.group = torch.distributed.new_group(backend="gloo") if parallel.distributed() else None
        # pinning is what costs: at mh_4b on 4 H200 pinning 12 GiB a rank at every checkpoint
        # stalled training 8.1 s, copying into buffers pinned once takes well under a second
        self.stager = BlockingAsyncStager(cache_staged_state_dict=device.type == "cuda")
        self.writer, self.errors = None, []

    def warm_up(self, state):
        """Makes the pinned staging buffers now, before the first step, rather than at the first save."""
        if self.stager.cache_staged_state_dict:
            start = time.time()
            self.stager.stage(state)
            if self.master:
                print(f"checkpoint: staging buffers pinned in CPU memory in {time.time() - start:.1f} s", flush=True)

    def save(self, step, state, train_state):
        import torch.distributed.checkpoint as dcp
        self.wait()  # the staging buffers are free again only once the last write is done
        start = time.time()
        path = checkpoint_path(self.out_dir, step)
        if self.master:
            shutil.rmtree(path + ".tmp", ignore_errors=True)  # an earlier run's unfinished one
            os.makedirs(path + ".tmp")
            write_json(os.path.join(path + ".tmp", "train.json"), train_state)
        if self.group is not None:
            torch.distributed.barrier(group=self.group)
        upload = dcp.async_save(state, checkpoint_id=path + ".tmp", process_group=self.group,
                                async_stager=self.stager, no_dist=self.group is None)
        if self.master:
            print(f"checkpoint: training waited {time.time() - start:.2f} s for its copy to CPU memory", flush=True)
        self.writer = threading.Thread(target=self.finish, args=(upload, path, start))
        self.writer.start()

    def finish(self, upload, path, start):
        """
        In the background: once every rank's files and DCP's metadata are written, each rank
        checksums the files it wrote (DCP names them __<rank>_<i>.distcp) and rank 0 seals it.
        """
        import torch.distributed as dist
        try:
            upload.result()
            tmp = path + ".tmp"
            rank, world = (dist.get_rank(), dist.get_world_size()) if self.group is not None else (0, 1)
            mine = {f: file_crc(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.startswith(f"__{rank}_")}
            parts = [None] * world if self.master else None
            if self.group is not None:
                dist.gather_object(mine, parts, dst=0, group=self.group)
            else:
                parts = [mine]
            if self.master:
                sums = {f: crc for part in parts for f, crc in part.items()}
                sums |= {f: file_crc(os.path.join(tmp, f)) for f in os.listdir(tmp) if f not in sums}  # metadata, train.json
                write_json(os.path.join(tmp, "integrity.json"), sums)
                os.replace(tmp, path)
                for old in complete_checkpoints(self.out_dir)[:-self.keep_last_n]:
                    shutil.rmtree(old)
                print(f"checkpoint {path}: {len(sums)} files, {sum(v['bytes'] for v in sums.values()) / 2 ** 30:.2f} "
                      f"GiB, complete {time.time() - start:.1f} s after it began", flush=True)
        except Exception as e:  # raised on the main thread by wait()
            self.errors.append(e)

    def wait(self):
        """Blocks until the checkpoint in flight is complete (a SIGTERM'd run waits here too)."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        if self.errors:
            raise SystemExit(f"train.py: writing a checkpoint failed: {self.errors.pop()}")


DCP_CLASSES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata with DCP's metadata classes, torch dtypes and sizes alone."""

    def find_class(self, module, name):
        if ((module, name) in DCP_CLASSES or module == "torch.distributed.checkpoint.metadata"
                or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it would load {module}.{name}, which a checkpoint never holds")


def check_checkpoint(path, rank=0, world=1):
    """
    Raises ValueError if the checkpoint is incomplete, damaged or holds anything but tensors.
    Of the files' checksums this rank checks every world-th, from its rank on.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    with open(os.path.join(path, "integrity.json")) as f:
        files = json.load(f)
    for name, want in sorted(files.items())[rank::world]:
        if not os.path.exists(os.path.join(path, name)):
            raise ValueError(f"{name} is missing")
        if file_crc(os.path.join(path, name)) != want:
            raise ValueError(f"{name}: size or checksum differs from the one written with it")
    with open(os.path.join(path, ".metadata"), "rb") as f:
        try:
            metadata = MetadataUnpickler(f).load()
        except Exception as e:
            raise ValueError(f"its DCP metadata is refused: {e}") from None
    objects = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if objects:  # DCP unpickles non-tensor entries with weights_only=False
        raise ValueError(f"it holds pickled objects, not tensors: {', '.join(objects[:3])}")


def find_checkpoint(resume, out_dir, device):
    """
    (path, train state) of the checkpoint named by --resume, or with 'auto' of the newest
    complete and intact one in out_dir; the ranks share the checking (collective).
    """
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if parallel.distributed() else (0, 1)
    paths = [resume.rstrip("/")] if resume != "auto" else complete_checkpoints(out_dir)[::-1]
    for path in paths:
        try:
            check_checkpoint(path, rank, world)
            with open(os.path.join(path, "train.json")) as f:
                train_state = json.load(f)
            ok = 1.0
        except (OSError, ValueError) as e:  # a damaged one: report it and fall back to an older one
            print(f"checkpoint {path} cannot be used ({type(e).__name__}: {e}); trying an older one")
            ok = 0.0
        if parallel.mean_over_ranks(torch.tensor(ok, device=device)).item() == 1.0:
            return path, train_state
    if resume != "auto":
        raise SystemExit(f"train.py: --resume={resume!r} could not be loaded; give a complete checkpoint "
                         f"directory (ckpt_<step>) or --resume=auto")
    return None, None


def load_checkpoint(path, state):
    """Fills state (this layout's tensors, sharded_state) from the checkpoint, resharding as needed."""
    import torch.distributed.checkpoint as dcp
    dcp.load(state, checkpoint_id=path, no_dist=not parallel.distributed())


def read_model(path):
    """
    (GPTConfig, the whole model's state dict on the CPU) from a checkpoint directory, in one
    process whatever layout wrote it, or from a file written by `train.py export`; neither
    unpickles anything.
    """
    if not os.path.isdir(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"train.py: {path} is not a model file written by train.py export "
                             f"({type(e).__name__}: {e})") from None
        return GPTConfig(**blob["config"]), blob["model"]
    import torch.distributed.checkpoint as dcp
    try:
        check_checkpoint(path)
        with open(os.path.join(path, "train.json")) as f:
            config = GPTConfig(**json.load(f)["config"]["model"])
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py: checkpoint {path} cannot be used ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        shapes = GPT(config).state_dict()
    state = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in shapes.items()}
    dcp.load({"model": state}, checkpoint_id=path, no_dist=True)
    return config, state


def load_model(path, device="cpu"):
    """A GPT in eval mode from a checkpoint directory, a run's out_dir (its newest complete
    checkpoint) or a file written by `train.py export`."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "train.json")):
        found = complete_checkpoints(path)
        if not found:
            raise SystemExit(f"train.py: {path} holds no complete checkpoint (ckpt_<step>/); give a checkpoint "
                             f"directory, a run's out_dir or a model file written by train.py export")
        path = found[-1]
    config, state = read_model(path)
    with torch.device(device):
        model = GPT(config)
    model.load_state_dict(state)
    return model.eval()


def parse_options(argv, defaults, command):
    """--key=value arguments of a command, typed like its defaults."""
    options = dict(defaults)
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in defaults:
            raise SystemExit(f"train.py {command}: bad argument {arg!r}; options are "
                             + " ".join(f"--{k}={v!r}" for k, v in defaults.items()))
        options[key] = convert(key, value, defaults[key])
    return options


SAMPLE = dict(prompt="\n", max_new_tokens=200, temperature=0.8, top_k=200, num_samples=2, seed=1337, device="auto")


def sample(argv):
    """python train.py sample CKPT_OR_OUT_DIR [--prompt=... --max_new_tokens --temperature --top_k ...]"""
    if not argv or argv[0].startswith("--"):
        raise SystemExit("usage: python train.py sample out/run [--prompt='Once upon a time'] [--max_new_tokens=200] "
                         "[--temperature=0.8] [--top_k=200] [--num_samples=2] [--seed=1337] [--device=auto]")
    o = parse_options(argv[1:], SAMPLE, "sample")
    device = torch.device(parallel.pick_device(o["device"]))
    model = load_model(argv[0], device)
    enc = encoder()
    torch.manual_seed(o["seed"])
    prompt = torch.tensor([enc.encode_ordinary(o["prompt"]) or [EOT]] * o["num_samples"], device=device)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        out = model.generate(prompt, o["max_new_tokens"], o["temperature"], o["top_k"] or None)
    for row in out.tolist():  # ids past GPT-2's vocabulary (the padding to a multiple of 64) have no text
        print(enc.decode([t for t in row if t < enc.n_vocab]) + "\n---------------")


def export(argv):
    """python train.py export CKPT_DIR OUT.pt: the model alone, one file, for sampling and evaluation."""
    if len(argv) != 2:
        raise SystemExit("usage: python train.py export out/run/ckpt_00001000 model.pt")
    config, state = read_model(argv[0])
    torch.save({"config": dataclasses.asdict(config), "model": state}, argv[1] + ".tmp")
    os.replace(argv[1] + ".tmp", argv[1])
    print(f"{argv[1]}: {sum(t.numel() for n, t in state.items() if n != 'lm_head.weight') / 1e6:.1f}M parameters "
          f"of {config.ffn}; load it with torch.load(..., weights_only=True)")


@torch.no_grad()
def create_optimizer_state(model, optimizer):
    """AdamW makes its state at its first step; a resumed run needs it to load into: one
    step of zero gradients at lr 0, which leaves every weight as it is."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


BALANCE_RATE = 0.05  # the first balancing step's u, decaying linearly to 0


@torch.no_grad()
def balance_routing(model, data, steps, accum, autocast, device):
    """
    Forward passes with the weights frozen that move only the router biases toward
    balance (b += u sign(mean - load), u decaying from BALANCE_RATE), so that training,
    or a benchmark, starts from the routing the bias would reach, not the initialised
    one. The data stream is rewound afterwards. Returns the first and last step's worst load.
    """
    loads = []
    for i in range(steps):
        for _ in range(accum):
            x, _ = (to_device(t, device) for t in data.next_batch())
            with autocast:
                model(x)
        loads.append(parallel.global_loads(model).max())
        parallel.update_router_biases(model, BALANCE_RATE * (1 - i / steps))
    data.load_state_dict({"pos": 0, "epoch": 0})
    return loads[0].item(), loads[-1].item()


class CollapseWatch:
    """Says when one expert takes more than `share` of a layer's routed tokens for `steps` steps in a row."""

    def __init__(self, share, steps):
        self.share, self.steps, self.runs = share, steps, {}

    def update(self, step, shares):
        for layer, s in enumerate(shares):
            self.runs[layer] = self.runs.get(layer, 0) + 1 if s > self.share else 0
            if self.runs[layer] == self.steps:
                print(f"warning: step {step}: in MoE layer {layer} one expert has taken more than "
                      f"{self.share:.0%} of the tokens for {self.steps} steps (routing collapse; "
                      f"a larger --bias_update_rate or a longer warmup helps)", flush=True)


# -----------------------------------------------------------------------------

def main(argv, on_step=None):
    """on_step(step), if given, is called after every step (bench.py's profiler uses it)."""
    a, config = parse_args(argv)
    if a["deterministic"]:  # what it costs: README, "Reliability"
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    size = a["parallel_size"] or world
    parallel.check_layout(a["parallel"], size, world, config, a["ep_size"])
    rank, world, device = parallel.init_distributed(a["device"])
    layout = parallel.make_layout(a["parallel"], size, rank, world, a["ep_size"])
    master = rank == 0
    torch.manual_seed(a["seed"])
    steps_tokens = a["batch_size"] * config.block_size * world
    if a["batch_tokens"] % steps_tokens:
        raise SystemExit(f"train.py: --batch_tokens={a['batch_tokens']} is not a multiple of "
                         f"world_size x batch_size x block_size = {steps_tokens}; change one of them")
    accum = a["batch_tokens"] // steps_tokens

    with torch.device(device):  # initialised where it runs: one CPU thread per rank would take a minute at 4B
        model = GPT(config)     # every rank builds the same whole model from the seed ...
    active, total = model.num_params()
    for experts in model.routed_experts():  # --route_skew: nearly every token picks the same k experts
        experts.route_bias[:, :experts.topk] += a["route_skew"]
    parallel.shard_model(model, layout, a["overlap"])  # ... and keeps its own expert shard
    if device.type == "cuda":  # the whole model existed for a moment: report the memory of training
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = model.configure_optimizer(a["weight_decay"], a["lr"], (a["beta1"], a["beta2"]),
                                          fused=device.type == "cuda")
    create_optimizer_state(model, optimizer)  # from the start, so that every checkpoint holds it
    train_data = TokenStream(a["data_dir"], "train", a["batch_size"], config.block_size, rank, world,
                             config.vocab_size)
    val_data = val_batches = None  # the validation split is read, and checked, only if validation runs
    if a["eval_interval"]:
        val_data = TokenStream(a["data_dir"], "val", a["batch_size"], config.block_size, rank, world,
                               config.vocab_size)
        val_batches = min(a["eval_tokens"], int(val_data.ends[-1]) - 1) // steps_tokens
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    run_config = {"train": a, "model": dataclasses.asdict(config), "world_size": world,
                  "device": f"{gpu} | torch {torch.__version__}"}

    mesh = parallel.checkpoint_mesh(layout, world, device)

    def state():  # what a checkpoint holds: this rank's tensors, as DCP sees them
        return {**parallel.sharded_state(model, optimizer, mesh), "rng": torch.get_rng_state()}

    step = 0
    if a["resume"]:
        t_load = time.time()
        path, train_state = find_checkpoint(a["resume"], a["out_dir"], device)
        if path is not None:
            loaded = state()
            load_checkpoint(path, loaded)
            torch.set_rng_state(loaded["rng"])
            train_data.load_state_dict(train_state["data"])
            step = train_state["step"]
            if master:
                print(f"resumed from {path} at step {step} ({time.time() - t_load:.1f} s to check and load it)")
    checkpointer = Checkpointer(a["out_dir"], a["keep_last_n"], master, device)
    if master:
        os.makedirs(a["out_dir"], exist_ok=True)
        print(json.dumps(run_config))
        with open(os.path.join(a["out_dir"], "config.json"), "w") as f:
            json.dump(run_config, f, indent=1)
        print(f"parameters: {active / 1e6:.1f}M active / {total / 1e6:.1f}M total | world {world} | "
              f"{layout.mode} over {layout.size} rank(s)"
              + (f" ({layout.heads} for the heads x {layout.experts} for the experts)"
                 if layout.mode == "hp" and layout.experts > 1 else "")
              + " | "
              f"{accum} micro-batches of {a['batch_size']}x{config.block_size} per rank per step | "
              + (f"validation on {val_batches * steps_tokens:,} tokens" if val_data else "no validation"))
    forward = torch.compile(model) if a["compile"] else model
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    if a["balance_steps"] and step == 0 and model.routed_experts():
        first, last = balance_routing(model, train_data, a["balance_steps"], accum, autocast, device)
        if master:
            print(f"routing balanced by the bias over {a['balance_steps']} forward-only steps: "
                  f"worst load max/mean {first:.2f} -> {last:.2f}")
    log = open(os.path.join(a["out_dir"], "log.jsonl"), "a", buffering=1) if master else None

    def validate(step):
        if not val_batches:
            return
        val = evaluate(forward, val_data, val_batches, autocast, device)
        if master:
            print(f"step {step} | val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")
            log.write(json.dumps({"step": step, "val_loss": val}) + "\n")

    def checkpoint(step):
        checkpointer.save(step, state(), {"step": step, "data": train_data.state_dict(), "config": run_config})

    if a["ckpt_interval"]:
        checkpointer.warm_up(state())

    interrupted = []  # SIGTERM / SIGINT: finish the step, save, stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: interrupted.append(signum))
    watch = CollapseWatch(a["collapse_share"], a["collapse_steps"])
    bad_steps, t0 = 0, time.time()
    while step < a["max_steps"]:
        if a["eval_interval"] and step % a["eval_interval"] == 0:
            t_eval = time.time()
            validate(step)
            t0 += time.time() - t_eval  # keep evaluation out of the step timing
        t_step = time.time()
        lr = learning_rate(step, a)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = (to_device(t, device) for t in train_data.next_batch())
            with autocast:
                loss = forward(x, y)[1]
            (loss / accum).backward()
            loss_sum += loss.detach()
        parallel.average_gradients(model)
        norm = parallel.grad_norm(model.parameters())  # logged, and checked for non-finite values
        if a["grad_clip"]:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), a["grad_clip"], norm)
        # one all-reduce tells every rank the global loss and whether any rank was signalled;
        # one read of the device brings them, the norm and the expert loads to the host: the
        # step's one wait but for a logging step's synchronize (a second, after the optimizer's
        # step, left the device idle until the next step's first kernels were launched)
        loss_stop = parallel.mean_over_ranks(
            torch.stack([loss_sum / accum, torch.tensor(float(bool(interrupted)), device=device)]))
        load = parallel.global_loads(model)
        loss, stop, norm, *load = torch.cat([loss_stop, norm.view(1).to(loss_stop), load.to(loss_stop)]).tolist()
        finite = math.isfinite(loss) and math.isfinite(norm)
        if finite:
            optimizer.step()
            parallel.update_router_biases(model, a["bias_update_rate"])
            bad_steps = 0
        else:  # skip the update: weights, optimizer state and router biases stay as they were
            bad_steps += 1
            load = []
            for experts in model.routed_experts():
                experts.load.zero_()
        optimizer.zero_grad(set_to_none=True)
        step_ms = (time.time() - t_step) * 1000  # the loss's .tolist() above waited for the device
        step += 1
        if master and not finite:
            print(f"step {step}: non-finite loss {loss} or gradient norm {norm}; update skipped "
                  f"({bad_steps} in a row, the run stops at --max_bad_steps={a['max_bad_steps']})", flush=True)
        if master and load:
            watch.update(step, [r * config.topk / config.n_expert for r in load])
        if master and (step % a["log_interval"] == 0 or step == a["max_steps"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.time() - t0) / (step % a["log_interval"] or a["log_interval"])
            tps = a["batch_tokens"] / dt
            mfu = model.flops_per_token() * tps / (world * a["peak_tflops"] * 1e12)
            load_text = f" | load max/mean {' '.join(f'{x:.2f}' for x in load)}" if load else ""
            mfu_text = f" | mfu {100 * mfu:.1f}%" if device.type == "cuda" else ""
            print(f"step {step}/{a['max_steps']} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                  f"{dt * 1000:.0f} ms | {tps:,.0f} tok/s{mfu_text}{load_text}", flush=True)
            t0 = time.time()
        if master:
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
            log.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                                  "skipped": not finite, "load_max_over_mean": load, "step_ms": step_ms,
                                  "peak_gib": peak}) + "\n")
        if bad_steps >= a["max_bad_steps"]:
            checkpointer.wait()
            raise SystemExit(f"train.py: {bad_steps} non-finite steps in a row, the last at step {step}; "
                             f"stopping with the last checkpoint intact. Lower --lr or check the data, "
                             f"then resume from that checkpoint")
        if on_step is not None:
            on_step(step)
        if stop or a["ckpt_interval"] and (step % a["ckpt_interval"] == 0 or step == a["max_steps"]):
            checkpoint(step)
        if stop:
            checkpointer.wait()
            if master:
                print(f"stopped by a signal after step {step}; checkpoint saved, --resume=auto continues")
            parallel.shutdown()
            return
    validate(step)
    checkpointer.wait()
    parallel.shutdown()


if __name__ == "__main__":
    commands = {"export": export, "sample": sample}
    if sys.argv[1:2] and sys.argv[1] in commands:
        commands[sys.argv[1]](sys.argv[2:])
    else:
        parallel.errors_once(main, sys.argv[1:])
