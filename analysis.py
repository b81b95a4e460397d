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
  They also score a held-out part of the validation shard; the report says when the gain does not hold there.
- AUTORESEARCH_RULE=plain (or --rule plain) is the reference's rule: one run, keep if strictly lower than the best kept.
- Before a run counts, `record` checks it against the receipt prepare.py's evaluate_bpb printed into run.log, git and
  the seeds asked for (check_run), refuses what differs, and names what the diff of train.py touches (flags).

Reading is forgiving: messy input gives a warning per bad line instead of a traceback, and the reference's five-column
files and this project's older files load as they are. analysis.ipynb imports the functions below. The report's
integrity check runs git in the directory holding the tsv: no kept commit may differ from the baseline's commit in a
file other than train.py.
"""

import argparse
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
from contextlib import contextmanager

import pandas as pd

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]  # the reference's five, first and in order
EXTRA = ["seed", "num_steps", "attention", "device", "init_fingerprint", "verdict", "time_budget", "eval_tokens",
         "training_seconds", "total_seconds", "rule", "flags", "receipt"]
HEADER = COLUMNS + EXTRA  # older files stop after `eval_tokens` (13 columns), `verdict` (11) or `description` (5)
FROM_SUMMARY = [k for k in EXTRA if k not in ("verdict", "rule", "flags", "receipt")]  # the summary keys a row records
MATCHED = ("device", "attention", "time_budget", "eval_tokens")  # runs are compared only when these agree
STATUSES = ("keep", "discard", "crash")
EDITABLE = "train.py"  # the one file that may differ from the baseline's commit
RULES = ("noise", "plain")

BASELINE_SEEDS = (42, 43, 44, 45)  # the baseline runs under each before any idea is judged (3 dof of noise)
SEEDS = (42, 43)                   # a candidate's first run, and its one rerun when the verdict asks for it
CONFIRM_SEEDS = (1001, 1002)  # the morning's confirmation of baseline and best: seeds no decision used; under a seed
                              # from 1000 up, prepare.py also scores the held-out part of the validation shard
HELDOUT_SHARE = 0.5           # the gain holds on the held-out part when at least this share of it is found there
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


def row_flags(rows):
    """The flag codes of a commit's rows that were not refused, each once, in order."""
    codes = ",".join(rows.loc[rows["verdict"] != "refused", "flags"].fillna("")).split(",")
    return list(dict.fromkeys(c for c in codes if c))


def _flagged(rows):
    """The verdict's tail naming the commit's flags for the morning ('' when there are none)."""
    text = flag_text(row_flags(rows))
    return f"; flagged for the morning: {text}" if text else ""


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
                                          "plain rule: keep only if strictly lower)" + _flagged(mine))

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
    if verdict == "keep" and c["diff"] > IMPLAUSIBLE_FLOORS * floor:
        line += f"; check this: {c['diff'] / floor:.0f} noise floors is a lot for one edit"
    line += _flagged(mine)
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
    got, held = {baseline: {}, best: {}}, {baseline: {}, best: {}}  # val_bpb, and the held-out part's
    for r in runs.to_dict("records"):
        if r["commit"] in got and r["seed"] in CONFIRM_SEEDS and not _differs(r, like):
            got[r["commit"]].setdefault(r["seed"], []).append(r["val_bpb"])
            heldout = parse_receipt_field(r["receipt"]).get("heldout")
            if heldout:
                held[r["commit"]].setdefault(r["seed"], []).append(float(heldout))
    got, held = ({c: {s: _mean(v) for s, v in seeds.items()} for c, seeds in d.items()} for d in (got, held))
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
                   floor=nz["floor"], heldout_gain=None)
        if all(set(held[k]) == set(got[k]) for k in held):  # every run scored the held-out part too
            h = compare(held[best], held[baseline], nz)
            half = t_ppf(0.975, h["dof"]) * h["se"]
            out.update(heldout_gain=h["diff"], heldout_ci=[h["diff"] - half, h["diff"] + half],
                       heldout_holds=c["diff"] <= 0 or h["diff"] >= HELDOUT_SHARE * c["diff"])
    return out


