"""
Shared test fixtures: tiny parquet shards, a real HTTP server on 127.0.0.1 laid out like the Hugging Face
hub (pointed to through HF_ENDPOINT), and a cache prepared by the real `python prepare.py`.

Run: uv run pytest
"""

import atexit
import functools
import gc
import http.server
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HUB_PATH = "datasets/karpathy/climbmix-400b-shuffle/resolve/main"  # under HF_ENDPOINT, as on the hub
VAL_SHARD = 6542

# The scripts under test start with these (read by glibc when a process starts; the warm server's runs inherit them):
# glibc returns each freed tensor of the 8192-token vocabulary's logits (64 MB and more) to the system and faults
# the pages in again at the next step; kept instead, a tiny CPU run takes ~20% less time. Tests only.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**32))
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**32))


def make_documents(seed, n_docs):
    """Deterministic English-like documents: a Zipf-ish vocabulary of made-up words, numbers, punctuation,
    a few non-Latin words, and heavy-tailed lengths (some far longer than a 2048-token row)."""
    rng = random.Random(seed)
    vocab_rng = random.Random(0)  # the same words in every shard
    words = ["".join(vocab_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(vocab_rng.randint(1, 9)))
             for _ in range(3000)] + ["привет", "мир", "你好", "世界", "café", "naïve"]
    docs = []
    for _ in range(n_docs):
        n = min(int(rng.paretovariate(1.2) * 20), 4000)
        parts = []
        for _ in range(n):
            w = words[min(int(rng.paretovariate(0.7)) - 1, len(words) - 1)] if rng.random() < 0.7 else rng.choice(words)
            r = rng.random()
            if r < 0.05:
                w = str(rng.randint(0, 99999))
            elif r < 0.12:
                w = w.capitalize() + rng.choice([".", ",", "!", "?", ";", ".\n"])
            parts.append(w)
        docs.append(" ".join(parts))
    return docs


def write_shard(path, docs, row_group_size=500):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)


@functools.lru_cache(maxsize=None)
def _shard_bytes(index, n_docs):
    tmp = Path(os.environ.get("PYTEST_SHARD_CACHE", "/tmp")) / f"autoresearch-test-shard-{os.getpid()}-{index}-{n_docs}.parquet"
    write_shard(tmp, make_documents(index, n_docs))
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def make_shards(directory, indices=(0, 1, VAL_SHARD), n_docs=1500):
    """Writes shard_NNNNN.parquet files into `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        p = directory / f"shard_{i:05d}.parquet"
        p.write_bytes(_shard_bytes(i, n_docs))
        paths.append(p)
    return paths


class Hub:
    """A real HTTP server on 127.0.0.1 serving `root` (files at HUB_PATH/shard_NNNNN.parquet)."""

    def __init__(self, root):
        self.root = Path(root)
        self.requests = []  # paths requested, in order
        hub = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(hub.root), **kwargs)

            def do_GET(self):
                hub.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def shard_dir(self):
        return self.root / HUB_PATH

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session", autouse=True)
def bytecode_cache(tmp_path_factory):
    """Many tests start python subprocesses that import torch. Where PYTHONDONTWRITEBYTECODE is set and the
    venv holds no .pyc files, each would compile torch from source again (seconds of CPU): give them one
    bytecode cache for the session, outside the repo and the venv."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYTHONDONTWRITEBYTECODE")
        mp.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield


_warm = {"lock": threading.Lock(), "server": None, "sock": None, "python": None}


def python():
    """The command that starts `python` for a script under test: the client of tests/warm.py, whose runs fork from
    an interpreter that imported torch once (the server starts at the first call and ends with the session). A
    test that kills a run with SIGKILL, or is a script's one real run, starts [sys.executable] instead."""
    with _warm["lock"]:
        if _warm["python"] is None:
            sock = Path(tempfile.mkdtemp(prefix="warm")) / "sock"
            server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm.py"), "serve", str(sock)],
                                      stdin=subprocess.DEVNULL)
            _warm["server"], _warm["sock"] = server, sock  # known before it is up: a short session still ends it
            atexit.register(end_warm_server)
            deadline = time.time() + 120
            while not sock.exists():
                if server.poll() is not None or time.time() > deadline:
                    server.kill()
                    raise RuntimeError(f"tests/warm.py did not start (exit {server.poll()})")
                time.sleep(0.05)
            _warm["python"] = [sys.executable, str(ROOT / "tests" / "warm.py"), "run", str(sock)]
        return list(_warm["python"])


