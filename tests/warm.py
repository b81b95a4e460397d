"""
A warm interpreter for the suite: `python tests/warm.py run SOCKET script.py ...` (or `... run SOCKET -c CODE`)
runs like `python script.py ...` (same cwd, environment, arguments, stdin/stdout/stderr, exit status and
signals), but in a process forked from a server that has imported torch (with torch._dynamo, which the first
torch.optim.Optimizer imports), numpy, pandas and pyarrow once, so each run skips ~8 s of imports on a CPU-only
machine. The script itself, and everything of this project it imports (prepare.py reads its environment when
imported), loads fresh in every run, as do huggingface_hub and kernels (they read their cache variables when
imported).

Usage (tests/conftest.py's python() starts the server; it ends with the session, or when its parent is gone):
    python tests/warm.py serve SOCKET
    python tests/warm.py run SOCKET train.py

The run is not the client's child: the signals the client can catch (SIGTERM, SIGINT, SIGHUP) are passed on, and
a client that dies otherwise (SIGKILL, a test's timeout) takes the run with it within a fraction of a second. The
tests that kill a run with SIGKILL and check what it left behind start a cold python instead.
"""

import array
import json
import os
import select
import signal
import socket
import sys
import types

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def recv_all(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the client went away")
        data += chunk
    return data


def die_of(sig):
    """End this process by the signal `sig` (its exit status is then -sig, as for a python killed by it)."""
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def child(fds, request):
    """In the forked process: become the client's `python script.py` and exit with the script's status."""
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt, as in a fresh python
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import runpy
    import torch
    if "OMP_NUM_THREADS" in os.environ:  # read by torch at import, which happened in the server
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    argv = request["argv"]
    if argv[0] == "-c":  # python -c CODE ARGS: sys.argv is ['-c', ARGS...], the cwd first on sys.path
        sys.argv, sys.path[0] = ["-c"] + argv[2:], ""
    else:
        script = os.path.abspath(argv[0])
        sys.argv, sys.path[0] = [script] + argv[1:], os.path.dirname(script)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))  # as a fresh python would set up its stdout for fd 1
    sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr.reconfigure(write_through=unbuffered)
    code = 0
    try:
        if argv[0] == "-c":
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # what python does with sys.exit(...) at the top level
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:
        import traceback
        traceback.print_exc()
        code = -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1  # python dies of the SIGINT it got
    import atexit
    import threading
    threading._shutdown()  # what the interpreter does at exit: join the non-daemon threads, then atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        die_of(-code)
    os._exit(code)


def serve(path):
    import numpy  # noqa: F401  what a run would import first, imported once here
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import requests  # noqa: F401
    import tiktoken  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  imported by the first torch.optim.Optimizer (seconds on a CPU)
    import torch.nn.attention.flex_attention  # noqa: F401  train.py's other slow import
    import urllib3  # noqa: F401
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    server.settimeout(1.0)
    parent = os.getppid()
    while True:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            if os.getppid() != parent:  # whoever started the server is gone (killed before it could end it)
                return
            reap()
            continue
        conn.settimeout(None)
        msg, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_LEN(3 * array.array("i").itemsize))
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        request = json.loads(msg if msg.endswith(b"\n") else msg + recv_all(conn))
        if os.fork() == 0:  # a grandchild, so the server never waits: the middle process reports and exits
            try:
                server.close()
                pid = os.fork()
                if pid == 0:
                    conn.close()
                    try:
                        child(list(fds), request)  # exits with the run's status
                    finally:
                        os._exit(1)
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                while True:  # wait for the run; a client gone (it sends nothing, so readable = closed) ends it
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    if select.select([conn], [], [], 0.1)[0] and not conn.recv(1):
                        os.kill(pid, signal.SIGKILL)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                conn.sendall(f"{code}\n".encode())
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)
        conn.close()
        reap()


def reap():
    """Collects the middle processes that have ended."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def run(path, argv):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = json.dumps({"cwd": os.getcwd(), "env": dict(os.environ), "argv": argv}).encode() + b"\n"
    conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    reply = conn.makefile("r")
    pid = int(reply.readline())
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _: os.kill(pid, s))
    code = int(reply.readline())
    if code < 0:  # killed by a signal: end the same way, so `timeout` and bash see what they would have seen
        die_of(-code)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        run(sys.argv[2], sys.argv[3:])
