"""Benchmark 1: ``kdray sweep`` (Ray Tune) vs a plain sequential loop over the same trials.

Both sides run the same plan (``kdray.plan.build_plan``) through the same
training function (``kdray.recipe.run_trial``), teachers first, into fresh
storage:

* kdray: ``run_sweep(sweep)``, exactly what ``kdray sweep FILE`` does after
  parsing the file: one trial per core (``resources: cpu 1``,
  ``torch.set_num_threads(1)`` in each trial), the driver logging every epoch
  and artefact to MLflow on sqlite.  Ray start-up (``ray.init``, which kdray
  overlaps with opening MLflow) is counted in kdray's wall time and reported
  on its own; shutdown is reported apart.
* plain loop: ``for spec in plan: run_trial(spec, store)`` in this process,
  torch using every core (``torch.set_num_threads(cores)``), no MLflow.  When
  ``loop_threads`` lists 1 as well, a one-thread loop is timed too (on a small
  model one thread is often faster than two).

Per-trial overhead of kdray, in core-seconds:
``(slots * sweep_seconds - sum of the trials' own train_seconds) / trials``,
with ``slots`` the concurrent trials (cores) and ``sweep_seconds`` the sweep
without Ray start-up.  It holds everything a trial slot spends outside its
training loop: Tune scheduling, actor reuse, result reporting, the final
evaluation and artefact writes, MLflow logging in the driver, and slots left
idle (waiting for a teacher, the tail).  The loop's own
per-trial cost outside the training loop is reported beside it.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import cpu_count, load_avg, median, now, result, torch_threads

NAME = "sweep"
TITLE = "kdray sweep (Ray Tune) vs a plain sequential loop"
TARGET = 0.8          # kdray wall time <= 0.8 x the plain loop's
ROOT = Path(__file__).resolve().parents[1]


def quickstart_dict() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())


def grid(kind: str, quick: bool = False) -> dict:
    """The sweep dicts measured: the quickstart, and a variant with ~10 s trials (at one thread)."""
    d = quickstart_dict()
    s = d["setups"][0]
    if kind == "quickstart":
        if quick:   # 14 trials: 2 teachers, 2 student seeds, SIDDO + KD 0.5 + RCD 0.5
            s.update(student_seeds=[10, 11], conditions={"siddo": True, "kd": {"alphas": [0.5]},
                                                          "rcd": {"alphas": [0.5]}})
        else:       # 44 trials: the quickstart's 2 teachers and 7 conditions, 3 of its 6 student seeds
            s.update(student_seeds=[10, 11, 12])
        return d
    if kind == "quickstart-packed":
        # The 44-trial quickstart grid, its CNN as shipped (BatchNorm, dropout 0.1), its students packed
        # 16 per trial; the loop trains the same plan one trial at a time.
        s.update(student_seeds=[10, 11] if quick else [10, 11, 12], resources={"student": {"pack": 16}})
        d["name"] = "quickstart-packed"
        return d
    if kind == "quickstart-tiny-packed":
        # The quickstart's whole 86-trial grid with the students packing is for: its CNN at 4 channels
        # (per-operation overhead, not arithmetic, bounds its steps on a CPU), packed up to 16 per trial.
        s["teacher"]["args"].update(channels=4)
        s.update(resources={"student": {"pack": 16}})
        if quick:
            s.update(student_seeds=[10, 11])
        d["name"] = "quickstart-tiny-packed"
        return d
    if kind == "quickstart-full":   # the quickstart as shipped: 86 trials (not in the default set: time)
        return d
    if kind == "10s":
        # ~10 s per trial on one core of the 2-core EPYC: 2x the channels, 40 epochs.
        s["teacher"]["args"]["channels"] = 32
        s["recipe"].update(epochs=8 if quick else 40, eval_every=0)
        s.update(name="digits-cnn-10s", student_seeds=[10], conditions={"siddo": True, "kd": {"alphas": [0.5]},
                                                                         "rcd": None})
        d["name"] = "quickstart-10s"
        return d
    raise ValueError(kind)


def tiny_grid() -> dict:
    """For the smoke test: 4 one-epoch MLP trials."""
    d = quickstart_dict()
    s = d["setups"][0]
    s["teacher"] = {"arch": "mlp", "args": {"hidden": 16}}
    s["dataset"] = {"name": "digits", "args": {"flatten": True}}
    s["recipe"].update(epochs=1, eval_every=0)
    s.update(student_seeds=[10], conditions={"siddo": True, "kd": None, "rcd": None})
    d["name"] = "tiny"
    return d


def _parse(d: dict, storage: str, device: str, slots: int, tracking_uri: Optional[str] = None):
    from kdray.sweep import parse_sweep

    d = copy.deepcopy(d)
    d["storage"] = storage
    d["tracking_uri"] = tracking_uri or f"sqlite:///{Path(storage) / 'mlflow.db'}"
    gpu = (1.0 / slots) if torch.device(device).type == "cuda" else 0
    for s in d["setups"]:
        pack = (s.get("resources") or {}).get("student", {}).get("pack", 1)
        s["resources"] = {"teacher": {"cpu": 1, "gpu": gpu}, "student": {"cpu": 1, "gpu": gpu, "pack": pack}}
    return parse_sweep(d, "<benchmark>")


def _trial_seconds(storage: str, sweep_name: str, plan) -> list[float]:
    from kdray.storage import Store

    from kdray.packing import asks_to_pack, pack_groups

    store = Store(storage, sweep_name)
    # a packed student's train_seconds is its pack's: count each pack once (the engine cuts the same packs)
    share = {s.trial_key: len(g) for g in pack_groups([s for s in plan.students if asks_to_pack(s)])
             for s in g}
    return [float(store.load_result(s.trial_key)["final"]["train_seconds"]) / share.get(s.trial_key, 1)
            for s in plan.all if store.exists(s.trial_key, "result.json")]


def run_loop(d: dict, threads: int, device: str) -> dict:
    """The plain loop: every trial of the plan, sequentially, in this process."""
    from kdray.plan import build_plan
    from kdray.recipe import run_trial
    from kdray.data import _cache as data_cache
    from kdray.storage import Store

    data_cache.clear()   # the loop loads its data once, as a plain script would (imports stay warm)
    with tempfile.TemporaryDirectory(prefix="kdray-bench-loop-") as tmp:
        sweep = _parse(d, tmp, device, 1)
        plan = build_plan(sweep)
        store = Store(sweep.storage, sweep.name)
        walls, trains = [], []
        load0 = load_avg()
        with torch_threads(threads):
            t0 = now()
            for spec in plan.all:
                t = now()
                final = run_trial(spec, store, device=device)
                walls.append(now() - t)
                trains.append(float(final["train_seconds"]))
            wall = now() - t0
    return {"wall_s": wall, "trials": len(walls), "threads": threads, "trial_wall_median_s": median(walls),
            "trial_train_sum_s": sum(trains), "outside_train_per_trial_s": (sum(walls) - sum(trains)) / len(walls),
            "load_avg_1m": (load0, load_avg())}


class _MlflowTimer:
    """Accumulates the seconds the driver spends in kdray's Tracker calls during a sweep."""

    METHODS = ("start_trial", "log_epochs", "log_artifact", "log_artifacts", "set_tags", "set_tag", "end_trial",
               "end_sweep", "finished_keys", "discard_unfinished")

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._orig = {}
        self._depth = 0   # one Tracker method calling another is counted once

    def __enter__(self):
        from kdray.tracking import Tracker

        for name in self.METHODS:
            orig = getattr(Tracker, name)
            self._orig[name] = orig

            def timed(*a, _orig=orig, **k):
                t = now()
                self._depth += 1
                try:
                    return _orig(*a, **k)
                finally:
                    self._depth -= 1
                    if not self._depth:
                        self.seconds += now() - t
                        self.calls += 1

            setattr(Tracker, name, timed)
        return self

    def __exit__(self, *exc):
        from kdray.tracking import Tracker

        for name, orig in self._orig.items():
            setattr(Tracker, name, orig)


