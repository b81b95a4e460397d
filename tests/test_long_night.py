"""
The long night: an agent that loses its memory at every kind of point in the loop resumes from disk alone
(program.md's commands, `analysis.py status` and the report), never runs an experiment twice, and ends with the
same results.tsv as an uninterrupted night given the same runs; the report stays a page however long the night; the
agent reads under 1,000 characters per experiment (1,750 when wiped at every third step).

Training is simulated so that a night of 25 experiments costs seconds: a run writes the run.log train.py would (the
summary and prepare.py's receipt), its val_bpb from the ideas in train.py and the seed; analysis.py runs in this
process (`uv run analysis.py ...` is analysis.main). The rest is git and program.md's commands.

Run: uv run pytest tests/test_long_night.py
"""

import contextlib
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import analysis  # noqa: E402

TAG = "night"
SIGMA = 0.004  # a run's noise across seeds, in val_bpb
# The agent's ideas, in the order it tries them: (description, the change to train.py, its true gain in val_bpb).
# The third is the second under another name: the same train.py, which record refuses.
IDEAS = [("wider", "wider", 0.030), ("lr up", "lr up", -0.012), ("higher lr", "lr up", -0.012),
         ("deeper", "deeper", 0.012), ("rope base", "rope base", 0.0), ("no bias", "no bias", 0.003),
         ("gelu", "gelu", -0.020), ("lr down", "lr down", 0.0), ("qk norm", "qk norm", 0.010),
         ("dropout", "dropout", -0.030), ("window", "window", 0.0), ("tied", "tied", -0.004),
         ("batch", "batch", 0.004), ("muon 5", "muon 5", 0.0), ("adam b2", "adam b2", 0.0), ("init", "init", -0.002),
         ("softcap", "softcap", 0.0), ("swiglu", "swiglu", 0.008), ("value emb", "value emb", 0.0),
         ("decay", "decay", 0.0), ("heads", "heads", -0.006), ("warmdown", "warmdown", 0.003),
         ("final lr", "final lr", 0.0), ("aspect", "aspect", 0.0), ("norm eps", "norm eps", 0.0)]
GAINS = {change: gain for _, change, gain in IDEAS}
RECEIPT = dict(tokens=2048, rows=1, bytes=9000, nats=6000.0, sum="5" * 16, val="6" * 16, table="7" * 16,
               prepare="8" * 16, seq_len=2048, budget=300.0, batch=8, leak=0.0, causal=True, wrapped=False,
               val_loaders=0, train_tokens=4096, wall=305.0, dirty=[], seconds=1.0)
GIT_ENV = dict(GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@x", GIT_COMMITTER_NAME="a", GIT_COMMITTER_EMAIL="a@x",
               GIT_AUTHOR_DATE="2026-01-01T00:00:00", GIT_COMMITTER_DATE="2026-01-01T00:00:00")


def git(repo, *args):
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=dict(os.environ, **GIT_ENV))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def fake_run(repo, seed):
    """`timeout 600 uv run train.py > run.log 2>&1`, simulated: the true value is 1.0 minus the gains of the changes
    in train.py; the noise is fixed by train.py and the seed (a deterministic machine); prepare.py's receipt is the
    same in every run but for the value, the commit and the run id."""
    text = (repo / "train.py").read_text()
    value = 1.0 - sum(GAINS[change] for change in re.findall(r"^# change: (.+)$", text, re.M))
    val_bpb = round(value + random.Random(f"{text}{seed}").gauss(0, SIGMA), 6)
    commit = git(repo, "rev-parse", "HEAD")
    run = hashlib.sha256(f"{commit}{seed}".encode()).hexdigest()[:12]
    receipt = dict(RECEIPT, val_bpb=val_bpb, commit=commit, run=run)
    (repo / "run.log").write_text(
        f"| seed: {seed} |\nreceipt: {json.dumps(receipt)}\n---\nval_bpb:          {val_bpb:.6f}\n"
        "training_seconds: 300.0\ntotal_seconds:    310.0\npeak_vram_mb:     1024.0\nnum_steps:        100\n"
        f"seed:             {seed}\nattention:        sdpa\ndevice:           cpu\ninit_fingerprint: f{seed}\n"
        "time_budget:      300\neval_tokens:      2048\n")


def analysis_cli(repo, *args):
    """`uv run analysis.py ARGS` in `repo`, in this process; returns what it printed."""
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(repo)
    try:
        with contextlib.redirect_stdout(out):
            assert analysis.main(list(args)) == 0
    finally:
        os.chdir(cwd)
    return out.getvalue()


