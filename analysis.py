"""
Records, judges and reports the runs in results.tsv (one row per training run, written by `record`).

Usage:
    uv run analysis.py record --description "<what changed>"   # after a run: append its row from run.log, print the verdict
    uv run analysis.py judge                                   # the latest commit's verdict again, with the evidence
    uv run analysis.py confirm                                 # the morning's check: the next confirmation run, or the gain
    uv run analysis.py mark --status discard                   # the simplicity criterion, by hand (or --status keep)
    uv run analysis.py [--json] [--plot progress.png]          # the report: counts, noise, kept changes, best, confirmed gain

A verdict is one line that starts with what to do: `keep`, `discard`, `rerun with seed N`, `crash` or `refused`.
The rule (docs/judging.md has the statistics and the benchmark behind the constants):

- The baseline runs under BASELINE_SEEDS. sigma, the seed-to-seed spread of one run, is pooled over every commit that
  ran under two or more seeds, with its degrees of freedom; the noise floor is sqrt(2) * sigma, how far changing only
  the seed moves val_bpb between two runs. Every bar below is a normal quantile turned into the Student-t quantile of
  the same tail probability at the degrees of freedom measured so far, so a noise measured on 3 dof is treated as such.
- The best is not the mean of its own runs (a commit kept on a lucky run would carry that luck) but an estimate of
  its true value, a normal carried through the night (track): a kept commit is its parent minus the effect its runs
  suggest, every discarded commit's runs inform its parent, under a prior over effects learned through the night.
- A candidate is compared with that estimate: z = (best - candidate) / sqrt(sigma^2 / n_candidate + the best's
  variance); or seed for seed, when the candidate starts from the baseline's initial weights (equal
  init_fingerprint), the run spread seed for seed is measured (PAIRED_MIN_DOF) and it gives the tighter test.
- One run: z >= KEEP_ONE keeps (once sigma has ONE_RUN_KEEP_DOF dof; until then a promising run is rerun),
  z <= DISCARD_ONE discards, anything between is rerun once under the next seed. Two runs: z >= KEEP_TWO keeps,
  anything less discards. A kept commit is not rerun.
- Runs that differ from the best in device, attention kernel, time budget or evaluation tokens are refused. A run whose
  num_steps is more than STEP_TOLERANCE off the median of its commit's runs (3 or more) is left out, and named.
- The night's gain is confirmed under CONFIRM_SEEDS, seeds no decision used: confirmation rows change no status.
- AUTORESEARCH_RULE=plain (or --rule plain) is the reference's rule: one run, keep if strictly lower than the best kept.

Reading is forgiving: messy input gives a warning per bad line instead of a traceback, and the reference's five-column
files and this project's older eleven-column files load as they are. analysis.ipynb imports the functions below.
The integrity check runs git in the directory holding the tsv: no kept commit may change prepare.py or pyproject.toml.
"""

import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pandas as pd

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]  # the reference's five, first and in order
EXTRA = ["seed", "num_steps", "attention", "device", "init_fingerprint", "verdict", "time_budget", "eval_tokens"]
HEADER = COLUMNS + EXTRA  # older files stop after `verdict` (eleven columns) or after `description` (five)
FROM_SUMMARY = [k for k in EXTRA if k != "verdict"]  # the summary keys each row records
MATCHED = ("device", "attention", "time_budget", "eval_tokens")  # runs are compared only when these agree
STATUSES = ("keep", "discard", "crash")
FIXED_FILES = ("prepare.py", "pyproject.toml")  # the agent may change train.py only; these two matter most
RULES = ("noise", "plain")

BASELINE_SEEDS = (42, 43, 44, 45)  # the baseline runs under each before any idea is judged (3 dof of noise)
SEEDS = (42, 43)                   # a candidate's first run, and its one rerun when the verdict asks for it
CONFIRM_SEEDS = (1001, 1002)  # the morning's confirmation of baseline and best: seeds no decision used
# The bars, as normal quantiles (each is used as the t quantile of the same tail probability), and the prior over
# effects. Tuned for true progress per run with tests/benchmark_decisions.py --seed 1; its default draws (--seed 0)
# report them.
KEEP_ONE = 1.8          # z that keeps after one run
DISCARD_ONE = 1.3       # z at or below which one run discards
KEEP_TWO = 1.6          # z that keeps after two runs
ONE_RUN_KEEP_DOF = 5    # dof of sigma before anything is kept on one run: the baseline's 3 and two reruns
PAIRED_MIN_DOF = 2      # dof of the seed-for-seed run spread before a comparison may use it
EFFECTS = [i / 2 for i in range(-40, 41)]  # the effects the prior lives on: -20 to +20 sigma, by 0.5
PRIOR_ZERO = 0.3        # the share of ideas the prior expects to do nothing, before the night teaches it
PRIOR_WIDTH = 3.0       # the width, in sigma, of the normal the other ideas' effects are drawn from...
PRIOR_FLAT = 0.6        # ...mixed with this share of a flat prior over EFFECTS, for the rare large effect
PRIOR_WEIGHT = 10       # the default prior counts as this many experiments; the night's own take over from it
STEP_TOLERANCE = 0.05   # a run more than 5% off its commit's median num_steps is left out (a cold or busy machine)

# -----------------------------------------------------------------------------
# Loading


def _int_or_none(text):
    return int(text) if re.fullmatch(r"-?\d+", text or "") else None


def load_results(path):
    """Reads a results.tsv. Returns (DataFrame with HEADER plus `line`, list of warning strings).

    Bad rows are skipped with a warning naming their line number; raises FileNotFoundError for a missing
    file. val_bpb is 0.0 for a crash; memory_gb is NaN where it is missing or not a number. Older files load with
    the columns they lack empty: seed and num_steps None, the rest "".
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (the agent creates results.tsv during setup, see program.md)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a results.tsv file")
    with open(path, "rb") as f:
        return parse_results(f.read().decode("utf-8", errors="replace"))


def parse_results(text):
    """load_results on the text of a results.tsv; `line` counts the lines of `text` from 1, the BOM removed."""
    text = text.lstrip("\ufeff")
    warnings, rows = [], []
    width = None  # fields per row: 5, 11 or 13
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        lower = [f.lower() for f in fields]
        if lower[:5] == COLUMNS and lower == HEADER[:len(lower)]:
            if width is not None or rows:
                warnings.append(f"line {lineno}: repeated header; skipped")
            width = width or len(fields)
            continue
        if width is None and not rows:
            warnings.append(f"line {lineno}: no header line (expected: {' '.join(COLUMNS)}); reading it as data")
        if not len(COLUMNS) <= len(fields) <= (width or len(COLUMNS)):
            hint = " (fields must be separated by tabs)" if len(fields) == 1 and " " in line.strip() else ""
            expected = len(COLUMNS) if (width or 5) == 5 else f"{len(COLUMNS)} to {width}"
            warnings.append(f"line {lineno}: expected {expected} tab-separated fields, found {len(fields)}{hint}; "
                            "skipped")
            continue
        fields += [""] * (len(HEADER) - len(fields))
        commit, val_bpb, memory_gb, status, description = fields[:5]
        try:
            val_bpb = float(val_bpb)
            if not math.isfinite(val_bpb):
                raise ValueError
        except ValueError:
            warnings.append(f"line {lineno}: val_bpb {val_bpb!r} is not a number; skipped")
            continue
        try:
            memory_gb = float(memory_gb)
        except ValueError:
            warnings.append(f"line {lineno}: memory_gb {memory_gb!r} is not a number; read as missing")
            memory_gb = float("nan")
        status = status.lower()
        if status not in STATUSES:
            warnings.append(f"line {lineno}: unknown status {status!r} (expected keep, discard or crash)")
        elif status == "keep" and val_bpb <= 0:
            warnings.append(f"line {lineno}: status keep but val_bpb is {val_bpb}; not counted as a result")
        extra = dict(zip(EXTRA, fields[5:]))
        rows.append(dict(extra, commit=commit, val_bpb=val_bpb, memory_gb=memory_gb, status=status,
                         description=description, seed=_int_or_none(extra["seed"]),
                         num_steps=_int_or_none(extra["num_steps"]), verdict=extra["verdict"].lower(), line=lineno))
    df = pd.DataFrame(rows, columns=HEADER + ["line"])
    df = df.astype({c: str for c in HEADER if c not in ("val_bpb", "memory_gb", "seed", "num_steps")})
    return df.astype({"val_bpb": float, "memory_gb": float, "seed": object, "num_steps": object, "line": int}), warnings


# -----------------------------------------------------------------------------
# Statistics: Student's t without scipy


def norm_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def t_cdf(t, dof):
    """P(T <= t) for Student's t with a whole number of degrees of freedom (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    if dof > 1000:
        return norm_cdf(t)
    theta = math.atan(t / math.sqrt(dof))
    c, s = math.cos(theta), math.sin(theta)
    term = total = c if dof % 2 else 1.0
    for k in range(3 if dof % 2 else 2, dof - 1, 2):
        term *= c * c * (k - 1) / k
        total += term
    a = 2 / math.pi * (theta + s * total) if dof % 2 and dof > 1 else 2 / math.pi * theta if dof == 1 else s * total
    return 0.5 + 0.5 * a


