"""
The keep/discard judgement (judge.py's rule, as analysis.judge and `analysis.py record` apply it) on small hand-made
results.tsv tables, one rule per test: the baseline's seeds, Student-t bars at the degrees of freedom measured,
one-run and two-run decisions, the best's value estimated through the night, seed-for-seed comparisons, zero
spreads, outlying runs and a machine whose speed swings, refused comparisons, one best and one noise for every
reader, the morning's confirmation, the hand override and many runs recorded at once.

Run: uv run pytest tests/test_judge.py
"""

import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from helpers import python

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import analysis  # noqa: E402
import judge  # noqa: E402

# the baseline's four runs, one per seed of analysis.BASELINE_SEEDS
BASELINE = [("base000", 1.000, 42), ("base000", 1.010, 43), ("base000", 0.995, 44), ("base000", 1.005, 45)]
SIGMA = statistics.stdev([1.000, 1.010, 0.995, 1.005])  # 0.00645, on 3 degrees of freedom
FLOOR = math.sqrt(2) * SIGMA                             # 0.00913: how far a seed change moves val_bpb
MEAN = 1.0025


def summary(bpb, seed, steps=100, **conditions):
    s = {"val_bpb": f"{bpb}", "peak_vram_mb": "1024", "num_steps": str(steps), "seed": str(seed), "attention": "sdpa",
         "device": "cpu", "init_fingerprint": f"fp{seed}", "time_budget": "300", "eval_tokens": "131072"}
    return dict(s, **conditions)


def play(tmp_path, runs, rule="noise"):
    """Records `runs` [(commit, val_bpb, seed, {summary overrides})] one at a time as `analysis.py record` does
    (append, judge, write the status back); returns the verdict after the last one."""
    tsv = tmp_path / "results.tsv"
    tsv.unlink(missing_ok=True)
    verdict = None
    for commit, bpb, seed, *more in runs:
        _, verdict = analysis.record(str(tsv), summary(bpb, seed, **(more[0] if more else {})), commit, "x", rule)
    return verdict


def table(runs):
    """A results.tsv as a DataFrame, statuses given: [(commit, val_bpb, seed, status)]; like every file, the
    baseline comes first."""
    text = "\t".join(analysis.HEADER) + "\n" + "".join(
        "\t".join(analysis.make_row(summary(bpb, seed), commit, "x")[:3] + [status]
                  + analysis.make_row(summary(bpb, seed), commit, "x")[4:]) + "\n" for commit, bpb, seed, status in runs)
    return analysis.parse_results(text)[0]


# four earlier ideas from the baseline's initial weights, each run under seeds 42 and 43 and discarded: with the
# baseline they measure the run spread seed for seed, from each commit's seed-42-minus-43 difference (4 dof)
MEASURED = [(f"idea00{i}", v, s) for i, pair in enumerate([(1.003, 1.012), (1.001, 1.013), (1.006, 1.014),
                                                            (1.002, 1.011)]) for v, s in zip(pair, (42, 43))]
PAIRED = math.sqrt(statistics.variance([1.000 - 1.010, 1.003 - 1.012, 1.001 - 1.013, 1.006 - 1.014, 1.002 - 1.011]) / 2)


def with_status(runs, status):
    return [(c, v, s, status) for c, v, s in runs]


# -----------------------------------------------------------------------------
# The noise and the bars


def test_t_quantiles_match_the_tables():
    assert [round(float(judge.t_interval(0.95, dof)), 3) for dof in (1, 2, 3, 10, 30)] == [12.706, 4.303, 3.182,
                                                                                           2.228, 2.042]
    assert judge.bar(1.6449, 100000) == pytest.approx(1.6449, abs=1e-4)  # many dof: the normal quantile
    assert judge.bar(1.8, 3) > judge.bar(1.8, 20) > 1.8  # few degrees of freedom: a higher bar


def before(df, commit):
    """The night as it stood when `commit` was judged, and the comparison its verdict made."""
    return analysis.the_night(df)["seen"][commit]


def test_the_baseline_runs_under_its_four_seeds_and_measures_the_noise(tmp_path):
    said = [play(tmp_path, BASELINE[:n]).line for n in range(1, 5)]
    assert [s.split(":")[0] for s in said] == ["rerun with seed 43", "rerun with seed 44", "rerun with seed 45",
                                               "keep"]
    assert said[-1].startswith(f"keep: baseline base000 {MEAN:.6f} (4 seeds), noise floor {FLOOR:.6f}")
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    nz = analysis.summarize(df)["noise"]
    assert nz["sigma"] == pytest.approx(SIGMA) and nz["dof"] == 3 and nz["floor"] == pytest.approx(FLOOR)
    assert set(df["status"]) == {"keep"}


