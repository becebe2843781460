"""
The correctness suite: python -m pytest test_all.py (CPU; GPU tests skip without CUDA).

Oracles are independent: per-token float64 loops over the paper's equations,
single-process runs for multi-process ones, uninterrupted runs for resumed ones.
"""

import contextlib
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # run the Triton kernels on the CPU; must precede `import triton`

import triton
import triton.language as tl

import kernels
import parallel
import prepare
import train
from model import (GPT, FFN_CLASSES, PRESETS, GPTConfig, MoE, MultiHeadLatentMoE, RoutedExperts, linear_cross_entropy,
                   preset)

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(block_size=32, n_layer=2, n_head=2, n_embd=48, n_dense_layers=1, n_expert=7, topk=3,
             expert_dim=20, latent_dim=24, moe_heads=3, moe_head_dim=16)


def small_config(**kw):
    return GPTConfig(**{**SMALL, **kw})


# -----------------------------------------------------------------------------
# An independent oracle: one token at a time, float64, straight from Eq. 1-6

def gelu64(v):
    return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))


def moe_oracle(x, route_on, router, bias, w1, w2, k):
    """Eq. 1-4 for one (sub-)token x through one expert set; routing on route_on."""
    s = route_on @ router                                       # Eq. 4
    top = sorted(range(len(s)), key=lambda e: -(s[e] + bias[e]).item())[:k]  # Eq. 3, biased choice
    g = torch.softmax(torch.stack([s[e] for e in top]), 0)       # Eq. 2, unbiased scores
    return sum(g[j] * (gelu64(w1[e] @ x) @ w2[e]) for j, e in enumerate(top))  # Eq. 1


def ffn_oracle(ffn, x):
    ex, k = ffn.experts, ffn.experts.topk
    sets = [(ex.router[h], ex.route_bias[h], ex.w1[h], ex.w2[h]) for h in range(ex.router.size(0))]
    out = []
    for tok in x:
        if isinstance(ffn, MoE):
            out.append(moe_oracle(tok, tok, *sets[0], k))
        elif type(ffn).__name__ == "LatentMoE":
            out.append(ffn.w_up.weight @ moe_oracle(ffn.w_down.weight @ tok, tok, *sets[0], k))
        elif type(ffn).__name__ == "MHMoE":
            subs = (ffn.w_in.weight @ tok).split(ffn.w_in.weight.size(0) // ffn.moe_heads)
            out.append(ffn.w_out.weight @ torch.cat([moe_oracle(s, s, *sets[0], k) for s in subs]))
        else:  # Multi-Head LatentMoE, Eq. 5-6
            subs = (ffn.w_in.weight @ tok).split(ffn.moe_head_dim)
            heads = len(sets)
            route = subs[heads:] if ffn.separate_routing_tokens else subs
            out.append(ffn.w_out.weight @ torch.cat(
                [moe_oracle(subs[h], route[h], *sets[h], k) for h in range(heads)]))
    return torch.stack(out)


@pytest.mark.parametrize("ffn,extra", [("moe", {}), ("latent_moe", {}), ("mh_moe", {}),
                                       ("mh_latent_moe", {}),
                                       ("mh_latent_moe", {"separate_routing_tokens": True})])
def test_ffn_output_equals_fp64_per_token_oracle(ffn, extra):
    torch.manual_seed(0)
    config = small_config(ffn=ffn, **extra)
    block = FFN_CLASSES[ffn](config).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    block.experts.route_bias.normal_(std=0.5)  # a bias that changes the choice of experts
    x = torch.randn(2, 13, config.n_embd, dtype=torch.float64)
    got = block(x).view(-1, config.n_embd)
    want = ffn_oracle(block, x.view(-1, config.n_embd))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mlp_block_is_gelu_mlp():
    torch.manual_seed(0)
    block = FFN_CLASSES["mlp"](small_config()).double()
    x = torch.randn(5, 48, dtype=torch.float64)
    want = gelu64(x @ block.c_fc.weight.T) @ block.c_proj.weight.T
    torch.testing.assert_close(block(x), want)


def test_mh_latent_moe_with_one_head_and_identity_projections_equals_moe():
    torch.manual_seed(0)
    d = 40
    moe = MoE(small_config(ffn="moe", n_embd=d)).double()
    mh = MultiHeadLatentMoE(small_config(ffn="mh_latent_moe", n_embd=d, moe_heads=1, moe_head_dim=d)).double()
    mh.load_state_dict({"w_in.weight": torch.eye(d), "w_out.weight": torch.eye(d),
                        **{f"experts.{k}": v for k, v in moe.experts.state_dict().items()}})
    x = torch.randn(3, 11, d, dtype=torch.float64)
    torch.testing.assert_close(mh(x), moe(x), rtol=0, atol=0)


def test_bias_changes_selection_but_not_gate_values():
    torch.manual_seed(0)
    x, w = torch.randn(29, 2, 16), torch.randn(2, 16, 9)
    bias = torch.zeros(2, 9)
    _, idx0, _ = kernels.topk_route(x, w, bias, 2)
    bias[:, 4] = 100.0  # expert 4 must now be chosen first by every token of both heads
    scores, idx, _ = kernels.topk_route(x, w, bias, 2)
    assert (idx[..., 0] == 4).all() and not torch.equal(idx, idx0)
    unbiased = torch.einsum("nhd,hde->nhe", x.double(), w.double()).gather(-1, idx)
    torch.testing.assert_close(scores.double(), unbiased, rtol=1e-6, atol=1e-6)


def test_load_balancing_bias_moves_toward_balance():
    torch.manual_seed(0)
    experts = MoE(small_config(ffn="moe", n_expert=8, topk=2)).experts
    with torch.no_grad():
        experts.router[0, :, 0] += 0.05  # with inputs offset by 1: every token prefers expert 0
    x = torch.randn(512, 1, 48) + 1.0

    def imbalance():
        experts.load.zero_()
        experts(x)
        return (experts.load.max() / experts.load.mean()).item()

    before = imbalance()
    for _ in range(200):
        experts.load.zero_()
        experts(x)
        experts.update_bias(rate=0.05)
    after = imbalance()
    assert before == 4.0 and after < 1.6, (before, after)  # 4.0: all tokens on expert 0


def test_load_counts_every_heads_picks_per_expert():
    experts = RoutedExperts(3, 16, 7, 8, 2)
    idx = torch.randint(0, 7, (41, 3, 2), generator=torch.Generator().manual_seed(0))
    experts.count_load(kernels.cluster_by_expert(idx, 7)[1])
    experts.count_load(kernels.cluster_by_expert(idx[:5], 7)[1])  # counts add up over micro-batches until update_bias
    for h in range(3):
        want = torch.bincount(idx[:, h].flatten(), minlength=7) + torch.bincount(idx[:5, h].flatten(), minlength=7)
        assert torch.equal(experts.load[h], want.float())


PAPER_CATEGORIES = {  # (active, total) in billions, rounded to 0.1B, tied embeddings counted once
    "mlp": (0.2, 0.2),
    "moe_2b": (0.1, 2.1), "moe_4b": (0.1, 4.2),  # the paper labels these 0.2B-2.2B / 0.2B-4.2B: README
    "latent_2b": (0.2, 2.2), "latent_4b": (0.2, 4.2),
    "mh_2b": (0.2, 2.2), "mh_4b": (0.2, 4.2), "mh_2b_g": (0.2, 2.2), "mh_4b_g": (0.2, 4.2),
    "mhmoe_2b": (0.2, 2.2),
}


@pytest.mark.parametrize("name", list(PAPER_CATEGORIES))
def test_paper_preset_parameter_counts(name):
    with torch.device("meta"):
        model = GPT(GPTConfig(**preset(name)))
    active, total = model.num_params()
    assert (round(active / 1e9, 1), round(total / 1e9, 1)) == PAPER_CATEGORIES[name]


def test_moe_expert_parameters_match_the_paper_tables():
    # 10 MoE layers of N_e experts with 2 d d_e weights each (Tables 4-5)
    with torch.device("meta"):
        moe2, mh2 = GPT(GPTConfig(**preset("moe_2b"))), GPT(GPTConfig(**preset("mh_2b")))
    _, t_moe = moe2.num_params()
    _, t_mh = mh2.num_params()
    assert t_mh - t_moe == 10 * (2 * 1024 * 1024 + (8 * 128 * 384 - 1024 * 384))  # W_in, W_out, routers


def test_every_preset_builds():
    for name in PRESETS:
        with torch.device("meta"):
            GPT(GPTConfig(**preset(name)))


# -----------------------------------------------------------------------------
# Configuration errors name the field, the value and the fix

@pytest.mark.parametrize("kw,words", [
    (dict(ffn="moe", topk=9, n_expert=8), ["topk=9", "n_expert=8"]),
    (dict(ffn="moe", n_expert=0), ["n_expert=0", "at least 1"]),
    (dict(ffn="dense"), ["ffn='dense'", "mh_latent_moe"]),
    (dict(ffn="mh_latentmoe"), ["did you mean 'mh_latent_moe'"]),
    (dict(n_head=5), ["n_head=5", "divide n_embd"]),
    (dict(ffn="moe", separate_routing_tokens=True), ["separate_routing_tokens", "mh_latent_moe only"]),
    (dict(ffn="moe", n_dense_layers=3), ["n_dense_layers=3", "0..n_layer=2"]),
    (dict(ffn="moe", expert_kernel="flexx"), ["expert_kernel='flexx'", "did you mean 'flex'"]),
])
def test_bad_model_config_is_named(kw, words):
    with pytest.raises(ValueError) as e:
        small_config(**kw)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("argv,words", [
    (["--lrr=1"], ["--lrr", "did you mean --lr"]),
    (["--lr=fast"], ["--lr='fast'", "float"]),
    (["--compile=maybe"], ["--compile='maybe'", "boolean"]),
    (["--preset=mh2b"], ["mh2b", "did you mean 'mh_2b'"]),
    (["preset=mh_2b"], ["--key=value"]),
    (["--preset=mh_2b", "--topk=999"], ["topk=999"]),
    (["--max_steps=10", "--warmup_steps=8", "--decay_steps=5"], ["--max_steps=10", "13"]),
    (["--device=tpu"], ["--device='tpu'"]),
    (["--ckpt_interval=-1"], ["--ckpt_interval=-1", "0 turns it off"]),
    (["--max_bad_steps=0"], ["--max_bad_steps=0", "at least 1"]),
    (["--route_skew=-1"], ["--route_skew=-1.0", "0 turns it off"]),
    (["--grad_clip=-1"], ["--grad_clip=-1.0", "0 turns clipping off"]),
    (["--beta2=1"], ["--beta2=1.0", "[0, 1)"]),
    (["--weight_decay=-0.1"], ["--weight_decay=-0.1", "negative"]),
    (["--collapse_share=0"], ["--collapse_share=0.0", "(0, 1]"]),
    (["--peak_tflops=0"], ["--peak_tflops=0.0", "positive"]),
    (["--overlap=1"], ["--overlap=True", "--parallel=hp or ep"]),
])
def test_bad_cli_is_named(argv, words):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    for w in words:
        assert w in str(e.value)


def test_grad_clip_0_turns_clipping_off(corpus, tmp_path):
    # as in nanoGPT: 0 trains as an unreachable bound does, where a bound of 0 would zero every gradient
    runs = {clip: str(tmp_path / str(clip)) for clip in (0.0, 1e9, 1e-3)}
    for clip, out in runs.items():
        train.main(run_args(corpus, out, max_steps=2, warmup_steps=0, decay_steps=0, grad_clip=clip))
    assert losses(runs[0.0]) == losses(runs[1e9]) != losses(runs[1e-3])


def test_cli_overrides_preset_fields():
    args, config = train.parse_args(["--preset=mh_2b", "--topk=2", "--lr=1e-3", "--compile=true"])
    assert (config.ffn, config.n_expert, config.topk) == ("mh_latent_moe", 384, 2)
    assert args["lr"] == 1e-3 and args["compile"] is True


# -----------------------------------------------------------------------------
# Data: shards, loader, errors

@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The built-in corpus (Python's docs), tokenized once for the whole session."""
    out = str(tmp_path_factory.mktemp("builtin"))
    prepare.prepare("builtin", out, val_fraction=0.1, workers=2)
    return out


def test_prepare_shuffles_local_documents_on_request(tmp_path):
    prepare.prepare("builtin", str(tmp_path / "shuffled"), val_fraction=0.1, workers=2, shuffle_seed=3)
    docs = prepare.builtin_docs()
    random.Random(3).shuffle(docs)
    enc = prepare.encoder()
    want = np.concatenate([enc.encode_ordinary(d) + [prepare.EOT] for i, d in enumerate(docs)
                           if not prepare.is_val(i, 0.1)])
    assert np.array_equal(np.asarray(prepare.open_shard(str(tmp_path / "shuffled" / "train_000000.bin"))), want)
    with pytest.raises(SystemExit, match="shuffled already"):
        prepare.prepare("fineweb", str(tmp_path / "fineweb"), shuffle_seed=0)


def test_prepare_writes_gpt2_tokens_with_eot_between_documents(corpus):
    tokens = prepare.open_shard(os.path.join(corpus, "train_000000.bin"))
    docs = [d for i, d in enumerate(prepare.builtin_docs()) if not prepare.is_val(i, 0.1)]
    enc = prepare.encoder()
    want = np.concatenate([enc.encode_ordinary(d) + [prepare.EOT] for d in docs])
    assert np.array_equal(np.asarray(tokens), want)


def split_tokens(out_dir, split):
    paths = sorted(f for f in os.listdir(out_dir) if f.startswith(split))
    return np.concatenate([prepare.open_shard(os.path.join(out_dir, p)) for p in paths])


def test_prepare_carries_on_where_a_stopped_run_ended(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * (7 + i % 13)}) + "\n" for i in range(60)))
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    prepare.prepare(str(src), full, val_fraction=0.2, shard_tokens=300, workers=1)
    assert prepare.prepare(str(src), part, val_fraction=0.2, shard_tokens=300, workers=1,
                           max_docs=25)["done"] is False
    assert prepare.prepare(str(src), part, val_fraction=0.2, shard_tokens=300, workers=1)["done"] is True
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(full, split), split_tokens(part, split))


