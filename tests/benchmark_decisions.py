"""
Decision quality of the keep/discard judgement: thousands of simulated nights with known true effects, judged by
the noise-aware rule of analysis.py and by the reference's plain rule on the same draws, in seven scenarios.

Usage: uv run python tests/benchmark_decisions.py [--nights 4000] [--experiments 100] [--seed 0] [--check 3]

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

The noise rule is simulated by a vectorised copy of analysis.judge, over all nights at once; `--check` nights of
every scenario are also replayed through analysis.judge itself, run by run on the same draws, and must agree with
the copy decision for decision. The rule's constants were tuned with --seed 1 and are reported on --seed 0.
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
N_SEEDS = len(analysis.BASELINE_SEEDS)  # seed slots: the baseline's seeds, the candidates' two among them
FLOOR = math.sqrt(2)  # the simulation counts in units of sigma; effects are in floors of it
BPB, SIGMA_BPB = 1.0, 0.0033 / math.sqrt(2)  # what a run's value is in val_bpb: the H100's noise at 300 s


def draws(scenario, nights, experiments, rng):
    """Everything random about a set of nights: true effects (floors), the per-seed noise of the shared initial
    weights, the baseline's own noise and up to two runs' own noise per experiment."""
    gains, probs, *_ = SCENARIOS[scenario]
    return {"effect": rng.choice(gains, p=probs, size=(nights, experiments)).astype(float),
            "init": rng.standard_normal((nights, N_SEEDS)), "base": rng.standard_normal((nights, N_SEEDS)),
            "run": rng.standard_normal((nights, experiments, 2))}


def run_value(scenario, d, true_value, own, seed_slot, nights=slice(None)):
    """Runs, in units of sigma: the true value plus sigma * (the initial weights' share under this seed + the run's
    own). BPB + SIGMA_BPB * this is the run's val_bpb."""
    _, _, shared, rho, sigma = SCENARIOS[scenario]
    if not shared:
        return true_value + sigma * own
    return true_value + sigma * (math.sqrt(rho) * d["init"][nights, seed_slot] + math.sqrt(1 - rho) * own)


def bars(z, dof):
    """analysis.bar for an array of degrees of freedom."""
    return np.vectorize(lambda k: analysis.bar(z, k), otypes=[float])(np.asarray(dof).astype(int))


def t95(dof):
    return np.vectorize(lambda k: analysis.t_ppf(0.95, k), otypes=[float])(np.maximum(np.asarray(dof).astype(int), 1))


# -----------------------------------------------------------------------------
# The plain rule, and the vectorised judge


def simulate_plain(scenario, d):
    """Every night of `d` under the reference's rule: one run under seed 42 each, kept when strictly lower than the
    best kept so far. Returns per-experiment keep (bool) and runs, and per night the true gain, the gain results.tsv
    claims (baseline - best kept, as analysis.summarize reports it) and the runs."""
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


EFFECTS = np.array(analysis.EFFECTS)


def posterior(prior, log_lik):
    w = prior * np.exp(log_lik - log_lik.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True)