def _cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used: the sweep driver's own cost."""
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def run_kdray(d: dict, device: str, slots: Optional[int] = None, tracking_uri: Optional[str] = None) -> dict:
    """``kdray sweep``: Ray start-up (overlapped with opening MLflow), the Tune run, MLflow logging;
    into fresh storage (and a fresh sqlite store unless ``tracking_uri`` names another)."""
    import ray

    from kdray.engine import run_sweep
    from kdray.plan import build_plan

    slots = slots or cpu_count()
    was_running = ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="kdray-bench-sweep-") as tmp:
        sweep = _parse(d, tmp, device, slots, tracking_uri)
        plan = build_plan(sweep)
        load0 = load_avg()
        with _MlflowTimer() as mt:
            t1, cpu1 = now(), _cpu_seconds()
            summary = run_sweep(sweep, plan, verbose=0)   # starts Ray, as `kdray sweep` does
            t_wall, driver_cpu = now() - t1, _cpu_seconds() - cpu1
        t_start = summary.ray_start_seconds
        t_sweep = t_wall - t_start
        t2 = now()
        if not was_running:
            ray.shutdown()
        t_shutdown = now() - t2
        if not summary.ok:
            raise RuntimeError("benchmark sweep failed: " + "; ".join(summary.lines()[:3]))
        trains = _trial_seconds(tmp, sweep.name, plan)
    n = len(plan.all)
    overhead = (slots * t_sweep - sum(trains)) / n
    return {"wall_s": t_start + t_sweep, "ray_start_s": t_start if not was_running else float("nan"),
            "first_trial_s": summary.first_trial_seconds,
            "sweep_s": t_sweep, "ray_shutdown_s": t_shutdown, "trials": n, "slots": slots,
            "trial_train_sum_s": sum(trains), "trial_train_median_s": median(trains),
            "overhead_per_trial_core_s": overhead, "mlflow_driver_s": mt.seconds, "mlflow_calls": mt.calls,
            "driver_cpu_s": driver_cpu,
            "load_avg_1m": (load0, load_avg())}


