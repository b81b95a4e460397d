"""
The attention kernel comes from the local cache, not the network: prepare.py fetches Flash Attention 3 once
into the cache the `kernels` package reads, and train.py loads it from there without a request to the hub,
asking the hub only when nothing is cached. A fake kernel (plain PyTorch) stands in for the real one, in a
temporary Hugging Face cache, with a local HTTP server in place of the hub that records every request.

Run: uv run pytest tests/test_kernel_cache.py
"""

import hashlib
import http.server
import json
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import prepare
from helpers import ROOT, Hub, make_shards, python, script_env

HOPPER = (9, 0)
REPO = "varunneal/flash-attention-3"  # the Hopper build, prepare.flash_attention_repo(HOPPER)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VARIANT = "torch-universal"  # a build variant kernels accepts on every machine, this CPU one included

# the fake kernel: the real one's call, flash_attn_interface.flash_attn_func, in plain PyTorch
KERNEL_FILES = {
    "__init__.py": 'MARKER = "fake flash attention 3"\nfrom . import flash_attn_interface\n',
    "flash_attn_interface.py": '''import torch
import torch.nn.functional as F


def flash_attn_func(q, k, v, causal=True, window_size=(-1, 0)):
    """(B, T, H, D) in and out; query i sees keys i-W ... i."""
    T, W = q.size(1), window_size[0]
    d = torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)[None, :]
    mask = (d >= 0) & (d <= (W if W >= 0 else T))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)
''',
}


def kernel_files(package_dir):
    """{path in the repo: bytes}: the flat layout (build/<variant>/__init__.py) or the older one with a
    package folder (build/<variant>/<package>/__init__.py); kernels 0.11.7 accepts both."""
    prefix = f"build/{VARIANT}/" + ("flash_attention_3/" if package_dir else "")
    return {prefix + name: text.encode() for name, text in KERNEL_FILES.items()}


def write_cached_snapshot(cache, files, repo=REPO):
    """The kernel in a Hugging Face cache, laid out as huggingface_hub writes a snapshot: refs/main names the
    commit, snapshots/<commit>/ holds the files (plain files here; huggingface_hub links them to blobs/)."""
    storage = Path(cache) / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    for path, data in files.items():
        target = storage / "snapshots" / COMMIT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


class KernelHub:
    """A real HTTP server on 127.0.0.1 answering as the hub does for one kernel repo: the revision (which
    commit `main` is), the file tree, and each file (HEAD for its metadata, GET for its bytes). Every other
    path is a 404. Records every request."""

    def __init__(self, files, repo=REPO):
        self.requests = []  # "METHOD path", in order
        hub = self
        blob_ids = {path: hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() for path, data in files.items()}

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, body, content_type="application/octet-stream", headers=(), send_body=True):
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def answer(self, send_body):
                hub.requests.append(f"{self.command} {self.path}")
                path = self.path.split("?")[0]
                if path == f"/api/models/{repo}/revision/main":
                    info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": p} for p in files]}
                    return self.reply(json.dumps(info).encode(), "application/json", send_body=send_body)
                if path.startswith(f"/api/models/{repo}/tree/{COMMIT}"):
                    tree = [{"type": "file", "path": p, "size": len(d), "oid": blob_ids[p]} for p, d in files.items()]
                    return self.reply(json.dumps(tree).encode(), "application/json", send_body=send_body)
                prefix = f"/{repo}/resolve/{COMMIT}/"
                if path.startswith(prefix) and path[len(prefix):] in files:
                    name = path[len(prefix):]
                    headers = [("X-Repo-Commit", COMMIT), ("ETag", f'"{blob_ids[name]}"')]
                    return self.reply(files[name], headers=headers, send_body=send_body)
                self.send_error(404)

            def do_GET(self):
                self.answer(send_body=True)

            def do_HEAD(self):
                self.answer(send_body=False)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kernel_hub():
    h = KernelHub(kernel_files(package_dir=False))
    yield h
    h.close()


def kernel_env(tmp_path, endpoint, where="HF_HOME"):
    """The environment of a script under test, its kernel cache in tmp_path. Returns (env, the cache folder
    the loader reads): KERNELS_CACHE itself, or HF_HOME/hub."""
    env = script_env(tmp_path / "autoresearch", endpoint)  # strips every HF_* variable of this machine
    env.pop("KERNELS_CACHE", None)
    env.pop("HF_KERNELS_CACHE", None)
    if where == "KERNELS_CACHE":
        env["KERNELS_CACHE"] = str(tmp_path / "kernels")
        return env, tmp_path / "kernels"
    env["HF_HOME"] = str(tmp_path / "hf")
    return env, tmp_path / "hf" / "hub"