def heldout_text(conf):
    """The held-out part's gain next to the confirmed one, and whether the gain holds there."""
    if conf.get("heldout_gain") is None:
        return ""
    lo, hi = conf["heldout_ci"]
    return (f"; on the held-out part {conf['heldout_gain']:.6f} (95% interval {lo:.6f} to {hi:.6f})"
            + ("" if conf["heldout_holds"] else f": the gain does not hold there (less than {HELDOUT_SHARE:.0%} of "
                                                "it): the night may have fitted the validation set"))


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
            f"{conf['dof']} dof) under seeds {', '.join(map(str, conf['seeds']))}" + heldout_text(conf))

# -----------------------------------------------------------------------------
# Checking a run before it counts: the receipt prepare.py printed, git, the seed
#
# train.py prints the summary, but prepare.py's evaluate_bpb measured the number and printed a receipt of what it
# scored. A run is recorded only when the receipt agrees with the summary and with the baseline's runs, no file but
# train.py differs from the baseline's commit, the commit that ran is the one recorded and nothing uncommitted ran
# with it, and a verdict asked for its seed. What a diff of train.py touches is named, never refused: a person
# decides in the morning. The threat is an agent taking a shortcut, not a forger (docs/reliability.md).

RECEIPT_KEYS = {"tokens": "the tokens scored", "bytes": "the bytes counted", "sum": "the tokens scored",
                "val": "the validation shard", "table": "the token-byte table", "prepare": "prepare.py",
                "seq_len": "the sequence length", "budget": "the time budget"}  # equal in every run of a night
RUN_KEYS = ("run", "wall", "train_tokens")  # this run's own: its id, seconds from first batch to evaluation, tokens
# Named in the verdict and the report when a diff of train.py against the best touches one of these (changed lines)
DIFF_FLAGS = {
    "eval": (r"evaluate_bpb|eval_tokens|targets is None|\breturn logits\b|\.eval\(|\.training\b|inference_mode|"
             r"is_grad_enabled",
             "the evaluation"),
    "time": (r"training_time|budget|TIME_BUDGET|time\.(time|perf_counter|monotonic)|step > \d|\bdt\b|\bt0\b",
             "the time accounting or budget"),
    "summary": (r"print\(.*(---|val_bpb|_seconds|num_steps|tokens|time_budget)|stdout|stderr", "the summary lines"),
    "val": (r"[\"']val[\"']|VAL_|shard_06542|shard_paths", "the validation split"),
    "prepare": (r"\bprepare\.|import prepare|from prepare import|setattr\(|sys\.modules|globals\(\)",
                "the prepare module"),
    "files": (r"\bopen\(|torch\.(load|save)|load_state_dict|np\.(load|save)|pickle|safetensors|\.(read|write)_"
              r"(text|bytes)|os\.(remove|rename|replace)|shutil|subprocess", "file reads or writes"),
    "env": (r"os\.environ|putenv|AUTORESEARCH_", "environment variables"),
}
REFUSALS = {"dirty": "with uncommitted changes", "git": "outside the night's repository",
            "files": "changing a file other than train.py", "seed": "under a seed no verdict asked for",
            "receipt": "without one receipt of evaluate_bpb", "summary": "whose summary differs from the receipt",
            "causal": "of a model that sees later tokens", "val": "reading the validation split",
            "stale": "of an old or repeated log", "baseline": "scored on other terms than the baseline"}
# Named from the receipt: seconds from the first training batch to evaluation, past the budget, above twice the
# baseline's plus 10% of the budget (at least 10 s); or no batch from make_dataloader at all
RUN_FLAGS = {"wall": "more wall clock from first batch to evaluation than the baseline's",
             "loader": "no training batch from make_dataloader"}
IMPLAUSIBLE_FLOORS = 10  # a gain this many noise floors from one edit is checked by a person in the morning


def parse_receipts(text):
    """The receipts evaluate_bpb printed into a log (one per evaluation), as dicts; a line that is not JSON is {}."""
    out = []
    for m in re.finditer(r"^receipt: (.*?)\s*$", SKYPILOT_PREFIX.sub("", text), re.M):
        try:
            out.append(json.loads(m.group(1)))
        except ValueError:
            out.append({})
    return out


