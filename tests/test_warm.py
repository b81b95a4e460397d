"""
tests/warm.py, the warm interpreter most of the suite starts its scripts with, behaves like a fresh `python`
where the tests look: arguments, working directory, environment, stdin/stdout/stderr, exit status, an uncaught
exception, Ctrl-C, a signal from outside, and a client that is killed.

Run: uv run pytest tests/test_warm.py
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import python

SCRIPT = """
import os, sys, threading, time
print("argv", sys.argv[1:], "cwd", os.getcwd() == os.environ["WANT_CWD"], "env", os.environ["WANT_CWD"] != "",
      "path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)), "main", __name__)
print("stdin", sys.stdin.read().strip())
print("to stderr", file=sys.stderr)
what = sys.argv[1]
if what == "exit":
    sys.exit(int(sys.argv[2]))
if what == "message":
    sys.exit("error: one line")
if what == "raise":
    raise RuntimeError("boom")
if what == "thread":  # a non-daemon thread: the interpreter waits for it at exit, then runs atexit
    import atexit
    atexit.register(lambda: print("atexit after the thread"))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
if what == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "s.py"
    path.write_text(SCRIPT)
    return path


def both(script, *args, stdin="hello", **kw):
    """The script under a fresh python and under python(): both CompletedProcess."""
    env = dict(os.environ, WANT_CWD=str(script.parent))
    return [subprocess.run([*launcher, str(script), *args], cwd=script.parent, env=env, input=stdin,
                           capture_output=True, text=True, timeout=60, **kw) for launcher in ([sys.executable], python())]


@pytest.mark.parametrize("args", [("exit", "0"), ("exit", "3"), ("message",), ("thread",)])
def test_a_run_is_the_same_as_under_a_fresh_python(script, args):
    cold, warm = both(script, *args)
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert warm.stdout.startswith(f"argv {list(args)} cwd True env True path0 True main __main__\nstdin hello\n")


def test_torch_reads_the_runs_thread_count_not_the_servers():
    r = subprocess.run([*python(), "-c", "import sys, torch; print(sys.argv, torch.get_num_threads())", "x"],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "['-c', 'x'] 1\n", "")


def test_an_uncaught_exception_is_a_traceback_and_exit_1(script):
    cold, warm = both(script, "raise")
    assert warm.returncode == cold.returncode == 1 and warm.stdout == cold.stdout
    assert warm.stderr.startswith("to stderr\nTraceback (most recent call last):")
    assert warm.stderr.endswith("RuntimeError: boom\n")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, -signal.SIGINT), (signal.SIGTERM, -signal.SIGTERM)])
def test_a_signal_reaches_the_run_and_its_status_comes_back(script, sig, code, sigint_reaches_children):
    proc = subprocess.Popen([*python(), str(script), "sleep"], cwd=script.parent, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, WANT_CWD=str(script.parent)))
    assert proc.stdout.readline().endswith("\n") and proc.stdout.readline() == "stdin \n"
    assert proc.stdout.readline() == "sleeping\n"
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == code  # Ctrl-C: KeyboardInterrupt, then python dies of the SIGINT


def test_a_killed_client_takes_its_run_with_it(script, tmp_path):
    proc = subprocess.Popen([*python(), "-c", "import os, time; open('pid', 'w').write(str(os.getpid())); "
                             "time.sleep(60)"], cwd=tmp_path, stdin=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    pid = int((tmp_path / "pid").read_text())
    proc.kill()
    proc.wait(timeout=10)
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"the run {pid} outlived its killed client")
