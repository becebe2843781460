"""
Text -> GPT-2 tokens -> uint16 shards, for train.py.

  python prepare.py                              # FineWeb-Edu sample-10BT (needs the network)
  python prepare.py --source=builtin             # Python's own docs, ships with Python: no download
  python prepare.py --source="docs/*.jsonl"      # local .jsonl / .parquet / .txt files

Each document is tokenized with tiktoken r50k_base (token-for-token GPT-2) in
worker processes and followed by <|endoftext|>. Documents go to the train or
the validation split (a fixed fraction, by document). A shard is a 32-byte
header (magic, version, token count, 0 as int64) then uint16 tokens. An
interrupted run picks up after its last written shard when run again;
--max_docs=N stops after N documents and writes what it has as shards to use,
and a later run with a larger N (or none) rewrites those last shards and carries
on, ending with the shards of an uninterrupted run. --shuffle_seed=S shuffles the documents of a builtin or local source
first (they often come ordered by source); -1 keeps their order.
"""

import glob
import itertools
import json
import os
import random
import sys
import time
from multiprocessing import get_context

import numpy as np

MAGIC, VERSION = 20260204, 1
HEADER = 4  # int64 words
VOCAB = 50257
EOT = 50256


# -----------------------------------------------------------------------------
# The shard format (shared with train.py's loader)

def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    assert tokens.size and tokens.max() < 2 ** 16
    header = np.array([MAGIC, VERSION, tokens.size, 0], dtype="<i8")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)  # a crash never leaves a half-written shard under the real name


def open_shard(path, vocab_size=VOCAB):
    """Memory-map a shard after checking its header, size and token ids."""
    size = os.path.getsize(path)
    if size < HEADER * 8:
        raise ValueError(f"{path}: {size} bytes is too short for a shard header; re-run prepare.py")
    magic, version, n, _ = np.fromfile(path, dtype="<i8", count=HEADER)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a token shard (magic {magic}, expected {MAGIC}); "
                         f"make shards with prepare.py")
    if version != VERSION:
        raise ValueError(f"{path}: shard version {version}, this code reads {VERSION}; re-run prepare.py")
    if n < 1:
        raise ValueError(f"{path}: the shard holds no tokens; delete it and re-run prepare.py")
    expected = HEADER * 8 + 2 * n
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, the header promises {expected} ({n} tokens): "
                         f"the file is truncated or damaged; re-run prepare.py")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER * 8, shape=(n,))
    top = int(tokens.max())
    if top >= vocab_size:
        raise ValueError(f"{path}: token id {top} >= vocab_size={vocab_size}; "
                         f"the shard was made with another tokenizer")
    return tokens


# -----------------------------------------------------------------------------
# Sources of documents