def receipt_field(receipt):
    """What results.tsv keeps of a receipt: `key=value` pairs, the night's invariants first, then the run's own."""
    r = {k: receipt.get(k) for k in [*RECEIPT_KEYS, *RUN_KEYS]}
    if receipt.get("heldout"):
        r.update(heldout=f"{receipt['heldout']['val_bpb']:.6f}", hsum=receipt["heldout"]["sum"])
    return " ".join(f"{k}={v}" for k, v in r.items() if v is not None)


def parse_receipt_field(text):
    return dict(kv.split("=", 1) for kv in (text or "").split() if "=" in kv)


def asked_seeds(before, commit, rule, confirm):
    """The seeds a verdict or the confirmation asks `commit` to run under next, from the rows `before` this run."""
    if confirm:
        conf = confirmation(before)
        return [s for c, s in (conf["todo"] if conf else []) if c == commit]
    decisions = before[before["verdict"] != "confirm"]
    mine = decisions[decisions["commit"] == commit]
    if mine.empty:
        return [SEEDS[0]]  # SEED in train.py
    v = judge(decisions, commit, rule)
    last = _int_or_none(str(mine["seed"].iloc[-1]))
    return [v["seed"] if v["seed"] is not None else last] if v["verdict"] in ("rerun", "refused", "crash") else []