def test_a_commit_awaiting_its_rerun_is_pending_in_results_tsv(tmp_path):
    v = play(tmp_path, BASELINE + [("cand000", 0.990, 42)])
    df, warnings = analysis.load_results(tmp_path / "results.tsv")
    assert v.verdict == "rerun" and warnings == [] and df["status"].iloc[-1] == "pending"
    assert ", 1 pending a rerun" in analysis.format_report(analysis.summarize(df))
    play(tmp_path, BASELINE + [("cand000", 0.990, 42), ("cand000", 1.004, 43)])
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    assert list(df["status"][-2:]) == ["discard", "discard"]


def test_a_clear_loser_is_discarded_after_one_run(tmp_path):
    v = play(tmp_path, BASELINE + [("cand000", 1.004, 42)])  # worse than the baseline's mean
    assert v.verdict == "discard" and v.z < 0
    assert v.line.startswith(f"discard: cand000 1.004000 (1 seed) vs best base000 {MEAN:.6f}: worse by 0.001500 = 0.2 "
                             "noise floors, z -0.21 (keep at >= ")
    night, c = before(analysis.load_results(tmp_path / "results.tsv")[0], "cand000")
    sd = SIGMA / 2  # the best's value is its four runs' mean so far: sd sigma / sqrt(4)
    assert c.se[0] == pytest.approx(math.sqrt(SIGMA ** 2 + sd ** 2)) and c.shown_sd[0] == pytest.approx(sd)


def test_in_between_is_rerun_once_under_seed_43_then_decided(tmp_path):
    runs = BASELINE + [("cand000", 0.990, 42)]  # 1.4 floors better: between the bars of one run at 3 dof
    v = play(tmp_path, runs)
    assert judge.bar(judge.DISCARD_ONE, 3) < v.z < judge.bar(judge.KEEP_ONE, 3)
    assert (v.verdict, v.status, v.seed) == ("rerun", "pending", 43)  # not kept until decided
    assert v.line.startswith("rerun with seed 43: undecided: cand000 0.990000 (1 seed)")
    v = play(tmp_path, runs + [("cand000", 0.989, 43)])  # the second seed agrees
    assert v.z >= judge.bar(judge.KEEP_TWO, 3) and (v.verdict, v.status) == ("keep", "keep")
    v = play(tmp_path, runs + [("cand000", 1.004, 43)])  # the second seed says it was mostly luck
    assert 0 < v.z < judge.bar(judge.KEEP_TWO, 3) and (v.verdict, v.status) == ("discard", "discard")


def test_nothing_is_kept_on_one_run_until_sigma_is_measured_past_the_baseline(tmp_path):
    v = play(tmp_path, BASELINE + [("cand000", 0.975, 42)])  # 3 floors better: past the one-run bar...
    assert v.z >= judge.bar(judge.KEEP_ONE, 3)
    assert (v.verdict, v.seed) == ("rerun", 43)  # ...but sigma has the baseline's 3 dof only: one more run
    assert v.line.startswith("rerun with seed 43: promising, but nothing is kept on one run before sigma has 5 dof "
                             "(3 so far)")
    v = play(tmp_path, BASELINE + [("cand000", 0.975, 42), ("cand000", 0.978, 43)])
    assert (v.verdict, v.status) == ("keep", "keep")


def test_the_best_is_an_estimate_that_discarded_commits_inform_and_a_kept_one_does_not_carry_its_luck():
    """Ideas built on the baseline that scored like it (no effect) pull its estimate toward their runs and narrow it;
    a commit kept on a lucky run is held at its parent's value minus the effect its runs suggest, not at those runs."""
    alone, _ = before(table(with_status(BASELINE, "keep") + [("cand000", 0.996, 42, "discard")]), "cand000")
    assert alone.mu[0] == pytest.approx(MEAN) and alone.v[0] == pytest.approx(SIGMA ** 2 / 4)
    nulls = [(f"idea00{i}", v, s, "discard") for i, v in enumerate((1.006, 1.007, 1.008)) for s in (42,)]
    night, _ = before(table(with_status(BASELINE, "keep") + nulls + [("cand000", 0.996, 42, "discard")]), "cand000")
    assert MEAN < night.mu[0] < 1.007 and night.v[0] < alone.v[0]
    kept = with_status(BASELINE, "keep") + [("lucky", 0.960, 42, "keep"), ("lucky", 0.970, 43, "keep")]
    df = table(kept + [("cand000", 0.99, 42, "discard")])
    night, _ = before(df, "cand000")
    assert analysis.best_commit(df, "cand000") == "lucky" and 0.965 < night.mu[0] < MEAN  # between runs and baseline
    assert night.experiments == 1 and not np.allclose(night.prior[0], judge.DEFAULT_PRIOR)  # learned from one idea


