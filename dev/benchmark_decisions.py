"""
Decision quality of the keep/discard judgement: thousands of simulated nights with known true effects, judged by
judge.py (the functions analysis.py judges every real run with, over all nights at once) and by the reference's
plain rule on the same draws, in seven scenarios.

Usage: uv run python dev/benchmark_decisions.py [--nights 4000] [--experiments 100] [--seed 0]

A night is a baseline and then `--experiments` ideas, each a commit on top of the best kept so far, whose true effect
on val_bpb is drawn from a mix, in noise floors of gain (the floor is sqrt(2) * sigma, how far a seed change alone
moves val_bpb between two runs; negative: the idea hurts). A run scores its commit's true value plus noise of standard
deviation sigma. The scenarios:

  today        the mix -2, -1, 0, +1, +2, +4 floors with probabilities 20, 20, 35, 10, 10, 5%; every commit draws
               new initial weights, so two runs share no noise
  half_zero    half of all ideas do nothing; the others in today's proportions
  small_harm   today's mix with the ideas that did nothing hurting by 0.3 floors instead
  same_init    hyperparameter-only edits: every commit shares the best's initial weights under each seed, but that
               shares none of the noise (a seed-for-seed difference spreads as much as an unpaired one)
  same_init_shared   the same edits where it does: 3/4 of a run's noise variance is the initial weights', so a
               seed-for-seed difference has half the unpaired spread (which the plain rule, always under seed 42,
               gains from too)
  noise_half, noise_twice   today's mix with the true noise at half and at twice the sigma the effects are stated
               in. The judge uses no calibration (it measures the noise each night), so this is the same as every
               effect at twice or half its size in floors

The rule's constants were tuned with --seed 1 and are reported on --seed 0. Exit status 1 when a target is not met.
"""

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import judge  # noqa: E402

GAINS = [-2, -1, 0, 1, 2, 4]
TODAY = [0.20, 0.20, 0.35, 0.10, 0.10, 0.05]
HALF_ZERO = [p * 0.5 / 0.65 if g else 0.5 for g, p in zip(GAINS, TODAY)]
SCENARIOS = {  # name: (gains, probabilities, shared initial weights, fraction of the noise variance they carry, sigma)
    "today": (GAINS, TODAY, False, 0.0, 1.0),
    "half_zero": (GAINS, HALF_ZERO, False, 0.0, 1.0),
    "small_harm": ([-2, -1, -0.3, 1, 2, 4], TODAY, False, 0.0, 1.0),
    "same_init": (GAINS, TODAY, True, 0.0, 1.0),
    "same_init_shared": (GAINS, TODAY, True, 0.75, 1.0),
    "noise_half": (GAINS, TODAY, False, 0.0, 0.5),
    "noise_twice": (GAINS, TODAY, False, 0.0, 2.0),
}
NULL = {"small_harm": -0.3}  # the class of "changes that do nothing" in each scenario (0 elsewhere)
N_SEEDS = len(judge.BASELINE_SEEDS)  # seed slots: the baseline's seeds, the candidates' two among them
FLOOR = math.sqrt(2)  # the simulation counts in units of sigma; effects are in floors of it
EFFICIENCY = {"today": 0.78, "same_init_shared": 0.84}  # true gain per run against the plain rule's, at least (to
                                                       # two decimals: the rule's efficiency before judge.py existed)


def draws(scenario, nights, experiments, rng):
    """Everything random about a set of nights: true effects (floors), the per-seed noise of the shared initial
    weights, the baseline's own noise and up to two runs' own noise per experiment."""
    gains, probs, *_ = SCENARIOS[scenario]
    return {"effect": rng.choice(gains, p=probs, size=(nights, experiments)).astype(float),
            "init": rng.standard_normal((nights, N_SEEDS)), "base": rng.standard_normal((nights, N_SEEDS)),
            "run": rng.standard_normal((nights, experiments, 2))}