# runs in a subprocess: huggingface_hub and kernels read their cache variables when imported
LOAD = """
import json, time, prepare
t0 = time.perf_counter()
try:
    kernel, repo, source = prepare.load_flash_attention_3((9, 0))
    out = {"repo": repo, "source": source, "marker": getattr(kernel, "MARKER", None), "file": kernel.__file__,
           "has_func": callable(kernel.flash_attn_interface.flash_attn_func)}
except Exception as e:
    out = {"error": type(e).__name__, "message": str(e)}
out["seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def run_python(code, env, timeout=120):
    result = subprocess.run([*python(), "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


# -----------------------------------------------------------------------------
# Which kernel for which GPU


def test_hopper_gets_its_own_build_and_every_other_gpu_the_community_build():
    assert prepare.flash_attention_repo((9, 0)) == "varunneal/flash-attention-3"
    for capability in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)]:
        assert prepare.flash_attention_repo(capability) == "kernels-community/flash-attn3", capability

# -----------------------------------------------------------------------------
# The runs: each scenario in a subprocess of its own, against a hub of its own, side by side (each spends
# seconds importing torch and kernels)

FETCH = "import prepare; print(repr(prepare.fetch_attention_kernel((9, 0))))"


def with_kernel_hub(scenario):
    """Runs scenario(tmp_path, hub) against a fresh KernelHub; adds the hub's requests to its result."""
    def run(tmp_path, prepared_cache):
        hub = KernelHub(kernel_files(package_dir=False))
        try:
            return dict(scenario(tmp_path, hub), requests=hub.requests)
        finally:
            hub.close()
    return run


def cached_kernel(where, package_dir):
    @with_kernel_hub
    def run(tmp_path, hub):
        env, cache = kernel_env(tmp_path, hub.url, where)
        write_cached_snapshot(cache, kernel_files(package_dir))
        out, stderr = run_python(LOAD, env)
        return dict(out=out, stderr=stderr, cache=cache)
    return run


def nothing_cached(tmp_path, prepared_cache):
    hub = Hub(tmp_path / "hub")  # a hub with the data but no kernel: every kernel request is a 404
    make_shards(hub.shard_dir)
    try:
        out, stderr = run_python(LOAD, kernel_env(tmp_path, hub.url)[0])
        return dict(out=out, stderr=stderr, requests=hub.requests, url=hub.url)
    finally:
        hub.close()


@with_kernel_hub
def no_build_for_this_torch(tmp_path, hub):
    env, cache = kernel_env(tmp_path, hub.url)
    write_cached_snapshot(cache, {"build/torch00-cxx11-cu100-x86_64-linux/__init__.py": b""})  # another torch only
    return dict(out=run_python(LOAD, env)[0])


