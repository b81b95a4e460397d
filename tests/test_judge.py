"""
The keep/discard judgement (analysis.judge, `analysis.py record`) on small hand-made results.tsv tables: the
baseline's seeds, the noise floor, clear losers and winners, reruns, completing a kept commit, seed-for-seed
comparisons, refused comparisons, the hand override, and many runs recorded at once.

Run: uv run pytest tests/test_judge.py
"""

import math
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import analysis  # noqa: E402

# the baseline's four runs: seeds 42, 43, 44, then 42 again
BASELINE = [("base000", 1.000, 42), ("base000", 1.010, 43), ("base000", 0.995, 44), ("base000", 1.001, 42)]
SIGMA = statistics.stdev([1.000, 1.010, 0.995])  # one run per seed
FLOOR = math.sqrt(2) * SIGMA                      # 0.0108: how far a seed change moves val_bpb


def play(tmp_path, runs, rule="noise"):
    """Records `runs` one at a time as `analysis.py record` would (append, judge, write the status back);
    returns the verdict after the last one."""
    tsv = tmp_path / "results.tsv"
    tsv.unlink(missing_ok=True)
    verdict = None
    for run in runs:
        commit, bpb, seed = run[:3]
        fp = run[3] if len(run) > 3 and run[3] else f"{commit}-{seed}"
        attention, device = (run[4], run[5]) if len(run) > 5 else ("sdpa", "cpu")
        summary = {"val_bpb": f"{bpb}", "peak_vram_mb": "1024", "num_steps": "100", "seed": str(seed),
                   "attention": attention, "device": device, "init_fingerprint": fp}
        _, verdict = analysis.record(str(tsv), summary, commit, "x", rule)
    return verdict


def test_the_baseline_runs_under_every_seed_then_once_more_under_the_first(tmp_path):
    said = [play(tmp_path, BASELINE[:n])["line"] for n in range(1, 5)]
    assert [s.split(":")[0] for s in said] == ["rerun with seed 43", "rerun with seed 44", "rerun with seed 42",
                                               "keep"]
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    noise = analysis.noise_floor(df)
    assert noise["floor"] == pytest.approx(FLOOR) and noise["dof"] == 2
    assert noise["floor_same"] == pytest.approx(abs(1.000 - 1.001))  # sqrt(2) * the repeat's standard deviation
    assert set(df["status"]) == {"keep"}


def test_a_clear_loser_is_discarded_after_one_run(tmp_path):
    v = play(tmp_path, BASELINE + [("cand000", 1.003, 42)])  # worse than the baseline's mean (1.0017): z < 0
    assert v["verdict"] == "discard" and v["line"].startswith("discard: cand000 1.003000 (1 seed)")
    assert v["z"] < 0


def test_a_clear_winner_is_kept_after_one_run_then_completed_under_the_other_seeds(tmp_path):
    v = play(tmp_path, BASELINE + [("cand000", 0.970, 42)])  # 2.9 floors better: z = 3.6 unpaired
    assert v["z"] >= analysis.CLEAR_WIN
    assert (v["verdict"], v["status"], v["seed"]) == ("rerun", "keep", 43)
    assert v["line"].startswith("rerun with seed 43: kept, completing its seeds")
    v = play(tmp_path, BASELINE + [("cand000", 0.970, 42), ("cand000", 0.990, 43)])
    assert (v["verdict"], v["seed"]) == ("rerun", 44)  # once kept, it stays kept while its seeds complete
    v = play(tmp_path, BASELINE + [("cand000", 0.970, 42), ("cand000", 0.990, 43), ("cand000", 0.975, 44)])
    assert (v["verdict"], v["status"]) == ("keep", "keep")
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    assert list(df.loc[df["commit"] == "cand000", "status"]) == ["keep"] * 3
    # the next candidate is compared with the mean of its three seeds, not with its lucky first run
    v = play(tmp_path, BASELINE + [("cand000", 0.970, 42), ("cand000", 0.990, 43), ("cand000", 0.975, 44),
                                   ("next000", 0.976, 42)])
    assert v["best_commit"] == "cand000" and v["line"].split(":")[0] == "rerun with seed 43"
    assert "vs best cand000 0.978333 (3 seeds)" in v["line"]