def compare(label: str, d: dict, device: str, loop_threads: tuple[int, ...], slots: int, reps: int = 1,
            once: tuple[int, ...] = ()) -> dict:
    """kdray, then the loop(s), ``reps`` times (A B B' A B B'), then a loop at each of ``once``'s
    thread counts; a fresh storage each.  With more than one repetition each side's run of
    median wall time stands for it."""
    runs = [(run_kdray(d, device, slots), {t: run_loop(d, t, device) for t in loop_threads}) for _ in range(reps)]
    k = _median_run([r[0] for r in runs])
    loops = {t: _median_run([r[1][t] for r in runs]) for t in loop_threads}
    loops.update({t: run_loop(d, t, device) for t in once if t not in loops})
    main = loops[loop_threads[0]]
    out = {"grid": label, "kdray": k, "loops": {str(t): v for t, v in loops.items()}}
    out["ratio_all_cores"] = k["wall_s"] / main["wall_s"]
    out["ratio_best_loop"] = k["wall_s"] / min(v["wall_s"] for v in loops.values())
    out["ratio_excl_ray_start"] = k["sweep_s"] / main["wall_s"]
    if reps > 1:
        out["ratios_per_rep"] = [round(a["wall_s"] / b[loop_threads[0]]["wall_s"], 3) for a, b in runs]
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run whose wall time is the median (the lower middle one of an even number)."""
    return sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]


def run(quick: bool = False, device: str = "cpu", grids: Optional[dict[str, dict]] = None,
        loop_threads: Optional[dict[str, tuple[int, ...]]] = None, slots: Optional[int] = None) -> dict:
    """Measure every grid; the headline ratio is the worst grid's kdray / all-core loop."""
    t0 = now()
    slots = slots or cpu_count()
    grids = grids or {"quickstart": grid("quickstart", quick), "10s-trials": grid("10s", quick)}
    # The all-core loop is the baseline; a one-thread loop beside it (the faster on small models).
    loop_threads = loop_threads or {name: (slots, 1) for name in grids}
    cases = [compare(name, d, device, tuple(dict.fromkeys(loop_threads[name])), slots) for name, d in grids.items()]
    return assemble(cases, quick, device, slots, now() - t0)


NOTES = [
    "Grids: 'quickstart' is search_spaces/quickstart.yaml with 3 of its 6 student seeds (full mode; "
    "the shipped 86-trial grid is grid('quickstart-full')); '10s-trials' is the same setup with "
    "small_cnn(32) for 40 epochs (~10 s per trial on one core), 2 teachers, 1 student seed, SIDDO + KD 0.5.  "
    "Packed grids are measured by the packed_sweep benchmark.",
    "Headline ratio: the worst grid's kdray wall time (Ray start-up included) / the all-core loop's; "
    "met requires every grid to be at or under the target.  'best loop' is the faster of the all-core and "
    "the one-thread loop.",
]
COMMON_NOTES = [
    "kdray and the loops run in turn (kdray, then the all-core loop, then any one-thread loop); with "
    "params.reps > 1 (packed_sweep) kdray and the all-core loop repeat and the one-thread loop runs once "
    "after them; each "
    "run starts from empty storage.",
    "Per-trial overhead = (slots x sweep seconds - sum of trial train_seconds) / trials; it includes "
    "slots idle while students wait for their teacher and at the tail, the final evaluation and artefact "
    "writes, Tune bookkeeping and the driver's MLflow logging.  Sweep seconds exclude Ray start-up, "
    "which kdray overlaps with opening MLflow.",
]


