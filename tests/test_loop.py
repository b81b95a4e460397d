"""
program.md's experiment loop played end to end, as an agent would: the shell commands in program.md's bash
blocks, run as written, in order, in a throwaway git repository (a copy of this repo's tracked files) with
the tiny prepared data. Four experiments: the baseline (keep), an improvement (keep, the branch advances),
a regression (discard, reset) and a broken edit (crash, reset); then results.tsv, git and analysis.py are
checked. When the instructions drift away from what works, this test breaks.

Run: uv run pytest tests/test_loop.py
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

TAG = "loop1"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"

# A budget shorter than one step: train.py always runs its 11 uncounted warm-up steps, then stops after the
# first counted one. Every run is then exactly 12 steps on any machine, however busy, so val_bpb is the same
# number on every rerun and the keep/discard decisions below are facts, not a race against the clock. Like
# the real 5 minutes, it is the same for every experiment (an environment variable, not part of train.py).
TIME_BUDGET = "0.01"
EVAL_TOKENS = 2048  # one evaluation batch of the scaled-down DEVICE_BATCH_SIZE below (1 x 2048)

# Appended to train.py's small-machine block and committed on main before the agent starts: this stands for
# the repo's own train.py, scaled down further so that one experiment takes seconds on a CPU.
TINY_SETTINGS = """\
    # tests/test_loop.py: scaled down further, one 2048-token sequence per step, width 64
    DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 32
    TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = 2048, 1
"""


# -----------------------------------------------------------------------------
# program.md's commands


def bash_blocks():
    text = (ROOT / "program.md").read_text()
    blocks = [textwrap.dedent(m.group(2)) for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.M | re.S)]
    return list(dict.fromkeys(blocks))  # the grep block is shown twice, word for word


def block(*needles):
    """The one bash block in program.md that contains every needle."""
    found = [b for b in bash_blocks() if all(n in b for n in needles)]
    assert len(found) == 1, f"program.md: expected one bash block containing {needles}, found {len(found)}"
    return found[0]


def run_block():
    command = block("> run.log 2>&1")
    # `uv run` here would build a second virtual environment inside the throwaway repo (slow, and it may
    # want the network); the interpreter running this test already is the project's environment.
    assert command.count("uv run ") == 1, command
    command = command.replace("uv run ", shlex.quote(sys.executable) + " ")
    if shutil.which("timeout") is None:  # program.md: where `timeout` is missing, run without it
        command = command.replace("timeout 600 ", "")
    return command


def analysis_block():
    command = block("analysis.py")
    assert command.count("uv run ") == 1, command
    return command.replace("uv run ", shlex.quote(sys.executable) + " ")  # same reason as in run_block


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
        """Loop step 1: (branch, the top line of git log)."""
        out = self.sh(block("git branch --show-current", "git log")).stdout.splitlines()
        return out[0], out[1]

    def commit(self, description):
        """Loop step 3; returns the short hash of the new commit."""
        self.sh(block("git commit -m"), description=description)
        return self.git("rev-parse", "--short=7", "HEAD")

    def run_and_record(self, description):
        """Loop steps 4 to 7: run, grep, on an empty grep read the tail, record. Returns a dict."""
        run = self.sh(run_block(), check=False, timeout=900)
        grep = self.sh(block('grep "^val_bpb:'), check=False)
        tail = self.sh(block("tail -n 50 run.log")).stdout if not grep.stdout.strip() else None
        status = self.sh(block(">> results.tsv"), description=description).stdout.strip()
        summary = dict(line.split(":", 1) for line in grep.stdout.splitlines())
        return {"rc": run.returncode, "grep": grep.stdout, "tail": tail, "status": status,
                "summary": {k: v.strip() for k, v in summary.items()},
                "log": (self.repo / "run.log").read_text(errors="replace")[-3000:]}

    def reset(self):
        """Loop step 9."""
        self.sh(block("git reset --hard"))


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


def make_repo(path, env):
    """A copy of this repo's tracked files with its own history: main = the copy, then the scaled-down train.py."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "--is-inside-work-tree"], capture_output=True).returncode:
        pytest.skip("the repo is not a git checkout (its tracked files are what the loop starts from)")
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, path / name)
    train_py = path / "train.py"
    src, n = re.subn(r'^if DEVICE_TYPE != "cuda":\n(?:    .*\n)+', lambda m: m.group(0) + TINY_SETTINGS,
                     train_py.read_text(), flags=re.M)
    assert n == 1, "train.py: the small-machine block (`if DEVICE_TYPE != \"cuda\":`) was not found"

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