def check_run(before, summary, receipts, commit, rule="noise", confirm=False, repo="."):
    """Whether a run may be recorded: (refusal, flags, receipt). refusal is None or (code, the verdict line);
    flags the codes of DIFF_FLAGS and RUN_FLAGS that apply; receipt the one evaluate_bpb printed, or None."""
    decisions = before[before["verdict"] != "confirm"]
    base = decisions["commit"].iloc[0] if len(decisions) else commit
    seed = _int_or_none(summary.get("seed"))
    asked = asked_seeds(before, commit, rule, confirm)
    again = f"run it again with seed {asked[0] if asked else seed}"
    dirty = _git_lines(repo, "status", "--porcelain", "--untracked-files=no")
    if dirty:
        files = ", ".join(line[3:] for line in dirty)
        return ("dirty", f"refused: uncommitted changes to {files}; only a committed train.py is recorded: commit it "
                         f"or undo them (git checkout -- <file>), then {again}"), [], None
    changed = _git_lines(repo, "diff", "--name-only", base, commit)
    if changed is None:
        return ("git", f"refused: cannot compare {commit} with the baseline {base} in the git repository at "
                       f"{os.path.abspath(repo)}; record from the night's repository"), [], None
    others = [f for f in changed if f != EDITABLE]
    if others:
        return ("files", f"refused: {commit} changes {', '.join(others)} against the baseline {base}; only "
                         f"{EDITABLE} may change: restore them (git checkout {base} -- <file>), amend the commit, "
                         f"then {again}"), [], None
    r = receipts[0] if len(receipts) == 1 and receipts[0] else None
    rows = [(line, parse_receipt_field(f)) for line, f in zip(before["line"], before["receipt"]) if f]
    if r and r["commit"] and not r["commit"].startswith(commit):
        return ("stale", f"refused: run.log is a run of {r['commit'][:7]}, not of {commit} (an old log?); run "
                         f"{commit} first"), [], r
    seen = [line for line, f in rows if f.get("run") == r["run"]] if r else []
    if seen:
        return ("stale", f"refused: this run.log is recorded already (line {seen[0]} of results.tsv); run the "
                         f"experiment first"), [], r
    if seed is not None and seed not in asked:
        why = (f"it asks for seed {asked[0]}" if asked else f"{commit} is judged already: run the next idea"
               if not confirm else "its confirmation runs are done")
        if not confirm and decisions["commit"].ne(commit).all():
            why = f"a new commit runs first under seed {SEEDS[0]} (never set AUTORESEARCH_SEED yourself)"
        return ("seed", f"refused: no verdict asked for a run of {commit} under seed {seed}; {why}"), [], r
    if "val_bpb" not in summary:
        return None, [], None  # a crash: no number to check
    if r is None:
        return ("receipt", f"refused: run.log has {len(receipts)} receipts of evaluate_bpb where one run prints one; "
                           f"its val_bpb is not the one prepare.py measured: call evaluate_bpb once and print what it "
                           f"returns (undo the edit), then {again}"), [], None
    told = {"val_bpb": (summary["val_bpb"], f"{r['val_bpb']:.6f}"), "eval_tokens": (summary.get("eval_tokens"),
            str(r["tokens"])), "time_budget": (summary.get("time_budget"), f"{r['budget']:g}")}
    wrong = [f"{k} {said} (measured {real})" for k, (said, real) in told.items()
             if said is not None and (abs(float(said) - float(real)) > 5e-7 if k == "val_bpb" else said != real)]
    if wrong:
        return ("summary", f"refused: the summary says {', '.join(wrong)}; print what evaluate_bpb returned "
                           f"and prepare.py's conditions (undo the edit), then {again}"), [], r
    if not r["causal"]:
        return ("causal", f"refused: the model sees later tokens (changing the tokens after a position moved the "
                          f"loss before it by {r['leak']:.2g} nats; or it is random at evaluation): every layer must "
                          f"be causal: undo the edit, then {again}"), [], r
    if r["val_loaders"]:
        return ("val", f"refused: the validation split was read outside evaluate_bpb (training on it?); train on "
                       f"make_dataloader(..., \"train\") only: undo the edit, then {again}"), [], r
    if r["dirty"]:
        return ("dirty", f"refused: the run started with uncommitted changes to {', '.join(r['dirty'])}, so no "
                         f"commit holds what ran: commit it (or undo them), then {again}"), [], r
    this = parse_receipt_field(receipt_field(r))
    counted = decisions[(decisions["commit"] == base) & (decisions["verdict"] != "refused")]
    like = [f for line, f in rows if line in set(counted["line"])]
    differ = sorted({RECEIPT_KEYS[k] for k in RECEIPT_KEYS if like and like[0].get(k) != this.get(k)})
    if confirm:
        hsums = {f["hsum"] for line, f in rows if "hsum" in f}
        differ += ["the held-out part"] * bool(hsums and this.get("hsum") not in hsums)
    if differ:
        return ("baseline", f"refused: evaluate_bpb scored this run on other terms than the baseline {base}'s: "
                            f"{', '.join(differ)} differ; only {EDITABLE} changes, never what is scored: undo "
                            f"that, then {again}"), [], r
    return None, [] if confirm or commit == base else flags_of(decisions, commit, r, like_wall(before, base), repo), r


def like_wall(before, base):
    """The baseline's runs' seconds from their first training batch to evaluation, past their time budget."""
    rows = before[(before["commit"] == base) & ~before["verdict"].isin(["confirm", "refused"])]
    return [float(f["wall"]) - float(f.get("budget", 0)) for f in map(parse_receipt_field, rows["receipt"])
            if "wall" in f]


def flags_of(decisions, commit, receipt, base_excess, repo):
    """The DIFF_FLAGS that the diff of train.py against the best it is compared with touches, and the RUN_FLAGS."""
    best = _best_commit(decisions, commit) or decisions["commit"].iloc[0]
    diff = _git_lines(repo, "diff", "-U0", best, commit, "--", EDITABLE) or []
    changed = "\n".join(line[1:] for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    flags = [k for k, (pattern, _) in DIFF_FLAGS.items() if re.search(pattern, changed)]
    excess = receipt["wall"] - receipt["budget"] if receipt.get("wall") is not None else None  # warm-up and more
    slack = 2 * max(statistics.median(base_excess), 0) + max(0.1 * receipt["budget"], 10) if base_excess else None
    if excess is not None and slack is not None and excess > slack:
        flags.append("wall")
    if not receipt.get("train_tokens"):
        flags.append("loader")
    return flags


def flag_text(codes):
    """The flags of a row (its `flags` field, comma-separated) in words; refusals (`refused:...`) left out."""
    words = {k: w for k, (_, w) in DIFF_FLAGS.items()} | RUN_FLAGS
    return ", ".join(words[c] for c in codes if c in words)

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
               description=description, verdict="", rule="", flags="", receipt="",
               **{k: summary.get(k, "") for k in FROM_SUMMARY})
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