def test_a_run_that_diverged_moves_no_estimate_and_a_huge_gain_is_followed():
    """Effects far past the prior's grid (a learning rate that diverged: 77 sigma worse; a bug fixed: 150 sigma
    better) are explained by their own effect: a diverged discard leaves the best's value where it was, seed for
    seed too, and a huge keep is estimated at its runs; neither holds every later idea to a wrong number."""
    ideas = with_status(BASELINE, "keep") + with_status(MEASURED, "discard")
    plain, _ = before(table(ideas + [("cand000", 0.999, 42, "discard")]), "cand000")
    diverged = [("broken", 1.5, 42, "discard")]  # far worse: discarded on its one run
    night, _ = before(table(ideas + diverged + [("cand000", 0.999, 42, "discard")]), "cand000")
    assert night.mu[0] == pytest.approx(plain.mu[0], abs=1e-6) and night.m[0] == pytest.approx(plain.m[0], abs=1e-6)
    fixed = [("bugfix", 0.030, 42, "keep"), ("bugfix", 0.032, 43, "keep")]
    night, _ = before(table(ideas + fixed + [("cand000", 0.031, 42, "discard")]), "cand000")
    assert night.mu[0] == pytest.approx(0.031, abs=2e-4) and night.m[0].mean() == pytest.approx(0.031, abs=2e-4)


def test_once_measured_a_same_init_comparison_is_seed_for_seed_and_one_run_decides(tmp_path):
    df = table(with_status(BASELINE, "keep") + with_status(MEASURED, "discard") + [("cand000", 0.996, 42, "discard")])
    v = analysis.judge(df)
    night, c = before(df, "cand000")
    assert c.paired[0] and night.paired_dof[0] == 4 and night.tau2[0] == pytest.approx(PAIRED ** 2)  # 0.00107
    assert c.se[0] == pytest.approx(math.sqrt(night.c[0, 0, 0] + night.tau2[0]))  # the best under seed 42, one run
    assert v.diff == pytest.approx(night.m[0, 0] - 0.996)  # against the best's value under seed 42, not its mean
    assert (v.verdict, v.status) == ("keep", "keep")
    assert f"vs best base000 {night.m[0, 0]:.6f} seed for seed: better by " in v.line
    # the same run, unpaired, would have been discarded: 1.0 floors of the seed-to-seed noise
    unpaired = judge.compare(night, judge.Runs.of({42: 0.996}, same_init=False))
    assert not unpaired.paired[0] and unpaired.z[0] < judge.bar(judge.DISCARD_ONE, night.dof[0])


def test_an_edit_from_other_initial_weights_is_never_compared_seed_for_seed():
    """Hyperparameter edits (same init_fingerprint) share the noise of the seed's initial weights with the best; an
    edit that adds a module draws other weights, so it is compared unpaired, and once such a commit is kept nothing
    later is seed for seed with it."""
    df = table(with_status(BASELINE, "keep") + with_status(MEASURED, "discard") + [("arch000", 0.996, 42, "discard")])
    df.loc[df["commit"] == "arch000", "init_fingerprint"] = "a-new-module"
    v = analysis.judge(df)
    night, c = before(df, "arch000")
    assert night.paired_dof[0] == 4 and not c.paired[0] and not v.paired
    assert v.verdict == "discard"  # seed for seed it would be kept (the test above)
    arch = [("arch000", 0.96, 42, "keep"), ("arch000", 0.97, 43, "keep")]
    df = table(with_status(BASELINE, "keep") + with_status(MEASURED, "discard") + arch
               + [("cand000", 0.95, 42, "discard")])
    df.loc[df["commit"] == "arch000", "init_fingerprint"] = "a-new-module"
    v = analysis.judge(df)
    assert not before(df, "cand000")[0].on[0] and not v.paired and v.best == "arch000"


def test_seed_for_seed_is_never_used_when_it_is_the_looser_test():
    # earlier ideas whose seed-for-seed differences scatter as much as unpaired runs do (the noise is not shared)
    noisy = [(f"idea00{i}", v, s) for i, pair in enumerate([(1.013, 0.998), (0.992, 1.019), (1.010, 0.999),
                                                            (0.995, 1.016)]) for v, s in zip(pair, (42, 43))]
    df = table(with_status(BASELINE, "keep") + with_status(noisy, "discard") + [("cand000", 0.996, 42, "discard")])
    v = analysis.judge(df)
    night, c = before(df, "cand000")
    assert night.paired_dof[0] == 4 and math.sqrt(night.tau2[0]) > SIGMA  # measured, and wider than a run
    assert not c.paired[0] and v.diff == pytest.approx(night.mu[0] - 0.996)
    assert c.se[0] == pytest.approx(math.sqrt(night.sigma[0] ** 2 + night.v[0]))


def test_the_decision_benchmark_simulates_nights_through_judge_py():
    """dev/benchmark_decisions.py judges its simulated nights with judge.py itself (no copy of the rule): a tiny
    run prints the table of every scenario."""
    out = subprocess.run([sys.executable, str(ROOT / "dev" / "benchmark_decisions.py"), "--nights", "20",
                          "--experiments", "10"], capture_output=True, text=True, timeout=120)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "| noise |" in line]
    assert len(rows) == 7 and out.stdout.count("targets, ") == 7, out.stdout + out.stderr


