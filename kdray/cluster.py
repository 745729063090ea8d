"""Can the cluster place every trial, and do all its nodes see the storage?  Checked once Ray is
up, before any trial starts.

Without an autoscaler (a local cluster) a trial that asks for more than any node has
would wait forever behind Ray's once-a-minute warning; kdray stops at once instead,
naming the setup, what it asks for and what the nodes have.  On a cluster joined
through RAY_ADDRESS an autoscaler may add the nodes, so kdray says the sweep waits.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from kdray.errors import ClusterError
from kdray.spec import TrialSpec


def bundles(spec: TrialSpec) -> list[dict[str, float]]:
    """The resource bundles a trial reserves; each must fit on one node."""
    if spec.distributed:
        from kdray.distributed import DRIVER_CPU, worker_resources
        d = spec.to_dict()
        return [{"CPU": DRIVER_CPU}] + [worker_resources(d)] * int(spec.distributed.get("workers", 1))
    r = spec.resources or {}
    return [{"CPU": float(r.get("cpu", 1)), "GPU": float(r.get("gpu", 0))}]


def _fits(bundle: dict, node: dict) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items() if v)


def _text(res: dict) -> str:
    return ", ".join(f"{k.lower()}: {res.get(k, 0.0):g}" for k in ("CPU", "GPU"))


def unplaceable(specs: list[TrialSpec], nodes: list[dict]) -> Optional[tuple[TrialSpec, dict]]:
    """The first trial with a bundle that fits on no node, and that bundle."""
    seen: set[str] = set()
    for spec in specs:
        for b in bundles(spec):
            sig = repr(sorted(b.items()))
            if sig in seen:
                continue
            if not any(_fits(b, n) for n in nodes):
                return spec, b
            seen.add(sig)
    return None


def alive_nodes() -> list[dict]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_resources(specs: list[TrialSpec], autoscaling: bool, nodes: Optional[list[dict]] = None) -> None:
    """ClusterError when a trial cannot be placed and no autoscaler can add a node; with one, a notice."""
    nodes = alive_nodes() if nodes is None else nodes
    bad = unplaceable(specs, nodes)
    if bad is None:
        return
    spec, bundle = bad
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    asks = f"setup {spec.setup!r}: resources.{spec.role} asks for {_text(bundle)} on one node"
    have = f"the largest of the cluster's {len(nodes)} node(s) has {_text(largest)}"
    if autoscaling:
        print(f"kdray: {asks}; {have}: the sweep waits for the autoscaler to add such a node (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        return
    raise ClusterError(f"{asks}, but {have} and no autoscaler can add one; lower the resources or run on a "
                       f"cluster that has them (RAY_ADDRESS)")


# Notices Ray logs on every ray.init that tell a kdray user nothing to act on: a local cluster kdray
# starts has token authentication on by default (Ray's own default; the notice that it is *off* is kept).
RAY_NOTICES = {"ray._private.authentication.authentication_token_setup":
               ("Token authentication is enabled for this Ray cluster",)}


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_ray_notices() -> None:
    """Drop RAY_NOTICES from this process's log (call before ray.init; idempotent)."""
    for name, starts in RAY_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(starts))


SHARED_CHECK_TIMEOUT_S = 120.0


def _sees(path: str) -> tuple[str, bool]:
    """(this node's host name, whether the driver's marker file is here): run on each node."""
    import os
    import socket
    return socket.gethostname(), os.path.isfile(path)


def check_shared_storage(storage: str, timeout_s: float = SHARED_CHECK_TIMEOUT_S) -> None:
    """On a cluster of more than one node, local storage must be the same folder on every node.

    A trial writes its artefacts where its own node sees the storage path; with a folder that
    only the driver's machine has, students on another node would not find their teacher and
    results would be scattered.  The driver writes a marker file with a random name into the
    folder, then one task pinned to each alive node looks for it; ClusterError names the nodes
    that do not see it, with the fix.  Object stores (s3://, gs://) are shared by nature."""
    from kdray.objectstore import is_object_store
    if is_object_store(storage):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kdray.sweep import local_storage

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    import uuid
    folder = local_storage(storage)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".kdray-shared-check-{uuid.uuid4().hex}"
    marker.write_text("kdray: is this folder shared by every node? (deleted at once)\n")
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        blind = []
        for n in nodes:
            ref = refs[n["NodeID"]]
            name = f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"
            if ref not in ready:
                raise ClusterError(f"storage {folder}: cannot check that every node sees this folder: node {name} "
                                   f"did not answer within {timeout_s:g} s; use s3://BUCKET/PREFIX or gs://BUCKET/PREFIX "
                                   "storage, which every node reaches")
            try:
                host, seen = ray.get(ref)
            except Exception as e:     # the node could not run the task (its worker or runtime env failed)
                raise ClusterError(f"storage {folder}: cannot check that node {name} sees this folder "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); use s3://BUCKET/PREFIX "
                                   "or gs://BUCKET/PREFIX storage, which every node reaches") from None
            if not seen:
                blind.append(f"{name}, host {host}")
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ClusterError(f"storage {folder} is a folder on this machine, but {len(blind)} of the cluster's "
                           f"{len(nodes)} nodes do not see it (a file written there is not found on: "
                           f"{'; '.join(blind)}); their trials would write where no other node reads. Use "
                           f"s3://BUCKET/PREFIX or gs://BUCKET/PREFIX storage, or a shared filesystem (NFS, ...) "
                           f"mounted at {folder} on every node")
