"""Plug-ins: conditions, architectures, data sets and evals from the user's own package.

Three ways in (docs/plugins.md):

- an installed package's entry points in the ``kdray.plugins`` group, each naming
  a module (or a function) that registers components when imported (called);
- a sweep file's ``plugins: [my_pkg.kdray_components, ...]``: modules imported
  the same way, in the driver and in every Ray worker that runs its trials;
- an import path where a name goes: ``arch: my_pkg.models:build_net``,
  ``dataset: {name: my_pkg.data:load}``, ``evals: [my_pkg.evals:count]``
  (kdray.registry adopts the object there the first time it is named).

A module that registers conditions uses ``kdray.conditions.register``; models
``kdray.models.declare_model``; data sets ``kdray.data.declare_dataset``;
evals ``kdray.evals.register_eval``: the same calls kdray's built-ins make.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Iterable

from kdray.registry import PluginError, import_module

GROUP = "kdray.plugins"
_entry_points_loaded = False


def load_entry_points() -> None:
    """Import (or call) every installed ``kdray.plugins`` entry point, once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # the plug-in's own import failed
            raise PluginError(f"the {GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(e).__name__}: {e}") from None
        if callable(obj) and not isinstance(obj, type):
            obj()


def load(modules: Iterable[str] = ()) -> None:
    """Entry points, then the named modules (each one PluginError line if it cannot be imported)."""
    load_entry_points()
    for name in modules:
        import_module(name)