def test_a_two_degree_of_freedom_start_does_not_over_keep():
    """A baseline of three seeds (2 dof, as this project started its nights before): changes that do nothing are
    kept in at most 5% of first experiments. With the normal bar instead of the t bar they would be kept far more
    often, so the test has the power to catch a bar that ignores the degrees of freedom. 4,000 nights at once
    through judge.py, as `record` judges a first experiment: one run, and a rerun when undecided."""
    rng, nights = np.random.default_rng(0), 4000
    base = rng.normal(1.0, 0.01, (nights, 3))  # seeds 42, 43, 44; no commit shares the baseline's initial weights
    night = judge.start(base, np.full((nights, 2), np.nan))
    y1, y2 = rng.normal(1.0, 0.01, (2, nights))
    same, nan = np.zeros(nights, bool), np.full(nights, np.nan)
    one = judge.Runs(y1, np.ones(nights), np.zeros(nights), np.stack([y1, nan], 1), same)
    two = judge.Runs((y1 + y2) / 2, np.full(nights, 2.0), (y1 - y2) ** 2 / 2, np.stack([y1, y2], 1), same)
    first = judge.compare(night, one)
    verdict = judge.decide(night, one, first)
    second = judge.decide(night, two, judge.compare(night, two))
    kept = (verdict == "keep") | ((verdict == "rerun") & (second == "keep"))
    assert kept.mean() <= 0.05, kept.mean()
    assert (first.z >= judge.KEEP_ONE).mean() > 0.08, (first.z >= judge.KEEP_ONE).mean()  # the normal bar over-keeps


# -----------------------------------------------------------------------------
# Spreads of zero, outlying runs, a machine whose speed swings


def test_a_measured_spread_of_zero_never_gives_an_infinite_z(tmp_path):
    same = [("base000", 1.0, s) for s in analysis.BASELINE_SEEDS]  # the seed reaches nothing: identical runs
    v = play(tmp_path, same + [("cand000", 0.99, 42)])
    assert v.verdict == "refused" and "inf" not in v.line and "the seed does not reach" in v.line
    # edits that changed nothing (comments) score like the baseline under every seed, as on a deterministic CPU: the
    # run spread seed for seed is measured as zero, and one of them is even kept by hand; every later z is finite
    nothing = [(f"comment{i}", 1.000, 42) for i in range(3)] + [(f"comment{i}", 1.010, 43) for i in range(3)]
    nothing = sorted(nothing, key=lambda r: r[0])
    kept = [("comment3", 1.000, 42, "keep"), ("comment3", 1.010, 43, "keep")]
    for last in ([], kept):
        df = table(with_status(BASELINE, "keep") + with_status(nothing, "discard") + last
                   + [("cand000", 0.999, 42, "discard")])
        v = analysis.judge(df)
        night, c = before(df, "cand000")
        assert night.paired_dof[0] == len(last) // 2 + 3 and math.isfinite(v.z) and c.se[0] > 0
        assert "inf" not in v.line and "nan" not in v.line


def test_a_cold_first_run_is_left_out_named_and_run_again(tmp_path):
    """The first run of a night made 47 steps where the three others made 50-52: they agree, so it is left out (not
    pooled into sigma), the verdict names it, and the baseline runs under that seed again."""
    cold = [("base000", 1.030, 42, {"num_steps": "47"}), ("base000", 1.010, 43, {"num_steps": "51"}),
            ("base000", 0.995, 44, {"num_steps": "52"}), ("base000", 1.005, 45, {"num_steps": "50"})]
    v = play(tmp_path, cold)
    assert v.line == ("rerun with seed 42: baseline 3 of 4 seeds (42, 43, 44, 45) to measure the noise; line 2 (seed "
                      "42, 47 steps against the median 50.5) left out")
    v = play(tmp_path, cold + [("base000", 1.000, 42, {"num_steps": "51"})])
    assert v.verdict == "keep" and "47 steps" in v.line
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    summary = analysis.summarize(df)  # the report's baseline and noise are the ones the verdicts use
    assert summary["noise"]["sigma"] == pytest.approx(SIGMA)  # the four warm runs, as if 47 never ran
    assert summary["baseline_val_bpb"] == pytest.approx((1.010 + 0.995 + 1.005 + 1.000) / 4)
    assert summary["kept"][0]["runs"] == 4 and summary["n_runs"] == 5


