"""
The suite's fixtures: a hub serving tiny shards, a cache prepared by the real `python prepare.py` (shared by the
session), and the environment the scripts under test start in. What the tests build with is in tests/helpers.py.

Run: uv run pytest
"""

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

# A worker per core (pytest-xdist, pyproject.toml), so one thread per torch process: two workers' runs, each with a
# thread per core, would fight over the cores (the suite took 25% longer that way on 2 cores)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import Hub, make_shards, prepare_from_local_hub  # noqa: E402 (torch reads the variable on import)

# The scripts under test start with these (read by glibc when a process starts):
# glibc returns each freed tensor of the 8192-token vocabulary's logits (64 MB and more) to the system and faults
# the pages in again at the next step; kept instead, a tiny CPU run takes ~20% less time. Tests only.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**32))
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**32))
# prepare.py, imported by this process, reads which dataset the cache root holds: never the user's own cache
os.environ["AUTORESEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoresearch-test-cache-")
atexit.register(shutil.rmtree, os.environ["AUTORESEARCH_CACHE_DIR"], True)


# pytest-xdist hands whole test files to its workers in collection order (pyproject.toml: --dist loadfile): the
# files with the longest runs go first, so that no worker starts one of them while the others have finished
LONGEST_FIRST = ("test_loop.py", "test_train.py", "test_shortcuts.py", "test_parallel.py", "test_reliability.py",
                 "test_analysis.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def bytecode_cache(tmp_path_factory):
    """Many tests start python subprocesses that import torch. Where PYTHONDONTWRITEBYTECODE is set and the
    venv holds no .pyc files, each would compile torch from source again (seconds of CPU): give them one
    bytecode cache for the session, outside the repo and the venv."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYTHONDONTWRITEBYTECODE")
        mp.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield


@pytest.fixture
def sigint_reaches_children():
    """A shell that starts pytest in the background (`pytest &`, nohup, some CI runners) leaves it ignoring
    SIGINT, and every child inherits the ignore: Python then never raises KeyboardInterrupt in a script under
    test. With a handler here instead of the ignore, children start with the default and Python installs its own."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def hub(tmp_path):
    """A hub serving training shards 0 and 1 and the validation shard."""
    h = Hub(tmp_path / "hub")
    make_shards(h.shard_dir)
    yield h
    h.close()


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory):
    """The run of prepare.py that made `prepared_cache`: dict(cache, result, requests, hub_root)."""
    root = tmp_path_factory.mktemp("prepared")
    cache, result, requests = prepare_from_local_hub(root)
    return dict(cache=cache, result=result, requests=requests, hub_root=root / "hub")


@pytest.fixture
def train_startup_error(monkeypatch):
    """train.main's start-up checks, in this process, on a cache they must reject: `check(cache)` returns the
    message of the SystemExit they raise (the script prints it as its one line on stderr and exits 1; the real
    script's runs check that). A cache that passes the checks fails the test where train.main would load the
    attention kernel, before it builds or trains anything."""
    import prepare
    import train

    def past_the_checks():
        raise AssertionError("the start-up checks passed: nothing was wrong with the cache")

    def check(cache):
        with monkeypatch.context() as m:
            m.setattr(prepare, "DATA_DIR", str(Path(cache) / "data"))
            m.setattr(prepare, "TOKENIZER_DIR", str(Path(cache) / "tokenizer"))
            m.setattr(train, "load_attention_backend", past_the_checks)
            m.delenv("AUTORESEARCH_SEED", raising=False)
            with pytest.raises(SystemExit) as exc:
                train.main()
        return exc.value.code

    return check


@pytest.fixture(scope="session")
def prepared_cache(prepared_run):
    """A cache made by the real `python prepare.py --num-shards 2` against a local hub (shared, read-only)."""
    return prepared_run["cache"]
