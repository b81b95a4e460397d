"""
Wall time of a wave of 4 short experiments run 1 at a time against 2 at a time, with the commands of
docs/program-multi-gpu.md, on this machine's CPU. Prints one markdown table (docs/multi-gpu.md quotes it).

Usage: uv run python dev/benchmark_parallel.py [--budget 5] [--threads 2 1]

Each experiment is its own commit in its own worktree (slot): the real train.py at the tests' tiny
settings, training for --budget seconds of wall clock and evaluating 2048 tokens, on one cache made by the
real prepare.py from tiny shards served on 127.0.0.1. The wave runs once per torch thread count (--threads,
OMP_NUM_THREADS per run) and per number of runs at a time (1, then 2), and its rows are recorded with
analysis.py into one results.tsv. It also times the orchestration itself: adding the worktrees, committing
the ideas, recording the rows. Everything lives in a temp dir that is deleted at the end. Not a test: pytest
does not collect it. On a shared machine the timings are noisy; every ratio is taken within one run.
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the scripts, and tests/helpers.py

import torch  # noqa: E402

from helpers import (SLOTS_TAG, Agent, agent_env, block, cache_digest, doc_block, line,  # noqa: E402
                     make_prepared_cache, make_repo, new_idea, record, summary, wave)

SLOTS = 4
IDEAS = [None, ("MATRIX_LR", "0.05"), ("MATRIX_LR", "0.03"), ("WARMDOWN_RATIO", "0.3")]  # slot 0: the baseline


def timed(fn, *args, **kwargs):
    t0 = time.time()
    out = fn(*args, **kwargs)
    return out, time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--budget", type=float, default=5.0, help="training seconds per run (default 5)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch threads per run (default 2 1)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autoresearch-benchmark-parallel-"))
    try:
        run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work, args):
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  progress; the table goes to stdout
    cache = make_prepared_cache(work)
    before = cache_digest(cache)

    repo = work / "repo"
    repo.mkdir()
    env = agent_env(cache)
    env.update(AUTORESEARCH_TIME_BUDGET=str(args.budget), AUTORESEARCH_RULE="plain")
    if env.pop("PYTHONDONTWRITEBYTECODE", None):  # else every run compiles torch's modules again (tests/conftest.py)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    make_repo(repo, env, slow_start=False, warmup=None)  # train.py's own 11 uncounted steps
    agent = Agent(repo, env)
    agent.sh(block("git checkout -b"), tag=SLOTS_TAG)
    agent.sh(block("printf 'commit"))

    # the orchestration: a worktree per slot, one idea committed in each
    _, t_setup = timed(lambda: [agent.sh(doc_block("add"), n=str(n)) for n in range(SLOTS)])
    t0 = time.time()
    for n, idea in enumerate(IDEAS):
        if idea:
            new_idea(agent, repo / ".worktrees" / str(n), n, *idea)
        else:
            agent.sh(line("commit", "git -C .worktrees/<n> checkout"), n=str(n), commit=f"autoresearch/{SLOTS_TAG}")
    t_commit = time.time() - t0

    say("warm-up run (bytecode, first imports) ...")
    agent.sh(wave([(0, 42)]), timeout=1800)
    rows, load = [], os.getloadavg()[0]
    for threads in args.threads:
        agent.env = dict(env, OMP_NUM_THREADS=str(threads))
        for at_once in (1, 2):
            say(f"wave of {SLOTS}: {threads} thread(s) per run, {at_once} at a time ...")
            t_wave = 0.0
            for first in range(0, SLOTS, at_once):
                _, t = timed(agent.sh, wave([(n, 42) for n in range(first, first + at_once)]), timeout=1800)
                t_wave += t
            logs = [summary(repo / ".worktrees" / str(n) / "run.log") for n in range(SLOTS)]
            assert all("val_bpb" in s for s in logs), logs
            rows.append(dict(threads=threads, at_once=at_once, wall=t_wave,
                             steps=[int(s["num_steps"]) for s in logs],
                             run_s=[float(s["total_seconds"]) for s in logs]))

    # the records of the last wave, one slot after another, into the one results.tsv
    said, t_record = timed(lambda: [record(agent, n, "x") for n in range(SLOTS)])
    assert len((repo / "results.tsv").read_text().splitlines()) == 1 + SLOTS, said
    assert cache_digest(cache) == before

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}; load average before the waves "
          f"{load:.2f}")
    print(f"4 experiments (4 commits, 4 worktrees), tiny train.py, {args.budget:g} s training budget each\n")
    print("| torch threads per run | runs at a time | wave wall time | speed-up vs 1 at a time | steps per run (mean) | "
          "one run, start to summary (mean) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["threads"] == r["threads"] and b["at_once"] == 1)
        print(f"| {r['threads']} | {r['at_once']} | {r['wall']:.1f} s | {base['wall'] / r['wall']:.2f}x | "
              f"{sum(r['steps']) / SLOTS:.0f} | {sum(r['run_s']) / SLOTS:.1f} s |")
    print(f"\norchestration: {SLOTS} `git worktree add` {t_setup:.2f} s; {SLOTS} checkouts + 3 commits "
          f"{t_commit:.2f} s; {SLOTS} `analysis.py record` {t_record:.2f} s (one after another)")


if __name__ == "__main__":
    main()
