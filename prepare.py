"""
One-time data preparation, and the fixed runtime utilities that train.py imports.

Usage:
    uv run prepare.py                       # 10 training shards + the validation shard, then the tokenizer
    uv run prepare.py --num-shards 100      # more training data (-1 = all 6542 training shards)
    uv run prepare.py --dataset tinystories # small machines: GPT-4's short stories, with constants of their own
    uv run prepare.py --check               # the data of the dataset in use is there and whole: one line

On a CUDA machine it also fetches the Flash Attention 3 kernel for this GPU into the local kernel cache, where
train.py finds it without the network.

This file is the ground truth of every experiment: the constants, the tokenizer, the
dataloader and evaluate_bpb. The agent never edits it, and it never imports train.py.
The dataset prepared last is the one train.py trains and evaluates on (ClimbMix, unless TinyStories was).

Environment:
    AUTORESEARCH_CACHE_DIR   cache root (default ~/.cache/autoresearch), with data/ and tokenizer/ under it
                             (TinyStories: under tinystories/, and the file `dataset` naming it as prepared last)
    HF_ENDPOINT              Hugging Face host or mirror (default https://huggingface.co)
    KERNELS_CACHE, HF_HOME   where the `kernels` package caches kernels (default ~/.cache/huggingface/hub)
    AUTORESEARCH_TIME_BUDGET, AUTORESEARCH_EVAL_TOKENS   tests only: a shorter run (read once, here)
"""

import argparse
import atexit
import bisect
import hashlib
import itertools
import json
import math
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import pyarrow.parquet as pq
import requests
import torch
import torch.nn.functional as F
import urllib3

# -----------------------------------------------------------------------------
# Constants (fixed: val_bpb is only comparable across runs that share them)

MAX_SEQ_LEN = 2048            # context length, tokens
TIME_BUDGET = 300             # training time per experiment, seconds of wall clock
EVAL_TOKENS = 40 * 524288     # validation tokens evaluated by evaluate_bpb on CUDA (20,971,520)
SMALL_EVAL_TOKENS = 2**17     # ...and on a CPU or Apple MPS, where 20M tokens would take hours (~1 min on 2 cores)
VOCAB_SIZE = 8192             # tokenizer vocabulary, the 4 special tokens included
HELDOUT_FROM_SEED = 1000      # a run under a seed from 1000 up (the morning's confirmation) also scores the held-out
                              # part: the tokens after the scored ones in the validation stream, unseen all night
CAUSAL_TOLERANCE = 1e-3       # nats: how far a later token may move the loss at an earlier position (numerics only)

HF_ENDPOINT = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
BASE_URL = f"{HF_ENDPOINT}/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542              # shards are shard_00000 ... shard_06542
VAL_SHARD = MAX_SHARD         # the last shard is pinned for validation, never trained on
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"

# TinyStories, for small machines (`uv run prepare.py --dataset tinystories`): GPT-4's short stories for small
# children, one pre-shuffled parquet file of 2,732,634 stories (673 MB). The reference's README advises small
# machines to use it, with a smaller vocabulary, shorter sequences and fewer evaluation tokens: these are its fixed
# constants, in a cache of its own (tinystories/ under the cache root), never compared with ClimbMix's.
TINYSTORIES_URL = f"{HF_ENDPOINT}/datasets/karpathy/tinystories-gpt4-clean/resolve/main/tinystories_gpt4_clean.parquet"
TINYSTORIES_HELDOUT_ROWS = 10_000   # rows 0-9,999 (the test rows by common use): the held-out part, scored only by the
                                    # morning's confirmation
TINYSTORIES_VAL_ROWS = 10_000       # rows 10,000-19,999: validation; the training data is every row from 20,000 on

# Each dataset's fixed constants and files (in its data/ folder): train.py uses the one prepared last
DATASETS = {
    "climbmix": dict(folder="", seq_len=MAX_SEQ_LEN, vocab_size=VOCAB_SIZE, eval_tokens=EVAL_TOKENS,
                     small_eval_tokens=SMALL_EVAL_TOKENS, val=VAL_FILENAME, heldout=None),
    "tinystories": dict(
        folder="tinystories",
        seq_len=512,          # the reference advises "a lot" lower, "even down to 256": the stories are short (2.7 M
                              # in 673 MB of parquet), and attention per token costs a quarter of 2048's
        vocab_size=4096,      # its first step down (8192 -> 4096 ... 256): the stories use a small child's words, and
                              # at depth 4 the embedding, value embeddings and head are most of the model's parameters
        eval_tokens=2**19,    # on CUDA: 1/40 of ClimbMix's, 1,024 rows from the 10,000 validation stories;
        small_eval_tokens=SMALL_EVAL_TOKENS,  # ... on a CPU or Apple MPS, as for ClimbMix
        val="val.parquet", heldout="heldout.parquet"),
}
TRAIN_FILENAME = "train.parquet"    # TinyStories' training rows (ClimbMix's are its numbered shards)
DATASET_FILE = "dataset"            # in the cache root: the name of the dataset prepared last (none: ClimbMix)

CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")


def prepared_dataset(cache_dir):
    """The dataset prepared last in a cache: the one its `dataset` file names, ClimbMix where there is none."""
    path = os.path.join(cache_dir, DATASET_FILE)
    try:
        with open(path) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return "climbmix"
    if name not in DATASETS:
        raise DataError(f"{path} names no dataset this prepare.py knows ({name!r}, not one of {', '.join(DATASETS)}); "
                        f"delete it (ClimbMix is then used), or prepare one with `uv run prepare.py [--dataset NAME]`.")
    return name


def dataset_dirs(cache_dir, name):
    """(data folder, tokenizer folder) of a dataset: ClimbMix's at the cache root, as always; the others' below it."""
    root = os.path.join(cache_dir, DATASETS[name]["folder"])
    return os.path.join(root, "data"), os.path.join(root, "tokenizer")


