"""
Tests for analysis.py, analysis.ipynb and the shell commands in program.md: messy results.tsv input, the
report and its JSON, the progress plot, the flags of a diff in a real git repository, the notebook run
headless, and the loop's record-the-result block run on fake run.logs.

Run: uv run pytest tests/test_analysis.py
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from helpers import python, receipt_line

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
EXAMPLE = DATA / "results_example.tsv"
MESSY = DATA / "results_messy.tsv"
HEADER_ONLY = DATA / "results_header_only.tsv"
REAL_RUN = DATA / "results_real_run.tsv"  # a real CPU run of program.md's loop (see docs/judging.md)
ELEVEN_COLUMNS = DATA / "results_eleven_columns_real_run.tsv"  # a real run under this project's previous protocol
FIVE_COLUMNS = DATA / "results_five_columns_real_run.tsv"  # an earlier real run, in the reference's five columns
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

sys.path.insert(0, str(ROOT))
import analysis  # noqa: E402
from analysis import format_report, load_results, plot_progress, summarize  # noqa: E402


def run_cli(*args, real=False):
    """`uv run analysis.py ARGS`: in this process (analysis.main, what the command runs), or as a real subprocess."""
    if real:
        result = subprocess.run([sys.executable, str(ROOT / "analysis.py"), *map(str, args)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    else:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = analysis.main([str(a) for a in args])
        result = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def write_tsv(path, *rows, header=True):
    path.write_text((HEADER if header else "") + "".join(r + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# Loading and summary


def test_example_loads_without_warnings():
    df, warnings = load_results(EXAMPLE)
    assert warnings == []
    assert len(df) == 15
    assert list(df.columns[:5]) == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert df["val_bpb"].dtype == float and df["memory_gb"].dtype == float
    assert set(df["status"]) == {"keep", "discard", "crash"}


def test_summary_of_example():
    s = summarize(load_results(EXAMPLE)[0])
    assert s["n_experiments"] == 15
    assert s["counts"] == {"keep": 7, "discard": 6, "crash": 2, "pending": 0, "other": 0}
    assert s["keep_rate"] == pytest.approx(7 / 15)
    assert s["baseline_val_bpb"] == pytest.approx(0.9979)
    assert s["best_val_bpb"] == pytest.approx(0.9776)
    assert s["best_commit"] == "c5d6e7f"
    assert s["improvement_abs"] == pytest.approx(0.0203)
    assert s["improvement_pct"] == pytest.approx(100 * 0.0203 / 0.9979, abs=1e-4)
    assert [k["commit"] for k in s["kept"]] == ["a1b2c3d", "b2c3d4e", "f6a7b8c", "b8c9d0e", "e1f2a3b", "a3b4c5d",
                                                "c5d6e7f"]
    assert s["kept"][0] == {"experiment": 0, "commit": "a1b2c3d", "status": "keep", "val_bpb": 0.9979,
                            "memory_gb": 44.0, "runs": 1, "seeds": [], "description": "baseline", "steps": None,
                            "tokens_M": None, "rule": "", "flags": [], "refused": 0, "gain": None, "floors": None}
    assert s["noise"]["floor"] is None  # five columns: no seeds, so no noise measured


def test_without_measured_noise_a_kept_gain_is_over_the_kept_one_before_it():
    kept = summarize(load_results(EXAMPLE)[0])["kept"]
    gains = {k["commit"]: k["gain"] for k in kept[1:]}  # every kept experiment but the baseline
    assert gains["a3b4c5d"] == pytest.approx(0.9839 - 0.9781) == max(gains.values())
    assert all(k["floors"] is None for k in kept)  # no floor to count them in


def test_a_real_five_column_file_still_loads_and_reads_as_before():
    """An earlier real run of the loop, written by the reference's five-column protocol (Python-docs shards, 60 s
    budget, 2 CPU cores): every row is its own experiment, as the reference counts them."""
    df, warnings = load_results(FIVE_COLUMNS)
    assert warnings == [] and len(df) == 11
    assert (df["seed"].isna() & (df["device"] == "") & (df["verdict"] == "")).all()
    s = summarize(df)
    assert (s["n_experiments"], s["n_runs"], s["counts"]["keep"]) == (11, 11, 5)
    assert s["baseline_val_bpb"] == 2.168051 and s["best_val_bpb"] == 2.041157 and s["noise"]["floor"] is None


def test_an_eleven_column_file_of_the_previous_protocol_still_loads():
    """A real run of the loop under this project's previous protocol (three seeds and a same-seed repeat, no time
    budget or eval tokens columns): it loads without a warning, reads as before, and a new run appended to it
    upgrades the header and is compared with it (its empty conditions match anything)."""
    df, warnings = load_results(ELEVEN_COLUMNS)
    assert warnings == [] and len(df) == 13
    assert list(df.loc[:3, "seed"]) == [42, 43, 44, 42] and list(df.loc[:3, "verdict"]) == ["rerun"] * 3 + ["keep"]
    assert (df["time_budget"] == "").all() and (df["eval_tokens"] == "").all()
    for commit, runs in df.groupby("commit"):
        assert runs["status"].nunique() == 1, commit
    s = summarize(df)
    assert (s["n_experiments"], s["n_runs"], s["counts"]["keep"]) == (4, 13, 1)
    assert s["noise"]["floor"] > 0 and s["noise"]["dof"] > 0


def test_an_eleven_column_file_takes_new_rows(tmp_path):
    tsv = tmp_path / "results.tsv"
    shutil.copy(ELEVEN_COLUMNS, tsv)
    row, verdict = analysis.record(str(tsv), {"val_bpb": "2.2", "peak_vram_mb": "2300", "seed": "42",
                                              "num_steps": "18", "attention": "sdpa", "device": "cpu",
                                              "init_fingerprint": "8755c86e41d4", "time_budget": "60",
                                              "eval_tokens": "131072"}, "1234567", "a new idea")
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == analysis.HEADER and len(lines) == 15
    assert len(lines[-1].split("\t")) == len(analysis.HEADER)
    assert load_results(tsv)[1] == [] and verdict.verdict in ("keep", "discard", "rerun")


def test_crash_rows_count_as_experiments_but_never_as_best_or_baseline(tmp_path):
    tsv = write_tsv(tmp_path / "r.tsv", "aaaaaaa\t0.000000\t0.0\tcrash\tbroken start",
                    "bbbbbbb\t0.990000\t40.0\tkeep\tbaseline",
                    "ccccccc\t0.000000\t0.0\tcrash\tOOM")
    df, warnings = load_results(tsv)
    assert warnings == []
    s = summarize(df)
    assert s["counts"]["crash"] == 2 and s["n_experiments"] == 3
    assert s["baseline_val_bpb"] == 0.99 and s["best_val_bpb"] == 0.99 and s["improvement_abs"] == 0


def test_status_is_normalised_to_lower_case():
    df, _ = load_results(MESSY)
    assert set(df["status"]) == {"keep", "discard", "crash", "maybe"}
    assert summarize(df)["counts"] == {"keep": 2, "discard": 1, "crash": 2, "pending": 0, "other": 1}


def test_trailing_spaces_are_stripped_and_commas_kept_in_descriptions():
    df, _ = load_results(MESSY)
    row = df[df["commit"] == "b2c3d4e"].iloc[0]
    assert row["val_bpb"] == 0.9932 and row["memory_gb"] == 44.2 and row["status"] == "keep"
    assert row["description"] == "increase LR to 0.04, warmup 5%, betas (0.9, 0.95)"


def test_rows_with_the_wrong_column_count_are_skipped_with_their_line_number():
    df, warnings = load_results(MESSY)
    for line, found in [(6, 4), (10, 1), (11, 6)]:
        matches = [w for w in warnings if w.startswith(f"line {line}:") and f"found {found}" in w and "skipped" in w]
        assert matches, warnings
    assert not {"e5f6a7b", "b8c9d0e", "c9d0e1f"} & set(df["commit"])


def test_non_numeric_val_bpb_is_skipped_with_its_line_number():
    df, warnings = load_results(MESSY)
    assert any(w.startswith("line 7:") and "'n/a'" in w for w in warnings), warnings
    assert "f6a7b8c" not in set(df["commit"])


def test_unknown_status_is_kept_with_a_warning():
    df, warnings = load_results(MESSY)
    assert any(w.startswith("line 9:") and "unknown status 'maybe'" in w for w in warnings), warnings
    assert "a7b8c9d" in set(df["commit"])
    assert len(warnings) == 5  # 3 column counts, 1 val_bpb, 1 status; the blank line is not a problem


def test_header_only_file_is_zero_experiments(tmp_path):
    df, warnings = load_results(HEADER_ONLY)
    assert len(df) == 0 and warnings == []
    s = summarize(df)
    assert s["n_experiments"] == 0 and s["keep_rate"] is None and s["best_val_bpb"] is None
    assert s["kept"] == [] and s["experiments"] == []
    assert format_report(s).startswith("0 experiments")
    assert plot_progress(df, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def test_crlf_line_endings_byte_order_mark_and_blank_lines(tmp_path):
    tsv = tmp_path / "r.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + HEADER.replace("\n", "\r\n").encode()
                    + b"abcdef1\t0.990000\t40.0\tkeep\tbaseline\r\n\r\n")
    df, warnings = load_results(tsv)
    assert warnings == [] and list(df["description"]) == ["baseline"]


def test_missing_header_and_repeated_header_are_warned_about(tmp_path):
    tsv = write_tsv(tmp_path / "r.tsv", "abcdef1\t0.990000\t40.0\tkeep\tbaseline", HEADER.strip(), header=False)
    df, warnings = load_results(tsv)
    assert len(df) == 1
    assert warnings[0].startswith("line 1: no header") and warnings[1] == "line 2: repeated header; skipped"


def test_missing_file_raises_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_results(tmp_path / "nope.tsv")


# -----------------------------------------------------------------------------
# Command line


def test_cli_text_report_of_example():
    r = run_cli("--tsv", EXAMPLE)
    assert r.returncode == 0
    assert "15 experiments (15 runs): 7 keep, 6 discard, 2 crash (keep rate 46.7%)" in r.stdout
    assert "noise floor:      none yet (the baseline has run under fewer than two seeds)" in r.stdout
    assert "best val_bpb:     0.977600" in r.stdout and "improvement:      0.020300 (2.03%)" in r.stdout
    assert len(r.stdout.splitlines()) <= analysis.REPORT_LINES + 1  # the path and the report


def test_cli_on_messy_input_reports_warnings_without_failing():
    r = run_cli("--tsv", MESSY)
    assert r.returncode == 0
    assert "5 warnings" in r.stdout and "line 7: val_bpb 'n/a' is not a number" in r.stdout


def test_cli_header_only_says_zero_experiments_and_skips_the_plot(tmp_path):
    r = run_cli("--tsv", HEADER_ONLY, "--plot", tmp_path / "p.png")
    assert r.returncode == 0
    assert "0 experiments" in r.stdout and "not written" in r.stdout
    assert not (tmp_path / "p.png").exists()


def test_cli_missing_file_is_one_line_naming_the_path_and_exit_1(tmp_path):
    path = tmp_path / "no" / "results.tsv"
    r = run_cli("--tsv", path, real=True)  # the real command: its exit status and its one line
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and str(path) in r.stderr


def test_directory_or_binary_garbage_never_tracebacks(tmp_path):
    with pytest.raises(OSError):  # the command line turns any OSError into a one-line message
        load_results(tmp_path)
    garbage = tmp_path / "garbage.tsv"
    garbage.write_bytes(bytes(range(256)) * 4)
    df, warnings = load_results(garbage)
    assert len(df) == 0 and warnings
    json.dumps(summarize(df), allow_nan=False)


def test_cli_json_shape():
    r = run_cli("--tsv", MESSY, "--json")
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert {"n_experiments", "n_runs", "counts", "keep_rate", "noise", "baseline_val_bpb", "best_val_bpb",
            "improvement_abs", "improvement_pct", "improvement_floors", "kept", "experiments", "confirmation",
            "warnings", "streak"} <= set(out)
    assert out["n_experiments"] == 6 and out["counts"]["crash"] == 2 and len(out["experiments"]) == 6
    assert set(out["kept"][0]) == {"experiment", "commit", "status", "val_bpb", "memory_gb", "runs", "seeds",
                                   "description", "steps", "tokens_M", "rule", "flags", "refused", "gain", "floors"}
    assert set(out["noise"]) == {"floor", "sigma", "dof", "spread", "spread_dof", "device", "attention", "time_budget",
                                 "eval_tokens"}
    assert {"best_commit", "best_estimate", "best_estimate_sd", "speed_swings"} <= set(out)
    assert out["n_confirmation_runs"] == 0 and out["confirmation"]["gain"] is None  # a best, not confirmed yet
    assert set(out["confirmation"]) == {"baseline", "best", "seeds", "todo", "done", "needed", "gain", "claimed"}
    assert len(out["warnings"]) == 5
    assert out["refused"] == {} and out["by_hand"] == []


def test_summary_of_header_only_is_valid_json_with_nulls():
    out = json.loads(json.dumps(summarize(load_results(HEADER_ONLY)[0]), allow_nan=False))
    assert out["n_experiments"] == 0 and out["best_val_bpb"] is None and out["keep_rate"] is None


def test_cli_plot_writes_a_png(tmp_path):
    png = tmp_path / "progress.png"
    r = run_cli("--tsv", EXAMPLE, "--json", "--plot", png)
    assert r.returncode == 0
    json.loads(r.stdout)  # the plot message goes to stderr, stdout stays JSON
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_plot_with_only_discards_and_crashes(tmp_path):
    tsv = write_tsv(tmp_path / "r.tsv", "aaaaaaa\t0.990000\t40.0\tdiscard\tx", "bbbbbbb\t0.000000\t0.0\tcrash\ty",
                    "ccccccc\t0.980000\t40.0\tdiscard\tz")
    assert plot_progress(load_results(tsv)[0], tmp_path / "p.png") is not None
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


# -----------------------------------------------------------------------------
# The flags of a diff, in a real git repository


GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


def commit(repo, message, **files):
    for name, text in files.items():
        (repo / name.replace("_py", ".py").replace("_toml", ".toml")).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "--short=7", "HEAD")


def test_a_diff_is_flagged_by_its_code_never_by_a_word_in_a_comment(tmp_path):
    """`budget` in a comment runs nothing: only the code of the changed lines names a flag for the morning."""
    repo = tmp_path
    git(repo, "init", "-q", "-b", "main")
    base = commit(repo, "baseline", train_py="LR = 1\n")
    good = commit(repo, "lr 2", train_py="LR = 2\n")
    comment = commit(repo, "warmdown", train_py="LR = 2\nWARMDOWN = 0.3  # fraction of the budget at the end\n")
    code = commit(repo, "shorter budget", train_py="LR = 2\nWARMDOWN = 0.3\nTIME_BUDGET = 1\n")
    rows = [f"{base}\t0.990000\t40.0\tkeep\tbaseline", f"{good}\t0.980000\t40.0\tkeep\tlr 2"]
    decisions = analysis.parse_results("\t".join(analysis.COLUMNS) + "\n" + "\n".join(rows))[0]
    receipt = {"wall": 1.0, "budget": 1.0, "train_tokens": 1}
    assert analysis.flags_of(decisions, comment, receipt, [], str(repo)) == []
    assert analysis.flags_of(decisions, code, receipt, [], str(repo)) == ["time"]


# -----------------------------------------------------------------------------
# The notebook


def test_notebook_is_saved_clean():
    nb = nbformat.read(ROOT / "analysis.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("tsv", [REAL_RUN, HEADER_ONLY], ids=["real_run", "header_only"])
def test_notebook_runs_headless(tmp_path, monkeypatch, tsv):
    from nbclient import NotebookClient

    png = tmp_path / "progress.png"
    monkeypatch.setenv("RESULTS_TSV", str(tsv))
    monkeypatch.setenv("PROGRESS_PNG", str(png))
    nb = nbformat.read(ROOT / "analysis.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if tsv == REAL_RUN:  # the run behind the committed progress.png
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert "experiments: 23 (33 runs)" in text and "keep rate: 17.4%" in text
        assert "noise floor: 0.024829" in text and "improvement:      0.068835 (3.30%, 2.8 noise floors)" in text
        assert "NOT confirmed (the interval includes zero): 0.024934 (95% interval -0.005034 to 0.054903)" in text
        assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    else:
        assert not png.exists()
        assert "experiments: 0" in text and "no results to plot yet" in text


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv: the README's notebook command is a uv command")
def test_readme_notebook_command_has_jupyter_lab_and_the_notebooks_imports():
    """The README's command for opening the notebook builds an environment that has `jupyter lab` (a plain
    `uv run jupyter lab` has not), a kernel, and everything the notebook imports (test_notebook_runs_headless runs
    the notebook itself). `uv run --isolated` builds that environment afresh from the same lock and leaves the
    project's .venv as it was: ~10 s on 2 cores with a warm uv cache; the first time, it fetches the notebook group
    from the package index."""
    match = re.search(r"^(uv run\b.*?) jupyter lab analysis\.ipynb$", (ROOT / "README.md").read_text(), re.M)
    assert match, "README.md has no `uv run ... jupyter lab analysis.ipynb` line"
    pinned = re.search(r'"jupyterlab==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml pins no jupyterlab version"
    nb = nbformat.read(ROOT / "analysis.ipynb", as_version=4)
    imports = sorted({m for c in nb.cells if c.cell_type == "code"
                      for m in re.findall(r"^(?:from|import) ([\w.]+)", c.source, re.M)})
    assert {"analysis", "IPython.display", "pandas"} <= set(imports), imports
    script = f"jupyter lab --version && jupyter kernelspec list && python -c 'import {', '.join(imports)}'"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}  # set by an outer `uv run pytest`
    uv_run = match.group(1).split()
    result = subprocess.run(uv_run[:2] + ["--isolated"] + uv_run[2:] + ["sh", "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    offline = ("Failed to fetch", "error sending request", "Could not connect", "dns error", "Network is unreachable")
    if result.returncode != 0 and any(s in result.stderr for s in offline):  # a machine with no package index
        pytest.skip("uv could not fetch the notebook group: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == pinned.group(1), result.stdout
    assert "python3" in result.stdout, result.stdout  # the kernel the notebook names


# -----------------------------------------------------------------------------
# program.md: the commands the agent runs


def bash_blocks():
    text = (ROOT / "program.md").read_text()
    return [textwrap.dedent(m.group(2)) for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.M | re.S)]


def test_program_md_has_the_loop_commands_in_bash_blocks():
    commands = "\n".join(bash_blocks())
    for command in ["git checkout -b autoresearch/<tag>", "timeout 600 uv run train.py > run.log 2>&1",
                    "AUTORESEARCH_SEED=<seed> timeout 600 uv run train.py > run.log 2>&1",
                    'grep "^val_bpb:\\|^peak_vram_mb:" run.log', "tail -n 50 run.log", "git reset --hard HEAD~1",
                    "printf '" + "\\t".join(analysis.HEADER) + "\\n' > results.tsv",
                    'uv run analysis.py record --description "<description>"', "uv run analysis.py mark --status discard",
                    "uv run analysis.py confirm", "uv run analysis.py record --confirm",
                    "git checkout --quiet --detach <commit>", "git checkout autoresearch/<tag>", "uv run analysis.py"]:
        assert command in commands, command
    placeholders = set(re.findall(r"<[a-z_]+>", commands))
    assert placeholders == {"<tag>", "<description>", "<seed>", "<commit>"}, placeholders


SUMMARY = "---\nval_bpb:          {bpb}\ntraining_seconds: 300.1\npeak_vram_mb:     45060.2\nnum_steps:        953\n"


def run_log(bpb):
    """A reference-style run.log (no condition keys) ending in the summary, with prepare.py's receipt before it."""
    return receipt_line(bpb) + "\n" + SUMMARY.format(bpb=bpb)


