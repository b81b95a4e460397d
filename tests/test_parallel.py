"""
docs/program-multi-gpu.md played with its own shell commands on a CPU, as an agent with slots would: two
commits run the real train.py at the same time in two git worktrees, on one prepared cache, and record into the
one results.tsv, while a third run, killed with SIGKILL, records as a crash and leaves the file whole; the
branch moves to the winner; a wave on SkyPilot clusters (a stand-in `sky` on PATH) is collected and recorded
like a local one, and a winner left off the branch is tried again on top; the morning's confirmation runs as a
wave; and skypilot.yaml and every `sky` command of the file load with SkyPilot's own parsers (no cloud
contacted).

Run: uv run pytest tests/test_parallel.py
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

import analysis
from helpers import (BLOCKS, DOC, ROOT, Agent, agent_env, bash_blocks, block, cache_digest, doc_block, line, make_repo,
                     new_idea, receipt_line, record, summary, uv_free, wave)
from helpers import SLOTS_TAG as TAG


def slot_env(cache, **extra):
    """The agent's environment (agent_env), with one torch thread per run: two runs side by side on a CPU
    need a core each (docs/multi-gpu.md), as each needs a GPU of its own on a GPU box."""
    return dict(agent_env(cache), OMP_NUM_THREADS="1", **extra)


def run_pid(slot):
    """The pid of the python that runs train.py in `slot` (from /proc), or None (none yet, or no /proc)."""
    for proc in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[:2] == [os.fsencode(sys.executable), b"train.py"] and os.readlink(proc / "cwd") == str(slot):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def play_wave(agent, slots, timeout=900, when_all_train=lambda: None):
    """Plays the wave and watches each slot's run.log: returns, per slot, when its first training step was logged
    and when its summary was, as seen from here. A run that trains before the others is held there (SIGSTOP) until
    they all train, then `when_all_train` is called and the held runs go on: on a busy machine one run's start-up
    can outlast another's two steps, and runs that are really at the same time get there whatever the load. A wave
    that ran its slots one after the other never gets there."""
    slot_dirs = [(agent.repo / ".worktrees" / str(n)).resolve() for n, _ in slots]
    logs = [slot / "run.log" for slot in slot_dirs]
    for log in logs:
        log.unlink(missing_ok=True)
    proc = subprocess.Popen(["bash", "-c", wave(slots)], cwd=agent.repo, env=agent.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = [[None, None] for _ in logs]
    held, all_trained = {}, False  # slot index -> (pid, since when)
    deadline = time.time() + timeout
    try:
        while True:
            finished, now = proc.poll() is not None, time.time()
            for times, log in zip(seen, logs):
                text = log.read_text(errors="replace") if log.exists() else ""
                for i, mark in enumerate(("\nstep 00000 ", "\nval_bpb:")):
                    if times[i] is None and mark in text:
                        times[i] = now
            if not all_trained and all(times[0] for times in seen):
                all_trained = True
                when_all_train()
                for pid, _ in held.values():
                    os.kill(pid, signal.SIGCONT)
            elif not all_trained:
                for i, (times, slot) in enumerate(zip(seen, slot_dirs)):
                    if times[0] and i not in held and times[1] is None and (pid := run_pid(slot)):
                        os.kill(pid, signal.SIGSTOP)
                        held[i] = (pid, now)
                waited = [i for i, (_, since) in held.items() if now - since > 120]
                assert not waited, f"slot {waited[0]} trained alone for 120 s: the wave's runs are not at the same time"
            if finished:
                break
            assert now < deadline, "the wave did not end"
            time.sleep(0.05)
    finally:
        for pid, _ in held.values():
            if not all_trained:
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == 0, proc.stdout.read()
    return seen


def rows(repo):
    lines = (repo / "results.tsv").read_text().splitlines(keepends=True)
    assert lines[0] == "\t".join(analysis.HEADER) + "\n", lines[0]
    assert all(x.endswith("\n") and len(x.split("\t")) == len(analysis.HEADER) for x in lines[1:]), lines
    return [x.rstrip("\n").split("\t") for x in lines[1:]]


def setup_slots(agent, repo, n_slots):
    """program.md's setup steps 2 and 5, then a worktree per slot."""
    agent.sh(block("git checkout -b"), tag=TAG)
    agent.sh(block("printf 'commit"))
    for n in range(n_slots):
        agent.sh(doc_block("add"), n=str(n))
    return [repo / ".worktrees" / str(n) for n in range(n_slots)]