def test_one_outlying_run_sets_no_floor_for_the_rest_of_the_night():
    """The night a coding agent tried the loop on a CPU: the first run was cold (47 steps against 50-52) and 0.025
    off its later repeat under the same seed. Here it is left out, so it sets nothing: sigma comes from the warm
    runs, and a seed-for-seed comparison uses the seed-for-seed spread measured since, not a floor made of that run."""
    cold = table([("base000", 1.025, 42, "keep")] + with_status(BASELINE[1:], "keep") + [("base000", 1.000, 42, "keep")]
                 + with_status(MEASURED, "discard") + [("cand000", 0.996, 42, "discard")])
    cold.loc[0, "num_steps"] = 47
    cold.loc[1:4, "num_steps"] = [51, 52, 50, 51]
    v = analysis.judge(cold)
    warm = table(with_status(BASELINE, "keep") + with_status(MEASURED, "discard") + [("cand000", 0.996, 42, "discard")])
    (night, c), (night_w, c_w) = before(cold, "cand000"), before(warm, "cand000")
    assert v.paired and night.tau2[0] == pytest.approx(PAIRED ** 2) and v.verdict == "keep"
    assert (night.sigma[0], c.se[0], c.z[0]) == pytest.approx((night_w.sigma[0], c_w.se[0], c_w.z[0]))


def test_a_machine_whose_speed_swings_never_stalls_the_night_and_is_named_once(tmp_path):
    """Another job on the machine comes and goes: runs make about 21 or about 37 steps. No run can be called the odd
    one, so none is left out: the baseline completes after its four seeds and that noise is counted. Each verdict
    names the swing once, where it touches the comparison, and stays one short line; the report names it too."""
    steps = {42: "21", 43: "37", 44: "22", 45: "38"}
    runs = [(c, v, s, {"num_steps": steps[s]}) for c, v, s in BASELINE]
    said = [play(tmp_path, runs[:n]) for n in range(1, 5)]
    assert [v.verdict for v in said] == ["rerun", "rerun", "rerun", "keep"]
    assert said[-1].line.count("speed swings") == 1 and "21-38 steps" in said[-1].line
    fast = runs + [("cand000", 0.990, 42, {"num_steps": "37"}), ("cand000", 0.991, 43, {"num_steps": "36"})]
    for n in (len(runs) + 1, len(fast)):
        v = play(tmp_path, fast[:n])
        assert v.line.count("speed swings") == 1 and " steps against the best's 29.5" in v.line, v.line
    lines = [v.line for v in said] + [v.line]
    assert max(map(len, lines)) <= analysis.VERDICT_CHARS, lines
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    assert analysis.summarize(df)["noise"]["dof"] == 4  # every run counted: the baseline's 3 and the rerun's 1
    assert "the machine's speed swings (21-38 steps a run" in analysis.format_report(analysis.summarize(df))


def test_a_verdict_line_stays_short_whatever_its_notes(tmp_path):
    """Notes (runs left out, flags, the speed) never grow a verdict past VERDICT_CHARS: the details move to `judge`."""
    cold = [("base000", v, s, {"num_steps": n}) for (_, v, s), n in zip(BASELINE, ("40", "51", "52", "50"))]
    runs = cold + [("base000", 1.0, 42, {"num_steps": "51"})] + [("cand000", 1.004, 42)]
    play(tmp_path, runs)
    tsv = tmp_path / "results.tsv"
    lines = tsv.read_text().splitlines()
    fields = lines[-1].split("\t")
    fields[analysis.HEADER.index("flags")] = ",".join(analysis.DIFF_FLAGS)  # every flag at once
    tsv.write_text("\n".join(lines[:-1] + ["\t".join(fields)]) + "\n")
    v = analysis.judge(analysis.load_results(tsv)[0])
    assert v.line.startswith("discard: cand000") and len(v.line) <= analysis.VERDICT_CHARS
    assert v.line.endswith("; more in `uv run analysis.py judge`")


# -----------------------------------------------------------------------------
# One best and one noise, for every reader


def test_a_deletion_kept_by_hand_within_a_floor_is_the_best_for_every_reader(tmp_path, monkeypatch):
    """The simplicity criterion keeps a deletion that scored a little worse than the best (within a floor): the
    branch is at the deletion now, so the report, the confirmation, the plot and the next verdict all name it."""
    tsv = tmp_path / "results.tsv"
    play(tmp_path, BASELINE + [("cand000", 0.975, 42), ("cand000", 0.978, 43), ("delete0", 0.979, 42)])
    analysis.mark(str(tsv), "delete0", "keep")
    df, _ = analysis.load_results(tsv)
    s = analysis.summarize(df)
    assert s["best_commit"] == "delete0" and s["best_val_bpb"] == pytest.approx(0.979)  # not cand000's lower mean
    assert analysis.confirmation(df)["best"] == "delete0"
    drawn = {}
    from matplotlib.axes import Axes
    step = Axes.step
    monkeypatch.setattr(Axes, "step", lambda ax, x, y, *a, **k: drawn.update(label=k["label"], y=y) or step(ax, x, y,
                                                                                                            *a, **k))
    assert analysis.plot_progress(df, tmp_path / "progress.png")
    assert "delete0" in drawn["label"] and drawn["y"][-1] == pytest.approx(0.979)
    assert analysis.judge(table(with_status(BASELINE, "keep") + [("cand000", 0.975, 42, "keep"),
                                                                 ("delete0", 0.979, 42, "keep"),
                                                                 ("next000", 0.97, 42, "discard")])).best == "delete0"


