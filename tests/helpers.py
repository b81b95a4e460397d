"""
What the tests and the scripts in dev/ build with (the fixtures are in tests/conftest.py): tiny parquet shards and a
real HTTP server on 127.0.0.1 laid out like the Hugging Face hub (and one that misbehaves on request), the real scripts
run as a user runs them, a cache made by the real prepare.py, hand-written receipts, program.md and
docs/program-multi-gpu.md played command by command in a throwaway git repository, the naive packer, and train.py's
model and step as train.main runs them.

Every script under test starts in a fresh interpreter (`sys.executable`), as a user's `uv run` starts one.
"""

import functools
import gc
import hashlib
import http.server
import json
import os
import random
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
HUB_PATH = "datasets/karpathy/climbmix-400b-shuffle/resolve/main"  # under HF_ENDPOINT, as on the hub
VAL_SHARD = 6542

# -----------------------------------------------------------------------------
# Data: tiny shards, and a hub that serves them


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


class FaultHub:
    """A real ThreadingHTTPServer on 127.0.0.1 serving shards at HUB_PATH, with a script of faults per shard.

    `script[name]` is either a list of faults used by that shard's successive requests (then it is served
    normally), or one fault used on every request. Faults:
        "ok"         200 and the whole file
        404/500/503  that status and a short text body
        "html"       200 and an HTML error page (not parquet)
        "drop"       full Content-Length, half of the body, then the socket is reset (RST)
        "short"      full Content-Length, three quarters of the body, then a clean close (FIN)
        "stall"      accepts and reads the request, then sends nothing
        "stall_mid"  headers and a quarter of the body, then nothing
        "slow"       the whole file, 4 KiB every 10 ms
        "slow_stall" half of the file, 4 KiB every 10 ms, then nothing
    A stall lasts until the client goes away, `release()` is called or `hold_s` passes.
    """

    def __init__(self, shards, script=None, hold_s=20.0, slow_chunk=4096, slow_delay=0.01):
        self.shards = dict(shards)          # name -> bytes
        self.script = dict(script or {})    # name -> list of faults, or one fault for every request
        self.log = []                       # (name, fault) per request, in order
        self.times = []                     # time.monotonic() of each request in self.log
        self.sent = {}                      # name -> body bytes written to the socket so far
        self.hold_s, self.slow_chunk, self.slow_delay = hold_s, slow_chunk, slow_delay
        self.lock = threading.Lock()
        self.released = threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with hub.lock:
                    if self.path != f"/{HUB_PATH}/{name}" or name not in hub.shards:
                        fault = 404
                    else:
                        s = hub.script.get(name, [])
                        fault = s.pop(0) if isinstance(s, list) and s else ("ok" if isinstance(s, list) else s)
                    hub.log.append((name, fault))
                    hub.times.append(time.monotonic())
                try:
                    hub._serve(self, name, fault)
                except OSError:  # the client went away (timed out, killed): nothing to do
                    self.close_connection = True

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _send_body(self, handler, name, data):
        handler.wfile.write(data)
        with self.lock:
            self.sent[name] = self.sent.get(name, 0) + len(data)

    def _hold(self, handler):
        """Sends nothing until the client closes, release() or hold_s."""
        handler.connection.settimeout(0.1)
        deadline = time.monotonic() + self.hold_s
        while not self.released.is_set() and time.monotonic() < deadline:
            try:
                if handler.connection.recv(1) == b"":
                    break  # the client closed its end
            except socket.timeout:
                pass
        handler.close_connection = True

    def _serve(self, handler, name, fault):
        data = self.shards.get(name, b"")
        if isinstance(fault, int):
            body = f"{fault} error\n".encode()
            handler.send_response(fault)
            handler.send_header("Content-Type", "text/plain")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        if fault == "html":
            body = b"<!DOCTYPE html><html><body><h1>Service temporarily unavailable</h1></body></html>\n" * 20
            handler.send_response(200)
            handler.send_header("Content-Type", "text/html; charset=utf-8")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            self._send_body(handler, name, body)
            return
        if fault == "stall":
            self._hold(handler)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))  # always the full length, whatever is sent
        handler.end_headers()
        if fault == "ok":
            self._send_body(handler, name, data)
        elif fault in ("slow", "slow_stall"):
            end = len(data) if fault == "slow" else len(data) // 2
            for i in range(0, end, self.slow_chunk):
                if self.released.is_set():
                    handler.close_connection = True
                    return
                self._send_body(handler, name, data[i:min(i + self.slow_chunk, end)])
                time.sleep(self.slow_delay)
            if fault == "slow_stall":
                self._hold(handler)
        elif fault == "drop":
            self._send_body(handler, name, data[:len(data) // 2])
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()  # RST, mid-body
            handler.close_connection = True
        elif fault == "short":
            self._send_body(handler, name, data[:len(data) * 3 // 4])
            handler.close_connection = True
        elif fault == "stall_mid":
            self._send_body(handler, name, data[:len(data) // 4])
            self._hold(handler)
        else:
            raise AssertionError(f"unknown fault {fault!r}")

    def requests_for(self, name):
        return [f for n, f in self.log if n == name]

    def release(self):
        self.released.set()

    def close(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()


# -----------------------------------------------------------------------------
# The scripts, run as a user runs them


def python():
    """The command that starts `python` for a script under test: this interpreter, fresh, as `uv run` starts one."""
    return [sys.executable]


def python_shell():
    """python() as it goes into a shell command (program.md's blocks with `uv run` replaced)."""
    return shlex.join(python())


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


def run_script(script, *args, cache, endpoint=None, timeout=300, extra_env=None):
    """Runs a top-level script (`prepare.py`, `train.py`) as a user would, with the cache in `cache`."""
    env = script_env(cache, endpoint, extra_env)
    return subprocess.run([*python(), str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def prepare_from_local_hub(root, n_docs=1500):
    """The real `python prepare.py --num-shards 2` on root/cache, from tiny shards on a local hub in root/hub that
    also serves shard 2 (which it must not fetch). Returns (cache, the run's CompletedProcess, the paths requested)."""
    root = Path(root)
    h = Hub(root / "hub")
    try:
        make_shards(h.shard_dir, indices=(0, 1, 2, VAL_SHARD), n_docs=n_docs)
        result = run_script("prepare.py", "--num-shards", "2", cache=root / "cache", endpoint=h.url)
    finally:
        h.close()
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "cache", result, list(h.requests)


def make_prepared_cache(root, n_docs=1500):
    """root/cache, made by the real `python prepare.py --num-shards 2` from tiny shards on a local hub in root/hub."""
    return prepare_from_local_hub(root, n_docs)[0]


def receipt_line(val_bpb, **overrides):
    """A receipt as prepare.py's evaluate_bpb prints it into run.log, for a hand-written log: the same terms of
    evaluation in every run (tokens, bytes, hashes, budget), a run id of its own, no commit (as outside git)."""
    receipt = dict(val_bpb=float(val_bpb), tokens=20971520, rows=10240, bytes=89_000_000, nats=6e7, sum="5" * 16,
                   val="6" * 16, table="7" * 16, prepare="8" * 16, seq_len=2048, budget=300.0, batch=128, leak=0.0,
                   causal=True, wrapped=False, val_loaders=0, train_tokens=499_646_464, wall=310.0, commit=None,
                   dirty=[], run=os.urandom(6).hex(), seconds=20.0)
    return "receipt: " + json.dumps(dict(receipt, **overrides))


# -----------------------------------------------------------------------------
# program.md played as an agent plays it (tests/test_loop.py; also tests/test_shortcuts.py, tests/test_parallel.py,
# dev/demo_night.py and dev/benchmark_parallel.py)


# A budget shorter than one step: train.py always runs its uncounted warm-up steps (1 in the copy below), then
# stops after the first counted one. Every run is then exactly 2 steps on any machine, however busy. Like the real
# 5 minutes, it is the same for every experiment (an environment variable, not part of train.py).
TIME_BUDGET = "0.01"
EVAL_TOKENS = 2048  # one evaluation batch of the scaled-down DEVICE_BATCH_SIZE below (1 x 2048)

# Appended to train.py's small-machine block and committed on main before the agent starts: this stands for
# the repo's own train.py, scaled down further so that one experiment takes seconds on a CPU, and started with
# learning rates 30x too small, so that the agent's first idea (deleting that line) wins by far more than the noise.
# The copy also leaves 1 step uncounted instead of 11 (train.py's compile warm-up; nothing compiles on a CPU, and
# each step of the 8192-token vocabulary costs ~0.6-1.2 s here): tests/test_train.py runs the real count.
WARMUP = ("step > 10", "step > 0")
TINY_SETTINGS = """\
    # tests/helpers.py: scaled down further, one 2048-token sequence per step, width 64
    DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 32
    TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = 2048, 1
    EMBEDDING_LR, UNEMBEDDING_LR, MATRIX_LR, SCALAR_LR = 0.02, 0.0001, 0.001, 0.02  # a slow start
"""


def bash_blocks(path="program.md"):
    """The bash blocks of an instructions file (program.md, docs/program-multi-gpu.md), each once."""
    text = (ROOT / path).read_text()
    blocks = [textwrap.dedent(m.group(2)) for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.M | re.S)]
    return list(dict.fromkeys(blocks))


PLAYED = {}  # path -> the blocks handed out so far: a test can check that it played every one


def block(*needles, path="program.md"):
    """The one bash block in `path` that contains every needle."""
    found = [b for b in bash_blocks(path) if all(n in b for n in needles)]
    assert len(found) == 1, f"{path}: expected one bash block containing {needles}, found {len(found)}"
    PLAYED.setdefault(path, set()).add(found[0])
    return found[0]


def without_uv(command):
    """A block with `uv run` replaced by this interpreter (python()): `uv run` here would build a second virtual
    environment inside the throwaway repo (slow, and it may want the network), and the interpreter running the test
    already is the project's environment. Where `timeout` is missing, program.md says to run without it."""
    command = command.replace("uv run ", python_shell() + " ")
    return command.replace("timeout 600 ", "") if shutil.which("timeout") is None else command


def uv_block(*needles, path="program.md"):
    command = block(*needles, path=path)
    assert command.count("uv run ") == 1, command
    return without_uv(command)


def run_block(rerun=False):
    """Loop step 4, or step 8's rerun under a seed: the one-line block that runs train.py."""
    found = [b for b in bash_blocks() if b.strip().endswith("uv run train.py > run.log 2>&1") and "\n" not in b.strip()
             and ("AUTORESEARCH_SEED=<seed>" in b) == rerun]
    assert len(found) == 1, f"program.md: expected one {'rerun' if rerun else 'run'} block, found {len(found)}"
    PLAYED.setdefault("program.md", set()).add(found[0])
    return without_uv(found[0])


class Agent:
    """Runs program.md's blocks with bash in the throwaway repo, placeholders filled in."""

    def __init__(self, repo, env):
        self.repo, self.env = repo, env

    def sh(self, script, check=True, timeout=120, **placeholders):
        for name, value in placeholders.items():
            script = script.replace(f"<{name}>", value)
        assert not re.findall(r"<[a-z_]+>", script), f"unfilled placeholder in:\n{script}"
        r = subprocess.run(["bash", "-c", script], cwd=self.repo, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert r.returncode == 0, f"{script}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def git(self, *args):
        return self.sh(shlex.join(["git", *args])).stdout.strip()

    def where(self):
        """Loop step 1, `analysis.py status`: (branch, HEAD's short hash, the next command)."""
        out = self.sh(uv_block("uv run analysis.py status")).stdout.splitlines()
        m = re.match(r"branch (\S+) at (\w+);", out[0])
        assert m and out[-1].startswith("next: "), out
        return m.group(1), m.group(2), out[-1][len("next: "):]

    def commit(self, description):
        """Loop step 3; returns the short hash of the new commit."""
        self.sh(block("git commit -m"), description=description)
        return self.git("rev-parse", "--short=7", "HEAD")

    def run_and_record(self, description, seed=None):
        """Loop steps 4 to 7 (or the rerun under `seed`): run, grep, on an empty grep read the tail, record."""
        placeholders = {"seed": str(seed)} if seed is not None else {}
        run = self.sh(run_block(rerun=seed is not None), check=False, timeout=900, **placeholders)
        grep = self.sh(block('grep "^val_bpb:'), check=False)
        tail = self.sh(block("tail -n 50 run.log")).stdout if not grep.stdout.strip() else None
        verdict = self.sh(uv_block("analysis.py record --description"), timeout=120,
                          description=description).stdout.strip()
        summary = dict(line.split(":", 1) for line in grep.stdout.splitlines())
        return {"rc": run.returncode, "grep": grep.stdout, "tail": tail, "verdict": verdict,
                "summary": {k: v.strip() for k, v in summary.items()},
                "log": (self.repo / "run.log").read_text(errors="replace")[-3000:]}

    def experiment(self, description):
        """Steps 4 to 8 for one commit: run, record, and rerun under the seed the verdict names until it says
        something else. Returns every run's result, the last one holding the final verdict."""
        results = [self.run_and_record(description)]
        while (m := re.match(r"rerun with seed (\d+):", results[-1]["verdict"])):
            results.append(self.run_and_record(description, seed=int(m.group(1))))
        return results

    def reset(self):
        """Loop step 8, discard or crash."""
        self.sh(block("git reset --hard"))

    def confirm(self):
        """"Confirming the gain": ask what to run, run it, record it, until it says confirmed. Returns the lines."""
        said = []
        while True:
            line = self.sh(uv_block("uv run analysis.py confirm")).stdout.strip()
            said.append(line)
            m = re.match(r"run (\w+) with seed (\d+): ", line)
            if not m:
                return said
            out = self.sh(without_uv(block("record --confirm")), timeout=300, commit=m.group(1), seed=m.group(2))
            said.append(out.stdout.strip())


def edit_train(repo, pattern, replacement):
    """The agent's edit to train.py: one regex substitution that must match exactly once."""
    path = repo / "train.py"
    src, n = re.subn(pattern, replacement, path.read_text(), flags=re.M)
    assert n == 1, f"{pattern!r} matched {n} times in train.py"
    path.write_text(src)


def set_constant(repo, name, value):
    edit_train(repo, rf"^({name} = )[^\s#]+", rf"\g<1>{value}")


def copy_tracked_files(path):
    """This repo's tracked files (as in the working tree) copied into `path`."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, path / name)


def make_repo(path, env, slow_start=True, warmup=WARMUP):
    """A copy of this repo's tracked files with its own history: main = the copy, then the scaled-down train.py
    (with learning rates 30x too small unless not `slow_start`; `warmup` (old, new) replaced in its loop, None for
    train.py's own)."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "--is-inside-work-tree"], capture_output=True).returncode:
        pytest.skip("the repo is not a git checkout (its tracked files are what the loop starts from)")
    copy_tracked_files(path)
    train_py = path / "train.py"
    tiny = TINY_SETTINGS if slow_start else "".join(line + "\n" for line in TINY_SETTINGS.splitlines()
                                                     if "a slow start" not in line)
    src, n = re.subn(r'^if DEVICE_TYPE != "cuda":\n(?:    .*\n)+', lambda m: m.group(0) + tiny,
                     train_py.read_text(), flags=re.M)
    assert n == 1, "train.py: the small-machine block (`if DEVICE_TYPE != \"cuda\":`) was not found"
    if warmup:
        assert src.count(warmup[0]) == 2, f"train.py: expected `{warmup[0]}` twice (the budget and the end check)"
        src = src.replace(*warmup)

    def git(*args):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)

    git("init", "-b", "main")
    git("config", "user.name", "autoresearch test")
    git("config", "user.email", "test@example.invalid")
    git("config", "commit.gpgsign", "false")
    git("add", "-A")
    git("commit", "-m", "autoresearch, as in the repo")
    train_py.write_text(src)
    git("commit", "-am", "train.py: smaller small-machine settings for the tests")


def agent_env(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "HF_", "GIT_"))}
    env.update({
        "AUTORESEARCH_CACHE_DIR": str(cache),
        "AUTORESEARCH_TIME_BUDGET": TIME_BUDGET,  # tests only; program.md forbids it to the agent
        "AUTORESEARCH_EVAL_TOKENS": str(EVAL_TOKENS),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # closed port: nothing leaks to the internet
        "CUDA_VISIBLE_DEVICES": "",  # the CPU settings above on every machine, GPU or not
        "GIT_CONFIG_NOSYSTEM": "1",  # no hooks, signing or aliases from the machine's git config
        "GIT_CONFIG_GLOBAL": os.devnull,
    })
    return env


# -----------------------------------------------------------------------------
# docs/program-multi-gpu.md played on a CPU, each slot a git worktree (tests/test_parallel.py,
# dev/benchmark_parallel.py)


DOC = "docs/program-multi-gpu.md"
SLOTS_TAG = "par1"
UV_RUN = "uv run --project ../.. "  # a slot's `uv run`: the repository's .venv, not a new one per worktree

# Every bash block of the file, by a string only it holds; tests/test_parallel.py plays each of them.
BLOCKS = {
    "add": "git worktree add",
    "commit": "commit --quiet -m",
    "wave": "CUDA_VISIBLE_DEVICES=<gpu>",
    "record": "record --description",
    "mark": "mark --commit <commit> --status discard",
    "confirm": "record --confirm",
    "sky": "sky launch",
    "cleanup": "git worktree remove",
}


def doc_block(name):
    return block(BLOCKS[name], path=DOC)


def line(name, start):
    """The one line of block `name` that starts with `start`."""
    found = [x for x in doc_block(name).splitlines() if x.startswith(start)]
    assert len(found) == 1, (name, start, found)
    return found[0]


def uv_free(command):
    """A command with this interpreter for `uv run` (the same reason as in without_uv: the interpreter running the
    test already is the project's environment)."""
    uv = UV_RUN if UV_RUN in command else "uv run "
    assert command.count(uv) == 1, command
    return command.replace(uv, python_shell() + " ")


def wave(slots):
    """The file's wave block for `slots` [(n, seed)]: its first line once per slot, then `wait`. <gpu> is
    empty: no GPU is visible, so every run uses the CPU settings, on any machine."""
    first, rest = doc_block("wave").split("\n", 1)
    assert rest.strip() == "wait", rest
    lines = [uv_free(first).replace("<n>", str(n)).replace("<gpu>", "").replace("<seed>", str(seed))
             for n, seed in slots]
    if shutil.which("timeout") is None:  # program.md's fallback where `timeout` is missing
        lines = [x.replace("timeout 600 ", "") for x in lines]
    return "\n".join(lines + ["wait"])


def record(agent, n, description):
    return agent.sh(uv_free(line("record", "(cd")), n=str(n), description=description, timeout=120).stdout.strip()


def cache_digest(cache):
    """Every file in the cache, by path, with the sha256 of its bytes."""
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache.rglob("*")) if p.is_file()}


def summary(log):
    """The summary block of a run.log, as analysis.py reads it."""
    import analysis
    return analysis.parse_log(log.read_text(errors="replace"))


def new_idea(agent, slot, n, name, value):
    """A slot at the branch, one constant edited, committed there; returns the commit's short hash."""
    agent.sh(line("commit", "git -C .worktrees/<n> checkout"), n=str(n), commit=f"autoresearch/{SLOTS_TAG}")
    set_constant(slot, name, value)
    agent.sh("\n".join(doc_block("commit").splitlines()[1:]), n=str(n), description=f"{name} {value}")
    return agent.git("-C", str(slot), "rev-parse", "--short=7", "HEAD")


# -----------------------------------------------------------------------------
# The naive packer: the spec's rule written as plainly as possible (tests/test_prepare.py checks prepare.py against
# it; dev/benchmark_packing.py times both)


def naive_pack_batches(tokenizer, B, T, doc_batches, buffer_size=1000):
    """(rows, epoch) forever, rows a list of B lists of T+1 token ids. A list buffer, scanned in full per pick."""
    bos = tokenizer.get_bos_token_id()
    buffer = []  # tokenized documents in the order they arrived
    epoch = 1
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    texts, epoch = next(doc_batches)
                    buffer.extend(tokenizer.encode(texts, prepend=bos))
                room = T + 1 - len(row)
                best = -1  # the largest document that fits entirely; strict > keeps the first on ties
                for i, doc in enumerate(buffer):
                    if len(doc) <= room and (best < 0 or len(doc) > len(buffer[best])):
                        best = i
                if best >= 0:
                    row += buffer.pop(best)
                else:  # none fits: the shortest (strict < keeps the first on ties), cropped to the room left
                    shortest = 0
                    for i, doc in enumerate(buffer):
                        if len(doc) < len(buffer[shortest]):
                            shortest = i
                    row += buffer.pop(shortest)[:room]
            rows.append(row)
        yield rows, epoch


# -----------------------------------------------------------------------------
# train.py's model, optimizer and step as train.main runs them, for the scripts in dev/ (tests build small ones)


def build_model(depth, vocab):
    """train.py's GPT on its device, built as train.main builds it: shapes on the meta device, then memory, then
    the init under seed 42."""
    import torch
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
    import torch
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
    import torch
    import train
    for _ in range(accum):
        with torch.autocast("cuda", dtype=torch.bfloat16) if train.DEVICE_TYPE == "cuda" else nullcontext():
            loss = forward(x, y)
        (loss / accum).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss.item()