def use_dataset(name):
    """Points this module's constants and paths at a dataset: when imported, the one prepared last (train.py's);
    in main(), the one asked for."""
    global DATASET, MAX_SEQ_LEN, VOCAB_SIZE, EVAL_TOKENS, SMALL_EVAL_TOKENS, VAL_FILENAME, HELDOUT_FILENAME
    global DATA_DIR, TOKENIZER_DIR, TOKENIZER_FILE, TOKEN_BYTES_FILE
    d = DATASETS[name]
    DATASET, MAX_SEQ_LEN, VOCAB_SIZE = name, d["seq_len"], d["vocab_size"]
    EVAL_TOKENS, SMALL_EVAL_TOKENS, VAL_FILENAME, HELDOUT_FILENAME = (d["eval_tokens"], d["small_eval_tokens"],
                                                                       d["val"], d["heldout"])
    DATA_DIR, TOKENIZER_DIR = dataset_dirs(CACHE_DIR, name)
    TOKENIZER_FILE = os.path.join(TOKENIZER_DIR, "tokenizer.pkl")
    TOKEN_BYTES_FILE = os.path.join(TOKENIZER_DIR, "token_bytes.pt")

# GPT-4's split pattern, except numbers split into groups of 1-2 digits (not 1-3)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
TOKENIZER_DOC_CHARS = 10_000          # each document is cut to this many characters for BPE training
TOKENIZER_MAX_CHARS = 1_000_000_000   # total characters of BPE training text

