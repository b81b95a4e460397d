"""
Records, judges and reports the runs in results.tsv (one row per training run, written by `record`).

Usage:
    uv run analysis.py record --description "<what changed>"   # append the run's row from run.log, print the verdict
    uv run analysis.py judge                                   # the latest commit's verdict again, with the evidence
    uv run analysis.py confirm                                 # the next confirmation run, or the confirmed gain
    uv run analysis.py mark --status discard                   # the simplicity criterion, by hand (or --status keep)
    uv run analysis.py status                                  # where the loop stands, and the next command
    uv run analysis.py [--json] [--plot progress.png]          # the night in a page: noise, best, kept, what was tried

A verdict is one line that starts with what to do: `keep`, `discard`, `rerun with seed N`, `crash` or `refused`.
The rule is judge.py's (docs/judging.md); this file finds the runs it weighs, only like with like, and checks each
run before it counts (docs/reliability.md). Older and messy files load with a warning per bad line.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pandas as pd

import judge as rule_
from judge import BASELINE_SEEDS, SEEDS, Verdict

try:
    import fcntl
except ImportError:  # Windows: no lock; the rename in _replace is still atomic
    fcntl = None

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]  # the reference's five, first and in order
EXTRA = ["seed", "num_steps", "attention", "device", "init_fingerprint", "verdict", "time_budget", "eval_tokens",
         "training_seconds", "total_seconds", "rule", "flags", "receipt", "train_py"]
HEADER = COLUMNS + EXTRA  # older files stop after `receipt` (18 columns), `eval_tokens` (13), `verdict` (11) or
                          # `description` (5); train_py is the git blob of the train.py that ran
FROM_SUMMARY = EXTRA[:5] + EXTRA[6:10]  # the fields a run's summary gives
MATCHED = ("device", "attention", "time_budget", "eval_tokens")  # runs are compared only when these agree
STATUSES = ("keep", "discard", "crash", "pending")  # pending: a rerun is owed before the commit is decided
EDITABLE = "train.py"  # the one file that may differ from the baseline's commit
RULES = ("noise", "plain")  # plain: the reference's rule, one run kept if strictly lower than the best
CONFIRM_SEEDS = (1001, 1002)  # the morning's confirmation of baseline and best: seeds no decision used; under a seed
                              # from 1000 up, prepare.py also scores the held-out part of the validation shard
HELDOUT_SHARE = 0.5           # the gain holds on the held-out part when at least this share of it is found there
STEP_TOLERANCE = 0.05         # runs of one commit agree in speed when within 5% of their median num_steps
VERDICT_CHARS = 300           # a verdict line longer than this keeps its decision and leaves the notes to `judge`
IMPLAUSIBLE_FLOORS = 10       # a gain this many noise floors from one edit is checked by a person in the morning
NUDGE_AFTER = 10              # discards in a row before a verdict says to try something structurally different: at
                              # the decision benchmark's keep rate (16%) a streak this long follows one keep in six
REPORT_LINES = 80             # the report's length, however long the night (warnings aside)

# -----------------------------------------------------------------------------
# Loading


def _int_or_none(text):
    return int(text) if re.fullmatch(r"-?\d+", text or "") else None


def _finite(text):
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _is_header(lower):
    """Whether the lowercased fields of a line are this version's header or an older one."""
    return lower[:5] == COLUMNS and lower == HEADER[:len(lower)]