class Agent:
    """Follows program.md's loop from memory: `todo`, the next step, and `plan`, the index of its next idea. A wipe
    takes both: it then runs `analysis.py status` and does what its `next:` line says, and before a new idea reads
    `analysis.py`'s report and takes the first idea the night has not tried. `read` counts the characters of the
    command output it reads."""

    def __init__(self, repo):
        self.repo, self.todo, self.plan, self.read = repo, ("run", 42), 0, 0  # the baseline: no edit, no commit
        self.said = []  # every verdict line

    def reads(self, text):
        self.read += len(text)
        return text

    def wipe(self):
        self.todo, self.plan = ("status", None), None

    def step(self):
        """One step of the loop; returns the kind of step it was."""
        what, arg = self.todo
        repo = self.repo
        if what == "status":
            line = self.reads(analysis_cli(repo, "status")).splitlines()[-1]
            assert line.startswith("next: "), line
            self.todo = self.parse(line[len("next: "):])
        elif what == "idea":
            if self.plan is None:
                tried = self.reads(analysis_cli(repo))  # the report
                named = {line.split("  ")[-1] for line in tried.splitlines()}  # a row ends with its description
                named |= {d.strip() for line in tried.splitlines() if line.endswith(" ·") for d in line.split(" ·")}
                self.plan = next((i for i, (name, _, _) in enumerate(IDEAS) if name not in named), len(IDEAS))
            if self.plan == len(IDEAS):
                self.todo = ("confirm", None)
                return what
            name, change, _ = IDEAS[self.plan]
            self.plan += 1
            with open(repo / "train.py", "a") as f:
                f.write(f"# change: {change}\n")
            git(repo, "commit", "-qam", name)
            self.todo = ("run", 42)
        elif what == "run":
            fake_run(repo, arg)
            self.todo = ("record", None)
        elif what == "record":
            line = self.reads(analysis_cli(repo, "record", "--description", git(repo, "log", "-1", "--format=%s")))
            self.said.append(line.strip())
            self.todo = self.act(line.strip())
            return {"run": "rerun verdict", "reset": "discard verdict"}.get(self.todo[0], "verdict")
        elif what == "reset":
            git(repo, "reset", "--hard", "HEAD~1")
            self.todo = ("idea", None)
        elif what == "confirm":
            line = self.reads(analysis_cli(repo, "confirm")).strip()
            m = re.match(r"run (\w+) with seed (\d+)", line)
            if m:
                git(repo, "checkout", "-q", "--detach", m.group(1))
                fake_run(repo, int(m.group(2)))
                self.reads(analysis_cli(repo, "record", "--confirm"))
            else:
                git(repo, "checkout", "-q", f"autoresearch/{TAG}")
                self.todo = ("done", line)
        return what

    @staticmethod
    def act(verdict):
        """program.md's step 8: what the verdict's first words say."""
        if verdict.startswith("rerun with seed"):
            return ("run", int(verdict.split()[3].rstrip(":")))
        if verdict.startswith(("discard", "crash")) or verdict.startswith("refused") and "repeats" in verdict:
            return ("reset", None)
        assert verdict.startswith("keep"), verdict
        return ("idea", None)

    @staticmethod
    def parse(command):
        """status's next command as a step of the loop."""
        if command.startswith("a new idea"):
            return ("idea", None)
        if m := re.match(r"(?:AUTORESEARCH_SEED=(\d+) )?timeout 600 uv run train.py", command):
            return ("run", int(m.group(1) or 42))
        if command.startswith("uv run analysis.py record --description"):
            return ("record", None)
        if command.startswith("git reset --hard"):
            return ("reset", None)
        if command.startswith(("git checkout", "uv run analysis.py confirm")):
            return ("confirm", None)
        raise AssertionError(command)


WIPES = ("idea", "run", "rerun verdict", "discard verdict", "confirm")  # after the commit, after the run, after a
                                                                        # rerun or a discard verdict, mid-confirmation