def test_prepare_streams_fineweb_through_datasets_and_resumes(tmp_path, monkeypatch, capsys):
    # the hub is unreachable here: the same datasets streaming path reads a local stand-in
    import datasets
    texts = [f"fineweb document {i} " * (5 + i % 11) for i in range(60)]
    src = tmp_path / "fineweb.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    load = datasets.load_dataset

    def hub(path, name=None, split=None, streaming=False):  # only the hub lookup is replaced
        assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
        stream = load("json", data_files=str(src), split="train", streaming=True)
        assert isinstance(stream, datasets.IterableDataset)
        return stream
    monkeypatch.setattr(datasets, "load_dataset", hub)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    prepare.prepare("fineweb", full, val_fraction=0.2, shard_tokens=300, workers=1)
    enc = prepare.encoder()
    for split, want_val in (("train", False), ("val", True)):
        want = np.concatenate([enc.encode_ordinary(t) + [prepare.EOT] for i, t in enumerate(texts)
                               if prepare.is_val(i, 0.2) == want_val])
        assert np.array_equal(split_tokens(full, split), want)
    assert "60 docs" in capsys.readouterr().out  # the progress line
    assert prepare.prepare("fineweb", part, val_fraction=0.2, shard_tokens=300, workers=1,
                           max_docs=25)["done"] is False
    assert prepare.prepare("fineweb", part, val_fraction=0.2, shard_tokens=300, workers=1)["done"] is True
    assert sorted(os.listdir(part)) == sorted(os.listdir(full))
    for name in os.listdir(full):  # shard for shard, as an uninterrupted run
        if name.endswith(".bin"):
            assert np.array_equal(prepare.open_shard(os.path.join(part, name)), prepare.open_shard(os.path.join(full, name)))


def test_prepare_without_network_names_the_local_alternative(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), f"--out_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120, cwd=HERE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))  # what no network looks like, at once
    assert result.returncode != 0
    for words in ("cannot stream HuggingFaceFW/fineweb-edu", "Couldn't reach", "--source='dir/*.jsonl'"):
        assert words in result.stderr


def test_prepare_progress_estimates_the_time_left_when_the_size_is_known(tmp_path, capsys):
    prepare.prepare("builtin", str(tmp_path), val_fraction=0.1, workers=1)
    line = capsys.readouterr().out.split("\r")[-1]
    n = len(prepare.builtin_docs())
    for words in (f"{n} docs", "tokens", "tok/s", f"100% of {n} docs", "min left"):
        assert words in line


def test_loader_ranks_read_disjoint_slices_of_one_stream(corpus):
    one = train.TokenStream(corpus, "train", 4, 32, rank=0, world=1)
    two = [train.TokenStream(corpus, "train", 2, 32, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        x, y = one.next_batch()
        parts = [s.next_batch() for s in two]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_loader_resumes_at_the_exact_position(corpus):
    a = train.TokenStream(corpus, "train", 3, 17)
    for _ in range(5):
        a.next_batch()
    b = train.TokenStream(corpus, "train", 3, 17)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))


def write_raw(path, header, tokens):
    with open(path, "wb") as f:
        f.write(np.array(header, dtype="<i8").tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


@pytest.mark.parametrize("case,words", [
    ("magic", ["not a token shard"]),
    ("version", ["shard version 7"]),
    ("truncated", ["truncated"]),
    ("empty", ["holds no tokens"]),
    ("vocab", ["token id 60000", "vocab_size=50304"]),
    ("short", ["fewer than one step", "--batch_size"]),
])
def test_bad_shard_is_named(tmp_path, case, words):
    tokens = np.arange(1000) % 50000
    header = {"magic": [1, 1, 1000, 0], "version": [prepare.MAGIC, 7, 1000, 0],
              "truncated": [prepare.MAGIC, 1, 2000, 0], "empty": [prepare.MAGIC, 1, 0, 0],
              "vocab": [prepare.MAGIC, 1, 1000, 0], "short": [prepare.MAGIC, 1, 1000, 0]}[case]
    if case == "vocab":
        tokens[500] = 60000
    write_raw(tmp_path / "train_000000.bin", header, [] if case == "empty" else tokens)
    with pytest.raises(SystemExit) as e:
        train.TokenStream(str(tmp_path), "train", 64, 32)
    assert str(tmp_path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_the_validation_split_is_demanded_only_when_validation_runs(tmp_path):
    # a train split for many steps and a validation split shorter than one step
    write_raw(tmp_path / "train_000000.bin", [prepare.MAGIC, 1, 5000, 0], np.arange(5000) % 50000)
    write_raw(tmp_path / "val_000000.bin", [prepare.MAGIC, 1, 100, 0], np.arange(100))
    args = run_args(str(tmp_path), str(tmp_path / "out"), max_steps=4, eval_interval=0)
    train.main(args)  # no validation: the short split is never read
    assert len(losses(str(tmp_path / "out"))) == 4
    with pytest.raises(SystemExit, match="has 100 val tokens, fewer than one step"):
        train.main(run_args(str(tmp_path), str(tmp_path / "out2"), max_steps=4, eval_interval=2))


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(SystemExit, match="does not exist; make it with prepare.py"):
        train.TokenStream(str(tmp_path / "nope"), "train", 1, 8)
    with pytest.raises(SystemExit, match="no val_.*bin shards"):
        train.TokenStream(str(tmp_path), "val", 1, 8)


@pytest.mark.parametrize("argv,words", [
    (["--source=/nonexistent/*.jsonl"], ["no files match"]),
    (["--val_fraction=2"], ["--val_fraction=2.0", "between 0 and 1"]),
    (["--shards=3"], ["bad argument '--shards=3'"]),
])
def test_bad_prepare_arguments_are_named(argv, words):
    with pytest.raises(SystemExit) as e:
        a = prepare.parse_args(argv)
        list(prepare.local_docs(a["source"]))
    for w in words:
        assert w in str(e.value)


# -----------------------------------------------------------------------------
# Training: the loss falls, DDP equals one process, resume is exact

def run_args(corpus, out_dir, **kw):
    base = dict(data_dir=corpus, out_dir=out_dir, batch_size=4, batch_tokens=256, max_steps=6,
                warmup_steps=2, decay_steps=2, lr=3e-3, eval_interval=1000, log_interval=1,
                eval_tokens=512, device="cpu", **{k: v for k, v in SMALL.items()}, ffn="mh_latent_moe")
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def losses(out_dir):
    entries = {}
    for line in open(os.path.join(out_dir, "log.jsonl")):
        e = json.loads(line)
        if "loss" in e:
            entries[e["step"]] = e["loss"]  # a resumed run re-logs its steps: the last one counts
    return [entries[s] for s in sorted(entries)]


def test_training_on_the_builtin_corpus_lowers_the_loss(corpus, tmp_path):
    train.main(run_args(corpus, str(tmp_path), max_steps=30, warmup_steps=3, decay_steps=5))
    got = losses(str(tmp_path))
    assert np.mean(got[-5:]) < got[0] - 2.0, got


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned staging buffers need CUDA"))])
def test_resume_reproduces_the_uninterrupted_losses_exactly(corpus, tmp_path, device):
    # on a GPU the checkpoints of steps 2 and 4 go through the same pinned buffers
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    kw = dict(device=device, deterministic=device == "cuda")
    train.main(run_args(corpus, straight, **kw))
    train.main(run_args(corpus, resumed, ckpt_interval=2, keep_last_n=5, **kw))
    shutil.rmtree(os.path.join(resumed, "ckpt_00000006"))  # as if the run had died after step 5
    train.main(run_args(corpus, resumed, ckpt_interval=2, resume="auto", **kw))
    assert losses(straight) == losses(resumed)


@pytest.mark.parametrize("damage,reason", [("truncated", "size or checksum differs"),
                                           ("bit_flip", "size or checksum differs"),
                                           ("missing", ".distcp is missing"),
                                           ("no_integrity", "integrity.json"), ("unsealed", None)])
def test_damaged_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path, capsys, damage, reason):
    out = str(tmp_path)
    train.main(run_args(corpus, out, ckpt_interval=3, keep_last_n=5))
    newest = os.path.join(out, "ckpt_00000006")
    data = os.path.join(newest, next(f for f in os.listdir(newest) if f.endswith(".distcp")))
    if damage == "truncated":
        with open(data, "r+b") as f:
            f.truncate(100)
    elif damage == "bit_flip":  # same size, one byte changed in the middle
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x10]))
    elif damage == "missing":
        os.remove(data)
    elif damage == "no_integrity":
        os.remove(os.path.join(newest, "integrity.json"))
    else:  # as if the run died before the write was complete: it was never renamed
        os.rename(newest, newest + ".tmp")
    path, state = train.find_checkpoint("auto", out, torch.device("cpu"))
    assert path.endswith("ckpt_00000003") and state["step"] == 3
    if reason is not None:  # the checkpoint and what is wrong with it are named
        printed = capsys.readouterr().out
        assert "ckpt_00000006 cannot be used" in printed and reason in printed


def test_only_the_last_n_checkpoints_are_kept(corpus, tmp_path):
    train.main(run_args(corpus, str(tmp_path), ckpt_interval=1, keep_last_n=2))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt_")) == ["ckpt_00000005", "ckpt_00000006"]


def test_a_checkpoint_that_would_run_code_is_refused_unrun(corpus, tmp_path):
    out = str(tmp_path)
    train.main(run_args(corpus, out, max_steps=2, warmup_steps=1, decay_steps=1, ckpt_interval=1, keep_last_n=5))
    marker = tmp_path / "ran"

    class Payload:  # unpickling calls os.system, as a downloaded checkpoint could
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    metadata = os.path.join(out, "ckpt_00000002", ".metadata")
    with open(metadata, "wb") as f:
        pickle.dump(Payload(), f)
    seal = os.path.join(out, "ckpt_00000002", "integrity.json")  # as if the attacker sealed it too
    files = json.load(open(seal))
    files[".metadata"] = train.file_crc(metadata)
    json.dump(files, open(seal, "w"))
    with pytest.raises(SystemExit, match="could not be loaded"):
        train.find_checkpoint(os.path.join(out, "ckpt_00000002"), out, torch.device("cpu"))
    with pytest.raises(SystemExit, match="it would load posix.system"):
        train.read_model(os.path.join(out, "ckpt_00000002"))
    assert not marker.exists()
    # a pickled object stored as a DCP entry: DCP would torch.load it with weights_only=False
    import torch.distributed.checkpoint as dcp
    dcp.save({"x": torch.ones(2), "obj": {"a": Payload()}}, checkpoint_id=str(tmp_path / "objects"), no_dist=True)
    write_seal = {f: train.file_crc(str(tmp_path / "objects" / f)) for f in os.listdir(tmp_path / "objects")}
    json.dump(write_seal, open(tmp_path / "objects" / "integrity.json", "w"))
    with pytest.raises(ValueError, match="pickled objects, not tensors: obj.a"):
        train.check_checkpoint(str(tmp_path / "objects"))
    assert not marker.exists()