def load_results(path):
    """(DataFrame with HEADER plus `line`, [warning]) from a results.tsv: a bad row is skipped with a warning, a
    crash's val_bpb is 0.0, an older file's missing columns are empty (seed and num_steps None)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (the agent creates results.tsv during setup, see program.md)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a results.tsv file")
    with open(path, "rb") as f:
        return parse_results(f.read().decode("utf-8", errors="replace"))


def parse_results(text):
    """load_results on the text of a results.tsv; `line` counts the lines of `text` from 1, the BOM removed."""
    warnings, rows, width = [], [], None  # width: fields per row, from the header: 5, 11, 13, 18 or 19
    for lineno, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        fields = [f.strip() for f in line.split("\t")]
        if not line.strip():
            continue
        if _is_header([f.lower() for f in fields]):
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
        row = dict(zip(HEADER, fields + [""] * (len(HEADER) - len(fields))), line=lineno)
        val_bpb, memory_gb, status = _finite(row["val_bpb"]), _finite(row["memory_gb"]), row["status"].lower()
        if val_bpb is None:
            warnings.append(f"line {lineno}: val_bpb {row['val_bpb']!r} is not a number; skipped")
            continue
        if memory_gb is None:
            warnings.append(f"line {lineno}: memory_gb {row['memory_gb']!r} is not a number; read as missing")
        if status not in STATUSES:
            warnings.append(f"line {lineno}: unknown status {status!r} (expected keep, discard, crash or pending)")
        elif status == "keep" and val_bpb <= 0:
            warnings.append(f"line {lineno}: status keep but val_bpb is {val_bpb}; not counted as a result")
        rows.append(dict(row, val_bpb=val_bpb, memory_gb=float("nan") if memory_gb is None else memory_gb,
                         status=status, verdict=row["verdict"].lower(), seed=_int_or_none(row["seed"]),
                         num_steps=_int_or_none(row["num_steps"])))
    df = pd.DataFrame(rows, columns=HEADER + ["line"], dtype=object)  # text fields are str, seeds int or None
    return df.astype({"val_bpb": float, "memory_gb": float, "line": int}), warnings


# -----------------------------------------------------------------------------
# The evidence: which runs count, and the night they make


def _decisions(df):
    """Every row but the confirmation runs (the morning's check, which decides nothing)."""
    return df[df["verdict"] != "confirm"]


def _results(df):
    """The runs that count: with a result, neither refused nor confirmation runs."""
    return df[(df["val_bpb"] > 0) & ~df["verdict"].isin(["refused", "confirm"])]


def _kept(df):
    return set(_results(df).query("status == 'keep'")["commit"])


def _differs(row, like):
    """The conditions in which `row` differs from `like`; an empty field (an older file) matches anything."""
    return [k for k in MATCHED if row[k] and like[k] and str(row[k]) != str(like[k])]


def _describe(row, keys=MATCHED):
    names = {"device": "on", "attention": "attention", "time_budget": "time budget", "eval_tokens": "eval tokens"}
    return ", ".join(f"{names[k]} {row[k] or '?'}" + ("s" if k == "time_budget" and row[k] else "") for k in keys)


def best_commit(df, before=None):
    """The best: the commit the branch is at after the last keep, of those before `before` (the commit being judged)
    if given; None before the baseline has a result."""
    commits = list(dict.fromkeys(_decisions(df)["commit"]))
    if before in commits:
        commits = commits[:commits.index(before)]
    kept = _kept(df)
    return next((c for c in reversed(commits) if c in kept), None)


def night_conditions(df):
    """The night's conditions: the baseline's first counted run's (None before it has one)."""
    runs = _results(df)
    return {k: runs.iloc[0][k] for k in MATCHED} if len(runs) else None


def speed(rows):
    """({line: note} of runs left out, {commit: (min, max) steps} of commits whose runs disagree in speed). When most
    of a commit's runs agree, the others (of three or more) are a cold start and left out; when they do not, the
    machine's speed swings and every run counts: none could be called the odd one."""
    by_commit, out, swings = {}, {}, {}
    for r in rows:
        if r["num_steps"] is not None:
            by_commit.setdefault(r["commit"], []).append(r)
    for commit, runs in by_commit.items():
        steps = [r["num_steps"] for r in runs]
        median = statistics.median(steps)
        near = [abs(s - median) <= STEP_TOLERANCE * median for s in steps]
        if 2 * sum(near) <= len(steps):
            swings[commit] = (min(steps), max(steps))
        elif len(steps) >= 3:
            out.update({r["line"]: f"line {r['line']} (seed {r['seed']}, {r['num_steps']} steps against the median "
                                   f"{median:g}) left out" for r, ok in zip(runs, near) if not ok})
    return out, swings


def same_init(fingerprints, commit, base, seeds):
    """Whether `commit` started from `base`'s initial weights under every one of `seeds` (equal fingerprints)."""
    return all(fingerprints.get((commit, s)) and fingerprints.get((commit, s)) == fingerprints.get((base, s))
               for s in seeds)


def walk(values, kept, fingerprints):
    """The night through judge.py, commit by commit, the first the baseline: ({commit: (the night before it, its
    comparison with the best then)}, the night after the last); (None, None) while the baseline has one seed."""
    commits = list(values)
    base = values[commits[0]]
    if len(base) < 2:
        return None, None
    pair = [base.get(s, np.nan) if fingerprints.get((commits[0], s)) else np.nan for s in SEEDS]
    night = rule_.start(np.array([list(base.values())]), np.array([pair]))
    seen = {}
    for commit in commits[1:] if night.ss[0] > 0 else []:  # no spread: the seed reaches nothing (judge says so)
        runs = values[commit]
        r = rule_.Runs.of(runs, same_init(fingerprints, commit, commits[0], [s for s in runs if s in SEEDS]))
        seen[commit] = (night, rule_.compare(night, r))
        night = rule_.step(night, r, np.array([commit in kept]))
    return seen, night


def noise_of(night):
    """The night's noise as every reader shows it: sigma, its dof and the floor; the seed-for-seed run spread and its
    dof while commits are compared seed for seed (None otherwise)."""
    if night is None:
        return {"sigma": None, "dof": 0, "floor": None, "spread": None, "spread_dof": 0}
    on = bool(night.on[0]) and night.paired_dof[0] >= 1
    return {"sigma": float(night.sigma[0]), "dof": int(night.dof[0]), "floor": float(night.floor[0]),
            "spread": float(np.sqrt(night.tau2[0])) if on else None,
            "spread_dof": int(night.paired_dof[0]) if on else 0}


def the_night(df):
    """Everything the verdicts and the report read (None before a run counts). values: {commit: {seed: val_bpb}} of
    the runs that count, repeats under a seed averaged; a run without a seed (an older file) is a seed of its own."""
    like = night_conditions(df)
    if like is None:
        return None
    rows = [r for r in _results(df).to_dict("records") if not _differs(r, like)]
    left_out, swings = speed(rows)
    values, fingerprints, steps = {}, {}, {}
    for r in rows:
        if r["line"] not in left_out:
            seed = r["seed"] if r["seed"] is not None else f"line {r['line']}"
            values.setdefault(r["commit"], {}).setdefault(seed, []).append(r["val_bpb"])
            fingerprints.setdefault((r["commit"], seed), r["init_fingerprint"])
            if r["num_steps"] is not None:
                steps.setdefault(r["commit"], []).append(r["num_steps"])
    values = {c: {s: sum(v) / len(v) for s, v in seeds.items()} for c, seeds in values.items()}
    seen, night = walk(values, _kept(df), fingerprints) if values else (None, None)
    return {"like": like, "values": values, "fingerprints": fingerprints, "left_out": left_out, "swings": swings,
            "steps": {c: statistics.median(s) for c, s in steps.items()}, "seen": seen or {}, "night": night,
            "noise": noise_of(night)}


# -----------------------------------------------------------------------------
# Judging one commit


def _plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def _line(head, notes):
    """The verdict line: its head, then the notes in order while it stays within VERDICT_CHARS."""
    more = "; more in `uv run analysis.py judge`"
    for i, note in enumerate(notes):
        if len(head) + len(f"; {note}") + (len(more) if i < len(notes) - 1 else 0) > VERDICT_CHARS:
            return head + more
        head += f"; {note}"
    return head


def _speed_notes(n, commit, best):
    """[a note] when the machine's speed swings and that touches this commit or its comparison with the best."""
    mine, theirs = n["steps"].get(commit), n["steps"].get(best)
    if commit in n["swings"]:
        lo, hi = n["swings"][commit]
        return [f"its runs made {lo}-{hi} steps: the machine's speed swings (see `uv run analysis.py`)"]
    if n["swings"] and mine and theirs and abs(mine - theirs) > STEP_TOLERANCE * max(mine, theirs):
        return [f"{mine:g} steps against the best's {theirs:g} on a machine whose speed swings: unless the edit "
                "changed the steps, this measures the machine too"]
    return []


def _mean(values):
    return float(np.mean(list(values.values())))


def judge(df, commit=None, rule="noise"):
    """The Verdict for `commit` (default: the commit of the last decision row) from everything in results.tsv."""
    df = _decisions(df)
    commit = commit or (df["commit"].iloc[-1] if len(df) else None)
    mine = df[df["commit"] == commit]
    if mine.empty:
        return Verdict("refused", "discard", f"refused: commit {commit} has no row in results.tsv" if commit else
                       "refused: results.tsv has no runs yet")
    last, valid = mine.iloc[-1], _results(mine)
    status = ("keep" if (valid["status"] == "keep").any() else "discard") if len(valid) else "crash"
    seed = _int_or_none(str(last["seed"]))

    def refused(why, **more):
        return Verdict("refused", status, f"refused: {why}", **more)

    if last["val_bpb"] <= 0:
        return Verdict("crash", status, f"crash: {commit} has no val_bpb (the run crashed or was killed); read "
                                        "`tail -n 50 run.log`")
    n = the_night(df)
    if n is None:
        return refused("no run of this night counts yet (every one was refused)")
    keys = _differs(last, n["like"])
    if keys:
        return refused(f"this run used {_describe(last, keys)}, the baseline {_describe(n['like'], keys)}; not "
                       f"comparable: fix that and rerun with seed {seed}", seed=seed)
    baseline = df["commit"].iloc[0]
    left_out = [n["left_out"][r] for r in mine["line"] if r in n["left_out"]]
    if commit == baseline:
        have = n["values"].get(commit, {})
        missing = [s for s in BASELINE_SEEDS if s not in have]
        if rule == "noise" and missing:  # the baseline is the best from its first run on
            head = (f"rerun with seed {missing[0]}: baseline {len(have)} of {len(BASELINE_SEEDS)} seeds "
                    f"({', '.join(map(str, BASELINE_SEEDS))}) to measure the noise")
            return Verdict("rerun", "keep", _line(head, left_out[-1:] + _speed_notes(n, commit, commit)),
                           seed=missing[0], evidence=left_out)
        nz = noise_of(walk({commit: have}, set(), n["fingerprints"])[1])
        head = f"keep: baseline {commit} {_mean(have):.6f} ({_plural(len(have), 'seed')})" + (
            f", noise floor {nz['floor']:.6f} (sigma {nz['sigma']:.6f}, {nz['dof']} dof)" if nz["floor"] else "")
        return Verdict("keep", "keep", _line(head, _speed_notes(n, commit, commit) + left_out), evidence=left_out,
                       floor=nz["floor"])

    best = best_commit(df, commit)
    if best is None:
        return Verdict("refused", "discard", "refused: no kept result to compare with (the baseline has not run)")
    if valid.empty:
        return refused(f"no run of {commit} counts yet (each was refused); rerun it with seed {seed}", seed=seed)
    flags = flag_text(row_flags(mine))
    flagged = [f"flagged for the morning: {flags}"] if flags else []
    if rule == "plain":  # the reference: one run, strictly lower than the best
        best_bpb, v = _mean(n["values"][best]), float(valid["val_bpb"].iloc[0])
        verdict = "keep" if v < best_bpb else "discard"
        head = (f"{verdict}: {commit} {v:.6f} vs best {best} {best_bpb:.6f} ({'not ' * (v >= best_bpb)}better by "
                f"{abs(v - best_bpb):.6f}; plain rule: keep only if strictly lower)")
        return Verdict(verdict, verdict, _line(head, flagged), best=best, diff=best_bpb - v)
    cand = n["values"].get(commit, {})
    if n["night"] is None:
        return refused(f"no noise measured yet; rerun the baseline {baseline} under seeds "
                       f"{', '.join(map(str, BASELINE_SEEDS))} first")
    if n["noise"]["sigma"] == 0:  # a z over a zero error would be infinite: say what is wrong instead
        return refused("every commit's runs under different seeds scored exactly the same, so the seed does not reach "
                       "the initial weights (check AUTORESEARCH_SEED and SEED in train.py); nothing can be judged")
    if not cand:
        return Verdict("rerun", "pending", _line(f"rerun with seed {seed}: every run of {commit} was left out",
                                                 left_out), seed=seed, evidence=left_out)
    night, c = n["seen"][commit]
    z, dof, diff, floor = float(c.z[0]), float(c.dof[0]), float(c.diff[0]), float(night.floor[0])
    verdict = str(rule_.decide(night, rule_.Runs.of(cand), c)[0])
    keep_one, discard_one, keep_two = (float(rule_.bar(b, dof)) for b in (rule_.KEEP_ONE, rule_.DISCARD_ONE,
                                                                           rule_.KEEP_TWO))
    one_run = len(cand) == 1
    bars = f"keep at >= {keep_one if one_run else keep_two:.2f}" + (f", discard at <= {discard_one:.2f}" * one_run)
    next_seed = next((s for s in SEEDS if s not in cand), None)
    action = verdict
    if status == "keep":  # kept already (by hand, with mark): it stays kept
        verdict = action = "keep"
        bars = "kept by hand"
    elif verdict == "rerun":
        action = f"rerun with seed {next_seed}: " + ("undecided" if z < keep_one else "promising, but nothing is kept "
                                                     f"on one run before sigma has {rule_.ONE_RUN_KEEP_DOF} dof "
                                                     f"({night.dof[0]:g} so far)")
    runs_mean = _mean(n["values"][best])
    shown = " seed for seed" if c.paired[0] else "" if abs(c.shown[0] - runs_mean) < 5e-7 else \
        f" estimated (its runs {runs_mean:.6f}: a kept run carries its luck)"
    head = (f"{action}: {commit} {_mean(cand):.6f} ({_plural(len(cand), 'seed')}) vs best {best} {c.shown[0]:.6f}"
            f"{shown}: {'better' if diff > 0 else 'worse' if diff < 0 else 'equal'} by {abs(diff):.6f} = "
            f"{abs(diff) / floor:.1f} noise floors, z {z:+.2f} ({bars})")
    notes = [f"{_plural(len(left_out), 'run')} left out (other step counts)"] * bool(left_out)
    notes += _speed_notes(n, commit, best)
    if verdict == "keep" and diff > IMPLAUSIBLE_FLOORS * floor:
        notes.append(f"check this: {diff / floor:.0f} noise floors is a lot for one edit")
    discards = streak(experiments(df, n)) if verdict == "discard" else 0
    if discards >= NUDGE_AFTER:
        notes.insert(0, f"{discards} discards in a row: try something structurally different")
    sd = np.sqrt(night.v[0])
    evidence = [
        f"candidate {commit}: " + ", ".join(f"seed {s} {v:.6f}" for s, v in cand.items()),
        f"best {best}: " + ", ".join(f"seed {s} {v:.6f}" for s, v in n["values"][best].items())
        + f"; estimated {night.mu[0]:.6f} (sd {sd:.6f}) from {_plural(night.experiments + 1, 'commit')}"
          " (a kept commit's runs carry its luck; every commit's runs inform the estimate)",
        f"error {c.se[0]:.6f}: " + (f"seed for seed, the best under these seeds sd {c.shown_sd[0]:.6f} and a run's "
                                   f"spread {np.sqrt(night.tau2[0]):.6f} ({night.paired_dof[0]:g} dof)" if c.paired[0]
                                   else f"sqrt(sigma {night.sigma[0]:.6f}^2 / {len(cand)} + the best's sd "
                                        f"{sd:.6f}^2), sigma on {night.dof[0]:g} dof"),
        f"noise floor {floor:.6f} (sqrt(2) * sigma); bars at {dof:g} dof: one run keep z >= {keep_one:.2f}"
        + ("" if night.dof[0] >= rule_.ONE_RUN_KEEP_DOF else f" (once sigma has {rule_.ONE_RUN_KEEP_DOF} dof)")
        + f", discard z <= {discard_one:.2f}; two runs keep z >= {keep_two:.2f}",
        *left_out,
        *(f"the machine's speed swings: {c_}'s runs made {lo}-{hi} steps" for c_, (lo, hi) in n["swings"].items())]
    return Verdict(verdict, "pending" if verdict == "rerun" else verdict, _line(head, notes + flagged),
                   seed=next_seed if verdict == "rerun" else None, evidence=evidence, best=best, diff=diff, z=z,
                   floor=floor, paired=bool(c.paired[0]))


# -----------------------------------------------------------------------------
# Confirming the night's gain


def confirmation(df):
    """The morning's check of the baseline and the best under CONFIRM_SEEDS: None when no change was kept, else what
    is still to run (todo) and, once every run is in, the gain with its 95% interval (ci), confirmed when it is above
    zero, and the held-out part's gain. The noise is the night's, seed for seed where that is the tighter test."""
    results = _results(df)
    baseline, best = (results["commit"].iloc[0] if len(results) else None), best_commit(df)
    if best is None or best == baseline:
        return None
    like = night_conditions(df)
    got, held, prints = {baseline: {}, best: {}}, {baseline: {}, best: {}}, {}
    for r in df[(df["verdict"] == "confirm") & (df["val_bpb"] > 0)].to_dict("records"):
        if r["commit"] in got and r["seed"] in CONFIRM_SEEDS and not _differs(r, like):
            got[r["commit"]].setdefault(r["seed"], []).append(r["val_bpb"])
            prints[r["commit"], r["seed"]] = r["init_fingerprint"]
            heldout = parse_receipt_field(r["receipt"]).get("heldout")
            if heldout:
                held[r["commit"]].setdefault(r["seed"], []).append(float(heldout))
    got, held = ({c: {s: float(np.mean(v)) for s, v in seeds.items()} for c, seeds in d.items()} for d in (got, held))
    todo = [(c, s) for s in CONFIRM_SEEDS for c in (baseline, best) if s not in got[c]]
    out = {"baseline": baseline, "best": best, "seeds": list(CONFIRM_SEEDS), "todo": todo,
           "done": sum(len(v) for v in got.values()), "needed": 2 * len(CONFIRM_SEEDS), "gain": None}
    night = the_night(df)["night"]
    if todo or night is None:
        return out
    k, t = len(CONFIRM_SEEDS), rule_.t_interval
    se_u, se_p = float(night.sigma[0]) * math.sqrt(2 / k), math.sqrt(2 * float(night.tau2[0]) / k)
    paired = (same_init(prints, best, baseline, CONFIRM_SEEDS) and bool(night.on[0])
              and night.paired_dof[0] >= rule_.PAIRED_MIN_DOF
              and se_p * t(0.9, night.paired_dof[0]) < se_u * t(0.9, night.dof[0]))
    se, dof = (se_p, int(night.paired_dof[0])) if paired else (se_u, int(night.dof[0]))
    half = float(t(0.95, dof)) * se
    g = _mean(got[baseline]) - _mean(got[best])
    out.update(gain=g, se=se, dof=dof, paired=bool(paired), ci=[g - half, g + half], confirmed=g - half > 0,
               floor=noise_of(night)["floor"], heldout_gain=None)
    if all(set(held[c]) == set(got[c]) for c in held):  # every run scored the held-out part too
        h = _mean(held[baseline]) - _mean(held[best])
        out.update(heldout_gain=h, heldout_ci=[h - half, h + half], heldout_holds=g <= 0 or h >= HELDOUT_SHARE * g)
    return out


def confirmation_line(conf):
    """The one line `confirm` and `record --confirm` print: what to run next, or the gain in words: whether it is one
    (its interval above zero), and whether it holds on the held-out part."""
    if conf is None:
        return "nothing to confirm: no change has been kept, so the best is the baseline"
    if conf["todo"]:
        commit, seed = conf["todo"][0]
        return (f"run {commit} with seed {seed}: confirmation {conf['done'] + 1} of {conf['needed']} (the "
                f"{'baseline' if commit == conf['baseline'] else 'best'}; baseline {conf['baseline']} and best "
                f"{conf['best']} under seeds {', '.join(map(str, conf['seeds']))}, which no decision used)")
    if conf["gain"] is None:
        return "not confirmed: no noise measured (the baseline ran under one seed)"
    (lo, hi), ok = conf["ci"], conf["confirmed"]
    text = (f"{'confirmed' if ok else 'not confirmed'}: best {conf['best']} vs baseline {conf['baseline']}: gain "
            f"{conf['gain']:+.6f}" + (f" = {conf['gain'] / conf['floor']:.1f} noise floors" if conf["floor"] else "")
            + f" (95% interval {lo:+.6f} to {hi:+.6f}; {'seed for seed' if conf['paired'] else 'unpaired'}, "
            f"{conf['dof']} dof, seeds {', '.join(map(str, conf['seeds']))})"
            + ("" if ok else ": the 95% interval includes zero or less, so the night's gain may be noise"))
    if conf["heldout_gain"] is not None:
        lo, hi = conf["heldout_ci"]
        text += f"; on the held-out part {conf['heldout_gain']:+.6f} (95% interval {lo:+.6f} to {hi:+.6f})"
        if not conf["heldout_holds"]:
            text += (f": the gain does not hold there (less than {HELDOUT_SHARE:.0%} of it): the night may have "
                     "fitted the validation set")
    return text


# -----------------------------------------------------------------------------
# Checking a run before it counts: the receipt prepare.py printed, git, the seed
#
# prepare.py's evaluate_bpb measured the number and printed a receipt of what it scored; train.py only prints it.
# What a diff of train.py touches is named, never refused: a person decides in the morning. The threat is an agent
# taking a shortcut, not a forger (docs/reliability.md).

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
            "stale": "of an old or repeated log", "baseline": "scored on other terms than the baseline",
            "again": "repeating an experiment judged already"}
