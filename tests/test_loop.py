"""
program.md's experiment loop played end to end, as an agent would: the shell commands in program.md's bash
blocks, run as written, in order, in a throwaway git repository (a copy of this repo's tracked files) with
the tiny prepared data, doing what each verdict says: the baseline under its four seeds, an edit that beats it by
far more than the noise (kept after its second run), an edit that ruins training (discarded after one), a broken
edit (a crash), and the morning's confirmation. Then results.tsv, git and analysis.py are checked. What it asserts
about verdicts follows from effects it controls, so it holds on any CPU. When the instructions drift away from what
works, this test breaks.

Run: uv run pytest tests/test_loop.py
"""

import os
import re
import shlex
import shutil
import subprocess
import textwrap

import pytest

import analysis
from conftest import ROOT, python_shell

TAG = "loop1"
HEADER = ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tseed\tnum_steps\tattention\tdevice\tinit_fingerprint"
          "\tverdict\ttime_budget\teval_tokens\ttraining_seconds\ttotal_seconds\trule\tflags\treceipt\ttrain_py\n")

# A budget shorter than one step: train.py always runs its uncounted warm-up steps (1 in the copy below), then
# stops after the first counted one. Every run is then exactly 2 steps on any machine, however busy. Like the real
# 5 minutes, it is the same for every experiment (an environment variable, not part of train.py).
TIME_BUDGET = "0.01"
EVAL_TOKENS = 2048  # one evaluation batch of the scaled-down DEVICE_BATCH_SIZE below (1 x 2048)

# Appended to train.py's small-machine block and committed on main before the agent starts: this stands for
# the repo's own train.py, scaled down further so that one experiment takes seconds on a CPU, and started with
# learning rates 30x too small, so that the agent's first idea (deleting that line) wins by far more than the noise.
# The copy also leaves 1 step uncounted instead of 11 (train.py's compile warm-up; nothing compiles on a CPU, and
# each step of the 8192-token vocabulary costs ~0.6-1.2 s here): tests/test_train.py runs the real count.
WARMUP = ("step > 10", "step > 0")
TINY_SETTINGS = """\
    # tests/test_loop.py: scaled down further, one 2048-token sequence per step, width 64
    DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 32
    TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = 2048, 1
    EMBEDDING_LR, UNEMBEDDING_LR, MATRIX_LR, SCALAR_LR = 0.02, 0.0001, 0.001, 0.02  # a slow start
"""


# -----------------------------------------------------------------------------
# program.md's commands


def bash_blocks(path="program.md"):
    """The bash blocks of an instructions file (program.md, docs/program-multi-gpu.md), each once."""
    text = (ROOT / path).read_text()
    blocks = [textwrap.dedent(m.group(2)) for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.M | re.S)]
    return list(dict.fromkeys(blocks))


PLAYED = {}  # path -> the blocks handed out so far: a test can check that it played every one


def block(*needles, path="program.md"):
    """The one bash block in `path` that contains every needle."""
    found = [b for b in bash_blocks(path) if all(n in b for n in needles)]
    assert len(found) == 1, f"{path}: expected one bash block containing {needles}, found {len(found)}"
    PLAYED.setdefault(path, set()).add(found[0])
    return found[0]


def without_uv(command):
    """A block with `uv run` replaced by this test's interpreter (conftest.python(): the night below runs train.py
    and analysis.py some 30 times): `uv run` here would build a second virtual environment inside the throwaway repo
    (slow, and it may want the network), and the interpreter running this test already is the project's
    environment. Where `timeout` is missing, program.md says to run without it."""
    command = command.replace("uv run ", python_shell() + " ")
    return command.replace("timeout 600 ", "") if shutil.which("timeout") is None else command


def uv_block(*needles, path="program.md"):
    command = block(*needles, path=path)
    assert command.count("uv run ") == 1, command
    return without_uv(command)


