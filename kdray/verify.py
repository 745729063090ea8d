"""``kdray verify``: does a study reproduce?  Re-train a seeded random sample of its stored trials
here and compare each with what was stored.

A stored result is a pure function of its trial key and its fingerprint (kdray/provenance.py).
Where this machine's fingerprint equals the one stored with the trial (run.json), the trial's
result files must come back as the same bytes; elsewhere every final metric must agree within a
stated tolerance (default 1e-4, the tolerance packed students are held to against training
alone).  A packed student is trained again with its whole pack, as it was trained (its numbers
depend in the last bits on its pack-mates).  Teachers' artefacts come from the sweep's storage;
nothing is written there: each trial trains into a temporary folder.
"""
from __future__ import annotations

import math
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

DEFAULT_SAMPLE = 5
DEFAULT_TOLERANCE = 1e-4
TEACHER_FILES = ("model.pt", "test_logits.npy", "train_logits.npy")   # what a student reads of its teacher


@dataclass
class Verdict:
    key: str
    label: str
    ok: Optional[bool]          # None: not verified (why in ``detail``)
    detail: str

    def line(self) -> str:
        word = {True: "ok", False: "DIFFERS", None: "skipped"}[self.ok]
        return f"  {word:8s}{self.label} ({self.key}): {self.detail}"


def _metric_gap(old: dict, new: dict) -> tuple[float, str]:
    """The largest absolute difference over the final metrics both hold, and its metric."""
    gaps = [(abs(float(old[k]) - float(new[k])), k) for k in old
            if k in new and isinstance(old[k], (int, float)) and isinstance(new[k], (int, float))
            and not (math.isnan(float(old[k])) and math.isnan(float(new[k])))]
    return max(gaps, default=(0.0, ""))


def verify_trial(store, key: str, tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """Train the stored trial ``key`` again (alone, or with its pack) and compare."""
    import torch

    from kdray.packing import run_pack
    from kdray.recipe import run_trial
    from kdray.spec import TrialSpec
    from kdray.storage import RESULT_FILES, Store

    run = store.load_run(key)
    if not run:
        return Verdict(key, key, None, "no run.json: stored before kdray recorded how trials ran")
    spec = TrialSpec.from_dict(run["spec"])
    if spec.distributed:
        return Verdict(key, spec.label, None, "a DDP trial (Ray Train): verify re-trains single-process trials only")
    from kdray.simulation import NoGpuError, device_for
    try:   # a simulated GPU run is re-run simulated; a real one needs a GPU here
        device, simulated = device_for(spec.resources, bool((run.get("fingerprint") or {}).get("simulated")))
    except NoGpuError:
        return Verdict(key, spec.label, None, "a GPU trial, and torch sees no GPU here: verify it on a GPU machine")
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kdray-verify-") as tmp:
        scratch = Store(tmp, spec.sweep)
        if spec.teacher is not None:
            for name in TEACHER_FILES:
                if store.exists(spec.teacher_key, name):
                    scratch.write_bytes(spec.teacher_key, name, store.read_bytes(spec.teacher_key, name))
        torch.set_num_threads(max(1, int(spec.resources.get("cpu", 1))))   # as the trial's worker set it
        try:
            if run.get("pack"):
                run_pack([TrialSpec.from_dict(d) for d in run["pack"]], scratch, device, simulated=simulated)
            else:
                run_trial(spec, scratch, device=device, simulated=simulated)
        finally:
            torch.set_num_threads(threads)
        again = scratch.load_run(key)
        same_fp = again.get("fingerprint_id") == run.get("fingerprint_id")
        files = [n for n in RESULT_FILES if store.exists(key, n)]
        differ = [n for n in files if not scratch.exists(key, n) or scratch.read_bytes(key, n) != store.read_bytes(key, n)]
        gap, metric = _metric_gap(store.load_json(key, "result.json")["final"], scratch.load_json(key, "result.json")["final"])
    pack = f", with its pack of {len(run['pack'])}" if run.get("pack") else ""
    if not differ:
        return Verdict(key, spec.label, True, f"identical ({len(files)} files byte for byte{pack})")
    if same_fp:
        return Verdict(key, spec.label, False, f"same fingerprint {run['fingerprint_id']}, yet {', '.join(differ)} "
                                               f"differ (largest metric difference {gap:.3g} in {metric or 'none'}{pack})")
    ok = gap <= tolerance
    return Verdict(key, spec.label, ok, f"fingerprint {again.get('fingerprint_id')} here, {run.get('fingerprint_id')} "
                                        f"stored: largest metric difference {gap:.3g} ({metric or 'none'}) "
                                        f"{'within' if ok else 'beyond'} the tolerance {tolerance:g}{pack}")


def run_verify(target: str, sample: int = DEFAULT_SAMPLE, seed: int = 0, tracking_uri: Optional[str] = None,
               storage: Optional[str] = None, tolerance: float = DEFAULT_TOLERANCE) -> int:
    """What ``kdray verify`` does: 0 when every sampled trial reproduces, 1 when one does not (or
    none could be checked), 2 on a user error."""
    from kdray.analysis.report import load_target
    from kdray.analysis.runs import ReportError
    from kdray.storage import Store

    try:
        df, uri, name, stored_at, _ = load_target(target, tracking_uri)
    except ReportError as e:
        print(f"kdray: error: {e}", file=sys.stderr)
        return 2
    store = Store(storage or stored_at, name)
    done = sorted(set(df.loc[df["status"] == "FINISHED", "trial_key"].dropna()))
    if not done:
        print(f"kdray: error: {target}: no finished trials to verify", file=sys.stderr)
        return 2
    chosen = random.Random(seed).sample(done, min(sample, len(done)))
    print(f"kdray verify: re-training {len(chosen)} of {len(done)} finished trials of {name!r} "
          f"(sampled with --seed {seed}; storage {store.uri})", flush=True)
    verdicts = []
    for key in chosen:
        v = verify_trial(store, key, tolerance)
        verdicts.append(v)
        print(v.line(), flush=True)
    bad = sum(v.ok is False for v in verdicts)
    checked = sum(v.ok is not None for v in verdicts)
    print(f"kdray verify: {checked - bad} of {len(verdicts)} reproduce, {bad} differ, "
          f"{len(verdicts) - checked} not checked")
    return 1 if bad or not checked else 0


def add_arguments(sp) -> None:
    sp.add_argument("target", help="a sweep file or an MLflow experiment name")
    sp.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help=f"trials to re-train (default {DEFAULT_SAMPLE})")
    sp.add_argument("--seed", type=int, default=0, help="seeds the sample (printed, so a reviewer can draw the same)")
    sp.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"largest difference in a final metric where the fingerprint differs (default {DEFAULT_TOLERANCE:g})")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's)")
    sp.add_argument("--storage", help="the sweep's storage (default: the sweep file's, else ./results)")