def run_value(scenario, d, true_value, own, seed_slot):
    """Runs, in units of sigma: the true value plus sigma * (the initial weights' share under this seed + the run's
    own)."""
    _, _, shared, rho, sigma = SCENARIOS[scenario]
    if not shared:
        return true_value + sigma * own
    return true_value + sigma * (math.sqrt(rho) * d["init"][:, seed_slot] + math.sqrt(1 - rho) * own)


def simulate_plain(scenario, d):
    """Every night under the reference's rule: one run under seed 42 each, kept when strictly lower than the best.
    Returns per-experiment keep (bool) and runs, and per night the true gain, the gain results.tsv claims
    (baseline - best) and the runs."""
    nights, experiments = d["effect"].shape
    keep, runs, true = np.zeros((nights, experiments), bool), np.ones((nights, experiments)), np.zeros(nights)
    best = run_value(scenario, d, 0.0, d["base"][:, 0], 0)
    base = best.copy()
    for e in range(experiments):
        value = true - d["effect"][:, e] * FLOOR
        y = run_value(scenario, d, value, d["run"][:, e, 0], 0)
        keep[:, e] = y < best
        best, true = np.where(keep[:, e], y, best), np.where(keep[:, e], value, true)
    return {"keep": keep, "runs": runs, "true": -true / FLOOR, "claimed": (base - best) / FLOOR,
            "total_runs": runs.sum(1) + 1}


def simulate_noise(scenario, d):
    """Every night through judge.py as analysis.py record uses it: the baseline under its four seeds (judge.start),
    then each experiment's run under seed 42 compared with the best (judge.compare, judge.decide), rerun under seed
    43 when undecided, and the night carried on with its runs (judge.step). Returns what simulate_plain returns."""
    shared, (nights, experiments) = SCENARIOS[scenario][2], d["effect"].shape
    base = np.stack([run_value(scenario, d, 0.0, d["base"][:, s], s) for s in range(N_SEEDS)], 1)
    night = judge.start(base, base[:, :2])
    keep, runs, true = np.zeros((nights, experiments), bool), np.zeros((nights, experiments)), np.zeros(nights)
    best_mean = base.mean(1)  # the mean of the best's runs, as results.tsv claims it
    same, nan = np.full(nights, shared), np.full(nights, np.nan)
    for e in range(experiments):
        value = true - d["effect"][:, e] * FLOOR
        y1 = run_value(scenario, d, value, d["run"][:, e, 0], 0)
        y2 = run_value(scenario, d, value, d["run"][:, e, 1], 1)
        one = judge.Runs(y1, np.ones(nights), np.zeros(nights), np.stack([y1, nan], 1), same)
        two = judge.Runs((y1 + y2) / 2, np.full(nights, 2.0), (y1 - y2) ** 2 / 2, np.stack([y1, y2], 1), same)
        first = judge.decide(night, one, judge.compare(night, one))
        rerun = first == "rerun"
        kept = (first == "keep") | (rerun & (judge.decide(night, two, judge.compare(night, two)) == "keep"))
        ran = judge.Runs(*(np.where(rerun if a.ndim == 1 else rerun[:, None], b, a)
                           for a, b in zip((one.y, one.n, one.ss, one.pair, one.same_init),
                                           (two.y, two.n, two.ss, two.pair, two.same_init))))
        night = judge.step(night, ran, kept)
        keep[:, e], runs[:, e] = kept, 1 + rerun
        true, best_mean = np.where(kept, value, true), np.where(kept, ran.y, best_mean)
    return {"keep": keep, "runs": runs, "true": -true / FLOOR, "claimed": (base.mean(1) - best_mean) / FLOOR,
            "total_runs": runs.sum(1) + N_SEEDS}