def test_every_checkpoint_and_exported_model_loads_without_unpickling(corpus, tmp_path):
    out = str(tmp_path)
    train.main(run_args(corpus, out, max_steps=2, warmup_steps=1, decay_steps=1, ckpt_interval=1, keep_last_n=5))
    for step in (1, 2):
        train.check_checkpoint(os.path.join(out, f"ckpt_{step:08d}"))  # DCP's metadata, restricted
    train.export([os.path.join(out, "ckpt_00000002"), str(tmp_path / "model.pt")])
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    config, state = train.read_model(str(tmp_path / "model.pt"))
    assert config.ffn == "mh_latent_moe" and set(state) == set(blob["model"])
    with pytest.raises(SystemExit, match="not a model file written by train.py export"):
        train.read_model(os.path.join(out, "log.jsonl"))


def torchrun(nproc, args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_data_parallel_two_ranks_equal_one_rank(corpus, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    torchrun(1, run_args(corpus, one, max_steps=4, batch_size=4))
    torchrun(2, run_args(corpus, two, max_steps=4, batch_size=2))
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)


def test_batch_tokens_must_divide_into_micro_batches(corpus, tmp_path):
    with pytest.raises(SystemExit, match="--batch_tokens=250 is not a multiple of .* = 128"):
        train.main(run_args(corpus, str(tmp_path), batch_tokens=250))


# -----------------------------------------------------------------------------
# The IO-aware Triton router (Alg. 1-2): on CUDA, or under TRITON_INTERPRET=1 on the CPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def route_inputs(n_tok, n_heads, dim, n_expert, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n_tok, n_heads, dim, generator=g)
    w = torch.randn(n_heads, dim, n_expert, generator=g) / dim ** 0.5
    b = torch.randn(n_heads, n_expert, generator=g) * 0.3
    return x.to(DEV), w.to(DEV), b.to(DEV)


def assert_same_experts_up_to_ties(idx, x, w, b, k):
    """The selected sets equal fp64 top-k, except where fp64 scores tie to within fp32 rounding."""
    biased = torch.einsum("...hd,hde->...he", x.double(), w.double()) + b.double()
    want = torch.topk(biased, k, dim=-1).values
    got = biased.gather(-1, idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * biased.abs().max().item())
    assert ((idx >= 0) & (idx < w.size(-1))).all()
    assert (idx.sort(-1).values.diff(dim=-1) != 0).all()  # k distinct experts


@pytest.mark.parametrize("k", [1, 3, 8])
def test_triton_router_matches_fp64_in_experts_scores_and_gradients(k):
    x, w, b = route_inputs(37, 2, 32, 100, seed=k)
    x.requires_grad_(True), w.requires_grad_(True)
    scores, idx, _ = kernels.topk_route_triton(x, w, b, k)
    assert_same_experts_up_to_ties(idx, x, w, b, k)
    # scores: the unbiased x W_r at the chosen experts, ordered by biased score
    want = torch.einsum("nhd,hde->nhe", x.double(), w.double()).gather(-1, idx)
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-5)
    biased = want + b.double().expand(37, -1, -1).gather(-1, idx)
    assert (biased.diff(dim=-1) <= 1e-6).all()
    g = torch.randn_like(scores)
    dx, dw = torch.autograd.grad((scores * g).sum(), (x, w))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    s64 = torch.einsum("nhd,hde->nhe", x64, w64).gather(-1, idx)
    dx64, dw64 = torch.autograd.grad((s64 * g.double()).sum(), (x64, w64))
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_sets", [1, 2])
def test_split_router_of_wide_bf16_inputs_is_exact(n_sets):
    # MoE routes at width d (here 300, past the Triton router's 256) on bf16 inputs: the three
    # bf16 parts of W give the fp64 scores of those inputs to fp32 rounding, and dW likewise;
    # dX, in bf16, to bf16 precision. Only W's high part would miss scores by ~2^-9.
    x, w, b = route_inputs(37, n_sets, 300, 50, seed=n_sets)
    x, w = x.bfloat16().requires_grad_(), w.requires_grad_()
    scores, idx = kernels.topk_route_split(x, w, b, 4)
    assert_same_experts_up_to_ties(idx, x, w, b, 4)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    s64 = torch.einsum("nhd,hde->nhe", x64, w64).gather(-1, idx)
    torch.testing.assert_close(scores.double(), s64, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(scores)
    dx, dw = torch.autograd.grad((scores * g).sum(), (x, w))
    dx64, dw64 = torch.autograd.grad((s64 * g.double()).sum(), (x64, w64))
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-6, atol=1e-6)
    assert dx.dtype == torch.bfloat16
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-2, atol=1e-3)


def router_weight_gradient_against_fp64(scores, idx, x, w):
    """The router weights' gradient for random score gradients, and the fp64 one at the same picks."""
    g = torch.randn_like(scores)
    dw, = torch.autograd.grad((scores * g).sum(), w)
    w64 = w.detach().double().requires_grad_()
    dw64, = torch.autograd.grad((torch.einsum("nhd,hde->nhe", x.double(), w64).gather(-1, idx) * g.double()).sum(),
                                w64)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5)
    return dw


def test_triton_router_gradient_of_a_hot_expert_matches_fp64_in_chunks(monkeypatch):
    # every token of both heads picks experts 0..2: 300 pairs each, in chunks of 64 (5 each)
    monkeypatch.setattr(kernels, "CHUNK_MIN", 1)
    monkeypatch.setattr(kernels, "CHUNK_MEANS", 1)
    x, w, b = route_inputs(300, 2, 32, 20, seed=5)
    b[:, :3] += 100.0
    w.requires_grad_(True)
    scores, idx, _ = kernels.topk_route_triton(x, w, b, 3)
    assert (idx.sort(-1).values == torch.arange(3, device=DEV)).all()
    dw = router_weight_gradient_against_fp64(scores, idx, x, w)
    assert (dw[..., 3:] == 0).all()  # experts no token chose


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_triton_router_at_every_head_width(dim):
    x, w, b = route_inputs(37, 2, dim, 100, seed=dim)
    w.requires_grad_(True)
    scores, idx, _ = kernels.topk_route_triton(x, w, b, 4)
    assert_same_experts_up_to_ties(idx, x, w, b, 4)
    want = torch.einsum("nhd,hde->nhe", x.double(), w.double()).gather(-1, idx)
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-5)
    router_weight_gradient_against_fp64(scores, idx, x, w)


@pytest.mark.parametrize("dim,k", [(64, 4), (128, 8), (256, 2)])
def test_triton_router_takes_batched_non_contiguous_bf16_inputs(dim, k):
    # on a GPU, bf16 sub-tokens score through the three bf16 parts of W (split_bf16)
    x, w, b = route_inputs(21, 4, dim, 70, seed=dim, batch=(2,))
    wide = torch.cat([x, x], dim=-1).to(torch.bfloat16)   # (2, 21, 4, 2 dim)
    x = wide[..., dim:]                                    # a non-contiguous view
    assert not x.is_contiguous()
    scores, idx, _ = kernels.topk_route_triton(x, w, b, k)
    assert scores.shape == idx.shape == (2, 21, 4, k)
    assert_same_experts_up_to_ties(idx, x.float(), w, b, k)
    want = torch.einsum("...hd,hde->...he", x.double(), w.double()).gather(-1, idx)
    torch.testing.assert_close(scores.double(), want, rtol=1e-6, atol=1e-6)


def test_split_bf16_parts_sum_exactly_to_the_fp32_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 50, 70, generator=g) * 10.0 ** torch.randint(-8, 8, (3, 50, 70), generator=g)
    parts = kernels.split_bf16(w)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, *w.shape)
    assert torch.equal(parts.double().sum(0), w.double())
    assert (parts[1].double().abs() <= parts[0].double().abs() * 2 ** -8).all()  # each part below the last's rounding


def test_triton_router_never_selects_padding_experts():
    # every real score is negative, so padding columns (score 0) would win if not masked
    x, w, b = route_inputs(9, 1, 32, 70, seed=2)
    x, w = x.abs(), -w.abs()
    _, idx, _ = kernels.topk_route_triton(x, w, b * 0, 8)
    assert (idx < 70).all()
    assert_same_experts_up_to_ties(idx, x, w, b * 0, 8)


def test_triton_router_picks_experts_in_range_for_a_nan_sub_token():
    # a NaN sub-token's scores are all NaN: its picks are meaningless but must index real
    # experts (the recomputed scores and the backward gather W^T by them); the others are untouched
    x, w, b = route_inputs(9, 2, 32, 70, seed=4)
    bad = x.clone()
    bad[3, 1] = float("nan")
    scores, idx, _ = kernels.topk_route_triton(bad, w, b, 4)
    assert ((idx >= 0) & (idx < 70)).all()
    want_scores, want_idx, _ = kernels.topk_route_triton(x, w, b, 4)
    keep = torch.ones(9, 2, dtype=torch.bool, device=DEV)
    keep[3, 1] = False
    assert torch.equal(idx[keep], want_idx[keep]) and torch.equal(scores[keep], want_scores[keep])


def test_triton_router_breaks_exact_ties_toward_the_lower_index():
    # small integers make every score exact in fp32, whatever the order of summation
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (5, 1, 32), generator=g).float()
    w = torch.randint(-3, 4, (1, 32, 90), generator=g).float()
    w[..., 40] += 100.0
    for e in (77, 12, 60):  # four equal, dominant experts
        w[..., e] = w[..., 40]
    _, idx, _ = kernels.topk_route_triton(x.to(DEV), w.to(DEV), torch.zeros(1, 90, device=DEV), 3)
    assert (idx == torch.tensor([12, 40, 60], device=DEV)).all()


def test_router_rejects_bad_shapes_and_k():
    x, w, b = route_inputs(4, 2, 32, 10)
    with pytest.raises(ValueError, match="k=11 must lie in 1..N_e=10"):
        kernels.topk_route(x, w, b, 11)
    with pytest.raises(ValueError, match=r"expected \(..., 2, 32\)"):
        kernels.topk_route(x[..., :16], w, b, 2)
    with pytest.raises(ValueError, match=r"bias has shape \(10,\)"):
        kernels.topk_route(x, w, b[0], 2)


# -----------------------------------------------------------------------------
# Expert computation as block-sparse attention (Sec. 3.4)

def expert_inputs(N, n_heads, dim, n_expert, expert_dim, k, routing="uniform", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, n_heads, dim, generator=g)
    if routing == "uniform":
        idx = torch.rand(N * n_heads, n_expert, generator=g).argsort(-1)[:, :k].view(N, n_heads, k)
    elif routing == "skewed":  # most pairs on expert 1
        idx = (torch.arange(k).view(1, 1, k) + (torch.rand(N, n_heads, 1, generator=g) < 0.1) * 2) % n_expert
        idx = (idx + 1) % n_expert
    else:  # every token's first choice is expert 0
        idx = torch.arange(k).expand(N, n_heads, k).contiguous()
    gates = torch.softmax(torch.randn(N, n_heads, k, generator=g), -1)
    w1 = torch.randn(n_heads, n_expert, expert_dim, dim, generator=g) * 0.2
    w2 = torch.randn(n_heads, n_expert, expert_dim, dim, generator=g) * 0.2
    return [t.to(DEV) for t in (x, idx, gates, w1, w2)]