def night(tmp_path, name, wipe=False):
    """A night of every idea and the confirmation in a new repository; with `wipe`, the agent's memory is wiped
    after every kind of step in WIPES, each at its first and then at every third time. Returns (results.tsv's text,
    the agent, the kinds of wipes)."""
    repo = tmp_path / name
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text("results.tsv*\nrun.log\n")
    (repo / "train.py").write_text("# the model\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "baseline")
    git(repo, "checkout", "-qb", f"autoresearch/{TAG}")
    (repo / "results.tsv").write_text("\t".join(analysis.HEADER) + "\n")
    agent, count, wiped = Agent(repo), {}, []
    while agent.todo[0] != "done":
        kind = agent.step()
        count[kind] = count.get(kind, 0) + 1
        if wipe and kind in WIPES and count[kind] % 3 == 1 and agent.todo[0] != "done":
            agent.wipe()
            wiped.append(kind)
    return (repo / "results.tsv").read_text(), agent, wiped


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted night: (its directory, results.tsv's text, the agent)."""
    path = tmp_path_factory.mktemp("nights")
    text, agent, _ = night(path, "whole")
    return path / "whole", text, agent


def test_an_agent_whose_memory_is_wiped_anywhere_resumes_from_disk_and_the_night_is_the_same(whole, tmp_path):
    repo, text, agent = whole
    again, wiped_agent, wiped = night(tmp_path, "wiped", wipe=True)
    assert set(wiped) == set(WIPES), wiped
    assert again == text  # no row lost, duplicated or rerun; every reset done; the same confirmation
    df, warnings = analysis.load_results(repo / "results.tsv")
    assert warnings == [] and df["description"].nunique() == len(IDEAS) + 1  # every idea once, and the baseline
    assert (df["verdict"] == "confirm").sum() == 4 and "rerun" in set(df["verdict"])
    assert agent.todo[1].startswith(("confirmed: ", "not confirmed: "))
    # every recorded commit stays reachable after its reset, under the night's tag
    refs = git(repo, "for-each-ref", "--format=%(objectname:short=7)", f"refs/autoresearch/{TAG}/").split()
    assert sorted(refs) == sorted(set(df["commit"]))
    lost = df.loc[df["status"] == "discard", "commit"].iloc[0]
    assert "# change:" in git(repo, "show", f"{lost}:train.py")
    # the context the agent read per experiment: under 1,000 characters uninterrupted; wiped at every third step of
    # each kind, which rereads the report (one page for the person and the agent), under 1,750
    assert agent.read / len(IDEAS) < 1000, agent.read / len(IDEAS)
    assert wiped_agent.read / len(IDEAS) < 1750, wiped_agent.read / len(IDEAS)


def test_a_repeated_train_py_is_refused_naming_the_earlier_commit_and_a_rerun_is_not(whole):
    repo, _, agent = whole
    df, _ = analysis.load_results(repo / "results.tsv")
    first = df.loc[df["description"] == "lr up", "commit"].iloc[0]
    refused = df[df["verdict"] == "refused"]
    assert list(refused["description"]) == ["higher lr"] and list(refused["flags"]) == ["refused:again"]
    line = next(line for line in agent.said if line.startswith("refused"))
    assert line.startswith(f"refused: train.py repeats {first} ") and "discard" in line, line
    decisions = df[(df["verdict"] != "confirm") & (df["commit"] != df["commit"].iloc[0])]
    reruns = decisions[decisions.duplicated("commit", keep=False)]
    assert len(reruns) >= 2 and (reruns["verdict"] != "refused").all()  # a commit's own rerun is never a repeat


def test_the_report_of_a_long_night_is_a_page():
    """A simulated night of 150 experiments (a third of them rerun, one in seven kept): the report is at most 80
    lines and names the kept stack, the near misses and the latest experiments."""
    rng = random.Random(0)
    text = "\t".join(analysis.HEADER) + "\n"
    rows = [("base", 1.0 + rng.gauss(0, SIGMA), s, "keep") for s in (42, 43, 44, 45)]
    for i in range(150):
        status = "keep" if rng.random() < 1 / 7 else "discard"
        rows += [(f"c{i:06d}", 1.0 - i * 1e-4 + rng.gauss(0, SIGMA), s, status) for s in (42, 43)[:1 + (i % 3 == 0)]]
    for commit, bpb, seed, status in rows:
        summary = {"val_bpb": f"{bpb:.6f}", "seed": str(seed), "num_steps": "100", "device": "cpu"}
        fields = analysis.make_row(summary, commit, f"idea {commit}")
        fields[3] = status
        text += "\t".join(fields) + "\n"
    df, _ = analysis.parse_results(text)
    lines = analysis.format_report(analysis.summarize(df)).splitlines()
    assert len(lines) <= analysis.REPORT_LINES, len(lines)
    assert any("kept" in line for line in lines) and any("near misses" in line for line in lines)
    assert f"idea c{149:06d}" in "\n".join(lines)
