"""
Reads results.tsv (one row per training run, written by `record`) and judges and reports the experiments.

Usage:
    uv run analysis.py record --description "<what changed>"   # after a run: append its row from run.log, print the verdict
    uv run analysis.py judge                                   # the verdict for the latest commit again, writing nothing
    uv run analysis.py [--json] [--plot progress.png]          # the report: counts, noise floor, kept changes, best

The verdict is one line that starts with what to do: `keep`, `discard`, `rerun with seed N`, `crash` or
`refused` (runs that cannot be compared). The rules (program.md, "Judging a result"):

- The baseline runs under every seed in SEEDS, then once more under the first seed. The spread across seeds is
  the noise: sigma, the standard deviation of one run, pooled over every commit that has run under two or more
  seeds. The noise floor is sqrt(2) * sigma: how far changing only the seed moves val_bpb (the standard deviation
  of the difference of two runs). The repeat under the first seed gives the same-seed floor the same way.
- A candidate is compared with the best kept commit, each represented by the mean over its seeds, as
  z = (best mean - candidate mean) / standard error, with error sigma * sqrt(1/n_candidate + 1/n_best).
  When the candidate starts from the same initial weights as the best under the same seeds (equal
  init_fingerprint: most hyperparameter edits), the two are compared seed for seed, and the error is the spread
  of such seed-for-seed differences measured earlier in the same results.tsv (never below the same-seed floor).
  It is not assumed to be the same-seed floor: on the small CPU config one learning-rate edit moved val_bpb by
  -0.026, +0.011 and +0.008 under seeds 42, 43 and 44 from the same weights. Until two degrees of freedom of it
  are measured, a same-init comparison is judged like any other.
- z >= 3 after any run keeps (a clear winner); z <= 0 discards (not even better); in between, rerun under the
  next seed; once every seed has run, z >= 2 keeps, anything less discards. A kept commit is then completed
  under the remaining seeds, so that the next candidate is compared with a mean, not with a lucky single run.
- Runs with a different device or attention backend than the best are refused, never compared.
- AUTORESEARCH_RULE=plain (or --rule plain) is the reference's rule: one run, keep if strictly lower than the
  best kept val_bpb.

Reading is forgiving: messy input (mixed-case status, stray spaces, rows with the wrong number of fields, a
non-numeric val_bpb) gives a warning per bad line instead of a traceback, and the reference's five-column files
load as they are. analysis.ipynb imports the functions below; the logic lives here once. The integrity check
runs git in the directory holding the tsv: no kept commit may change prepare.py or pyproject.toml.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pandas as pd

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]  # the reference's five, first and in order
CONDITIONS = ["seed", "num_steps", "attention", "device", "init_fingerprint", "verdict"]  # what a comparison needs
HEADER = COLUMNS + CONDITIONS
STATUSES = ("keep", "discard", "crash")
FIXED_FILES = ("prepare.py", "pyproject.toml")  # the agent may change train.py only; these two matter most

SEEDS = (42, 43, 44)   # every commit runs under these, in this order (train.py's SEED first)
CLEAR_WIN = 3.0        # z that keeps after a single run
WIN = 2.0              # z that keeps once every seed has run
PAIRED_MIN_DOF = 2     # seed-for-seed differences measured before they are trusted
RULES = ("noise", "plain")

# -----------------------------------------------------------------------------
# Loading


def _int_or_none(text):
    return int(text) if re.fullmatch(r"-?\d+", text or "") else None


def load_results(path):
    """Reads a results.tsv. Returns (DataFrame with HEADER plus `line`, list of warning strings).

    Bad rows are skipped with a warning naming their line number; raises FileNotFoundError for a missing
    file. val_bpb is 0.0 for a crash; memory_gb is NaN where it is missing or not a number. Five-column files
    (the reference's) load with the condition columns empty: seed and num_steps None, the rest "".
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
    width = None  # fields per row: 5, or more with the condition columns
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
        seed, steps, attention, device, fingerprint, verdict = fields[5:11]
        rows.append({"commit": commit, "val_bpb": val_bpb, "memory_gb": memory_gb, "status": status,
                     "description": description, "seed": _int_or_none(seed), "num_steps": _int_or_none(steps),
                     "attention": attention, "device": device, "init_fingerprint": fingerprint,
                     "verdict": verdict.lower(), "line": lineno})
    df = pd.DataFrame(rows, columns=HEADER + ["line"])
    df = df.astype({"commit": str, "val_bpb": float, "memory_gb": float, "status": str, "description": str,
                    "seed": object, "num_steps": object, "attention": str, "device": str, "init_fingerprint": str,
                    "verdict": str, "line": int})
    return df, warnings


# -----------------------------------------------------------------------------
# Judging: the noise floor and the verdict for one commit


def _results(df):
    """Runs with a result that were not refused (a refused run's conditions differ from what it was compared with)."""
    return df[(df["val_bpb"] > 0) & (df["verdict"] != "refused")]


def _comparable(df, like):
    """Rows whose device and attention match `like` ((device, attention)); an empty field (old rows) matches all."""
    if like is None:
        return df
    device, attention = like
    ok = pd.Series(True, index=df.index)
    if device:
        ok &= df["device"].isin([device, ""])
    if attention:
        ok &= df["attention"].isin([attention, ""])
    return df[ok]


def _conditions(row):
    return row["device"], row["attention"]


def _describe(like):
    device, attention = like
    return f"attention {attention or '?'} on {device or '?'}"


def noise_floor(df, like=None, exclude=None):
    """The noise measured in results.tsv, over the runs whose conditions match `like`. Floors are standard
    deviations of the difference between two runs; None where nothing was measured yet.

    floor: two runs of one commit under different seeds (sqrt(2) * sigma, sigma pooled over every commit with
    results under two or more seeds, its first run under each); floor_same: two runs under one seed; floor_paired:
    a seed-for-seed difference between two commits that share the initial weights (each commit against the best
    it was compared with, over two or more common seeds, `exclude` left out)."""
    results = _results(df)
    best_before, last_keep = {}, None  # the best each commit was compared with: the last kept before its first run
    for commit, status in zip(results["commit"], results["status"]):
        best_before.setdefault(commit, last_keep)
        last_keep = commit if status == "keep" else last_keep
    runs = _comparable(results, like)
    values, init = {}, {}  # commit -> seed -> [val_bpb]; (commit, seed) -> init_fingerprint
    for commit, v, seed, fingerprint in zip(runs["commit"], runs["val_bpb"], runs["seed"], runs["init_fingerprint"]):
        if seed is not None:
            values.setdefault(commit, {}).setdefault(seed, []).append(v)
            init.setdefault((commit, seed), fingerprint)
    ss = dof = ss_same = dof_same = ss_pair = dof_pair = 0.0
    for commit, per_seed in values.items():
        if len(per_seed) >= 2:
            firsts = [v[0] for v in per_seed.values()]
            ss += sum((x - sum(firsts) / len(firsts)) ** 2 for x in firsts)
            dof += len(firsts) - 1
        for v in per_seed.values():
            ss_same += sum((x - sum(v) / len(v)) ** 2 for x in v)
            dof_same += len(v) - 1
        best = best_before.get(commit)
        if commit != exclude and best in values and len(per_seed) >= 2 and all(
                init[commit, s] and init.get((best, s)) == init[commit, s] for s in per_seed):
            d = [sum(v) / len(v) - sum(values[best][s]) / len(values[best][s]) for s, v in per_seed.items()]
            ss_pair += sum((x - sum(d) / len(d)) ** 2 for x in d)
            dof_pair += len(d) - 1
    sigma = math.sqrt(ss / dof) if dof else None
    sigma_same = math.sqrt(ss_same / dof_same) if dof_same else None
    pair = math.sqrt(ss_pair / dof_pair) if dof_pair else None
    return {"floor": sigma * math.sqrt(2) if sigma is not None else None, "sigma": sigma, "dof": int(dof),
            "floor_same": sigma_same * math.sqrt(2) if sigma_same is not None else None, "dof_same": int(dof_same),
            "floor_paired": pair, "dof_paired": int(dof_pair)}


def _paired_differences(cand, best):
    """Per-seed val_bpb differences (candidate - best) when every candidate run has a best run with its seed and
    initial weights, else None."""
    if not len(cand) or not len(best) or (cand["init_fingerprint"] == "").any() or cand["seed"].isna().any():
        return None
    if not all(((best["seed"] == r.seed) & (best["init_fingerprint"] == r.init_fingerprint)).any()
               for r in cand.itertuples()):
        return None
    c, b = seed_means(cand), seed_means(best)
    return pd.Series([c[k] - b[k] for k in c.index], index=c.index)


def paired_floor(noise):
    """The floor of a seed-for-seed comparison, or None while too little of it has been measured."""
    if noise["floor_paired"] is None or noise["dof_paired"] < PAIRED_MIN_DOF:
        return None
    return max(noise["floor_paired"], noise["floor_same"] or 0.0)


def _runs(runs, means):
    return f"{len(means)} seed{'s' * (len(means) > 1)}" + (f", {len(runs)} runs" if len(runs) > len(means) else "")


def _verdict(verdict, status, line, seed=None, **numbers):
    return dict(numbers, verdict=verdict, status=status, seed=seed, line=line)


def _best_commit(df, commit):
    """The best kept commit to compare `commit` with: the last one marked keep in the file, `commit` excluded."""
    kept = _results(df)
    kept = kept[(kept["status"] == "keep") & (kept["commit"] != commit)]
    return kept["commit"].iloc[-1] if len(kept) else None


def seed_means(runs):
    """val_bpb per seed (repeats under one seed averaged; a run without a seed counts as its own seed)."""
    keys = [s if s is not None else f"row {i}" for i, s in zip(runs.index, runs["seed"])]
    return runs["val_bpb"].groupby(keys, sort=False).mean()


def compare(cand, best, noise):
    """(z, difference of means, standard error, paired) for a candidate's runs against the best's. Each side is
    the mean over its seeds; seed for seed when they share the initial weights and that noise is measured."""
    d, pair = _paired_differences(cand, best), paired_floor(noise)
    if d is not None and pair is not None:
        diff, se, paired = d.mean(), pair / math.sqrt(len(d)), True
    else:
        c, b = seed_means(cand), seed_means(best)
        diff, se, paired = c.mean() - b.mean(), noise["sigma"] * math.sqrt(1 / len(c) + 1 / len(b)), False
    z = -diff / se if se > 0 else math.copysign(math.inf, -diff) if diff else 0.0
    return z, diff, se, paired


def judge(df, commit=None, rule="noise", seeds=SEEDS):
    """The verdict for `commit` (default: the commit of the last row) from everything in results.tsv.

    Returns a dict: verdict (keep, discard, rerun, crash or refused), status (what the commit's rows say in
    results.tsv: keep, discard or crash), seed (the seed to rerun with, or None), line (one line for the agent,
    starting with what to do), and the numbers behind it."""
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

    if commit == df["commit"].iloc[0]:  # the baseline: every seed, then the first seed again
        like = _conditions(valid.iloc[0])
        if not len(_comparable(valid.iloc[[-1]], like)):
            return _verdict("refused", "keep", f"refused: this baseline run used {_describe(_conditions(last))}, its "
                                               f"first run {_describe(like)}; fix that and rerun with seed {seed}",
                            seed=seed)
        runs = _comparable(_results(mine), like)
        plan = list(seeds) + [seeds[0]]
        if rule == "noise" and len(runs) < len(plan):
            return _verdict("rerun", "keep", f"rerun with seed {plan[len(runs)]}: baseline {len(runs)} of "
                                             f"{len(plan)} runs (seeds {', '.join(map(str, plan))}) to measure the noise",
                            seed=plan[len(runs)])
        nz = noise_floor(df, like)
        floors = "" if nz["floor"] is None else f", noise floor {nz['floor']:.6f} (seed to seed)" + (
            f", same-seed floor {nz['floor_same']:.6f}" if nz["floor_same"] is not None else "")
        return _verdict("keep", "keep", f"keep: baseline {commit} {seed_means(runs).mean():.6f} "
                                        f"({_runs(runs, seed_means(runs))}){floors}", **nz)

    best_commit = _best_commit(df, commit)
    if best_commit is None:
        return _verdict("refused", "discard", "refused: no kept result to compare with (the baseline has not run)")
    best = _results(df[df["commit"] == best_commit])
    like = _conditions(best.iloc[-1])
    if not len(_comparable(mine.iloc[[-1]], like)):
        return _verdict("refused", status, f"refused: this run used {_describe(_conditions(last))}, the best "
                                           f"{best_commit} {_describe(like)}; not comparable: fix that and rerun "
                                           f"with seed {seed}", seed=seed)
    cand = _comparable(_results(mine), like)
    if rule == "plain":  # the reference: one run, strictly lower than the best kept val_bpb so far
        kept = _results(df)
        best_bpb = kept.loc[(kept["status"] == "keep") & (kept["commit"] != commit), "val_bpb"].min()
        v = cand["val_bpb"].iloc[0]
        verdict = "keep" if v < best_bpb else "discard"
        return _verdict(verdict, verdict, f"{verdict}: {commit} {v:.6f} vs best kept {best_bpb:.6f} "
                                          f"({v - best_bpb:+.6f}; plain rule: keep only if strictly lower)")

    nz = noise_floor(df, like, exclude=commit)
    if nz["sigma"] is None:
        return _verdict("refused", status, f"refused: no noise floor yet; rerun the baseline {df['commit'].iloc[0]} "
                                           f"under seeds {', '.join(map(str, seeds))} first")
    z, diff, se, paired = compare(cand, best, nz)
    done = set(cand["seed"].dropna())
    next_seed = next((s for s in seeds if s not in done), None)
    already_kept = status == "keep"
    if already_kept or z >= CLEAR_WIN or (next_seed is None and z >= WIN):
        verdict, status = ("keep", "keep") if next_seed is None else ("rerun", "keep")
        action = "keep" if next_seed is None else f"rerun with seed {next_seed}: kept, completing its seeds"
    elif z <= 0 or next_seed is None:
        verdict, status, action = "discard", "discard", "discard"
    else:
        verdict, status, action = "rerun", "discard", f"rerun with seed {next_seed}: undecided"
    floor = nz["floor"]
    c, b = seed_means(cand), seed_means(best)
    line = (f"{action}: {commit} {c.mean():.6f} ({_runs(cand, c)}) vs best {best_commit} {b.mean():.6f} "
            f"({_runs(best, b)}): {diff:+.6f} = "
            f"{diff / floor:+.1f} noise floors, z {z:+.1f} "
            f"({f'seed for seed from the same weights, paired floor {paired_floor(nz):.6f}' if paired else 'unpaired'}); "
            f"noise floor {floor:.6f}")
    return _verdict(verdict, status, line, seed=next_seed if verdict == "rerun" else None, z=z, diff=diff, se=se,
                    paired=paired, best_commit=best_commit, **nz)

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
    """The results.tsv fields for one run (a crash when the summary has no val_bpb)."""
    description = re.sub(r"[\t\r\n]+", " ", description).strip()
    crashed = "val_bpb" not in summary
    try:
        memory_gb = f"{float(summary.get('peak_vram_mb', 0)) / 1024:.1f}"
    except ValueError:
        memory_gb = "0.0"
    return [commit, "0.000000" if crashed else f"{float(summary['val_bpb']):.6f}", "0.0" if crashed else memory_gb,
            "crash" if crashed else "discard", description] + [summary.get(k, "") for k in CONDITIONS[:-1]] + [""]


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


def record(tsv, summary, commit, description, rule="noise"):
    """Appends the run's row to `tsv`, judges its commit, writes the commit's status into all its rows and the
    verdict into the new one. The file is rewritten whole and renamed into place, under the lock: a reader
    never sees half a row, and two writers never lose one. Returns (the new row's fields, the verdict)."""
    row = make_row(summary, commit, description)
    with locked(tsv):
        text = ""
        if os.path.exists(tsv):
            with open(tsv, encoding="utf-8", errors="replace") as f:
                text = f.read().lstrip("\ufeff")
        lines = text.splitlines()
        if not lines or lines[0].strip().lower().split("\t") == COLUMNS:  # new, or the reference's five columns
            lines[:1] = ["\t".join(HEADER)]
        lines.append("\t".join(row))
        df, _ = parse_results("\n".join(lines))
        verdict = judge(df, commit, rule)
        _set_status(lines, df, commit, verdict["status"])
        if row[3] != "crash":
            row[3] = verdict["status"]
        row[-1] = verdict["verdict"]
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
    """One row per commit, in order of first appearance: the experiment's number (0 = baseline), status, its
    val_bpb (the mean over its seeds; refused runs left out), how many runs, its seeds and the first description."""
    rows = []
    for i, (commit, g) in enumerate(df.groupby("commit", sort=False)):
        runs = _results(g)
        status = runs["status"].iloc[-1] if len(runs) else g["status"].iloc[-1]
        rows.append({"experiment": i, "commit": commit, "status": status,
                     "val_bpb": float(seed_means(runs).mean()) if len(runs) else 0.0,
                     "memory_gb": float(g["memory_gb"].max()), "runs": len(runs),
                     "seeds": [int(s) for s in runs["seed"] if s is not None],
                     "init_fingerprint": runs["init_fingerprint"].iloc[0] if len(runs) else "",
                     "description": g["description"].iloc[0]})
    return pd.DataFrame(rows, columns=["experiment", "commit", "status", "val_bpb", "memory_gb", "runs", "seeds",
                                       "init_fingerprint", "description"])


def _num(x):
    """float for JSON: NaN and missing become None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def summarize(df):
    """Counts, keep rate, noise floor, baseline, best, improvement, the kept list and the top hits, as a
    JSON-friendly dict. An experiment is a commit; its val_bpb is the mean of its runs."""
    exps = experiments(df)
    n = len(exps)
    counts = {s: int((exps["status"] == s).sum()) for s in STATUSES}
    counts["other"] = n - sum(counts.values())  # unknown statuses (warned about when loading)
    results = exps[exps["val_bpb"] > 0]
    kept = results[results["status"] == "keep"]
    runs = _results(df)
    like = _conditions(runs.iloc[0]) if len(runs) else None
    noise = noise_floor(df, like)
    # the first experiment is the unmodified baseline; skip leading crashes, which have no result
    baseline = float(results["val_bpb"].iloc[0]) if len(results) else None
    best_row = kept.loc[kept["val_bpb"].idxmin()] if len(kept) else None
    best = float(best_row["val_bpb"]) if best_row is not None else None
    improvement = round(baseline - best, 6) if baseline is not None and best is not None else None  # no float noise

    kept_list = [{"experiment": int(r.experiment), "commit": r.commit, "val_bpb": round(float(r.val_bpb), 6),
                  "memory_gb": _num(r.memory_gb), "runs": int(r.runs), "seeds": r.seeds,
                  "description": r.description} for r in kept.itertuples()]
    fingerprints = dict(zip(kept["commit"], kept["init_fingerprint"]))
    # each kept experiment after the first, by how much it lowered val_bpb below the previous kept one, in units of
    # the noise floor that applies (same-seed when both started from the same weights)
    hits = []
    for prev, k in zip(kept_list, kept_list[1:]):
        gain = round(prev["val_bpb"] - k["val_bpb"], 6)
        same_init = fingerprints[k["commit"]] != "" and fingerprints[k["commit"]] == fingerprints[prev["commit"]]
        floor = (paired_floor(noise) if same_init else None) or noise["floor"]
        floors = round(gain / floor, 2) if floor else None
        hits.append(dict(k, gain=gain, same_init=same_init, gain_floors=floors,
                         within_noise=floors is not None and floors < 1))
    for k in kept_list[1:]:
        k.update({key: h[key] for h in hits if h["commit"] == k["commit"] for key in ("gain", "gain_floors",
                                                                                       "within_noise")})
    hits.sort(key=lambda h: h["gain"], reverse=True)
    return {
        "n_experiments": n,
        "n_runs": int(len(df)),
        "counts": counts,
        "keep_rate": counts["keep"] / n if n else None,
        "noise": dict(noise, device=like[0] if like else None, attention=like[1] if like else None),
        "baseline_val_bpb": baseline,
        "best_val_bpb": best,
        "best_commit": best_row["commit"] if best_row is not None else None,
        "best_description": best_row["description"] if best_row is not None else None,
        "improvement_abs": improvement,
        "improvement_pct": round(100 * improvement / baseline, 4) if improvement is not None else None,
        "improvement_floors": round(improvement / noise["floor"], 2) if improvement is not None and noise["floor"]
        else None,
        "kept": kept_list,
        "top_hits": hits,
    }


def format_report(summary):
    """The summary as a short text report."""
    s, c, nz = summary, summary["counts"], summary["noise"]
    n = s["n_experiments"]
    lines = [f"{n} experiments ({s['n_runs']} runs): {c['keep']} keep, {c['discard']} discard, {c['crash']} crash"
             + (f", {c['other']} unknown status" if c["other"] else "")
             + (f" (keep rate {100 * s['keep_rate']:.1f}%)" if n else "")]
    if nz["floor"] is not None:
        lines.append(f"noise floor:      {nz['floor']:.6f} (seed to seed; {nz['dof']} degrees of freedom"
                     + (f"; same seed {nz['floor_same']:.6f}" if nz["floor_same"] is not None else "")
                     + (f"; seed for seed from the same weights {nz['floor_paired']:.6f}, {nz['dof_paired']} dof"
                        if nz["floor_paired"] is not None else "")
                     + f"; {_describe((nz['device'], nz['attention']))})")
    else:
        lines.append("noise floor:      not measured (no commit has run under two seeds)")
    if s["baseline_val_bpb"] is not None:
        lines.append(f"baseline val_bpb: {s['baseline_val_bpb']:.6f}")
    if s["best_val_bpb"] is not None:
        lines.append(f"best val_bpb:     {s['best_val_bpb']:.6f} ({s['best_commit']}: {s['best_description']})")
        lines.append(f"improvement:      {s['improvement_abs']:.6f} ({s['improvement_pct']:.2f}%"
                     + (f", {s['improvement_floors']:.1f} noise floors" if s["improvement_floors"] is not None else "")
                     + ")")
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
        for r in kept.itertuples():
            label = r.description if len(r.description) <= 45 else r.description[:44] + "…"
            ax.annotate(label, (r.experiment, r.val_bpb), xytext=(4, 6), textcoords="offset points", fontsize=8,
                        rotation=20, color="#1a5e1a")
    ax.set_ylim(ylo, yhi)
    ax.set_xlim(-1, max(len(exps), 2))
    ax.set_xlabel("experiment # (one commit; several points where it ran under several seeds)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"autoresearch: {len(exps)} experiments ({len(df)} runs), {c['keep']} kept, {c['discard']} "
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
    except (FileNotFoundError, NotADirectoryError):  # no git, or no such directory
        inside = False
    if not inside:
        message = f"integrity: not checked ({repo_dir} is not a git repository)"
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
    r = subprocess.run(["git", "-C", cwd, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Record, judge and report autoresearch runs (results.tsv).")
    parser.add_argument("command", nargs="?", default="report", choices=("report", "record", "judge", "mark"),
                        help="report (default); record a run from its log; judge the latest commit again; mark the "
                             "latest commit keep or discard by hand (the simplicity criterion)")
    parser.add_argument("--tsv", default="results.tsv", help="path to results.tsv (default: results.tsv)")
    parser.add_argument("--json", action="store_true", help="report: print the summary, warnings and integrity as JSON")
    parser.add_argument("--plot", metavar="PATH", help="report: write the progress figure (PNG) to PATH")
    parser.add_argument("--log", default="run.log", help="record: the run's log (default: run.log)")
    parser.add_argument("--description", help="record: what the experiment tried (no tabs)")
    parser.add_argument("--commit", help="record, judge: the commit (default: git HEAD here; judge: the last row's)")
    parser.add_argument("--status", choices=("keep", "discard"), help="mark: the commit's new status")
    parser.add_argument("--rule", choices=RULES, default=os.environ.get("AUTORESEARCH_RULE", "noise"),
                        help="noise (default) or plain, the reference's one-run rule (env AUTORESEARCH_RULE)")
    args = parser.parse_args(argv)
    if args.rule not in RULES:
        parser.error(f"AUTORESEARCH_RULE={args.rule!r}: use noise or plain")

    if args.command == "record":
        if not args.description:
            parser.error("record needs --description \"<what changed>\"")
        if not os.path.isfile(args.log):
            print(f"error: {args.log}: no such file; run `uv run train.py > run.log 2>&1` first", file=sys.stderr)
            return 1
        commit = args.commit or _git_head()
        if not commit:
            print("error: not in a git repository; run from the repository (or give --commit)", file=sys.stderr)
            return 1
        with open(args.log, encoding="utf-8", errors="replace") as f:
            summary = parse_log(f.read())
        try:
            _, verdict = record(args.tsv, summary, commit, args.description, args.rule)
        except OSError as e:
            print(f"error: cannot write {args.tsv}: {e}", file=sys.stderr)
            return 1
        print(verdict["line"])
        return 0

    try:
        df, warnings = load_results(args.tsv)
    except OSError as e:
        print(f"error: {e}" if str(args.tsv) in str(e) else f"error: {args.tsv}: {e}", file=sys.stderr)
        return 1
    if args.command == "judge":
        print(judge(df, args.commit, args.rule)["line"])
        return 0
    if args.command == "mark":
        if not args.status:
            parser.error("mark needs --status keep or --status discard")
        commit = args.commit or (df["commit"].iloc[-1] if len(df) else None)
        if commit is None or not (df["commit"] == commit).any():
            print(f"error: {args.tsv}: no row for commit {commit}", file=sys.stderr)
            return 1
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
            print(f"error: cannot write {args.plot}: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.plot}" if written else f"no results to plot yet; {args.plot} not written", file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
