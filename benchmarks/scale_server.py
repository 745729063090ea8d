"""Benchmark: the driver's cost per trial as a sweep grows, logging to an ``mlflow server`` with
PostgreSQL behind it, as a cluster's sweeps do (docs/distributed.md; issue 29, item 6).

The same sweeps as ``benchmarks.scale`` (near-zero-work trials, unpacked and packed 16, 245 and
1,000 trials with --quick, 4,160 more in full), each into its own experiment on one server that
this benchmark starts on this machine (benchmarks/servers.py): the server and PostgreSQL share
the 2 cores with the driver and the trials, as they would not on a cluster.  Targets as for
``scale``: exponent b <= 1.1 and <= 50 ms of driver CPU per trial at the largest size.
"""
from __future__ import annotations

from typing import Optional

from benchmarks.scale import measure
from benchmarks.servers import mlflow_server_on_postgresql

NAME = "scale_server"
TITLE = "driver cost per trial as a sweep grows (near-zero-work trials, mlflow server on PostgreSQL)"


def run(quick: bool = False, device: str = "cpu", sizes: Optional[tuple] = None, packs: tuple = (1, 16)) -> dict:
    with mlflow_server_on_postgresql() as uri:
        return measure(NAME, TITLE, quick, device, sizes, packs, tracking_uri=uri,
                       notes=("Tracking: an mlflow server (1 worker) over HTTP, PostgreSQL behind it, both on this "
                              "machine; driver CPU excludes the server's and PostgreSQL's own CPU.",))


if __name__ == "__main__":   # python -m benchmarks.scale_server 20x69 [--packs 1]: one size on a fresh server
    import sys

    from benchmarks.scale import main

    with mlflow_server_on_postgresql() as uri:
        main(sys.argv[1:], tracking_uri=uri)
