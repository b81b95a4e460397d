"""
Tests for prepare.py: the download, the tokenizer, the packing dataloader (against a naive packer that
transcribes the spec), evaluate_bpb (against a hand computation), and the error messages of a broken cache.

Run: uv run pytest tests/test_prepare.py
"""

import contextlib
import functools
import gc
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch
import torch.nn.functional as F

import prepare
from helpers import HUB_PATH, ROOT, Hub, make_documents, naive_pack_batches, run_script, script_env, write_shard

VOCAB_SIZE = 8192
BOS_ID = 8188  # <|reserved_0|>, the first special token after the 8188 learned ones
VAL_NAME = "shard_06542.parquet"

# -----------------------------------------------------------------------------
# The naive packer (tests/helpers.py: the spec's rule written as plainly as possible), fed as the spec says


def naive_document_batches(paths):
    """(texts, epoch) forever: files in order, row group by row group, 128 documents per tokenizer call."""
    epoch = 1
    while True:
        for path in paths:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                texts = pf.read_row_group(rg).column("text").to_pylist()
                for i in range(0, len(texts), 128):
                    yield texts[i:i + 128], epoch
        epoch += 1


def naive_batches(tokenizer, B, T, doc_batches, min_epoch=1, min_batches=1):
    """(inputs, targets, epoch) tensors from the naive packer, until both the epoch and the count are reached."""
    out = []
    for rows, epoch in naive_pack_batches(tokenizer, B, T, doc_batches):
        rows = torch.tensor(rows, dtype=torch.long)
        out.append((rows[:, :-1], rows[:, 1:], epoch))
        if epoch >= min_epoch and len(out) >= min_batches:
            return out


class WordTokenizer:
    """Fake tokenizer: each whitespace-separated integer of a text is one token id, so lengths are exact."""

    def get_bos_token_id(self):
        return 0

    def encode(self, texts, prepend=None):
        return [[prepend] + [int(w) for w in text.split()] for text in texts]


def cycle_batches(texts, batch_size=128):
    """(texts, epoch) forever over an in-memory list, like the shard reader."""
    for epoch in itertools.count(1):
        for i in range(0, len(texts), batch_size):
            yield texts[i:i + batch_size], epoch


def tie_heavy_texts(n_docs, seed):
    """Documents of 0-11 tokens (before BOS): many exact ties. Each document's tokens are its own number."""
    rng = np.random.default_rng(seed)
    return [" ".join([str(k)] * int(rng.integers(0, 12))) for k in range(1, n_docs + 1)]


# -----------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tokenizer(prepared_cache):
    return prepare.Tokenizer.from_directory(str(prepared_cache / "tokenizer"))


@pytest.fixture
def small_data(tmp_path, monkeypatch):
    """A data directory of small shards (row groups of 200, so tokenizer batches of 128 and 72), used by prepare."""
    data = tmp_path / "data"
    for index, n_docs in [(0, 450), (1, 130), (2, 90), (6542, 300)]:
        write_shard(data / f"shard_{index:05d}.parquet", make_documents(100 + index, n_docs), row_group_size=200)
    monkeypatch.setattr(prepare, "DATA_DIR", str(data))
    return data


# -----------------------------------------------------------------------------
# Download, end to end through `python prepare.py`


@pytest.fixture(scope="module")
def download(prepared_run, tmp_path_factory):
    """The session's `prepare.py --num-shards 2` (from a hub that also serves shard 2), then a second run on a copy
    of its cache."""
    cache = tmp_path_factory.mktemp("download") / "cache"
    shutil.copytree(prepared_run["cache"], cache)
    hub = Hub(prepared_run["hub_root"])
    try:
        second = run_script("prepare.py", "--num-shards", "2", cache=cache, endpoint=hub.url)
    finally:
        hub.close()
    return dict(hub=hub, cache=prepared_run["cache"], first=prepared_run["result"], second=second,
                first_requests=prepared_run["requests"], second_requests=hub.requests)


def test_prepare_downloads_training_shards_and_validation_shard_intact(download):
    first, cache, hub = download["first"], download["cache"], download["hub"]
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["shard_00000.parquet", "shard_00001.parquet", VAL_NAME]
    assert sorted(os.listdir(cache / "data")) == names
    for name in names:
        assert (cache / "data" / name).read_bytes() == (hub.shard_dir / name).read_bytes(), name
    assert "3/3 shards ready" in first.stdout


def test_prepare_trains_and_saves_the_tokenizer(download):
    cache = download["cache"]
    assert (cache / "tokenizer" / "tokenizer.pkl").is_file()
    assert (cache / "tokenizer" / "token_bytes.pt").is_file()
    assert "Tokenizer: trained 8192 tokens" in download["first"].stdout
    assert list(cache.rglob("*.tmp")) == []


