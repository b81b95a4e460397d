"""
program.md's "More than one GPU", played with its own shell commands on a CPU: two slots (git worktrees) at two
commits run the real train.py at the same time on one prepared cache and record into the one results.tsv; the
winner is merged onto the branch; a run killed with SIGKILL leaves the other run's row and the file whole; and
skypilot.yaml loads with SkyPilot's own parser (no cloud contacted) and runs the same command as a local run.

Run: uv run pytest tests/test_parallel.py
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from importlib.util import find_spec

import pytest

import analysis
from conftest import ROOT
from test_loop import Agent, agent_env, block, make_repo, set_constant

TAG = "par1"
UV_RUN = "uv run --project ../.. "  # a slot's `uv run`: the repository's .venv, not a new one per worktree


def uv_free(command):
    """A slot's command with this test's interpreter for `uv run --project ../..` (the same reason as in
    test_loop.run_block: the interpreter running this test already is the project's environment)."""
    assert command.count(UV_RUN) == 1, command
    return command.replace(UV_RUN, shlex.quote(sys.executable) + " ")


def wave(slots):
    """program.md's wave block for `slots` [(n, seed)]: its first line once per slot, then `wait`. <gpu> is
    empty: no GPU is visible, so every run uses the CPU settings, on any machine."""
    first, rest = block("CUDA_VISIBLE_DEVICES=<gpu>").split("\n", 1)
    assert rest.strip() == "wait", rest
    lines = [uv_free(first).replace("<n>", str(n)).replace("<gpu>", "").replace("<seed>", str(seed))
             for n, seed in slots]
    if shutil.which("timeout") is None:  # program.md's fallback where `timeout` is missing
        lines = [line.replace("timeout 600 ", "") for line in lines]
    return "\n".join(lines + ["wait"])


def record(agent, n, description):
    return agent.sh(uv_free(block("--tsv ../../results.tsv record")), n=str(n), description=description,
                    timeout=120).stdout.strip()


def cache_digest(cache):
    """Every file in the cache, by path, with the sha256 of its bytes."""
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache.rglob("*")) if p.is_file()}


def summary(log):
    return analysis.parse_log(log.read_text(errors="replace"))


def rows(repo):
    lines = (repo / "results.tsv").read_text().splitlines(keepends=True)
    assert lines[0] == "\t".join(analysis.HEADER) + "\n", lines[0]
    assert all(line.endswith("\n") and len(line.split("\t")) == len(analysis.HEADER) for line in lines[1:]), lines
    return [line.rstrip("\n").split("\t") for line in lines[1:]]


def setup_slots(agent, repo, n_slots):
    """Setup steps 2 and 5, then a worktree per slot, as program.md says."""
    agent.sh(block("git checkout -b"), tag=TAG)
    agent.sh(block("printf 'commit"))
    for n in range(n_slots):
        agent.sh(block("git worktree add"), n=str(n))
    return [repo / ".worktrees" / str(n) for n in range(n_slots)]


# -----------------------------------------------------------------------------
# Two runs at once on one box


