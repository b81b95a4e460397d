"""
Benchmark of what costs training time, every row measured in this one run, printed as one markdown table.

Usage: uv run python dev/benchmark.py [--quick]

The rows: the packer against the naive one, the dataloader, the training loop's wait for data, start-up, training
and evaluation throughput, how step and evaluation time grow with size, and (on CUDA) the attention backends.
It builds its own data (tiny shards served on 127.0.0.1, a cache made by the real prepare.py) and deletes it at
the end. Not a test: pytest does not collect it. Timings on a shared machine are noisy, so every comparison is a
ratio taken in the same run.
"""

import argparse
import contextlib
import gc
import io
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the scripts, and tests/helpers.py
WORK = Path(tempfile.mkdtemp(prefix="autoresearch-benchmark-"))
os.environ["AUTORESEARCH_CACHE_DIR"] = str(WORK / "cache")  # before prepare is imported: its paths follow

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

import prepare  # noqa: E402
import train  # noqa: E402
from helpers import (Hub, build_compiled, build_model, make_optimizer, make_shards, optimizer_step,  # noqa: E402
                     run_script, script_env)

# tokens/s the reference consumes on one H100 (its summary: 499.6 M tokens in 300.1 s of training)
REFERENCE_H100_TOKENS_PER_S = 499.6e6 / 300.1
STARTUP_TARGET_S = 15.0  # process start -> first training step, on CPU
WAIT_TARGET = 0.01       # the loop should wait for data less than 1% of its time


def fmt_rate(x):
    return f"{x / 1e6:.2f} M tok/s" if x >= 1e6 else f"{x / 1e3:.1f} k tok/s" if x >= 1e3 else f"{x:.0f} tok/s"


def fmt_s(x):
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def on_device():
    return torch.device(train.DEVICE_TYPE)


def autocast():
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if train.DEVICE_TYPE == "cuda" else nullcontext()


def machine_lines():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = train.DEVICE_TYPE + (f" ({torch.cuda.get_device_name()})" if train.DEVICE_TYPE == "cuda" else "")
    load = " | load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return [f"machine: {cpu} | {os.cpu_count()} cores ({usable} usable) | {platform.system()} {platform.release()} | "
            f"Python {platform.python_version()}",
            f"torch {torch.__version__} ({torch.get_num_threads()} threads) | device: {device}{load}"]

# -----------------------------------------------------------------------------
# Data: tiny shards on a local hub, a cache made by the real prepare.py


def prepare_cache(n_docs):
    hub = Hub(WORK / "hub")
    try:
        make_shards(hub.shard_dir, n_docs=n_docs)
        t0 = time.perf_counter()
        result = run_script("prepare.py", "--num-shards", "2", cache=WORK / "cache", endpoint=hub.url)
        seconds = time.perf_counter() - t0
    finally:
        hub.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert prepare.DATA_DIR == str(WORK / "cache" / "data"), prepare.DATA_DIR
    return seconds

# -----------------------------------------------------------------------------
# 1. Packing: prepare.pack_batches against the naive packer, on the same pre-tokenized documents


def timed_batches(pack, tokenizer, n_batches, n_docs, B, T, doc_batches):
    """(batches, wall seconds, thread CPU seconds); CPU time is less sensitive to other processes than wall time."""
    batches = pack(tokenizer, B, T, doc_batches(n_docs))
    w0, c0 = time.perf_counter(), time.thread_time()
    out = [next(batches) for _ in range(n_batches)]
    return out, time.perf_counter() - w0, time.thread_time() - c0