# For train.py's MFU: bf16 dense peak FLOP/s by GPU name (first match wins; a laptop GPU's peak depends on its
# power limit: unknown). Data-center cards: NVIDIA's datasheets, sparsity halved. RTX A6000, RTX 6000 Ada and
# GeForce: the Ampere GA102, Ada and RTX Blackwell whitepapers' "Peak BF16 Tensor TFLOPS with FP32 Accumulate" (A6000
# 154.8, 3090 71, 4090 165.2, 5090 209.5); on GeForce that is 4 x CUDA cores x boost clock, which gives the other
# GeForce cards from NVIDIA's spec pages.
GPU_PEAK_FLOPS = [
    ("Laptop", 0.0), ("H100 PCIe", 756e12), ("H100", 989.5e12), ("H200", 989.5e12), ("H20", 148e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("RTX 6000 Ada", 364.2e12), ("A6000", 154.8e12), ("RTX 5090", 209.5e12), ("RTX 5080", 112.6e12),
    ("RTX 5070 Ti", 87.9e12), ("RTX 5070", 61.7e12), ("RTX 5060 Ti", 47.4e12), ("RTX 5060", 38.4e12),
    ("RTX 4090 D", 147.1e12), ("RTX 4090", 165.2e12), ("RTX 4080 SUPER", 104.4e12), ("RTX 4080", 97.5e12),
    ("RTX 4070 Ti SUPER", 88.2e12), ("RTX 4070 Ti", 80.2e12), ("RTX 4070 SUPER", 71e12), ("RTX 4070", 58.3e12),
    ("RTX 4060 Ti", 44.1e12), ("RTX 4060", 30.2e12), ("RTX 3090 Ti", 80e12), ("RTX 3090", 71e12),
    ("RTX 3080 Ti", 68.2e12), ("RTX 3080", 59.5e12), ("RTX 3070 Ti", 43.5e12), ("RTX 3070", 40.6e12),
    ("RTX 3060 Ti", 32.4e12), ("RTX 3060", 25.5e12)]

DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_TIMEOUT = float(os.environ.get("AUTORESEARCH_HTTP_TIMEOUT", 30))  # seconds without a byte before retrying
BACKOFF_SECONDS = float(os.environ.get("AUTORESEARCH_BACKOFF_S", 2))       # sleep 2, 4, 8, 16 s between attempts


class DataError(SystemExit):
    """A missing or broken file under the cache. Exits with this one-line message and status 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


use_dataset(prepared_dataset(CACHE_DIR))


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def list_shards():
    """Complete shards on disk, in file order (temporary files never match): ClimbMix's numbered ones, TinyStories'
    training file."""
    if not os.path.isdir(DATA_DIR):
        return []
    names = [n for n in os.listdir(DATA_DIR)
             if (n.startswith("shard_") and n.endswith(".parquet") and len(n) == 19) or n == TRAIN_FILENAME]
    return [os.path.join(DATA_DIR, n) for n in sorted(names)]


def shard_problem(path):
    """None if `path` is a parquet file with a `text` column, else what is wrong. Reads only the footer (cheap)."""
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:
        return f"not a valid parquet file ({e})"
    return None if "text" in names else f"a parquet file with no 'text' column (columns: {names})"


def shard_paths(split):
    """The shards of a split, checked up front so a bad cache fails before training, not after it."""
    assert split in ("train", "val"), split
    hint = f"run `{prepare_command()}` to download the data"
    if not os.path.isdir(DATA_DIR):
        raise DataError(f"no data directory at {DATA_DIR}; {hint}.")
    paths = list_shards()
    val_path = os.path.join(DATA_DIR, VAL_FILENAME)
    if not paths and not os.path.exists(val_path):
        raise DataError(f"no shards in {DATA_DIR}; {hint}.")
    if split == "val":
        paths = [val_path] if os.path.exists(val_path) else []
        if not paths:
            raise DataError(f"validation shard {val_path} is missing; {hint}.")
    else:
        paths = [p for p in paths if p != val_path]
        if not paths:
            raise DataError(f"no training shards in {DATA_DIR} (only the validation shard); {hint}.")
    for p in paths:
        problem = shard_problem(p)
        if problem:
            raise DataError(f"{p} is {problem}. Delete it and re-run `{prepare_command()}`.")
    return paths


def check_data():
    """The tokenizer, once the files train.py reads are checked (tokenizer, training shards, validation shard): a
    missing or broken one fails here, in one line naming the command that fixes it, before anything is built."""
    tokenizer = Tokenizer.from_directory()
    for split in ("train", "val"):
        shard_paths(split)
    return tokenizer


def prepare_command(name=None):
    """The command that prepares a dataset (the one in use by default), for the messages that name it."""
    return "uv run prepare.py" + ("" if (name or DATASET) == "climbmix" else f" --dataset {name or DATASET}")


def _row_group_texts(path):
    """The documents of a shard, one list per parquet row group (one row group in memory at a time)."""
    pf = pq.ParquetFile(path)
    for rg in range(pf.num_row_groups):
        yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()

# -----------------------------------------------------------------------------
# Download


def _remove_stale_temp_files():
    """Temporary files of processes that died mid-download (name: <shard>.<pid>.<thread>.tmp)."""
    for name in os.listdir(DATA_DIR):
        if not name.endswith(".tmp"):
            continue
        try:
            pid = int(name.split(".")[-3])
            os.kill(pid, 0)
            continue  # its writer is still alive (another prepare.py on the same cache)
        except (ValueError, IndexError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        try:
            os.remove(os.path.join(DATA_DIR, name))
        except FileNotFoundError:
            pass


def download_shard(index, progress=None):
    """Fetches one shard into DATA_DIR. Returns None or an error string."""
    name = shard_name(index)
    return download_file(f"{BASE_URL}/{name}", os.path.join(DATA_DIR, name), progress)


def download_file(url, path, progress=None):
    """Fetches a parquet file to a temporary file, checks it, renames it to `path`. Returns None or an error string."""
    if os.path.exists(path):
        return None
    name = os.path.basename(path)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    error = ""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            with requests.get(url, stream=True, timeout=(10, DOWNLOAD_TIMEOUT)) as r:
                if r.status_code != 200:
                    raise OSError(f"HTTP {r.status_code}")
                expected = r.headers.get("Content-Length") if "Content-Encoding" not in r.headers else None
                received = 0
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        received += len(chunk)
                        if progress is not None:
                            progress(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            if expected is not None and received != int(expected):
                raise OSError(f"connection closed after {received} of {expected} bytes")
            problem = shard_problem(tmp)
            if problem:
                raise OSError(f"the response is {problem}")
            os.replace(tmp, path)  # atomic: a file named *.parquet is always complete
            return None
        except (requests.RequestException, OSError) as e:
            error = str(e) or type(e).__name__
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt < DOWNLOAD_ATTEMPTS:
                time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
    return f"{name}: {error} (after {DOWNLOAD_ATTEMPTS} attempts, {url})"


def check_host_reachable(url, what="no shard", command="uv run prepare.py"):
    """Exits with one line when no connection to the data host can be opened at all (the name does not resolve,
    the connection is refused, no answer within 10 s: offline, blocked or a wrong HF_ENDPOINT). Retrying each
    shard with back-off cannot help there. Any answer from the host, even an error status, lets the downloads
    start: server errors, dropped connections and stalls are retried per shard."""
    try:
        requests.head(url, timeout=10, allow_redirects=False).close()
        return
    except requests.ConnectTimeout:
        why = "no answer within 10 s"
    except requests.ConnectionError as e:
        reason = getattr(e.args[0], "reason", None) if e.args else None  # urllib3's MaxRetryError
        if isinstance(e, requests.exceptions.ProxyError):
            why = "the proxy cannot be reached"
        elif isinstance(reason, urllib3.exceptions.NewConnectionError):  # name resolution included
            why = getattr(reason.__cause__, "strerror", None) or type(reason).__name__
        else:
            return  # it answered, then the connection dropped: a fault for the per-shard retries
    except requests.RequestException:
        return  # a read timeout or a bad answer: the host is there
    host = urllib3.util.parse_url(url).netloc
    raise SystemExit(f"error: cannot reach {host} ({why}), so {what} can be downloaded; check the network, "
                     f"or set HF_ENDPOINT to a Hugging Face mirror, then re-run `{command}`.")


def download_data(num_shards, download_workers=8):
    """Training shards 0..num_shards-1 plus the validation shard. Exits non-zero naming any shard that failed."""
    os.makedirs(DATA_DIR, exist_ok=True)
    _remove_stale_temp_files()
    num_train = MAX_SHARD if num_shards == -1 else min(num_shards, MAX_SHARD)
    indices = list(range(num_train)) + [VAL_SHARD]
    for i in indices:  # a shard that is on disk but broken is fetched again
        path = os.path.join(DATA_DIR, shard_name(i))
        problem = shard_problem(path) if os.path.exists(path) else None
        if problem:
            print(f"{path} is {problem}; downloading it again")
            os.remove(path)
    todo = [i for i in indices if not os.path.exists(os.path.join(DATA_DIR, shard_name(i)))]
    print(f"Data: {len(indices) - len(todo)}/{len(indices)} shards already in {DATA_DIR}, downloading {len(todo)} from {BASE_URL}")
    failures = []
    if todo:
        check_host_reachable(f"{BASE_URL}/{shard_name(todo[0])}")
        lock, received = threading.Lock(), [0]

        def progress(n):
            with lock:
                received[0] += n

        interactive = sys.stdout.isatty()
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=max(1, download_workers)) as pool:
            pending = {pool.submit(download_shard, i, progress) for i in todo}
            while pending:
                try:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:  # Ctrl-C: start no further download (else the whole queue still runs)
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                failures += [f.result() for f in done if f.result() is not None]
                if done or interactive:
                    line = (f"  {len(todo) - len(pending)}/{len(todo)} files, {received[0] / 1e6:.1f} MB, "
                            f"{received[0] / 1e6 / max(time.time() - t0, 1e-9):.1f} MB/s")
                    print(f"\r{line}" if interactive else line, end="" if interactive else "\n", flush=True)
        if interactive:
            print()
    ready = sum(os.path.exists(os.path.join(DATA_DIR, shard_name(i))) for i in indices)
    print(f"Data: {ready}/{len(indices)} shards ready in {DATA_DIR}")
    if failures:
        for f in sorted(failures):
            print(f"  failed: {f}", file=sys.stderr)
        raise SystemExit(f"error: {len(failures)} shard(s) failed to download; re-run `uv run prepare.py` to fetch only the missing ones.")


def prepare_tinystories():
    """TinyStories' one file, downloaded as a shard is (retried, checked, renamed only when complete), then split by
    rows into the held-out, validation and training files. Skipped when the split is on disk; the downloaded file is
    deleted once split (the split holds every row)."""
    os.makedirs(DATA_DIR, exist_ok=True)
    _remove_stale_temp_files()
    first_train = TINYSTORIES_HELDOUT_ROWS + TINYSTORIES_VAL_ROWS
    parts = {HELDOUT_FILENAME: (0, TINYSTORIES_HELDOUT_ROWS), VAL_FILENAME: (TINYSTORIES_HELDOUT_ROWS, first_train),
             TRAIN_FILENAME: (first_train, math.inf)}  # file -> rows [first, end)
    source, command = os.path.join(DATA_DIR, os.path.basename(TINYSTORIES_URL)), prepare_command("tinystories")
    if all(os.path.exists(p) and not shard_problem(p) for p in (os.path.join(DATA_DIR, n) for n in parts)):
        print(f"Data: TinyStories already split in {DATA_DIR}")
    else:
        if os.path.exists(source) and shard_problem(source):
            os.remove(source)
        if not os.path.exists(source):
            print(f"Data: downloading {TINYSTORIES_URL} to {DATA_DIR}", flush=True)
            check_host_reachable(TINYSTORIES_URL, "nothing", command)
            received = [0]

            def progress(n):  # a line per 64 MB
                received[0] += n
                if received[0] >> 26 != (received[0] - n) >> 26:
                    print(f"  {received[0] / 1e6:.0f} MB", flush=True)

            error = download_file(TINYSTORIES_URL, source, progress)
            if error:
                raise SystemExit(f"error: {error}; re-run `{command}` to try again.")
        rows = pq.ParquetFile(source).metadata.num_rows
        if rows <= first_train:
            raise DataError(f"{source} has {rows:,} rows, and TinyStories' split needs more than {first_train:,} "
                            f"({TINYSTORIES_HELDOUT_ROWS:,} held out, {TINYSTORIES_VAL_ROWS:,} for validation, the "
                            f"rest for training); delete it and re-run `{command}`.")
        _split_rows(source, parts)
        print(f"Data: TinyStories' {rows:,} rows split into {HELDOUT_FILENAME} (rows 0-{TINYSTORIES_HELDOUT_ROWS - 1:,}"
              f"), {VAL_FILENAME} (rows {TINYSTORIES_HELDOUT_ROWS:,}-{first_train - 1:,}) and {TRAIN_FILENAME} (the "
              f"rest) in {DATA_DIR}")
    if os.path.exists(source):
        os.remove(source)


def _split_rows(source, parts):
    """Rows [first, end) of `source` into DATA_DIR/file for each file: (first, end) of `parts`, 10,000 rows to a row
    group. Every file is written under a temporary name, and all are renamed only when all are complete."""
    pf = pq.ParquetFile(source)
    tmp = {name: f"{os.path.join(DATA_DIR, name)}.{os.getpid()}.0.tmp" for name in parts}
    writers, start = {}, 0
    try:
        for batch in pf.iter_batches(batch_size=10_000, columns=["text"]):
            for name, (first, end) in parts.items():
                a, b = max(first, start), min(end, start + batch.num_rows)
                if a < b:
                    if name not in writers:
                        writers[name] = pq.ParquetWriter(tmp[name], batch.schema)
                    writers[name].write_batch(batch.slice(a - start, b - a))
            start += batch.num_rows
        for name in parts:
            writers.pop(name).close()
        for name in parts:
            os.replace(tmp[name], os.path.join(DATA_DIR, name))
    finally:
        for writer in writers.values():
            writer.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)

# -----------------------------------------------------------------------------
# Tokenizer


def _tokenizer_texts(found):
    """BPE training text: training shards only, in file and row-group order, documents cut to 10k characters.
    Counts the shards, documents and characters it yields in `found`."""
    for path in shard_paths("train"):
        found["shards"] += 1
        for texts in _row_group_texts(path):
            for text in texts:
                doc = text[:TOKENIZER_DOC_CHARS]
                found["documents"] += 1
                found["characters"] += len(doc)
                yield doc
                if found["characters"] >= TOKENIZER_MAX_CHARS:
                    return


def _save_atomic(obj, path, save):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        save(obj, f)
    os.replace(tmp, path)


def train_tokenizer():
    """Trains the BPE once (skipped when a loadable tokenizer exists). A file lock makes concurrent runs wait, not race."""
    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    with open(os.path.join(TOKENIZER_DIR, ".lock"), "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock, still atomic renames
            pass
        for name in os.listdir(TOKENIZER_DIR):  # left by a run killed while saving; every writer holds the lock
            if name.endswith(".tmp"):
                os.remove(os.path.join(TOKENIZER_DIR, name))
        try:
            Tokenizer.from_directory()
            print(f"Tokenizer: already trained in {TOKENIZER_DIR}")
            return
        except DataError:
            pass
        import rustbpe
        import tiktoken
        t0 = time.time()
        bpe = rustbpe.Tokenizer()
        found = dict(shards=0, documents=0, characters=0)
        n_learned = VOCAB_SIZE - len(SPECIAL_TOKENS)
        bpe.train_from_iterator(_tokenizer_texts(found), n_learned, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        if len(ranks) != n_learned:  # BPE ran out of pairs to merge: checked before anything is saved
            raise DataError(
                f"too little text to train the tokenizer: the {found['shards']} training shard(s) in {DATA_DIR} hold "
                f"{found['documents']:,} documents ({found['characters']:,} characters), which gave {len(ranks):,} "
                f"of the {n_learned:,} learned tokens that the {VOCAB_SIZE:,}-token vocabulary needs (varied text of "
                f"a few hundred thousand characters is usually enough). "
                + (f"Download more shards (`uv run prepare.py --num-shards N` with N above {found['shards']}) or put "
                   "more text in the shards and run `uv run prepare.py` again." if DATASET == "climbmix" else
                   f"The downloaded file is too small or too repetitive: delete {DATA_DIR} and run "
                   f"`{prepare_command()}` again."))
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}  # appended after the learned tokens
        enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)
        assert enc.n_vocab == VOCAB_SIZE, f"trained {enc.n_vocab} tokens, expected {VOCAB_SIZE}"
        # bytes per token as the reference counts them: the token decoded alone (a lone invalid byte becomes
        # U+FFFD, 3 bytes), re-encoded as UTF-8; 0 for the special tokens so evaluate_bpb skips them
        token_bytes = [0 if i in specials.values() else len(enc.decode([i]).encode("utf-8")) for i in range(enc.n_vocab)]
        sample = "Hello world! Numbers: 123, 4567.89. Unicode: 你好世界, привет, مرحبا 🚀"
        assert enc.decode(enc.encode_ordinary(sample)) == sample, "tokenizer round trip failed"
        _save_atomic(torch.tensor(token_bytes, dtype=torch.int32), TOKEN_BYTES_FILE, torch.save)
        _save_atomic(enc, TOKENIZER_FILE, pickle.dump)
        print(f"Tokenizer: trained {enc.n_vocab} tokens in {time.time() - t0:.1f}s, saved to {TOKENIZER_DIR}")


class Tokenizer:
    """tiktoken encoding trained by prepare.py: the learned tokens (8188 for ClimbMix), then the 4 special tokens (BOS
    first)."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)
        self._pool = None  # threads for encode_arrays, started on first use

    @classmethod
    def from_directory(cls, tokenizer_dir=None, vocab_size=None):
        tokenizer_dir, vocab_size = tokenizer_dir or TOKENIZER_DIR, vocab_size or VOCAB_SIZE  # read at call time
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        hint = f"run `{prepare_command()}` to train it"
        if not os.path.exists(path) or not os.path.exists(os.path.join(tokenizer_dir, "token_bytes.pt")):
            raise DataError(f"tokenizer not found in {tokenizer_dir}; {hint}.")
        try:
            with open(path, "rb") as f:
                enc = pickle.load(f)
            tokenizer = cls(enc)
            token_bytes = get_token_bytes(tokenizer_dir=tokenizer_dir)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path} is corrupt ({type(e).__name__}); delete {tokenizer_dir} and {hint}.") from None
        if enc.n_vocab != vocab_size or len(token_bytes) != enc.n_vocab:
            raise DataError(f"tokenizer in {tokenizer_dir} has {enc.n_vocab} tokens and {len(token_bytes)} byte "
                            f"lengths, expected {vocab_size}; delete {tokenizer_dir} and {hint}.")
        return tokenizer

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]], encoded in parallel. `prepend`: a token id or string."""
        if isinstance(prepend, str):
            prepend = self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return ids if prepend is None else [[prepend] + row for row in ids]

    def encode_arrays(self, texts, prepend):
        """list[str] -> one uint32 array per text, `prepend` first: the same ids as encode(), straight from the
        Rust encoder into numpy (no Python int per token). The texts go to the encoder in 8 slices on a thread
        pool (it releases the GIL), each slice one string with the BOS token between documents, so a short
        document costs no Python call of its own; the result is split again at the BOS tokens."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tokenizer")
        if prepend != self.bos_token_id or any(BOS_TOKEN in t for t in texts):  # then the BOS split is ambiguous
            return list(self._pool.map(lambda t: self._one_array(t, prepend), texts))
        bos, k = np.uint32(prepend), max(1, -(-len(texts) // 8))

        def encode_slice(part):
            ids = self.enc.encode_to_numpy(BOS_TOKEN + BOS_TOKEN.join(part), allowed_special={BOS_TOKEN},
                                           disallowed_special=())
            return np.split(ids, np.flatnonzero(ids == bos)[1:])

        return [doc for docs in self._pool.map(encode_slice, [texts[i:i + k] for i in range(0, len(texts), k)])
                for doc in docs]

    def _one_array(self, text, prepend):
        ids = self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        out = np.empty(len(ids) + 1, dtype=np.uint32)
        out[0], out[1:] = prepend, ids
        return out

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu", tokenizer_dir=None):
    """int32 (vocab,): UTF-8 byte length of each token, 0 for special tokens."""
    tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
    path = os.path.join(tokenizer_dir, "token_bytes.pt")
    try:
        token_bytes = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path} is missing or corrupt ({type(e).__name__}); delete {tokenizer_dir} and run "
                        f"`{prepare_command()}` to train the tokenizer again.") from None
    return token_bytes.to(device)

