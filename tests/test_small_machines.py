"""
Small machines: the micro-batch fitted to the GPU's memory, and TinyStories, the small-machine dataset that
`prepare.py --dataset tinystories` prepares in a cache of its own. The fitting rule runs against a simulated memory
limit (no GPU here); the real prepare.py fetches a tiny TinyStories file from an HTTP server on 127.0.0.1 (the split
by rows, the offline error) and a dropped connection is served to its download function; the real train.py trains
on that cache, and the real `analysis.py record` refuses its run against a baseline scored on ClimbMix.

Run: uv run pytest tests/test_small_machines.py
"""

import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import prepare
import train
from helpers import (EVAL_TOKENS, HUB_PATH, TIME_BUDGET, FaultHub, Hub, agent_env, cache_digest, make_documents,
                     make_repo, python, run_script, write_shard)

TS_PATH = "datasets/karpathy/tinystories-gpt4-clean/resolve/main/tinystories_gpt4_clean.parquet"  # under HF_ENDPOINT
TS_FILE = TS_PATH.rsplit("/", 1)[1]
WHALE = "Tinystorieswhale"  # a word only in the held-out and validation rows: never learned by the tokenizer


def story_rows():
    """The served file: 20,000 one-line stories (the held-out and validation rows), then documents with enough varied
    text for the 4,096-token vocabulary (the training rows)."""
    return [f"Story {i}. Once upon a time {WHALE} saw {i % 97} birds." for i in range(20_000)] + \
        make_documents(1, 1500)


@pytest.fixture(scope="module")
def tinystories(prepared_cache, tmp_path_factory):
    """The real `python prepare.py --dataset tinystories` against a local hub, on a copy of a prepared ClimbMix cache:
    dict(cache, result, rows, climbmix (its files' hashes before), requests)."""
    root = tmp_path_factory.mktemp("tinystories")
    rows = story_rows()
    hub = Hub(root / "hub")
    try:
        write_shard(hub.root / TS_PATH, rows, row_group_size=3000)
        cache = shutil.copytree(prepared_cache, root / "cache")
        climbmix = cache_digest(cache)
        result = run_script("prepare.py", "--dataset", "tinystories", cache=cache, endpoint=hub.url)
    finally:
        hub.close()
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(cache=cache, result=result, rows=rows, climbmix=climbmix, requests=list(hub.requests))


def test_tinystories_is_split_by_rows_into_held_out_validation_and_training_files(tinystories):
    data, rows = tinystories["cache"] / "tinystories" / "data", tinystories["rows"]
    assert sorted(p.name for p in data.iterdir()) == ["heldout.parquet", "train.parquet", "val.parquet"]  # no download
    part = {name: pq.read_table(data / f"{name}.parquet").column("text").to_pylist()
            for name in ("heldout", "val", "train")}
    assert part["heldout"] == rows[:10_000] and part["val"] == rows[10_000:20_000] and part["train"] == rows[20_000:]
    assert tinystories["requests"] == [f"/{TS_PATH}"]


def test_tinystories_has_a_cache_of_its_own_and_is_the_dataset_in_use(tinystories):
    """ClimbMix's files stay byte for byte; the tokenizer (4,096 tokens) learned from the training rows only; the
    cache root names the dataset prepared last."""
    cache = tinystories["cache"]
    assert {p: h for p, h in cache_digest(cache).items() if p.split("/")[0] in ("data", "tokenizer")} == \
        tinystories["climbmix"]
    tokenizer = prepare.Tokenizer.from_directory(str(cache / "tinystories" / "tokenizer"), 4096)
    assert tokenizer.get_vocab_size() == 4096
    assert len(tokenizer.encode(f" {WHALE}")) > 3  # 20,000 times in the held-out and validation rows, never learned
    assert (cache / "dataset").read_text() == "tinystories\n" and prepare.prepared_dataset(cache) == "tinystories"
    metric = prepare.Metric(cache)
    assert (metric.dataset, metric.seq_len, metric.vocab_size) == ("tinystories", 512, 4096)
    assert metric.val_path == str(cache / "tinystories" / "data" / "val.parquet")
    assert "Done: ready to train on tinystories" in tinystories["result"].stdout
    check = run_script("prepare.py", "--check", cache=cache)  # program.md's setup step 4
    assert check.stdout == f"Data: tinystories, ready in {cache / 'tinystories' / 'data'}\n", check.stderr