@functools.lru_cache(maxsize=None)
def t_ppf(p, dof):
    """The p quantile of Student's t with `dof` degrees of freedom (bisection on t_cdf)."""
    lo, hi = -1e4, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def bar(z, dof):
    """The normal quantile `z` as a t quantile at `dof`: the same tail probability, with the noise treated as measured."""
    return t_ppf(norm_cdf(z), int(dof))


# -----------------------------------------------------------------------------
# The evidence: which runs count, the noise they measure, one comparison


def _results(df):
    """Runs with a result that were not refused and are not confirmation runs (the morning's check)."""
    return df[(df["val_bpb"] > 0) & ~df["verdict"].isin(["refused", "confirm"])]


def conditions(row):
    """What a run must share with another to be compared with it."""
    return {k: row[k] for k in MATCHED}


def _differs(row, like):
    """The conditions in which `row` differs from `like` ([] when comparable; an empty field, from an older file,
    matches anything)."""
    return [k for k in MATCHED if row[k] and like[k] and str(row[k]) != str(like[k])]


def _describe(row, keys=MATCHED):
    names = {"device": "on", "attention": "attention", "time_budget": "time budget", "eval_tokens": "eval tokens"}
    return ", ".join(f"{names[k]} {row[k] or '?'}" + ("s" if k == "time_budget" and row[k] else "") for k in keys)