# -----------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing, prepared in a background thread


def _document_batches(paths, batch_size=128):
    """(texts, epoch) forever: shards in file order, row group by row group, 128 documents at a time."""
    for epoch in itertools.count(1):
        for path in paths:
            try:
                for texts in _row_group_texts(path):
                    for i in range(0, len(texts), batch_size):
                        yield texts[i:i + batch_size], epoch
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"cannot read {path} ({e}). Delete it and re-run `{prepare_command()}`.") from None


class DocumentBuffer:
    """Tokenized documents waiting to be packed, indexed by length.

    Picks exactly what a scan of the documents in arrival order would pick (the largest that fits, else the
    shortest; the earliest on ties) in O(log n) instead of O(n) per pick: one FIFO queue per length and a
    sorted list of the lengths present."""

    def __init__(self):
        self.by_length = {}   # length -> deque of documents, earliest first
        self.lengths = []     # sorted distinct lengths present
        self.count = 0

    def add(self, doc):
        n = len(doc)
        q = self.by_length.get(n)
        if q is None:
            q = self.by_length[n] = deque()
            bisect.insort(self.lengths, n)
        q.append(doc)
        self.count += 1

    def pop(self, room):
        """The earliest of the largest documents of length <= room, else the earliest of the shortest."""
        i = max(bisect.bisect_right(self.lengths, room) - 1, 0)  # 0: nothing fits, take the shortest
        n = self.lengths[i]
        q = self.by_length[n]
        doc = q.popleft()
        if not q:
            del self.by_length[n]
            del self.lengths[i]
        self.count -= 1
        return doc


