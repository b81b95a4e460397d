"""
What prepare.py's checks cost: evaluate_bpb with them (the logits' loss computed in prepare.py, the causality check,
the hashes of the scored tokens, the validation shard and the token-byte table, the receipt) against the reference's
evaluation without them (the model's own per-token loss over whole batches), measured in this one run, alternating,
on train.py's model at this device's settings, and as a share of a default run's total time.

Usage: uv run python dev/benchmark_eval.py [--cache DIR] [--repeats 3]

Without --cache it builds its own (tiny shards served on 127.0.0.1, the real prepare.py) and deletes it at the end.
On CUDA the model is compiled and runs under bf16 autocast, as in train.py. Timings on a shared machine are noisy:
the comparison is a ratio of medians taken in the same run.
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import prepare  # noqa: E402
import train  # noqa: E402
from helpers import Hub, build_model, make_shards, run_script  # noqa: E402


@torch.no_grad()
def evaluate_without_checks(model, tokenizer, batch_size, eval_tokens, cache):
    """The reference's evaluate_bpb: the model's per-token loss over eval_tokens // (B x T) whole batches."""
    token_bytes = torch.load(os.path.join(cache, "tokenizer", "token_bytes.pt"), weights_only=True)
    token_bytes = token_bytes.to(model_device(model))
    batches = prepare.pack_batches(tokenizer, batch_size, prepare.MAX_SEQ_LEN, prepare._document_batches(
        [os.path.join(cache, "data", prepare.VAL_FILENAME)]))
    loader = prepare.DataLoader(batches, batch_size, prepare.MAX_SEQ_LEN, model_device(model))
    nats, nbytes = [], []
    try:
        for _ in range(eval_tokens // (batch_size * prepare.MAX_SEQ_LEN)):
            x, y, _ = next(loader)
            loss = model(x, y, reduction="none").view(-1).float()
            b = token_bytes[y.view(-1)]
            nats.append((loss * (b > 0)).sum())
            nbytes.append(b.sum())
    finally:
        loader.close()
    return torch.stack(nats).double().sum().item() / (math.log(2) * torch.stack(nbytes).sum().item())


def model_device(model):
    return next(model.parameters()).device


def timed(fn):
    train.sync()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16) if train.DEVICE_TYPE == "cuda" else contextlib.nullcontext():
        value = fn()
    train.sync()
    return time.perf_counter() - t0, value


def digest_rate(path, megabytes=256):
    """MB/s of the file hash prepare.py takes of the validation shard, on a file of `megabytes` here."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)
    t0 = time.perf_counter()
    prepare._file_digest(path)
    seconds = time.perf_counter() - t0
    os.remove(path)
    return megabytes / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="a prepared cache (default: build a tiny one)")
    parser.add_argument("--repeats", type=int, default=3, help="evaluations of each kind, alternating")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autoresearch-benchmark-eval-"))
    try:
        cache = args.cache
        if cache is None:
            cache = str(work / "cache")
            hub = Hub(work / "hub")
            try:
                make_shards(hub.shard_dir, n_docs=4000)
                r = run_script("prepare.py", "--num-shards", "2", cache=cache, endpoint=hub.url)
            finally:
                hub.close()
            assert r.returncode == 0, r.stdout + r.stderr
        tokenizer = prepare.Tokenizer.from_directory(os.path.join(cache, "tokenizer"))
        metric = prepare.Metric(cache)
        eval_tokens = metric.eval_tokens(train.DEVICE_TYPE)
        B = train.DEVICE_BATCH_SIZE
        model = build_model(train.DEPTH, tokenizer.get_vocab_size())
        forward = torch.compile(model, dynamic=False) if train.DEVICE_TYPE == "cuda" else model
        print(f"device {train.DEVICE_TYPE}, torch {torch.__version__}, DEPTH {train.DEPTH}, batch {B}, "
              f"{eval_tokens:,} tokens scored; cache {cache}")
        timed(lambda: evaluate_without_checks(forward, tokenizer, B, eval_tokens, cache))  # warm-up (compiles)
        with contextlib.redirect_stdout(io.StringIO()):
            timed(lambda: metric.evaluate_bpb(forward, tokenizer, B))
        without, checked = [], []
        for _ in range(args.repeats):
            s, plain = timed(lambda: evaluate_without_checks(forward, tokenizer, B, eval_tokens, cache))
            without.append(s)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                s, bpb = timed(lambda: metric.evaluate_bpb(forward, tokenizer, B))
            checked.append(s)
        receipt = json.loads(out.getvalue().split("receipt: ")[-1])
        a, b = statistics.median(without), statistics.median(checked)
        run_total = prepare.TIME_BUDGET + b  # a default run: the budget, its evaluation (start-up not counted)
        rate = digest_rate(work / "digest.bin")
        shard_mb = os.path.getsize(os.path.join(cache, "data", prepare.VAL_FILENAME)) / 1e6
        print(f"val_bpb without the checks {plain:.6f}, with them {bpb:.6f} (the same rows: equal to float noise)")
        print(f"its receipt: {receipt['tokens']:,} tokens, {receipt['bytes']:,} bytes, causal {receipt['causal']} "
              f"(leak {receipt['leak']:.1e} nats)")
        print()
        print("| | seconds (median of {}) |".format(args.repeats))
        print("|---|---|")
        print(f"| evaluation without the checks | {a:.2f} |")
        print(f"| evaluate_bpb with the checks | {b:.2f} ({b / a:.3f}x) |")
        print(f"| the checks' cost | {b - a:+.2f} s = {100 * (b - a) / run_total:+.2f}% of a default run "
              f"({prepare.TIME_BUDGET} s of training + this evaluation) |")
        print(f"| hashing the validation shard ({shard_mb:.1f} MB here), in a thread beside the evaluation | "
              f"{rate:.0f} MB/s |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
