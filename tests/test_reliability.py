"""
Reliability of `prepare.py` and of the start-up checks on the cache: faults injected by a local HTTP server
(errors, dropped connections, short bodies, HTML pages, 404s, stalls), a download killed with SIGKILL, two
runs at once on one cache, and files broken on disk after the fact (caught by train.py's start-up checks,
repaired by re-running prepare.py). The faults run the real `python prepare.py --num-shards 2`, the wire faults
side by side; of the broken tokenizers one goes through the real scripts, the others through the same
functions in this process. Every case ends by checking that nothing was lost or half-written: each file in
the cache is complete and valid (byte-identical to the served shard; the tokenizer loads) or absent, and no
*.tmp file is left behind.

Run: uv run pytest tests/test_reliability.py
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import ROOT, VAL_SHARD, FaultHub, make_shards, run_script, script_env

TIMEOUT = 120  # seconds: the most any one subprocess may take before the test fails
SHARD0, SHARD1, VAL = "shard_00000.parquet", "shard_00001.parquet", f"shard_{VAL_SHARD:05d}.parquet"


# -----------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """name -> bytes of the tiny shards the hub serves (training shards 0 and 1, and the validation shard)."""
    paths = make_shards(tmp_path_factory.mktemp("served"))
    return {p.name: p.read_bytes() for p in paths}


@pytest.fixture
def make_hub(served):
    hubs = []

    def make(script=None, **kwargs):
        hubs.append(FaultHub(served, script, **kwargs))
        return hubs[-1]

    yield make
    for h in hubs:
        h.close()


def prepare(cache, hub, extra_env=None):
    return run_script("prepare.py", "--num-shards", "2", cache=cache, endpoint=hub.url, timeout=TIMEOUT,
                      extra_env=extra_env)


def start_prepare(cache, hub):
    return subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--num-shards", "2"], cwd=ROOT,
                            env=script_env(cache, hub.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def startup_check(cache):
    """`python train.py` on a broken cache: its start-up check (prepare.check_data: the tokenizer, the training
    shards, the validation shard) must stop it before it builds a model. On a good cache it would train: TIMEOUT bounds it."""
    return run_script("train.py", cache=cache, timeout=TIMEOUT)


def output(r):
    return f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def assert_clean_failure(r, *names):
    """Non-zero exit, no traceback, and the broken or missing files named on stderr."""
    assert r.returncode != 0, output(r)
    assert "Traceback" not in r.stdout + r.stderr, output(r)
    for name in names:
        assert name in r.stderr, output(r)


def assert_one_line_error(r, name):
    """Exit 1, no traceback, one line on stderr naming the file and saying to re-run prepare.py."""
    assert r.returncode == 1, output(r)
    assert "Traceback" not in r.stdout + r.stderr, output(r)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output(r)
    assert lines[0].startswith("error: ") and name in lines[0] and "uv run prepare.py" in lines[0], output(r)


_prepare_module = None


def prepare_module():
    """prepare.py imported into the test process (its functions take explicit paths where it matters)."""
    global _prepare_module
    if _prepare_module is None:
        sys.path.insert(0, str(ROOT))
        import prepare
        _prepare_module = prepare
    return _prepare_module


def assert_cache_intact(cache, served, shards=None, tokenizer=None):
    """Every file in the cache is complete and valid or absent, and no temporary file is left.

    `shards`: the shard names that must be there (None: any). `tokenizer`: True/False if it must be
    there/absent (None: either)."""
    cache = Path(cache)
    assert not [str(p) for p in cache.rglob("*.tmp")], "temporary files left behind"
    data = cache / "data"
    present = sorted(p.name for p in data.iterdir()) if data.is_dir() else []
    for name in present:
        assert name in served, f"unexpected file {data / name}"
        assert (data / name).read_bytes() == served[name], f"{data / name} differs from the served shard"
    if shards is not None:
        assert present == sorted(shards)
    tok = cache / "tokenizer"
    files = [tok / "tokenizer.pkl", tok / "token_bytes.pt"]
    if tokenizer is not None:
        assert all(f.exists() for f in files) == tokenizer and any(f.exists() for f in files) == tokenizer
    if any(f.exists() for f in files):
        return load_tokenizer(tok)


def load_tokenizer(tokenizer_dir):
    prepare = prepare_module()
    t = prepare.Tokenizer.from_directory(str(tokenizer_dir))
    assert t.get_vocab_size() == prepare.VOCAB_SIZE
    text = "Hello world 12345, привет 你好"
    assert t.decode(t.encode(text)) == text
    token_bytes = prepare.get_token_bytes(tokenizer_dir=str(tokenizer_dir))
    assert len(token_bytes) == prepare.VOCAB_SIZE and int(token_bytes[t.get_bos_token_id()]) == 0
    return t


def copy_cache(src, dst):
    shutil.copytree(src, dst)
    return dst


# -----------------------------------------------------------------------------
# 1-5: faults on the wire


def missing_then_served(cache, hub):
    """404 on every attempt, then a re-run once the hub serves the shard: (first run, the re-run's requests,
    the re-run)."""
    first = prepare(cache, hub)
    hub.script[SHARD1] = []  # now served
    before = len(hub.log)
    rerun = prepare(cache, hub)
    return first, hub.log[before:], rerun


WIRE_FAULTS = {  # case -> (the hub's script, what it runs against the hub: cache, hub -> result)
    "server_errors": ({SHARD0: [500, 503], SHARD1: [503], VAL: [500, 500, 503]}, prepare),
    "dropped_and_short": ({SHARD0: ["drop", "drop"], SHARD1: ["short"], VAL: ["short", "drop"]}, prepare),
    "html": ({SHARD0: "html"}, prepare),
    "missing": ({SHARD1: 404}, missing_then_served),
    # each attempt times out after AUTORESEARCH_HTTP_TIMEOUT = 1 s
    "stalled": ({SHARD0: ["stall", "stall_mid"], VAL: "stall"},
                lambda cache, hub: prepare(cache, hub, extra_env={"AUTORESEARCH_HTTP_TIMEOUT": "1"})),
}


@pytest.fixture(scope="module")
def wire(served, tmp_path_factory):
    """Every case of WIRE_FAULTS, each against a hub of its own, side by side (they spend most of their time
    importing torch or waiting on a stalled socket): case -> (cache, hub, result)."""
    root = tmp_path_factory.mktemp("wire")
    hubs = {case: FaultHub(served, script) for case, (script, _) in WIRE_FAULTS.items()}
    try:
        with ThreadPoolExecutor(max_workers=len(WIRE_FAULTS)) as pool:
            futures = {case: pool.submit(run, root / case, hubs[case]) for case, (_, run) in WIRE_FAULTS.items()}
            yield {case: (root / case, hubs[case], f.result()) for case, f in futures.items()}
    finally:
        for hub in hubs.values():
            hub.close()


def test_server_errors_are_retried(wire, served):
    """500/503 then success: retried, every shard complete, exit 0."""
    cache, hub, r = wire["server_errors"]
    assert r.returncode == 0, output(r)
    assert hub.requests_for(SHARD0) == [500, 503, "ok"]
    assert hub.requests_for(SHARD1) == [503, "ok"]
    assert hub.requests_for(VAL) == [500, 500, 503, "ok"]
    assert_cache_intact(cache, served, shards=served, tokenizer=True)


def test_dropped_connection_and_short_body_are_never_promoted(wire, served):
    """Connection reset mid-body, or a body shorter than its Content-Length: retried, never taken for a shard."""
    cache, hub, r = wire["dropped_and_short"]
    assert r.returncode == 0, output(r)
    assert hub.requests_for(SHARD0) == ["drop", "drop", "ok"]
    assert hub.requests_for(SHARD1) == ["short", "ok"]
    assert hub.requests_for(VAL) == ["short", "drop", "ok"]
    assert_cache_intact(cache, served, shards=served, tokenizer=True)


def test_html_error_page_is_rejected(wire, served):
    """An HTML page with status 200 on every attempt: not promoted, named on stderr, exit non-zero."""
    cache, hub, r = wire["html"]
    assert_clean_failure(r, SHARD0)
    assert f"failed: {SHARD0}: the response is not a valid parquet file" in r.stderr, output(r)
    assert "Data: 2/3 shards ready" in r.stdout, output(r)
    assert hub.requests_for(SHARD0) == ["html"] * 5  # every attempt made, none taken
    assert_cache_intact(cache, served, shards=[SHARD1, VAL], tokenizer=False)


def test_missing_shard_is_named_and_rerun_fetches_only_it(wire, served):
    """404 on every attempt: the others complete, the missing one is named, exit non-zero; a re-run once the
    hub serves it fetches that one file only."""
    cache, hub, (r, rerun_requests, rerun) = wire["missing"]
    assert_clean_failure(r, SHARD1, "HTTP 404")
    assert "re-run `uv run prepare.py`" in r.stderr, output(r)
    assert hub.requests_for(SHARD1)[:5] == [404] * 5
    assert rerun.returncode == 0, output(rerun)
    assert rerun_requests == [(SHARD1, "ok")], "the re-run fetched more than the missing shard"
    assert "2/3 shards already" in rerun.stdout, output(rerun)
    assert_cache_intact(cache, served, shards=served, tokenizer=True)


def test_stalled_server_times_out_and_retries(wire, served):
    """A server that accepts and sends nothing, or stops mid-body: each attempt times out after
    AUTORESEARCH_HTTP_TIMEOUT seconds and is retried. Shard 0 completes once the stall clears; the
    validation shard, stalled on every attempt, fails cleanly and is named. Each retry comes within seconds
    (an attempt that did not time out would wait for the hub's 20 s hold)."""
    cache, hub, r = wire["stalled"]
    starts = [t for (name, _), t in zip(hub.log, hub.times) if name == VAL]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert max(gaps) < 10, f"seconds between attempts: {gaps}\n{output(r)}"  # 1 s timeout + <= 0.4 s back-off
    assert_clean_failure(r, VAL)
    assert SHARD0 not in r.stderr, output(r)
    assert hub.requests_for(SHARD0) == ["stall", "stall_mid", "ok"]
    assert hub.requests_for(VAL) == ["stall"] * 5
    assert_cache_intact(cache, served, shards=[SHARD0, SHARD1], tokenizer=False)


# -----------------------------------------------------------------------------
# 6-7: processes killed, or running at once


def test_sigkill_mid_download_then_rerun(make_hub, served, tmp_path):
    """prepare.py killed with SIGKILL while a shard is half sent: no partial file is taken for a shard, and a
    re-run completes and removes the dead process's temporary file."""
    cache = tmp_path / "cache"
    hub = make_hub({SHARD0: ["slow_stall"]})  # sends half of the shard slowly, then holds: the kill lands mid-body
    proc = start_prepare(cache, hub)
    try:
        deadline = time.monotonic() + 60
        while not (hub.sent.get(SHARD0, 0) >= 16384 and list((cache / "data").glob(f"{SHARD0}.*.tmp"))
                   and (cache / "data" / SHARD1).exists() and (cache / "data" / VAL).exists()):  # the others done
            assert proc.poll() is None, "prepare.py ended before the kill"
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert hub.sent[SHARD0] < len(served[SHARD0])
    leftovers = list((cache / "data").glob("*.tmp"))
    assert [p.name.split(".")[0] for p in leftovers] == ["shard_00000"], leftovers  # the dead process's file
    assert not (cache / "data" / SHARD0).exists(), "a partial download was taken for a shard"
    for p in (cache / "data").glob("*.parquet"):
        assert p.read_bytes() == served[p.name]

    before = len(hub.log)
    r = prepare(cache, hub)
    assert r.returncode == 0, output(r)
    assert hub.log[before:] == [(SHARD0, "ok")]  # only the one that was cut
    assert_cache_intact(cache, served, shards=served, tokenizer=True)


def test_ctrl_c_starts_no_further_download(make_hub, served, tmp_path, sigint_reaches_children):
    """SIGINT (Ctrl-C) mid-download: the download in flight ends, no queued one starts (before the fix the
    whole queue still ran: with --num-shards -1, thousands of shards), and nothing half-written is left."""
    cache = tmp_path / "cache"
    hub = make_hub({name: "slow" for name in served}, slow_delay=0.02)  # ~2 s per shard
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--num-shards", "2", "--download-workers", "1"],
                            cwd=ROOT, env=script_env(cache, hub.url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while hub.sent.get(SHARD0, 0) < 16384:
            assert proc.poll() is None, "prepare.py ended before the interrupt"
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert hub.log == [(SHARD0, "slow")], "a download started after Ctrl-C"
    assert_cache_intact(cache, served, tokenizer=False)


def test_two_runs_at_once_on_one_cache(make_hub, served, tmp_path, prepared_cache):
    """Two prepare.py at the same time: both exit 0, every shard is valid, the tokenizer is trained once and
    is the one a single run trains."""
    cache = tmp_path / "cache"
    slow_twice = ["slow", "slow"]  # both processes' downloads overlap
    hub = make_hub({SHARD0: list(slow_twice), SHARD1: list(slow_twice), VAL: list(slow_twice)},
                   slow_chunk=65536, slow_delay=0.02)
    procs = [start_prepare(cache, hub) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err}"
        assert "Traceback" not in out + err, err
    trained = [out for out, _ in outs if "Tokenizer: trained" in out]
    loaded = [out for out, _ in outs if "Tokenizer: already trained" in out]
    assert len(trained) == 1 and len(loaded) == 1, outs  # the file lock: one trains, the other waits and loads
    t = assert_cache_intact(cache, served, shards=served, tokenizer=True)
    ref = load_tokenizer(prepared_cache / "tokenizer")
    assert t.enc._mergeable_ranks == ref.enc._mergeable_ranks
    assert t.enc._special_tokens == ref.enc._special_tokens


# -----------------------------------------------------------------------------
# 8-9: files broken on disk after a good run


def test_broken_shard_on_disk_is_reported_and_downloaded_again(make_hub, served, tmp_path, prepared_cache):
    """A shard truncated, another overwritten with garbage: train.py's start-up check names the file and says
    to delete it and re-run prepare (exit 1, no traceback); prepare.py names both and fetches them again."""
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    train_path, val_path = cache / "data" / SHARD1, cache / "data" / VAL
    train_path.write_bytes(served[SHARD1][:len(served[SHARD1]) // 2])        # truncated
    val_path.write_bytes(random.Random(0).randbytes(len(served[VAL])))      # garbage, same size

    r = startup_check(cache)
    assert_one_line_error(r, str(train_path))
    assert "Delete it" in r.stderr, output(r)

    hub = make_hub()
    r = prepare(cache, hub)
    assert r.returncode == 0, output(r)
    for p in (train_path, val_path):
        assert f"{p} is not a valid parquet file" in r.stdout and "downloading it again" in r.stdout, output(r)
    assert sorted(n for n, _ in hub.log) == sorted([SHARD1, VAL])  # only the broken ones
    assert "Tokenizer: already trained" in r.stdout, output(r)
    assert_cache_intact(cache, served, shards=served, tokenizer=True)


TOKENIZER_FAULTS = [(f, how) for f in ("tokenizer.pkl", "token_bytes.pt") for how in ("garbage", "truncated", "missing")]


def break_tokenizer(cache, filename, how):
    path = cache / "tokenizer" / filename
    if how == "garbage":
        path.write_bytes(random.Random(1).randbytes(4096))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
        path.unlink()


def train_tokenizer_in_process(cache, monkeypatch, capsys):
    """prepare.py's tokenizer step (what `python prepare.py` runs after the download) on `cache`; its stdout."""
    prepare = prepare_module()
    tok = cache / "tokenizer"
    with monkeypatch.context() as m:
        for name, value in [("DATA_DIR", cache / "data"), ("TOKENIZER_DIR", tok),
                            ("TOKENIZER_FILE", tok / "tokenizer.pkl"), ("TOKEN_BYTES_FILE", tok / "token_bytes.pt")]:
            m.setattr(prepare, name, str(value))
        capsys.readouterr()
        prepare.train_tokenizer()
    return capsys.readouterr().out


@pytest.mark.parametrize("filename, how", TOKENIZER_FAULTS)
def test_broken_tokenizer_is_reported_and_retrained(served, tmp_path, prepared_cache, train_startup_error,
                                                    monkeypatch, capsys, filename, how):
    """tokenizer.pkl or token_bytes.pt garbage, truncated or missing: train.py's start-up check says in one
    line to re-run prepare, and prepare.py's tokenizer step trains it again (both in this process; the next
    test runs the real scripts on a broken tokenizer)."""
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    break_tokenizer(cache, filename, how)
    tok = cache / "tokenizer"
    message = train_startup_error(cache)
    named = str(tok) if how == "missing" else str(tok / filename)  # missing: "tokenizer not found in <dir>"
    assert message.startswith("error: ") and "\n" not in message, message
    assert named in message and "uv run prepare.py" in message, message
    assert "Tokenizer: trained" in train_tokenizer_in_process(cache, monkeypatch, capsys)
    assert_cache_intact(cache, served, shards=served, tokenizer=True)


def test_broken_tokenizer_through_the_real_scripts(make_hub, served, tmp_path, prepared_cache):
    """The same through `python train.py` (exit 1, one line, no traceback) and `python prepare.py` (trains it
    again, downloads nothing)."""
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    break_tokenizer(cache, "token_bytes.pt", "truncated")
    assert_one_line_error(startup_check(cache), str(cache / "tokenizer" / "token_bytes.pt"))
    hub = make_hub()
    repaired = prepare(cache, hub)
    assert repaired.returncode == 0, output(repaired)
    assert "Tokenizer: trained" in repaired.stdout, output(repaired)
    assert hub.log == [], "repairing the tokenizer downloaded shards again"
    assert_cache_intact(cache, served, shards=served, tokenizer=True)