def bench_packing(tokenizer, texts, n_batches, reps):
    mine = os.environ["AUTORESEARCH_CACHE_DIR"]
    import benchmark_packing as bp  # its import points AUTORESEARCH_CACHE_DIR at an empty temp dir: undo that
    if os.environ["AUTORESEARCH_CACHE_DIR"] != mine:
        shutil.rmtree(os.environ["AUTORESEARCH_CACHE_DIR"], ignore_errors=True)
        os.environ["AUTORESEARCH_CACHE_DIR"] = mine
    B, T = 128, prepare.MAX_SEQ_LEN
    docs = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())
    lengths = np.array([len(d) for d in docs])
    fake = bp.Pretokenized(docs, tokenizer.get_bos_token_id())
    best = {}
    for _ in range(reps):  # alternate, so both see the same background load; keep each one's best
        for name, pack in (("fast", prepare.pack_batches), ("naive", bp.naive_arrays)):
            out, wall, cpu = timed_batches(pack, fake, n_batches, len(docs), B, T, bp.document_batches)
            prev = best.get(name)
            best[name] = (out, min(wall, prev[1]) if prev else wall, min(cpu, prev[2]) if prev else cpu)
    (fast, fast_wall, fast_cpu), (naive, naive_wall, naive_cpu) = best["fast"], best["naive"]
    for i, ((rows, epoch), (naive_rows, naive_epoch)) in enumerate(zip(fast, naive)):
        assert np.array_equal(rows, naive_rows) and epoch == naive_epoch, f"packing: batch {i} differs from naive"
    tokens = n_batches * B * T
    return dict(tokens=tokens, fast_wall=fast_wall, naive_wall=naive_wall, fast_cpu=fast_cpu, naive_cpu=naive_cpu,
                docs=len(docs), mean_len=lengths.mean(), epochs=(fast[0][1], fast[-1][1]))


def bench_loader(tokenizer, n_batches):
    """The whole producer (parquet -> tokenizer -> packer -> tensors) at the training shape, nobody consuming:
    from make_dataloader to the last of n_batches batches."""
    B, T = 128, prepare.MAX_SEQ_LEN
    t0 = time.perf_counter()
    loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cpu")
    try:
        for _ in range(n_batches):
            next(loader)
        seconds = time.perf_counter() - t0
    finally:
        loader.close()
    return dict(tokens=n_batches * B * T, seconds=seconds)

def bench_tokenizer(tokenizer, texts):
    """tokens/s of the tokenizer alone, called as pack_batches calls it: 128 documents at a time."""
    bos = tokenizer.get_bos_token_id()
    encode = getattr(tokenizer, "encode_arrays", tokenizer.encode)
    t0 = time.perf_counter()
    n_tokens = sum(len(doc) for i in range(0, len(texts), 128) for doc in encode(texts[i:i + 128], prepend=bos))
    return n_tokens / (time.perf_counter() - t0)

# -----------------------------------------------------------------------------
# 2-3. A real training run: python train.py as a subprocess, every output line timestamped


def bench_train_run(budget, eval_tokens, timeout):
    env = script_env(WORK / "cache", extra_env={"AUTORESEARCH_TIME_BUDGET": str(budget),
                                                "AUTORESEARCH_EVAL_TOKENS": str(eval_tokens)})
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    lines = []  # (seconds since start, line)
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = "\n".join(text for _, text in lines)
    assert proc.returncode == 0, f"train.py exited with {proc.returncode}:\n{log[-3000:]}"

    def first(prefix):
        return next(((t, text) for t, text in lines if text.startswith(prefix)), (None, None))

    def summary(key):
        m = re.search(rf"^{key}:\s+(\S+)", log, re.M)
        assert m, f"no '{key}:' in the output of train.py:\n{log[-3000:]}"
        return float(m.group(1))

    m = re.search(r"^data: the loop waited ([\d.]+)s for batches in ([\d.]+)s \(([\d.]+)%\)", log, re.M)
    assert m, f"no 'data: the loop waited' line in the output of train.py:\n{log[-3000:]}"
    batch_tokens = int(re.search(r"^batch: ([\d,]+) tokens/step", log, re.M).group(1).replace(",", ""))
    t_header, _ = first("torch ")
    t_step0, step0 = first("step 00000")
    t_step11, _ = first("step 00011")
    dt0 = float(re.search(r"dt:\s*(\d+)ms", step0).group(1)) / 1e3
    steps, training_s = int(summary("num_steps")), summary("training_seconds")
    return dict(wait_s=float(m.group(1)), loop_s=float(m.group(2)), wait_pct=float(m.group(3)),
                batch_tokens=batch_tokens, steps=steps, training_s=training_s,
                tok_s=(steps - 11) * batch_tokens / training_s,  # training_seconds counts steps 11 onwards
                t_header=t_header, t_first_step_begins=t_step0 - dt0, t_step0=t_step0, t_step11=t_step11,
                dt0=dt0, wall=wall, total_s=summary("total_seconds"), val_bpb=summary("val_bpb"),
                cpu_s=(usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime))

