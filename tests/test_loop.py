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

import re

import analysis
from helpers import (EVAL_TOKENS, PLAYED, TIME_BUDGET, Agent, agent_env, bash_blocks, block, edit_train, make_repo,
                     uv_block)

TAG = "loop1"
HEADER = ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tseed\tnum_steps\tattention\tdevice\tinit_fingerprint"
          "\tverdict\ttime_budget\teval_tokens\ttraining_seconds\ttotal_seconds\trule\tflags\treceipt\ttrain_py\n")

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
    # Setup 4: the data check passes against the cache, in prepare.py's one line
    out = agent.sh(uv_block("uv run prepare.py --check")).stdout
    assert out == f"Data: climbmix, ready in {prepared_cache / 'data'}\n", out
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
    edit_train(repo, r"^    EMBEDDING_LR, UNEMBEDDING_LR, MATRIX_LR, SCALAR_LR = .*\n", "")
    win = agent.commit("learning rates back to the defaults")
    won = agent.experiment("learning rates back to the defaults")
    assert [r["verdict"].split(":")[0] for r in won] == ["rerun with seed 43", "keep"], [r["verdict"] for r in won]
    assert won[0]["verdict"].startswith(f"rerun with seed 43: promising, but nothing is kept on one run before sigma "
                                        f"has 5 dof (3 so far): {win} ")
    assert all(float(r["summary"]["val_bpb"]) < min(float(b["summary"]["val_bpb"]) for b in baseline) for r in won)
    assert agent.where()[1:] == (win, "a new idea (program.md, the loop, step 2)")  # kept: the branch has advanced

    # A loss by far more than the noise: no learning at all. Discarded after one run, reset.
    edit_train(repo, r"^(    DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 32\n)", r"\g<1>    EMBEDDING_LR = UNEMBEDDING_LR = "
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
    edit_train(repo, r"^(    def forward\(self, idx\b.*\n)", r'\g<1>        raise RuntimeError("boom: broken experiment")\n')
    broken = agent.commit("broken forward")
    crashed = agent.experiment("broken forward")
    assert len(crashed) == 1 and crashed[0]["verdict"].startswith(f"crash: {broken} has no val_bpb")
    assert crashed[0]["rc"] != 0 and crashed[0]["grep"] == ""
    assert "RuntimeError: boom: broken experiment" in crashed[0]["tail"], crashed[0]["tail"]
    edit_train(repo, r'^        raise RuntimeError\("boom: broken experiment"\)\n', "        # fixed\n")  # step 6: fold in a fix
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
    assert re.search(r"noise floor: +\d\.\d{6} \(sqrt\(2\) \* sigma \d\.\d{6}, 4 dof", out), out
    assert re.search(r"confirmation: +confirmed: best \w{7} vs baseline \w{7}: gain \+\d\.\d{6}", out), out
    assert re.search(rf"^ +1  {win}  \d\.\d{{6}} +2 +\+\d+\.\d~? +2  learning rates", out, re.M), out  # the kept table
    assert agent.sh("git status --porcelain").stdout == ""  # it wrote nothing into the repo
    assert set(bash_blocks()) == PLAYED["program.md"], set(bash_blocks()) - PLAYED["program.md"]  # every block