def test_the_report_shows_the_noise_the_verdicts_use(tmp_path):
    """sigma, the floor and the seed-for-seed spread in the report (and the notebook, which reads the same summary)
    are the ones the next verdict is judged with; a kept commit's gain in floors is the one its verdict gave."""
    runs = BASELINE + MEASURED + [("cand000", 0.975, 42), ("cand000", 0.978, 43)]
    said = play(tmp_path, runs)
    s = analysis.summarize(analysis.load_results(tmp_path / "results.tsv")[0])
    v = play(tmp_path, runs + [("next000", 0.990, 42)])
    night, _ = before(analysis.load_results(tmp_path / "results.tsv")[0], "next000")
    assert s["noise"]["floor"] == pytest.approx(v.floor) and s["noise"]["sigma"] == pytest.approx(night.sigma[0])
    assert s["noise"]["spread"] == pytest.approx(math.sqrt(night.tau2[0])) and s["noise"]["spread_dof"] == 5
    assert s["kept"][-1]["floors"] == pytest.approx(said.diff / said.floor)
    assert f"{said.diff / said.floor:.1f} noise floors" in said.line


# -----------------------------------------------------------------------------
# Only like with like


@pytest.mark.parametrize("override, named", [
    ({"attention": "flex"}, "attention flex, the baseline attention sdpa"),
    ({"device": "mps"}, "on mps, the baseline on cpu"),
    ({"time_budget": "60"}, "time budget 60s, the baseline time budget 300s"),
    ({"eval_tokens": "65536"}, "eval tokens 65536, the baseline eval tokens 131072"),
])
def test_a_run_under_other_conditions_is_refused_not_compared(tmp_path, override, named):
    v = play(tmp_path, BASELINE + [("cand000", 0.900, 42, override)])
    assert v.verdict == "refused" and v.status == "discard"
    assert v.line == f"refused: this run used {named}; not comparable: fix that and rerun with seed 42"
    # a rerun under the right conditions is judged, and the refused run is left out of it
    v = play(tmp_path, BASELINE + [("cand000", 0.900, 42, override), ("cand000", 1.004, 42)])
    assert v.verdict == "discard" and "cand000 1.004000 (1 seed)" in v.line


def test_the_baseline_refuses_a_run_under_other_conditions(tmp_path):
    v = play(tmp_path, BASELINE[:1] + [("base000", 1.01, 43, {"time_budget": "60"})])
    assert v.verdict == "refused" and v.line.startswith("refused: this run used time budget 60s, the baseline time "
                                                        "budget 300s")


# -----------------------------------------------------------------------------
# The morning's confirmation


def confirm(tmp_path, values):
    """Records the confirmation runs {commit: [val_bpb under each of CONFIRM_SEEDS]}; returns the last verdict."""
    for i, seed in enumerate(analysis.CONFIRM_SEEDS):
        for commit in ("base000", "cand000"):
            _, v = analysis.record(str(tmp_path / "results.tsv"), summary(values[commit][i], seed), commit,
                                   confirm=True)
    return v


def test_confirmation_runs_change_no_status_and_give_the_interval(tmp_path):
    tsv = tmp_path / "results.tsv"
    play(tmp_path, BASELINE + [("cand000", 0.975, 42), ("cand000", 0.978, 43)])
    before_ = analysis.load_results(tsv)[0]
    conf = analysis.confirmation(before_)
    assert (conf["baseline"], conf["best"], conf["todo"][:2]) == ("base000", "cand000", [("base000", 1001),
                                                                                         ("cand000", 1001)])
    assert analysis.confirmation_line(conf).startswith(f"run base000 with seed 1001: confirmation 1 of "
                                                       f"{2 * len(analysis.CONFIRM_SEEDS)}")
    with pytest.raises(analysis.RecordError, match="not one to confirm"):  # only the baseline and the best
        analysis.record(str(tsv), summary(0.99, 1001), "idea123", "x", confirm=True)
    values = {"base000": [1.004, 0.999], "cand000": [0.981, 0.977]}
    v = confirm(tmp_path, values)
    df = analysis.load_results(tsv)[0]
    n = 2 * len(analysis.CONFIRM_SEEDS)
    assert list(df["status"]) == list(before_["status"]) + ["keep"] * n  # every status as it was
    assert list(df["verdict"][-n:]) == ["confirm"] * n and list(df["description"][-n:]) == ["x"] * n
    assert analysis.judge(df).line == analysis.judge(before_).line  # decisions never see them
    gain = statistics.mean(values["base000"]) - statistics.mean(values["cand000"])
    conf = analysis.confirmation(df)
    lo, hi = conf["ci"]
    assert conf["todo"] == [] and conf["gain"] == pytest.approx(gain) and conf["confirmed"] and 0 < lo < gain < hi
    night = analysis.the_night(df)["night"]  # the night's own noise, unpaired: sigma * sqrt(1/2 + 1/2)
    assert conf["se"] == pytest.approx(night.sigma[0]) and hi - lo == pytest.approx(
        2 * judge.t_interval(0.95, conf["dof"]) * conf["se"]) and conf["dof"] == 4
    assert v.line == analysis.confirmation_line(conf) and v.line.startswith(
        f"confirmed: best cand000 vs baseline base000: gain +{gain:.6f} = {gain / night.floor[0]:.1f} noise floors "
        f"(95% interval +{lo:.6f} to +{hi:.6f}")
    s = analysis.summarize(df)
    assert s["confirmation"]["gain"] == pytest.approx(gain) and s["n_confirmation_runs"] == n
    assert s["confirmation"]["claimed"] == pytest.approx(MEAN - 0.9765)
    assert "confirmation:     confirmed: " in analysis.format_report(s)