def run_block(rerun=False):
    """Loop step 4, or step 8's rerun under a seed: the one-line block that runs train.py."""
    found = [b for b in bash_blocks() if b.strip().endswith("uv run train.py > run.log 2>&1") and "\n" not in b.strip()
             and ("AUTORESEARCH_SEED=<seed>" in b) == rerun]
    assert len(found) == 1, f"program.md: expected one {'rerun' if rerun else 'run'} block, found {len(found)}"
    PLAYED.setdefault("program.md", set()).add(found[0])
    return without_uv(found[0])


class Agent:
    """Runs program.md's blocks with bash in the throwaway repo, placeholders filled in."""

    def __init__(self, repo, env):
        self.repo, self.env = repo, env

    def sh(self, script, check=True, timeout=120, **placeholders):
        for name, value in placeholders.items():
            script = script.replace(f"<{name}>", value)
        assert not re.findall(r"<[a-z_]+>", script), f"unfilled placeholder in:\n{script}"
        r = subprocess.run(["bash", "-c", script], cwd=self.repo, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert r.returncode == 0, f"{script}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def git(self, *args):
        return self.sh(shlex.join(["git", *args])).stdout.strip()

    def where(self):
        """Loop step 1, `analysis.py status`: (branch, HEAD's short hash, the next command)."""
        out = self.sh(uv_block("uv run analysis.py status")).stdout.splitlines()
        m = re.match(r"branch (\S+) at (\w+);", out[0])
        assert m and out[-1].startswith("next: "), out
        return m.group(1), m.group(2), out[-1][len("next: "):]

    def commit(self, description):
        """Loop step 3; returns the short hash of the new commit."""
        self.sh(block("git commit -m"), description=description)
        return self.git("rev-parse", "--short=7", "HEAD")

    def run_and_record(self, description, seed=None):
        """Loop steps 4 to 7 (or the rerun under `seed`): run, grep, on an empty grep read the tail, record."""
        placeholders = {"seed": str(seed)} if seed is not None else {}
        run = self.sh(run_block(rerun=seed is not None), check=False, timeout=900, **placeholders)
        grep = self.sh(block('grep "^val_bpb:'), check=False)
        tail = self.sh(block("tail -n 50 run.log")).stdout if not grep.stdout.strip() else None
        verdict = self.sh(uv_block("analysis.py record --description"), timeout=120,
                          description=description).stdout.strip()
        summary = dict(line.split(":", 1) for line in grep.stdout.splitlines())
        return {"rc": run.returncode, "grep": grep.stdout, "tail": tail, "verdict": verdict,
                "summary": {k: v.strip() for k, v in summary.items()},
                "log": (self.repo / "run.log").read_text(errors="replace")[-3000:]}

    def experiment(self, description):
        """Steps 4 to 8 for one commit: run, record, and rerun under the seed the verdict names until it says
        something else. Returns every run's result, the last one holding the final verdict."""
        results = [self.run_and_record(description)]
        while (m := re.match(r"rerun with seed (\d+):", results[-1]["verdict"])):
            results.append(self.run_and_record(description, seed=int(m.group(1))))
        return results

    def reset(self):
        """Loop step 8, discard or crash."""
        self.sh(block("git reset --hard"))

    def confirm(self):
        """"Confirming the gain": ask what to run, run it, record it, until it says confirmed. Returns the lines."""
        said = []
        while True:
            line = self.sh(uv_block("uv run analysis.py confirm")).stdout.strip()
            said.append(line)
            m = re.match(r"run (\w+) with seed (\d+): ", line)
            if not m:
                return said
            out = self.sh(without_uv(block("record --confirm")), timeout=300, commit=m.group(1), seed=m.group(2))
            said.append(out.stdout.strip())


def edit(repo, pattern, replacement):
    """The agent's edit to train.py: one regex substitution that must match exactly once."""
    path = repo / "train.py"
    src, n = re.subn(pattern, replacement, path.read_text(), flags=re.M)
    assert n == 1, f"{pattern!r} matched {n} times in train.py"
    path.write_text(src)


def set_constant(repo, name, value):
    edit(repo, rf"^({name} = )[^\s#]+", rf"\g<1>{value}")


def get_constant(repo, name):
    return float(re.search(rf"^{name} = ([^\s#]+)", (repo / "train.py").read_text(), re.M).group(1))


# -----------------------------------------------------------------------------
# The throwaway repository


def copy_tracked_files(path):
    """This repo's tracked files (as in the working tree) copied into `path`."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, path / name)


def make_repo(path, env, slow_start=True, warmup=WARMUP):
    """A copy of this repo's tracked files with its own history: main = the copy, then the scaled-down train.py
    (with learning rates 30x too small unless not `slow_start`; `warmup` (old, new) replaced in its loop, None for
    train.py's own)."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "--is-inside-work-tree"], capture_output=True).returncode:
        pytest.skip("the repo is not a git checkout (its tracked files are what the loop starts from)")
    copy_tracked_files(path)
    train_py = path / "train.py"
    tiny = TINY_SETTINGS if slow_start else "".join(line + "\n" for line in TINY_SETTINGS.splitlines()
                                                     if "a slow start" not in line)
    src, n = re.subn(r'^if DEVICE_TYPE != "cuda":\n(?:    .*\n)+', lambda m: m.group(0) + tiny,
                     train_py.read_text(), flags=re.M)
    assert n == 1, "train.py: the small-machine block (`if DEVICE_TYPE != \"cuda\":`) was not found"
    if warmup:
        assert src.count(warmup[0]) == 2, f"train.py: expected `{warmup[0]}` twice (the budget and the end check)"
        src = src.replace(*warmup)

    def git(*args):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)

    git("init", "-b", "main")
    git("config", "user.name", "autoresearch test")
    git("config", "user.email", "test@example.invalid")
    git("config", "commit.gpgsign", "false")
    git("add", "-A")
    git("commit", "-m", "autoresearch, as in the repo")
    train_py.write_text(src)
    git("commit", "-am", "train.py: smaller small-machine settings for tests/test_loop.py")


def agent_env(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "HF_", "GIT_"))}
    env.update({
        "AUTORESEARCH_CACHE_DIR": str(cache),
        "AUTORESEARCH_TIME_BUDGET": TIME_BUDGET,  # tests only; program.md forbids it to the agent
        "AUTORESEARCH_EVAL_TOKENS": str(EVAL_TOKENS),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # closed port: nothing leaks to the internet
        "CUDA_VISIBLE_DEVICES": "",  # the CPU settings above on every machine, GPU or not
        "GIT_CONFIG_NOSYSTEM": "1",  # no hooks, signing or aliases from the machine's git config
        "GIT_CONFIG_GLOBAL": os.devnull,
    })
    return env


