"""Test-wide settings: the shared real data, one torch thread, no MLflow outside tmp."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The real small data sets (TinyShakespeare, FSDD) beside the checkout, unless the
# caller points KDRAY_DATA elsewhere.  Tests that need them say so by name.
if "KDRAY_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["KDRAY_DATA"] = str(SHARED_DATA)
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Caches of decoded data go to a temporary folder, never into the shared data.
if "KDRAY_CACHE" not in os.environ:
    import tempfile
    os.environ["KDRAY_CACHE"] = tempfile.mkdtemp(prefix="kdray-cache-")
torch.set_num_threads(1)


@pytest.fixture()
def shared_data() -> Path:
    root = Path(os.environ.get("KDRAY_DATA", SHARED_DATA))
    if not (root / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail(f"the real data sets are expected under {root} (set KDRAY_DATA)")
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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