def test_in_between_is_rerun_under_the_next_seed_and_decided_once_every_seed_has_run(tmp_path):
    runs = BASELINE + [("cand000", 0.990, 42)]  # 1.1 floors better: 0 < z < 3, within the noise of one run
    v = play(tmp_path, runs)
    assert 0 < v["z"] < analysis.CLEAR_WIN
    assert (v["verdict"], v["status"], v["seed"]) == ("rerun", "discard", 43)  # not kept until decided
    runs.append(("cand000", 0.989, 43))
    v = play(tmp_path, runs)
    assert 0 < v["z"] < analysis.CLEAR_WIN and (v["verdict"], v["seed"]) == ("rerun", 44)
    v = play(tmp_path, runs + [("cand000", 0.998, 44)])  # the third seed says it was mostly luck
    assert 0 < v["z"] < analysis.WIN and (v["verdict"], v["status"], v["seed"]) == ("discard", "discard", None)
    v = play(tmp_path, runs + [("cand000", 0.988, 44)])  # the third seed agrees
    assert v["z"] >= analysis.WIN and (v["verdict"], v["status"]) == ("keep", "keep")


def test_a_crash_is_a_crash(tmp_path):
    play(tmp_path, BASELINE)
    _, v = analysis.record(str(tmp_path / "results.tsv"), analysis.parse_log("Traceback\nOOM\n"), "cand000", "x")
    assert v["verdict"] == "crash" and v["line"].startswith("crash: cand000 has no val_bpb")
    last = (tmp_path / "results.tsv").read_text().splitlines()[-1].split("\t")
    assert last[:5] == ["cand000", "0.000000", "0.0", "crash", "x"] and last[-1] == "crash"


@pytest.mark.parametrize("attention, device, named", [("flex", "cpu", "attention flex on cpu"),
                                                      ("sdpa", "mps", "attention sdpa on mps")])
def test_a_run_on_another_backend_or_device_is_refused_not_compared(tmp_path, attention, device, named):
    v = play(tmp_path, BASELINE + [("cand000", 0.900, 42, None, attention, device)])
    assert v["verdict"] == "refused" and v["status"] == "discard"
    assert v["line"] == (f"refused: this run used {named}, the best base000 attention sdpa on cpu; not comparable: "
                         "fix that and rerun with seed 42")
    # a rerun under the right conditions is judged, and the refused run is left out of it
    v = play(tmp_path, BASELINE + [("cand000", 0.900, 42, None, attention, device), ("cand000", 1.003, 42)])
    assert v["verdict"] == "discard" and "cand000 1.003000 (1 seed)" in v["line"]


def test_the_baseline_refuses_a_run_under_other_conditions(tmp_path):
    v = play(tmp_path, BASELINE[:1] + [("base000", 1.01, 43, None, "fa3", "NVIDIA H100 80GB HBM3")])
    assert v["verdict"] == "refused" and "attention fa3 on NVIDIA H100 80GB HBM3" in v["line"]