# -----------------------------------------------------------------------------
# The loop


def test_agent_follows_program_md_through_the_baseline_a_win_a_loss_a_crash_and_the_confirmation(prepared_cache,
                                                                                                 tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = agent_env(prepared_cache)
    make_repo(repo, env)
    agent = Agent(repo, env)
    main_head = agent.git("rev-parse", "--short=7", "main")

    # Setup 1-2: the tag is free; on a clean main branch; branch off
    assert agent.sh(block("git branch --list"), tag=TAG).stdout == ""
    out = agent.sh(block("git checkout -b"), tag=TAG).stdout
    assert out.splitlines() == ["main"], out  # `git branch --show-current`, then an empty `git status --short`
    assert agent.git("branch", "--show-current") == f"autoresearch/{TAG}"
    assert f"autoresearch/{TAG}" in agent.sh(block("git branch --list"), tag=TAG).stdout  # now taken
    # Setup 4: the data checks pass against the cache
    out = agent.sh(block("tokenizer.pkl")).stdout.splitlines()
    assert int(out[0]) >= 2 and len(out) == 4, out  # the shard count, then the three files listed
    # Setup 5: results.tsv, header only
    agent.sh(block("printf 'commit"))
    assert (repo / "results.tsv").read_text() == HEADER

    # The baseline: train.py as it is on the new branch, no edit, no commit; the verdicts ask for its seeds
    assert agent.where() == (f"autoresearch/{TAG}", agent.git("rev-parse", "--short=7", "HEAD"),
                             "timeout 600 uv run train.py > run.log 2>&1")  # the baseline, not run yet
    baseline = agent.experiment("baseline")
    assert [r["verdict"].split(":")[0] for r in baseline] == ["rerun with seed 43", "rerun with seed 44",
                                                              "rerun with seed 45", "keep"], baseline[-1]["log"]
    assert all(r["rc"] == 0 and r["tail"] is None and set(r["summary"]) == {"val_bpb", "peak_vram_mb"}
               for r in baseline), baseline[-1]["log"]
    assert baseline[-1]["verdict"].startswith(f"keep: baseline {main_head} ")

    # A win by far more than the noise: the learning rates back to train.py's own (the slow start deleted). Nothing
    # is kept on one run while sigma has only the baseline's 3 dof, so it runs under seed 43 too, then is kept.
    edit(repo, r"^    EMBEDDING_LR, UNEMBEDDING_LR, MATRIX_LR, SCALAR_LR = .*\n", "")
    win = agent.commit("learning rates back to the defaults")
    won = agent.experiment("learning rates back to the defaults")
    assert [r["verdict"].split(":")[0] for r in won] == ["rerun with seed 43", "keep"], [r["verdict"] for r in won]
    assert won[0]["verdict"].startswith(f"rerun with seed 43: promising, but nothing is kept on one run before sigma "
                                        f"has 5 dof (3 so far): {win} ")
    assert all(float(r["summary"]["val_bpb"]) < min(float(b["summary"]["val_bpb"]) for b in baseline) for r in won)
    assert agent.where()[1:] == (win, "a new idea (program.md, the loop, step 2)")  # kept: the branch has advanced

    # A loss by far more than the noise: no learning at all. Discarded after one run, reset.
    edit(repo, r"^(    DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 32\n)", r"\g<1>    EMBEDDING_LR = UNEMBEDDING_LR = "
                                                                   r"MATRIX_LR = SCALAR_LR = 0.0\n")
    loss = agent.commit("learning rates to zero")
    lost = agent.experiment("learning rates to zero")
    assert len(lost) == 1 and lost[0]["verdict"].startswith(f"discard: {loss} "), lost[0]["verdict"]
    assert " worse by " in lost[0]["verdict"]
    said = agent.sh(uv_block("mark --status discard")).stdout  # step 8's simplicity override, here agreeing
    assert said == f"discard: {loss} marked by hand\n", said
    assert agent.where()[1:] == (loss, "git reset --hard HEAD~1")  # status knows a reset is owed
    agent.reset()
    assert agent.where()[1] == win

    # A broken edit: the model's forward raises; the grep is empty, the tail shows why, the verdict is crash
    edit(repo, r"^(    def forward\(self, idx\b.*\n)", r'\g<1>        raise RuntimeError("boom: broken experiment")\n')
    broken = agent.commit("broken forward")
    crashed = agent.experiment("broken forward")
    assert len(crashed) == 1 and crashed[0]["verdict"].startswith(f"crash: {broken} has no val_bpb")
    assert crashed[0]["rc"] != 0 and crashed[0]["grep"] == ""
    assert "RuntimeError: boom: broken experiment" in crashed[0]["tail"], crashed[0]["tail"]
    edit(repo, r'^        raise RuntimeError\("boom: broken experiment"\)\n', "        # fixed\n")  # step 6: fold in a fix
    agent.sh(block("git commit --amend --no-edit"))
    assert agent.git("rev-parse", "--short=7", "HEAD") != broken and agent.sh("git status --porcelain").stdout == ""
    agent.reset()
    assert agent.git("rev-parse", "--short=7", "HEAD") == win

    # The morning: the baseline and the best under the confirmation seeds, then back on the branch
    said = agent.confirm()
    assert said[0].startswith(f"run {main_head} with seed 1001: confirmation 1 of 4 (the baseline"), said
    assert said[-1].startswith(f"confirmed: best {win} vs baseline {main_head}: gain +"), said
    assert "; on the held-out part " in said[-1], said  # the confirmation seeds also score the held-out part
    agent.sh(block("git checkout autoresearch/<tag>"), tag=TAG)
    assert agent.git("branch", "--show-current") == f"autoresearch/{TAG}" and agent.where()[1] == win

    # results.tsv, row by row: one per run, the commit's status on all its rows, each run's conditions
    lines = (repo / "results.tsv").read_text().splitlines(keepends=True)
    assert lines[0] == HEADER and len(lines) == 1 + 4 + 2 + 1 + 1 + 4, lines
    rows = [line.rstrip("\n").split("\t") for line in lines[1:]]
    assert all(line.endswith("\n") and "\r" not in line and len(row) == 19 for line, row in zip(lines[1:], rows))
    assert rows[0][18] == agent.git("rev-parse", f"{main_head}:train.py")[:12] != rows[4][18]  # the train.py that ran
    assert [r[0] for r in rows] == [main_head] * 4 + [win] * 2 + [loss, broken] + [main_head, win] * 2
    assert [r[3] for r in rows] == ["keep"] * 6 + ["discard", "crash"] + ["keep"] * 4  # confirmations change none
    assert [r[5] for r in rows] == ["42", "43", "44", "45", "42", "43", "42", "42", "1001", "1001", "1002", "1002"]
    assert [r[10] for r in rows] == ["rerun"] * 3 + ["keep", "rerun", "keep", "discard", "crash"] + ["confirm"] * 4
    assert [r[4] for r in rows][-4:] == ["baseline", "learning rates back to the defaults"] * 2  # reused
    assert [r[15] for r in rows] == ["noise"] * 6 + ["hand"] + ["noise"] * 5  # `mark` sets the loss's status by hand
    assert all(r[16] == "" for r in rows[:6]), rows  # nothing flagged: the edits touch learning rates only
    for row, result in zip(rows[:7], baseline + won + lost):
        assert re.fullmatch(r"\d+\.\d{6}", row[1]) and row[1] == f"{float(result['summary']['val_bpb']):.6f}", row
        assert row[2] == f"{float(result['summary']['peak_vram_mb']) / 1024:.1f}", row
        assert row[6] == "2" and row[7:9] == ["sdpa", "cpu"] and re.fullmatch(r"[0-9a-f]{12}", row[9]), row
        assert row[11:13] == [TIME_BUDGET, str(EVAL_TOKENS)], row
        receipt = analysis.parse_receipt_field(row[17])  # prepare.py's, the same terms in every run
        assert receipt["tokens"] == str(EVAL_TOKENS) and float(receipt["budget"]) == float(TIME_BUDGET), row
        same = ("bytes", "sum", "val", "table", "prepare")
        assert {k: receipt[k] for k in same} == {k: analysis.parse_receipt_field(rows[0][17])[k] for k in same}
    assert rows[7][1:3] == ["0.000000", "0.0"]
    # per-name initialisation: the learning-rate edits change no initial weight, so each seed has one fingerprint
    assert rows[0][9] == rows[4][9] == rows[6][9] and rows[1][9] == rows[5][9] and len({r[9] for r in rows[:4]}) == 4

    # results.tsv and run.log stay untracked (git-ignored); nothing else is left behind
    assert agent.git("ls-files", "results.tsv", "run.log") == ""
    ignored = agent.sh("git status --porcelain --ignored").stdout.splitlines()
    assert "!! results.tsv" in ignored and "!! run.log" in ignored, ignored
    assert agent.sh("git status --porcelain").stdout == ""

    # program.md's progress check: analysis.py reads the same results.tsv and git history
    out = agent.sh(uv_block("uv run analysis.py\n"), timeout=300).stdout
    assert "4 experiments (8 runs): 2 keep, 1 discard, 1 crash" in out, out
    assert re.search(r"noise floor: +\d\.\d{6} \(seed to seed: sqrt\(2\) \* sigma \d\.\d{6}, 4 degrees of freedom", out), out
    assert re.search(r"confirmation: +confirmed: best \w{7} vs baseline \w{7}: gain \+\d\.\d{6}", out), out
    assert "integrity: ok (1 kept commits checked)" in out, out
    assert agent.sh("git status --porcelain").stdout == ""  # it wrote nothing into the repo
    assert set(bash_blocks()) == PLAYED["program.md"], set(bash_blocks()) - PLAYED["program.md"]  # every block