def record_cli(repo, log, description, *args):
    (repo / "run.log").write_text(log)
    return subprocess.run([*python(), str(ROOT / "analysis.py"), "record", "--description", description, *args],
                          cwd=repo, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("log, expected", ids=["better", "worse", "equal", "crash"], argvalues=[
    (run_log("0.990000"), "0.990000\t44.0\tkeep"),       # better than the best keep so far
    (run_log("0.995000"), "0.995000\t44.0\tdiscard"),    # worse
    (run_log("0.993200"), "0.993200\t44.0\tdiscard"),    # equal is not better
    ("step 00012 (4.0%) | loss 9.1\nTraceback (most recent call last):\nRuntimeError: CUDA out of memory\n",
     "0.000000\t0.0\tcrash"),
])
def test_plain_rule_gives_the_reference_verdicts_on_a_five_column_file(tmp_path, log, expected):
    """The reference's protocol, one setting away: a reference results.tsv (five columns, logs without the
    condition keys) gets the verdicts the old hand-copied block gave, and the file stays readable."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("results.tsv\nrun.log\n")
    base = commit(repo, "baseline", train_py="LR = 0\n")
    head = commit(repo, "x", train_py="LR = 1\n")
    old = [f"{base}\t0.997900\t44.0\tkeep\tbaseline", "bbbbbbb\t0.993200\t44.2\tkeep\tlr",
           "ccccccc\t0.980000\t44.0\tdiscard\tdiscards do not count", "ddddddd\t0.000000\t0.0\tcrash\toom"]
    write_tsv(repo / "results.tsv", *old)
    (repo / "run.log").write_text(log)
    r = subprocess.run([*python(), str(ROOT / "analysis.py"), "record", "--description", "try, this"], cwd=repo,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "AUTORESEARCH_RULE": "plain"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(":")[0] == expected.split("\t")[-1], r.stdout
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0].split("\t") == analysis.HEADER  # the header gains the condition columns
    assert lines[1:5] == old  # old rows untouched
    assert lines[-1].split("\t")[:5] == [head, *expected.split("\t"), "try, this"]
    assert load_results(repo / "results.tsv")[1] == []


def test_record_names_a_run_that_trained_longer_or_off_the_loader_and_refuses_one_without_a_receipt(tmp_path):
    """What prepare.py counted of the run itself: a run that spent far more wall clock between its first training
    batch and the evaluation than the baseline's (seconds left out of the budget?) and one that took no batch from
    make_dataloader are named; a log without a receipt (evaluate_bpb never ran, or its output was hidden) is refused."""
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("results.tsv*\nrun.log\n")  # the file and its lock, as in this repo
    write_tsv(tmp_path / "results.tsv")
    commit(tmp_path, "baseline", train_py="LR = 1\n")
    log = "seed:             42\n"
    assert record_cli(tmp_path, receipt_line(0.99) + "\n" + SUMMARY.format(bpb="0.990000") + log, "baseline",
                      "--rule", "plain").stdout.startswith("keep: baseline")
    commit(tmp_path, "lr 2", train_py="LR = 2\n")
    r = record_cli(tmp_path, receipt_line(0.98, wall=1200.0, train_tokens=0) + "\n" + SUMMARY.format(bpb="0.980000")
                   + log, "lr 2", "--rule", "plain")
    assert r.stdout.strip().endswith("; flagged for the morning: more wall clock from first batch to evaluation "
                                     "than the baseline's, no training batch from make_dataloader"), r.stdout
    commit(tmp_path, "lr 3", train_py="LR = 3\n")
    r = record_cli(tmp_path, SUMMARY.format(bpb="0.970000") + log, "lr 3", "--rule", "plain")
    assert r.stdout.startswith("refused: run.log has 0 receipts of evaluate_bpb where one run prints one"), r.stdout
    rows = load_results(tmp_path / "results.tsv")[0]
    assert list(rows["verdict"]) == ["keep", "keep", "refused"] and list(rows["flags"]) == ["", "wall,loader",
                                                                                          "refused:receipt"]
    report = run_cli("--tsv", tmp_path / "results.tsv").stdout
    assert "refused runs:     1 (1 without one receipt of evaluate_bpb), not counted" in report, report
    assert re.search(r"^ +1  \w{7} .* 953  lr 2  \[plain rule; more wall clock from first batch to evaluation than the "
                     r"baseline's, no training batch from make_dataloader\]$", report, re.M), report
    assert re.search(r"^  refused +\w{7}  lr 3$", report, re.M), report


@pytest.mark.parametrize("rule, verdict", [("plain", "keep: baseline"), ("noise", "rerun with seed 42")])  # seedless: 42 is asked
def test_the_baseline_is_kept_and_under_the_noise_rule_asks_for_its_seeds(tmp_path, rule, verdict):
    write_tsv(tmp_path / "results.tsv")
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("results.tsv\nrun.log\n")
    head = commit(tmp_path, "x", train_py="LR = 1\n")
    log = run_log("0.997900")
    r = record_cli(tmp_path, log, "baseline", "--rule", rule)
    assert r.returncode == 0 and r.stdout.startswith(verdict), r.stdout + r.stderr
    receipt = analysis.receipt_field(analysis.parse_receipts(log)[0])
    assert (tmp_path / "results.tsv").read_text() == "\t".join(analysis.HEADER) + "\n" + \
        f"{head}\t0.997900\t44.0\tkeep\tbaseline\t\t953\t\t\t\t{'keep' if rule == 'plain' else 'rerun'}\t\t\t" \
        f"300.1\t\t{rule}\t\t{receipt}\t{git(tmp_path, 'rev-parse', 'HEAD:train.py')[:12]}\n"