def test_two_commits_run_at_once_in_two_worktrees_into_one_results_tsv(prepared_cache, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = agent_env(prepared_cache)
    env["AUTORESEARCH_RULE"] = "plain"  # one run per experiment: a baseline and an idea can share a wave
    make_repo(repo, env)
    agent = Agent(repo, env)
    slots = setup_slots(agent, repo, 2)
    base = agent.git("rev-parse", "--short=7", "HEAD")

    # slot 0: the baseline, no edit; slot 1: an idea, committed in its own worktree
    for n in (0, 1):
        agent.sh(block("checkout --quiet --detach <commit>"), n=str(n), commit=f"autoresearch/{TAG}")
    set_constant(slots[1], "MATRIX_LR", "0.05")
    agent.sh(block("commit --quiet -m"), n="1", description="MATRIX_LR 0.05")
    idea = agent.git("-C", str(slots[1]), "rev-parse", "--short=7", "HEAD")
    assert idea != base and agent.git("rev-parse", "--short=7", "HEAD") == base  # the root did not move
    assert "MATRIX_LR = 0.05" not in (repo / "train.py").read_text()  # nor did its files

    before = cache_digest(prepared_cache)
    t0 = time.time()
    agent.sh(wave([(0, 42), (1, 42)]), timeout=900)
    wall = time.time() - t0
    logs = [summary(slot / "run.log") for slot in slots]
    assert all("val_bpb" in s for s in logs), [(slot / "run.log").read_text()[-2000:] for slot in slots]
    # at the same time, not one after the other: the wave took less than the two runs' own wall times added up
    assert wall < sum(float(s["total_seconds"]) for s in logs), (wall, [s["total_seconds"] for s in logs])

    said = [record(agent, 0, "baseline"), record(agent, 1, "MATRIX_LR 0.05")]
    got = rows(repo)
    assert [r[0] for r in got] == [base, idea]
    assert [r[4] for r in got] == ["baseline", "MATRIX_LR 0.05"]
    for row, s in zip(got, logs):  # each row is its own run's summary, nothing mixed up between the slots
        assert row[1] == f"{float(s['val_bpb']):.6f}" and row[2] == f"{float(s['peak_vram_mb']) / 1024:.1f}", row
        assert row[5:10] == ["42", "12", "sdpa", "cpu", s["init_fingerprint"]], row
    assert got[0][1] != got[1][1]  # two different experiments
    idea_won = float(got[1][1]) < float(got[0][1])  # the plain rule: strictly lower than the best kept
    assert [r[3] for r in got] == ["keep", "keep" if idea_won else "discard"], (got, said)
    assert said[0].startswith(f"keep: baseline {base} ") and said[1].startswith(f"{got[1][3]}: {idea} "), said
    assert cache_digest(prepared_cache) == before  # read, never written

    # nothing left behind but run.log: not in the slots, not at the root (.worktrees is git-ignored)
    for slot in slots:
        left = agent.sh(f"git -C {slot} status --porcelain --ignored").stdout.splitlines()
        assert "!! run.log" in left and set(left) <= {"!! run.log", "!! __pycache__/"}, left
    assert agent.sh("git status --porcelain").stdout == ""

    # merging: the branch moves to the last kept commit, the one the next runs are compared with
    agent.sh(block("git switch -C"), tag=TAG)
    assert agent.git("rev-parse", "--short=7", "HEAD") == (idea if idea_won else base)
    assert agent.git("branch", "--show-current") == f"autoresearch/{TAG}"

    # cleaning up
    for n in (0, 1):
        agent.sh(block("git worktree remove").split("\n")[0], n=str(n))
    assert agent.git("worktree", "list", "--porcelain").count("worktree ") == 1
    assert not (repo / ".worktrees" / "0").exists()


def test_a_run_killed_mid_wave_leaves_the_other_row_and_the_file_whole(prepared_cache, tmp_path):
    """The seeds of one commit side by side (the baseline's 42 and 43); the second is killed with SIGKILL while
    it trains. The first still finishes and records; the killed one records as a crash with its seed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = agent_env(prepared_cache)
    make_repo(repo, env)
    agent = Agent(repo, env)
    slots = setup_slots(agent, repo, 2)
    base = agent.git("rev-parse", "--short=7", "HEAD")
    before = cache_digest(prepared_cache)

    # each slot's line of the wave on its own, in a process group of its own, so one run can be killed alone;
    # without `timeout`, which would put the run in a process group of its own again
    lines = [line.removesuffix(" &").replace("timeout 600 ", "") for line in wave([(0, 42), (1, 43)]).splitlines()[:2]]
    procs = [subprocess.Popen(["bash", "-c", line], cwd=repo, env=env, start_new_session=True) for line in lines]
    try:
        deadline = time.time() + 300
        while "step 00001" not in ((slots[1] / "run.log").read_text() if (slots[1] / "run.log").exists() else ""):
            assert time.time() < deadline and procs[1].poll() is None, "slot 1 never started training"
            time.sleep(0.1)
        assert procs[0].poll() is None  # the other run is still going
        os.killpg(procs[1].pid, signal.SIGKILL)
        assert procs[1].wait(timeout=30) == -signal.SIGKILL
        assert procs[0].wait(timeout=600) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    said = [record(agent, 0, "baseline"), record(agent, 1, "baseline")]
    assert said[0].startswith("rerun with seed 43: baseline 1 of 4 runs"), said
    assert said[1].startswith(f"crash: {base} has no val_bpb"), said
    got = rows(repo)
    s = summary(slots[0] / "run.log")
    assert got[0][:6] == [base, f"{float(s['val_bpb']):.6f}", f"{float(s['peak_vram_mb']) / 1024:.1f}", "keep",
                          "baseline", "42"], got
    assert got[0][6:] == ["12", "sdpa", "cpu", s["init_fingerprint"], "rerun"], got
    assert got[1] == [base, "0.000000", "0.0", "crash", "baseline", "43", "", "", "", "", "crash"], got
    df, warnings = analysis.load_results(repo / "results.tsv")
    assert warnings == [] and len(df) == 2
    assert cache_digest(prepared_cache) == before


# -----------------------------------------------------------------------------
# SkyPilot: the task file and the logs it produces


LOAD_SKYPILOT_YAML = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args))
    raise OSError("this test is offline")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
import sky
from sky.utils import dag_utils
try:
    sky.Task.from_yaml(sys.argv[1])
    missing = None
except ValueError as e:
    missing = str(e)
# what `sky launch skypilot.yaml --env COMMIT=... --env SEED=...` builds its task with
task, = dag_utils.load_chain_dag_from_yaml(sys.argv[1], env_overrides=[("COMMIT", "abc1234"), ("SEED", "43")]).tasks
resources, = task.resources
print(json.dumps({"name": task.name, "workdir": task.workdir, "setup": task.setup, "run": task.run,
                  "envs": task.envs, "accelerators": resources.accelerators, "num_nodes": task.num_nodes,
                  "missing_commit": missing, "connections": attempts}))
"""


@pytest.mark.skipif(find_spec("sky") is None, reason="needs skypilot (the dev dependency group)")
def test_skypilot_yaml_loads_with_skypilots_parser_and_runs_the_local_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT", "AUTORESEARCH_"))}
    env.update(HOME=str(tmp_path), SKYPILOT_DISABLE_USAGE_COLLECTION="1")  # its state under tmp_path, not ~/.sky
    r = subprocess.run([sys.executable, "-c", LOAD_SKYPILOT_YAML, str(ROOT / "skypilot.yaml")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    task = json.loads(r.stdout.strip().splitlines()[-1])
    assert task["connections"] == []  # parsed offline: no cloud, no API server
    assert "COMMIT" in task["missing_commit"]  # forgetting --env COMMIT=... fails before anything is launched
    assert task["envs"] == {"COMMIT": "abc1234", "SEED": "43"}
    assert task["name"] == "autoresearch" and task["workdir"] == "." and task["num_nodes"] == 1
    assert task["accelerators"] == {"H100": 1}  # one GPU per experiment
    assert re.search(r"^uv sync$", task["setup"], re.M) and re.search(r"^uv run prepare\.py$", task["setup"], re.M)

    # the run: the commit, then program.md's own rerun command with its output in the job's log, not run.log
    local = block("AUTORESEARCH_SEED=<seed>", "uv run train.py > run.log 2>&1").strip()  # the loop's rerun, step 8
    assert local.endswith(" > run.log 2>&1") and "\n" not in local, local
    expected = local.removesuffix(" > run.log 2>&1").replace("<seed>", "${SEED}")
    run = task["run"].splitlines()
    assert expected in run, (expected, run)
    checkout = [i for i, line in enumerate(run) if re.search(r'\bgit\b.* checkout .*"\$\{COMMIT\}"$', line)]
    assert checkout and checkout[0] < run.index(expected), run


def test_a_log_collected_with_sky_logs_records_like_a_local_one(tmp_path):
    """`sky logs` puts SkyPilot's prefix before every line of the job's output (Ray's "(name, pid=N) " on
    clouds and Kubernetes, the same in color on Slurm) and adds its own lines; the row is the same."""
    local = textwrap.dedent("""\
        torch 2.9.1 | device: cuda (NVIDIA H100 80GB HBM3) | seed: 43 | precision: bf16 autocast | attention: fa3
        step 00953 (100.0%) | loss: 2.912345 | lrm: 0.00 | dt:    318ms | tok/sec: 1,650,000 | mfu:  39.8% | epoch: 1
        ---
        val_bpb:          0.997900
        training_seconds: 300.1
        total_seconds:    325.9
        peak_vram_mb:     45060.2
        mfu_percent:      39.80
        total_tokens_M:   499.6
        num_steps:        953
        num_params_M:     50.3
        depth:            8
        seed:             43
        attention:        fa3
        device:           NVIDIA H100 80GB HBM3
        init_fingerprint: 5d41402abc4b
        """)
    ray = "".join(f"(autoresearch, pid=4242) {line}\n" for line in local.splitlines())
    slurm = "".join(f"\x1b[36m(autoresearch, pid=4242)\x1b[0m {line}\n" for line in local.splitlines())
    tail = "✓ Job finished (status: SUCCEEDED).\n"
    expected = analysis.make_row(analysis.parse_log(local), "abc1234", "x")
    assert expected[1:4] == ["0.997900", "44.0", "discard"] and expected[5:10] == [
        "43", "953", "fa3", "NVIDIA H100 80GB HBM3", "5d41402abc4b"]
    for collected in (ray + tail, slurm + tail, "Tailing logs of job 3 on cluster 'ar-0'...\n" + ray):
        assert analysis.make_row(analysis.parse_log(collected), "abc1234", "x") == expected
    crashed = "".join(f"(autoresearch, pid=4242) {line}\n" for line in local.splitlines()[:2]) + tail
    assert analysis.make_row(analysis.parse_log(crashed), "abc1234", "x")[1:6] == ["0.000000", "0.0", "crash", "x",
                                                                                   "43"]