def paired_update(prior, m, c, tau2, g, kept, rerun, y1, y2):
    """analysis._paired_step for every night: m (nights, 2) and c (nights, 2, 2), the best's value under seeds 42 and
    43, updated by a commit's runs (seed 42, and seed 43 where it was rerun), each with spread sqrt(tau2) around its
    seed's value. Given the effect g the update is a Kalman step; over g it is a mixture, moment-matched back to a
    normal."""
    out = []
    for h, y in ((np.array([[1.0, 0.0]]), y1[:, None]), (np.eye(2), np.stack([y1, y2], 1))):
        S = np.einsum("ij,njk,lk->nil", h, c, h) + tau2[:, None, None] * np.eye(len(h))
        S_inv = np.linalg.inv(S)
        gain = np.einsum("nij,kj,nkl->nil", c, h, S_inv)
        innovation = (y[:, None, :] + g[..., None]) - np.einsum("ij,nj->ni", h, m)[:, None, :]  # (nights, grid, k)
        log_lik = -0.5 * np.einsum("ngk,nkl,ngl->ng", innovation, S_inv, innovation)  # up to a constant in g
        out.append((m[:, None, :] + np.einsum("nik,ngk->ngi", gain, innovation),
                    c - np.einsum("nik,kj,njl->nil", gain, h, c), log_lik))
    (m1, c1, l1), (m2, c2, l2) = out
    w = posterior(prior, np.where(rerun[:, None], l2, l1))
    new = np.where(rerun[:, None, None], m2, m1)
    new = np.where(kept[:, None, None], new - g[..., None], new)
    m = (w[..., None] * new).sum(1)
    dev = new - m[:, None, :]
    return m, np.where(rerun[:, None, None], c2, c1) + np.einsum("ng,ngi,ngj->nij", w, dev, dev)


def simulate_noise(scenario, d):
    """analysis.judge for every night of `d` at once (analysis.track and analysis.compare_tracked, vectorised): the
    z rule with t bars and one rerun under a second seed, sigma pooled from the baseline and the reruns, against an
    estimate of the best's true value, a normal (mu, v) carried through the night. A kept commit's value is the
    parent's minus the posterior mean of its effect; a discarded commit's runs inform the parent's value too. The
    posterior uses analysis's prior over effects on a grid in units of sigma, learned during the night, and every
    posterior is moment-matched back to a normal.

    Where commits share initial weights (the same_init scenarios), a second filter carries the best's value under
    each of the candidates' two seeds (paired_update), with a run's spread around it measured from the seed-42-minus-
    43 differences of the baseline and of every rerun commit; once those have PAIRED_MIN_DOF, the comparison with the
    tighter 95% bar decides. Returns what simulate_plain returns."""
    shared, (nights, experiments) = SCENARIOS[scenario][2], d["effect"].shape
    default = np.array(analysis._default_prior())
    prior, seen = np.tile(default, (nights, 1)), np.zeros((nights, len(EFFECTS)))
    base = np.stack([run_value(scenario, d, 0.0, d["base"][:, s], s) for s in range(N_SEEDS)], 1)
    ss, dof = ((base - base.mean(1, keepdims=True)) ** 2).sum(1), np.full(nights, N_SEEDS - 1.0)
    mu, v = base.mean(1), ss / dof / N_SEEDS
    pm, pc = base[:, :2].copy(), np.eye(2) * (ss / dof)[:, None, None]  # the paired filter: the best under 42, 43
    d_sum, d_sq, d_n = base[:, 0] - base[:, 1], (base[:, 0] - base[:, 1]) ** 2, np.ones(nights)  # seed-for-seed
    min_kept = mu.copy()  # the best kept mean of its runs, as results.tsv claims it
    keep, runs, true = np.zeros((nights, experiments), bool), np.zeros((nights, experiments)), np.zeros(nights)
    for e in range(experiments):
        value, s2, p_dof = true - d["effect"][:, e] * FLOOR, ss / dof, d_n - 1
        tau2 = np.maximum(np.where(p_dof >= 1, (d_sq - d_sum ** 2 / d_n) / np.maximum(p_dof, 1) / 2, s2), 1e-6 * s2)
        y1 = run_value(scenario, d, value, d["run"][:, e, 0], 0)
        y2 = run_value(scenario, d, value, d["run"][:, e, 1], 1)
        z, k = [], []
        for n, y, var_p in ((1, y1, pc[:, 0, 0]), (2, (y1 + y2) / 2, pc.sum((1, 2)) / 4)):  # one run, two runs
            se, se_p = np.sqrt(s2 / n + v), np.sqrt(var_p + tau2 / n)
            paired = shared & (p_dof >= analysis.PAIRED_MIN_DOF) & (se_p * t95(p_dof) < se * t95(dof))
            z.append(np.where(paired, (pm[:, :n].mean(1) - y) / se_p, (mu - y) / se))
            k.append(np.where(paired, p_dof, dof))
        kept = (z[0] >= bars(analysis.KEEP_ONE, k[0])) & (dof >= analysis.ONE_RUN_KEEP_DOF)
        rerun = ~kept & (z[0] > bars(analysis.DISCARD_ONE, k[0]))
        kept |= rerun & (z[1] >= bars(analysis.KEEP_TWO, k[1]))
        y, n = np.where(rerun, (y1 + y2) / 2, y1), np.where(rerun, 2.0, 1.0)
        keep[:, e], runs[:, e] = kept, 1 + rerun
        # the posterior over this commit's effect g, and over the parent's value given g (a normal)
        g = EFFECTS[None, :] * np.sqrt(s2)[:, None]
        w = posterior(prior, -0.5 * ((mu - y)[:, None] - g) ** 2 / (s2 / n + v)[:, None])
        precision = 1 / v + n / s2
        parent = ((mu / v)[:, None] + (y[:, None] + g) * (n / s2)[:, None]) / precision[:, None]
        new = np.where(kept[:, None], parent - g, parent)  # a kept commit's value; else the parent's, informed
        mu = (w * new).sum(1)
        v = 1 / precision + (w * (new - mu[:, None]) ** 2).sum(1)
        if shared:
            pm, pc = paired_update(prior, pm, pc, tau2, g, kept, rerun, y1, y2)
            d_sum, d_sq, d_n = d_sum + rerun * (y1 - y2), d_sq + rerun * (y1 - y2) ** 2, d_n + rerun
        true, min_kept = np.where(kept, value, true), np.where(kept, np.minimum(min_kept, y), min_kept)
        seen += w
        prior = (analysis.PRIOR_WEIGHT * default + seen) / (analysis.PRIOR_WEIGHT + e + 1)
        ss, dof = ss + np.where(rerun, (y2 - y1) ** 2 / 2, 0), dof + rerun
    return {"keep": keep, "runs": runs, "true": -true / FLOOR, "claimed": (base.mean(1) - min_kept) / FLOOR,
            "total_runs": runs.sum(1) + N_SEEDS}