# -----------------------------------------------------------------------------
# 4-5. In process: evaluate_bpb (with the waits of the loader it makes) and the cost of one training step


class WaitLog(prepare.DataLoader):
    """A DataLoader that also keeps each next()'s wait, so the first batch (start-up) can be told apart."""

    def __next__(self):
        before = self.wait_seconds
        try:
            return super().__next__()
        finally:
            self.waits.append(self.wait_seconds - before)


def bench_eval(model, tokenizer, eval_tokens):
    """evaluate_bpb as train.py calls it, on a Metric of this cache whose loader keeps its waits."""
    metric = prepare.Metric(str(WORK / "cache"), eval_tokens=eval_tokens)
    loaders = []

    def capturing(*args, **kwargs):
        loader = WaitLog(*args, **kwargs)
        loader.waits = []
        loaders.append(loader)
        return loader

    metric._loader = capturing
    train.sync()
    t0 = time.perf_counter()
    with autocast(), contextlib.redirect_stdout(io.StringIO()):  # its receipt
        bpb = metric.evaluate_bpb(model, tokenizer, train.DEVICE_BATCH_SIZE)
    train.sync()
    seconds = time.perf_counter() - t0
    assert len(loaders) == 1, f"evaluate_bpb made {len(loaders)} dataloaders"
    waits = loaders[0].waits
    steps = -(-eval_tokens // prepare.MAX_SEQ_LEN // train.DEVICE_BATCH_SIZE)
    assert len(waits) == steps, (len(waits), steps)
    return dict(tokens=eval_tokens // prepare.MAX_SEQ_LEN * prepare.MAX_SEQ_LEN, seconds=seconds, bpb=bpb,
                wait=sum(waits), first_wait=waits[0], later_wait=sum(waits[1:]))


def bench_steps(depths, vocab, B, T, warmup, steps):
    """Seconds of one forward + backward + optimizer step (eager) per depth, the best of `steps` after `warmup`.
    The depths take turns step by step, so a burst of background load hits them all alike; the best of a few
    is the least disturbed by it."""
    if train.DEVICE_TYPE == "cuda":  # the optimizer's compiled steps see every size's shapes at once
        from torch import _dynamo
        _dynamo.reset()
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
    x = torch.randint(0, vocab, (B, T), device=on_device())
    y = torch.randint(0, vocab, (B, T), device=on_device())
    runs = {}
    for depth in depths:
        model = build_model(depth, vocab)
        runs[depth] = (model, make_optimizer(model))

    def step(model, optimizer):
        train.sync()
        t0 = time.perf_counter()
        optimizer_step(model, optimizer, model, x, y, accum=1)
        train.sync()
        return time.perf_counter() - t0

    for depth in depths:
        for _ in range(warmup):
            step(*runs[depth])
    times = {depth: [] for depth in depths}
    for _ in range(steps):
        for depth in depths:
            times[depth].append(step(*runs[depth]))
    out = {depth: dict(seconds=min(times[depth]), params=runs[depth][0].num_params()["total"],
                       flops=runs[depth][0].estimate_flops()) for depth in depths}
    del runs
    gc.collect()
    return out

# -----------------------------------------------------------------------------
# 6. CUDA only: the default configuration, compiled, with each attention backend that loads


def cuda_backends(loaded):
    """[(name, fa3 module or None, None or why it cannot run)] for fa3, flex and sdpa."""
    best, fa3, note = loaded  # train.load_attention_backend()
    out = [("fa3", fa3, None) if best == "fa3" else ("fa3", None, f"train.load_attention_backend chose {note}")]
    try:  # load_attention_backend stops at the first that works; check flex on its own
        train.check_flex_attention()
        out.append(("flex", None, None))
    except Exception as e:
        out.append(("flex", None, f"{type(e).__name__}: {e}"))
    out.append(("sdpa", None, None))
    return out


def bench_cuda_backend(name, fa3, vocab, warmup, steps):
    model, optimizer, compiled = build_compiled(name, fa3, vocab)
    flops_per_token = model.estimate_flops()
    B, T = train.DEVICE_BATCH_SIZE, prepare.MAX_SEQ_LEN
    accum = train.TOTAL_BATCH_SIZE // (B * T)
    x = torch.randint(0, vocab, (B, T), device=on_device())
    y = torch.randint(0, vocab, (B, T), device=on_device())
    torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            optimizer_step(model, optimizer, compiled, x, y, accum)
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            optimizer_step(model, optimizer, compiled, x, y, accum)
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - t0) / steps
        gpu = torch.cuda.get_device_name()
        peak = next((f for key, f in train.GPU_PEAK_FLOPS if key in gpu), 0.0)
        tok_s = accum * B * T / step_s
        return dict(tok_s=tok_s, step_s=step_s, warmup_s=warmup_s,
                    mfu=100 * flops_per_token * tok_s / peak if peak else None,
                    peak_mb=torch.cuda.max_memory_allocated() / 1024**2, accum=accum)
    finally:
        del model, optimizer, compiled, x, y
        gc.collect()
        torch.cuda.empty_cache()


