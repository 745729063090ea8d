"""Test-wide settings: the repository's real data, one torch thread, and a suite that cannot touch
its neighbours: no cluster, MLflow, cache or results folder of the machine's is joined, read or
written (a stranger may have a Ray cluster, a PostgreSQL and an MLflow UI of their own running)."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REPO_DATA = ROOT / "data"

# The small real data sets shipped in data/ (TinyShakespeare, an FSDD subset), unless the
# caller points KDRAY_DATA elsewhere.  Tests that need them ask for the real_data fixture.
os.environ.setdefault("KDRAY_DATA", str(REPO_DATA))
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Never join a cluster that `ray start --head` (or anyone) left running: every sweep starts its own.
os.environ.pop("RAY_ADDRESS", None)
# One private folder for the session, removed at exit: Ray's sessions and sockets (RAY_TMPDIR, kept
# short: a socket path must stay under 108 bytes), caches (XDG_CACHE_HOME: kdray's MLflow template,
# ...), and decoded data (KDRAY_CACHE: a user's own cache is not written by tests).
PRIVATE = Path(tempfile.mkdtemp(prefix="kdt-"))
atexit.register(shutil.rmtree, PRIVATE, ignore_errors=True)
RAY_TMP = PRIVATE / "ray"
RAY_TMP.mkdir()
os.environ["RAY_TMPDIR"] = str(RAY_TMP)
os.environ["XDG_CACHE_HOME"] = str(PRIVATE / "cache")
os.environ["KDRAY_CACHE"] = str(PRIVATE / "kdray-cache")
# A token in the environment: a local cluster does not write one to ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_TOKEN", os.urandom(16).hex())
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def own_folder(tmp_path, monkeypatch):
    """Each test runs in its own empty folder: a relative path (a sweep's default ./results) lands
    there, never in the repository's results/ nor another test's."""
    monkeypatch.chdir(tmp_path)


def require_data(path: Path, what: str) -> Path:
    """``path`` if it exists; else fail under CI (``$CI`` set) and skip loudly elsewhere.

    A missing data set never passes silently: CI must have it, and a local run says in
    the skip reason (shown by ``-ra``) what is missing and how to get it.
    """
    if path.exists():
        return path
    reason = (f"DATA MISSING: {what} expected at {path}; the repository ships it in data/ "
              f"(KDRAY_DATA={os.environ.get('KDRAY_DATA')!r}; `kdray data fetch` downloads the full sets)")
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture()
def real_data() -> Path:
    """The data root with the real TinyShakespeare (data/, or wherever $KDRAY_DATA points)."""
    root = Path(os.environ["KDRAY_DATA"])
    require_data(root / "tinyshakespeare" / "input.txt", "TinyShakespeare")
    return root


@pytest.fixture()
def real_fsdd() -> Path:
    """The data root with real Free Spoken Digit recordings (data/'s subset, or $KDRAY_DATA's)."""
    root = Path(os.environ["KDRAY_DATA"])
    require_data(root / "fsdd" / "recordings", "the Free Spoken Digit recordings")
    return root


def pytest_collection_modifyitems(items):
    """A test that starts Ray (through the ``local_ray`` fixture) is slow: ``-m "not slow"`` skips it."""
    for item in items:
        if "local_ray" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def local_ray():
    """One in-process local Ray cluster for every test that runs trials through ``run_sweep``."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(RAY_TMP))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def planted_mlflow(tmp_path_factory):
    """The planted sweep (tests/synthetic_runs.py) in a temporary sqlite MLflow, written once:
    experiment "planted" (the full grid) and "small" (a broken setup, for the CLI paths)."""
    from synthetic_runs import broken_setup, planted_runs, write_experiment
    d = tmp_path_factory.mktemp("planted")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    write_experiment(uri, "planted", planted_runs(), d / "artifacts")
    write_experiment(uri, "small", broken_setup(), d / "artifacts-small")
    return d, uri


@pytest.fixture()
def holm_without_gc(monkeypatch):
    """statsmodels' ``multipletests(..., method="holm")`` ends in ``gc.collect()``
    (statsmodels/stats/multitest.py): a full collection of this process's heap per family, ~0.05 s
    alone and ~0.5 s late in a full run, whose heap holds torch, Ray and MLflow.  A collection
    changes no value it returns; tests that ask statsmodels for Holm family by family skip it."""
    import gc
    monkeypatch.setattr(gc, "collect", lambda generation=2: 0)


@pytest.fixture(autouse=True)
def no_exec(monkeypatch):
    """``os.execvp`` would replace the pytest process (``kdray ui`` ends in it): a test that means to
    reach it stubs it itself; any other call fails the test instead."""
    def refuse(prog, args):
        raise AssertionError(f"a test called os.execvp({prog!r}, ...): it would replace the test process")
    monkeypatch.setattr(os, "execvp", refuse)