def record(tsv, summary, commit, description=None, rule="noise", confirm=False, receipts=None, repo=None):
    """Appends the run's row to `tsv` and judges its commit: the commit's status goes into all its rows and the
    verdict into the new one. With `confirm` the row is a confirmation run (verdict `confirm`): it changes no status
    and the returned verdict's line says what to confirm next. Without a description, a commit that already has rows
    reuses its first one. The file is rewritten whole and renamed into place, under the lock: a reader never sees
    half a row, and two writers never lose one. Returns (the new row's fields, the verdict).

    `receipts` (what evaluate_bpb printed into the run's log) and `repo` (the git checkout that ran it): the run is
    checked first (check_run) and refused, its row kept with the reason, when it may not count. The command line
    always passes both; without them (simulations, tests of the rule) the summary is trusted."""
    with locked(tsv):
        text = ""
        if os.path.exists(tsv):
            with open(tsv, encoding="utf-8", errors="replace") as f:
                text = f.read().lstrip("\ufeff")
        lines = _with_header(text.splitlines())
        before, _ = parse_results("\n".join(lines))
        if description is None:
            known = before.loc[before["commit"] == commit, "description"]
            if known.empty:
                raise RecordError(f"commit {commit} has no row in {tsv} yet: give --description \"<what changed>\"")
            description = known.iloc[0]
        row = dict(zip(HEADER, make_row(summary, commit, description)), rule=rule)
        conf = confirmation(before) if confirm else None
        if confirm and (conf is None or commit not in (conf["baseline"], conf["best"])):
            raise RecordError(f"commit {commit} is not one to confirm; `uv run analysis.py confirm` names the "
                              "commit and seed to run")
        refusal, flags, receipt = (None, [], None) if receipts is None else \
            check_run(before, summary, receipts, commit, rule, confirm, repo or ".")
        row.update(flags=",".join(flags), receipt=receipt_field(receipt) if receipt else "")
        if refusal:
            mine = _results(before[(before["commit"] == commit) & (before["verdict"] != "confirm")])
            if row["status"] != "crash":
                row["status"] = mine["status"].iloc[-1] if len(mine) else "discard"
            row.update(verdict="refused", flags=f"refused:{refusal[0]}")
            lines.append("\t".join(row[k] for k in HEADER))
            _replace(tsv, lines)
            return [row[k] for k in HEADER], _verdict("refused", row["status"], refusal[1])
        if confirm:
            if row["status"] != "crash":  # a confirmation run takes its commit's status; it never sets one
                row["status"] = before.loc[before["commit"] == commit, "status"].iloc[-1]
            row["verdict"] = "confirm"
            lines.append("\t".join(row[k] for k in HEADER))
            _replace(tsv, lines)
            conf = confirmation(parse_results("\n".join(lines))[0])
            return [row[k] for k in HEADER], _verdict("confirm", row["status"], confirmation_line(conf),
                                                       confirmation=conf)
        lines.append("\t".join(row[k] for k in HEADER))
        df, _ = parse_results("\n".join(lines))
        verdict = judge(df, commit, rule)
        _set_status(lines, df, commit, verdict["status"])
        if row["status"] != "crash":
            row["status"] = verdict["status"]
        row["verdict"] = verdict["verdict"]
        lines[-1] = "\t".join(row[k] for k in HEADER)
        _replace(tsv, lines)
    return [row[k] for k in HEADER], verdict


def _with_header(lines):
    """`lines` of a results.tsv with this version's header: added to a new file, in place of an older one."""
    header = lines[0].strip().lower().split("\t") if lines else []
    if not lines or (header[:5] == COLUMNS and header == HEADER[:len(header)]):
        lines[:1] = ["\t".join(HEADER)]
    return lines


