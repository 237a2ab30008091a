"""``BoundedMemo``: answers remembered by key, all forgotten at once when it is full.

Hot paths that compute the same answer again and again (a verified cookie, a
decoded session value, a timestamp's datetime, a peer's formatted address)
remember it here. The bound is the only policy: when ``maxsize`` entries are
held, the next ``put`` first forgets every entry. That is cheaper per hit than
an LRU (a lookup is one ``dict.get``, nothing is reordered) and enough when the
live set is far smaller than the bound; a flood of distinct keys only churns
the memo, it never grows past ``maxsize``.

What goes in is the caller's rule: remember only answers that cannot go stale
(immutable values, or facts that hold for the life of the memo's owner), and
only answers that were earned (a forged cookie is never remembered, so it is
checked every time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar, overload

__all__ = ["BoundedMemo"]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class BoundedMemo(Generic[K, V]):
    """At most *maxsize* remembered answers; ``get`` is the dict's own ``get``.

    Not thread-safe beyond what a dict is (one event loop uses it). ``put``
    returns the value so a miss can be written ``return memo.put(key, compute())``.
    """

    __slots__ = ("_data", "get", "maxsize")

    get: Callable[..., V | None]
    """``get(key)`` / ``get(key, default)``: the remembered answer, else None / *default*."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"a BoundedMemo needs maxsize >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._data: dict[K, V] = {}
        self.get = self._data.get  # bound once: a hit costs what a dict lookup costs

    def put(self, key: K, value: V) -> V:
        """Remember *value* for *key* (forgetting everything first when full); return it."""
        data = self._data
        if len(data) >= self.maxsize and key not in data:
            data.clear()
        data[key] = value
        return value

    @overload
    def pop(self, key: K) -> V | None: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...
    def pop(self, key: K, default: object = None) -> object:
        """Forget *key*; its answer, or *default* when none was remembered."""
        return self._data.pop(key, default)

    def clear(self) -> None:
        """Forget every answer."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        return f"BoundedMemo({len(self._data)}/{self.maxsize})"
