"""Can the Ray workers import the sweep's plug-ins?  Checked by ``kdray validate`` on a running cluster.

The driver imports every plug-in while it validates the file, but trials run in Ray worker
processes, which find modules on their own node's path: a package installed (or a folder on
PYTHONPATH) only where ``kdray`` runs would pass validation and then fail every trial.  When a
cluster is named (``RAY_ADDRESS``, as ``ray job submit`` sets it), validate runs one small task on
every live node that imports each module the sweep needs, under the job's runtime environment, and
a module that does not import is one error line naming the field, the node and the fix.

A local cluster (no ``RAY_ADDRESS``) is started by ``kdray sweep`` itself: its workers inherit the
driver's environment and working folder, so what validate imported they import too.
"""
from __future__ import annotations

import os
from typing import Any

from kdray.errors import ClusterError, SweepError
from kdray.registry import is_import_path

TIMEOUT_S = 120.0     # for the probe tasks; a node that cannot start a worker in this time is reported


def modules_for_workers(sweep: Any) -> list[tuple[str, str]]:
    """(sweep-file field, module) of every plug-in module a trial's worker imports, in file order."""
    out: list[tuple[str, str]] = [(f"plugins[{i}]", m) for i, m in enumerate(sweep.plugins)]
    for i, s in enumerate(sweep.setups):
        named = [("dataset.name", s.dataset.name), ("teacher.arch", s.teacher.arch)]
        if s.student is not None:
            named.append(("student.arch", s.student.arch))
        named += [(f"evals[{j}]", e) for j, e in enumerate(s.evals)]
        out += [(f"setups[{i}].{field}", name.partition(":")[0]) for field, name in named if is_import_path(name)]
    seen: set[str] = set()
    return [(f, m) for f, m in out if not (m in seen or seen.add(m))]


def probe(modules: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Runs in a Ray worker: this node's address, and (module, error) for each module that fails."""
    import importlib
    import socket

    failed = []
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - whatever the user's module raises is the answer
            failed.append((m, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    return socket.gethostname(), failed


def check_workers_import(sweep: Any, source: str) -> None:
    """SweepError when a worker on a cluster named by RAY_ADDRESS cannot import a plug-in module."""
    address = os.environ.get("RAY_ADDRESS")
    needed = modules_for_workers(sweep)
    if not address or not needed:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kdray.cluster import quiet_ray_notices

    quiet_ray_notices()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={address} to check that its workers "
                               f"import the plug-ins: {first}") from None
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(probe)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote([m for _, m in needed]) for n in nodes]
        try:
            answers = ray.get(refs, timeout=TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a worker that cannot even start (runtime env, ...)
            raise ClusterError(f"checking that the Ray workers import the plug-ins failed: "
                               f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                               ) from None
    finally:
        if started:
            ray.shutdown()
    field = dict((m, f) for f, m in needed)
    for node, failed in answers:
        for module, error in failed:
            raise SweepError(
                f"{source}: {field[module]}: the Ray workers cannot import {module!r} (node {node}: {error}); the "
                f"driver can, so trials would fail: install its package on every node, or ship it with the job "
                f"(ray job submit --runtime-env-json '{{\"py_modules\": [\"{module.split('.')[0]}\"]}}'; "
                f"docs/plugins.md)")