def edit(agent, commit):
    """The lines a commit removes and adds."""
    diff = agent.git("diff", f"{commit}~1", commit).splitlines()
    return [x for x in diff if x[:1] in ("+", "-") and not x.startswith(("+++", "---"))]


def add_job(agent, sky_state, log, commit, seed, val_bpb):
    """The log the stand-in `sky` serves for `commit` under `seed`: a local run's log (of the same settings) with
    that seed and val_bpb, and a receipt to match (the commit the cluster checked out, a run of its own)."""
    log = re.sub(r"^val_bpb: .*$", f"val_bpb:          {val_bpb:.6f}", log, flags=re.M)
    log = re.sub(r"^seed: .*$", f"seed:             {seed}", log, flags=re.M)
    receipt = dict(analysis.parse_receipts(log)[0], val_bpb=val_bpb, commit=agent.git("rev-parse", commit),
                   run=os.urandom(6).hex())
    log = re.sub(r"^receipt: .*$", lambda m: "receipt: " + json.dumps(receipt), log, flags=re.M)
    (sky_state / "jobs" / f"{agent.git('rev-parse', commit)}-{seed}.log").write_text(log)


# A stand-in for SkyPilot's `sky`: it writes down every call, and `sky logs ar-<n>` prints the log of the job
# last started on that cluster, as SkyPilot would: each line with Ray's "(autoresearch, pid=N) " prefix, then
# a line of its own. The job's log is one this test wrote under jobs/<COMMIT>-<SEED>.log.
FAKE_SKY = """
import json, os, sys
state, args = os.environ["FAKE_SKY_STATE"], sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] in ("launch", "exec"):
    cluster = args[args.index("--cluster") + 1] if args[0] == "launch" else args[1]
    env = dict(a.split("=", 1) for before, a in zip(args, args[1:]) if before == "--env")
    with open(os.path.join(state, cluster), "w") as f:
        f.write(f"{env['COMMIT']}-{env['SEED']}")
    print(f"Job submitted on {cluster}")
elif args[0] == "logs":
    with open(os.path.join(state, args[1])) as f, open(os.path.join(state, "jobs", f.read() + ".log")) as log:
        for text in log:
            sys.stdout.write("(autoresearch, pid=4242) " + text)
    print("Job finished (status: SUCCEEDED).")
"""