def step_outliers(rows):
    """{line: note} for runs whose num_steps is more than STEP_TOLERANCE off the median of their commit's runs (a
    commit with 3 or more runs with num_steps): a cold start or a busy machine, not the change."""
    by_commit, out = {}, {}
    for r in rows:
        if r["num_steps"] is not None:
            by_commit.setdefault(r["commit"], []).append(r)
    for commit, runs in by_commit.items():
        if len(runs) < 3:
            continue
        steps = sorted(r["num_steps"] for r in runs)
        n = len(steps)
        median = steps[n // 2] if n % 2 else (steps[n // 2 - 1] + steps[n // 2]) / 2
        for r in runs:
            if abs(r["num_steps"] - median) > STEP_TOLERANCE * median:
                out[r["line"]] = (f"line {r['line']} ({commit}, seed {r['seed']}) left out: num_steps {r['num_steps']}"
                                  f" against the median {median:g} of its {n} runs (a cold start or a busy machine?)")
    return out


def evidence(df, like):
    """The runs that count, under the conditions `like`: ({commit: {seed: val_bpb}} in order of first appearance,
    repeats under one seed averaged; {commit: the best kept commit when it first ran}; {line: note} of the runs left out
    as num_steps outliers; {(commit, seed): init_fingerprint}). A run without a seed (an older file) counts as a seed
    of its own."""
    rows = [r for r in _results(df).to_dict("records") if not _differs(r, like)]
    left_out = step_outliers(rows)
    values, best_before, last_keep, fingerprints = {}, {}, None, {}
    for r in _results(df).to_dict("records"):  # the best each commit was compared with: the last kept before it
        best_before.setdefault(r["commit"], last_keep)
        last_keep = r["commit"] if r["status"] == "keep" else last_keep
    for r in rows:
        if r["line"] not in left_out:
            seed = r["seed"] if r["seed"] is not None else f"line {r['line']}"
            values.setdefault(r["commit"], {}).setdefault(seed, []).append(r["val_bpb"])
            fingerprints.setdefault((r["commit"], seed), r["init_fingerprint"])
    values = {c: {s: sum(v) / len(v) for s, v in seeds.items()} for c, seeds in values.items()}
    return values, best_before, left_out, fingerprints


def init_kind(fingerprints, commit, best, seeds):
    """The seed-for-seed pool `commit` belongs to against `best`: "same_init" when it started from the best's initial
    weights under every one of `seeds` (equal fingerprints), else "other_init"."""
    same = all(fingerprints.get((commit, s)) and fingerprints.get((commit, s)) == fingerprints.get((best, s))
               for s in seeds)
    return "same_init" if same else "other_init"


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def noise(values, best_before, exclude=None, fingerprints=None):
    """The noise measured by every commit but `exclude` (the one being judged, so its own runs never set the bar).

    sigma: the spread of one run across seeds, pooled over commits with two or more seeds (dof: seeds - 1 each);
    floor = sqrt(2) * sigma. same_init and other_init: the spread of a seed-for-seed difference between a commit
    and the best it was compared with, pooled over commits with two or more seeds that all ran on that best, apart
    for commits that started from the best's initial weights (most hyperparameter edits: equal init_fingerprint) and
    commits that did not (a module added or reshaped), since the first share more of their noise. A commit whose runs
    equal the best's under every seed (an edit that changed nothing) measures nothing and is left out."""
    ss = dof = 0.0
    n_commits = 0
    pools = {"same_init": [0.0, 0, 0], "other_init": [0.0, 0, 0]}  # sum of squares, dof, commits
    for commit, seeds in values.items():
        if commit == exclude or len(seeds) < 2:
            continue
        m = _mean(seeds.values())
        ss += sum((v - m) ** 2 for v in seeds.values())
        dof += len(seeds) - 1
        n_commits += 1
        best = values.get(best_before.get(commit))
        if best and set(seeds) <= set(best):
            d = [best[s] - v for s, v in seeds.items()]
            if any(d):
                pool = pools[init_kind(fingerprints or {}, commit, best_before[commit], seeds)]
                pool[0] += sum((x - _mean(d)) ** 2 for x in d)
                pool[1] += len(d) - 1
                pool[2] += 1
    sigma = math.sqrt(ss / dof) if dof else None
    out = {"sigma": sigma, "dof": int(dof), "floor": sigma * math.sqrt(2) if sigma is not None else None,
           "commits": n_commits}
    for kind, (ss_p, dof_p, n) in pools.items():
        out[kind] = {"spread": math.sqrt(ss_p / dof_p) if dof_p else None, "dof": dof_p, "pairs": n}
    return out


def with_pool(nz, kind):
    """The noise with the seed-for-seed pool of `kind` (same_init or other_init) as the one a comparison may use."""
    pool = nz[kind]
    return dict(nz, paired_kind=kind, paired_spread=pool["spread"], dof_paired=pool["dof"], pairs=pool["pairs"])


def compare(cand, best, nz):
    """The candidate's seeds against the best's ({seed: val_bpb} each). Returns diff (best - candidate: > 0 when the
    candidate is better), se, dof, paired, and `shown`, the best's number it was compared with. Seed for seed when
    the best ran under every candidate seed and that spread is measured and gives the smaller 95% bar."""
    diff = _mean(best.values()) - _mean(cand.values())
    se = nz["sigma"] * math.sqrt(1 / len(cand) + 1 / len(best))
    out = {"diff": diff, "se": se, "dof": nz["dof"], "paired": False, "shown": _mean(best.values())}
    if set(cand) <= set(best) and nz["dof_paired"] >= PAIRED_MIN_DOF and nz["paired_spread"]:
        se_p = nz["paired_spread"] / math.sqrt(len(cand))
        if se_p * t_ppf(0.95, nz["dof_paired"]) < se * t_ppf(0.95, max(nz["dof"], 1)):
            shown = _mean(best[s] for s in cand)
            out = {"diff": shown - _mean(cand.values()), "se": se_p, "dof": nz["dof_paired"], "paired": True,
                   "shown": shown}
    out["z"] = out["diff"] / out["se"]
    return out


# -----------------------------------------------------------------------------
# The best's value, estimated through the night
#
# A kept commit's runs are not its value: it was kept because they came out low (the winner's curse), and after one
# run every later candidate would be held to that luck. So the judge carries an estimate of the best's true value, a
# normal (mu, v), from the baseline's runs on. Each commit's effect g on the commit it was built on gets a posterior
# over EFFECTS (in units of sigma) under a prior learned through the night; a kept commit's value is its parent's
# minus g, and a discarded commit's runs, which measure the parent plus g, sharpen the parent's value. Where commits
# start from the baseline's initial weights, a second estimate follows the best under each of SEEDS (a seed's initial
# weights move every run under it alike, so seed for seed the comparison is tighter): a 2-d Kalman step per g.


def _default_prior():
    """PRIOR_ZERO of the ideas do nothing; the rest are a normal of width PRIOR_WIDTH sigma mixed with a flat part."""
    normal = [math.exp(-0.5 * (g / PRIOR_WIDTH) ** 2) for g in EFFECTS]
    return [PRIOR_ZERO * (g == 0) + (1 - PRIOR_ZERO) * ((1 - PRIOR_FLAT) * w / sum(normal) + PRIOR_FLAT / len(EFFECTS))
            for g, w in zip(EFFECTS, normal)]


def _posterior(prior, log_lik):
    top = max(log_lik)
    w = [p * math.exp(ll - top) for p, ll in zip(prior, log_lik)]
    total = sum(w)
    return [x / total for x in w]


def _paired_step(m, c, tau2, gs, prior, ys, kept):
    """The best's value under SEEDS, m (2) with covariance c (2x2), after a commit's runs ys {index in SEEDS: val_bpb},
    each a run spread sqrt(tau2) around its seed's value plus the commit's effect. A Kalman step for each effect g,
    mixed over the posterior of g and matched back to one normal."""
    obs = sorted(ys)
    s = [[c[i][j] + tau2 * (i == j) for j in obs] for i in obs]
    if len(obs) == 1:
        s_inv = [[1 / s[0][0]]]
    else:
        det = s[0][0] * s[1][1] - s[0][1] * s[1][0]
        s_inv = [[s[1][1] / det, -s[0][1] / det], [-s[1][0] / det, s[0][0] / det]]
    k = [[sum(c[r][obs[a]] * s_inv[a][b] for a in range(len(obs))) for b in range(len(obs))] for r in range(2)]
    c_new = [[c[r][q] - sum(k[r][b] * c[obs[b]][q] for b in range(len(obs))) for q in range(2)] for r in range(2)]
    means, log_lik = [], []
    for g in gs:
        innovation = [ys[i] + g - m[i] for i in obs]
        log_lik.append(-0.5 * sum(innovation[a] * s_inv[a][b] * innovation[b]
                                  for a in range(len(obs)) for b in range(len(obs))))
        new = [m[r] + sum(k[r][b] * innovation[b] for b in range(len(obs))) for r in range(2)]
        means.append([x - g for x in new] if kept else new)
    w = _posterior(prior, log_lik)
    mean = [sum(wi * x[r] for wi, x in zip(w, means)) for r in range(2)]
    cov = [[c_new[r][q] + sum(wi * (x[r] - mean[r]) * (x[q] - mean[q]) for wi, x in zip(w, means)) for q in range(2)]
           for r in range(2)]
    return mean, cov


def track(values, kept, fingerprints, exclude=None):
    """The night up to `exclude` (the commit being judged), commit by commit in order, the first the baseline.

    values {commit: {seed: val_bpb}}, kept (the commits marked keep), fingerprints {(commit, seed): init_fingerprint}.
    Returns None when the baseline has fewer than two seeds, else a dict: best (the last kept commit), mu and v (its
    estimated value and variance), sigma and dof (pooled over the commits with two or more seeds, as of `exclude`),
    experiments (how many commits taught the prior), prior, and paired: None, or the best's value under SEEDS (m, c),
    the run spread tau2 seed for seed and its dof, for the commits that start from the baseline's initial weights (a
    kept commit from other weights ends it)."""
    commits = list(values)
    base = values[commits[0]]
    if len(base) < 2:
        return None
    ss = sum((x - _mean(base.values())) ** 2 for x in base.values())
    dof = len(base) - 1
    default = _default_prior()
    t = {"baseline": commits[0], "best": commits[0], "mu": _mean(base.values()), "v": ss / dof / len(base),
         "sigma": math.sqrt(ss / dof), "dof": dof, "experiments": 0, "prior": default, "paired": None}
    diffs = []  # SEEDS[0] - SEEDS[1] of each commit of the family that ran under both: the run spread seed for seed
    if all(s in base and fingerprints.get((commits[0], s)) for s in SEEDS):
        diffs.append(base[SEEDS[0]] - base[SEEDS[1]])
        t["paired"] = {"m": [base[s] for s in SEEDS], "c": [[ss / dof, 0.0], [0.0, ss / dof]]}
    _paired_spread(t, diffs)
    seen = [0.0] * len(EFFECTS)
    for commit in commits[1:]:
        if commit == exclude:
            break
        runs, s2 = values[commit], t["sigma"] ** 2
        n, y, gs = len(runs), _mean(runs.values()), [e * t["sigma"] for e in EFFECTS]
        is_kept = commit in kept
        w = _posterior(t["prior"], [-0.5 * (t["mu"] - y - g) ** 2 / (s2 / n + t["v"]) for g in gs])
        precision = 1 / t["v"] + n / s2
        parents = [(t["mu"] / t["v"] + (y + g) * n / s2) / precision for g in gs]
        new = [p - g for p, g in zip(parents, gs)] if is_kept else parents
        t["mu"] = sum(wi * x for wi, x in zip(w, new))
        t["v"] = 1 / precision + sum(wi * (x - t["mu"]) ** 2 for wi, x in zip(w, new))
        p = t["paired"]
        if p and init_kind(fingerprints, commit, t["baseline"], [s for s in runs if s in SEEDS]) == "same_init":
            ys = {i: runs[s] for i, s in enumerate(SEEDS) if s in runs}
            if ys:
                p["m"], p["c"] = _paired_step(p["m"], p["c"], p["tau2"], gs, t["prior"], ys, is_kept)
            if len(ys) == 2:
                diffs.append(runs[SEEDS[0]] - runs[SEEDS[1]])
        elif p and is_kept:
            t["paired"] = None  # the best starts from other initial weights now: nothing is seed for seed with it
        seen = [a + b for a, b in zip(seen, w)]
        t["experiments"] += 1
        t["prior"] = [(PRIOR_WEIGHT * d + s) / (PRIOR_WEIGHT + t["experiments"]) for d, s in zip(default, seen)]
        if n >= 2:
            ss += sum((x - y) ** 2 for x in runs.values())
            dof += n - 1
            t["sigma"], t["dof"] = math.sqrt(ss / dof), dof
        t["best"] = commit if is_kept else t["best"]
        _paired_spread(t, diffs)
    return t


def _paired_spread(t, diffs):
    """tau2, one run's spread around its seed's value, from the differences between the two seeds within each commit
    (the initial weights' part is the same in all of them, so it drops out of their variance); sigma^2 until measured.
    Never below a millionth of sigma^2: identical differences (edits that change nothing, on a deterministic CPU)
    would leave the best's covariance singular."""
    if t["paired"]:
        dof = len(diffs) - 1
        var = sum((d - _mean(diffs)) ** 2 for d in diffs) / dof / 2 if dof else t["sigma"] ** 2
        t["paired"].update(tau2=max(var, 1e-6 * t["sigma"] ** 2), dof=dof)


def compare_tracked(cand, t, same_init):
    """The candidate's runs {seed: val_bpb} against the tracked best: unpaired (error sqrt(sigma^2/n + v)), or seed for
    seed when it started from the baseline's initial weights, ran only under SEEDS, the run spread has PAIRED_MIN_DOF
    and that gives the smaller 95% bar. Returns diff (> 0: the candidate is better), se, dof, z, paired, shown."""
    n, y = len(cand), _mean(cand.values())
    se = math.sqrt(t["sigma"] ** 2 / n + t["v"])
    out = {"diff": t["mu"] - y, "se": se, "dof": t["dof"], "paired": False, "shown": t["mu"],
           "shown_sd": math.sqrt(t["v"])}
    p = t["paired"]
    if same_init and p and p["dof"] >= PAIRED_MIN_DOF and set(cand) <= set(SEEDS):
        obs = [i for i, s in enumerate(SEEDS) if s in cand]
        var_best = sum(p["c"][i][j] for i in obs for j in obs) / n ** 2
        se_p = math.sqrt(var_best + p["tau2"] / n)
        if se_p * t_ppf(0.95, p["dof"]) < se * t_ppf(0.95, max(t["dof"], 1)):
            shown = _mean(p["m"][i] for i in obs)
            out = {"diff": shown - y, "se": se_p, "dof": p["dof"], "paired": True, "shown": shown,
                   "shown_sd": math.sqrt(var_best)}
    out["z"] = out["diff"] / out["se"]
    return out


# -----------------------------------------------------------------------------
# Judging one commit


def _verdict(verdict, status, line, seed=None, evidence_lines=(), **numbers):
    return dict(numbers, verdict=verdict, status=status, seed=seed, line=line, evidence=list(evidence_lines))


def _best_commit(df, commit):
    """The best kept commit to compare `commit` with: the last one marked keep in the file, `commit` excluded."""
    kept = _results(df)
    kept = kept[(kept["status"] == "keep") & (kept["commit"] != commit)]
    return kept["commit"].iloc[-1] if len(kept) else None


def _seeds_text(seeds):
    return ", ".join(f"{s} {v:.6f}" for s, v in seeds.items())


def _plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def judge(df, commit=None, rule="noise"):
    """The verdict for `commit` (default: the commit of the last decision row) from everything in results.tsv.

    Returns a dict: verdict (keep, discard, rerun, crash or refused), status (what the commit's rows say in
    results.tsv: keep, discard or crash), seed (the seed to rerun with, or None), line (one line for the agent,
    starting with what to do), evidence (the lines behind it, for `analysis.py judge`) and the numbers."""
    df = df[df["verdict"] != "confirm"]
    if df.empty:
        return _verdict("refused", "discard", "refused: results.tsv has no runs yet")
    commit = commit or df["commit"].iloc[-1]
    mine = df[df["commit"] == commit]
    if mine.empty:
        return _verdict("refused", "discard", f"refused: commit {commit} has no row in results.tsv")
    last = mine.iloc[-1]
    valid = mine[mine["val_bpb"] > 0]
    status = "keep" if (valid["status"] == "keep").any() else "discard" if len(valid) else "crash"
    if last["val_bpb"] <= 0:
        return _verdict("crash", status, f"crash: {commit} has no val_bpb (the run crashed or was killed); "
                                         "read `tail -n 50 run.log`")
    seed = _int_or_none(str(last["seed"]))

    if commit == df["commit"].iloc[0]:  # the baseline: every seed of BASELINE_SEEDS first
        like = conditions(_results(mine).iloc[0]) if len(_results(mine)) else conditions(last)
        if _differs(last, like):
            return _verdict("refused", "keep", f"refused: this baseline run used {_describe(last, _differs(last, like))}"
                                               f", its first run {_describe(like, _differs(last, like))}; fix that and "
                                               f"rerun with seed {seed}", seed=seed)
        values, _, left_out, _ = evidence(df, like)
        mine_values = values.get(commit, {})
        notes = [left_out[r] for r in mine["line"] if r in left_out]
        missing = [s for s in BASELINE_SEEDS if s not in mine_values]
        if rule == "noise" and missing:
            return _verdict("rerun", "keep", f"rerun with seed {missing[0]}: baseline {len(mine_values)} of "
                                             f"{len(BASELINE_SEEDS)} seeds ({', '.join(map(str, BASELINE_SEEDS))}) to "
                                             "measure the noise" + "".join(f"; {n}" for n in notes),
                            seed=missing[0], evidence_lines=notes)
        nz = noise(values, {})
        floor = f", noise floor {nz['floor']:.6f} (sigma {nz['sigma']:.6f}, {nz['dof']} dof)" if nz["floor"] else ""
        return _verdict("keep", "keep", f"keep: baseline {commit} {_mean(mine_values.values()):.6f} "
                                        f"({_plural(len(mine_values), 'seed')}){floor}" + "".join(f"; {n}" for n in notes),
                        evidence_lines=notes, **nz)

    best_commit = _best_commit(df, commit)
    if best_commit is None:
        return _verdict("refused", "discard", "refused: no kept result to compare with (the baseline has not run)")
    like = conditions(_results(df[df["commit"] == best_commit]).iloc[-1])
    if _differs(last, like):
        keys = _differs(last, like)
        return _verdict("refused", status, f"refused: this run used {_describe(last, keys)}, the best {best_commit} "
                                           f"{_describe(like, keys)}; not comparable: fix that and rerun with seed "
                                           f"{seed}", seed=seed)
    if rule == "plain":  # the reference: one run, strictly lower than the best kept val_bpb so far
        kept = _results(df)
        best_bpb = kept.loc[(kept["status"] == "keep") & (kept["commit"] != commit), "val_bpb"].min()
        v = _results(mine)["val_bpb"].iloc[0]
        verdict = "keep" if v < best_bpb else "discard"
        return _verdict(verdict, verdict, f"{verdict}: {commit} {v:.6f} vs best kept {best_bpb:.6f} "
                                          f"({'better' if v < best_bpb else 'not better'} by {abs(v - best_bpb):.6f}; "
                                          "plain rule: keep only if strictly lower)")

    values, best_before, left_out, fingerprints = evidence(df, like)
    nz = noise(values, best_before, exclude=commit, fingerprints=fingerprints)
    if nz["sigma"] == 0:  # a z over a zero error would be infinite: say what is wrong instead
        return _verdict("refused", status, "refused: every commit's runs under different seeds scored exactly the same,"
                                           " so the seed does not reach the initial weights (check AUTORESEARCH_SEED "
                                           "and SEED in train.py); nothing can be judged")
    kept = set(_results(df).loc[lambda r: r["status"] == "keep", "commit"])
    t = track(values, kept, fingerprints, exclude=commit) if values else None
    if t is None:
        return _verdict("refused", status, f"refused: no noise measured yet; rerun the baseline "
                                           f"{df['commit'].iloc[0]} under seeds {', '.join(map(str, BASELINE_SEEDS))} "
                                           "first")
    cand, best = values.get(commit, {}), values[best_commit]
    notes = [left_out[r] for r in mine["line"] if r in left_out]
    steps = [int(s) for s in _results(mine)["num_steps"] if s is not None]
    if len(steps) == 2 and abs(steps[0] - steps[1]) > STEP_TOLERANCE * max(steps):
        notes.append(f"its two runs made {steps[0]} and {steps[1]} steps (a cold start or a busy machine?)")
    if not cand:
        return _verdict("rerun", status, f"rerun with seed {seed}: every run of {commit} was left out; "
                                         + "; ".join(notes), seed=seed, evidence_lines=notes)
    p = t["paired"]
    same_init = bool(p) and init_kind(fingerprints, commit, t["baseline"], cand) == "same_init"
    c = compare_tracked(cand, t, same_init)
    z, dof = c["z"], c["dof"]
    next_seed = next((s for s in SEEDS if s not in cand), None)
    keep_one, discard_one, keep_two = bar(KEEP_ONE, dof), bar(DISCARD_ONE, dof), bar(KEEP_TWO, dof)
    one_run_ok = t["dof"] >= ONE_RUN_KEEP_DOF
    if status == "keep":  # kept already (by hand, with mark): it stays kept
        verdict, action, bars = "keep", "keep", "kept by hand"
    elif len(cand) == 1 and next_seed is not None:
        bars = f"one run: keep at z >= {keep_one:.2f}, discard at <= {discard_one:.2f}"
        if z >= keep_one and one_run_ok:
            verdict, action = "keep", "keep"
        elif z <= discard_one:
            verdict, action = "discard", "discard"
        else:
            verdict, action = "rerun", f"rerun with seed {next_seed}: " + (
                "undecided" if z < keep_one else f"promising, but nothing is kept on one run before sigma has "
                                                 f"{ONE_RUN_KEEP_DOF} dof ({t['dof']} so far)")
    else:
        bars = f"{_plural(len(cand), 'run')}: keep at z >= {keep_two:.2f}"
        verdict = action = "keep" if z >= keep_two else "discard"
    status = "keep" if verdict == "keep" else "discard"
    floor = math.sqrt(2) * t["sigma"]
    seeds_text = f"seed{'s' * (len(cand) > 1)} {', '.join(map(str, cand))}"
    shown = (f"{c['shown']:.6f} (estimated under {seeds_text}, sd {c['shown_sd']:.6f}, seed for seed)" if c["paired"]
             else f"{c['shown']:.6f} (estimated, sd {c['shown_sd']:.6f})")
    error = (f"seed for seed, run spread {math.sqrt(p['tau2']):.6f}" if c["paired"] else f"sigma {t['sigma']:.6f}")
    line = (f"{action}: {commit} {_mean(cand.values()):.6f} ({_plural(len(cand), 'seed')}) vs best {best_commit} "
            f"{shown}: {'better' if c['diff'] > 0 else 'worse' if c['diff'] < 0 else 'equal'} by {abs(c['diff']):.6f}"
            f" = {abs(c['diff']) / floor:.1f} noise floors, z {z:+.2f} ({bars}; {error}, {dof} dof)"
            + "".join(f"; {n}" for n in notes))
    kind_text = "from the baseline's initial weights" if same_init else "from other initial weights"
    ev = [f"candidate {commit} ({kind_text}): seed {_seeds_text(cand)}",
          f"best {best_commit}: seed {_seeds_text(best)} (mean {_mean(best.values()):.6f})",
          f"best estimated from {_plural(t['experiments'] + 1, 'commit')} (a kept commit's runs carry its luck; every "
          f"commit's runs inform it): {t['mu']:.6f}, sd {math.sqrt(t['v']):.6f}" +
          (f"; seed for seed, under {_seeds_text(dict(zip(SEEDS, p['m'])))}" if p else ""),
          f"error: {c['se']:.6f} = " + (f"sqrt(the best's sd under {seeds_text} {c['shown_sd']:.6f}^2 + run spread "
                                        f"{math.sqrt(p['tau2']):.6f}^2 / {len(cand)}); the run spread from each "
                                        f"commit's seed-{SEEDS[0]}-minus-{SEEDS[1]} difference, {p['dof']} dof"
                                        if c["paired"] else
                                        f"sqrt(sigma {t['sigma']:.6f}^2 / {len(cand)} + the best's sd "
                                        f"{math.sqrt(t['v']):.6f}^2); sigma pooled over the commits with two or more "
                                        f"seeds, {t['dof']} dof"),
          f"noise floor {floor:.6f} (sqrt(2) * sigma); seed for seed: " +
          ("not for this candidate (" + ("it starts from other initial weights" if p else
                                         "the best starts from other initial weights than the baseline") + ")"
           if not same_init else f"run spread {math.sqrt(p['tau2']):.6f} on {p['dof']} dof" +
           ("" if c["paired"] else f" (used once it has {PAIRED_MIN_DOF} dof and gives the tighter test)")),
          f"bars at {dof} dof (normal {KEEP_ONE}, {DISCARD_ONE}, {KEEP_TWO} as t quantiles): one run keep z >= "
          f"{keep_one:.2f}" + ("" if one_run_ok else f" (once sigma has {ONE_RUN_KEEP_DOF} dof)") +
          f", discard z <= {discard_one:.2f}; two runs keep z >= {keep_two:.2f}"] + notes
    return _verdict(verdict, status, line, seed=next_seed if verdict == "rerun" else None, evidence_lines=ev,
                    best_commit=best_commit, shares_init=same_init, tracked=t, sigma=t["sigma"], floor=floor, **c)


# -----------------------------------------------------------------------------
# Confirming the night's gain


def confirmation(df):
    """The morning's check: the baseline and the best kept commit, each under every seed of CONFIRM_SEEDS.

    Returns None when there is nothing to confirm (no change kept), else a dict: baseline, best, todo [(commit,
    seed)] in the order to run them, done (how many runs there are), and once every run is in: gain (baseline mean -
    best mean over the confirmation runs), se, dof, ci (95% interval), paired."""
    decisions = df[df["verdict"] != "confirm"]
    results = _results(decisions)
    if results.empty:
        return None
    baseline, best = results["commit"].iloc[0], _best_commit(decisions, None)
    if best is None or best == baseline:
        return None
    like = conditions(_results(decisions[decisions["commit"] == best]).iloc[-1])
    runs = df[(df["verdict"] == "confirm") & (df["val_bpb"] > 0)]
    got = {baseline: {}, best: {}}
    for r in runs.to_dict("records"):
        if r["commit"] in got and r["seed"] in CONFIRM_SEEDS and not _differs(r, like):
            got[r["commit"]].setdefault(r["seed"], []).append(r["val_bpb"])
    got = {c: {s: _mean(v) for s, v in seeds.items()} for c, seeds in got.items()}
    todo = [(c, s) for s in CONFIRM_SEEDS for c in (baseline, best) if s not in got[c]]
    out = {"baseline": baseline, "best": best, "seeds": list(CONFIRM_SEEDS), "todo": todo,
           "done": sum(len(v) for v in got.values()), "needed": 2 * len(CONFIRM_SEEDS), "gain": None}
    if not todo:
        values, best_before, _, fingerprints = evidence(decisions, like)
        for c in (baseline, best):  # the confirmation runs measure the seed noise too, as commits of their own
            values[f"{c} (confirmation)"] = got[c]
        prints = {(r["commit"], r["seed"]): r["init_fingerprint"] for r in runs.to_dict("records")}
        nz = with_pool(noise(values, best_before, fingerprints=fingerprints),
                       init_kind(prints, best, baseline, got[best]))
        c = compare(got[best], got[baseline], nz)
        half = t_ppf(0.975, c["dof"]) * c["se"]
        out.update(gain=c["diff"], se=c["se"], dof=c["dof"], paired=c["paired"], ci=[c["diff"] - half, c["diff"] + half],
                   floor=nz["floor"])
    return out


def confirmation_line(conf):
    """The one line `confirm` and `record --confirm` print: what to run next, or the confirmed gain."""
    if conf is None:
        return "nothing to confirm: no change has been kept, so the best is the baseline"
    role = {conf["baseline"]: "baseline", conf["best"]: "best"}
    if conf["todo"]:
        commit, seed = conf["todo"][0]
        return (f"run {commit} with seed {seed}: confirmation {conf['done'] + 1} of {conf['needed']} (the {role[commit]}"
                f"; baseline {conf['baseline']} and best {conf['best']} under seeds "
                f"{', '.join(map(str, conf['seeds']))}, which no decision used)")
    lo, hi = conf["ci"]
    return (f"confirmed: best {conf['best']} is better than baseline {conf['baseline']} by {conf['gain']:.6f} "
            f"(95% interval {lo:.6f} to {hi:.6f}; {'seed for seed' if conf['paired'] else 'unpaired'}, "
            f"{conf['dof']} dof) under seeds {', '.join(map(str, conf['seeds']))}")

# -----------------------------------------------------------------------------
# Recording a run: run.log -> one row, appended under a lock


# A log collected with `sky logs` (skypilot.yaml) has SkyPilot's prefix on every line of the job's output,
# "(autoresearch, pid=4242) val_bpb: ...", in color on some clusters; it is not part of what train.py printed.
SKYPILOT_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\([^()\n]*\bpid=\d+[^()\n]*\)(?:\x1b\[[0-9;]*m)* ?", re.M)


def parse_log(text):
    """The summary block after the last `---` line of a train.py log, as {key: string}; {} if there is none.
    The seed is also read from the start-up line, so a crashed run still records it."""
    text = SKYPILOT_PREFIX.sub("", text)
    summary = {}
    head, sep, tail = text.rpartition("\n---\n")
    if sep or text.startswith("---\n"):
        for line in (tail if sep else text[4:]).splitlines():
            m = re.match(r"^([a-z_]+):\s+(\S.*?)\s*$", line)
            if m:
                summary[m.group(1)] = m.group(2)
    if "val_bpb" in summary:
        try:
            if not math.isfinite(float(summary["val_bpb"])):
                raise ValueError
        except ValueError:
            summary.pop("val_bpb")
    if "seed" not in summary:
        m = re.search(r"\| seed: (-?\d+) \|", text)
        if m:
            summary["seed"] = m.group(1)
    return summary


def make_row(summary, commit, description):
    """The results.tsv fields for one run (a crash when the summary has no val_bpb); the verdict is left empty."""
    description = re.sub(r"[\t\r\n]+", " ", description).strip()
    crashed = "val_bpb" not in summary
    try:
        memory_gb = f"{float(summary.get('peak_vram_mb', 0)) / 1024:.1f}"
    except ValueError:
        memory_gb = "0.0"
    row = dict(commit=commit, val_bpb="0.000000" if crashed else f"{float(summary['val_bpb']):.6f}",
               memory_gb="0.0" if crashed else memory_gb, status="crash" if crashed else "discard",
               description=description, verdict="", **{k: summary.get(k, "") for k in FROM_SUMMARY})
    return [row[k] for k in HEADER]


@contextmanager
def locked(path):
    """An exclusive lock on `path`.lock: runs that finish at the same moment (several GPUs) append one at a time."""
    with open(f"{path}.lock", "a") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock; the replace below is still atomic
            pass
        yield


class RecordError(Exception):
    """A run that cannot be recorded as asked; nothing was written."""


def record(tsv, summary, commit, description=None, rule="noise", confirm=False):
    """Appends the run's row to `tsv` and judges its commit: the commit's status goes into all its rows and the
    verdict into the new one. With `confirm` the row is a confirmation run (verdict `confirm`): it changes no status
    and the returned verdict's line says what to confirm next. Without a description, a commit that already has rows
    reuses its first one. The file is rewritten whole and renamed into place, under the lock: a reader never sees
    half a row, and two writers never lose one. Returns (the new row's fields, the verdict)."""
    with locked(tsv):
        text = ""
        if os.path.exists(tsv):
            with open(tsv, encoding="utf-8", errors="replace") as f:
                text = f.read().lstrip("\ufeff")
        lines = text.splitlines()
        header = lines[0].strip().lower().split("\t") if lines else []
        if not lines or (header[:5] == COLUMNS and header == HEADER[:len(header)]):  # new, or an older header
            lines[:1] = ["\t".join(HEADER)]
        before, _ = parse_results("\n".join(lines))
        if description is None:
            known = before.loc[before["commit"] == commit, "description"]
            if known.empty:
                raise RecordError(f"commit {commit} has no row in {tsv} yet: give --description \"<what changed>\"")
            description = known.iloc[0]
        row = make_row(summary, commit, description)
        if confirm:
            conf = confirmation(before)
            if conf is None or commit not in (conf["baseline"], conf["best"]):
                raise RecordError(f"commit {commit} is not one to confirm; `uv run analysis.py confirm` names the "
                                  "commit and seed to run")
            status = HEADER.index("status")
            if row[status] != "crash":  # a confirmation run takes its commit's status; it never sets one
                row[status] = before.loc[before["commit"] == commit, "status"].iloc[-1]
            row[HEADER.index("verdict")] = "confirm"
            lines.append("\t".join(row))
            _replace(tsv, lines)
            conf = confirmation(parse_results("\n".join(lines))[0])
            return row, _verdict("confirm", row[3], confirmation_line(conf), confirmation=conf)
        lines.append("\t".join(row))
        df, _ = parse_results("\n".join(lines))
        verdict = judge(df, commit, rule)
        _set_status(lines, df, commit, verdict["status"])
        if row[3] != "crash":
            row[3] = verdict["status"]
        row[HEADER.index("verdict")] = verdict["verdict"]
        lines[-1] = "\t".join(row)
        _replace(tsv, lines)
    return row, verdict


def mark(tsv, commit, status):
    """Sets the status of every result row of `commit` by hand (the simplicity criterion), under the lock."""
    with locked(tsv):
        with open(tsv, encoding="utf-8", errors="replace") as f:
            lines = f.read().lstrip("\ufeff").splitlines()
        _set_status(lines, parse_results("\n".join(lines))[0], commit, status)
        _replace(tsv, lines)


def _set_status(lines, df, commit, status):
    """Writes `status` into the status field of `commit`'s result rows (df parsed from `lines`); crashes stay."""
    for lineno in df.loc[(df["commit"] == commit) & (df["val_bpb"] > 0), "line"]:
        fields = lines[lineno - 1].split("\t")
        fields[3] = status
        lines[lineno - 1] = "\t".join(fields)


def _replace(tsv, lines):
    """Writes `lines` to a temporary file and renames it over `tsv`: a reader sees the old file or the new one."""
    tmp = f"{tsv}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, tsv)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

# -----------------------------------------------------------------------------
# Summary


def experiments(df):
    """One row per commit, in order of first appearance (confirmation runs left out): the experiment's number (0 =
    baseline), status, its val_bpb (the mean over its seeds of the runs the judge counts: refused runs and num_steps
    outliers left out), how many runs, its seeds and the first description."""
    rows = []
    df = df[df["verdict"] != "confirm"]
    left_out = step_outliers(_results(df).to_dict("records"))
    for i, (commit, g) in enumerate(df.groupby("commit", sort=False)):
        runs = _results(g)
        runs = runs[~runs["line"].isin(left_out)]
        per_seed = runs.groupby([s if s is not None else f"line {n}" for n, s in zip(runs["line"], runs["seed"])],
                                sort=False)["val_bpb"].mean()
        status = runs["status"].iloc[-1] if len(runs) else g["status"].iloc[-1]
        rows.append({"experiment": i, "commit": commit, "status": status,
                     "val_bpb": float(per_seed.mean()) if len(runs) else 0.0,
                     "memory_gb": float(g["memory_gb"].max()), "runs": len(runs),
                     "seeds": [int(s) for s in runs["seed"] if s is not None],
                     "init_fingerprint": runs["init_fingerprint"].iloc[0] if len(runs) else "",
                     "description": g["description"].iloc[0]})
    return pd.DataFrame(rows, columns=["experiment", "commit", "status", "val_bpb", "memory_gb", "runs", "seeds",
                                       "init_fingerprint", "description"])


def _num(x):
    """float for JSON: NaN and missing become None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def night_noise(df):
    """The noise of the night as the judge measures it, under the conditions of the first run with a result."""
    runs = _results(df)
    if runs.empty:
        return dict(noise({}, {}), **{k: None for k in MATCHED})
    like = conditions(runs.iloc[0])
    values, best_before, _, fingerprints = evidence(df, like)
    return dict(noise(values, best_before, fingerprints=fingerprints), **like)


def summarize(df):
    """Counts, keep rate, noise, baseline, best, improvement, the kept list, the top hits and the confirmation, as a
    JSON-friendly dict. An experiment is a commit; its val_bpb is the mean of its runs."""
    exps = experiments(df)
    n = len(exps)
    counts = {s: int((exps["status"] == s).sum()) for s in STATUSES}
    counts["other"] = n - sum(counts.values())  # unknown statuses (warned about when loading)
    results = exps[exps["val_bpb"] > 0]
    kept = results[results["status"] == "keep"]
    nz = night_noise(df)
    floor = nz["floor"]
    # the first experiment is the unmodified baseline; skip leading crashes, which have no result
    baseline = float(results["val_bpb"].iloc[0]) if len(results) else None
    best_row = kept.loc[kept["val_bpb"].idxmin()] if len(kept) else None
    best = float(best_row["val_bpb"]) if best_row is not None else None
    improvement = round(baseline - best, 6) if baseline is not None and best is not None else None  # no float noise

    kept_list = [{"experiment": int(r.experiment), "commit": r.commit, "val_bpb": round(float(r.val_bpb), 6),
                  "memory_gb": _num(r.memory_gb), "runs": int(r.runs), "seeds": r.seeds,
                  "description": r.description} for r in kept.itertuples()]
    # each kept experiment after the first, by how much it lowered val_bpb below the previous kept one, in floors
    hits = []
    for prev, k in zip(kept_list, kept_list[1:]):
        gain = round(prev["val_bpb"] - k["val_bpb"], 6)
        floors = round(gain / floor, 2) if floor else None
        hits.append(dict(k, gain=gain, gain_floors=floors, within_noise=floors is not None and floors < 1))
    for k, h in zip(kept_list[1:], hits):
        k.update(gain=h["gain"], gain_floors=h["gain_floors"], within_noise=h["within_noise"])
    hits.sort(key=lambda h: h["gain"], reverse=True)
    conf = confirmation(df)
    if conf is not None:
        claimed = results.set_index("commit")["val_bpb"]
        conf = dict(conf, todo=[list(t) for t in conf["todo"]],
                    claimed=round(float(claimed[conf["baseline"]] - claimed[conf["best"]]), 6))
    return {
        "n_experiments": n,
        "n_runs": int((df["verdict"] != "confirm").sum()),
        "n_confirmation_runs": int((df["verdict"] == "confirm").sum()),
        "counts": counts,
        "keep_rate": counts["keep"] / n if n else None,
        "noise": nz,
        "baseline_val_bpb": baseline,
        "best_val_bpb": best,
        "best_commit": best_row["commit"] if best_row is not None else None,
        "best_description": best_row["description"] if best_row is not None else None,
        "improvement_abs": improvement,
        "improvement_pct": round(100 * improvement / baseline, 4) if improvement is not None else None,
        "improvement_floors": round(improvement / floor, 2) if improvement is not None and floor else None,
        "kept": kept_list,
        "top_hits": hits,
        "confirmation": conf,
    }


def format_report(summary):
    """The summary as a short text report."""
    s, c, nz = summary, summary["counts"], summary["noise"]
    n = s["n_experiments"]
    lines = [f"{n} experiments ({s['n_runs']} runs): {c['keep']} keep, {c['discard']} discard, {c['crash']} crash"
             + (f", {c['other']} unknown status" if c["other"] else "")
             + (f" (keep rate {100 * s['keep_rate']:.1f}%)" if n else "")]
    if nz["floor"] is not None:
        lines.append(f"noise floor:      {nz['floor']:.6f} (seed to seed: sqrt(2) * sigma {nz['sigma']:.6f}, "
                     f"{nz['dof']} degrees of freedom"
                     + "".join(f"; seed for seed, {what} {nz[k]['spread']:.6f} on {nz[k]['dof']} dof"
                               for k, what in (("same_init", "same weights"), ("other_init", "other weights"))
                               if nz[k]["spread"])
                     + f"; {_describe(nz)})")
    else:
        lines.append("noise floor:      not measured (no commit has run under two seeds)")
    if s["baseline_val_bpb"] is not None:
        lines.append(f"baseline val_bpb: {s['baseline_val_bpb']:.6f}")
    if s["best_val_bpb"] is not None:
        lines.append(f"best val_bpb:     {s['best_val_bpb']:.6f} ({s['best_commit']}: {s['best_description']})")
        lines.append(f"improvement:      {s['improvement_abs']:.6f} ({s['improvement_pct']:.2f}%"
                     + (f", {s['improvement_floors']:.1f} noise floors" if s["improvement_floors"] is not None else "")
                     + "), as claimed by the decision runs")
    conf = s["confirmation"]
    if conf is not None and conf["gain"] is not None:
        lines.append(f"confirmed gain:   {conf['gain']:.6f} (95% interval {conf['ci'][0]:.6f} to {conf['ci'][1]:.6f}; "
                     f"claimed {conf['claimed']:.6f}; {conf['best']} against {conf['baseline']} under seeds "
                     f"{', '.join(map(str, conf['seeds']))})")
    elif conf is not None:
        lines.append(f"confirmed gain:   not yet ({conf['done']} of {conf['needed']} confirmation runs; "
                     "`uv run analysis.py confirm` says what to run)")
    if s["kept"]:
        lines += ["", "kept experiments (val_bpb: mean of the runs; gain over the previous kept one, in noise floors;"
                      " ~ marks a gain within the noise):",
                  f"  {'#':>4}  {'commit':<8} {'val_bpb':>9} {'runs':>4} {'mem_gb':>7} {'floors':>7}  description"]
        for k in s["kept"]:
            mem = f"{k['memory_gb']:.1f}" if k["memory_gb"] is not None else "-"
            floors = f"{k['gain_floors']:+.1f}" if k.get("gain_floors") is not None else ""
            mark = "~" if k.get("within_noise") else " "
            lines.append(f"  {k['experiment']:>4}  {k['commit']:<8} {k['val_bpb']:>9.6f} {k['runs']:>4} {mem:>7} "
                         f"{floors:>6}{mark}  {k['description']}")
    if s["top_hits"]:
        lines += ["", "top hits (val_bpb gain over the previous kept experiment):"]
        for rank, h in enumerate(s["top_hits"], start=1):
            floors = f" ({h['gain_floors']:+.1f} floors{', within the noise' if h['within_noise'] else ''})" \
                if h["gain_floors"] is not None else ""
            lines.append(f"  {rank:>2}. {h['gain']:+.6f}{floors}  {h['commit']:<8} {h['description']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Progress plot


def plot_progress(df, path):
    """Draws val_bpb per experiment to `path` (PNG). Returns the path, or None when there is nothing to plot.

    Every run is a point (an experiment run under three seeds has three); kept experiments also get their mean as
    a green point labelled with the description, the running best a step line with the noise floor as a band
    around it. Discarded runs above the plotted range are drawn as arrows on its top edge. Crashes are not drawn.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless and inside Jupyter

    exps = experiments(df)
    results = exps[exps["val_bpb"] > 0]
    if results.empty:
        return None
    summary = summarize(df)
    c, floor = summary["counts"], summary["noise"]["floor"]
    kept = results[results["status"] == "keep"]
    number = dict(zip(exps["commit"], exps["experiment"]))
    runs = _results(df).assign(x=lambda d: d["commit"].map(number))

    if len(kept):
        lo, hi = summary["best_val_bpb"], summary["baseline_val_bpb"]
    else:
        lo, hi = results["val_bpb"].min(), results["val_bpb"].max()
    lo = min(lo, runs["val_bpb"].min())  # a run below the best (noise) is drawn, never cut off
    # from just below the best (or the lowest run) to just above the baseline: worse runs are marked on the top edge
    margin = max(0.15 * (hi - lo), 0.002 * hi, 1.5 * (floor or 0))
    ylo, yhi = lo - margin, hi + margin

    fig = Figure(figsize=(14, 7))
    ax = fig.add_subplot()
    other = runs[runs["status"] != "keep"]
    inside = other[other["val_bpb"] <= yhi]
    ax.scatter(inside["x"], inside["val_bpb"], s=14, c="#b0b0b0", alpha=0.6, label="discarded (each run)", zorder=2)
    above = other[other["val_bpb"] > yhi].drop_duplicates("x")
    if len(above):
        ax.scatter(above["x"], [yhi - 0.01 * (yhi - ylo)] * len(above), marker="^", s=22, c="#b0b0b0",
                   label="discarded, above the plotted range", zorder=2)
    if len(kept):
        kept_runs = runs[runs["status"] == "keep"]
        ax.scatter(kept_runs["x"], kept_runs["val_bpb"], s=12, c="#2ca02c", alpha=0.5, zorder=3,
                   label="kept (each run)")
        ax.scatter(kept["experiment"], kept["val_bpb"], s=50, c="#2ca02c", edgecolors="black", linewidths=0.5,
                   label="kept (mean of its runs)", zorder=4)
        best_so_far = kept["val_bpb"].cummin()
        x = list(kept["experiment"]) + [exps["experiment"].iloc[-1]]  # carry the best on to the last experiment
        y = list(best_so_far) + [best_so_far.iloc[-1]]
        ax.step(x, y, where="post", c="#2ca02c", alpha=0.7, lw=1.5, label="running best", zorder=3)
        if floor:
            ax.fill_between(x, [v - floor for v in y], [v + floor for v in y], step="post", color="#2ca02c",
                            alpha=0.12, lw=0, label=f"noise floor ±{floor:.4f}", zorder=1)
        confirm = df[(df["verdict"] == "confirm") & (df["val_bpb"] > 0)].assign(x=lambda d: d["commit"].map(number))
        if len(confirm):  # drawn a little to the right of their commit: seeds no decision used
            ax.scatter(confirm["x"] + 0.25, confirm["val_bpb"].clip(upper=yhi), marker="D", s=20, facecolors="none",
                       edgecolors="#1f3d99", label="confirmation runs", zorder=4)
        for r in kept.itertuples():
            label = r.description if len(r.description) <= 45 else r.description[:44] + "…"
            ax.annotate(label, (r.experiment, r.val_bpb), xytext=(4, 6), textcoords="offset points", fontsize=8,
                        rotation=20, color="#1a5e1a")
    ax.set_ylim(ylo, yhi)
    ax.set_xlim(-1, max(len(exps), 2))
    ax.set_xlabel("experiment # (one commit; several points where it ran under several seeds)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"autoresearch: {len(exps)} experiments ({summary['n_runs']} runs), {c['keep']} kept, {c['discard']} "
                 f"discarded, {c['crash']} crashed" + (f"; noise floor {floor:.4f}" if floor else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)  # outside: it would hide runs
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


# Integrity


def _git(repo_dir, *args):
    return subprocess.run(["git", "-C", repo_dir, *args], capture_output=True, text=True)


def check_integrity(repo_dir, df):
    """Checks that no kept commit changed prepare.py or pyproject.toml relative to its parent.

    The first row (the baseline, the main branch's commit) is not an experiment and is not checked.
    Commits that are not in the repository, or no repository at all, are noted, never an error.
    Returns {"checked": int, "problems": [str], "notes": [str], "message": str}.
    """
    problems, notes, checked = [], [], 0
    exps = experiments(df)
    kept = exps[(exps["status"] == "keep") & (exps["val_bpb"] > 0) & (exps["experiment"] > 0)]
    try:
        inside = _git(repo_dir, "rev-parse", "--is-inside-work-tree").stdout.strip() == "true"
        why = f"{repo_dir} is not a git repository"
    except FileNotFoundError:  # no git on PATH
        inside, why = False, "git is not on PATH"
    except NotADirectoryError:
        inside, why = False, f"{repo_dir} is not a directory"
    if not inside:
        message = f"integrity: not checked ({why})"
        return {"checked": 0, "problems": [], "notes": [message], "message": message}
    for commit in kept["commit"]:
        if not re.fullmatch(r"[0-9a-fA-F]{4,40}", commit):
            notes.append(f"{commit!r} is not a commit hash")
            continue
        if _git(repo_dir, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
            notes.append(f"commit {commit} not found in this repository")
            continue
        diff = _git(repo_dir, "diff", "--name-only", f"{commit}^", commit)
        if diff.returncode != 0:
            notes.append(f"commit {commit} has no parent to compare with")
            continue
        checked += 1
        touched = [f for f in diff.stdout.splitlines() if f in FIXED_FILES]
        if touched:
            problems.append(f"commit {commit} changed {', '.join(touched)}")
    if problems:
        message = f"integrity: FAILED ({len(problems)} of {checked} kept commits changed fixed files: " \
                  + "; ".join(problems) + ")"
    elif checked:
        message = f"integrity: ok ({checked} kept commits checked)"
    elif notes:
        message = f"integrity: not checked ({len(notes)} kept commits not found in the git repository at {repo_dir})"
    else:
        message = "integrity: nothing to check (no kept experiments after the baseline)"
    if notes and checked:
        message += f"; {len(notes)} not checked"
    return {"checked": checked, "problems": problems, "notes": notes, "message": message}


# -----------------------------------------------------------------------------
# Command line


def _git_head(cwd="."):
    """The short hash of HEAD; None outside a repository; FileNotFoundError when git is not on PATH."""
    r = subprocess.run(["git", "-C", cwd, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _error(message):
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(description="Record, judge and report autoresearch runs (results.tsv).")
    parser.add_argument("command", nargs="?", default="report", choices=("report", "record", "judge", "confirm", "mark"),
                        help="report (default); record a run from its log; judge the latest commit again, with the "
                             "evidence; confirm: the next confirmation run, or the confirmed gain; mark the latest "
                             "commit keep or discard by hand (the simplicity criterion)")
    parser.add_argument("--tsv", default="results.tsv", help="path to results.tsv (default: results.tsv)")
    parser.add_argument("--json", action="store_true", help="report: print the summary, warnings and integrity as JSON")
    parser.add_argument("--plot", metavar="PATH", help="report: write the progress figure (PNG) to PATH")
    parser.add_argument("--log", default="run.log", help="record: the run's log (default: run.log)")
    parser.add_argument("--description", help="record: what the experiment tried (no tabs; a rerun reuses the "
                                              "commit's)")
    parser.add_argument("--confirm", action="store_true", help="record: a confirmation run (changes no status)")
    parser.add_argument("--commit", help="record, judge, mark: the commit (default: git HEAD; judge, mark: the last "
                                         "row's)")
    parser.add_argument("--status", choices=("keep", "discard"), help="mark: the commit's new status")
    parser.add_argument("--rule", choices=RULES, default=os.environ.get("AUTORESEARCH_RULE", "noise"),
                        help="noise (default) or plain, the reference's one-run rule (env AUTORESEARCH_RULE)")
    args = parser.parse_args(argv)
    if args.rule not in RULES:
        parser.error(f"AUTORESEARCH_RULE={args.rule!r}: use noise or plain")

    if args.command == "record":
        if not os.path.isfile(args.log):
            return _error(f"{args.log}: no such file; run `uv run train.py > run.log 2>&1` first")
        try:
            commit = args.commit or _git_head()
        except FileNotFoundError:
            return _error("git is not on PATH; install git (or give --commit <hash>)")
        if not commit:
            return _error("not in a git repository; run from the repository (or give --commit)")
        with open(args.log, encoding="utf-8", errors="replace") as f:
            summary = parse_log(f.read())
        try:
            _, verdict = record(args.tsv, summary, commit, args.description, args.rule, confirm=args.confirm)
        except RecordError as e:
            return _error(str(e))
        except OSError as e:
            return _error(f"cannot write {args.tsv}: {e}")
        print(verdict["line"])
        return 0

    try:
        df, warnings = load_results(args.tsv)
    except OSError as e:
        return _error(f"{e}" if str(args.tsv) in str(e) else f"{args.tsv}: {e}")
    if args.command == "judge":
        verdict = judge(df, args.commit, args.rule)
        print("\n".join([verdict["line"]] + [f"  {e}" for e in verdict["evidence"]]))
        return 0
    if args.command == "confirm":
        print(confirmation_line(confirmation(df)))
        return 0
    if args.command == "mark":
        if not args.status:
            parser.error("mark needs --status keep or --status discard")
        commit = args.commit or (df["commit"].iloc[-1] if len(df) else None)
        if commit is None or not (df["commit"] == commit).any():
            return _error(f"{args.tsv}: no row for commit {commit}")
        mark(args.tsv, commit, args.status)
        print(f"{args.status}: {commit} marked by hand")
        return 0
    summary = summarize(df)
    integrity = check_integrity(os.path.dirname(os.path.abspath(args.tsv)), df)
    log = sys.stderr if args.json else sys.stdout  # keep stdout pure JSON

    if args.json:
        print(json.dumps(dict(summary, tsv=args.tsv, warnings=warnings, integrity=integrity), indent=2))
    else:
        print(f"{args.tsv}: " + format_report(summary))
        if warnings:
            print(f"\n{len(warnings)} warnings:")
            for w in warnings:
                print(f"  {w}")
        print("\n" + integrity["message"])
        for note in integrity["notes"] if integrity["checked"] else []:
            print(f"  {note}")
    if args.plot:
        try:
            written = plot_progress(df, args.plot)
        except OSError as e:
            return _error(f"cannot write {args.plot}: {e}")
        print(f"wrote {args.plot}" if written else f"no results to plot yet; {args.plot} not written", file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
