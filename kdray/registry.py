"""Name -> declaration registries, so adding a model, data set, eval or condition is one declaration.

The pattern of timm's ``create_model``: the rest of kdray looks a component up
by the name a sweep file gives.  Unknown names raise ``UnknownNameError``
listing the valid ones.  A declaration may point at its implementation by
import path (``"kdray.models.gpt:nano_gpt"``); ``builder_args`` reads that
function's signature from its source file without importing it, so checking
a sweep file never imports torch.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar, Union

T = TypeVar("T")
Target = Union[str, Callable]   # "package.module:function", or the callable itself


class UnknownNameError(KeyError):
    """A name that no module registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """``load``: called once before the first look-up (imports the modules that register).

    ``adopt(path)``: for a name that is an import path (``"my_pkg.models:Net"``), the item to
    register under that name, built from the object there (kdray/plugins.py); None: names only.
    """

    def __init__(self, kind: str, load: Optional[Callable[[], None]] = None,
                 adopt: Optional[Callable[[str], T]] = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._load = load
        self._adopt = adopt

    def _ready(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None
            load()

    def register(self, name: str) -> Callable[[T], T]:
        def deco(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = item
            return item

        return deco

    def _adopted(self, name: str) -> bool:
        """Registers the object at an import path the first time it is named."""
        if name in self._items or self._adopt is None or not is_import_path(name):
            return name in self._items
        self._items[name] = self._adopt(name)
        return True

    def get(self, name: str) -> T:
        self._ready()
        self._adopted(name)
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.valid_names())}"
            ) from None

    def valid_names(self) -> list[str]:
        """What an error offers instead of an unknown name."""
        return self.names()

    def names(self) -> list[str]:
        self._ready()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._ready()
        return self._adopted(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class PluginError(ValueError):
    """A plug-in that cannot be used: its module does not import, or the object is of the wrong kind.
    A ValueError, so the sweep schema reports it at the field that named it."""


def is_import_path(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr.isidentifier())


def import_module(module: str):
    """A user's module, or one PluginError line (not found, or it raised while importing)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise PluginError(f"cannot import {module!r}: {e}; install its package or put it on PYTHONPATH") from None
    except Exception as e:  # the user's module raised
        raise PluginError(f"importing {module!r} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from None


def installed(module: str) -> bool:
    """Whether ``module`` can be found (not imported); a finder that refuses it counts as not."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve(target: Target) -> Callable:
    """The object a target names (imports its module)."""
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    try:
        return getattr(import_module(module), attr)
    except AttributeError:
        raise PluginError(f"module {module!r} has no {attr!r}") from None


def takes(fn: Callable, *names: str) -> bool:
    """Whether ``fn`` can be called with these keyword arguments (its signature, not a call)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    params = sig.parameters
    return all(n in params for n in names) or any(p.kind is p.VAR_KEYWORD for p in params.values())


def builder_args(target: Target, skip: tuple[str, ...] = ()) -> dict[str, tuple[Optional[str], Any]]:
    """{argument: (annotation as text or None, default or inspect.Parameter.empty)} of a builder.

    For an import path the function is found in its module's source with ``ast``
    (the module is not imported); defaults that are not literals read as None.
    """
    if callable(target):
        sig = inspect.signature(target)
        return {n: (None if p.annotation is p.empty else str(p.annotation), p.default)
                for n, p in sig.parameters.items() if n not in skip and p.kind is not p.VAR_KEYWORD}
    module, _, name = target.partition(":")
    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(a.defaults)) + list(a.defaults)
    pairs = list(zip(positional, defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
    out = {}
    for arg, default in pairs:
        if arg.arg in skip:
            continue
        if default is None:            # a keyword-only argument without default
            default = inspect.Parameter.empty
        elif isinstance(default, ast.AST):
            try:
                default = ast.literal_eval(default)
            except ValueError:
                default = None
        out[arg.arg] = (ast.unparse(arg.annotation) if arg.annotation is not None else None, default)
    return out


_SIMPLE = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
           "list": (list, tuple), "tuple": (list, tuple)}


def check_value(annotation: Optional[str], value: Any) -> bool:
    """Whether ``value`` fits a simple annotation ("int", "Optional[float]", "int | None", "Union[None, str,
    dict]"); annotations it does not understand accept anything."""
    if annotation is None:
        return True
    text = annotation.replace(" ", "")
    if text.startswith("Optional[") and text.endswith("]"):
        return value is None or check_value(text[9:-1], value)
    if text.startswith("Union[") and text.endswith("]"):
        return any(check_value(t, value) for t in text[6:-1].split(","))
    if "|" in text:
        return any(check_value(t, value) for t in text.split("|"))
    if text == "None":
        return value is None
    base = text.split("[", 1)[0]
    if base not in _SIMPLE:
        return True
    if isinstance(value, bool) and base != "bool":
        return False
    return isinstance(value, _SIMPLE[base])


@dataclass(frozen=True)
class Range:
    """Where a numeric builder argument makes sense (``low``/``high`` inclusive unless ``*_open``), so
    that ``channels: -4`` or ``dropout: 1.5`` is refused by ``kdray validate`` instead of training
    nonsense or failing inside a trial.  Declared next to the builder (``Architecture(ranges=...)``,
    ``Dataset(ranges=...)``)."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def why_not(self, value: Any) -> Optional[str]:
        """None when ``value`` is inside (or is not a number: its annotation is checked elsewhere);
        else what would be valid."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be finite, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (below or above):
            return None
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low:g}, got {value!r}"
        if self.low is None:
            return f"must be {'<' if self.high_open else '<='} {self.high:g}, got {value!r}"
        return (f"must be in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}, "
                f"got {value!r}")


AT_LEAST_1 = Range(1)                                  # sizes and counts: channels, hidden, heads, layers
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)                     # widths, seconds
DROPOUT = Range(0, 1, high_open=True)                  # a drop probability of 1 zeroes the layer
FRACTION = Range(0, 1, low_open=True, high_open=True)  # a split that leaves both sides non-empty
SEED_32 = Range(0, 2**32 - 1)                          # numpy / scikit-learn random_state