def pack_batches(tokenizer, B, T, doc_batches, buffer_size=1000):
    """(rows, epoch) forever, rows an int64 (B, T+1) array with no padding, each row starting with BOS.

    Each row is filled left to right: take the largest buffered document that fits whole in the room left;
    if none fits, take the shortest, keep its first `room` tokens and drop the rest. The buffer is topped up
    to `buffer_size` documents before each pick."""
    bos = tokenizer.get_bos_token_id()
    encode = getattr(tokenizer, "encode_arrays", tokenizer.encode)  # any tokenizer with encode(list, prepend=)
    buffer = DocumentBuffer()
    epoch = 1
    while True:
        rows = np.empty((B, T + 1), dtype=np.int64)
        for r in range(B):
            pos = 0
            while pos <= T:
                while buffer.count < buffer_size:
                    texts, epoch = next(doc_batches)
                    for doc in encode(texts, prepend=bos):
                        buffer.add(doc)
                doc = buffer.pop(T + 1 - pos)
                n = min(len(doc), T + 1 - pos)
                rows[r, pos:pos + n] = doc[:n]
                pos += n
        yield rows, epoch


_WORKERS = []  # (thread, stop event) of every DataLoader, stopped and joined at exit by _stop_workers


@atexit.register
def _stop_workers():
    """A daemon thread still inside pyarrow's C++ when the interpreter finalizes aborts the process at exit
    ("terminate called without an active exception", SIGABRT instead of the exit status): stop them first."""
    for _, stop in _WORKERS:
        stop.set()
    for thread, _ in _WORKERS:
        thread.join(timeout=10)