def test_a_confirmation_whose_interval_includes_zero_is_not_confirmed(tmp_path):
    play(tmp_path, BASELINE + [("cand000", 0.975, 42), ("cand000", 0.978, 43)])
    v = confirm(tmp_path, {"base000": [1.004, 0.999], "cand000": [0.999, 1.001]})  # a gain of 0.0015, sigma 0.0065
    conf = analysis.confirmation(analysis.load_results(tmp_path / "results.tsv")[0])
    assert conf["ci"][0] < 0 < conf["ci"][1] and not conf["confirmed"]
    assert v.line.startswith("not confirmed: best cand000 vs baseline base000: gain +0.001500")
    assert "the night's gain may be noise" in v.line


@pytest.mark.parametrize("held_gain, holds", [(0.012, True), (0.001, False)])
def test_the_confirmation_shows_the_gain_on_the_held_out_part_and_says_when_it_does_not_hold(tmp_path, held_gain,
                                                                                              holds):
    """Confirmation runs (seeds from 1000 up) also score the held-out part of the validation shard, in their
    receipts: the gain there sits next to the confirmed one; below half of it, the night may have fitted the
    validation set, and the line says so."""
    tsv = tmp_path / "results.tsv"
    play(tmp_path, BASELINE + [("cand000", 0.975, 42), ("cand000", 0.978, 43)])
    confirm(tmp_path, {"base000": [1.004, 0.999], "cand000": [0.981, 0.977]})  # a confirmed gain of 0.0225
    lines = tsv.read_text().splitlines()
    column = analysis.HEADER.index("receipt")
    for n, line in enumerate(lines):
        fields = line.split("\t")
        if fields[analysis.HEADER.index("verdict")] == "confirm":  # as prepare.py scores it under seeds 1001, 1002
            heldout = 1.05 - held_gain / 2 * (1 if fields[0] == "cand000" else -1)
            fields[column] = f"heldout={heldout:.6f} hsum=ab"
            lines[n] = "\t".join(fields)
    tsv.write_text("\n".join(lines) + "\n")
    conf = analysis.confirmation(analysis.load_results(tsv)[0])
    assert conf["gain"] == pytest.approx(0.0225) and conf["heldout_gain"] == pytest.approx(held_gain)
    assert conf["heldout_holds"] is holds
    line = analysis.confirmation_line(conf)
    assert f"; on the held-out part +{held_gain:.6f} (95% interval " in line
    assert line.endswith("the night may have fitted the validation set") is not holds, line


def test_with_nothing_kept_there_is_nothing_to_confirm(tmp_path):
    play(tmp_path, BASELINE + [("cand000", 1.004, 42)])
    df = analysis.load_results(tmp_path / "results.tsv")[0]
    assert analysis.confirmation(df) is None
    assert analysis.confirmation_line(None).startswith("nothing to confirm")


# -----------------------------------------------------------------------------
# The plain rule, the hand override, the command line


def test_the_plain_rule_keeps_one_run_strictly_lower_than_the_best(tmp_path):
    assert play(tmp_path, BASELINE[:1], "plain").verdict == "keep"
    assert play(tmp_path, BASELINE[:1] + [("cand000", 0.999, 42)], "plain").verdict == "keep"
    assert play(tmp_path, BASELINE[:1] + [("cand000", 1.000, 42)], "plain").verdict == "discard"  # equal
    v = play(tmp_path, BASELINE[:1] + [("cand000", 0.999, 42), ("cand001", 0.9995, 42)], "plain")
    assert v.verdict == "discard" and "vs best cand000 0.999000" in v.line


def test_a_rerun_reuses_the_commits_description(tmp_path):
    tsv = str(tmp_path / "results.tsv")
    for commit, bpb, seed in BASELINE:
        analysis.record(tsv, summary(bpb, seed), commit, "baseline" if seed == 42 else None)
    assert set(analysis.load_results(tsv)[0]["description"]) == {"baseline"}
    with pytest.raises(analysis.RecordError, match="give --description"):  # a new commit needs one
        analysis.record(tsv, summary(0.99, 42), "cand000")