def mark(tsv, commit, status):
    """Sets the status of every result row of `commit` by hand (the simplicity criterion), under the lock; their
    rule becomes `hand`, which the report shows."""
    with locked(tsv):
        with open(tsv, encoding="utf-8", errors="replace") as f:
            lines = _with_header(f.read().lstrip("\ufeff").splitlines())  # an older file gains the rule column
        _set_status(lines, parse_results("\n".join(lines))[0], commit, status, rule="hand")
        _replace(tsv, lines)


def _set_status(lines, df, commit, status, rule=None):
    """Writes `status` (and `rule`, if given) into the status field of `commit`'s result rows (df parsed from
    `lines`); crashes stay."""
    for lineno in df.loc[(df["commit"] == commit) & (df["val_bpb"] > 0), "line"]:
        fields = lines[lineno - 1].split("\t")
        fields[3] = status
        if rule:
            fields += [""] * (len(HEADER) - len(fields))
            fields[HEADER.index("rule")] = rule
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
                     "description": g["description"].iloc[0], **_run_costs(runs),
                     "rule": runs["rule"].iloc[-1] if len(runs) else "", "flags": row_flags(g),
                     "refused": int((g["verdict"] == "refused").sum())})
    return pd.DataFrame(rows, columns=["experiment", "commit", "status", "val_bpb", "memory_gb", "runs", "seeds",
                                       "init_fingerprint", "description", *COSTS, "rule", "flags", "refused"])


COSTS = ("steps", "tokens_M", "training_seconds", "total_seconds")  # what a run spent, for the morning's review


def _run_costs(runs):
    """The median num_steps of `runs`, and their mean tokens trained (as make_dataloader counted them), training
    and total seconds; None where no run has the number."""
    def mean(values):
        values = [float(v) for v in values if v not in (None, "")]
        return sum(values) / len(values) if values else None

    steps = [s for s in runs["num_steps"] if s is not None]
    served = [int(f["train_tokens"]) / 1e6 for f in map(parse_receipt_field, runs["receipt"]) if "train_tokens" in f]
    return {"steps": statistics.median(steps) if steps else None,
            "tokens_M": mean(served),
            "training_seconds": mean(runs["training_seconds"]), "total_seconds": mean(runs["total_seconds"])}


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
                  "description": r.description, **{k: _num(getattr(r, k)) for k in COSTS}, "rule": r.rule,
                  "flags": r.flags} for r in kept.itertuples()]
    # each kept experiment after the first, by how much it lowered val_bpb below the previous kept one, in floors
    hits = []
    for prev, k in zip(kept_list, kept_list[1:]):
        gain = round(prev["val_bpb"] - k["val_bpb"], 6)
        floors = round(gain / floor, 2) if floor else None
        hits.append(dict(k, gain=gain, gain_floors=floors, within_noise=floors is not None and floors < 1,
                         check=floors is not None and floors > IMPLAUSIBLE_FLOORS))
    for k, h in zip(kept_list[1:], hits):
        k.update(gain=h["gain"], gain_floors=h["gain_floors"], within_noise=h["within_noise"], check=h["check"])
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
        "refused": {code: int(n) for code, n in df.loc[df["verdict"] == "refused", "flags"]
                    .str.removeprefix("refused:").value_counts().items()},
        "by_hand": [r.commit for r in exps.itertuples() if r.rule == "hand"],
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
                     f"{', '.join(map(str, conf['seeds']))})" + heldout_text(conf))
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
    if s["kept"]:
        lines += ["", "review (each kept change next to the baseline: median steps, tokens trained in millions, mean "
                      "training and total seconds, lines of train.py changed against the best before it):",
                  f"  {'#':>4}  {'commit':<8} {'steps':>6} {'tokens_M':>9} {'train_s':>8} {'total_s':>8} "
                  f"{'lines':>9}  rule   flags"]
        for k in s["kept"]:
            cells = ["-" if k[c] is None else f"{k[c]:.0f}" if c == "steps" else f"{k[c]:.1f}" for c in COSTS]
            notes = [flag_text(k["flags"])]
            if k.get("check"):
                notes.append(f"check this ({k['gain_floors']:.0f} noise floors from one edit)")
            lines.append(f"  {k['experiment']:>4}  {k['commit']:<8} {cells[0]:>6} {cells[1]:>9} {cells[2]:>8} "
                         f"{cells[3]:>8} {k.get('lines') or '-':>9}  {k['rule'] or '-':<5}  "
                         + "; ".join(n for n in notes if n))
    if s["refused"] or s["by_hand"]:
        lines.append("")
    if s["refused"]:
        lines.append(f"refused runs:     {sum(s['refused'].values())} (" + ", ".join(
            f"{n} {REFUSALS.get(code, code)}" for code, n in s["refused"].items()) + "), not counted")
    if s["by_hand"]:
        lines.append(f"set by hand:      {', '.join(s['by_hand'])} (status set with `mark`, not by the rule)")
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