def test_agent_follows_program_md_through_keep_discard_and_crash(prepared_cache, tmp_path):
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

    rows = []  # (commit, description, result) as the test expects them in results.tsv

    def check_recorded(commit, description, result, status):
        assert result["status"] == status, result["log"]
        if status == "crash":
            assert result["rc"] != 0 and result["grep"] == "", result["log"]
        else:
            assert result["rc"] == 0 and result["tail"] is None, result["log"]
            assert set(result["summary"]) == {"val_bpb", "peak_vram_mb"}, result["grep"]
        rows.append((commit, description, result))

    # Baseline: train.py as it is on the new branch, no edit, no commit
    assert agent.where() == (f"autoresearch/{TAG}", agent.git("log", "--oneline", "-n", "1"))
    baseline = agent.run_and_record("baseline")
    check_recorded(main_head, "baseline", baseline, "keep")

    # An improvement: a 12-step run wants a higher Muon learning rate. Measured on a CPU with the settings
    # above: MATRIX_LR 0.02 -> val_bpb 1.4534, 0.04 (the default) -> 1.4188, 0.08 -> 1.3932, 0.12 -> 1.4031
    set_constant(repo, "MATRIX_LR", f"{2 * get_constant(repo, 'MATRIX_LR'):g}")
    better = agent.commit("double MATRIX_LR")
    improved = agent.run_and_record("double MATRIX_LR")
    check_recorded(better, "double MATRIX_LR", improved, "keep")
    # step 8: keep, the branch has advanced to the experiment's commit
    branch, top = agent.where()
    assert branch == f"autoresearch/{TAG}" and top.split()[0] == better, top
    assert agent.git("rev-parse", "--short=7", "HEAD~1") == main_head
    kept_train_py = (repo / "train.py").read_bytes()

    # A regression: no learning at all, the model stays near its initialisation (val_bpb 2.4650 on a CPU)
    for name in ("MATRIX_LR", "EMBEDDING_LR", "UNEMBEDDING_LR"):
        set_constant(repo, name, "0.0")
    worse = agent.commit("zero the learning rates")
    regressed = agent.run_and_record("zero the learning rates")
    check_recorded(worse, "zero the learning rates", regressed, "discard")
    agent.reset()  # step 9
    assert agent.where()[1].split()[0] == better
    assert (repo / "train.py").read_bytes() == kept_train_py

    # A broken edit: the model's forward raises; the grep is empty and the tail shows why
    edit(repo, r"^(    def forward\(self, idx\b.*\n)", r'\g<1>        raise RuntimeError("boom: broken experiment")\n')
    broken = agent.commit("broken forward")
    crashed = agent.run_and_record("broken forward")
    check_recorded(broken, "broken forward", crashed, "crash")
    assert "Traceback (most recent call last)" in crashed["tail"], crashed["tail"]
    assert "RuntimeError: boom: broken experiment" in crashed["tail"], crashed["tail"]
    agent.reset()
    assert agent.where() == (f"autoresearch/{TAG}", agent.git("log", "--oneline", "-n", "1"))
    assert agent.git("rev-parse", "--short=7", "HEAD") == better
    assert (repo / "train.py").read_bytes() == kept_train_py

    # results.tsv, row by row
    lines = (repo / "results.tsv").read_text().splitlines(keepends=True)
    assert lines[0] == HEADER and len(lines) == 1 + len(rows), lines
    for line, (commit, description, result) in zip(lines[1:], rows):
        assert line.endswith("\n") and "\r" not in line
        fields = line.rstrip("\n").split("\t")
        assert len(fields) == 5, line
        assert re.fullmatch(r"[0-9a-f]{7}", fields[0]) and fields[0] == commit, (line, commit)
        assert re.fullmatch(r"\d+\.\d{6}", fields[1]) and re.fullmatch(r"\d+\.\d", fields[2]), line
        assert fields[3:] == [result["status"], description], line
        if result["status"] == "crash":
            assert fields[1:3] == ["0.000000", "0.0"], line
        else:
            assert fields[1] == f"{float(result['summary']['val_bpb']):.6f}", line
            assert fields[2] == f"{float(result['summary']['peak_vram_mb']) / 1024:.1f}", line
    bpb = [float(line.split("\t")[1]) for line in lines[1:]]
    assert bpb[1] < bpb[0] < bpb[2], bpb  # the improvement beat the baseline; the regression lost to both
    assert [line.split("\t")[3] for line in lines[1:]] == ["keep", "keep", "discard", "crash"]

    # results.tsv and run.log stay untracked (git-ignored); nothing else is left behind
    assert agent.git("ls-files", "results.tsv", "run.log") == ""
    ignored = agent.sh("git status --porcelain --ignored").stdout.splitlines()
    assert "!! results.tsv" in ignored and "!! run.log" in ignored, ignored
    assert agent.sh("git status --porcelain").stdout == ""

    # program.md's progress check: analysis.py reads the same results.tsv and git history
    out = agent.sh(analysis_block(), timeout=300).stdout
    assert "4 experiments: 2 keep, 1 discard, 1 crash" in out, out
    assert "integrity: ok (1 kept commits checked)" in out, out
    assert agent.sh("git status --porcelain").stdout == ""  # it wrote nothing into the repo