def test_preparing_climbmix_again_makes_it_the_dataset_in_use_and_an_unknown_name_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "dataset").write_text("tinystories\n")
    monkeypatch.setattr(prepare, "CACHE_DIR", str(tmp_path))
    prepare.mark_prepared("climbmix")
    assert not (tmp_path / "dataset").exists() and prepare.prepared_dataset(tmp_path) == "climbmix"
    (tmp_path / "dataset").write_text("fineweb\n")
    with pytest.raises(SystemExit) as exc:
        prepare.prepared_dataset(tmp_path)
    message = str(exc.value.code)
    assert message.startswith(f"error: {tmp_path / 'dataset'} names no dataset") and "delete it" in message
    assert "\n" not in message


def test_prepare_tinystories_offline_says_so_in_one_line_and_writes_nothing(tmp_path):
    r = run_script("prepare.py", "--dataset", "tinystories", cache=tmp_path / "cache")  # a closed port
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach 127.0.0.1:9 (") and \
        "so nothing can be downloaded" in lines[0] and \
        lines[0].endswith("then re-run `uv run prepare.py --dataset tinystories`."), r.stderr
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_a_dropped_connection_leaves_nothing_half_written(tmp_path, monkeypatch):
    """The file is fetched by the shards' download function: retried, and renamed into place only when complete."""
    write_shard(tmp_path / "served" / TS_FILE, story_rows()[:100])
    served = (tmp_path / "served" / TS_FILE).read_bytes()
    monkeypatch.setattr(prepare, "BACKOFF_SECONDS", 0.01)
    hub = FaultHub({TS_FILE: served}, {TS_FILE: ["drop"] * prepare.DOWNLOAD_ATTEMPTS})
    try:
        url, target = f"{hub.url}/{HUB_PATH}/{TS_FILE}", tmp_path / "data"  # FaultHub serves files there
        target.mkdir()
        error = prepare.download_file(url, str(target / TS_FILE))
        assert error.startswith(f"{TS_FILE}: ") and f"(after {prepare.DOWNLOAD_ATTEMPTS} attempts" in error, error
        assert list(target.iterdir()) == []
        hub.script[TS_FILE] = ["drop", "short"]  # then whole
        assert prepare.download_file(url, str(target / TS_FILE)) is None
        assert [p.name for p in target.iterdir()] == [TS_FILE] and (target / TS_FILE).read_bytes() == served
    finally:
        hub.close()

# -----------------------------------------------------------------------------
# evaluate_bpb and train.py on TinyStories, and a baseline on ClimbMix


class Uniform(torch.nn.Module):
    """Equal logits for every token: a model for a receipt of what evaluate_bpb scores."""

    def __init__(self, vocab_size):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x):
        return self.bias.expand(*x.shape, len(self.bias))


def test_a_confirmation_run_scores_the_validation_rows_then_the_held_out_rows(tinystories, capsys):
    """A confirmation run's evaluation: the scored rows come from val.parquet, the held-out part's from
    heldout.parquet (rows 0-9,999), each packed from its file's start."""
    cache = tinystories["cache"]
    prepare.Metric(cache, eval_tokens=1024, heldout=True).evaluate_bpb(Uniform(4096), None, 2)
    receipt = json.loads(capsys.readouterr().out.split("receipt: ", 1)[1])
    tokenizer = prepare.Tokenizer.from_directory(str(cache / "tinystories" / "tokenizer"), 4096)

    def first_rows_digest(name):  # the receipt's hash of the first 2 rows of 512 tokens packed from a file
        rows = prepare.pack_batches(tokenizer, 1, 512, prepare._document_batches([str(cache / "tinystories" / "data"
                                                                                      / name)]))
        return hashlib.blake2b(np.stack([next(rows)[0][0] for _ in range(2)]).tobytes(), digest_size=8).hexdigest()

    assert receipt["dataset"] == "tinystories" and receipt["seq_len"] == 512 and receipt["tokens"] == 1024
    assert receipt["sum"] == first_rows_digest("val.parquet")
    assert receipt["heldout"]["sum"] == first_rows_digest("heldout.parquet")


BASELINE_SUMMARY = """---
val_bpb:          {val_bpb:.6f}
training_seconds: 0.0
total_seconds:    5.0
peak_vram_mb:     500.0
mfu_percent:      0.00
total_tokens_M:   0.0
num_steps:        2
num_params_M:     1.0
depth:            2
seed:             42
attention:        sdpa
device:           cpu
init_fingerprint: 0123456789ab
time_budget:      {budget:g}
eval_tokens:      {tokens}
dataset:          climbmix
"""


