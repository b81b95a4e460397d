"""
Reads results.tsv (one row per experiment, written by the agent) and reports how the run is going.

Usage: uv run analysis.py [--tsv results.tsv] [--json] [--plot progress.png]

    uv run analysis.py                        # text report: counts, kept experiments, best, top hits, integrity
    uv run analysis.py --json                 # the same as JSON (plus warnings and the integrity check)
    uv run analysis.py --plot progress.png    # also draw the progress figure

analysis.ipynb imports the functions below; the logic lives here once. Messy input (mixed-case status,
stray spaces, rows with the wrong number of fields, non-numeric val_bpb) is read with a warning per bad
line instead of a traceback. The integrity check runs git in the directory holding the tsv: no kept
commit may change prepare.py or pyproject.toml.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys

import pandas as pd

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = ("keep", "discard", "crash")
FIXED_FILES = ("prepare.py", "pyproject.toml")  # the agent may change train.py only; these two matter most

# -----------------------------------------------------------------------------
# Loading


def load_results(path):
    """Reads a results.tsv. Returns (DataFrame with COLUMNS plus `line`, list of warning strings).

    Bad rows are skipped with a warning naming their line number; raises FileNotFoundError for a missing
    file. val_bpb is 0.0 for a crash; memory_gb is NaN where it is missing or not a number.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (the agent creates results.tsv during setup, see program.md)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a results.tsv file")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    text = text.lstrip("\ufeff")
    warnings, rows = [], []
    header_seen = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if [f.lower() for f in fields] == COLUMNS:
            if header_seen or rows:
                warnings.append(f"line {lineno}: repeated header; skipped")
            header_seen = True
            continue
        if not header_seen and not rows:
            warnings.append(f"line {lineno}: no header line (expected: {' '.join(COLUMNS)}); reading it as data")
        if len(fields) != len(COLUMNS):
            hint = " (fields must be separated by tabs)" if len(fields) == 1 and " " in line.strip() else ""
            warnings.append(f"line {lineno}: expected {len(COLUMNS)} tab-separated fields, found {len(fields)}{hint}; "
                            "skipped")
            continue
        commit, val_bpb, memory_gb, status, description = fields
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
        rows.append({"commit": commit, "val_bpb": val_bpb, "memory_gb": memory_gb, "status": status,
                     "description": description, "line": lineno})
    df = pd.DataFrame(rows, columns=COLUMNS + ["line"])
    df = df.astype({"commit": str, "val_bpb": float, "memory_gb": float, "status": str, "description": str,
                    "line": int})
    return df, warnings


# -----------------------------------------------------------------------------
# Summary


def _kept(df):
    """Kept experiments with a real result, in file order. The index is the experiment number (0 = baseline)."""
    return df[(df["status"] == "keep") & (df["val_bpb"] > 0)]


