"""
Steps and step-time spread of the real train.py at its default config: this project's side of a same-GPU
comparison with the reference's train.py (docs/performance.md, "Against the reference on the same GPU").

Usage: uv run python dev/benchmark_steps.py [--budget 120] [--cache DIR]

Runs `python train.py` once, unedited, with AUTORESEARCH_TIME_BUDGET=<budget>, under a pseudo-terminal: on a
terminal train.py rewrites its progress line every step (into a file or a pipe it writes one line per ~5 s), so
every step's dt and loss can be read. Prints steps in the budget, the step time of the timed steps (11 onwards)
as median, 95th percentile, min and max, how long the loop waited for data, and the losses of steps 0-11 (the same
data and seed give the same losses, so they show two runs trained alike). Data: a cache made by the real
prepare.py from tiny shards served on 127.0.0.1 (deleted at the end), or with --cache an existing prepared cache
(`uv run prepare.py`), to compare runs on the same data. The evaluation is cut to one batch: its val_bpb means
nothing and is not printed. The environment is passed through as it is (HF_ENDPOINT included, so Flash
Attention 3 loads from the hub where it can). POSIX only (pty). Not a test: pytest does not collect it.
"""

import argparse
import os
import pty
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the scripts, and tests/helpers.py

from benchmark import machine_lines  # noqa: E402
from helpers import make_prepared_cache  # noqa: E402

# train.py's progress line: step, % done, smoothed loss, lr multiplier, dt, ...
STEP_LINE = re.compile(r"step (\d+) \(\s*[\d.]+%\) \| loss: ([\d.]+) \| lrm: [\d.]+ \| dt:\s*(\d+)ms")
DATA_LINE = re.compile(r"data: the loop waited ([\d.]+)s for batches in ([\d.]+)s \(([\d.]+)%\)")
TIMED_FROM = 11  # steps 0-10 compile and warm up; train.py's training_seconds counts steps 11 onwards


def run_on_a_terminal(cmd, env, timeout):
    """(exit status, output) of `cmd` with stdout and stderr on a pseudo-terminal, read as it comes."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:  # exited, and nothing more came (a child may hold the terminal)
                    break
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            chunks.append(f"\n[benchmark: killed after {timeout:.0f} s]\n".encode())
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def parse(output):
    """Every step's (loss, dt in ms), the summary, the data wait and train.py's first line, from its output."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    steps = {}
    for line in lines:
        m = STEP_LINE.match(line)
        if m:
            steps[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", "\n".join(lines), re.M))
    data = next((DATA_LINE.match(line) for line in lines if DATA_LINE.match(line)), None)
    header = next((line for line in lines if line.startswith("torch ")), "")
    return steps, summary, data, header


def percentile(values, q):
    """The q-th percentile, linear between the closest ranks (numpy's default)."""
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--budget", type=float, default=120, help="AUTORESEARCH_TIME_BUDGET, seconds (default 120)")
    parser.add_argument("--cache", type=Path, help="a cache prepared by `uv run prepare.py` (default: tiny shards)")
    parser.add_argument("--n-docs", type=int, default=4000, help="documents per tiny shard (without --cache)")
    args = parser.parse_args()

    import train  # for the batch size of one evaluation batch (the small-machine one off CUDA)
    eval_tokens = train.DEVICE_BATCH_SIZE * train.MAX_SEQ_LEN
    print("\n".join(machine_lines()))
    work = Path(tempfile.mkdtemp(prefix="autoresearch-benchmark-steps-"))
    try:
        if args.cache:
            cache = args.cache.expanduser().resolve()
            data_note = f"cache {cache}"
        else:
            print(f"data: 3 tiny shards of {args.n_docs} documents, prepared by prepare.py in {work}", flush=True)
            cache = make_prepared_cache(work, args.n_docs)
            data_note = f"3 tiny shards of {args.n_docs} documents (tests/helpers.py)"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
        env.update(AUTORESEARCH_CACHE_DIR=str(cache), AUTORESEARCH_TIME_BUDGET=f"{args.budget:g}",
                   AUTORESEARCH_EVAL_TOKENS=str(eval_tokens), PYTHONUNBUFFERED="1")
        print(f"running train.py (default config) on a pseudo-terminal, time budget {args.budget:g} s ...", flush=True)
        t0 = time.perf_counter()
        status, output = run_on_a_terminal([sys.executable, str(ROOT / "train.py")], env,
                                           timeout=args.budget + 1200)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps, summary, data, header = parse(output)
    tail = output[-3000:].replace("\r", "\n")
    if status != 0:
        raise SystemExit(f"{tail}\nerror: train.py exited with status {status} (its output ends above)")
    if "num_steps" not in summary or not data:
        raise SystemExit(f"{tail}\nerror: no summary block or `data:` line in train.py's output (it ends above)")
    n = int(summary["num_steps"])
    if sorted(steps) != list(range(n)):  # a change to train.py's progress line would end here, not in bad numbers
        raise SystemExit(f"{tail}\nerror: read {len(steps)} step lines for {n} steps from train.py's output")
    timed = [steps[i][1] for i in range(TIMED_FROM, n)]
    warm = [steps[i][1] for i in range(1, TIMED_FROM)]  # train.py runs at least 12 steps
    tokens_per_step = int(re.search(r"^batch: ([\d,]+) tokens/step", output, re.M).group(1).replace(",", ""))
    median = statistics.median(timed)

    print()
    print(machine_lines()[-1])  # again: the load average over the run
    print(header)
    print(f"data: {data_note}")
    print()
    print("| measurement | result |")
    print("|---|---|")
    rows = [
        ("steps in the budget (`num_steps`), `training_seconds`",
         f"{n} steps, {float(summary['training_seconds']):.1f} s (budget {args.budget:g} s)"),
        (f"step time, steps {TIMED_FROM}+ ({len(timed)} steps): median / 95th percentile",
         f"{median:.0f} ms / {percentile(timed, 95):.0f} ms"),
        (f"step time, steps {TIMED_FROM}+: min / max", f"{min(timed):.0f} ms / {max(timed):.0f} ms"),
        ("step 0 (compilation on CUDA) / steps 1-10, median",
         f"{steps[0][1] / 1e3:.1f} s / {statistics.median(warm):.0f} ms"),
        ("data wait in the loop (train.py's `data:` line)",
         f"{float(data.group(1)):.2f} s of {float(data.group(2)):.1f} s ({float(data.group(3)):.2f}%)"),
        ("tokens/s at the median step; `mfu_percent`",
         f"{tokens_per_step / median * 1e3:,.0f}; {float(summary['mfu_percent']):.2f}"),
        ("`peak_vram_mb`; process start to summary (`total_seconds`)",
         f"{float(summary['peak_vram_mb']):.1f}; {float(summary['total_seconds']):.1f} s (benchmark wall {wall:.1f} s)"),
        ("losses of steps 0-11 (smoothed, as printed)",
         ", ".join(f"{steps[i][0]:.6f}" for i in range(12))),
    ]
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