def cuda_rows(loaded, vocab, warmup, steps, say):
    def cell(text):  # an error message inside a markdown table cell
        return " ".join(str(text).split())[:120].replace("|", "/")

    rows = []
    for name, fa3, why in cuda_backends(loaded):
        label = f"CUDA, DEPTH {train.DEPTH}, B={train.DEVICE_BATCH_SIZE}, compiled, attention {name}"
        if why:
            rows.append(("6", label, "did not load", "—", cell(why)))
            continue
        say(f"6. {label}: {warmup} warm-up + {steps} timed steps")
        try:
            c = bench_cuda_backend(name, fa3, vocab, warmup, steps)
        except Exception as e:  # one backend failing (out of memory, compile error) must not hide the others
            rows.append(("6", label, "failed", "—", cell(f"{type(e).__name__}: {e}")))
            continue
        mfu = f"MFU {c['mfu']:.1f}%" if c["mfu"] is not None else "MFU: unknown GPU peak"
        rows.append(("6", label, fmt_rate(c["tok_s"]), f"{mfu}, peak {c['peak_mb']:,.0f} MB",
                     f"step {fmt_s(c['step_s'])} ({c['accum']} micro-batches), warm-up {c['warmup_s']:.0f} s"))
    return rows

# -----------------------------------------------------------------------------
# Main


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller everything (~2-3 min on 2 CPU cores; the full run ~5 min)")
    args = parser.parse_args()
    q = args.quick
    cuda = train.DEVICE_TYPE == "cuda"
    s = dict(  # sizes: --quick, full
        n_docs=3000 if q else 4000,                    # documents per shard
        pack_batches=3 if q else 8, pack_reps=1 if q else 2,
        loader_batches=3 if q else 8,
        budget=3 if q else 15,                         # AUTORESEARCH_TIME_BUDGET of the training run, s
        eval_base=2**13 if q else 2**14,               # evaluate_bpb tokens at 1x (then 2x, 4x)
        eval_reps=1 if q else 2,
        step_T=512 if q else prepare.MAX_SEQ_LEN, step_warmup=1 if q else 2, step_steps=3,
        cuda_warmup=3 if q else 5, cuda_steps=5 if q else 10,
    )
    one_batch = train.DEVICE_BATCH_SIZE * prepare.MAX_SEQ_LEN
    s["eval_base"] = max(s["eval_base"], one_batch)
    run_eval_tokens = max(2 * 4 * prepare.MAX_SEQ_LEN, one_batch)  # the training run's own evaluation, kept short
    rows = []  # (#, what, measured, baseline, ratio / verdict)

    def say(msg):
        print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)

    for line in machine_lines():
        print(line)
    say(f"data: 3 shards of {s['n_docs']} documents, cache by prepare.py in {WORK}")
    prep_s = prepare_cache(s["n_docs"])
    tokenizer = prepare.Tokenizer.from_directory()
    vocab = tokenizer.get_vocab_size()
    train_texts = [t for path in prepare.shard_paths("train")
                   for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]

    # 1. packing
    say(f"1. packing {s['pack_batches']} batches of 128 x 2049, fast and naive, best of {s['pack_reps']}")
    p = bench_packing(tokenizer, train_texts, s["pack_batches"], s["pack_reps"])
    rows.append(("1", f"packing only, B=128 T=2048 ({p['docs']} documents, mean {p['mean_len']:.0f} tokens, "
                      f"epochs {p['epochs'][0]}-{p['epochs'][1]}); outputs identical",
                 f"{fmt_rate(p['tokens'] / p['fast_wall'])} (pack_batches)",
                 f"{fmt_rate(p['tokens'] / p['naive_wall'])} (naive list scan)",
                 f"{p['naive_wall'] / p['fast_wall']:.1f}x faster (CPU time: {p['naive_cpu'] / p['fast_cpu']:.1f}x)"))
    say(f"1b. the whole loader: {s['loader_batches']} batches from parquet through the tokenizer and the packer")
    ld = bench_loader(tokenizer, s["loader_batches"])
    rate = ld["tokens"] / ld["seconds"]
    tokenizer_rate = bench_tokenizer(tokenizer, train_texts)
    rows.append(("1b", f"dataloader producer (parquet + tokenizer + packer + tensors), B=128 T=2048, "
                       f"{s['loader_batches']} batches, from creation",
                 fmt_rate(rate), f"{fmt_rate(REFERENCE_H100_TOKENS_PER_S)} (reference H100 training)",
                 f"{rate / REFERENCE_H100_TOKENS_PER_S:.2f}x of the H100's need, on this CPU "
                 f"(tokenizer alone: {fmt_rate(tokenizer_rate)})"))

    # 2-3. a real training run
    say(f"2-3. python train.py, time budget {s['budget']} s, eval tokens {run_eval_tokens:,}")
    r = bench_train_run(s["budget"], run_eval_tokens, timeout=900 + 10 * s["budget"])
    rows.append(("2", f"training loop blocked waiting for its next batch (train.py, {r['steps']} steps, "
                      f"{r['batch_tokens']:,} tokens/step)",
                 f"{r['wait_s']:.2f} s of {r['loop_s']:.1f} s", "target < 1%",
                 f"{r['wait_pct']:.2f}% {'ok' if r['wait_pct'] < 100 * WAIT_TARGET else 'OVER'} "
                 # the loop's time includes steps 0-10 (compilation on CUDA); charging every wait to the timed
                 # steps alone gives an upper bound for the steady state
                 f"(at most {100 * r['wait_s'] / r['training_s']:.2f}% of the timed steps)"))
    rows.append(("3", "training throughput (train.py, steps 11+: tokens / training_seconds)",
                 fmt_rate(r["tok_s"]), f"dataloader producer {fmt_rate(rate)} (1b)",
                 f"producer {rate / r['tok_s']:,.0f}x faster than training consumes; {r['training_s']:.1f} s timed, "
                 f"val_bpb {r['val_bpb']:.4f}"))
    startup_ok = "ok" if r["t_first_step_begins"] < STARTUP_TARGET_S else "OVER"
    rows.append(("3b", "start-up: process start -> first training step begins (`step 00000` line minus its dt)",
                 f"{r['t_first_step_begins']:.1f} s", f"target < {STARTUP_TARGET_S:.0f} s" + ("" if cuda else " (CPU)"),
                 (startup_ok if not cuda else "the target is for CPU")
                 + f"; start-up line `torch ...` at {r['t_header']:.1f} s"))
    rows.append(("3c", "process start -> `step 00000` / `step 00011` lines (step 0 alone)",
                 f"{r['t_step0']:.1f} s / {r['t_step11']:.1f} s", f"step 0: {fmt_s(r['dt0'])}",
                 f"whole run {r['wall']:.1f} s, child CPU {r['cpu_s'] / r['wall']:.2f} cores on average"))

    # 4-5. evaluation and step cost, in process
    loaded = train.load_attention_backend()  # once: on CUDA it may try the hub for Flash Attention 3
    train.ATTN_BACKEND, train.fa3, _ = loaded
    if train.ATTN_BACKEND == "flex":
        train.ATTN_BACKEND = "sdpa"  # flex attention uncompiled is a slow dense fallback; these runs are eager
    model = build_model(train.DEPTH, vocab)
    evals = {}
    for _ in range(s["eval_reps"]):  # in turns, keeping each size's best run (background load comes in bursts)
        for mult in (1, 2, 4):
            n = s["eval_base"] * mult
            say(f"4-5. evaluate_bpb, {n:,} tokens at B={train.DEVICE_BATCH_SIZE} (DEPTH {train.DEPTH})")
            e = bench_eval(model, tokenizer, n)
            if mult not in evals or e["seconds"] < evals[mult]["seconds"]:
                evals[mult] = e
    del model
    gc.collect()
    e = evals[4]
    rows.append(("4", f"evaluate_bpb throughput ({e['tokens']:,} tokens, B={train.DEVICE_BATCH_SIZE}, "
                      f"DEPTH {train.DEPTH}, eager)",
                 fmt_rate(e["tokens"] / e["seconds"]), f"{e['seconds']:.1f} s in all", f"bpb {e['bpb']:.4f}"))
    rows.append(("4b", "evaluate_bpb time waiting on data: all / first batch (start-up) / the rest",
                 f"{100 * e['wait'] / e['seconds']:.2f}% / {fmt_s(e['first_wait'])} / "
                 f"{100 * e['later_wait'] / e['seconds']:.2f}%", "target < 1%",
                 "ok" if e["later_wait"] / e["seconds"] < WAIT_TARGET else "OVER"))
    base = evals[1]["seconds"]
    rows.append(("5a", f"evaluate_bpb time at 1x / 2x / 4x {s['eval_base']:,} tokens",
                 " / ".join(f"{evals[m]['seconds']:.2f} s" for m in (1, 2, 4)), "1x",
                 " / ".join(f"{evals[m]['seconds'] / base:.2f}x" for m in (1, 2, 4))))
    B, T = 1, s["step_T"]
    say(f"5. step time at DEPTH 2, 4, 8, B={B} T={T}, {s['step_warmup']} warm-up + {s['step_steps']} timed, in turns")
    steps = bench_steps((2, 4, 8), vocab, B, T, s["step_warmup"], s["step_steps"])
    base = steps[2]
    rows.append(("5b", f"step time, best of {s['step_steps']} (fwd + bwd + MuonAdamW, eager), B={B} T={T}, "
                       f"ASPECT_RATIO {train.ASPECT_RATIO} HEAD_DIM {train.HEAD_DIM}, DEPTH 2 / 4 / 8",
                 " / ".join(fmt_s(steps[d]["seconds"]) for d in (2, 4, 8)),
                 "params " + " / ".join(f"{steps[d]['params'] / 1e6:.1f}M" for d in (2, 4, 8)),
                 "time " + " / ".join(f"{steps[d]['seconds'] / base['seconds']:.2f}x" for d in (2, 4, 8))
                 + ", FLOPs/token " + " / ".join(f"{steps[d]['flops'] / base['flops']:.2f}x" for d in (2, 4, 8))))

    # 6. attention backends on CUDA
    if cuda:
        rows += cuda_rows(loaded, vocab, s["cuda_warmup"], s["cuda_steps"], say)
    else:
        print("6. attention backends: skipped (no CUDA on this machine)")
        rows.append(("6", "attention backends (fa3 / flex / sdpa) at the default config", "skipped", "—",
                     "CUDA only"))

    say(f"done (prepare.py took {prep_s:.1f} s)")
    print()
    for line in machine_lines():
        print(line)
    print()
    print("| # | measurement | result | compared with | ratio / verdict |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    T0 = time.perf_counter()
    try:
        main()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