def test_prepare_fetches_no_shard_beyond_num_shards(download):
    requested = sorted(path.rsplit("/", 1)[-1] for path in download["first_requests"])
    assert requested == ["shard_00000.parquet", "shard_00001.parquet", VAL_NAME]
    assert all(path.startswith(f"/{HUB_PATH}/") for path in download["first_requests"])
    assert not (download["cache"] / "data" / "shard_00002.parquet").exists()


def test_prepare_rerun_downloads_nothing_and_keeps_the_tokenizer(download):
    second = download["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    assert download["second_requests"] == []
    assert "3/3 shards already" in second.stdout
    assert "Tokenizer: already trained" in second.stdout


# -----------------------------------------------------------------------------
# Tokenizer (the one trained by prepare.py for the session's cache)


def test_tokenizer_has_8188_learned_tokens_then_4_reserved_special_tokens(tokenizer):
    enc = tokenizer.enc
    assert tokenizer.get_vocab_size() == enc.n_vocab == VOCAB_SIZE
    assert tokenizer.get_bos_token_id() == BOS_ID
    assert enc.special_tokens_set == {f"<|reserved_{i}|>" for i in range(4)}
    for i in range(4):
        assert enc.encode_single_token(f"<|reserved_{i}|>") == 8188 + i
    learned = [enc.decode_single_token_bytes(i) for i in range(8188)]  # raises if an id is missing
    assert len(set(learned)) == 8188 and all(learned)


def test_token_bytes_is_utf8_length_of_each_token_decoded_alone(prepared_cache, tokenizer):
    token_bytes = torch.load(prepared_cache / "tokenizer" / "token_bytes.pt", weights_only=True)
    assert token_bytes.shape == (VOCAB_SIZE,)
    assert token_bytes[8188:].tolist() == [0, 0, 0, 0]
    expected = [len(tokenizer.decode([i]).encode("utf-8")) for i in range(8188)]
    assert token_bytes[:8188].tolist() == expected
    assert min(expected) > 0
    assert torch.equal(prepare.get_token_bytes(tokenizer_dir=str(prepared_cache / "tokenizer")), token_bytes)


def test_tokenizer_round_trips_mixed_text(tokenizer):
    text = "Year 2024: 1234567 items.\n\nПривет, мир! 你好世界 🚀🙂 café naïve\ttabs  and   spaces\r\nend"
    ids = tokenizer.encode(text)
    assert all(0 <= i < 8188 for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(text, prepend=BOS_ID)) == "<|reserved_0|>" + text


def test_tokenizer_batch_encode_matches_single_encode_with_prepend(tokenizer):
    texts = make_documents(7, 50) + ["", "42", "привет 你好"]
    expected = [tokenizer.encode(t, prepend=BOS_ID) for t in texts]
    assert tokenizer.encode(texts, prepend=BOS_ID) == expected
    assert tokenizer.encode(texts, prepend="<|reserved_0|>") == expected
    assert tokenizer.encode(texts) == [row[1:] for row in expected]
    assert all(row[0] == BOS_ID for row in expected)


@pytest.mark.parametrize("n", [1, 9, 128, 131])
def test_encode_arrays_matches_encode_document_by_document(tokenizer, n):
    # the packer's encoder joins each slice of documents with BOS and splits the ids again: the boundaries,
    # whitespace at either end and empty documents must come out exactly as one encode per document
    edges = ["", "  spaces at both ends  ", "\n\n", "", "привет 你好 🚀", "end with newline\n", "1234", " "]
    texts = [edges[i % len(edges)] if i % 3 == 0 else doc for i, doc in enumerate(make_documents(40 + n, n))]
    got = tokenizer.encode_arrays(texts, prepend=BOS_ID)
    assert [a.dtype for a in got] == [np.uint32] * n
    assert [a.tolist() for a in got] == tokenizer.encode(texts, prepend=BOS_ID)


def test_encode_arrays_treats_special_token_text_in_a_document_as_text(tokenizer):
    texts = ["plain", "has <|reserved_0|> inside", "<|reserved_1|>", "more"]
    got = tokenizer.encode_arrays(texts, prepend=BOS_ID)
    assert [a.tolist() for a in got] == tokenizer.encode(texts, prepend=BOS_ID)
    assert BOS_ID not in got[1].tolist()[1:]


def test_tokenizer_splits_numbers_into_groups_of_at_most_two_digits(tokenizer):
    digits = set(b"0123456789")
    learned = [tokenizer.enc.decode_single_token_bytes(i) for i in range(8188)]
    with_digits = [b for b in learned if digits & set(b)]
    assert any(len(b) == 2 for b in with_digits), "the training text has numbers: some 2-digit token is learned"
    assert all(set(b) <= digits and len(b) <= 2 for b in with_digits), [b for b in with_digits if len(b) > 2]
    # the groups start from the left: no token straddles digits 2|3, 4|5, ...
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("1234567")]
    assert "".join(pieces) == "1234567"
    boundaries = set(itertools.accumulate(len(p) for p in pieces))
    assert {2, 4, 6, 7} <= boundaries