def builtin_docs():
    """Python's topic help pages (pydoc_data): ~0.1M tokens of English that every Python ships."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def local_docs(pattern):
    paths = sorted(glob.glob(pattern))
    if not paths:
        sys.exit(f"prepare.py: no files match --source={pattern!r}; give a .jsonl, .parquet or .txt "
                 f"path or glob, 'builtin' or 'fineweb'")
    for path in paths:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield json_text(json.loads(line), f"{path}:{line_no}")
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq
            for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
                yield from batch.column("text").to_pylist()
        else:
            sys.exit(f"prepare.py: {path}: unknown file type; use .jsonl, .parquet or .txt")


def json_text(record, where):
    if not isinstance(record.get("text"), str):
        sys.exit(f"prepare.py: {where}: a JSON line needs a string field 'text'")
    return record["text"]


FINEWEB = dict(path="HuggingFaceFW/fineweb-edu", name="sample-10BT")


def fineweb_docs(skip):
    """FineWeb-Edu's sample streamed from the Hugging Face hub, after its first `skip`
    documents, and how many documents it holds if the hub says (else None)."""
    from datasets import load_dataset
    try:
        ds = load_dataset(**FINEWEB, split="train", streaming=True)
        rows = iter(ds.skip(skip))
        first = next(rows, None)  # the hub is reached by here at the latest
    except OSError as e:  # ConnectionError without network; DatasetNotFoundError is a FileNotFoundError
        sys.exit(f"prepare.py: cannot stream {FINEWEB['path']} ({FINEWEB['name']}) from the Hugging Face hub "
                 f"({type(e).__name__}: {e}); without network, give local files instead: "
                 f"--source='dir/*.jsonl' (or .parquet, .txt), or --source=builtin")
    splits = ds.info.splits
    total = splits["train"].num_examples if splits and "train" in splits else None
    docs = itertools.chain([] if first is None else [first], rows)
    return (row["text"] for row in docs), total


# -----------------------------------------------------------------------------

def encoder():
    import tiktoken
    return tiktoken.get_encoding("r50k_base")  # identical to GPT-2; see README for offline use


def tokenize(text):
    return np.array(encoder().encode_ordinary(text) + [EOT], dtype=np.uint16)


def is_val(i, val_fraction):
    # a fixed, evenly spread fraction of the documents, chosen by position
    return int((i + 1) * val_fraction) > int(i * val_fraction)


def prepare(source="fineweb", out_dir=None, val_fraction=0.005, shard_tokens=100_000_000, workers=None,
            max_docs=0, shuffle_seed=-1):
    out_dir = out_dir or os.path.join("data", "fineweb" if source == "fineweb" else
                                      "builtin" if source == "builtin" else "local")
    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, "progress.json")
    state = dict(docs=0, train_shards=0, val_shards=0, train_tokens=0, val_tokens=0, done=False)
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state["done"]:
            print(f"{out_dir} is complete already ({state['train_tokens']:,} train tokens); nothing to do")
            return state
        for name in state.pop("partial", []):  # a stopped run's last shards, rewritten whole below
            os.remove(os.path.join(out_dir, name))
        print(f"resuming after {state['docs']:,} documents")
    if source == "fineweb":
        if shuffle_seed >= 0:
            sys.exit("prepare.py: --shuffle_seed applies to builtin and local sources; FineWeb-Edu's "
                     "sample is shuffled already")
        docs, total = fineweb_docs(state["docs"])
    else:
        docs = builtin_docs() if source == "builtin" else local_docs(source)
        if shuffle_seed >= 0:  # local files often come ordered by source; the train stream should not be
            docs = list(docs)  # the whole corpus in memory; the same seed gives the same order on resume
            random.Random(shuffle_seed).shuffle(docs)
        total = len(docs) if isinstance(docs, list) else None
        docs = (d for i, d in enumerate(docs) if i >= state["docs"])

    buffers = {"train": [], "val": []}

    committed = dict(state)  # the progress at the last whole shard

    def flush(partial=False):
        """Writes the buffered documents as shards. partial: a run stopped before the end; its
        shards are there to use, but the progress saved stays at the last whole shard, so
        that a later run rewrites them and ends with the shards of an uninterrupted run."""
        nonlocal committed
        names = []
        for split in ("train", "val"):
            if buffers[split]:
                names.append(f"{split}_{state[f'{split}_shards']:06d}.bin")
                write_shard(os.path.join(out_dir, names[-1]), np.concatenate(buffers[split]))
                state[f"{split}_shards"] += 1
                buffers[split] = []
        if not partial:
            committed = dict(state)
        with open(state_path + ".tmp", "w") as f:
            json.dump(dict(committed, partial=names) if partial else committed, f)
        os.replace(state_path + ".tmp", state_path)

    t0, start_docs, pending, finished = time.time(), state["docs"], 0, True

    def progress():
        tokens, elapsed = state["train_tokens"] + state["val_tokens"], max(time.time() - t0, 1e-9)
        done = state["docs"] - start_docs
        text = f"{state['docs']:,} docs, {tokens:,} tokens, {tokens / elapsed:,.0f} tok/s"
        if total and done:
            left = (total - state["docs"]) * elapsed / done
            text += f", {100 * state['docs'] / total:.0f}% of {total:,} docs, ~{left / 60:.0f} min left"
        print(f"\r{text}", end="", flush=True)

    # workers from a fork server, not forked from this process: a fork of a process whose threads
    # (torch's, tiktoken's) hold locks can hang; once, a test run did
    with get_context("forkserver").Pool(workers or os.cpu_count()) as pool:
        for tokens in pool.imap(tokenize, docs, chunksize=16):
            if max_docs and state["docs"] >= max_docs:
                finished = False  # a later run with a larger --max_docs carries on from here
                break
            split = "val" if is_val(state["docs"], val_fraction) else "train"
            buffers[split].append(tokens)
            state["docs"] += 1
            state[f"{split}_tokens"] += tokens.size
            pending += tokens.size
            if pending >= shard_tokens:
                flush()  # progress is saved only at shard boundaries
                pending = 0
            if state["docs"] % 1000 == 0:
                progress()
    progress()
    if finished and (state["train_tokens"] == 0 or state["val_tokens"] == 0):
        sys.exit(f"prepare.py: {state['docs']} documents gave {state['train_tokens']} train and "
                 f"{state['val_tokens']} val tokens; give more documents or change --val_fraction")
    state["done"] = finished
    flush(partial=not finished)
    print(f"\n{out_dir}: {state['docs']:,} documents, {state['train_tokens']:,} train tokens in "
          f"{state['train_shards']} shards, {state['val_tokens']:,} val tokens in {state['val_shards']}"
          + ("" if finished else f" (stopped at --max_docs={max_docs}; run again to continue)"))
    return state


def parse_args(argv):
    defaults = dict(source="fineweb", out_dir="", val_fraction=0.005, shard_tokens=100_000_000, workers=0,
                    max_docs=0, shuffle_seed=-1)
    args = dict(defaults)
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in defaults:
            sys.exit(f"prepare.py: bad argument {arg!r}; options are "
                     + " ".join(f"--{k}={v!r}" for k, v in defaults.items()))
        try:
            args[key] = type(defaults[key])(value)
        except ValueError:
            sys.exit(f"prepare.py: --{key}={value!r} is not a {type(defaults[key]).__name__}")
    if not 0 < args["val_fraction"] < 1:
        sys.exit(f"prepare.py: --val_fraction={args['val_fraction']} must lie strictly between 0 and 1")
    return args


if __name__ == "__main__":
    a = parse_args(sys.argv[1:])
    prepare(a["source"], a["out_dir"] or None, a["val_fraction"], a["shard_tokens"], a["workers"] or None,
            a["max_docs"], a["shuffle_seed"])