def assemble(cases: list[dict], quick: bool, device: str, slots: int, seconds: float, name: str = NAME,
             title: str = TITLE, target: float = TARGET, headline: Optional[tuple[str, ...]] = None,
             notes: Optional[list[str]] = None, reps: int = 1, baseline: str = "ratio_all_cores") -> dict:
    """The result record from the measured cases (also used to re-render a saved run).  The ratio
    is the worst of the ``headline`` grids (default: all) against ``baseline`` (the all-core loop,
    or ``ratio_best_loop``: the faster of the loops), and ``met`` asks the same of each."""
    counted = [c for c in cases if headline is None or c["grid"] in headline]
    ratio = max(c[baseline] for c in counted)
    ratio_text = "; ".join(f"{c['grid']} {c['ratio_all_cores']:.2f} (vs best loop {c['ratio_best_loop']:.2f})"
                           for c in cases)
    meas = {}
    for c in cases:
        g, k = c["grid"], c["kdray"]
        meas[f"{g}: trials"] = k["trials"]
        meas[f"{g}: kdray wall s (incl. Ray start)"] = k["wall_s"]
        meas[f"{g}: kdray Ray start-up s"] = k["ray_start_s"]
        meas[f"{g}: kdray start to first trial started s"] = k.get("first_trial_s", float("nan"))
        meas[f"{g}: kdray Ray shutdown s (not counted)"] = k["ray_shutdown_s"]
        meas[f"{g}: kdray per-trial overhead, core-s"] = k["overhead_per_trial_core_s"]
        meas[f"{g}: kdray median trial train s (1 thread, {k['slots']} concurrent)"] = k["trial_train_median_s"]
        meas[f"{g}: kdray driver time in MLflow calls s"] = k["mlflow_driver_s"]
        meas[f"{g}: kdray driver process CPU s during the sweep"] = k.get("driver_cpu_s", float("nan"))
        for t, lp in c["loops"].items():
            meas[f"{g}: loop wall s ({t} thread{'s' if t != '1' else ''})"] = lp["wall_s"]
            meas[f"{g}: loop median trial wall s ({t} thr)"] = lp["trial_wall_median_s"]
            meas[f"{g}: loop per-trial cost outside training s ({t} thr)"] = lp["outside_train_per_trial_s"]
        meas[f"{g}: ratio kdray / loop ({slots} threads)"] = c["ratio_all_cores"]
        meas[f"{g}: ratio kdray / best loop"] = c["ratio_best_loop"]
        meas[f"{g}: ratio kdray without Ray start / loop ({slots} threads)"] = c["ratio_excl_ray_start"]
        if "ratios_per_rep" in c:
            meas[f"{g}: ratio kdray / loop ({slots} threads), each repetition"] = c["ratios_per_rep"]
        meas[f"{g}: load avg 1m before/after (kdray; loop)"] = (f"{k['load_avg_1m'][0]}/{k['load_avg_1m'][1]}; "
                                                                f"{c['loops'][str(slots)]['load_avg_1m'][0]}/"
                                                                f"{c['loops'][str(slots)]['load_avg_1m'][1]}")
    met = all(c[baseline] <= target for c in counted)
    which = "worst grid" if headline is None else f"worst of {', '.join(headline)}"
    loop = f"{slots} torch threads" if baseline == "ratio_all_cores" else "the faster of its thread counts"
    return result(name, title, ratio, f"kdray sweep wall / plain loop wall ({loop}), {which}",
                  f"<= {target}", met, meas, {"quick": quick, "device": device, "slots": slots, "reps": reps,
                                              "grids": {c["grid"]: c["kdray"]["trials"] for c in cases}},
                  (notes if notes is not None else NOTES) + COMMON_NOTES, seconds) | {"cases": cases,
                                                                                      "ratio_text": ratio_text}