# -----------------------------------------------------------------------------
# analysis.judge itself, replaying a night


def replay(rule, scenario, d, night):
    """One night through analysis.judge, run by run, as `analysis.py record` writes results.tsv. Returns the
    per-experiment (kept, runs)."""
    rows, out, true = [], [], 0.0

    shared = SCENARIOS[scenario][2]

    def judge(commit, value, seed):  # same_init scenarios: every commit starts from the baseline's weights
        rows.append({"commit": commit, "val_bpb": BPB + SIGMA_BPB * value, "memory_gb": 1.0, "status": "discard",
                     "description": "x", "seed": seed, "num_steps": 100, "attention": "fa3", "device": "H100",
                     "init_fingerprint": f"init-{seed}" if shared else f"{commit}-{seed}",
                     "verdict": "", "time_budget": "300", "eval_tokens": "20971520", "line": len(rows) + 2})
        v = analysis.judge(pd.DataFrame(rows, columns=analysis.HEADER + ["line"]), commit, rule)
        for r in rows:
            if r["commit"] == commit:
                r["status"] = v["status"]
        rows[-1]["verdict"] = v["verdict"]
        return v

    base_seeds = analysis.BASELINE_SEEDS[:1] if rule == "plain" else analysis.BASELINE_SEEDS
    for s, seed in enumerate(base_seeds):
        judge("base", float(run_value(scenario, d, 0.0, d["base"][night, s], s, night)), seed)
    for e in range(d["effect"].shape[1]):
        value, n = true - d["effect"][night, e] * FLOOR, 0
        while True:
            seed = analysis.SEEDS[n]
            v = judge(f"c{e:04d}", float(run_value(scenario, d, value, d["run"][night, e, n], n, night)), seed)
            n += 1
            if v["verdict"] != "rerun":
                break
            assert v["seed"] == analysis.SEEDS[n], v
        out.append((v["status"] == "keep", n))
        true = value if v["status"] == "keep" else true
    return out