def test_corrupt_tokenizer_file_is_a_data_error_naming_the_file(prepared_cache, tmp_path):
    shutil.copytree(prepared_cache / "tokenizer", tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(prepare.DataError, match="tokenizer.pkl is corrupt") as e:
        prepare.Tokenizer.from_directory(str(tmp_path / "tokenizer"))
    assert "uv run prepare.py" in str(e.value.code)


# -----------------------------------------------------------------------------
# Packing: the fast packer equals the naive one, token for token


def test_packing_rule_on_a_hand_worked_example():
    # capacity T+1 = 6, buffer of 3 documents, one document per tokenizer call; lengths include BOS
    texts = ["1 1", "2 2 2 2 2 2 2", "3 3", "4", "5 5 5 5 5 5", "6 6 6 6 6", "7 7 7 7 7 7"]
    expected = [[0, 1, 1, 0, 3, 3],   # doc 1 (3 tokens) and doc 3 (3) tie for the room of 6: the first wins
                [0, 4, 0, 6, 6, 6],   # doc 4 fits; then nothing fits the room of 4: the shortest, doc 6, cropped
                [0, 5, 5, 5, 5, 5]]   # nothing fits: docs 5 and 7 tie for shortest (7): the first, cropped
    for pack in (prepare.pack_batches, naive_pack_batches):
        rows, epoch = next(pack(WordTokenizer(), 3, 5, iter([([t], 1) for t in texts]), buffer_size=3))
        assert np.asarray(rows).tolist() == expected, pack.__name__
        assert epoch == 1


@pytest.mark.parametrize("B,T", [(1, 3), (2, 7), (4, 12), (3, 40)])
def test_pack_batches_equals_naive_packer_on_exact_ties(B, T):
    texts = tie_heavy_texts(1500, seed=B * 100 + T)
    fast = prepare.pack_batches(WordTokenizer(), B, T, cycle_batches(texts))
    naive = naive_pack_batches(WordTokenizer(), B, T, cycle_batches(texts))
    epoch = 1
    while epoch < 4:  # several passes over the documents
        (rows, epoch), (naive_rows, naive_epoch) = next(fast), next(naive)
        assert rows.dtype == np.int64 and rows.shape == (B, T + 1)
        assert rows.tolist() == naive_rows
        assert epoch == naive_epoch


@pytest.mark.parametrize("B,T", [(1, 16), (4, 64), (3, 300), (2, 2048)])
def test_make_dataloader_equals_naive_packer_over_several_epochs(small_data, tokenizer, B, T):
    train = [small_data / f"shard_{i:05d}.parquet" for i in (0, 1, 2)]
    expected = naive_batches(tokenizer, B, T, naive_document_batches(train), min_epoch=4)
    loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cpu")
    try:
        for i, (inputs, targets, epoch) in enumerate(expected):
            x, y, e = next(loader)
            assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (B, T)
            assert torch.equal(x, inputs) and torch.equal(y, targets), f"batch {i}"
            assert e == epoch, f"batch {i}"
            assert (x[:, 0] == BOS_ID).all()
            assert torch.equal(x[:, 1:], y[:, :-1])
    finally:
        loader.close()
    assert expected[0][2] == 2 and expected[-1][2] == 4  # the first 1000 buffered documents span 2 passes of 670


def test_val_split_reads_only_the_validation_shard(small_data, tokenizer):
    expected = naive_batches(tokenizer, 2, 256, naive_document_batches([small_data / VAL_NAME]), min_epoch=3)
    loader = prepare.make_dataloader(tokenizer, 2, 256, "val", device="cpu")
    try:
        for inputs, targets, epoch in expected:
            x, y, e = next(loader)
            assert torch.equal(x, inputs) and torch.equal(y, targets) and e == epoch
    finally:
        loader.close()


def test_dataloader_yields_exactly_what_pack_batches_yields_whatever_the_prefetch():
    texts = tie_heavy_texts(800, seed=1)
    direct = list(itertools.islice(prepare.pack_batches(WordTokenizer(), 4, 9, cycle_batches(texts)), 50))
    for prefetch in (1, 2, 8):
        loader = prepare.DataLoader(prepare.pack_batches(WordTokenizer(), 4, 9, cycle_batches(texts)), 4, 9, "cpu",
                                    prefetch=prefetch)
        try:
            for rows, epoch in direct:
                x, y, e = next(loader)
                assert torch.equal(x, torch.from_numpy(rows[:, :-1])) and torch.equal(y, torch.from_numpy(rows[:, 1:]))
                assert e == epoch
        finally:
            loader.close()


# -----------------------------------------------------------------------------
# DataLoader: the background thread


def new_dataloader_threads(before):
    return [t for t in threading.enumerate() if t.name == "dataloader" and t not in before and t.is_alive()]


def endless_loader():
    return prepare.DataLoader(prepare.pack_batches(WordTokenizer(), 2, 16, cycle_batches(tie_heavy_texts(500, 2))),
                              2, 16, "cpu")


def test_closing_a_dataloader_stops_its_thread():
    before = set(threading.enumerate())
    loader = endless_loader()
    next(loader)
    assert len(new_dataloader_threads(before)) == 1
    loader.close()
    assert new_dataloader_threads(before) == []


def test_dropping_a_dataloader_stops_its_thread():
    before = set(threading.enumerate())
    loader = endless_loader()
    next(loader)
    (thread,) = new_dataloader_threads(before)
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_no_dataloader_thread_is_left_running_when_the_interpreter_exits(prepared_cache):
    # a daemon thread inside pyarrow when Python finalizes aborts the process (exit -6, seen in CI when
    # train.py stopped on a missing validation shard with its training loader running): prepare.py joins them
    # at exit. This atexit hook is registered before prepare's, so it runs after it.
    script = (
        "import atexit, sys, threading\n"
        "atexit.register(lambda: print('alive at exit:', [t.name for t in threading.enumerate()"
        " if t.name == 'dataloader' and t.is_alive()]))\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import prepare\n"
        "loader = prepare.make_dataloader(prepare.Tokenizer.from_directory(), 4, 64, 'train', device='cpu')\n"
        "next(loader)\n"
        "raise SystemExit('error: stopping with the loader running')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=script_env(prepared_cache), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "alive at exit: []" in result.stdout, result.stdout + result.stderr
    assert result.stderr.strip() == "error: stopping with the loader running"


def test_an_error_in_the_producer_is_raised_by_next_with_its_message():
    before = set(threading.enumerate())

    def batches():
        yield np.zeros((1, 5), dtype=np.int64), 1
        raise ValueError("shard_00003.parquet exploded")

    loader = prepare.DataLoader(batches(), 1, 4, "cpu")
    x, y, epoch = next(loader)
    assert x.tolist() == [[0, 0, 0, 0]] and epoch == 1
    with pytest.raises(ValueError, match="shard_00003.parquet exploded"):
        next(loader)
    assert new_dataloader_threads(before) == []


# -----------------------------------------------------------------------------
# evaluate_bpb


class TinyBigram(torch.nn.Module):
    """Next-token logits from the current token only (rank 16): (B, T, vocab) logits without targets, like train.py's
    GPT."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB_SIZE, 16, generator=g))
        self.head = torch.nn.Parameter(torch.randn(16, VOCAB_SIZE, generator=g) * 0.5)

    def forward(self, x, y=None, reduction="mean"):
        logits = self.embed[x] @ self.head
        if y is None:
            return logits
        return F.cross_entropy(logits.view(-1, VOCAB_SIZE), y.reshape(-1), reduction=reduction)


class Uniform(torch.nn.Module):
    """The same probability 1/8192 for every token: a loss of ln(8192) nats on every target."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y=None, reduction="mean"):
        return torch.zeros(*x.shape, VOCAB_SIZE)


class PeeksAhead(TinyBigram):
    """A bigram that also sees the next token (a non-causal model): its logits at t depend on x[t + 1]."""

    def forward(self, x, y=None, reduction="mean"):
        ahead = torch.cat([x[:, 1:], x[:, -1:]], 1)
        return self.embed[x] @ self.head + 0.5 * self.embed[ahead] @ self.head


@pytest.fixture
def val_setup(prepared_cache, tokenizer):
    """The val batches evaluate_bpb sees for 2 rows per batch, 2 batches, and the token-byte table."""
    batches = naive_batches(tokenizer, 2, 2048, naive_document_batches([prepared_cache / "data" / VAL_NAME]),
                            min_batches=2)
    token_bytes = torch.load(prepared_cache / "tokenizer" / "token_bytes.pt", weights_only=True)
    return batches, token_bytes.long()


EVAL_TOKENS = 2 * 2 * 2048 + 1000  # 4 rows of 2048 tokens (the remainder is not evaluated)


def evaluate(cache, model, batch_size=2, capsys=None, **metric):
    """evaluate_bpb of a Metric on `cache` (as train.py's, made at import, on its own cache): (val_bpb, receipt)."""
    bpb = prepare.Metric(cache, **dict(dict(eval_tokens=EVAL_TOKENS), **metric)).evaluate_bpb(model, None, batch_size)
    out = capsys.readouterr().out if capsys else ""
    receipts = [json.loads(line[len("receipt: "):]) for line in out.splitlines() if line.startswith("receipt: ")]
    return bpb, receipts[-1] if receipts else None


@pytest.fixture(scope="module")
def bigram(prepared_cache):
    """TinyBigram's (val_bpb, receipt) from a Metric on the session's cache: 4 rows, 2 to a batch."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bpb = prepare.Metric(prepared_cache, eval_tokens=EVAL_TOKENS).evaluate_bpb(TinyBigram(), None, 2)
    return bpb, json.loads(out.getvalue().split("receipt: ")[-1])


def test_evaluate_bpb_equals_hand_computation(prepared_cache, val_setup, capsys):
    batches, token_bytes = val_setup
    model = TinyBigram()
    nats = nbytes = 0.0
    for x, y, _ in batches:
        logits = model.embed.double()[x] @ model.head.double()  # (B, T, V)
        ce = torch.logsumexp(logits, -1) - logits.gather(-1, y[..., None]).squeeze(-1)
        b = token_bytes[y]
        nats += ce[b > 0].sum().item()
        nbytes += b.sum().item()
    expected = nats / (math.log(2) * nbytes)
    before = set(threading.enumerate())
    bpb, receipt = evaluate(prepared_cache, model, capsys=capsys)
    assert bpb == pytest.approx(expected, rel=1e-5)
    assert new_dataloader_threads(before) == []  # its loader is closed
    assert receipt["val_bpb"] == bpb and receipt["tokens"] == 4 * 2048 and receipt["rows"] == 4
    assert receipt["bytes"] == nbytes and receipt["nats"] == pytest.approx(nats, rel=1e-5)
    assert receipt["causal"] and receipt["leak"] == 0.0 and receipt["seq_len"] == 2048
    assert receipt["val"] == prepare._file_digest(prepared_cache / "data" / VAL_NAME)
    assert receipt["table"] == prepare._file_digest(prepared_cache / "tokenizer" / "token_bytes.pt")
    assert receipt["prepare"] == prepare._file_digest(prepare.__file__) and "heldout" not in receipt


def test_evaluate_bpb_of_a_uniform_model_is_13_bits_per_token_over_bytes_per_token(prepared_cache, val_setup):
    batches, token_bytes = val_setup
    targets = torch.cat([y.reshape(-1) for _, y, _ in batches])
    counted = token_bytes[targets] > 0
    assert (targets == BOS_ID).sum() > 0 and not counted[targets == BOS_ID].any()
    expected = 13 * counted.sum().item() / token_bytes[targets].sum().item()  # log2(8192) = 13 bits per token
    assert evaluate(prepared_cache, Uniform())[0] == pytest.approx(expected, rel=1e-6)


def test_evaluate_bpb_does_not_count_special_token_targets(prepared_cache, val_setup):
    """A model that never predicts BOS (its logit -1e4: a loss of ~1e4 nats on each BOS target) scores as the
    hand computation that leaves those targets out."""
    batches, token_bytes = val_setup
    assert sum((y == BOS_ID).sum().item() for _, y, _ in batches) > 0  # documents start mid-row: BOS targets

    class NeverBos(TinyBigram):
        def forward(self, x, y=None, reduction="mean"):
            return super().forward(x).index_fill(-1, torch.tensor([BOS_ID]), -1e4)

    model, nats, nbytes = NeverBos(), 0.0, 0
    for x, y, _ in batches:
        ce = F.cross_entropy(model(x).flatten(0, 1).double(), y.flatten(), reduction="none")
        b = token_bytes[y.flatten()]
        nats, nbytes = nats + ce[b > 0].sum().item(), nbytes + b.sum().item()
    assert evaluate(prepared_cache, model)[0] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)


def test_evaluate_bpb_scores_the_same_rows_whatever_the_batch_size(prepared_cache, bigram, capsys):
    """The batch is for memory only: the 4 rows are scored at 1 or 3 rows per forward (a last batch of one, padded)
    with the same tokens and bytes as at 2."""
    bpb, receipt = bigram
    for batch_size in (1, 3):
        other, other_receipt = evaluate(prepared_cache, TinyBigram(), batch_size, capsys)
        assert other == pytest.approx(bpb, rel=1e-6)
        same = ("tokens", "bytes", "sum")
        assert {k: other_receipt[k] for k in same} == {k: receipt[k] for k in same}
        assert other_receipt["batch"] == batch_size


def test_assigning_to_prepare_from_train_py_changes_nothing_evaluate_bpb_scores(prepared_cache, monkeypatch, capsys):
    """What an agent's train.py might set on the module after importing it: a shorter sequence, fewer tokens,
    another shard as validation data, a token-byte table counting more bytes, another packer, a looser causality
    check. The Metric made before (as evaluate_bpb is made when train.py imports prepare) reads none of them."""
    metric = prepare.Metric(prepared_cache, eval_tokens=EVAL_TOKENS)
    bpb = metric.evaluate_bpb(TinyBigram(), None, 2)
    receipt = json.loads(capsys.readouterr().out.split("receipt: ")[-1])
    for name, value in [("MAX_SEQ_LEN", 512), ("EVAL_TOKENS", 2048), ("SMALL_EVAL_TOKENS", 2048),
                        ("VAL_FILENAME", "shard_00000.parquet"), ("DATA_DIR", str(prepared_cache / "nowhere")),
                        ("TOKENIZER_DIR", str(prepared_cache / "nowhere")), ("CAUSAL_TOLERANCE", 1e9),
                        ("get_token_bytes", lambda *a, **k: torch.full((VOCAB_SIZE,), 100)),
                        ("pack_batches", lambda *a, **k: iter(())), ("_document_batches", lambda *a, **k: iter(()))]:
        monkeypatch.setattr(prepare, name, value)
    assert metric.evaluate_bpb(PeeksAhead(), None, 2) != bpb  # the model is what it scores...
    assert json.loads(capsys.readouterr().out.split("receipt: ")[-1])["causal"] is False
    assert metric.evaluate_bpb(TinyBigram(), None, 2) == bpb  # ...and nothing else
    again = json.loads(capsys.readouterr().out.split("receipt: ")[-1])
    timing = ("seconds", "wall")  # how long it took, and since the first training batch of this process
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in receipt.items() if k not in timing}
    assert prepare.evaluate_bpb.__self__ is prepare._METRIC and prepare._METRIC.seq_len == 2048


def test_a_model_that_sees_later_tokens_is_named_in_the_receipt(prepared_cache, bigram, capsys):
    causal = bigram[1]
    _, peeks = evaluate(prepared_cache, PeeksAhead(), capsys=capsys)
    assert causal["causal"] and causal["leak"] == 0.0
    assert not peeks["causal"] and peeks["leak"] > 10 * prepare.CAUSAL_TOLERANCE  # one token ahead, half weight


def test_the_held_out_part_follows_the_scored_rows_and_is_scored_only_when_asked(prepared_cache, tokenizer, bigram,
                                                                                   capsys):
    """Under a confirmation seed (prepare reads AUTORESEARCH_SEED >= HELDOUT_FROM_SEED at import) the receipt also
    scores the 4 rows after the scored ones; the scored part is the same as without."""
    bpb, receipt = bigram
    both, with_heldout = evaluate(prepared_cache, TinyBigram(), capsys=capsys, heldout=True)
    assert both == bpb and with_heldout["sum"] == receipt["sum"]
    held = with_heldout["heldout"]
    assert held["bytes"] > 0 and 0 < held["val_bpb"] < 20
    val = naive_document_batches([prepared_cache / "data" / VAL_NAME])
    inputs, targets, _ = naive_batches(tokenizer, 8, 2048, val)[0]
    stream = torch.cat([inputs, targets[:, -1:]], 1)  # the stream's first 8 rows of 2049 tokens
    assert receipt["sum"] == hashlib.blake2b(stream[:4].numpy().tobytes(), digest_size=8).hexdigest()
    assert held["sum"] == hashlib.blake2b(stream[4:].numpy().tobytes(), digest_size=8).hexdigest()


def test_a_token_byte_table_written_into_the_cache_changes_the_receipt(prepared_cache, bigram, tmp_path, capsys):
    """A table counting twice the bytes, saved over the cache's: val_bpb halves, and the receipt's table hash and
    bytes differ from the baseline's, which `record` refuses (tests/test_shortcuts.py plays that refusal)."""
    cache = tmp_path / "cache"
    shutil.copytree(prepared_cache, cache)
    table = cache / "tokenizer" / "token_bytes.pt"
    torch.save(torch.load(table, weights_only=True) * 2, table)
    bpb, receipt = evaluate(cache, TinyBigram(), capsys=capsys)
    assert bpb == pytest.approx(bigram[0] / 2, rel=1e-6) and receipt["bytes"] == 2 * bigram[1]["bytes"]
    assert receipt["table"] != bigram[1]["table"] and receipt["sum"] == bigram[1]["sum"]


def test_a_loader_that_reads_the_validation_shard_is_noted_for_the_receipt(prepared_cache, tokenizer, monkeypatch):
    """Training on the validation split, directly or by naming another shard as validation data on the module (so
    that the real one joins the training shards): the receipt counts the loaders that read it."""
    monkeypatch.setattr(prepare, "DATA_DIR", str(prepared_cache / "data"))
    monkeypatch.setattr(prepare, "_METRIC", prepare.Metric(prepared_cache))  # train.py's, made on this cache
    monkeypatch.setitem(prepare._RUN, "val_loaders", 0)
    prepare.make_dataloader(tokenizer, 1, 64, "train", device="cpu").close()
    assert prepare._RUN["val_loaders"] == 0
    monkeypatch.setattr(prepare, "VAL_FILENAME", "shard_00000.parquet")
    prepare.make_dataloader(tokenizer, 1, 64, "train", device="cpu").close()
    assert prepare._RUN["val_loaders"] == 1
    prepare.make_dataloader(tokenizer, 1, 64, "val", device="cpu").close()
    assert prepare._RUN["val_loaders"] == 2


def test_a_model_that_returns_no_logits_stops_the_evaluation_in_one_line(prepared_cache):
    class LossOnly(TinyBigram):
        def forward(self, x, y=None, reduction="mean"):
            return super().forward(x).mean()

    with pytest.raises(SystemExit, match=r"^FAIL: evaluate_bpb needs model\(x\) to return logits of shape "
                                         r"\(B, T, vocab\) = \(2, 2048, 8192\) when called without targets; it "
                                         r"returned \(\)$"):
        evaluate(prepared_cache, LossOnly())


# -----------------------------------------------------------------------------
# A broken cache fails up front, with one line saying what is wrong and what to run


def run_train(cache):
    """`python train.py`: it checks the tokenizer and the shards at start-up, before building a model.
    (A check that came only after training started would run into the timeout.)"""
    return run_script("train.py", cache=cache, timeout=120)


def without_data_dir(cache):
    shutil.rmtree(cache / "data")


def with_empty_data_dir(cache):
    for p in (cache / "data").iterdir():
        p.unlink()


def without_val_shard(cache):
    (cache / "data" / VAL_NAME).unlink()


def with_only_val_shard(cache):
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        (cache / "data" / name).unlink()


def without_tokenizer(cache):
    shutil.rmtree(cache / "tokenizer")


def with_garbage_shard(cache):
    (cache / "data" / "shard_00001.parquet").write_bytes(b"<html>rate limited</html>" * 100)


def with_textless_shard(cache):
    pq.write_table(pa.table({"content": ["a document"] * 10}), cache / "data" / "shard_00001.parquet")


BROKEN_CACHES = [without_data_dir, with_empty_data_dir, without_val_shard, with_only_val_shard, without_tokenizer,
                 with_garbage_shard, with_textless_shard]


@pytest.fixture(scope="module")
def broken_caches(prepared_cache, tmp_path_factory):
    """A copy of the prepared cache broken in each way of BROKEN_CACHES: name -> cache."""
    root = tmp_path_factory.mktemp("broken")
    caches = {}
    for breaks in BROKEN_CACHES:
        caches[breaks.__name__] = root / breaks.__name__
        shutil.copytree(prepared_cache, caches[breaks.__name__])
        breaks(caches[breaks.__name__])
    return caches


@pytest.fixture(scope="module")
def failed_runs(broken_caches, tmp_path_factory):
    """Every failing command of this section, run in parallel (each one spends seconds of CPU importing torch):
    one run of train.py on a broken cache (the others are checked in this process) and the failing prepare.py
    runs. name -> (cache, CompletedProcess)."""
    root = tmp_path_factory.mktemp("failed")
    cache = broken_caches["without_val_shard"]
    jobs = {"without_val_shard": (cache, functools.partial(run_train, cache))}  # name -> (cache, command)
    for name, endpoint in [("connection_refused", closed_port_url()), ("name_not_resolved", "http://data.invalid")]:
        cache = root / name  # the user's default back-off (a retry per shard would take minutes, not seconds): the
        # time a user waits, imports included
        jobs[name] = (cache, functools.partial(timed, run_script, "prepare.py", cache=cache, endpoint=endpoint,
                                               extra_env={"AUTORESEARCH_BACKOFF_S": None}))
    tiny_hub = Hub(root / "tiny_hub")  # what someone trying their own data first serves: a few dozen short notes
    for index in (0, 1, 6542):
        write_shard(tiny_hub.shard_dir / f"shard_{index:05d}.parquet", short_notes(index))
    cache = root / "too_little_text"
    jobs["too_little_text"] = (cache, functools.partial(run_script, "prepare.py", "--num-shards", "2", cache=cache,
                                                        endpoint=tiny_hub.url))
    try:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = {name: pool.submit(command) for name, (_, command) in jobs.items()}
            return {name: (jobs[name][0], future.result()) for name, future in results.items()}
    finally:
        tiny_hub.close()


def closed_port_url():
    """http://127.0.0.1:<a port that was just free>: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def timed(run, *args, **kwargs):
    """run(*args, **kwargs), its wall-clock seconds in .seconds."""
    t0 = time.monotonic()
    result = run(*args, **kwargs)
    result.seconds = time.monotonic() - t0
    return result


def short_notes(shard, n_docs=40):
    return [f"Note {k} of shard {shard}: the cat sat on the mat, and the dog barked {k * 7} times." for k in range(n_docs)]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_startup_error(message, *fragments):
    """What train.py's start-up checks raise: one line, `error: ...`, with every fragment in it."""
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_data_directory_fails_naming_it(broken_caches, train_startup_error):
    cache = broken_caches["without_data_dir"]
    assert_startup_error(train_startup_error(cache), "no data directory", str(cache / "data"), "uv run prepare.py")


def test_empty_data_directory_fails_naming_it(broken_caches, train_startup_error):
    cache = broken_caches["with_empty_data_dir"]
    assert_startup_error(train_startup_error(cache), "no shards in", str(cache / "data"), "uv run prepare.py")


def test_missing_validation_shard_fails_before_training(failed_runs):
    """The real script: exit 1, the one line on stderr, before a step (the check that once came after training)."""
    cache, result = failed_runs["without_val_shard"]
    assert_one_line_error(result, "validation shard", str(cache / "data" / VAL_NAME), "uv run prepare.py")
    assert "step 0" not in result.stdout and "val_bpb" not in result.stdout


def test_only_the_validation_shard_means_no_training_shards(broken_caches, train_startup_error):
    cache = broken_caches["with_only_val_shard"]
    assert_startup_error(train_startup_error(cache), "no training shards", str(cache / "data"), "uv run prepare.py")


def test_missing_tokenizer_fails_naming_its_directory(broken_caches, train_startup_error):
    cache = broken_caches["without_tokenizer"]
    assert_startup_error(train_startup_error(cache), "tokenizer not found", str(cache / "tokenizer"),
                         "uv run prepare.py")


@pytest.mark.parametrize("broken", ["with_garbage_shard", "with_textless_shard"])
def test_unreadable_shard_fails_naming_it_and_saying_delete_and_rerun(broken_caches, train_startup_error, broken):
    cache = broken_caches[broken]
    assert_startup_error(train_startup_error(cache), str(cache / "data" / "shard_00001.parquet"),
                         "Delete it and re-run `uv run prepare.py`")


@pytest.mark.parametrize("case, host, reason", [("connection_refused", "127.0.0.1:", "Connection refused"),
                                                 ("name_not_resolved", "data.invalid", "")])
def test_prepare_with_an_unreachable_host_says_so_once_and_gives_up_within_30s(failed_runs, case, host, reason):
    """No connection to the data host at all (offline, blocked, a wrong HF_ENDPOINT): one line naming the host
    and the fix, exit 1 within ~30 s under the default back-off, and no file in the cache."""
    cache, result = failed_runs[case]
    assert result.seconds < 30, f"took {result.seconds:.0f}s\n{result.stdout}{result.stderr}"
    assert_one_line_error(result, f"cannot reach {host}", reason, "set HF_ENDPOINT to a Hugging Face mirror",
                          "check the network", "re-run `uv run prepare.py`")
    assert os.listdir(cache / "data") == []  # no shard, no temporary file
    assert not (cache / "tokenizer").exists()


@pytest.mark.parametrize("error, gives_up", [
    (requests.ConnectTimeout("connect timeout"), True),                      # blocked: no answer to the SYN
    (requests.exceptions.ProxyError("proxy unreachable"), True),
    (requests.ReadTimeout("read timeout"), False),                            # connected, then a stall
    (requests.ConnectionError("Connection aborted: RemoteDisconnected"), False),  # connected, then dropped
])
def test_only_a_host_that_takes_no_connection_stops_the_download_before_it_starts(monkeypatch, error, gives_up):
    """The faults a retry can cure (a stall, a dropped connection, any HTTP status) leave the host probe to the
    per-shard retries; only a connection that cannot be opened ends the run."""
    def head(url, **kwargs):
        raise error

    monkeypatch.setattr(prepare.requests, "head", head)
    if gives_up:
        with pytest.raises(SystemExit, match=r"^error: cannot reach data\.example:8080 \("):
            prepare.check_host_reachable("http://data.example:8080/datasets/x/shard_00000.parquet")
    else:
        assert prepare.check_host_reachable("http://data.example:8080/datasets/x/shard_00000.parquet") is None


def test_prepare_with_too_little_text_for_the_tokenizer_says_how_much_and_saves_no_tokenizer(failed_runs):
    cache, result = failed_runs["too_little_text"]
    assert "Data: 3/3 shards ready" in result.stdout
    characters = sum(len(doc) for shard in (0, 1) for doc in short_notes(shard))
    assert_one_line_error(result, "too little text to train the tokenizer", f"2 training shard(s) in {cache / 'data'}",
                          f"80 documents ({characters:,} characters)", "of the 8,188 learned tokens",
                          "the 8,192-token vocabulary needs", "`uv run prepare.py --num-shards N` with N above 2",
                          "put more text in the shards")
    # no tokenizer.pkl, token_bytes.pt or temp file: only the empty lock file, which stays (deleting it while another
    # prepare.py waits on it would let a third one train at the same time)
    assert os.listdir(cache / "tokenizer") == [".lock"]
    assert (cache / "tokenizer" / ".lock").stat().st_size == 0


@pytest.mark.parametrize("option, value, message", [
    ("--num-shards", "0", "--num-shards must be at least 1"),
    ("--num-shards", "-2", "--num-shards must be at least 1"),
    ("--download-workers", "0", "--download-workers must be at least 1"),
])
def test_prepare_rejects_a_bad_option_with_a_usage_error_before_touching_the_cache(monkeypatch, capsys, tmp_path,
                                                                                  option, value, message):
    monkeypatch.setattr(sys, "argv", ["prepare.py", option, value])
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "cache" / "data"))  # were the option let through
    monkeypatch.setattr(prepare, "BASE_URL", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as exc:
        prepare.main()
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: prepare.py") and message in err
    assert not (tmp_path / "cache").exists()