def cli(tmp_path, *args, env=None):
    return subprocess.run([*python(), str(ROOT / "analysis.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=env)


def test_mark_overrides_and_judge_prints_the_evidence(tmp_path):
    play(tmp_path, BASELINE + [("cand000", 0.990, 42)])
    before = (tmp_path / "results.tsv").read_bytes()
    r = cli(tmp_path, "judge")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].startswith("rerun with seed 43: undecided: cand000")
    assert lines[1] == "  candidate cand000: seed 42 0.990000"
    assert lines[2].startswith("  best base000: seed 42 1.000000, seed 43 1.010000, seed 44 0.995000, seed 45 "
                               f"1.005000; estimated {MEAN:.6f} (sd {SIGMA / 2:.6f}) from 1 commit")
    assert lines[3] == (f"  error {SIGMA * math.sqrt(1.25):.6f}: sqrt(sigma {SIGMA:.6f}^2 / 1 + the best's sd "
                        f"{SIGMA / 2:.6f}^2), sigma on 3 dof")
    assert (tmp_path / "results.tsv").read_bytes() == before  # judge writes nothing
    r = cli(tmp_path, "mark", "--status", "keep")
    assert r.returncode == 0 and r.stdout == "keep: cand000 marked by hand\n", r.stderr
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    assert analysis.best_commit(df) == "cand000"


def test_record_without_a_log_outside_git_or_without_git_is_one_error_line(tmp_path):
    r = cli(tmp_path, "record", "--description", "x")
    assert r.returncode == 1 and r.stderr == "error: run.log: no such file; run `uv run train.py > run.log 2>&1` first\n"
    (tmp_path / "run.log").write_text("---\nval_bpb: 1.0\n")
    env = {"PATH": os.path.dirname(sys.executable), "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    r = cli(tmp_path, "record", "--description", "x", env=env)  # git is not on this PATH
    assert r.returncode == 1 and r.stderr == "error: git is not on PATH; install git (or give --commit <hash>)\n"
    assert not (tmp_path / "results.tsv").exists()
    play(tmp_path, BASELINE)
    r = cli(tmp_path, env=env)  # the report needs no git
    assert r.returncode == 0 and r.stdout.startswith("results.tsv: 1 experiments (4 runs)") and not r.stderr


def test_many_runs_recorded_at_once_all_land_whole(tmp_path):
    """Several GPUs finishing together: 4 writers x 10 runs each, no row lost or torn, the header once."""
    tsv = tmp_path / "results.tsv"

    def writer(w):
        for i in range(10):
            analysis.record(str(tsv), summary(1 + w / 100 + i / 1000, 42), f"w{w}i{i:05d}", f"writer {w} run {i}")

    with ThreadPoolExecutor(4) as pool:  # threads share no state but the file; flock is per open file
        list(pool.map(writer, range(4)))
    df, warnings = analysis.load_results(tsv)
    assert warnings == [] and len(df) == 40
    assert sorted(df["commit"]) == sorted(f"w{w}i{i:05d}" for w in range(4) for i in range(10))
    assert tsv.read_text().count("commit\tval_bpb") == 1


def test_a_verdict_names_the_bests_estimate_beside_its_runs_mean():
    """tests/data/results_tinystories_cpu_night.tsv, a real night: after a keep on one lucky run, the best's value a
    verdict compares with is the night's estimate, which differs from the mean of its runs; the line says so."""
    df = analysis.load_results(ROOT / "tests" / "data" / "results_tinystories_cpu_night.tsv")[0]
    rows = df.iloc[:df.index[df["commit"] == "b9ac22f"][0] + 1]
    line = analysis.judge(rows, "b9ac22f").line
    assert " vs best 07626b6 0.217707 estimated (its runs 0.182711: a kept run carries its luck): " in line, line
    assert analysis.judge(df.iloc[:5], "f990976").line.startswith("keep: baseline f990976 0.350318 (4 seeds)")


def test_the_committed_real_night_is_judged_again_as_it_was():
    """tests/data/results_real_run.tsv, a real night on a CPU: every decision run, judged again by today's rule on
    the rows before it (its own rows undecided, as they were when it was recorded), gets the verdict it got then."""
    df = analysis.load_results(ROOT / "tests" / "data" / "results_real_run.tsv")[0]
    decisions = df[df["verdict"] != "confirm"]
    for i in range(len(decisions)):
        rows = decisions.iloc[:i + 1].copy()
        commit = rows["commit"].iloc[-1]
        if i >= 7:  # after the baseline's seven runs
            rows.loc[rows["commit"] == commit, "status"] = "discard"
        assert analysis.judge(rows, commit).verdict == rows["verdict"].iloc[-1], (i, commit)