def _num(x):
    """float for JSON: NaN and missing become None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def summarize(df):
    """Counts, keep rate, baseline, best, improvement, the kept list and the top hits, as a JSON-friendly dict."""
    n = len(df)
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES}
    counts["other"] = n - sum(counts.values())  # unknown statuses (warned about when loading)
    kept = _kept(df)
    results = df[df["val_bpb"] > 0]
    # the first run is the unmodified baseline; skip leading crashes, which have no result
    baseline = float(results["val_bpb"].iloc[0]) if len(results) else None
    best_row = kept.loc[kept["val_bpb"].idxmin()] if len(kept) else None
    best = float(best_row["val_bpb"]) if best_row is not None else None
    improvement = round(baseline - best, 6) if baseline is not None and best is not None else None  # no float noise

    kept_list = [{"experiment": int(i), "commit": r.commit, "val_bpb": float(r.val_bpb),
                  "memory_gb": _num(r.memory_gb), "description": r.description} for i, r in kept.iterrows()]
    # each kept experiment after the first, by how much it lowered val_bpb below the previous kept one
    hits = [dict(k, gain=round(prev["val_bpb"] - k["val_bpb"], 6)) for prev, k in zip(kept_list, kept_list[1:])]
    hits.sort(key=lambda h: h["gain"], reverse=True)
    return {
        "n_experiments": n,
        "counts": counts,
        "keep_rate": counts["keep"] / n if n else None,
        "baseline_val_bpb": baseline,
        "best_val_bpb": best,
        "best_commit": best_row["commit"] if best_row is not None else None,
        "best_description": best_row["description"] if best_row is not None else None,
        "improvement_abs": improvement,
        "improvement_pct": round(100 * improvement / baseline, 4) if improvement is not None else None,
        "kept": kept_list,
        "top_hits": hits,
    }


def format_report(summary):
    """The summary as a short text report."""
    s, c = summary, summary["counts"]
    n = s["n_experiments"]
    lines = [f"{n} experiments: {c['keep']} keep, {c['discard']} discard, {c['crash']} crash"
             + (f", {c['other']} unknown status" if c["other"] else "")
             + (f" (keep rate {100 * s['keep_rate']:.1f}%)" if n else "")]
    if s["baseline_val_bpb"] is not None:
        lines.append(f"baseline val_bpb: {s['baseline_val_bpb']:.6f}")
    if s["best_val_bpb"] is not None:
        lines.append(f"best val_bpb:     {s['best_val_bpb']:.6f} ({s['best_commit']}: {s['best_description']})")
        lines.append(f"improvement:      {s['improvement_abs']:.6f} ({s['improvement_pct']:.2f}%)")
    if s["kept"]:
        lines += ["", "kept experiments:", f"  {'#':>4}  {'commit':<8} {'val_bpb':>9} {'mem_gb':>7}  description"]
        for k in s["kept"]:
            mem = f"{k['memory_gb']:.1f}" if k["memory_gb"] is not None else "-"
            lines.append(f"  {k['experiment']:>4}  {k['commit']:<8} {k['val_bpb']:>9.6f} {mem:>7}  {k['description']}")
    if s["top_hits"]:
        lines += ["", "top hits (val_bpb gain over the previous kept experiment):"]
        for rank, h in enumerate(s["top_hits"], start=1):
            lines.append(f"  {rank:>2}. {h['gain']:+.6f}  {h['commit']:<8} {h['description']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Progress plot


def plot_progress(df, path):
    """Draws val_bpb per experiment to `path` (PNG). Returns the path, or None when there is nothing to plot.

    Discarded runs are faint grey points, kept runs green points labelled with their descriptions, the
    running best a step line. Crashes (val_bpb 0) are not drawn.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless and inside Jupyter

    results = df[df["val_bpb"] > 0]
    if results.empty:
        return None
    kept = _kept(df)
    summary = summarize(df)
    c = summary["counts"]

    fig = Figure(figsize=(14, 7))
    ax = fig.add_subplot()
    other = results[results["status"] != "keep"]
    ax.scatter(other.index, other["val_bpb"], s=14, c="#b0b0b0", alpha=0.6, label="discarded", zorder=2)
    if len(kept):
        ax.scatter(kept.index, kept["val_bpb"], s=50, c="#2ca02c", edgecolors="black", linewidths=0.5,
                   label="kept", zorder=4)
        best_so_far = kept["val_bpb"].cummin()
        x = list(kept.index) + [df.index[-1]]  # carry the best on to the last experiment
        y = list(best_so_far) + [best_so_far.iloc[-1]]
        ax.step(x, y, where="post", c="#2ca02c", alpha=0.7, lw=1.5, label="running best", zorder=3)
        for i, r in kept.iterrows():
            label = r["description"] if len(r["description"]) <= 45 else r["description"][:44] + "…"
            ax.annotate(label, (i, r["val_bpb"]), xytext=(4, 6), textcoords="offset points", fontsize=8,
                        rotation=20, color="#1a5e1a")
        lo, hi = summary["best_val_bpb"], summary["baseline_val_bpb"]
    else:
        lo, hi = results["val_bpb"].min(), results["val_bpb"].max()
    # from just below the best to just above the baseline: worse runs fall off the top, on purpose
    margin = max(0.15 * (hi - lo), 0.002 * hi)
    ax.set_ylim(lo - margin, hi + margin)
    ax.set_xlim(-1, max(len(df), 2))
    ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"autoresearch: {len(df)} experiments, {c['keep']} kept, {c['discard']} discarded, "
                 f"{c['crash']} crashed")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


# -----------------------------------------------------------------------------
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
    kept = _kept(df)
    kept = kept[kept.index != (df.index[0] if len(df) else None)]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Report on an autoresearch results.tsv.")
    parser.add_argument("--tsv", default="results.tsv", help="path to results.tsv (default: results.tsv)")
    parser.add_argument("--json", action="store_true", help="print the summary, warnings and integrity as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write the progress figure (PNG) to PATH")
    args = parser.parse_args(argv)

    try:
        df, warnings = load_results(args.tsv)
    except OSError as e:
        print(f"error: {e}" if str(args.tsv) in str(e) else f"error: {args.tsv}: {e}", file=sys.stderr)
        return 1
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
