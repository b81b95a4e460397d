"""
Benchmark of the packing rule: prepare.pack_batches (documents indexed by length) against the naive packer of
tests/helpers.py (a list scanned in full for every document placed), on the same pre-tokenized documents
at the training shape B=128, T=2048. Checks both produce the same batches, prints tokens/s and the speed-up.

Usage: uv run python dev/benchmark_packing.py [--batches 8] [--docs 12000] [--join 1]
"""

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the scripts, and tests/helpers.py
os.environ["AUTORESEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoresearch-bench-")  # before prepare is imported

import numpy as np  # noqa: E402

import prepare  # noqa: E402
from helpers import make_documents, naive_pack_batches, write_shard  # noqa: E402

B, T = 128, 2048  # prepare's training shape: DEVICE_BATCH_SIZE x MAX_SEQ_LEN


class Pretokenized:
    """Stands in for the tokenizer: 'texts' are document numbers, answered from documents tokenized up front,
    so both timings measure the packing rule and nothing else. Each packer gets the tokenizer's output in the
    form it asks for: lists from encode() (the naive packer, as in the reference), uint32 arrays from
    encode_arrays() (prepare.pack_batches; the real tokenizer writes those from Rust, in its worker threads)."""

    def __init__(self, docs, bos, arrays=None):
        self.docs, self.bos = docs, bos
        self.arrays = arrays if arrays is not None else [np.array(d, dtype=np.uint32) for d in docs]

    def get_bos_token_id(self):
        return self.bos

    def encode(self, keys, prepend=None):
        assert prepend == self.bos
        return [self.docs[k] for k in keys]

    def encode_arrays(self, keys, prepend):
        assert prepend == self.bos
        return [self.arrays[k] for k in keys]


def document_batches(n_docs, batch_size=128):
    for epoch in itertools.count(1):
        for i in range(0, n_docs, batch_size):
            yield list(range(i, min(i + batch_size, n_docs))), epoch


def naive_arrays(tokenizer, B, T, doc_batches):
    """The naive packer's rows as an int64 array, as a training step needs them (the reference converts each
    placed document with torch.tensor; converting the finished rows once costs the same or less)."""
    for rows, epoch in naive_pack_batches(tokenizer, B, T, doc_batches):
        yield np.array(rows, dtype=np.int64), epoch


def run(pack, tokenizer, n_docs, n_batches):
    batches = pack(tokenizer, B, T, document_batches(n_docs))
    t0 = time.perf_counter()
    out = [next(batches) for _ in range(n_batches)]
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="batches of 128 x 2049 tokens to pack")
    parser.add_argument("--docs", type=int, default=12000, help="distinct documents (cycled through as epochs)")
    parser.add_argument("--join", type=int, default=1, help="join this many generated documents into one (longer)")
    args = parser.parse_args()

    print(f"Generating {args.docs} documents and training the tokenizer in {prepare.CACHE_DIR} ...", flush=True)
    texts = make_documents(0, args.docs * args.join)
    texts = ["\n\n".join(texts[i:i + args.join]) for i in range(0, len(texts), args.join)]
    try:
        write_shard(os.path.join(prepare.DATA_DIR, "shard_00000.parquet"), texts)
        prepare.train_tokenizer()
        tokenizer = prepare.Tokenizer.from_directory()
    finally:
        shutil.rmtree(prepare.CACHE_DIR)
    docs = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())
    lengths = np.array([len(d) for d in docs])
    print(f"documents: {len(docs)}, tokens per document: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
          f"max {lengths.max()}, longer than a row: {(lengths > T + 1).mean():.1%}")

    fake = Pretokenized(docs, tokenizer.get_bos_token_id())
    fast, fast_s = run(prepare.pack_batches, fake, len(docs), args.batches)
    naive, naive_s = run(naive_arrays, fake, len(docs), args.batches)
    for i, ((rows, epoch), (naive_rows, naive_epoch)) in enumerate(zip(fast, naive)):
        assert np.array_equal(rows, naive_rows) and epoch == naive_epoch, f"batch {i} differs"

    tokens = args.batches * B * T
    print(f"packed {args.batches} batches of {B} x {T + 1} tokens (epochs {fast[0][1]}-{fast[-1][1]}): identical")
    print(f"naive packer (list scan):    {naive_s:7.3f} s  {tokens / naive_s:14,.0f} tokens/s  "
          f"{1e3 * naive_s / args.batches:8.1f} ms/batch")
    print(f"prepare.pack_batches:        {fast_s:7.3f} s  {tokens / fast_s:14,.0f} tokens/s  "
          f"{1e3 * fast_s / args.batches:8.1f} ms/batch")
    print(f"speed-up: {naive_s / fast_s:.1f}x")


if __name__ == "__main__":
    main()