def test_same_initial_weights_are_compared_seed_for_seed_once_that_noise_is_measured(tmp_path):
    # two hyperparameter edits from the baseline's weights (same fingerprint per seed): the first has no measured
    # seed-for-seed noise to lean on, so it is judged unpaired; its three seeds measure it for the second
    same = lambda commit, bpb, seed: (commit, bpb, seed, f"base000-{seed}")  # noqa: E731
    first = [same("lr00001", 0.999, 42), same("lr00001", 1.008, 43), same("lr00001", 0.993, 44)]
    v = play(tmp_path, BASELINE + first)
    assert not v["paired"] and v["verdict"] == "discard"  # 0.0017 better on average: z < 2 after three seeds
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    noise = analysis.noise_floor(df)
    diffs = [0.999 - 1.0005, 1.008 - 1.010, 0.993 - 0.995]  # against the baseline's per-seed means
    assert noise["dof_paired"] == 2 and noise["floor_paired"] == pytest.approx(statistics.stdev(diffs))
    v = play(tmp_path, BASELINE + first + [same("lr00002", 0.996, 42)])  # 0.0045 better under seed 42
    assert v["paired"] and v["se"] == pytest.approx(max(noise["floor_paired"], noise["floor_same"]))
    assert v["diff"] == pytest.approx(0.996 - 1.0005)  # against the baseline's seed 42, not its mean
    assert v["z"] == pytest.approx(4.5) and (v["verdict"], v["status"]) == ("rerun", "keep")  # kept, completing
    assert "seed for seed from the same weights" in v["line"]
    # the same numbers from other initial weights: unpaired, in between
    v = play(tmp_path, BASELINE + first + [("arch001", 0.996, 42)])
    assert not v["paired"] and v["verdict"] == "rerun"


def test_the_plain_rule_keeps_one_run_strictly_lower_than_the_best(tmp_path):
    assert play(tmp_path, BASELINE[:1], "plain")["verdict"] == "keep"
    assert play(tmp_path, BASELINE[:1] + [("cand000", 0.999, 42)], "plain")["verdict"] == "keep"
    assert play(tmp_path, BASELINE[:1] + [("cand000", 1.000, 42)], "plain")["verdict"] == "discard"  # equal
    v = play(tmp_path, BASELINE[:1] + [("cand000", 0.999, 42), ("cand001", 0.9995, 42)], "plain")
    assert v["verdict"] == "discard" and "vs best kept 0.999000" in v["line"]


def test_mark_overrides_the_status_of_every_run_of_a_commit(tmp_path):
    play(tmp_path, BASELINE + [("cand000", 0.970, 42)])
    r = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "mark", "--status", "discard"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "discard: cand000 marked by hand\n", r.stderr
    df, _ = analysis.load_results(tmp_path / "results.tsv")
    assert list(df.loc[df["commit"] == "cand000", "status"]) == ["discard"]
    assert analysis._best_commit(df, "next000") == "base000"  # the next idea is compared with the baseline again


def test_judge_cli_prints_the_verdict_again_and_writes_nothing(tmp_path):
    play(tmp_path, BASELINE + [("cand000", 0.995, 42)])
    before = (tmp_path / "results.tsv").read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "judge"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("rerun with seed 43: undecided: cand000")
    assert (tmp_path / "results.tsv").read_bytes() == before


def test_record_without_a_log_or_outside_git_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "record", "--description", "x"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == "error: run.log: no such file; run `uv run train.py > run.log 2>&1` first\n"
    (tmp_path / "run.log").write_text("---\nval_bpb: 1.0\n")
    r = subprocess.run([sys.executable, str(ROOT / "analysis.py"), "record", "--description", "x"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 1 and r.stderr.startswith("error: not in a git repository") and "Traceback" not in r.stderr
    assert not (tmp_path / "results.tsv").exists()


def test_many_runs_recorded_at_once_all_land_whole(tmp_path):
    """Several GPUs finishing together: 4 writers x 10 runs each, no row lost or torn, the header once."""
    tsv = tmp_path / "results.tsv"

    def writer(w):
        for i in range(10):
            summary = {"val_bpb": f"{1 + w / 100 + i / 1000:.6f}", "peak_vram_mb": "1024", "num_steps": "100",
                       "seed": "42", "attention": "sdpa", "device": "cpu", "init_fingerprint": f"w{w}i{i}"}
            analysis.record(str(tsv), summary, f"w{w}i{i:05d}", f"writer {w} run {i}")

    with ThreadPoolExecutor(4) as pool:  # threads share no state but the file; flock is per open file
        list(pool.map(writer, range(4)))
    df, warnings = analysis.load_results(tsv)
    assert warnings == [] and len(df) == 40
    assert sorted(df["commit"]) == sorted(f"w{w}i{i:05d}" for w in range(4) for i in range(10))
    assert tsv.read_text().count("commit\tval_bpb") == 1