def climbmix_baseline_log(cache, commit):
    """A run.log of `commit` on ClimbMix, under the conditions of the TinyStories run (tests/helpers.py's budget
    and evaluation tokens, on a CPU): the receipt evaluate_bpb prints on the ClimbMix cache, with the run's own
    fields (its commit, a clean checkout, no loader of the validation shard) as train.py's process would have them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        prepare.Metric(cache, eval_tokens=EVAL_TOKENS, time_budget=float(TIME_BUDGET)).evaluate_bpb(Uniform(8192), None, 1)
    receipt = dict(json.loads(out.getvalue().split("receipt: ", 1)[1]), commit=commit, dirty=[], val_loaders=0)
    return "receipt: " + json.dumps(receipt) + "\n" + BASELINE_SUMMARY.format(**receipt)


@pytest.fixture(scope="module")
def night(tinystories, prepared_cache, tmp_path_factory):
    """A repo of this project (tests/helpers.py's, scaled down) whose baseline ran on ClimbMix, then TinyStories was
    prepared and the next commit ran on it; each recorded by the real `analysis.py record` (the plain rule)."""
    repo = tmp_path_factory.mktemp("repo")
    env = dict(agent_env(tinystories["cache"]), OMP_NUM_THREADS="1")  # two threads on a busy machine: 10x slower
    make_repo(repo, env, slow_start=False)

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout

    def record(log, description):
        (repo / "run.log").write_text(log)
        return subprocess.run([*python(), "analysis.py", "record", "--description", description, "--rule", "plain"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=120)

    baseline = record(climbmix_baseline_log(prepared_cache, git("rev-parse", "HEAD").strip()), "baseline")
    train_py = repo / "train.py"
    train_py.write_text(train_py.read_text().replace("MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 "))
    git("commit", "-qam", "MATRIX_LR 0.05")
    run = subprocess.run([*python(), "train.py"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return dict(run=run, baseline=baseline, again=record(run.stdout, "MATRIX_LR 0.05"))


def test_train_py_on_tinystories_uses_its_constants_and_names_it_first_and_in_the_summary(night):
    out = night["run"].stdout
    assert re.match(r"torch \S+ \| device: cpu \| dataset: tinystories \| seed: 42 \|", out), out[:300]
    assert "'sequence_len': 512, 'vocab_size': 4096" in out and "'window_pattern': 'L'" in out
    block = out[out.index("\n---\n") + 5:].strip().splitlines()
    assert block[0].startswith("val_bpb:") and block[8].startswith("depth:")  # the reference's nine keys first
    assert block[-1] == "dataset:          tinystories"
    assert json.loads(re.search(r"^receipt: (.*)$", out, re.M).group(1))["dataset"] == "tinystories"


def test_a_run_on_another_dataset_than_the_baselines_is_refused(night):
    assert night["baseline"].stdout.startswith("keep: baseline"), night["baseline"].stdout + night["baseline"].stderr
    verdict = night["again"].stdout
    assert verdict.startswith("refused: evaluate_bpb scored this run on other terms than the baseline"), verdict
    assert all(term in verdict for term in ("the validation shard", "the token-byte table", "the sequence length"))

# -----------------------------------------------------------------------------
# The micro-batch fitted to the GPU's memory, against a simulated limit


@pytest.fixture
def defaults(monkeypatch):
    """train.py's CUDA settings (the module holds the small-machine ones on a CPU)."""
    for name, value in dict(DEVICE_BATCH_SIZE=128, TOTAL_BATCH_SIZE=2**19, MAX_SEQ_LEN=2048, DEPTH=8).items():
        monkeypatch.setattr(train, name, value)


def memory(gib, tried):
    """A GPU of `gib` GiB where a step takes 1 GiB plus 0.35 GiB per sequence (45 GiB at 128, as on an H100)."""
    def fits(b):
        tried.append(b)
        return 1 + 0.35 * b <= gib
    return fits


@pytest.mark.parametrize("gib, expected", [(80, 128), (24, 64), (12, 16), (8, 16), (4, 8)])
def test_the_largest_micro_batch_that_fits_is_chosen_and_the_tokens_per_step_stay(defaults, capsys, gib, expected):
    tried = []
    micro, accum = train.fit_micro_batch(memory(gib, tried))
    assert micro == expected and tried == [128 >> i for i in range(len(tried))] and tried[-1] == expected
    assert micro * 2048 * accum == 2**19
    said = capsys.readouterr().out
    assert said == ("" if expected == 128 else
                    f"micro-batch: DEVICE_BATCH_SIZE 128 does not fit in the GPU's memory, {expected} does\n")


def test_too_little_memory_for_one_sequence_is_one_error_line_saying_what_to_lower(defaults):
    tried = []
    with pytest.raises(SystemExit) as exc:
        train.fit_micro_batch(memory(1.2, tried))
    assert tried == [128, 64, 32, 16, 8, 4, 2, 1]
    message = str(exc.value.code)
    assert message.startswith("error: 1 x 2048 tokens per micro-batch do not fit in the GPU's memory") and \
        "lower DEPTH (now 8)" in message and "--dataset tinystories" in message and "\n" not in message