class DataLoader:
    """Iterator of (inputs, targets, epoch), inputs and targets (B, T) int64 on `device`.

    A daemon thread reads, tokenizes and packs up to `prefetch` batches ahead of the training loop. Errors in
    it are raised from next(). It stops when the loader is closed or garbage collected."""

    def __init__(self, batches, B, T, device, prefetch=2, served=None):
        self.B, self.T, self.device = B, T, torch.device(device)
        self.wait_seconds = 0.0  # time next() spent blocked on the worker (train.py prints it)
        self._served = served    # the training loader's count of tokens handed out, for the receipt
        self._queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        pin = self.device.type == "cuda"  # pinned host memory makes the copy asynchronous
        # the worker must not reference self, or the loader could never be garbage collected
        self._thread = threading.Thread(target=self._work, args=(batches, B, T, pin, self._queue, self._stop),
                                        name="dataloader", daemon=True)
        self._thread.start()
        _WORKERS[:] = [(t, stop) for t, stop in _WORKERS if t.is_alive()] + [(self._thread, self._stop)]

    @staticmethod
    def _work(batches, B, T, pin, q, stop):
        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for rows, epoch in batches:
                buf = torch.empty(2 * B * T, dtype=torch.long, pin_memory=pin)  # inputs then targets, one copy
                buf[:B * T].view(B, T).copy_(torch.from_numpy(rows[:, :-1]))
                buf[B * T:].view(B, T).copy_(torch.from_numpy(rows[:, 1:]))
                if not put((buf, epoch)):
                    return
        except BaseException as e:
            put(e)

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("dataloader worker stopped") from None
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(item, BaseException):
            self.close()
            raise item
        buf, epoch = item
        if self._served is not None:
            self._served["first_batch"] = self._served["first_batch"] or time.time()
            self._served["train_tokens"] += self.B * self.T
        buf = buf.to(self.device, non_blocking=True)
        return buf[:self.B * self.T].view(self.B, self.T), buf[self.B * self.T:].view(self.B, self.T), epoch

    def close(self):
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __del__(self):
        self._stop.set()


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def make_dataloader(tokenizer, B, T, split, device=None, buffer_size=1000, prefetch=2):
    """Endless (inputs, targets, epoch) of packed B x T batches from the split ("train" or "val"). The receipt
    counts the training tokens it hands out, and notes a loader that reads the validation shard (evaluate_bpb makes
    its own): nothing in a run reads it but the evaluation."""
    paths = shard_paths(split)
    if split == "val" or os.path.realpath(_METRIC.val_path) in map(os.path.realpath, paths):
        _RUN["val_loaders"] += 1
    batches = pack_batches(tokenizer, B, T, _document_batches(paths), buffer_size)
    return DataLoader(batches, B, T, device or default_device(), prefetch, served=_RUN if split == "train" else None)

# -----------------------------------------------------------------------------
# Evaluation: the one metric, and a receipt of what it scored
#
# The number a night judges is the number measured here, whatever train.py does: evaluate_bpb computes the loss
# itself from the model's logits, on rows and files fixed when this module is imported (assigning to its attributes
# from train.py changes nothing it scores), checks that the model does not see later tokens, and prints a receipt
# that `analysis.py record` checks against the run's summary and the baseline's runs.