def expert_oracle(x, idx, gates, w1, w2):
    """Eq. 1 one (token, head) at a time in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    x, idx, gates, w1, w2 = (t.cpu() for t in (x, idx, gates, w1, w2))
    for n in range(x.size(0)):
        for h in range(x.size(1)):
            for j in range(idx.size(2)):
                e = idx[n, h, j]
                out[n, h] += gates[n, h, j].double() * (gelu64(w1[h, e].double() @ x[n, h].double())
                                                        @ w2[h, e].double())
    return out


@triton.jit
def _gelu_probe(X, H, Slope, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h, slope = kernels._gelu_and_slope(tl.load(X + i, mask=i < n, other=0.0))
    tl.store(H + i, h, mask=i < n)
    tl.store(Slope + i, slope, mask=i < n)


def test_fused_kernels_gelu_and_its_slope_match_fp64():
    # the fused experts' own normal CDF (a fit of log2 erfc): Phi within 2e-7 everywhere, and
    # relatively within 1e-5 down to x = -5.6, where 1 + erf(x / sqrt 2) in fp32 loses every digit
    x = torch.cat([torch.linspace(-12, 12, 40_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])])
    h, slope = torch.empty_like(x, device=DEV), torch.empty_like(x, device=DEV)
    _gelu_probe[(triton.cdiv(x.numel(), 1024),)](x.to(DEV), h, slope, x.numel(), BLOCK=1024)
    x64 = x.double()
    phi = torch.special.ndtr(x64)
    got_phi = torch.where(x64 == 0, 0.5, h.cpu().double() / x64)
    assert (got_phi - phi).abs().max() < 2e-7
    tail = (x64 < 0) & (x64 > -5.6)
    assert ((got_phi - phi)[tail] / phi[tail]).abs().max() < 1e-5
    torch.testing.assert_close(h.cpu().double(), x64 * phi, rtol=0, atol=2e-6)
    torch.testing.assert_close(slope.cpu().double(), phi + x64 * torch.exp(-x64 ** 2 / 2) / math.sqrt(2 * math.pi),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("routing,expert_dim", [("uniform", 48), ("skewed", 48), ("one_expert", 48),
                                                ("uniform", 1)])
def test_flex_expert_forward_matches_fp64_oracle(routing, expert_dim):
    # d_e = 1: every row of one of the two sign passes has only -inf scores
    args = expert_inputs(37, 2, 16, 5, expert_dim, 3, routing)
    want = expert_oracle(*args)
    got = kernels.expert_ffn_flex(*args)
    assert torch.linalg.norm(got.double().cpu() - want) / torch.linalg.norm(want) < 1e-5
    torch.testing.assert_close(kernels.expert_ffn_reference(*args).double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing,n_expert,expert_dim,dim,chunked,k", [
    ("uniform", 40, 48, 16, False, 3), ("one_expert", 5, 70, 16, False, 3), ("skewed", 5, 40, 136, False, 3),
    ("one_expert", 5, 70, 16, True, 3), ("skewed", 6, 40, 16, True, 3), ("uniform", 6, 40, 16, False, 1),
    ("uniform", 3, 70, 16, False, 3)])
def test_fused_triton_experts_match_fp64_in_output_and_gradients(routing, n_expert, expert_dim, dim, chunked, k,
                                                                  monkeypatch):
    # 37 x 3 pairs: partial tiles, of 16 pairs over 40 experts (dW in chunks of 32 hidden units),
    # of 32 over 5, of 64 over 3 (forward and dX in chunks of 16 hidden units); d_e = 70: full
    # and partial chunks of hidden units; k = 1, as EP's receivers
    # call it: no sum over k;
    # d_h = 136: rows wider than 128 take tiles of their own, padded to 256 columns. On a GPU
    # those rows are tested in bf16: in fp32 (544 bytes) expert_path sends them to flex; the
    # CPU interpreter cannot dot bf16 (triton#11584), so there they stay fp32.
    # chunked: the weight gradients of hot experts in chunks of one tile, summed in order
    if chunked:
        monkeypatch.setattr(kernels, "CHUNK_MIN", 1)
        monkeypatch.setattr(kernels, "CHUNK_MEANS", 1)
    wide_bf16 = DEV == "cuda" and dim * 4 > kernels.FUSED_MAX_ROW_BYTES
    dtype, tol = (torch.bfloat16, 2e-2) if wide_bf16 else (torch.float32, 1e-5)
    args = expert_inputs(37, 2, dim, n_expert, expert_dim, k, routing)
    want_in = [t.double().requires_grad_() if t.is_floating_point() else t for t in args]
    got_in = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in args]
    want, got = kernels.expert_ffn_reference(*want_in), kernels.expert_ffn_fused(*got_in)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g.to(dtype))
    for a, b in [(got, want)] + [(a.grad, b.grad) for a, b in zip(got_in, want_in) if b.grad is not None]:
        assert torch.linalg.norm(a.double() - b) / torch.linalg.norm(b) < tol
    with torch.no_grad():  # no backward to come: the forward keeps nothing, same output
        assert torch.equal(kernels.expert_ffn_fused(*got_in), got)


def test_fused_backward_fills_no_gradient_for_what_the_forward_keeps():
    # kept (the pre-activations and gated hidden units, 2 x P x d_e, the largest tensor of the
    # layer) is an output of the op that no one differentiates; autograd would fill a zero
    # gradient for it in every backward
    from torch.utils._python_dispatch import TorchDispatchMode
    x, idx, gates, w1, w2 = [t.requires_grad_() if t.is_floating_point() else t
                             for t in expert_inputs(37, 2, 16, 5, 24, 3)]
    y = kernels.expert_ffn_fused(x, idx, gates, w1, w2)
    filled = []

    class Fills(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zero_, torch.ops.aten.fill_):
                filled.append(tuple(out.shape))
            return out

    with Fills():
        y.backward(torch.randn_like(y))
    assert (2, 37 * 2 * 3, 24) not in filled and x.grad is not None


def test_compiled_graph_caches_are_keyed_on_the_kernels_source(tmp_path):
    # compiled graphs call the custom ops of kernels.py opaquely, so a cache entry made before the
    # file changed must not be served after it: the caches' key tag follows the file, the same in
    # another process (the caches still hit) and another once one byte of the file changes
    shutil.copy(os.path.join(HERE, "kernels.py"), tmp_path)
    with open(tmp_path / "kernels.py", "a") as f:
        f.write("\n")

    def tag(directory):
        code = "import kernels, torch; print(torch.compiler.config.cache_key_tag)"
        return subprocess.run([sys.executable, "-c", code], cwd=directory, capture_output=True, text=True,
                              check=True).stdout.strip()
    assert tag(HERE) == torch.compiler.config.cache_key_tag.strip() != tag(tmp_path)


@pytest.mark.parametrize("n_heads,n_expert", [(3, 5), (3, 11_000)])  # int16 keys; int32 past 32,766 groups
def test_cluster_by_expert_sorts_the_pairs_stably_by_head_then_expert(n_heads, n_expert):
    # oracle: Python's stable sort of the flat (token, head, slot) pairs by (head, expert), and
    # each group's first pair counted from the group sizes
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n_expert, (41, n_heads, 3), generator=g)
    idx[:20] = n_expert - 1  # ties, and the last group's key, the largest
    pairs = [(p // 3 % n_heads, e) for p, e in enumerate(idx.flatten().tolist())]
    want = sorted(range(len(pairs)), key=lambda p: pairs[p])
    sizes = torch.bincount(torch.tensor([h * n_expert + e for h, e in pairs]), minlength=n_heads * n_expert)
    order, starts = kernels.cluster_by_expert(idx.to(DEV), n_expert)
    assert order.tolist() == want
    assert starts.tolist() == [0] + sizes.cumsum(0).tolist()


@pytest.mark.parametrize("k", [1, 3])
def test_pair_rows_sums_each_rows_copies_gradients_as_autograds_gather(k):
    # each pair's sub-token in clustered order (skewed: most pairs on one expert, some experts on
    # none); each row's gradient is the sum of its k copies': autograd's own gather is the oracle
    x, idx, *_ = expert_inputs(37, 2, 16, 5, 8, k, "skewed")
    order, _ = kernels.cluster_by_expert(idx, 5)
    x = x.reshape(-1, 16).double()
    got_in, want_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = kernels.pair_rows(got_in, order, k), want_in[order // k]
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_in.grad, want_in.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunked", [False, True])
def test_fused_experts_add_each_micro_batchs_weight_gradients_to_grad(chunked, monkeypatch):
    # gradient-accumulation fusion: the dW kernels store the first micro-batch's gradient in
    # .grad and add the next ones, in place and through the chunks' partial sums alike, as
    # autograd accumulates the fp64 reference's; an expert no pair picks keeps a finite zero
    if chunked:
        monkeypatch.setattr(kernels, "CHUNK_MIN", 1)
        monkeypatch.setattr(kernels, "CHUNK_MEANS", 1)
    x, idx, gates, w1, w2 = expert_inputs(37, 2, 16, 6, 40, 3, "skewed")
    got = [w.clone().requires_grad_() for w in (w1, w2)]
    want = [w.double().requires_grad_() for w in (w1, w2)]
    for seed in (1, 2):
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(DEV)
        kernels.expert_ffn_fused(x, idx, gates, *got).backward(g)
        kernels.expert_ffn_reference(x.double(), idx, gates.double(), *want).backward(g.double())
    for a, b in zip(got, want):
        assert a.grad.dtype == torch.float32
        assert torch.linalg.norm(a.grad.double() - b.grad) / torch.linalg.norm(b.grad) < 1e-5


@pytest.mark.parametrize("routing", ["uniform", "hot"])
def test_fused_experts_over_slices_of_the_hidden_units_sum_to_the_whole(routing):
    # HP x EP: each of the E ranks runs every pair on its slice of every expert's hidden
    # units (Eq. 1 sums over them): the slices' outputs and input gradients add up to the
    # whole's, and their weight gradients are the whole's, sliced (fp64 oracle; 40 = 13 + 27)
    x, idx, gates, w1, w2 = expert_inputs(37, 2, 16, 6, 40, 3, routing)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    want_in = [t.double().requires_grad_() for t in (x, gates, w1, w2)]
    want = kernels.expert_ffn_reference(want_in[0], idx, *want_in[1:])
    want.backward(g.double())
    ins = [t.clone().requires_grad_() for t in (x, gates)]
    out, weights = 0, []
    for part in (slice(0, 13), slice(13, 40)):
        w = [t[:, :, part].clone().requires_grad_() for t in (w1, w2)]
        out = out + kernels.expert_ffn_fused(ins[0], idx, ins[1], *w)
        weights.append(w)
    out.backward(g)
    assert torch.linalg.norm(out.double() - want) / torch.linalg.norm(want) < 1e-5
    for a, b in zip(ins, want_in):
        assert torch.linalg.norm(a.grad.double() - b.grad) / torch.linalg.norm(b.grad) < 1e-5
    for i, b in enumerate(want_in[2:]):
        got = torch.cat([w[i].grad for w in weights], 2).double()
        assert torch.linalg.norm(got - b.grad) / torch.linalg.norm(b.grad) < 1e-5


def take_triton_paths(set_attr=setattr):
    """The router and the experts take their CUDA paths (Triton, interpreted on the CPU) where
    the plain twins would run, whose data-dependent splits break a compiled graph."""
    set_attr(kernels, "topk_route", kernels.topk_route_triton)
    set_attr(kernels, "expert_ffn_reference", kernels.expert_ffn_fused)


def test_routed_block_compiles_whole_around_its_custom_ops(monkeypatch):
    # The Triton router and the fused experts are custom ops, so torch.compile traces the whole
    # routed block (fullgraph=True fails at any graph break). Compiled, it matches the eager block
    # on the fp64 plain twins in output, load counts and every gradient, the experts' added to
    # .grad by the ops over two micro-batches. On the CPU its CUDA paths replace the twins.
    torch.manual_seed(0)
    oracle = RoutedExperts(2, 16, 6, 40, 3).double()
    block = RoutedExperts(2, 16, 6, 40, 3).to(DEV)
    block.load_state_dict(oracle.state_dict())
    x = torch.randn(2, 37, 2, 16, dtype=torch.float64)
    ins = [x.clone().requires_grad_(), x.float().to(DEV).requires_grad_()]
    want = [oracle(ins[0][micro]) for micro in range(2)]
    if DEV == "cpu":
        take_triton_paths(monkeypatch.setattr)
    run = torch.compile(block, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")
    for micro in range(2):
        got = run(ins[1][micro])
        torch.testing.assert_close(got.double().cpu(), want[micro], rtol=1e-5, atol=1e-6)
        for out in (got, want[micro]):
            (out * torch.arange(16, device=out.device)).sum().backward()
    assert torch.equal(block.load.cpu(), oracle.load) and oracle.load.sum() == 2 * 37 * 2 * 3
    for a, b in [(ins[1], ins[0])] + list(zip(block.parameters(), oracle.parameters())):
        # fp32 sums of terms up to the gradient's largest: their error is that largest's, 1e-6
        # of it where the weights' gradients reach 8 (on an H200, 1.3e-6 at an element of 7e-3)
        scale = max(1.0, b.grad.abs().max().item())
        torch.testing.assert_close(a.grad.double().cpu(), b.grad, rtol=1e-5, atol=1e-6 * scale)
    # the ops add the weights' gradients to the .grad of the tensors they were given: one without
    # requires_grad (an alias, as a compiler could pass) is refused, where its .grad would be lost
    with pytest.raises(RuntimeError, match="without requires_grad"):
        kernels.gradient_buffers((block.w1.detach(),))


@pytest.mark.parametrize("paths", ["twins", "triton"])
def test_a_routed_layer_sorts_its_pairs_once_for_the_router_the_experts_and_the_load(paths, monkeypatch):
    # topk_route returns its picks' clustering (the Triton router's op makes it for its own
    # weight gradient), and the experts and the load counts take it: one sort a layer, forward
    # and backward, where the router's backward, the experts and the counts each did their own
    # (the twins on the CPU in fp64; the CUDA paths on the GPU, or interpreted on the CPU)
    device, dtype = ("cpu", torch.float64) if paths == "twins" else (DEV, torch.float32)
    if paths == "triton" and DEV == "cpu":
        take_triton_paths(monkeypatch.setattr)
    sorts, sort = [], kernels.cluster_by_expert
    monkeypatch.setattr(kernels, "cluster_by_expert", lambda idx, n: sorts.append(tuple(idx.shape)) or sort(idx, n))
    monkeypatch.setattr(kernels, "glue", lambda fn, like: fn)  # every call seen, none compiled
    block = RoutedExperts(2, 16, 6, 40, 3).to(device, dtype)
    x = torch.randn(37, 2, 16, device=device, dtype=dtype, requires_grad=True)
    block(x).sum().backward()
    assert sorts == [(37, 2, 3)]
    assert block.load.sum() == 37 * 2 * 3 and block.router.grad.abs().sum() > 0


def test_expert_ffn_rejects_inputs_that_do_not_fit_its_weights():
    x, idx, gates, w1, w2 = expert_inputs(5, 2, 16, 6, 8, 3)
    with pytest.raises(ValueError, match=r"w2 has shape \(2, 6, 8, 15\), expected w1's"):
        kernels.expert_ffn(x, idx, gates, w1, w2[..., 1:])
    with pytest.raises(ValueError, match=r"x has shape \(5, 2, 15\), expected \(N, 2, 16\)"):
        kernels.expert_ffn(x[..., 1:], idx, gates, w1, w2)
    with pytest.raises(ValueError, match=r"idx \(5, 2, 3\) and gates \(5, 2, 2\) must both be"):
        kernels.expert_ffn(x, idx, gates[..., 1:], w1, w2)
    with pytest.raises(ValueError, match=r"order \(12,\) and starts \(13,\) does not fit idx \(5, 2, 3\) and 6 "
                                         r"experts; pass cluster_by_expert\(idx, 6\)"):
        kernels.expert_ffn(x, idx, gates, w1, w2, clustering=kernels.cluster_by_expert(idx[:2], 6))


@pytest.mark.parametrize("rows,chunk,dtype", [(37, 8, torch.float32), (16, 16, torch.float32),
                                             (5, 4096, torch.float32), (37, 8, torch.bfloat16)])
def test_chunked_linear_cross_entropy_matches_fp64(rows, chunk, dtype, monkeypatch):
    # chunks of 8 rows leave a partial last one; the gradients are formed in the forward. In
    # bf16 on CUDA, dW is added to its fp32 buffer by the GEMM (add_matmul)
    monkeypatch.setattr("model.CE_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 24, generator=g), torch.randn(101, 24, generator=g)
    targets = torch.randint(0, 101, (rows,), generator=g)
    got_in = [x.to(DEV, dtype).requires_grad_(), w.to(DEV).requires_grad_()]  # the weight: fp32 master
    want_in = [t.detach().to(dtype).double().requires_grad_() for t in (x, w)]
    got = linear_cross_entropy(*got_in, targets.to(DEV))
    want = F.cross_entropy(want_in[0] @ want_in[1].t(), targets)
    (got * 3).backward()  # the incoming gradient scales the stored ones
    (want * 3).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(got.item() - want.item()) < tol * abs(want.item())
    for a, b in zip(got_in, want_in):
        assert a.grad.dtype == a.dtype
        assert torch.linalg.norm(a.grad.double().cpu() - b.grad) / torch.linalg.norm(b.grad) < tol
    with torch.no_grad():  # evaluation: the loss alone
        assert linear_cross_entropy(*got_in, targets.to(DEV)).item() == got.item()


@pytest.mark.parametrize("dtype,transposed", [(torch.float32, False), (torch.bfloat16, False),
                                               (torch.bfloat16, True)])
def test_triton_cross_entropy_matches_fp64_and_writes_its_gradient_over_the_logits(dtype, transposed, monkeypatch):
    # 1,000 classes in blocks of 256: the online softmax crosses blocks and ends on a partial one;
    # transposed: rows whose classes are not adjacent in memory
    monkeypatch.setitem(kernels.CROSS_ENTROPY, "BLOCK", 256)
    g = torch.Generator().manual_seed(0)
    z = (4 * torch.randn(7, 1000, generator=g)).to(dtype)
    targets = torch.randint(0, 1000, (7,), generator=g)
    want_z = z.double().requires_grad_()
    want = F.cross_entropy(want_z, targets, reduction="none")
    want.sum().backward()
    logits = (z.t().contiguous().t() if transposed else z.clone()).to(DEV)
    loss, grad = kernels.softmax_cross_entropy_triton(logits, targets.to(DEV), 0.25)
    assert grad.data_ptr() == logits.data_ptr() and grad.dtype == dtype and grad.stride() == logits.stride()
    assert torch.allclose(loss.double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)  # fp32 math on the inputs
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -7  # within a step of the logits' dtype
    assert torch.allclose(grad.double().cpu(), 0.25 * want_z.grad, rtol=rtol, atol=1e-7)


def test_a_weight_cast_once_takes_each_micro_batchs_gradient_in_its_own_dtype():
    # two micro-batches through the same cached bf16 copy, viewed as EP views it: the fp32 .grad
    # holds what autograd's cast-and-accumulate gives
    w = torch.randn(2, 3, 4, requires_grad=True)
    ref = w.detach().clone().requires_grad_()
    for seed in (1, 2):
        c = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(seed))
        (kernels.cast_once(w.reshape(1, 6, 4), torch.bfloat16).float() * c).sum().backward()
        (ref.reshape(1, 6, 4).bfloat16().float() * c).sum().backward()
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, ref.grad)


@pytest.mark.parametrize("kind", ["bf16 copy", "router parts"])
def test_weights_are_cast_once_until_they_change(kind):
    # a weight's compute copy, or the router's three bf16 parts, is made once and kept until
    # an optimizer step changes the weight
    cached, fresh = {"bf16 copy": (lambda w: kernels.compute_copy(w, torch.bfloat16), torch.Tensor.bfloat16),
                     "router parts": (kernels.router_parts, kernels.split_bf16)}[kind]
    w = torch.randn(3, 5, device=DEV, requires_grad=True)
    first = cached(w)
    assert cached(w) is first and torch.equal(first, fresh(w.detach()))
    w.grad = torch.ones_like(w)
    torch.optim.AdamW([w], lr=0.1, fused=True).step()  # fused: one kernel updates w in place
    again = cached(w)
    assert again is not first and torch.equal(again, fresh(w.detach()))
    with torch.no_grad():
        w.mul_(2)  # an in-place change, as a checkpoint load makes
    assert torch.equal(cached(w), fresh(w.detach()))
    assert kernels.compute_copy(w, torch.float32) is not again  # the same dtype: w itself, no copy


@pytest.mark.parametrize("counts,chunk", [([0, 5, 40, 0, 3], 8), ([100], 16), ([0, 0, 0], 4), ([1] * 7, 2),
                                          ([17, 0, 16, 33], 16), ([3] * 6, 2)])
def test_chunk_table_covers_every_pair_once_in_bounded_chunks(counts, chunk):
    starts = torch.tensor([0] + counts).cumsum(0).to(DEV)
    n_pairs, n_groups = sum(counts), len(counts)
    c = kernels.chunk_table(starts, n_pairs, chunk)
    group, start, end, slot = (t.cpu().tolist() for t in (c.group, c.start, c.end, c.slot))
    assert len(group) == -(-n_pairs // chunk) + n_groups  # a static count: no host sync
    real = [t for t in range(len(group)) if group[t] >= 0]
    assert all(start[t] == end[t] for t in range(len(group)) if group[t] < 0)  # padding is empty
    lengths = [end[t] - start[t] for t in range(len(group))]
    assert lengths == sorted(lengths, reverse=True)  # launched longest first
    used = []
    for g, count in enumerate(counts):
        mine = [t for t in real if group[t] == g]
        assert len(mine) == max(1, -(-count // chunk))  # an expert without pairs still writes its zeros
        assert [start[t] for t in mine] == sorted(start[t] for t in mine)
        pairs = [p for t in mine for p in range(start[t], end[t])]
        assert pairs == list(range(int(starts[g]), int(starts[g + 1])))  # in order, each pair once
        assert all(end[t] - start[t] <= chunk for t in mine)
        if len(mine) == 1:
            assert slot[mine[0]] == -1 and c.slots[g] == 0
        else:
            assert [slot[t] for t in mine] == list(range(int(c.first_slot[g]), int(c.first_slot[g]) + len(mine)))
            assert c.slots[g] == len(mine)
            used += [slot[t] for t in mine]
    rows = kernels.partial_rows(n_pairs, chunk)
    assert len(set(used)) == len(used) and all(0 <= s < rows for s in used)
    # _sum_chunks_kernel's programs: every group of several chunks, once, then others (a stable partition)
    several = [g for g in range(n_groups) if c.slots[g] > 0]
    assert c.split.cpu().tolist() == (several + [g for g in range(n_groups) if c.slots[g] == 0])[:rows // 2 + 1]
    assert len(several) <= rows // 2


@pytest.mark.parametrize("pairs,dim,tiles,hidden,dw_tiles", [
    (2.0, 128, 16, (32, 32), (16, 32)), (32.0, 128, 32, (32, 32), (32, 128)),
    (341.3, 128, 64, (32, 16), (64, 64)), (341.3, 256, 64, (32, 32), (64, 64))])
def test_fused_tiles_follow_the_pairs_per_expert_and_the_row_width(pairs, dim, tiles, hidden, dw_tiles):
    config, dx_config, dw_config = kernels.fused_tiles(dim, pairs)
    assert config["BLOCK_M"] == dx_config["BLOCK_M"] == tiles  # one tile table for the forward and dX
    assert (config["BLOCK_H"], dx_config["BLOCK_H"]) == hidden
    assert (dw_config["BLOCK_M"], dw_config["BLOCK_H"]) == dw_tiles


def test_expert_block_mask_covers_exactly_each_rows_expert():
    # rows sorted by expert; d_e = 48 is not a multiple of the 128-wide blocks
    q_expert = torch.tensor([[0] * 100 + [2] * 200 + [3] * 10, [1] * 310]).to(DEV)
    mask = kernels.expert_block_mask(q_expert, 48, 5 * 48)
    dense = mask.to_dense()[0].cpu()                        # (N_h, q blocks, kv blocks)
    for h in range(2):
        for qb in range(3):
            experts = q_expert[h, qb * 128:(qb + 1) * 128].unique().cpu()
            need = {b for e in experts.tolist() for b in range(e * 48 // 128, ((e + 1) * 48 - 1) // 128 + 1)}
            assert set(dense[h, qb].nonzero().flatten().tolist()) == need


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._grouped_mm needs CUDA")
def test_grouped_gemm_experts_for_wide_sub_tokens_match_fp64_on_gpu():
    # d_h = 320 is beyond FlexAttention's head dimensions: MoE at width d takes this path
    x, idx, gates, w1, w2 = expert_inputs(300, 2, 320, 8, 64, 3, routing="skewed", seed=2)
    x, w1, w2 = (t.detach().bfloat16().requires_grad_() for t in (x, w1, w2))
    out = kernels.expert_ffn(x, idx, gates.bfloat16(), w1, w2)
    want = kernels.expert_ffn_reference(x.double(), idx, gates.double(), w1.double(), w2.double())
    assert torch.linalg.norm(out.double() - want) / torch.linalg.norm(want) < 2e-2
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (x, w1, w2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
@pytest.mark.parametrize("shape", [(37, 2, 16, 5, 48, 3), (37, 2, 16, 5, 1, 3), (2048, 8, 128, 64, 256, 4)])
def test_flex_expert_gradients_match_fp64_on_gpu(shape):
    args = expert_inputs(*shape, routing="uniform", seed=1)
    x, idx, gates, w1, w2 = args
    ins = [t.detach().requires_grad_() for t in (x, gates, w1, w2)]
    out = kernels.expert_ffn_flex(ins[0], idx, ins[1], ins[2], ins[3])
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), ins)
    ref = [t.detach().double().requires_grad_() for t in (x, gates, w1, w2)]
    out64 = kernels.expert_ffn_reference(ref[0], idx, ref[1], ref[2], ref[3])
    grads64 = torch.autograd.grad((out64 * g.double()).sum(), ref)
    assert torch.linalg.norm(out.double() - out64) / torch.linalg.norm(out64) < 1e-3
    for got, want in zip(grads, grads64):
        assert torch.linalg.norm(got.double() - want) / torch.linalg.norm(want) < 1e-3


# -----------------------------------------------------------------------------
# Expert Parallel and Head Parallel (gloo ranks spawned in-test) equal one process

PAR = dict(SMALL, moe_heads=4, n_expert=8, topk=3)


def parallel_worker(rank, world, mode, size, skew, store, backend="gloo", ffn=None, ep_size=1, overlap=False,
                    compiled=False):
    import torch.distributed as dist
    from contextlib import nullcontext
    torch.set_num_threads(1)
    gpu = backend == "nccl"
    device = f"cuda:{rank}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    autocast = torch.autocast("cuda", torch.bfloat16) if gpu else nullcontext()
    rtol = 3e-2 if gpu else 1e-5  # bf16 under NCCL, fp32 under gloo
    torch.manual_seed(0)
    config = small_config(**{**PAR, "ffn": ffn or ("mh_latent_moe" if mode == "hp" else "moe")})
    model = GPT(config).to(device)
    if skew:  # every token picks experts 1, 2, 3, all owned by EP rank 0; other ranks get nothing
        for m in model.routed_experts():
            m.route_bias[:, 1:4] = torch.tensor([0.6, 0.5, 0.4])
    x = torch.randint(0, 50257, (2 * world, config.block_size + 1), generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    reference = GPT(config).to(device)
    reference.load_state_dict(model.state_dict())
    with autocast:
        ref_loss = reference(x[:, :-1], x[:, 1:])[1]
    ref_loss.backward()
    layout = parallel.make_layout(mode, size, rank, world, ep_size)
    parallel.shard_model(model, layout, overlap)
    if compiled:  # each HP block compiled whole (a graph break fails), on the Triton paths (interpreted on the CPU)
        if not gpu:
            take_triton_paths()
        for m in model.modules():
            if isinstance(m, MultiHeadLatentMoE):
                m.compile(fullgraph=True, backend="inductor" if gpu else "aot_eager")
    mine = x[2 * rank:2 * rank + 2]
    with autocast:
        loss = model(mine[:, :-1], mine[:, 1:])[1]
    loss.backward()
    parallel.average_gradients(model)
    torch.testing.assert_close(parallel.mean_over_ranks(loss.detach()), ref_loss.detach(), rtol=rtol, atol=0)
    ref_grads = dict(reference.named_parameters())
    # the norm that clips: of the sharded tensors alone, since they hold little of the whole's
    sharded = [name for name, _ in model.named_parameters() if name in model.shard_dims]
    torch.testing.assert_close(parallel.grad_norm(p for name, p in model.named_parameters() if name in sharded),
                               torch.nn.utils.get_total_norm([ref_grads[name].grad for name in sharded]),
                               rtol=rtol, atol=0)
    for name, p in model.named_parameters():
        want = ref_grads[name].grad
        dims = model.shard_dims.get(name)
        if dims is not None:
            want = parallel.take_shard(want, dims, layout)
        err = (torch.linalg.norm(p.grad - want) / torch.linalg.norm(want).clamp_min(1e-30)).item()
        assert err < rtol, (name, err)
    for m in model.modules():
        hp, ep = getattr(m, "head_parallel", None), getattr(m, "expert_parallel", None)
        if hp is not None:  # static, equal and routing-independent: N rows (of a half: N / 2) to each peer
            assert hp.splits == [2 * config.block_size // (2 if overlap else 1)] * layout.heads
        if isinstance(ep, parallel.GatheredExpertParallel):  # HP x EP: every row to each of the E, skewed or not
            rows = 2 * config.block_size * layout.heads // (2 if overlap else 1)
            assert ep.splits == [rows] * layout.experts, ep.splits
        elif ep is not None and skew:  # EP's traffic follows the routing: some ranks get no pair
            assert min(ep.splits[1]) == 0 or min(ep.splits[0]) < max(ep.splits[0]) / 2, ep.splits
            # a (token, set) row crosses once to a rank holding several of its experts (most hold
            # two or three of experts 1-3), not once per expert; the rows reaching EP are all H
            # head ranks' tokens, by set
            rows = 2 * config.block_size * layout.heads * m.router.size(0) // (2 if overlap else 1)
            assert max(ep.splits[0]) <= rows, (ep.splits, rows)
    dist.destroy_process_group()


@pytest.mark.parametrize("mode,world,skew", [("hp", 4, True), ("ep", 2, False), ("ep", 4, False)])
def test_parallel_loss_and_gradients_equal_one_process(mode, world, skew):
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(parallel_worker, args=(world, mode, world, skew, os.path.join(tmp, "store")),
                                    nprocs=world)


@pytest.mark.parametrize("world,ep_size,skew,overlap", [(2, 1, False, False), (4, 2, True, True)])
def test_head_parallel_blocks_compile_whole_and_equal_one_process(world, ep_size, skew, overlap):
    # HP's exchanges and HP x EP's gathered ones are functional collectives, traced by
    # torch.compile with the router's and the experts' custom ops: each block is one graph
    # (fullgraph=True); HP 2 x EP 2 in halves, skewed
    if torch.cuda.is_available():  # gloo's CPU tensors take Triton only under the interpreter
        pytest.skip("on GPUs the compiled blocks are tested under NCCL")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        torch.multiprocessing.spawn(parallel_worker, args=(world, "hp", world, skew, store, "gloo", None, ep_size,
                                                           overlap, True), nprocs=world)


@pytest.mark.parametrize("ffn", ["moe", "latent_moe", "mh_latent_moe"])
def test_expert_parallel_survives_ranks_that_receive_no_pair(ffn):
    # skewed: every token picks experts 1, 2, 3, owned by ranks 0 and 1; ranks 2 and 3 get nothing
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(parallel_worker, args=(4, "ep", 4, True, os.path.join(tmp, "store"), "gloo", ffn),
                                    nprocs=4)


@pytest.mark.parametrize("mode,world,ep_size,overlap,compiled", [
    ("hp", 2, 1, False, False), ("ep", 2, 1, False, False), ("hp", 2, 1, True, False), ("ep", 2, 1, True, False),
    ("hp", 2, 1, False, True), ("hp", 2, 1, True, True), ("hp", 2, 2, False, False), ("hp", 4, 2, False, False),
    ("hp", 4, 2, True, False), ("hp", 4, 2, True, True)])
def test_parallel_equals_one_process_under_nccl_in_bf16(mode, world, ep_size, overlap, compiled):
    if torch.cuda.device_count() < world:
        pytest.skip(f"NCCL at {world} ranks needs {world} GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        torch.multiprocessing.spawn(parallel_worker, args=(world, mode, world, False, store, "nccl", None, ep_size,
                                                           overlap, compiled), nprocs=world)


@pytest.mark.parametrize("ffn", ["latent_moe", "mh_latent_moe"])
def test_expert_parallel_of_latent_and_multi_head_models_equals_one_process(ffn):
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        torch.multiprocessing.spawn(parallel_worker, args=(2, "ep", 2, False, store, "gloo", ffn), nprocs=2)


@pytest.mark.parametrize("skew", [False, True])
def test_head_parallel_with_data_parallel_replicas_equals_one_process(skew):
    with tempfile.TemporaryDirectory() as tmp:  # W = 4 ranks: P = 2 heads-groups x R = 2 replicas
        store = os.path.join(tmp, "store")
        torch.multiprocessing.spawn(parallel_worker, args=(4, "hp", 2, skew, store), nprocs=4)


@pytest.mark.parametrize("world", [4, 8])
def test_head_parallel_times_expert_parallel_equals_one_process(world):
    # HP 2 x EP 2: heads over 2 ranks, the hidden units of each head's 8 experts over 2; at 8
    # ranks, 2 data-parallel replicas of that. At 4 skewed: every token picks experts 1-3
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        torch.multiprocessing.spawn(parallel_worker, args=(world, "hp", 4, world == 4, store, "gloo", None, 2),
                                    nprocs=world)


@pytest.mark.parametrize("mode", ["hp", "ep"])
def test_overlapped_halves_equal_one_process(mode):
    # each micro-batch's two halves: one's all-to-alls in flight while the other's experts run,
    # forward and backward; P = 2 of 4 ranks, so across data-parallel replicas too, and skewed
    # (under EP the rank of experts 4-7 then receives nothing)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        torch.multiprocessing.spawn(parallel_worker, args=(4, mode, 2, True, store, "gloo", None, 1, True), nprocs=4)


def test_overlap_awaits_each_compiled_exchange_where_its_result_is_used(tmp_path, monkeypatch):
    # inductor places a functional collective's wait right after its start, so a half's
    # exchange could not run beside the other half's compute; wait_where_used (--overlap
    # under HP) sinks each wait to the first use of its result: both exchanges start first
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch._inductor.utils import run_and_get_code
    for key in ("reorder_for_compute_comm_overlap", "reorder_for_compute_comm_overlap_passes"):
        monkeypatch.setattr(parallel.inductor_config, key, getattr(parallel.inductor_config, key))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        def halves(a, b):
            x = funcol.all_to_all_single(a, [4], [4], dist.group.WORLD)
            y = funcol.all_to_all_single(b, [4], [4], dist.group.WORLD)
            return (x.relu() @ a).sum() + (y.relu() @ b).sum()
        parallel.wait_where_used()
        _, (code,) = run_and_get_code(torch.compile(halves), torch.randn(4, 4), torch.randn(4, 4))
        calls = [("start" if "all_to_all_single" in line else "wait") for line in code.splitlines()
                 if "all_to_all_single.default(" in line or "wait_tensor.default(" in line]
        assert calls == ["start", "start", "wait", "wait"], calls
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_an_exchange_is_freed_with_its_graph(tmp_path):
    # a tensor -> grad_fn -> ctx -> exchange -> tensor cycle runs through C++ autograd nodes,
    # which the cyclic GC does not collect: it leaked every micro-batch's exchanged rows
    import gc
    import weakref
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    gc.disable()
    try:
        x = torch.randn(6, 4, requires_grad=True)
        exchange = parallel.Exchange(x * 2, [6], [6], None)
        y = exchange.result()
        (y * 3).sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 6.0))
        alive = weakref.ref(exchange)
        del exchange, y
        assert alive() is None
    finally:
        gc.enable()
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["hp", "ep"])
def test_parallel_training_run_equals_one_rank(corpus, tmp_path, mode):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    kw = dict(max_steps=4, **PAR)
    torchrun(1, run_args(corpus, one, batch_size=4, **kw))
    torchrun(2, run_args(corpus, two, batch_size=2, parallel=mode, **kw))
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)


def test_checkpoints_reshard_from_head_parallel_4_to_2_to_one_process(corpus, tmp_path):
    # HP over 4 ranks runs 6 steps (checkpoints 2, 4, 6); HP over 2 resumes its step 2 and
    # one process that one's step 4: every resumed loss equals the straight run's
    kw = dict(max_steps=6, ckpt_interval=2, keep_last_n=5, **PAR)
    four, two, one = (str(tmp_path / n) for n in ("four", "two", "one"))
    torchrun(4, run_args(corpus, four, batch_size=1, parallel="hp", **kw))
    assert len([f for f in os.listdir(os.path.join(four, "ckpt_00000002")) if f.endswith(".distcp")]) == 4

    def resumable(src, dst, step):  # src's checkpoints up to step, none of its losses
        os.makedirs(dst)
        for s in range(2, step + 1, 2):
            shutil.copytree(os.path.join(src, f"ckpt_{s:08d}"), os.path.join(dst, f"ckpt_{s:08d}"))
    resumable(four, two, 2)
    torchrun(2, run_args(corpus, two, batch_size=2, parallel="hp", resume="auto", **kw))
    resumable(two, one, 4)
    torchrun(1, run_args(corpus, one, batch_size=4, resume="auto", **kw))
    np.testing.assert_allclose(losses(two), losses(four)[2:], rtol=1e-5)
    np.testing.assert_allclose(losses(one), losses(four)[4:], rtol=1e-5)


def test_head_parallel_times_expert_parallel_checkpoint_resumes_on_one_rank_and_on_hp_4(corpus, tmp_path):
    # written by HP 2 x EP 2 (every expert's hidden units split two ways), read back whole by one
    # process and by HP 4 (each head whole on one rank): both continue with the same losses
    kw = dict(max_steps=4, ckpt_interval=2, keep_last_n=5, **PAR)
    both, one, hp4 = (str(tmp_path / n) for n in ("both", "one", "hp4"))
    torchrun(4, run_args(corpus, both, batch_size=1, parallel="hp", ep_size=2, **kw))
    for out, ranks, layout in ((one, 1, {}), (hp4, 4, {"parallel": "hp"})):
        shutil.copytree(os.path.join(both, "ckpt_00000002"), os.path.join(out, "ckpt_00000002"))
        torchrun(ranks, run_args(corpus, out, batch_size=4 // ranks, resume="auto", **layout, **kw))
        np.testing.assert_allclose(losses(out), losses(both)[2:], rtol=1e-5)


def test_checkpoint_from_two_data_parallel_ranks_resumes_on_one(corpus, tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    kw = dict(max_steps=4, ckpt_interval=2, keep_last_n=5)
    torchrun(2, run_args(corpus, two, batch_size=2, **kw))
    os.makedirs(one)
    train.main(run_args(corpus, one, batch_size=4, resume=os.path.join(two, "ckpt_00000002"), **kw))
    np.testing.assert_allclose(losses(one)[-2:], losses(two)[-2:], rtol=1e-5)


@pytest.mark.parametrize("mode,size,world,kw,words", [
    ("hp", 3, 3, {}, ["P=3", "moe_heads=4"]),
    ("ep", 3, 3, {}, ["P=3", "n_expert=8"]),
    ("hp", 2, 2, {"ffn": "moe"}, ["ffn='moe'", "--parallel=ep"]),
    ("ep", 2, 2, {"ffn": "mlp"}, ["ffn='mlp'", "use dp"]),
    ("hp", 3, 4, {}, ["--parallel_size=3", "world size 4"]),
    ("tp", 2, 2, {}, ["--parallel='tp'"]),
    ("ep", 4, 4, {"ep_size": 2}, ["--ep_size=2 applies to --parallel=hp"]),
    ("hp", 4, 4, {"ep_size": 3}, ["--ep_size=3 must divide --parallel_size P=4"]),
    ("hp", 8, 8, {"ep_size": 1}, ["P=8", "8 for the heads", "moe_heads=4"]),
    ("hp", 4, 4, {"ep_size": 4, "expert_dim": 6}, ["--ep_size=4 must divide expert_dim=6"]),
    ("hp", 4, 4, {"ep_size": 2, "n_expert": 2 ** 15 + 1}, ["n_expert=32769", "above 32768"]),
])
def test_bad_parallel_setup_is_named(mode, size, world, kw, words):
    ep_size = kw.pop("ep_size", 1)
    config = small_config(**{**PAR, "ffn": "mh_latent_moe", **kw})
    with pytest.raises(SystemExit) as e:
        parallel.check_layout(mode, size, world, config, ep_size)
    for w in words:
        assert w in str(e.value)


def test_a_configuration_error_under_torchrun_is_printed_once(corpus, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *run_args(corpus, str(tmp_path), parallel="hp", parallel_size=3)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("--parallel_size=3 must divide the world size 2") == 1


def test_missing_backend_or_device_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda backend: False)
    with pytest.raises(SystemExit, match="the gloo backend is not available"):
        parallel.init_distributed("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device=cuda but no CUDA device is visible"):
            parallel.init_distributed("cuda")


# -----------------------------------------------------------------------------
# Reliability: faults are caught, reported, and recovered from

def train_command(args):
    return [sys.executable, os.path.join(HERE, "train.py"), *args]


def wait_for_step(out_dir, step, proc, timeout=120):
    import time
    log = os.path.join(out_dir, "log.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and any(json.loads(line).get("step", 0) >= step and "loss" in json.loads(line)
                                       for line in open(log)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}")


def test_a_killed_run_resumes_automatically_with_the_same_losses(corpus, tmp_path):
    import signal
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    kw = dict(max_steps=12, ckpt_interval=2, resume="auto")
    # both runs in a process of one thread: CPU sums are only bitwise repeatable at a fixed
    # thread count (a 16-core machine's in-process run differed in the 7th digit at step 7)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(train_command(run_args(corpus, straight, **kw)), env=env, cwd=HERE, check=True,
                   capture_output=True)
    kill_after = np.random.default_rng().integers(3, 10)
    proc = subprocess.Popen(train_command(run_args(corpus, crashed, **kw)), env=env, cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(crashed, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(train_command(run_args(corpus, crashed, **kw)), env=env, cwd=HERE, check=True,
                   capture_output=True)
    assert losses(crashed) == losses(straight), f"killed after step {kill_after}"


def test_sigterm_saves_a_checkpoint_and_stops(corpus, tmp_path):
    import signal
    out = str(tmp_path)
    # a checkpoint every step: the signal finds an asynchronous write in flight
    proc = subprocess.Popen(train_command(run_args(corpus, out, max_steps=200, ckpt_interval=1)),
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by a signal after step" in output
    step = int(output.split("stopped by a signal after step ")[1].split(";")[0])
    assert 3 <= step < 200
    assert os.listdir(out) and all(not f.endswith(".tmp") for f in os.listdir(out))  # every write finished
    path, state = train.find_checkpoint("auto", out, torch.device("cpu"))
    assert path.endswith(f"ckpt_{step:08d}") and state["step"] == step


def test_non_finite_steps_are_skipped_then_the_run_stops(corpus, tmp_path, monkeypatch):
    calls = {"train": 0}

    class Faulty(GPT):  # NaN losses in the micro-batches of steps 3, 5 and 6 (2 micro-batches a step)
        def forward(self, idx, targets=None):
            logits, loss = super().forward(idx, targets)
            if self.training:
                calls["train"] += 1
                if (calls["train"] + 1) // 2 in (3, 5, 6):
                    loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(train, "GPT", Faulty)
    out = str(tmp_path)
    with pytest.raises(SystemExit, match="2 non-finite steps in a row, the last at step 6"):
        train.main(run_args(corpus, out, max_steps=10, ckpt_interval=1, keep_last_n=10, max_bad_steps=2))
    skipped = [json.loads(line)["skipped"] for line in open(os.path.join(out, "log.jsonl")) if "skipped" in line]
    assert skipped == [False, False, True, False, True, True]
    # step 5's update was skipped: its checkpoint holds the weights, router biases and AdamW
    # state (step counts too) of step 4's
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    four, five = [], []
    for s, state in ((4, four), (5, five)):
        dcp_to_torch_save(os.path.join(out, f"ckpt_{s:08d}"), os.path.join(out, f"{s}.pt"))
        saved = torch.load(os.path.join(out, f"{s}.pt"), weights_only=True)
        state += [saved["model"]] + list(saved["optimizer"].values())
    assert len(four) == len(five) > 10 and any("route_bias" in k for k in four[0])
    for a, b in zip(four, five):
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not os.path.exists(os.path.join(out, "ckpt_00000006"))


def test_every_step_moves_the_router_biases_by_the_sign_rule_and_logs_the_loads(corpus, tmp_path):
    # Sec. 2.2's global aux-free balancing after each step, b += u sign(mean - load): every bias
    # moves by u, up or down (the load of an expert equal to the mean leaves its bias), and the
    # log holds each MoE layer's max/mean load, read with the loss
    out, rate = str(tmp_path), 0.01
    train.main(run_args(corpus, out, max_steps=2, warmup_steps=1, decay_steps=1, ckpt_interval=1, keep_last_n=5,
                        bias_update_rate=rate))
    config, one = train.read_model(os.path.join(out, "ckpt_00000001"))
    two = train.read_model(os.path.join(out, "ckpt_00000002"))[1]
    biases = [k for k in one if k.endswith("route_bias")]
    assert len(biases) == config.n_layer - config.n_dense_layers
    for k in biases:
        moved = (two[k] - one[k]).abs()
        assert ((moved - rate).abs() < 1e-6).float().mean() > 0.9 and (moved < rate + 1e-6).all(), k
    loads = [json.loads(line)["load_max_over_mean"] for line in open(os.path.join(out, "log.jsonl"))
             if "load_max_over_mean" in line]
    assert [len(load) for load in loads] == [len(biases)] * 2 and min(map(min, loads)) >= 1.0


def test_routing_collapse_is_reported(capsys):
    watch = train.CollapseWatch(share=0.5, steps=3)
    for step, shares in enumerate([[0.6, 0.1], [0.7, 0.1], [0.2, 0.1], [0.6, 0.1], [0.6, 0.2], [0.9, 0.1],
                                   [0.9, 0.1]], 1):
        watch.update(step, shares)
    out = capsys.readouterr().out
    assert out.count("routing collapse") == 1 and "step 6: in MoE layer 0" in out


def test_route_skew_sends_every_token_to_the_same_experts(corpus, tmp_path):
    out = str(tmp_path / "skew")
    train.main(run_args(corpus, out, route_skew=10.0, max_steps=2, warmup_steps=1, decay_steps=1))
    config = json.load(open(os.path.join(out, "config.json")))["model"]
    loads = [json.loads(line)["load_max_over_mean"] for line in open(os.path.join(out, "log.jsonl"))
             if "load_max_over_mean" in line]
    assert len(loads) == 2
    # k of N_e experts take every pick: max / mean load = N_e / k in every MoE layer
    for load in loads:
        assert load == pytest.approx([config["n_expert"] / config["topk"]] * len(load))


def test_router_scores_stay_fp32_under_autocast(monkeypatch):
    seen = []

    def spy(x, weight, bias, k):
        scores, idx = kernels.topk_route_reference(x, weight, bias, k)
        seen.append((x, weight, scores))
        return scores, idx, kernels.cluster_by_expert(idx, weight.size(-1))

    monkeypatch.setattr(kernels, "topk_route", spy)
    block = MultiHeadLatentMoE(small_config(ffn="mh_latent_moe"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(torch.randn(2, 9, 48))
    x, weight, scores = seen[0]
    assert x.dtype == torch.bfloat16 and weight.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.einsum("nhd,hde->nhe", x.float(), weight).topk(3).values,
                               rtol=1e-6, atol=1e-6)


def test_experts_compute_in_the_autocast_dtype_with_the_configured_kernel(monkeypatch):
    # MoE's input comes from RMSNorm in fp32 under autocast; its experts must still run in bf16
    seen = []

    def spy(x, idx, gates, w1, w2, kernel, clustering):
        seen.append((x.dtype, kernel))
        return kernels.expert_ffn_reference(x, idx, gates, w1, w2, clustering)

    monkeypatch.setattr(kernels, "expert_ffn", spy)
    block = MoE(small_config(ffn="moe", expert_kernel="grouped"))
    x = torch.randn(2, 9, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x).dtype == torch.bfloat16
    block(x)  # and in fp32 without autocast
    assert seen == [(torch.bfloat16, "grouped"), (torch.float32, "grouped")]


@pytest.mark.parametrize("dim,dtype,kernel,path", [
    (64, torch.bfloat16, "fused", "fused"), (256, torch.bfloat16, "fused", "fused"),
    (128, torch.float32, "fused", "fused"), (256, torch.float32, "fused", "flex"),
    (64, torch.bfloat16, "flex", "flex"), (320, torch.bfloat16, "fused", "grouped"),
    (320, torch.bfloat16, "flex", "grouped"), (64, torch.bfloat16, "grouped", "grouped")])
def test_expert_path_takes_the_named_kernel_or_the_next_wide_enough(dim, dtype, kernel, path):
    assert kernels.expert_path(torch.empty(1, 1, dim, dtype=dtype), kernel) is getattr(kernels, f"expert_ffn_{path}")


def test_deterministic_runs_are_bitwise_equal(corpus, tmp_path):
    for name in ("a", "b"):
        train.main(run_args(corpus, str(tmp_path / name), deterministic=1))
    assert losses(str(tmp_path / "a")) == losses(str(tmp_path / "b"))


def test_head_parallel_runs_are_bitwise_equal(corpus, tmp_path):
    # with overlap: HP's exchanges, started and awaited in two halves, the most of them a step runs
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for out in runs:
        torchrun(2, run_args(corpus, out, batch_size=2, parallel="hp", overlap=True, **PAR))
    assert losses(runs[0]) == losses(runs[1])


def test_device_timeline_measures_busy_time_and_exchange_beside_compute():
    from types import SimpleNamespace as Event

    import bench
    kernel = lambda name, start, end: Event(device_type=torch.autograd.DeviceType.CUDA, name=name,
                                            time_range=Event(start=start, end=end))
    # microseconds: exchanges at 0-100 and 140-200, compute at 50-150 (and 120-130 inside it) and 300-310,
    # an all-reduce at 400-420 (busy, but no compute)
    events = [kernel("ncclDevKernel_SendRecv", 0, 100), kernel("gemm_a", 50, 150), kernel("gemm_b", 120, 130),
              kernel("ncclDevKernel_SendRecv", 140, 200), kernel("elementwise", 300, 310),
              kernel("ncclDevKernel_AllReduce_Sum_f32", 400, 420)]
    assert bench.device_timeline(events) == pytest.approx((0.42, 0.23, 0.11, 0.06))


def test_idle_gaps_are_classed_by_length_and_named_by_the_kernels_around_them():
    from types import SimpleNamespace as Event

    import bench
    event = lambda kind, name, start, end: Event(device_type=kind, name=name, time_range=Event(start=start, end=end))
    kernel = lambda name, start, end: event(torch.autograd.DeviceType.CUDA, name, start, end)
    # microseconds: gaps of 20 (a-b), 300 (b-d: c ran inside b) and 2,000 (d-e); the host's event is no kernel
    events = [kernel("a", 0, 100), kernel("b", 120, 200), kernel("c", 150, 160), kernel("d", 500, 600),
              event(torch.autograd.DeviceType.CPU, "host", 600, 2600), kernel("e", 2600, 2700)]
    by_class, longest = bench.idle_gaps(bench.device_kernels(events), n=2)
    assert by_class == pytest.approx({"under 50 us": 0.02, "50 us to 1 ms": 0.3, "1 ms or more": 2.0})
    assert longest == [(pytest.approx(2.0), "d", "e"), (pytest.approx(0.3), "b", "d")]


def test_end_to_end_benchmark_reports_throughput(corpus, tmp_path, monkeypatch):
    import bench
    monkeypatch.setattr(bench, "OUT", str(tmp_path))
    args = run_args(corpus, str(tmp_path / "unused"))
    args = [a for a in args if not a.split("=")[0] in ("--max_steps", "--warmup_steps", "--decay_steps",
                                                       "--eval_interval", "--log_interval", "--out_dir")]
    bench.bench_e2e(args + ["--bench_warmup=1", "--bench_steps=2", "--bench_balance=3"])
    rows = json.load(open(tmp_path / "e2e.json"))["rows"]
    assert len(rows) == 1 and rows[0]["tokens/s"] > 0 and rows[0]["parallel"] == "dp"
    for extra in ("--bench_balance=0", "--route_skew=5", "--batch_size=2"):  # rows of their own
        bench.bench_e2e(args + ["--bench_warmup=1", "--bench_steps=1", extra])
    rows = json.load(open(tmp_path / "e2e.json"))["rows"]
    assert [(r["routing"], r["micro-batch"]) for r in rows] == [("balanced", 4), ("init", 4), ("route_skew=5", 4),
                                                                ("balanced", 2)]
    # the worst layer's load: below every token on the same k experts, unless skewed
    assert all(1 <= r["load max/mean"] < SMALL["n_expert"] / SMALL["topk"] for r in rows[:2])
    assert rows[2]["load max/mean"] == pytest.approx(SMALL["n_expert"] / SMALL["topk"])
    assert (tmp_path / "e2e.md").exists()


def test_balancing_moves_only_the_router_biases_toward_balance(corpus):
    torch.manual_seed(0)
    model = GPT(small_config(ffn="mh_latent_moe", n_expert=16, topk=2))
    weights = {n: p.clone() for n, p in model.named_parameters()}
    data = train.TokenStream(corpus, "train", 4, SMALL["block_size"])
    first, last = train.balance_routing(model, data, 30, 2, contextlib.nullcontext(), torch.device("cpu"))
    assert last < 0.75 * first, (first, last)  # 3.47 -> 2.28 here; a uniform router would show ~1.5
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # the weights stay frozen
    assert all(m.route_bias.abs().sum() > 0 and (m.load == 0).all() for m in model.routed_experts())
    assert data.state_dict() == {"pos": 0, "epoch": 0}  # training then reads the same data


def test_generation_with_and_without_the_kv_cache_gives_the_same_tokens():
    torch.manual_seed(0)
    for ffn in ("mlp", "moe", "latent_moe", "mh_moe", "mh_latent_moe"):
        model = GPT(small_config(ffn=ffn))
        prompt = torch.randint(0, 50257, (2, 7))
        cached = model.generate(prompt, 25, temperature=0)              # 32 = block_size tokens in all
        plain = model.generate(prompt, 25, temperature=0, use_cache=False)
        assert torch.equal(cached, plain), ffn
        assert torch.equal(cached[:, :7], prompt) and model.training      # the prompt kept, the mode restored
        assert all((m.load == 0).all() for m in model.routed_experts())  # generation counts no load
        longer = model.generate(prompt, 40, temperature=0.8, top_k=5)    # past the context: the cache restarts
        assert longer.shape == (2, 47)


def test_a_sequence_past_the_context_is_refused():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="sequence length 33 exceeds block_size=32: keep the last 32 tokens"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_a_model_is_not_loaded_from_a_directory_without_checkpoints(tmp_path):
    with pytest.raises(SystemExit, match="holds no complete checkpoint"):
        train.load_model(str(tmp_path))


def test_the_fused_experts_refuse_weights_whose_gradient_they_could_not_add_to_grad():
    # the fused path adds dW straight to .grad of the parameter: a part of one, or a computed
    # tensor, has no .grad of its own that the optimizer would see
    x, idx, gates, w1, w2 = expert_inputs(5, 2, 16, 6, 8, 3)
    w1, w2 = w1.requires_grad_(), w2.requires_grad_()
    for bad in (w1[:, :, :4], w1 * 2):
        with pytest.raises(ValueError, match="must be leaf tensors \\(parameters\\) or views of whole ones"):
            kernels.expert_ffn_fused(x, idx, gates, bad, w2[:, :, :bad.size(2)])


def test_a_trained_models_greedy_continuation_is_deterministic(corpus, tmp_path):
    train.main(run_args(corpus, str(tmp_path), max_steps=8, ckpt_interval=8))
    runs = [subprocess.run(train_command(["sample", str(tmp_path), "--prompt=The", "--max_new_tokens=12",
                                          "--temperature=0", "--num_samples=1", "--device=cpu"]),
                           capture_output=True, text=True, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
            for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("The")
    model = train.load_model(str(tmp_path))
    prompt = torch.tensor([prepare.encoder().encode_ordinary("The")])
    want = prepare.encoder().decode(model.generate(prompt, 12, temperature=0)[0].tolist())
    assert runs[0].stdout.split("\n---------------")[0] == want


def test_zeroshot_adapter_scores_as_the_model_does():
    bench = pytest.importorskip("bench")
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace
    torch.manual_seed(0)
    model = GPT(small_config(ffn="mh_latent_moe")).eval()
    enc = prepare.encoder()
    long = "the context is longer than the model's window of 32 tokens " * 3
    pairs = [("The quick brown", " fox jumps"), ("", "Hello world"), ("A number: ", "42 and more"), (long, " end")]
    lm = bench.zeroshot_lm(model, batch_size=3)  # batches of unequal lengths, padded
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])

    def direct(context, continuation):  # one sequence at a time, no padding: the oracle
        ctx = enc.encode_ordinary(context.rstrip(" ")) or [prepare.EOT]
        cont = enc.encode_ordinary(context.rstrip(" ") + context[len(context.rstrip(" ")):] + continuation)
        cont = cont[len(enc.encode_ordinary(context.rstrip(" "))):]
        seq = torch.tensor([(ctx + cont)[-33:]])
        logp = torch.log_softmax(model(seq[:, :-1])[0].double(), -1)[0, -len(cont):]
        return logp.gather(-1, seq[0, -len(cont):, None]).sum().item()
    for (lp, _), p in zip(got, pairs):
        assert lp == pytest.approx(direct(*p), rel=1e-4), p
    greedy = model(torch.tensor([enc.encode_ordinary("The")]))[0][0, -1, :50257].argmax().item()
    assert lm.loglikelihood([SimpleNamespace(args=("The", enc.decode([greedy])))])[0][1] is True
    text = "a short document"  # shorter than the window: log p of every token after end-of-text
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0]
    assert rolling == pytest.approx(direct("", text), rel=1e-4)
    assert lm.generate_until([SimpleNamespace(args=("The", {"until": ["."], "max_gen_toks": 5}))])[0] \
        == enc.decode(model.generate(torch.tensor([enc.encode_ordinary("The")]), 5, temperature=0)[0, 1:].tolist()).split(".")[0]


def test_lm_eval_scores_a_local_task_above_chance_after_a_short_training(corpus, tmp_path, monkeypatch):
    bench = pytest.importorskip("bench")
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(bench, "OUT", str(tmp_path / "results"))
    run = str(tmp_path / "run")
    train.main(run_args(corpus, run, max_steps=30, warmup_steps=3, decay_steps=5, ckpt_interval=30))
    # an easy two-way task: a passage of the training text goes on as it does, or as random tokens
    enc, rng = prepare.encoder(), random.Random(0)
    tokens = np.asarray(prepare.open_shard(os.path.join(corpus, "train_000000.bin")))
    rows = []
    for i in range(24):
        at = 500 + 997 * i
        true = enc.decode(tokens[at + 12:at + 18].tolist())
        noise = enc.decode([rng.randrange(50000) for _ in range(6)])
        rows.append({"context": enc.decode(tokens[at:at + 12].tolist()), "choices": [true, noise], "label": 0})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "easy.yaml").write_text(f"""task: easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'easy.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    row = bench.bench_zeroshot([run, "--tasks=easy_local", f"--include_path={tasks}", "--batch_size=5"])
    assert row["easy_local"] > 0.75, row  # chance is 0.5
    assert json.load(open(tmp_path / "results" / "zeroshot.json"))["rows"][0]["easy_local"] == row["easy_local"]