def end_warm_server():
    server = _warm["server"]
    if server is not None and server.poll() is None:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(_warm["sock"].parent, ignore_errors=True)


def cold_python():
    """From now on python() is [sys.executable]: for scripts outside pytest (tests/demo_night.py and the
    benchmarks play program.md's blocks as a user's `uv run` would run them, cold)."""
    with _warm["lock"]:
        _warm["python"] = _warm["python"] or [sys.executable]


def python_shell():
    """python() as it goes into a shell command (program.md's blocks with `uv run` replaced)."""
    return shlex.join(python())


@pytest.fixture(scope="session", autouse=True)
def warm_python_in_the_background(bytecode_cache):
    """The warm server starts while the first tests run in-process (seconds of imports); it ends with the session."""
    threading.Thread(target=python, daemon=True).start()
    yield
    end_warm_server()


@pytest.fixture
def sigint_reaches_children():
    """A shell that starts pytest in the background (`pytest &`, nohup, some CI runners) leaves it ignoring
    SIGINT, and every child inherits the ignore: Python then never raises KeyboardInterrupt in a script under
    test. With a handler here instead of the ignore, children start with the default and Python installs its own."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def hub(tmp_path):
    """A hub serving training shards 0 and 1 and the validation shard."""
    h = Hub(tmp_path / "hub")
    make_shards(h.shard_dir)
    yield h
    h.close()


def script_env(cache, endpoint=None, extra_env=None):
    """The environment a script runs in under test: the cache in `cache`, no network, fast retries, unbuffered.
    A value of None in `extra_env` removes that variable (e.g. AUTORESEARCH_BACKOFF_S: the user's back-off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "HF_"))}
    env["AUTORESEARCH_CACHE_DIR"] = str(cache)
    env["HF_ENDPOINT"] = endpoint or "http://127.0.0.1:9"  # closed port: nothing leaks to the internet
    env["AUTORESEARCH_BACKOFF_S"] = "0.05"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra_env or {})
    return {k: v for k, v in env.items() if v is not None}


