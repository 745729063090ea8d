"""Extra evaluations a setup can ask for by name (``evals: [tha_count]``).

Contract: ``fn(model, bundle, device) -> dict[str, float]``, run once on the
trained model in eval mode; the values are logged as MLflow metrics.
"""
from __future__ import annotations

from typing import Callable

from kdray.registry import PluginError, Registry, resolve, takes


def adopt_eval(path: str) -> Callable[..., dict]:
    fn = resolve(path)
    if callable(fn) and takes(fn, "model", "bundle", "device"):
        return fn
    raise PluginError(f"{path} is not an eval: give fn(model, bundle, device) -> dict[str, float]")


class EvalRegistry(Registry):
    """Evals by name, import path, or a probe the sweep file declared (``probe:{...}``, kdray/probes.py):
    the name holds the whole declaration, so any process can rebuild the probe from it."""

    def _adopted(self, name: str) -> bool:
        from kdray.probes import PREFIX
        if name.startswith(PREFIX) and name not in self._items:
            from kdray.probes import from_name, probe_eval
            self._items[name] = probe_eval(from_name(name))
            return True
        return super()._adopted(name)

    def valid_names(self) -> list[str]:
        """The named evals, without the probes built in this process (their names are declarations)."""
        from kdray.probes import PREFIX
        return [n for n in super().valid_names() if not n.startswith(PREFIX)]


EVALS: Registry[Callable[..., dict]] = EvalRegistry("eval", adopt=adopt_eval)
register_eval = EVALS.register


@register_eval("tha_count")
def tha_count(model, bundle, device) -> dict[str, float]:
    """At each "the" of the clean test text (docs/protocol.md §6.6): top-1 after "th", "a" or "e"?
    The probe {trigger: the, keep: 2, continuations: {a: a, e: e}} under its original metric names."""
    from kdray.probes import Probe, run_probe

    r = run_probe(Probe("tha", "the", (("a", "a"), ("e", "e")), keep=2), model, bundle, device)
    return {"tha_count_a": r["probe_tha_a_top1"], "tha_count_e": r["probe_tha_e_top1"],
            "tha_contexts": r["probe_tha_contexts"]}