def test_step_split_sorts_kernels_into_parts():
    import bench
    split = bench.step_split({"_route_fwd_kernel": 1.0, "triton_tem_fused_cat_0": 2.0,
                              "void at::native::radixSortKVInPlace<long>": 0.25, "flash_fwd_kernel": 3.0,
                              "ncclDevKernel_AllToAll_RING": 0.5, "ncclDevKernel_AllReduce_Sum_f32": 0.75,
                              "multi_tensor_apply_kernel<FusedAdamMathFunctor>": 1.5,
                              "sm90_xmma_gemm_bf16bf16_bf16f32": 4.0, "triton_poi_fused_add_mul_0": 0.125,
                              "void at::native::sbtopk::gatherTopK<float>": 0.0625,
                              "cutlass::GemmUniversal<cutlass::gemm::GroupProblemShape<int>>": 0.5,
                              "_fused_experts_dw_kernel": 0.25})
    assert split == {"router": 1.0625, "experts": 2.75, "clustering": 0.25, "attention": 3.0,
                     "all-to-all": 0.5, "all-reduce": 0.75, "optimizer": 1.5, "matmul": 4.0, "other": 0.125}


def test_quality_report_tables_seeds_of_finished_runs(corpus, tmp_path, monkeypatch):
    import bench
    monkeypatch.setattr(bench, "OUT", str(tmp_path))
    runs = {f"{preset}_{seed}": (preset, seed) for preset, seed in [("tiny_moe", 1), ("tiny_moe", 2), ("tiny_mlp", 1)]}
    for name, (preset, seed) in runs.items():
        args = run_args(corpus, str(tmp_path / name), seed=seed, eval_interval=3, max_steps=3, decay_steps=1)
        train.main([a for a in args if not a.startswith("--ffn=")] + [f"--preset={preset}", "--block_size=64"])
    bench.bench_quality([str(tmp_path / name) for name in runs])
    rows = {r["model"]: r for r in json.load(open(tmp_path / "quality.json"))["rows"]}
    finals = {name: [json.loads(l)["val_loss"] for l in open(tmp_path / name / "log.jsonl") if "val_loss" in l][-1]
              for name in runs}
    assert rows["tiny_moe"]["seeds"] == 2 and rows["tiny_mlp"]["seeds"] == 1
    assert rows["tiny_moe"]["val loss"] == pytest.approx((finals["tiny_moe_1"] + finals["tiny_moe_2"]) / 2)
    assert rows["tiny_moe"]["spread"] == pytest.approx(abs(finals["tiny_moe_1"] - finals["tiny_moe_2"]))
    assert finals["tiny_moe_1"] != finals["tiny_moe_2"]  # the seed changes the run
    assert rows["tiny_moe"]["active M"] < rows["tiny_moe"]["total M"]
    with pytest.raises(SystemExit, match="not a finished train.py run"):
        bench.bench_quality([str(tmp_path)])
