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

An entry point is installed for the whole machine, so one that fails to import must not
stop every kdray command: it is one warning naming its package, and ``KDRAY_PLUGINS=off``
skips entry points altogether.  A module the sweep file names is the file's own business,
so it fails the file (one error line).
"""
from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from typing import Iterable

from kdray.registry import import_module

GROUP = "kdray.plugins"
SWITCH = "KDRAY_PLUGINS"          # "off": installed entry points are not loaded
_entry_points_loaded = False
# entry point name -> why it was skipped (its package, the error), for messages that need it
skipped: dict[str, str] = {}


def entry_points_enabled() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() not in ("off", "0", "false", "no")


def load_entry_points() -> None:
    """Import (or call) every installed ``kdray.plugins`` entry point, once per process; one that
    fails is skipped with one warning line on stderr naming its package."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    if not entry_points_enabled():
        return
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as e:  # the plug-in's own import (or registration) failed
            package = getattr(getattr(ep, "dist", None), "name", None) or ep.value.partition(":")[0]
            first = str(e).splitlines()[0] if str(e) else ""
            skipped[ep.name] = f"package {package!r}: {type(e).__name__}: {first}"
            print(f"kdray: warning: skipped the {GROUP} entry point {ep.name!r} of package {package!r} "
                  f"({ep.value}): {type(e).__name__}: {first}; fix or uninstall it ({SWITCH}=off skips all "
                  "plug-in entry points)", file=sys.stderr, flush=True)


def load(modules: Iterable[str] = ()) -> None:
    """Entry points, then the named modules (each one PluginError line if it cannot be imported)."""
    load_entry_points()
    for name in modules:
        import_module(name)