# -----------------------------------------------------------------------------
# The report


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
EFFICIENCY = {"today": 0.8, "same_init_shared": 0.9}


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--nights", type=int, default=4000)
    parser.add_argument("--experiments", type=int, default=100, help="experiments per night after the baseline")
    parser.add_argument("--seed", type=int, default=0, help="the draws (the constants were tuned on --seed 1)")
    parser.add_argument("--check", type=int, default=3, help="nights per scenario replayed through analysis.judge")
    args = parser.parse_args()
    t0 = time.time()
    results, checked, disagree = {}, 0, []
    for s, scenario in enumerate(SCENARIOS):
        d = draws(scenario, args.nights, args.experiments, np.random.default_rng([args.seed, s]))
        for rule in analysis.RULES:
            r = simulate_noise(scenario, d) if rule == "noise" else simulate_plain(scenario, d)
            results[scenario, rule] = metrics(scenario, r, d)
            for night in range(min(args.check, args.nights)):
                got = replay(rule, scenario, d, night)
                want = list(zip(r["keep"][night], r["runs"][night].astype(int)))
                checked += len(got)
                disagree += [(scenario, rule, night, e) for e, (g, w) in enumerate(zip(got, want)) if g != tuple(w)]
        for rule in analysis.RULES:
            results[scenario, rule]["ratio"] = results[scenario, rule]["per100"] / results[scenario, "plain"]["per100"]
    print(f"{args.nights} nights x {args.experiments} experiments per scenario (--seed {args.seed}); noise rule: "
          f"baseline under {len(analysis.BASELINE_SEEDS)} seeds, bars {analysis.KEEP_ONE} / {analysis.DISCARD_ONE} / "
          f"{analysis.KEEP_TWO} as t quantiles, one-run keeps once sigma has {analysis.ONE_RUN_KEEP_DOF} dof, "
          f"the best estimated through the night; {time.time() - t0:.0f} s\n")
    print(f"analysis.judge replayed {checked} experiments ({args.check} nights per scenario and rule): "
          + ("every decision agrees with the vectorised copy" if not disagree else
             f"{len(disagree)} DISAGREE, first {disagree[:3]}") + "\n")
    print("Gains and harms in noise floors; the small_harm scenario's no-effect row counts the -0.3-floor harms.\n")
    print("| scenario | rule | " + " | ".join(name for name, _, _ in ROWS) + " |")
    print("|---|---|" + "---|" * len(ROWS))
    for sc in SCENARIOS:
        for rule in analysis.RULES:
            m = results[sc, rule]
            print(f"| {sc} | {rule} | " + " | ".join(fmt.format(m[key]) for _, key, fmt in ROWS) + " |")
    print()
    ok = not disagree
    for sc in SCENARIOS:
        m = results[sc, "noise"]
        checks = [("no-effect kept <= 5%", m["null_kept"] <= 0.05), ("in the first five <= 5%", m["null_kept_first5"] <= 0.05),
                  ("floor-or-worse harms kept <= 0.1 per night", m["harm1_kept"] <= 0.1),
                  ("runs per experiment <= 1.5", m["runs_per_exp"] <= 1.5)]
        if sc in EFFICIENCY:
            checks.append((f"true gain per 100 runs >= {EFFICIENCY[sc]}x plain", m["ratio"] >= EFFICIENCY[sc]))
        ok &= all(met for _, met in checks)
        print(f"targets, {sc}: " + "; ".join(f"{name} {'met' if met else 'NOT MET'}" for name, met in checks))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