def fake_sky(tmp_path, env):
    state, bin_dir = tmp_path / "sky-state", tmp_path / "bin"
    (state / "jobs").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "sky.py").write_text(FAKE_SKY)
    (bin_dir / "sky").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$(dirname "$0")/sky.py" "$@"\n')
    (bin_dir / "sky").chmod(0o755)
    env.update(FAKE_SKY_STATE=str(state), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    return state


# -----------------------------------------------------------------------------
# A night in miniature on two slots


def test_slots_run_at_once_survive_a_killed_run_merge_the_winner_run_on_skypilot_and_confirm(prepared_cache, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = slot_env(prepared_cache, AUTORESEARCH_RULE="plain")  # one run each: a baseline and an idea share a wave
    sky_state = fake_sky(tmp_path, env)
    make_repo(repo, env, slow_start=False)
    agent = Agent(repo, env)
    slots = setup_slots(agent, repo, 3)
    base = agent.git("rev-parse", "--short=7", "HEAD")

    # Wave 1: slot 0 the baseline, no edit; slots 1 and 2 an idea each, committed in their own worktree
    agent.sh(line("commit", "git -C .worktrees/<n> checkout"), n="0", commit=f"autoresearch/{TAG}")
    idea = new_idea(agent, slots[1], 1, "MATRIX_LR", "0.05")
    killed = new_idea(agent, slots[2], 2, "MATRIX_LR", "0.03")
    assert idea != base and agent.git("rev-parse", "--short=7", "HEAD") == base  # the root did not move
    assert "MATRIX_LR = 0.05" not in (repo / "train.py").read_text()  # nor did its files

    # Slots 0 and 1 run the wave block as written. Slot 2's line runs on its own, in a process group of its own
    # and without `timeout` (which would put the run in a group of its own again), so that it alone can be
    # killed with SIGKILL, as a dying machine would kill it. Its budget is
    # 600 s, so it is still training when the other two are: it starts first, and is killed once they train.
    before = cache_digest(prepared_cache)
    alone = wave([(2, 42)]).splitlines()[0]
    alone = alone.removesuffix(" &").replace("timeout 600 ", "")
    alone = subprocess.Popen(["bash", "-c", alone], cwd=repo, env=dict(env, AUTORESEARCH_TIME_BUDGET="600"),
                             start_new_session=True)
    kill_time = []

    def trains(n):
        log = slots[n] / "run.log"
        return log.exists() and "\nstep 00001 " in log.read_text(errors="replace")

    def kill_slot_2():
        assert alone.poll() is None and trains(2), "slot 2 ended before it was killed"
        os.killpg(alone.pid, signal.SIGKILL)
        kill_time.append(time.time())

    try:
        deadline = time.time() + 120
        while not trains(2):
            assert alone.poll() is None and time.time() < deadline, (slots[2] / "run.log").read_text()[-2000:]
            time.sleep(0.05)
        seen = play_wave(agent, [(0, 42), (1, 42)], when_all_train=kill_slot_2)
        assert alone.wait(timeout=60) == -signal.SIGKILL and kill_time, "slot 2 was not killed while it trained"
    finally:
        if alone.poll() is None:
            os.killpg(alone.pid, signal.SIGKILL)
            alone.wait()
    logs = [summary(slot / "run.log") for slot in slots[:2]]
    assert all("val_bpb" in s for s in logs), [(slot / "run.log").read_text()[-2000:] for slot in slots]
    # at the same time, not one after the other: each run was training before the other one ended, and
    # before slot 2 was killed
    (start0, end0), (start1, end1) = seen
    assert start0 < end1 and start1 < end0 and kill_time[0] < min(end0, end1), (seen, kill_time)

    said = [record(agent, 0, "baseline"), record(agent, 1, "MATRIX_LR 0.05"), record(agent, 2, "MATRIX_LR 0.03")]
    got = rows(repo)
    assert [r[0] for r in got] == [base, idea, killed]
    assert [r[4] for r in got] == ["baseline", "MATRIX_LR 0.05", "MATRIX_LR 0.03"]
    # the killed run: a crash with its seed (from its start-up line), the file whole
    assert said[2].startswith(f"crash: {killed} has no val_bpb"), said
    assert got[2][:-1] == [killed, "0.000000", "0.0", "crash", "MATRIX_LR 0.03", "42", "", "", "", "", "crash", "", "",
                           "", "", "plain", "", ""]  # this wave is judged by the plain rule
    assert got[2][-1] == agent.git("rev-parse", f"{killed}:train.py")[:12]  # the train.py that ran
    assert analysis.load_results(repo / "results.tsv")[1] == []  # no warnings
    got = got[:2]
    for row, s in zip(got, logs):  # each row is its own run's summary, nothing mixed up between the slots
        assert row[1] == f"{float(s['val_bpb']):.6f}" and row[2] == f"{float(s['peak_vram_mb']) / 1024:.1f}", row
        assert row[5:10] == ["42", "2", "sdpa", "cpu", s["init_fingerprint"]], row
        assert row[11:13] == ["0.01", "2048"] and row[16] == "" and "sum=" in row[17], row  # no flags; a receipt
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
    merge = line("record", "git switch -C")
    agent.sh(merge, tag=TAG)
    best = idea if idea_won else base
    assert agent.git("rev-parse", "--short=7", "HEAD") == best
    assert agent.git("branch", "--show-current") == f"autoresearch/{TAG}"

    # Wave 2 on SkyPilot clusters ar-0 (launched) and ar-1 (up already), two new ideas on top of the branch. The
    # clusters' runs are played by the stand-in `sky`: each job's log is the baseline's local log (seed 42, the
    # same settings) with the val_bpb this test wants, so that both ideas win.
    ideas = [new_idea(agent, slots[0], 0, "EMBEDDING_LR", "0.5"),
             new_idea(agent, slots[1], 1, "WARMDOWN_RATIO", "0.3")]
    best_bpb = min(float(r[1]) for r in got if r[3] == "keep")
    local = (slots[0] / "run.log").read_text()
    for commit, bpb in zip(ideas, (best_bpb - 0.01, best_bpb - 0.02)):
        add_job(agent, sky_state, local, commit, 42, bpb)
    sky = doc_block("sky").splitlines()
    assert [x.split()[:2] for x in sky] == [["sky", "launch"], ["sky", "exec"], ["wait"], ["sky", "logs"]], sky
    agent.sh("\n".join([sky[0].replace("<n>", "0"), sky[1].replace("<n>", "1"), sky[2]]), seed="42")
    for n in (0, 1):
        agent.sh(sky[3], n=str(n))
        assert (repo / ".worktrees" / f"sky-{n}.log").read_text().startswith("Job submitted on ar-")
    calls = [json.loads(x) for x in (sky_state / "calls.jsonl").read_text().splitlines()]
    assert sorted(c[:2] for c in calls[:2]) == [["exec", "ar-1"], ["launch", "--cluster"]], calls  # together
    assert [c[:2] for c in calls[2:]] == [["logs", "ar-0"], ["logs", "ar-1"]], calls
    said = [record(agent, 0, "EMBEDDING_LR 0.5"), record(agent, 1, "WARMDOWN_RATIO 0.3")]
    got = rows(repo)
    assert [r[0] for r in got[3:]] == ideas and [r[3] for r in got[3:]] == ["keep", "keep"], (got, said)
    assert [r[1] for r in got[3:]] == [f"{best_bpb - 0.01:.6f}", f"{best_bpb - 0.02:.6f}"]

    # both kept; the branch moves to the second, so the first is off the branch: discarded, tried again on top
    agent.sh(merge, tag=TAG)
    assert agent.git("rev-parse", "--short=7", "HEAD") == ideas[1]
    agent.sh(uv_free(doc_block("mark")), n="0", commit=ideas[0], tag=TAG)
    assert [r[3] for r in rows(repo)[3:]] == ["discard", "keep"]
    again = agent.git("-C", str(slots[0]), "rev-parse", "HEAD")
    assert agent.git("rev-parse", f"{again}~1") == agent.git("rev-parse", f"autoresearch/{TAG}")
    assert edit(agent, again) == edit(agent, ideas[0]), edit(agent, again)  # the same edit, now on top
    assert [x[:20] for x in edit(agent, again)] == ["-EMBEDDING_LR = 0.6 ", "+EMBEDDING_LR = 0.5 "]

    # The morning: the confirmation wave on the clusters, baseline and best under the first confirmation seed,
    # recorded out of order; then `confirm` names the next run. (Wave 1 played the local wave block already; a
    # second local wave would cost as much as the rest of this file.)
    assert "`uv run analysis.py confirm`" in (ROOT / DOC).read_text()
    said = agent.sh(uv_free("uv run analysis.py confirm")).stdout.strip()
    m = re.match(r"run (\w+) with seed (\d+): confirmation 1 of 4 \(the baseline; baseline (\w+) and best (\w+) "
                 r"under seeds 1001, 1002,", said)
    assert m and m.group(1) == m.group(3) == base and m.group(4) == ideas[1] and m.group(2) == "1001", said
    assert list(analysis.CONFIRM_SEEDS) == [1001, 1002]
    for n, commit in enumerate((base, ideas[1])):
        agent.sh(line("commit", "git -C .worktrees/<n> checkout"), n=str(n), commit=commit)
        add_job(agent, sky_state, local, commit, 1001, best_bpb - 0.001 * n)
    agent.sh("\n".join([sky[1].replace("<n>", "0"), sky[1].replace("<n>", "1"), sky[2]]), seed="1001")
    for n in (0, 1):
        agent.sh(sky[3], n=str(n))
    confirm = uv_free(doc_block("confirm"))
    said = [agent.sh(confirm, n=str(n)).stdout.strip() for n in (1, 0)]
    assert said[0].startswith(f"run {base} with seed 1001: confirmation 2 of 4"), said
    assert said[1].startswith(f"run {base} with seed 1002: confirmation 3 of 4"), said
    got = rows(repo)
    assert [(r[0], r[5], r[10]) for r in got[5:]] == [(ideas[1], "1001", "confirm"), (base, "1001", "confirm")]
    assert [r[3] for r in got] == ["keep", "keep" if idea_won else "discard", "crash", "discard", "keep", "keep",
                                   "keep"]
    agent.sh(merge, tag=TAG)  # the last row marked keep is the baseline's confirmation run: it moves nothing
    assert agent.git("rev-parse", "--short=7", "HEAD") == ideas[1]

    # cleaning up: the worktrees, then the clusters
    cleanup = doc_block("cleanup").splitlines()
    for n in (0, 1, 2):
        for command in cleanup:
            agent.sh(command, n=str(n))
    assert agent.git("worktree", "list", "--porcelain").count("worktree ") == 1
    assert not (repo / ".worktrees" / "0").exists()
    calls = [json.loads(x) for x in (sky_state / "calls.jsonl").read_text().splitlines()]
    assert calls[-3:] == [["down", "--yes", f"ar-{n}"] for n in (0, 1, 2)], calls


def test_every_bash_block_of_the_file_is_one_these_tests_play():
    assert sorted(bash_blocks(DOC)) == sorted(doc_block(name) for name in BLOCKS)
    placeholders = set(re.findall(r"<[a-z]+>", "".join(bash_blocks(DOC))))
    assert placeholders == {"<n>", "<gpu>", "<seed>", "<commit>", "<tag>", "<description>"}, placeholders


# -----------------------------------------------------------------------------
# SkyPilot: the task file, the commands and the logs they produce


LOAD_SKYPILOT = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args))
    raise OSError("this test is offline")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