@with_kernel_hub
def fetch_then_load(tmp_path, hub):
    env, cache = kernel_env(tmp_path, hub.url)
    fetched = subprocess.run([*python(), "-c", FETCH], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    fetch_requests = list(hub.requests)
    hub.requests.clear()
    out, stderr = run_python(LOAD, env)
    return dict(fetched=fetched, fetch_requests=fetch_requests, out=out, stderr=stderr, cache=cache)


def failed_fetch(tmp_path, prepared_cache):
    env, _ = kernel_env(tmp_path, "http://127.0.0.1:9")  # closed port: no hub
    return dict(fetched=subprocess.run([*python(), "-c", FETCH], cwd=ROOT, env=env, capture_output=True,
                                       text=True, timeout=120))


def prepare_on_a_cuda_machine(tmp_path, prepared_cache):
    """prepare.py's main with CUDA faked (this machine has none), on a prepared cache (no download, no
    tokenizer training); the hub has no kernel."""
    shutil.copytree(prepared_cache, tmp_path / "autoresearch")
    hub = Hub(tmp_path / "hub")
    make_shards(hub.shard_dir)
    env = script_env(tmp_path / "autoresearch", hub.url, {"HF_HOME": str(tmp_path / "hf")})
    code = ("import sys, torch; torch.cuda.is_available = lambda: True; "
            "torch.cuda.get_device_capability = lambda: (9, 0); "
            "import prepare; sys.argv = ['prepare.py', '--num-shards', '2']; prepare.main()")
    try:
        result = subprocess.run([*python(), "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        return dict(result=result, requests=hub.requests)
    finally:
        hub.close()


SCENARIOS = {
    "cached_in_hf_home": cached_kernel("HF_HOME", package_dir=False),
    "cached_in_kernels_cache": cached_kernel("KERNELS_CACHE", package_dir=True),
    "nothing_cached": nothing_cached,
    "no_build_for_this_torch": no_build_for_this_torch,
    "fetch_then_load": fetch_then_load,
    "failed_fetch": failed_fetch,
    "prepare_on_a_cuda_machine": prepare_on_a_cuda_machine,
}


@pytest.fixture(scope="module")
def runs(prepared_cache, tmp_path_factory):
    """name -> what each scenario of SCENARIOS returned."""
    root = tmp_path_factory.mktemp("kernels")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, root / name, prepared_cache) for name, run in SCENARIOS.items()}
        return {name: f.result() for name, f in futures.items()}

# -----------------------------------------------------------------------------
# train.py's loader: the cache first, the hub only when nothing is cached


@pytest.mark.parametrize("scenario", ["cached_in_hf_home", "cached_in_kernels_cache"])
def test_a_cached_kernel_is_loaded_without_any_hub_request(runs, scenario):
    out, cache = runs[scenario]["out"], runs[scenario]["cache"]
    assert out.get("source") == "cache", out
    assert out["repo"] == REPO
    assert out["marker"] == "fake flash attention 3"  # the fake module itself, not something else
    assert out["has_func"]
    assert Path(out["file"]).is_relative_to(cache / "models--varunneal--flash-attention-3" / "snapshots" / COMMIT)
    assert runs[scenario]["requests"] == []
    assert runs[scenario]["stderr"] == ""


def test_with_nothing_cached_the_loader_asks_the_hub_and_fails_quickly_with_an_exception(runs):
    run = runs["nothing_cached"]
    out = run["out"]
    assert any(r.startswith(f"/api/models/{REPO}/") for r in run["requests"]), run["requests"]
    # huggingface_hub's "not on the hub (404) and not in the cache": an Exception (a SystemExit would end the
    # subprocess), which train.py catches to fall back to flex attention
    assert out.get("error") == "LocalEntryNotFoundError", out
    assert f"404 File not found' for url '{run['url']}/api/models/{REPO}/revision/main'" in out["message"], out
    assert out["seconds"] < 20, out
    assert run["stderr"] == ""  # silent: train.py's one start-up line says what happened


def test_a_cache_with_no_build_for_this_torch_sends_the_loader_to_the_hub(runs):
    out = runs["no_build_for_this_torch"]["out"]
    assert out.get("source") == "hub", out
    assert out["marker"] == "fake flash attention 3"  # the hub's copy, loaded
    assert runs["no_build_for_this_torch"]["requests"]

# -----------------------------------------------------------------------------
# prepare.py's fetch: the hub once, then the cache for every run


def test_fetch_puts_the_kernel_where_the_loader_then_finds_it_offline(runs):
    run = runs["fetch_then_load"]
    fetched, cache = run["fetched"], run["cache"]
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert f"Attention kernel: Flash Attention 3 from {REPO} in {cache}" in fetched.stdout, fetched.stdout
    assert run["fetch_requests"]
    snapshot = cache / "models--varunneal--flash-attention-3" / "snapshots" / COMMIT
    assert (snapshot / "build" / VARIANT / "flash_attn_interface.py").read_bytes() == \
        kernel_files(False)[f"build/{VARIANT}/flash_attn_interface.py"]
    assert run["out"].get("source") == "cache", run["out"]
    assert run["out"]["marker"] == "fake flash attention 3"
    assert run["requests"] == []  # the load after the fetch
    assert run["stderr"] == ""


def test_a_failed_fetch_is_one_line_and_not_an_error(runs):
    result = runs["failed_fetch"]["fetched"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"Attention kernel: could not fetch {REPO} (LocalEntryNotFoundError); "
                                          "train.py will try the hub at start, else use flex attention", "None"]
    assert result.stderr == ""


def test_prepare_on_a_cuda_machine_still_succeeds_when_the_kernel_cannot_be_fetched(runs):
    result, requests = runs["prepare_on_a_cuda_machine"]["result"], runs["prepare_on_a_cuda_machine"]["requests"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Attention kernel: could not fetch {REPO}" in result.stdout
    assert any("/api/models/varunneal/flash-attention-3" in r for r in requests), requests
    assert result.stdout.rstrip().endswith("Done: ready to train with `uv run train.py`.")

# -----------------------------------------------------------------------------
# train.py on a GPU: its start-up line names the cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="train.py loads Flash Attention 3 on CUDA only")
def test_train_py_uses_the_cached_kernel_and_says_so(tmp_path, kernel_hub):
    env, cache = kernel_env(tmp_path, kernel_hub.url)
    capability = torch.cuda.get_device_capability()
    repo = prepare.flash_attention_repo(capability)
    write_cached_snapshot(cache, kernel_files(package_dir=False), repo=repo)
    code = "import json, train; backend, _, note = train.load_attention_backend(); print(json.dumps([backend, note]))"
    out, _ = run_python(code, env)
    assert out == ["fa3", f"Flash Attention 3 from {repo} (local cache)"]
    assert kernel_hub.requests == []