def _git_state(directory):
    """(HEAD's full hash, tracked files with uncommitted changes) of the checkout holding `directory`; (None, [])
    outside git. Read when a run starts: the commit that ran, and whether it was all that ran."""
    try:
        head = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        status = subprocess.run(["git", "-C", directory, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, []
    if head.returncode or status.returncode:
        return None, []
    return head.stdout.strip(), sorted(line[3:] for line in status.stdout.splitlines())


def _file_digest(path):
    """16 hex digits of a hash of a file's bytes."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _env_number(name, kind):
    """A test-only override from the environment, or None when unset."""
    value = os.environ.get(name)
    try:
        return None if value is None else kind(value)
    except ValueError:
        raise SystemExit(f"error: {name}={value!r} is not a number (it is for tests only: unset it)") from None


# What this run did, for the receipt, from the moment train.py imports this module
_RUN = dict(run=os.urandom(6).hex(), val_loaders=0, train_tokens=0, first_batch=None)
_RUN["commit"], _RUN["dirty"] = _git_state(os.path.dirname(os.path.abspath(__file__)))


class Metric:
    """evaluate_bpb with every input fixed when the Metric is made: the dataset, its sequence length, how many tokens
    it scores, the validation shard, the tokenizer and its token-byte table, the functions that read and pack them,
    and this file's hash. train.py uses the one made at import (evaluate_bpb below); tests make their own on their
    cache (by default on the dataset prepared last there)."""

    def __init__(self, cache_dir, eval_tokens=None, time_budget=None, heldout=False, dataset=None):
        self.dataset = dataset or prepared_dataset(cache_dir)
        d = DATASETS[self.dataset]
        self.seq_len, self.vocab_size, self.tolerance = d["seq_len"], d["vocab_size"], CAUSAL_TOLERANCE
        self._tokens = {"cuda": eval_tokens or d["eval_tokens"], "small": eval_tokens or d["small_eval_tokens"]}
        self._budget = float(TIME_BUDGET if time_budget is None else time_budget)
        self.heldout = heldout
        data_dir, self.tokenizer_dir = dataset_dirs(cache_dir, self.dataset)
        self.val_path = os.path.join(data_dir, d["val"])
        # the morning's held-out part: the dataset's held-out file, else the validation stream after the scored rows
        self.heldout_path = os.path.join(data_dir, d["heldout"]) if d["heldout"] else None
        self.source = _file_digest(__file__)
        self._run, self._tokenizer = _RUN, None
        self._pack, self._documents, self._loader, self._load_tokenizer = (pack_batches, _document_batches,
                                                                            DataLoader, Tokenizer.from_directory)
        self._shard_problem, self._digest = shard_problem, _file_digest

    def time_budget(self):
        """Seconds of training per run: TIME_BUDGET (tests shorten it)."""
        return self._budget

    def eval_tokens(self, device_type):
        """Tokens evaluate_bpb scores for a model on this device type, in whole rows of MAX_SEQ_LEN: EVAL_TOKENS on
        CUDA, SMALL_EVAL_TOKENS on a CPU or Apple MPS (tests set fewer)."""
        tokens = self._tokens["cuda" if device_type == "cuda" else "small"]
        if tokens < self.seq_len:
            raise SystemExit(f"error: AUTORESEARCH_EVAL_TOKENS={tokens} is less than one sequence of "
                             f"{self.seq_len} tokens (it is for tests only: unset it)")
        return tokens // self.seq_len * self.seq_len

    @torch.no_grad()
    def evaluate_bpb(self, model, tokenizer=None, batch_size=128):
        """Validation bits per byte of `model`: summed cross-entropy (nats) over the summed UTF-8 bytes of the target
        tokens, special tokens excluded (independent of the vocabulary size). Scores the first eval_tokens() tokens
        of the validation stream in rows of MAX_SEQ_LEN, the same rows whatever `batch_size` (rows per forward, for
        memory; a last partial batch is padded and its padding not scored). `model(x)` must return (B, T, vocab)
        logits. `tokenizer` is taken for the reference's signature: the cache's tokenizer makes the rows. Prints
        the receipt; returns val_bpb."""
        t0 = time.time()
        device = next(model.parameters()).device
        rows, T = self.eval_tokens(device.type) // self.seq_len, self.seq_len
        hint = f"run `{prepare_command(self.dataset)}`"
        for path in [self.val_path] + [self.heldout_path] * bool(self.heldout and self.heldout_path):
            problem = self._shard_problem(path) if os.path.exists(path) else "missing"
            if problem:
                raise DataError(f"validation shard {path} is {problem}; {hint}.")
        self._tokenizer = self._tokenizer or self._load_tokenizer(self.tokenizer_dir, self.vocab_size)
        table = os.path.join(self.tokenizer_dir, "token_bytes.pt")
        token_bytes = torch.load(table, map_location="cpu", weights_only=True).to(device)
        vocab = self._tokenizer.get_vocab_size()
        digests = {}  # the validation shard's, read in a thread while the model runs
        reader = threading.Thread(target=lambda: digests.update(val=self._digest(self.val_path)), daemon=True)
        reader.start()
        parts = [("val", rows)] + [("heldout", rows)] * self.heldout
        hashes, stream = {name: hashlib.blake2b(digest_size=8) for name, _ in parts}, {"epoch": 1}
        loader = self._loader(self._batches(batch_size, parts, hashes, stream), batch_size, T, device)
        model.eval()  # dropout and the like off: the logits are the model's, not a sample
        sums, leak = {name: ([], []) for name, _ in parts}, None
        try:
            for name, n in parts:
                for start in range(0, n, batch_size):
                    k = min(batch_size, n - start)  # scored rows of this batch
                    x, y, _ = next(loader)
                    ce = self._loss(model, x, y, vocab)
                    if leak is None:
                        leak = self._leak(model, x, y, ce, vocab)
                    b = token_bytes[y[:k]]
                    sums[name][0].append((ce[:k] * (b > 0)).sum())  # per-batch sums stay on the device
                    sums[name][1].append(b.sum())
        finally:
            loader.close()
            reader.join()
        totals = {name: (torch.stack(n).double().sum().item(), int(torch.stack(b).sum().item()))
                  for name, (n, b) in sums.items()}
        bpb = {name: nats / (math.log(2) * nbytes) for name, (nats, nbytes) in totals.items()}
        first = self._run["first_batch"]
        receipt = dict(val_bpb=bpb["val"], dataset=self.dataset, tokens=rows * T, rows=rows, bytes=totals["val"][1],
                       nats=totals["val"][0], sum=hashes["val"].hexdigest(), val=digests["val"],
                       table=self._digest(table),
                       prepare=self.source, seq_len=T, budget=self._budget, batch=batch_size, leak=leak,
                       causal=leak <= self.tolerance, wrapped=stream["epoch"] > 1, val_loaders=self._run["val_loaders"],
                       train_tokens=self._run["train_tokens"], wall=round(t0 - first, 2) if first else None,
                       commit=self._run["commit"], dirty=self._run["dirty"], run=self._run["run"],
                       seconds=round(time.time() - t0, 2))
        if self.heldout:
            receipt["heldout"] = dict(val_bpb=bpb["heldout"], bytes=totals["heldout"][1],
                                      sum=hashes["heldout"].hexdigest())
        print("receipt: " + json.dumps(receipt), flush=True)
        return bpb["val"]

    @staticmethod
    def _loss(model, x, y, vocab):
        """(B, T) cross-entropy in nats of the targets under the model's logits, computed here, in float32."""
        logits = model(x)
        B, T = x.shape
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != (B, T) or \
                logits.size(-1) < vocab:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise SystemExit(f"FAIL: evaluate_bpb needs model(x) to return logits of shape (B, T, vocab) = "
                             f"({B}, {T}, {vocab}) when called without targets; it returned {shape}")
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(B, T)

    def _leak(self, model, x, y, ce, vocab):
        """How far later tokens move the loss at earlier positions: every token from a cut on is replaced (one cut
        per row, spread over the sequence), and the loss at the 4 positions before each cut is compared, mean
        absolute change in nats. The same numbers for a causal model (same shapes, deterministic kernels); large for
        one that sees later tokens, however few (one token ahead moves one position in 4)."""
        B, T = x.shape
        pos = torch.arange(T, device=x.device)[None, :]
        cuts = torch.tensor([T * (r + 1) // (B + 1) for r in range(B)], device=x.device)[:, None]  # (B, 1)
        changed = self._loss(model, torch.where(pos >= cuts, (x + 1) % vocab, x), y, vocab)
        before = (pos < cuts) & (pos >= cuts - 4)
        return (changed - ce).abs()[before].mean().item()

    def _batches(self, B, parts, hashes, stream):
        """(rows, epoch) for the loader's thread: each part's rows in order (the validation stream's; the held-out
        part's from the dataset's held-out file, else from where the scored rows end), B to a batch, a part's last
        batch padded with copies of its first row (one shape all through: a compiled model compiles once); the scored
        rows go into the part's hash."""
        streams = {None: self._pack(self._tokenizer, 1, self.seq_len, self._documents([self.val_path]))}
        for name, n in parts:
            path = self.heldout_path if name == "heldout" else None  # None: the validation stream, continued
            if path not in streams:
                streams[path] = self._pack(self._tokenizer, 1, self.seq_len, self._documents([path]))
            for start in range(0, n, B):
                got = []
                for _ in range(min(B, n - start)):
                    row, epoch = next(streams[path])
                    stream["epoch"] = max(stream["epoch"], epoch)
                    got.append(row[0])
                hashes[name].update(np.stack(got).tobytes())
                yield np.stack(got + got[:1] * (B - len(got))), stream["epoch"]


_METRIC = Metric(CACHE_DIR, dataset=DATASET, eval_tokens=_env_number("AUTORESEARCH_EVAL_TOKENS", int),
                 time_budget=_env_number("AUTORESEARCH_TIME_BUDGET", float),
                 heldout=(os.environ.get("AUTORESEARCH_SEED") or "").isdigit()
                 and int(os.environ["AUTORESEARCH_SEED"]) >= HELDOUT_FROM_SEED)
evaluate_bpb, eval_tokens, time_budget = _METRIC.evaluate_bpb, _METRIC.eval_tokens, _METRIC.time_budget

# -----------------------------------------------------------------------------
# Attention kernel: Flash Attention 3, fetched once into the local cache of the `kernels` package, so that
# train.py loads the same kernel all night without the network (a hub blip would switch a run to flex attention,
# and a new commit on the hub would change the kernel between two runs)


def flash_attention_repo(capability):
    """The hub repo of Flash Attention 3 for a CUDA compute capability (major, minor): the Hopper build on 9.0."""
    return "varunneal/flash-attention-3" if tuple(capability) == (9, 0) else "kernels-community/flash-attn3"


def fetch_attention_kernel(capability):
    """Downloads the kernel for this GPU and this torch into the cache `kernels` reads (KERNELS_CACHE, else the
    Hugging Face hub cache under HF_HOME); a re-run fetches the hub's latest. Returns its path, or None after one
    line saying it failed: that is not an error here, train.py then tries the hub at start, then flex attention."""
    repo = flash_attention_repo(capability)
    try:
        from kernels import install_kernel
        _, path = install_kernel(repo, revision="main")
    except Exception as e:
        print(f"Attention kernel: could not fetch {repo} ({type(e).__name__}); train.py will try the hub "
              "at start, else use flex attention")
        return None
    print(f"Attention kernel: Flash Attention 3 from {repo} in {path}")
    return path


def load_flash_attention_3(capability):
    """(kernel module, repo, "cache" or "hub"). The copy in the local cache, found without any network request;
    only when none is cached for this torch and GPU, the hub through kernels.get_kernel (which caches it)."""
    from kernels import get_kernel, get_local_kernel, install_kernel
    repo = flash_attention_repo(capability)
    try:
        package, variant_path = install_kernel(repo, revision="main", local_files_only=True)
    except FileNotFoundError:  # nothing cached (LocalEntryNotFoundError is one), or no build for this torch/CUDA
        return get_kernel(repo), repo, "hub"
    return get_local_kernel(variant_path.parents[1], package), repo, "cache"  # parents[1]: the snapshot folder

# -----------------------------------------------------------------------------
# GPU memory: whether a micro-batch fits (train.py halves DEVICE_BATCH_SIZE until one does)


def cuda_step_fits(model, batch_size, seq_len, autocast):
    """Whether a forward and backward of batch_size sequences, compiled as in training, fits in the GPU's memory with
    room left for the optimizer's state (at most 2 values per parameter, allocated by the first step)."""
    try:
        with autocast:  # the memory does not depend on the tokens
            model(*[torch.zeros(batch_size, seq_len, dtype=torch.long, device="cuda")] * 2).backward()
        room = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()  # free, plus what this process holds
        fits = torch.cuda.max_memory_allocated() + 2 * sum(p.nbytes for p in model.parameters()) <= room
    except torch.OutOfMemoryError:
        fits = False
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # train.py's peak_vram_mb is the training's
    return fits


# -----------------------------------------------------------------------------
# Main


def mark_prepared(name):
    """Makes `name` the dataset train.py uses: named in the cache root's `dataset` file; for ClimbMix no such file,
    as in every cache made before there was a choice."""
    path = os.path.join(CACHE_DIR, DATASET_FILE)
    if name != "climbmix":
        _save_atomic(f"{name}\n".encode(), path, lambda data, f: f.write(data))
    elif os.path.exists(path):
        os.remove(path)


def main():
    parser = argparse.ArgumentParser(description="Download the data and train the tokenizer for autoresearch.")
    parser.add_argument("--dataset", choices=list(DATASETS), default="climbmix",
                        help="climbmix (the reference's, default) or tinystories (small machines: short stories, "
                             "shorter sequences, a smaller vocabulary, a cache of its own); train.py uses the one "
                             "prepared last")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to download (-1 = all 6542)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--check", action="store_true", help="check the files of the dataset in use (the one "
                        "prepared last) and print one line; nothing is downloaded")
    args = parser.parse_args()
    if args.check:  # program.md's setup: what train.py will read is there and whole (else one `error:` line)
        check_data()
        print(f"Data: {DATASET}, ready in {DATA_DIR}")
        return
    if args.num_shards == 0 or args.num_shards < -1:
        parser.error("--num-shards must be at least 1 (or -1 for all 6542)")
    if args.download_workers < 1:
        parser.error("--download-workers must be at least 1")
    if args.dataset != DATASET:
        use_dataset(args.dataset)
    print(f"Cache: {CACHE_DIR}" + ("" if DATASET == "climbmix" else f" (dataset: {DATASET}, in {DATA_DIR})"))
    try:
        if DATASET == "climbmix":
            download_data(args.num_shards, args.download_workers)
        else:
            prepare_tinystories()
        train_tokenizer()
        if torch.cuda.is_available():
            fetch_attention_kernel(torch.cuda.get_device_capability())
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted: complete files are kept; re-run `{prepare_command()}` to fetch the rest") \
            from None
    mark_prepared(DATASET)
    print("Done: ready to train with `uv run train.py`." if DATASET == "climbmix" else
          f"Done: ready to train on {DATASET} with `uv run train.py` (`uv run prepare.py` switches back to ClimbMix).")


if __name__ == "__main__":
    main()
