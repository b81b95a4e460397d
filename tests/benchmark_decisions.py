"""
Decision quality of the keep/discard judgement: simulated nights of experiments with known true effects, judged
by analysis.judge itself, under the noise-aware rule and under the reference's plain rule, on the same draws.

Usage: uv run python tests/benchmark_decisions.py [--nights 60] [--experiments 60] [--sigma 0.00233]

Each night starts from a baseline, then runs experiments whose true effect on val_bpb is drawn from a mix where
most ideas do not help: -2, -1, 0, +1, +2 or +4 noise floors of gain (negative: the idea hurts). A run's val_bpb
is the commit's true value plus normal noise with standard deviation sigma, drawn afresh for every run (another
seed, other initial weights). The noise floor is how far a seed change moves val_bpb: the standard deviation of
the difference between two runs, sqrt(2) * sigma. The default sigma, 0.00233, is the H100 measurement at the
5-minute budget (two seeds 0.0033 apart). The keep rates do not depend on sigma, only on the effects in floors.

Besides the keep rates, it reports the true improvement of a night against the one results.tsv claims (the
baseline minus the best kept val_bpb, as analysis.py reports it), and the true improvement per 100 runs (per
GPU-hour: the noise-aware rule spends more runs per experiment).

A kept experiment becomes the best that later ones are compared with, as in a real night, and each rule follows
its own protocol: plain runs every commit once; noise runs the baseline under its seeds plus a same-seed repeat,
reruns in-between candidates and completes kept ones. Both rules see the same true effects and, run for run,
the same noise draws.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import analysis  # noqa: E402

EFFECTS = [(-2, 0.20), (-1, 0.20), (0, 0.35), (1, 0.10), (2, 0.10), (4, 0.05)]  # gain in floors, probability
TARGETS = [("no-effect change kept", 0, "<=", 0.05), ("2x-floor gain kept", 2, ">=", 0.75),
           ("4x-floor gain kept", 4, ">=", 0.99)]


def run_night(rule, effects, noise, sigma, baseline=0.998):
    """One night under `rule`. `noise` is a (experiments + 1, 8) array of standard normal draws: row i feeds the
    runs of experiment i (row 0: the baseline), so both rules see the same draws. Returns one dict per
    experiment: its true effect, its final status and how many runs it cost."""
    floor = math.sqrt(2) * sigma
    rows, out, true_best = [], [], baseline

    def judge_run(commit, description, value, seed, fingerprint):
        rows.append({"commit": commit, "val_bpb": value, "memory_gb": 1.0, "status": "discard",
                     "description": description, "seed": seed, "num_steps": 100, "attention": "fa3",
                     "device": "H100", "init_fingerprint": fingerprint, "verdict": "", "line": len(rows) + 2})
        df = pd.DataFrame(rows, columns=analysis.HEADER + ["line"])
        v = analysis.judge(df, commit, rule)
        for r in rows:  # what `analysis.py record` writes back: the commit's status on all its rows
            if r["commit"] == commit:
                r["status"] = v["status"]
        rows[-1]["verdict"] = v["verdict"]
        return v

    for i, effect in enumerate([None] + list(effects)):
        commit = f"c{i:06d}"
        true_value = true_best if effect is None else true_best - effect * floor
        seed, n = analysis.SEEDS[0], 0
        while True:
            v = judge_run(commit, "baseline" if effect is None else f"effect {effect:+g}",
                          true_value + sigma * noise[i, n], seed, f"{commit}-{seed}")
            n += 1
            if v["verdict"] != "rerun":
                break
            seed = v["seed"]
        if effect is None:
            continue
        out.append({"effect": effect, "status": v["status"], "runs": n})
        if v["status"] == "keep":
            true_best = true_value
    claimed = analysis.summarize(pd.DataFrame(rows, columns=analysis.HEADER + ["line"]))["improvement_abs"]
    return out, {"true": baseline - true_best, "claimed": claimed, "runs": len(rows)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--nights", type=int, default=60)
    parser.add_argument("--experiments", type=int, default=60, help="experiments per night after the baseline")
    parser.add_argument("--sigma", type=float, default=0.0033 / math.sqrt(2), help="per-run noise (val_bpb)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    results = {rule: [] for rule in analysis.RULES}
    nights = {rule: [] for rule in analysis.RULES}
    values, probs = zip(*EFFECTS)
    for _ in range(args.nights):
        effects = rng.choice(values, p=probs, size=args.experiments)
        noise = rng.standard_normal((args.experiments + 1, 8))
        for rule in analysis.RULES:
            out, night = run_night(rule, effects, noise, args.sigma)
            results[rule] += out
            nights[rule].append(night)

    floor = math.sqrt(2) * args.sigma
    n = args.nights * args.experiments
    print(f"{args.nights} nights x {args.experiments} experiments ({n} per rule), per-run sigma {args.sigma:.5f}, "
          f"noise floor {floor:.5f}; mix of true gains in floors: "
          + ", ".join(f"{v:+d} ({p:.0%})" for v, p in EFFECTS) + f"; {time.time() - t0:.0f} s\n")
    print("| true gain (noise floors) | " + " | ".join(f"{r} rule: kept" for r in analysis.RULES) + " |")
    print("|---|" + "---|" * len(analysis.RULES))
    for v, _ in EFFECTS:
        cells = []
        for rule in analysis.RULES:
            sel = [r for r in results[rule] if r["effect"] == v]
            cells.append(f"{np.mean([r['status'] == 'keep' for r in sel]):.1%} of {len(sel)}")
        print(f"| {v:+d} |" + "|".join(f" {c} " for c in cells) + "|")
    print("| runs per experiment |" + "|".join(f" {np.mean([r['runs'] for r in results[rule]]):.2f} "
                                             for rule in analysis.RULES) + "|")
    def per_night(key, rule):
        return np.mean([night[key] for night in nights[rule]])

    print("| true improvement per night (floors) |" + "|".join(
        f" {per_night('true', rule) / floor:.1f} " for rule in analysis.RULES) + "|")
    print("| improvement results.tsv claims per night (floors) |" + "|".join(
        f" {per_night('claimed', rule) / floor:.1f} " for rule in analysis.RULES) + "|")
    print("| true improvement per 100 runs (floors) |" + "|".join(
        f" {100 * per_night('true', rule) / per_night('runs', rule) / floor:.1f} " for rule in analysis.RULES) + "|")
    print("| harmful changes kept per night |" + "|".join(
        f" {sum(r['status'] == 'keep' and r['effect'] < 0 for r in results[rule]) / args.nights:.2f} "
        for rule in analysis.RULES) + "|")
    print()
    ok = True
    for name, effect, op, target in TARGETS:
        rate = np.mean([r["status"] == "keep" for r in results["noise"] if r["effect"] == effect])
        met = rate <= target if op == "<=" else rate >= target
        ok &= met
        print(f"target: {name} {op} {target:.0%}: {rate:.1%} ({'met' if met else 'NOT MET'})")
    runs = np.mean([r["runs"] for r in results["noise"]])
    ok &= runs <= 2
    print(f"target: runs per experiment <= 2: {runs:.2f} ({'met' if runs <= 2 else 'NOT MET'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