import sky
from sky.client.cli import command
from sky.utils import dag_utils
try:
    sky.Task.from_yaml(sys.argv[1])
    missing = None
except ValueError as e:
    missing = str(e)
# what `sky launch skypilot.yaml --env COMMIT=... --env SEED=...` builds its task with
task, = dag_utils.load_chain_dag_from_yaml(sys.argv[1], env_overrides=[("COMMIT", "abc1234"), ("SEED", "43")]).tasks
resources, = task.resources
# each `sky` command line, as SkyPilot's own command line parses it (parsed only, never run)
parsed = []
for args in json.loads(sys.argv[2]):
    group = command.cli.make_context("sky", list(args))
    params = command.cli.get_command(group, args[0]).make_context(args[0], args[1:], parent=group).params
    parsed.append({k: list(v) if isinstance(v, tuple) else v for k, v in params.items()})
print(json.dumps({"name": task.name, "workdir": task.workdir, "setup": task.setup, "run": task.run,
                  "envs": task.envs, "accelerators": resources.accelerators, "num_nodes": task.num_nodes,
                  "missing_commit": missing, "commands": parsed, "connections": attempts}))
"""


def sky_argv(command):
    """A `sky` line of the file as its arguments: placeholders and the slot's commit filled in, redirections
    and `&` left out."""
    command = command.replace("$(git -C .worktrees/<n> rev-parse HEAD)", "0123abcd" * 5)
    args = shlex.split(command.replace("<n>", "0").replace("<seed>", "43"))
    assert args[0] == "sky", command
    return args[1:args.index(">")] if ">" in args else args[1:]


@pytest.mark.skipif(find_spec("sky") is None, reason="needs skypilot (the dev dependency group)")
def test_skypilot_yaml_and_the_sky_commands_load_with_skypilots_parsers(tmp_path):
    lines = [x for x in doc_block("sky").splitlines() + doc_block("cleanup").splitlines() if x.startswith("sky ")]
    argv = [sky_argv(x) for x in lines]
    assert [a[0] for a in argv] == ["launch", "exec", "logs", "down"], argv
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT", "AUTORESEARCH_"))}
    env.update(HOME=str(tmp_path), SKYPILOT_DISABLE_USAGE_COLLECTION="1")  # its state under tmp_path, not ~/.sky
    r = subprocess.run([sys.executable, "-c", LOAD_SKYPILOT, str(ROOT / "skypilot.yaml"), json.dumps(argv)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    task = json.loads(r.stdout.strip().splitlines()[-1])
    assert task["connections"] == []  # parsed offline: no cloud, no API server
    assert "COMMIT" in task["missing_commit"]  # forgetting --env COMMIT=... fails before anything is launched
    assert task["envs"] == {"COMMIT": "abc1234", "SEED": "43"}
    assert task["name"] == "autoresearch" and task["workdir"] == "." and task["num_nodes"] == 1
    assert task["accelerators"] == {"H100": 1}  # one GPU per experiment
    assert re.search(r"^uv sync$", task["setup"], re.M) and re.search(r"^uv run prepare\.py$", task["setup"], re.M)

    # the run: the commit, then program.md's own rerun command with its output in the job's log, not run.log
    local, = [b.strip() for b in bash_blocks() if b.startswith("AUTORESEARCH_SEED=<seed>") and b.count("\n") == 1]
    assert local.endswith(" uv run train.py > run.log 2>&1"), local  # the loop's rerun, step 8 of program.md
    expected = local.removesuffix(" > run.log 2>&1").replace("<seed>", "${SEED}")
    run = task["run"].splitlines()
    assert expected in run, (expected, run)
    checkout = [i for i, x in enumerate(run) if re.search(r'\bgit\b.* checkout .*"\$\{COMMIT\}"$', x)]
    assert checkout and checkout[0] < run.index(expected), run

    # the commands: the task file with the slot's commit and seed; a run that does not wait; a log that does
    launch, exec_, logs, down = task["commands"]
    for c in (launch, exec_):
        assert c["entrypoint"] == ["skypilot.yaml"] and c["detach_run"] is True, c
        assert c["env"] == [["COMMIT", "0123abcd" * 5], ["SEED", "43"]] and c["cluster"] == "ar-0", c
    assert launch["idle_minutes_to_autostop"] == 30 and launch["down"] is True and launch["yes"] is True, launch
    assert logs["cluster"] == "ar-0" and logs["follow"] is True and logs["job_ids"] == [], logs
    assert down["clusters"] == ["ar-0"] and down["yes"] is True, down


def test_a_log_collected_with_sky_logs_records_like_a_local_one(tmp_path):
    """`sky logs` puts SkyPilot's prefix before every line of the job's output (Ray's "(name, pid=N) " on
    clouds and Kubernetes, the same in color on Slurm) and adds its own lines; the row is the same."""
    local = textwrap.dedent("""\
        torch 2.9.1 | device: cuda (NVIDIA H100 80GB HBM3) | seed: 43 | precision: bf16 autocast | attention: fa3
        step 00953 (100.0%) | loss: 2.912345 | lrm: 0.00 | dt:    318ms | tok/sec: 1,650,000 | mfu:  39.8% | epoch: 1
        RECEIPT
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
        time_budget:      300
        eval_tokens:      20971520
        """).replace("RECEIPT", receipt_line(0.9979))
    ray = "".join(f"(autoresearch, pid=4242) {x}\n" for x in local.splitlines())
    slurm = "".join(f"\x1b[36m(autoresearch, pid=4242)\x1b[0m {x}\n" for x in local.splitlines())
    tail = "✓ Job finished (status: SUCCEEDED).\n"
    expected = analysis.make_row(analysis.parse_log(local), "abc1234", "x")
    assert expected[1:4] == ["0.997900", "44.0", "discard"] and expected[5:10] == [
        "43", "953", "fa3", "NVIDIA H100 80GB HBM3", "5d41402abc4b"] and expected[11:15] == ["300", "20971520",
                                                                                            "300.1", "325.9"]
    receipts = analysis.parse_receipts(local)
    assert len(receipts) == 1 and receipts[0]["val_bpb"] == 0.9979  # prepare.py's, checked by record
    for collected in (ray + tail, slurm + tail, "Tailing logs of job 3 on cluster 'ar-0'...\n" + ray):
        assert analysis.make_row(analysis.parse_log(collected), "abc1234", "x") == expected
        assert analysis.parse_receipts(collected) == receipts
    crashed = "".join(f"(autoresearch, pid=4242) {x}\n" for x in local.splitlines()[:2]) + tail
    assert analysis.make_row(analysis.parse_log(crashed), "abc1234", "x")[1:6] == ["0.000000", "0.0", "crash", "x",
                                                                                   "43"]