def metrics(scenario, r, d):
    effect, keep, runs = d["effect"], r["keep"], r["runs"]
    null = effect == NULL.get(scenario, 0)
    return {"null_kept": keep[null].mean(), "null_kept_first5": keep[:, :5][null[:, :5]].mean(),
            "harm_kept": (keep & (effect < 0)).sum(1).mean(), "harm1_kept": (keep & (effect <= -1)).sum(1).mean(),
            "gain2_kept": keep[effect == 2].mean(), "per100": 100 * r["true"].mean() / r["total_runs"].mean(),
            "runs_per_exp": runs.mean(), "true": r["true"].mean(), "claimed": r["claimed"].mean()}


ROWS = [("no-effect kept", "null_kept", "{:.1%}"), ("... in experiments 1-5", "null_kept_first5", "{:.1%}"),
        ("harms kept / night", "harm_kept", "{:.2f}"), ("... by >= 1 floor", "harm1_kept", "{:.2f}"),
        ("2-floor gains kept", "gain2_kept", "{:.0%}"), ("true gain / 100 runs", "per100", "{:.1f}"),
        ("vs plain", "ratio", "{:.2f}x"), ("runs / experiment", "runs_per_exp", "{:.2f}"),
        ("true gain / night", "true", "{:.1f}"), ("claimed / night", "claimed", "{:.1f}")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--nights", type=int, default=4000)
    parser.add_argument("--experiments", type=int, default=100, help="experiments per night after the baseline")
    parser.add_argument("--seed", type=int, default=0, help="the draws (the constants were tuned on --seed 1)")
    args = parser.parse_args()
    t0 = time.time()
    results = {}
    for s, scenario in enumerate(SCENARIOS):
        d = draws(scenario, args.nights, args.experiments, np.random.default_rng([args.seed, s]))
        results[scenario, "noise"] = metrics(scenario, simulate_noise(scenario, d), d)
        results[scenario, "plain"] = metrics(scenario, simulate_plain(scenario, d), d)
        for rule in ("noise", "plain"):
            results[scenario, rule]["ratio"] = results[scenario, rule]["per100"] / results[scenario, "plain"]["per100"]
    print(f"{args.nights} nights x {args.experiments} experiments per scenario (--seed {args.seed}); noise rule: "
          f"baseline under {N_SEEDS} seeds, bars {judge.KEEP_ONE} / {judge.DISCARD_ONE} / {judge.KEEP_TWO} as t "
          f"quantiles, one-run keeps once sigma has {judge.ONE_RUN_KEEP_DOF} dof, the best estimated through the "
          f"night; {time.time() - t0:.0f} s\n")
    print("Gains and harms in noise floors; the small_harm scenario's no-effect row counts the -0.3-floor harms.\n")
    print("| scenario | rule | " + " | ".join(name for name, _, _ in ROWS) + " |")
    print("|---|---|" + "---|" * len(ROWS))
    for sc in SCENARIOS:
        for rule in ("noise", "plain"):
            m = results[sc, rule]
            print(f"| {sc} | {rule} | " + " | ".join(fmt.format(m[key]) for _, key, fmt in ROWS) + " |")
    print()
    ok = True
    for sc in SCENARIOS:
        m = results[sc, "noise"]
        checks = [("no-effect kept <= 5%", m["null_kept"] <= 0.05),
                  ("in the first five <= 5%", m["null_kept_first5"] <= 0.05),
                  ("floor-or-worse harms kept <= 0.1 per night", m["harm1_kept"] <= 0.1),
                  ("runs per experiment <= 1.5", m["runs_per_exp"] <= 1.5)]
        if sc in EFFICIENCY:
            met = round(m["ratio"], 2) >= EFFICIENCY[sc]
            checks.append((f"true gain per 100 runs >= {EFFICIENCY[sc]}x plain", met))
        ok &= all(met for _, met in checks)
        print(f"targets, {sc}: " + "; ".join(f"{name} {'met' if met else 'NOT MET'}" for name, met in checks))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
