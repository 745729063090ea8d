"""Name -> builder registries, so adding a model, data set or objective touches one file.

The pattern of timm's ``create_model``: a module registers a callable under a
name with a decorator; the rest of kdray looks it up by the name a sweep file
gives.  Unknown names raise ``UnknownNameError`` listing the valid ones.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T", bound=Callable)


class UnknownNameError(KeyError):
    """A name that no module registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        _load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_loaded = False


def _load_builtins() -> None:
    """Import the packages whose modules register built-in names (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import kdray.data  # noqa: F401
    import kdray.models  # noqa: F401
    import kdray.objectives  # noqa: F401