# Named from the receipt: seconds from the first training batch to evaluation, past the budget, above twice the
# baseline's plus 10% of the budget (at least 10 s); or no batch from make_dataloader at all
RUN_FLAGS = {"wall": "more wall clock from first batch to evaluation than the baseline's",
             "loader": "no training batch from make_dataloader"}
# A log collected with `sky logs` (skypilot.yaml) has SkyPilot's prefix on every line of the job's output,
# "(autoresearch, pid=4242) val_bpb: ...", in color on some clusters; it is not part of what train.py printed.
SKYPILOT_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\([^()\n]*\bpid=\d+[^()\n]*\)(?:\x1b\[[0-9;]*m)* ?", re.M)


def _git(repo_dir, *args):
    return subprocess.run(["git", "-C", repo_dir, *args], capture_output=True, text=True)


def _git_lines(repo_dir, *args):
    """git's output lines in `repo_dir`, or None when git fails (no git, no repository, an unknown commit)."""
    try:
        r = _git(repo_dir, *args)
    except OSError:
        return None
    return r.stdout.splitlines() if r.returncode == 0 else None


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
    """A results.tsv receipt field as {key: string}."""
    return dict(kv.split("=", 1) for kv in (text or "").split() if "=" in kv)


def asked_seeds(before, commit, rule, confirm):
    """The seeds a verdict or the confirmation asks `commit` to run under next, from the rows `before` this run."""
    if confirm:
        conf = confirmation(before)
        return [s for c, s in (conf["todo"] if conf else []) if c == commit]
    decisions = _decisions(before)
    mine = decisions[decisions["commit"] == commit]
    if mine.empty:
        return [SEEDS[0]]  # SEED in train.py
    v = judge(decisions, commit, rule)
    last = _int_or_none(str(mine["seed"].iloc[-1]))
    return [v.seed if v.seed is not None else last] if v.verdict in ("rerun", "refused", "crash") else []


def check_run(before, summary, receipts, commit, rule="noise", confirm=False, repo=".", train_py=""):
    """Whether a run may be recorded: (refusal, flags, receipt). refusal is None or (code, the verdict line);
    flags the codes of DIFF_FLAGS and RUN_FLAGS that apply; receipt the one evaluate_bpb printed, or None.
    train_py: the blob of the commit's train.py, refused when a commit judged before ran the same file."""
    decisions = _decisions(before)
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
    same = decisions[(decisions["train_py"] == train_py) & (decisions["commit"] != commit)
                     & (decisions["verdict"] != "refused")] if train_py and not confirm else decisions.iloc[:0]
    if len(same) and not (decisions["commit"] == commit).any():
        first = same.iloc[0]
        return ("again", f"refused: train.py repeats {first['commit']} ({first['status']}: {first['description']}), "
                         "judged already: reset (git reset --hard HEAD~1) and try another idea"), [], None
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
    # the baseline's counted runs: what every run of the night is scored like, and how long they took
    like = [parse_receipt_field(f) for f in decisions.loc[(decisions["commit"] == base)
                                                          & (decisions["verdict"] != "refused"), "receipt"] if f]
    differ = sorted({RECEIPT_KEYS[k] for k in RECEIPT_KEYS if like and like[0].get(k) != this.get(k)})
    if confirm:
        hsums = {f["hsum"] for line, f in rows if "hsum" in f}
        differ += ["the held-out part"] * bool(hsums and this.get("hsum") not in hsums)
    if differ:
        return ("baseline", f"refused: evaluate_bpb scored this run on other terms than the baseline {base}'s: "
                            f"{', '.join(differ)} differ; only {EDITABLE} changes, never what is scored: undo "
                            f"that, then {again}"), [], r
    return None, [] if confirm or commit == base else flags_of(decisions, commit, r, like, repo), r


def flags_of(decisions, commit, receipt, base_receipts, repo):
    """The DIFF_FLAGS that the diff of train.py against the best it is compared with touches, and the RUN_FLAGS."""
    best = best_commit(decisions, commit) or decisions["commit"].iloc[0]
    diff = _git_lines(repo, "diff", "-U0", best, commit, "--", EDITABLE) or []
    changed = "\n".join(re.sub(r"#.*", "", line[1:]) for line in diff  # comments left out: a word there runs nothing
                        if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    flags = [k for k, (pattern, _) in DIFF_FLAGS.items() if re.search(pattern, changed)]
    base_excess = [float(f["wall"]) - float(f.get("budget", 0)) for f in base_receipts if "wall" in f]
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


def row_flags(rows):
    """The flag codes of a commit's rows (a DataFrame or row dicts) that were not refused, each once, in order."""
    rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
    codes = ",".join(r["flags"] or "" for r in rows if r["verdict"] != "refused").split(",")
    return list(dict.fromkeys(c for c in codes if c))


# -----------------------------------------------------------------------------
# Recording a run: run.log -> one row, appended under a lock


def parse_log(text):
    """The summary block after the last `---` line of a train.py log, as {key: string}; {} if there is none. The seed
    is also read from the start-up line, so a crashed run still records it."""
    text = SKYPILOT_PREFIX.sub("", text)
    summary = {}
    head, sep, tail = text.rpartition("\n---\n")
    if sep or text.startswith("---\n"):
        for line in (tail if sep else text[4:]).splitlines():
            m = re.match(r"^([a-z_]+):\s+(\S.*?)\s*$", line)
            if m:
                summary[m.group(1)] = m.group(2)
    if "val_bpb" in summary and _finite(summary["val_bpb"]) is None:
        summary.pop("val_bpb")
    m = re.search(r"\| seed: (-?\d+) \|", text)
    if "seed" not in summary and m:
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
               description=description, verdict="", rule="", flags="", receipt="", train_py="",
               **{k: summary.get(k, "") for k in FROM_SUMMARY})
    return [row[k] for k in HEADER]


@contextmanager
def locked(path):
    """An exclusive lock on `path`.lock: runs that finish at the same moment (several GPUs) append one at a time."""
    with open(f"{path}.lock", "a") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class RecordError(Exception):
    """A run that cannot be recorded as asked; nothing was written."""


def record(tsv, summary, commit, description=None, rule="noise", confirm=False, receipts=None, repo=None):
    """Appends the run's row to `tsv`, judges its commit and writes the status into all its rows. Returns (the new
    row's fields, the verdict). A confirmation run changes no status. With `receipts` the run is checked first
    (check_run); without them (simulations, tests of the rule) the summary is trusted. The file is rewritten whole
    and renamed into place under the lock: no reader sees half a row, no writer loses one."""
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
        blob = (_git_lines(repo or ".", "rev-parse", f"{commit}:{EDITABLE}") or [""])[0][:12] if receipts is not None \
            else ""
        row = dict(zip(HEADER, make_row(summary, commit, description)), rule=rule, train_py=blob)
        conf = confirmation(before) if confirm else None
        if confirm and (conf is None or commit not in (conf["baseline"], conf["best"])):
            raise RecordError(f"commit {commit} is not one to confirm; `uv run analysis.py confirm` names the "
                              "commit and seed to run")
        refusal, flags, receipt = (None, [], None) if receipts is None else \
            check_run(before, summary, receipts, commit, rule, confirm, repo or ".", blob)
        row.update(flags=",".join(flags), receipt=receipt_field(receipt) if receipt else "")
        if refusal:
            mine = _results(before[before["commit"] == commit])
            if row["status"] != "crash":
                row["status"] = mine["status"].iloc[-1] if len(mine) else "discard"
            row.update(verdict="refused", flags=f"refused:{refusal[0]}")
            lines.append("\t".join(row[k] for k in HEADER))
            verdict = Verdict("refused", row["status"], refusal[1])
        elif confirm:
            if row["status"] != "crash":  # a confirmation run takes its commit's status; it never sets one
                row["status"] = before.loc[before["commit"] == commit, "status"].iloc[-1]
            row["verdict"] = "confirm"
            lines.append("\t".join(row[k] for k in HEADER))
            conf = confirmation(parse_results("\n".join(lines))[0])
            verdict = Verdict("confirm", row["status"], confirmation_line(conf))
        else:
            lines.append("\t".join(row[k] for k in HEADER))
            df, _ = parse_results("\n".join(lines))
            verdict = judge(df, commit, rule)
            _set_status(lines, df, commit, verdict.status)
            if row["status"] != "crash":
                row["status"] = verdict.status
            row["verdict"] = verdict.verdict
            lines[-1] = "\t".join(row[k] for k in HEADER)
        _replace(tsv, lines)
    return [row[k] for k in HEADER], verdict


def _with_header(lines):
    """`lines` of a results.tsv with this version's header: added to a new file, in place of an older one."""
    if not lines or _is_header(lines[0].strip().lower().split("\t")):
        lines[:1] = ["\t".join(HEADER)]
    return lines


def mark(tsv, commit, status):
    """Sets `commit`'s status by hand (the simplicity criterion); its rule becomes `hand`, which the report shows."""
    with locked(tsv):
        with open(tsv, encoding="utf-8", errors="replace") as f:
            lines = _with_header(f.read().lstrip("\ufeff").splitlines())  # an older file gains the rule column
        _set_status(lines, parse_results("\n".join(lines))[0], commit, status, rule="hand")
        _replace(tsv, lines)


def _set_status(lines, df, commit, status, rule=None):
    """Writes `status` (and `rule`) into `commit`'s result rows of `lines` (df parsed from them); crashes stay."""
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
# The report: the night in a page, for the person in the morning and for an agent choosing its next idea


def experiments(df, night=None):
    """One row per commit in order of first appearance (confirmation runs left out), the baseline number 0; its
    val_bpb is the mean over its seeds of the runs the judge counts; steps (median) and tokens_M (mean, millions)
    what a run of it spent; floors its gain over the best before it, as its verdict measured it."""
    n = night or the_night(df) or {"left_out": {}, "seen": {}}
    commits = {}
    for r in _decisions(df).to_dict("records"):
        commits.setdefault(r["commit"], []).append(r)
    rows = []
    for i, (commit, g) in enumerate(commits.items()):
        runs = [r for r in g if r["val_bpb"] > 0 and r["verdict"] != "refused" and r["line"] not in n["left_out"]]
        per_seed = {}
        for r in runs:
            per_seed.setdefault(r["seed"] if r["seed"] is not None else f"line {r['line']}", []).append(r["val_bpb"])
        memory = [r["memory_gb"] for r in g if not math.isnan(r["memory_gb"])]
        steps = [r["num_steps"] for r in runs if r["num_steps"] is not None]
        tokens = [int(f["train_tokens"]) / 1e6 for f in map(parse_receipt_field, (r["receipt"] for r in runs))
                  if "train_tokens" in f]
        night, c = n["seen"].get(commit, (None, None))
        rows.append({"experiment": i, "commit": commit, "status": (runs or g)[-1]["status"],
                     "val_bpb": float(np.mean([np.mean(v) for v in per_seed.values()])) if runs else 0.0,
                     "memory_gb": max(memory) if memory else float("nan"), "runs": len(runs),
                     "seeds": [int(r["seed"]) for r in runs if r["seed"] is not None],
                     "description": g[0]["description"], "steps": statistics.median(steps) if steps else None,
                     "tokens_M": sum(tokens) / len(tokens) if tokens else None,
                     "rule": runs[-1]["rule"] if runs else "",
                     "flags": row_flags(g), "refused": sum(r["verdict"] == "refused" for r in g),
                     "gain": float(c.diff[0]) if c is not None else None,
                     "floors": float(c.diff[0] / night.floor[0]) if c is not None else None})
    return pd.DataFrame(rows, columns=["experiment", "commit", "status", "val_bpb", "memory_gb", "runs", "seeds",
                                       "description", "steps", "tokens_M", "rule", "flags", "refused", "gain",
                                       "floors"])


def streak(exps):
    """How many experiments (of experiments()) in a row, up to the last, were discarded or crashed since the last keep
    (an experiment whose every run was refused was not judged, and counts for nothing)."""
    n = 0
    for r in exps.itertuples():
        n = 0 if r.status == "keep" else n + (r.status in ("discard", "crash") and (r.runs > 0 or r.refused == 0))
    return n


def _num(x):
    """float for JSON: NaN and missing become None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def summarize(df):
    """The report's numbers as a JSON-friendly dict; the noise and every gain in noise floors are the verdicts' own."""
    n = the_night(df) or {"left_out": {}, "seen": {}, "night": None, "noise": noise_of(None), "swings": {},
                          "like": {k: None for k in MATCHED}}
    exps = experiments(df, n)
    counts = {s: int((exps["status"] == s).sum()) for s in STATUSES}
    counts["other"] = len(exps) - sum(counts.values())  # unknown statuses (warned about when loading)
    results = exps[exps["val_bpb"] > 0]
    floor = n["noise"]["floor"]
    baseline = float(results["val_bpb"].iloc[0]) if len(results) else None  # leading crashes have no result
    best = best_commit(df)
    best_row = results[results["commit"] == best].iloc[0] if best is not None else None
    claimed = round(baseline - best_row["val_bpb"], 6) if best_row is not None else None  # no float noise
    rows = exps.to_dict("records")
    for r in rows:
        r.update({k: _num(r[k]) for k in ("memory_gb", "steps", "tokens_M", "gain", "floors")},
                 val_bpb=round(r["val_bpb"], 6))
    kept = [r for r in rows if r["status"] == "keep" and r["val_bpb"] > 0]
    for before, k in zip(kept, kept[1:]):  # not judged by the noise rule (the plain rule, the reference's files):
        if k["gain"] is None:              # the gain over the kept one before it
            k["gain"] = round(before["val_bpb"] - k["val_bpb"], 6)
    conf = confirmation(df)
    if conf is not None:
        bpb = results.set_index("commit")["val_bpb"]
        conf = dict(conf, todo=[list(t) for t in conf["todo"]],
                    claimed=round(float(bpb[conf["baseline"]] - bpb[conf["best"]]), 6))
    night = n["night"] if best is not None else None
    return {
        "n_experiments": len(exps), "n_runs": int((df["verdict"] != "confirm").sum()),
        "n_confirmation_runs": int((df["verdict"] == "confirm").sum()), "counts": counts,
        "keep_rate": counts["keep"] / len(exps) if len(exps) else None,
        "noise": dict(n["noise"], **n["like"]), "speed_swings": {c: list(v) for c, v in n["swings"].items()},
        "baseline_val_bpb": baseline, "best_commit": best,
        "best_val_bpb": float(best_row["val_bpb"]) if best_row is not None else None,  # the mean of its runs
        "best_estimate": float(night.mu[0]) if night is not None else None,
        "best_estimate_sd": float(np.sqrt(night.v[0])) if night is not None else None,
        "best_description": best_row["description"] if best_row is not None else None,
        "improvement_abs": claimed,
        "improvement_pct": round(100 * claimed / baseline, 4) if claimed is not None else None,
        "improvement_floors": round(claimed / floor, 2) if claimed is not None and floor else None,
        "streak": streak(exps), "kept": kept, "experiments": rows, "confirmation": conf,
        "refused": {code: int(c) for code, c in df.loc[df["verdict"] == "refused", "flags"]
                    .str.removeprefix("refused:").value_counts().items()},
        "by_hand": [r["commit"] for r in rows if r["rule"] == "hand"],
    }


def format_report(s):
    """The summary in at most REPORT_LINES lines: the counts, the noise, the best and its confirmation; the kept
    stack with what each cost and what it was flagged for; the near misses (discarded, better than the best then by
    less than a floor: candidates to combine); the latest experiments, and every earlier one by its description."""
    c, nz, n = s["counts"], s["noise"], s["n_experiments"]

    def floors(r):
        return "" if r["floors"] is None else f"{r['floors']:+.1f}" + "~" * (0 < r["floors"] < 1 and r["status"]
                                                                          == "keep")

    def row(r):
        status = "refused" if r["refused"] and not r["runs"] else r["status"]
        return f"  {status:<8} {floors(r):>6}  {r['commit']}  {r['description']}"

    lines = [f"{n} experiments ({s['n_runs']} runs): {c['keep']} keep, {c['discard']} discard, {c['crash']} crash"
             + (f", {c['pending']} pending a rerun" if c["pending"] else "")
             + (f", {c['other']} unknown status" if c["other"] else "")
             + (f" (keep rate {100 * s['keep_rate']:.1f}%)" if n else "")]
    if nz["floor"] is not None:
        spread = f"; a run's spread seed for seed {nz['spread']:.6f}, {nz['spread_dof']} dof" if nz["spread"] else ""
        lines.append(f"noise floor:      {nz['floor']:.6f} (sqrt(2) * sigma {nz['sigma']:.6f}, {nz['dof']} dof"
                     f"{spread}; {_describe(nz)})")
    elif n:
        lines.append("noise floor:      none yet (the baseline has run under fewer than two seeds)")
    if s["speed_swings"]:
        lo, hi = min(a for a, _ in s["speed_swings"].values()), max(b for _, b in s["speed_swings"].values())
        lines.append(f"speed:            the machine's speed swings ({lo}-{hi} steps a run; the runs of "
                     f"{', '.join(s['speed_swings'])} disagree): that noise is counted, but comparisons between runs "
                     "at different step counts measure the machine too; run on an otherwise idle machine")
    if s["baseline_val_bpb"] is not None:
        lines.append(f"baseline val_bpb: {s['baseline_val_bpb']:.6f}")
    if s["best_val_bpb"] is not None:
        est = f"; estimated {s['best_estimate']:.6f}, sd {s['best_estimate_sd']:.6f}" if s["best_estimate"] else ""
        lines += [f"best val_bpb:     {s['best_val_bpb']:.6f} (mean of its runs{est}; {s['best_commit']}: "
                  f"{s['best_description']})",
                  f"improvement:      {s['improvement_abs']:.6f} ({s['improvement_pct']:.2f}%"
                  + (f", {s['improvement_floors']:.1f} noise floors" if s["improvement_floors"] is not None else "")
                  + "), as claimed by the decision runs"]
    conf = s["confirmation"]
    if conf is not None:
        lines.append("confirmation:     " + (f"{confirmation_line(conf)}; claimed {conf['claimed']:.6f}" if conf["gain"]
                                             is not None else f"not yet ({conf['done']} of {conf['needed']} runs; "
                                             "`uv run analysis.py confirm` says what to run)"))
    if s["refused"]:
        lines.append(f"refused runs:     {sum(s['refused'].values())} (" + ", ".join(
            f"{c} {REFUSALS.get(code, code)}" for code, c in s["refused"].items()) + "), not counted")
    if s["by_hand"]:
        lines.append(f"set by hand:      {', '.join(s['by_hand'])} (status set with `mark`, not by the rule)")
    if n:
        lines.append(f"in a row:         {s['streak']} discarded since the last keep"
                     + ("; try something structurally different" if s["streak"] >= NUDGE_AFTER else ""))
    kept = []
    for k in s["kept"]:
        notes = [k["rule"] == "plain" and "plain rule", k["rule"] == "hand" and "by hand", flag_text(k["flags"]),
                 (k["floors"] or 0) > IMPLAUSIBLE_FLOORS and f"check this: {k['floors']:.0f} floors from one edit"]
        notes = "; ".join(x for x in notes if x)
        steps = "-" if k["steps"] is None else f"{k['steps']:.0f}"
        kept.append(f"  {k['experiment']:>3}  {k['commit']:<8} {k['val_bpb']:.6f} {k['runs']:>4} {floors(k):>6} "
                    f"{steps:>5}  {k['description']}" + (f"  [{notes}]" if notes else ""))
    if kept:
        lines += ["", "kept (floors: its gain as judged, ~ within the noise; steps: a run's):",
                  f"  {'#':>3}  {'commit':<8} {'val_bpb':<8} {'runs':>4} {'floors':>6} {'steps':>5}  description"]
        lines += kept if len(kept) <= 20 else [f"  ... {len(kept) - 19} earlier keeps"] + kept[-19:]
    near = sorted((r for r in s["experiments"] if r["status"] == "discard" and r["floors"] and 0 < r["floors"] < 1),
                  key=lambda r: -r["floors"])[:8]
    if near:
        lines += ["", "near misses (discarded, better by less than a floor: combine them?):"]
        lines += map(row, near)
    recent = s["experiments"][-10:]
    if recent:
        lines += ["", f"the last {len(recent)} (gain in noise floors):"] + list(map(row, recent))
    earlier = [r["description"] for r in s["experiments"][:-len(recent) or None] if r["status"] != "keep"]
    if earlier:
        lines += ["", "tried before those, not kept:"]
        line = " "
        for d in earlier:
            if len(line) + len(d) > 117:
                lines.append(line)
                line = " "
            line += f" {d} ·"
        lines.append(line)
    if len(lines) > REPORT_LINES:
        lines = lines[:REPORT_LINES - 1] + ["  ... (the rest: results.tsv)"]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Progress plot


def plot_progress(df, path):
    """Draws val_bpb per experiment to `path` (PNG): every run a point, kept means labelled, the best a step line
    in a band of the noise floor. Returns the path, or None when there is nothing to plot."""
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

    lo, hi = results["val_bpb"].min(), results["val_bpb"].max()
    if len(kept):
        lo, hi = min(kept["val_bpb"]), summary["baseline_val_bpb"]
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
        x = list(kept["experiment"]) + [exps["experiment"].iloc[-1]]  # carry the best on to the last experiment
        y = list(kept["val_bpb"]) + [kept["val_bpb"].iloc[-1]]
        ax.step(x, y, where="post", c="#2ca02c", alpha=0.7, lw=1.5,
                label=f"the best (the last kept: {summary['best_commit']})", zorder=3)
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


# -----------------------------------------------------------------------------
# Where the loop stands, for an agent that lost its context (only reads)


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def status(df, repo=".", log="run.log"):
    """Where the loop stands, from git, results.tsv and run.log alone: a few lines, the last `next: <command>`."""
    branch = (_git_lines(repo, "branch", "--show-current") or [""])[0]
    head = _git_head(repo)
    dirty = _git_lines(repo, "status", "--porcelain", "--untracked-files=no") or []
    best, exps = best_commit(df), experiments(df)
    mine = _decisions(df)[_decisions(df)["commit"] == head]
    lines = [f"branch {branch or '(detached HEAD)'} at {head}; best {best or '-'}; {len(exps)} experiments, "
             f"{int((exps['status'] == 'keep').sum())} kept, {streak(exps)} discarded in a row since the last keep"]
    receipts = parse_receipts(_read(log))
    unrecorded = bool(receipts) and str(receipts[-1].get("commit") or "").startswith(head or "-") and \
        receipts[-1].get("run") not in {parse_receipt_field(f).get("run") for f in df["receipt"]}
    conf = confirmation(df)
    if not branch and conf is not None and head in (conf["baseline"], conf["best"]):
        if unrecorded:
            return lines + [f"confirming: {log} holds a confirmation run of {head}, not recorded yet",
                            "next: uv run analysis.py record --confirm"]
        if conf["todo"]:
            commit, seed = conf["todo"][0]
            return lines + [f"confirming: {confirmation_line(conf)}",
                            f"next: git checkout --quiet --detach {commit} && AUTORESEARCH_SEED={seed} timeout 600 "
                            "uv run train.py > run.log 2>&1 && uv run analysis.py record --confirm"]
        return lines + [confirmation_line(conf), "next: git checkout " + (_git_lines(
            repo, "branch", "--list", "--format=%(refname:short)", "autoresearch/*") or ["autoresearch/<tag>"])[0]
            + " (then tell the human the line above)"]
    if dirty:
        return lines + [f"uncommitted changes to {', '.join(d[3:] for d in dirty)}: commit the edit, or undo it "
                        "(git checkout -- train.py)", "next: git add train.py && git commit -m \"<description>\""]
    if unrecorded:
        return lines + [f"{log} holds a finished run of {head}, not recorded yet",
                        "next: uv run analysis.py record --description \"<description>\""]
    if mine.empty:
        what = "the baseline" if df.empty else f"{head}, committed"
        return lines + [f"{what}: not run yet", "next: timeout 600 uv run train.py > run.log 2>&1"]
    last, v = mine.iloc[-1], judge(df, head)
    if last["verdict"] == "refused" and last["flags"] == "refused:again":
        return lines + [f"{head} repeats an experiment judged already", "next: git reset --hard HEAD~1"]
    if last["verdict"] == "refused":
        return lines + [f"{head}: its last run was refused ({last['flags'].removeprefix('refused:')}; `uv run "
                        "analysis.py judge` says why): fix the cause first",
                        f"next: AUTORESEARCH_SEED={last['seed'] or 42} timeout 600 uv run train.py > run.log 2>&1"]
    if v.verdict == "rerun":
        return lines + [f"{head} is pending: {v.line[:v.line.index(':')]}",
                        f"next: AUTORESEARCH_SEED={v.seed} timeout 600 uv run train.py > run.log 2>&1"]
    if head != best:
        return lines + [f"{head}: {v.status}, not reset yet", "next: git reset --hard HEAD~1"]
    return lines + [f"{head} is the best; `uv run analysis.py` lists what was tried",
                    "next: a new idea (program.md, the loop, step 2)"]


# -----------------------------------------------------------------------------
# Command line


def keep_ref(repo, commit):
    """Keeps `commit` reachable after `git reset` as refs/autoresearch/<tag>/<commit> (the tag of the branch
    autoresearch/<tag> it is recorded on, or of the only such branch from a detached slot); nothing is pushed."""
    branches = [b for b in [(_git_lines(repo, "branch", "--show-current") or [""])[0]] if b.startswith("autoresearch/")]
    branches = branches or _git_lines(repo, "branch", "--list", "--format=%(refname:short)", "autoresearch/*") or []
    full = _git_lines(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if len(branches) == 1 and full:
        _git(repo, "update-ref", f"refs/autoresearch/{branches[0].removeprefix('autoresearch/')}/{commit}", full[0])


def _git_head(cwd="."):
    """The short hash of HEAD; None outside a repository; FileNotFoundError when git is not on PATH."""
    r = subprocess.run(["git", "-C", cwd, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _error(message):
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(description="Record, judge and report autoresearch runs (results.tsv).")
    parser.add_argument("command", nargs="?", default="report",
                        choices=("report", "record", "judge", "confirm", "mark", "status"),
                        help="report (default): the night in a page; record a run from its log; judge the latest "
                             "commit again, with the evidence; confirm: the next confirmation run, or the confirmed "
                             "gain; mark the latest commit keep or discard by hand (the simplicity criterion); "
                             "status: where the loop stands and the next command")
    parser.add_argument("--tsv", default="results.tsv", help="path to results.tsv (default: results.tsv)")
    parser.add_argument("--json", action="store_true", help="report: print the summary and warnings as JSON")
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
        keep_ref(".", commit)
        print(verdict.line)
        return 0

    try:
        df, warnings = load_results(args.tsv)
    except OSError as e:
        return _error(f"{e}" if str(args.tsv) in str(e) else f"{args.tsv}: {e}")
    if args.command == "judge":
        verdict = judge(df, args.commit, args.rule)
        print("\n".join([verdict.line] + [f"  {e}" for e in verdict.evidence]))
        return 0
    if args.command == "confirm":
        print(confirmation_line(confirmation(df)))
        return 0
    if args.command == "status":
        print("\n".join(status(df, log=args.log)))
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
    if args.json:
        print(json.dumps(dict(summary, tsv=args.tsv, warnings=warnings), indent=2))
    else:
        print(f"{args.tsv}: " + format_report(summary))
        for line in [f"\n{len(warnings)} warnings:"] * bool(warnings) + [f"  {w}" for w in warnings]:
            print(line)
    if args.plot:
        try:
            written = plot_progress(df, args.plot)
        except OSError as e:
            return _error(f"cannot write {args.plot}: {e}")
        print(f"wrote {args.plot}" if written else f"no results to plot yet; {args.plot} not written",
              file=sys.stderr if args.json else sys.stdout)  # keep stdout pure JSON
    return 0


if __name__ == "__main__":
    sys.exit(main())