def run_script(script, *args, cache, endpoint=None, timeout=300, extra_env=None, cold=False):
    """Runs a top-level script (`prepare.py`, `train.py`) as a user would, with the cache in `cache`; through
    python() unless `cold` (a fresh interpreter, for a script's one real run)."""
    env = script_env(cache, endpoint, extra_env)
    return subprocess.run([*([sys.executable] if cold else python()), str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def prepare_from_local_hub(root, n_docs=1500):
    """The real `python prepare.py --num-shards 2` on root/cache, from tiny shards on a local hub in root/hub that
    also serves shard 2 (which it must not fetch). Returns (cache, the run's CompletedProcess, the paths requested)."""
    root = Path(root)
    h = Hub(root / "hub")
    try:
        make_shards(h.shard_dir, indices=(0, 1, 2, VAL_SHARD), n_docs=n_docs)
        result = run_script("prepare.py", "--num-shards", "2", cache=root / "cache", endpoint=h.url, cold=True)
    finally:
        h.close()
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "cache", result, list(h.requests)


def make_prepared_cache(root, n_docs=1500):
    """root/cache, made by the real `python prepare.py --num-shards 2` from tiny shards on a local hub in root/hub."""
    return prepare_from_local_hub(root, n_docs)[0]


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory):
    """The run of prepare.py that made `prepared_cache`: dict(cache, result, requests, hub_root)."""
    root = tmp_path_factory.mktemp("prepared")
    cache, result, requests = prepare_from_local_hub(root)
    return dict(cache=cache, result=result, requests=requests, hub_root=root / "hub")


@pytest.fixture
def train_startup_error(monkeypatch):
    """train.main's start-up checks, in this process, on a cache they must reject: `check(cache)` returns the
    message of the SystemExit they raise (the script prints it as its one line on stderr and exits 1; the real
    script's runs check that). A cache that passes the checks fails the test where train.main would load the
    attention kernel, before it builds or trains anything."""
    import prepare
    import train

    def past_the_checks():
        raise AssertionError("the start-up checks passed: nothing was wrong with the cache")

    def check(cache):
        with monkeypatch.context() as m:
            m.setattr(prepare, "DATA_DIR", str(Path(cache) / "data"))
            m.setattr(prepare, "TOKENIZER_DIR", str(Path(cache) / "tokenizer"))
            m.setattr(train, "load_attention_backend", past_the_checks)
            m.delenv("AUTORESEARCH_SEED", raising=False)
            with pytest.raises(SystemExit) as exc:
                train.main()
        return exc.value.code

    return check


@pytest.fixture(scope="session")
def prepared_cache(prepared_run):
    """A cache made by the real `python prepare.py --num-shards 2` against a local hub (shared, read-only)."""
    return prepared_run["cache"]


def receipt_line(val_bpb, **overrides):
    """A receipt as prepare.py's evaluate_bpb prints it into run.log, for a hand-written log: the same terms of
    evaluation in every run (tokens, bytes, hashes, budget), a run id of its own, no commit (as outside git)."""
    receipt = dict(val_bpb=float(val_bpb), tokens=20971520, rows=10240, bytes=89_000_000, nats=6e7, sum="5" * 16,
                   val="6" * 16, table="7" * 16, prepare="8" * 16, seq_len=2048, budget=300.0, batch=128, leak=0.0,
                   causal=True, wrapped=False, val_loaders=0, train_tokens=499_646_464, wall=310.0, commit=None,
                   dirty=[], run=os.urandom(6).hex(), seconds=20.0)
    return "receipt: " + json.dumps(dict(receipt, **overrides))


# -----------------------------------------------------------------------------
# train.py's model, optimizer and step as train.main runs them, for the benchmarks (tests build small ones)


def build_model(depth, vocab):
    """train.py's GPT on its device, built as train.main builds it: shapes on the meta device, then memory, then
    the init under seed 42."""
    import train  # not at the top: it imports prepare, which reads AUTORESEARCH_CACHE_DIR once, when imported
    with torch.device("meta"):
        model = train.GPT(train.build_model_config(depth, vocab))
    model.to_empty(device=train.DEVICE_TYPE)
    torch.manual_seed(42)
    model.init_weights(42)
    return model


def make_optimizer(model):
    import train
    return model.setup_optimizer(unembedding_lr=train.UNEMBEDDING_LR, embedding_lr=train.EMBEDDING_LR,
                                 matrix_lr=train.MATRIX_LR, weight_decay=train.WEIGHT_DECAY,
                                 adam_betas=train.ADAM_BETAS, scalar_lr=train.SCALAR_LR)


def build_compiled(backend, fa3, vocab):
    """(model, optimizer, compiled model) at train.py's default size with the attention `backend`, after
    clearing what an earlier build left compiled or allocated."""
    import train
    from torch import _dynamo
    _dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    train.ATTN_BACKEND, train.fa3 = backend, fa3  # read by attention() and init_weights() (flex block masks)
    model = build_model(train.DEPTH, vocab)
    return model, make_optimizer(model), torch.compile(model, dynamic=False)


def optimizer_step(model, optimizer, forward, x, y, accum):
    """One optimizer step of train.py's loop: `accum` micro-batches through `forward` (the model or it compiled),
    the optimizer, then the loss read on the host."""
    import train
    for _ in range(accum):
        with torch.autocast("cuda", dtype=torch.bfloat16) if train.DEVICE_TYPE == "cuda" else nullcontext():
            loss = forward(x, y)
        (loss / accum).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss.item()