def _git_lines(repo_dir, *args):
    """git's output lines in `repo_dir`, or None when git fails (no git, no repository, an unknown commit)."""
    try:
        r = _git(repo_dir, *args)
    except OSError:
        return None
    return r.stdout.splitlines() if r.returncode == 0 else None


def check_integrity(repo_dir, df):
    """Checks that no kept commit differs from the baseline's commit in any file but train.py (record refuses such
    runs; this catches rows from elsewhere), and counts the lines of train.py each kept commit changed against the
    kept commit before it. Commits that are not in the repository, or no repository at all, are noted, never an
    error. Returns {"checked": int, "problems": [str], "notes": [str], "message": str, "lines": {commit: "+a -d"}}.
    """
    problems, notes, checked, changed = [], [], 0, {}
    exps = experiments(df)
    kept = exps[(exps["status"] == "keep") & (exps["val_bpb"] > 0)]
    try:
        inside = _git(repo_dir, "rev-parse", "--is-inside-work-tree").stdout.strip() == "true"
        why = f"{repo_dir} is not a git repository"
    except FileNotFoundError:  # no git on PATH
        inside, why = False, "git is not on PATH"
    except NotADirectoryError:
        inside, why = False, f"{repo_dir} is not a directory"
    if not inside:
        message = f"integrity: not checked ({why})"
        return {"checked": 0, "problems": [], "notes": [message], "message": message, "lines": {}}
    base = exps["commit"].iloc[0] if len(exps) else None
    for before, commit in zip(kept["commit"], kept["commit"].iloc[1:]):
        if not re.fullmatch(r"[0-9a-fA-F]{4,40}", commit):
            notes.append(f"{commit!r} is not a commit hash")
            continue
        files = _git_lines(repo_dir, "diff", "--name-only", base, commit)
        if files is None:
            notes.append(f"commit {commit} or the baseline {base} not found in this repository")
            continue
        checked += 1
        others = [f for f in files if f != EDITABLE]
        if others:
            problems.append(f"commit {commit} changed {', '.join(others)}")
        numstat = _git_lines(repo_dir, "diff", "--numstat", before, commit, "--", EDITABLE) or ["0\t0\t"]
        changed[commit] = "+{} -{}".format(*numstat[0].split("\t")[:2])
    if problems:
        message = f"integrity: FAILED ({len(problems)} of {checked} kept commits changed files other than " \
                  f"{EDITABLE} against the baseline: " + "; ".join(problems) + ")"
    elif checked:
        message = f"integrity: ok ({checked} kept commits checked)"
    elif notes:
        message = f"integrity: not checked ({len(notes)} kept commits not found in the git repository at {repo_dir})"
    else:
        message = "integrity: nothing to check (no kept experiments after the baseline)"
    if notes and checked:
        message += f"; {len(notes)} not checked"
    return {"checked": checked, "problems": problems, "notes": notes, "message": message, "lines": changed}


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
            text = f.read()
        try:
            _, verdict = record(args.tsv, parse_log(text), commit, args.description, args.rule, confirm=args.confirm,
                                receipts=parse_receipts(text), repo=".")
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
    for k in summary["kept"]:
        k["lines"] = integrity["lines"].get(k["commit"])
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
