"""Telemetry hooks: how services report operations without depending on OpenTelemetry.

Services mark the methods a user would look for in a trace with ``@traced("cache.get",
...)`` and, inside them, say what happened with ``outcome("hit")``. Streams and pub/sub
add ``*carrier()`` to what they write, so the trace context travels with the message.

Nothing here imports OpenTelemetry, and while no backend is installed the hooks cost
(almost) nothing: ``@traced`` hands the class its original function back (no wrapper, no
extra frame), ``outcome`` is one global read, ``carrier()`` returns an empty tuple.
``app.observability.instrument()`` installs a backend: it then replaces each registered
method on its class with a wrapper that opens a span and records the metrics, and
``uninstrument()`` puts the originals back. Methods of modules imported later are wrapped
as they are registered.

``watch(kind, obj)`` keeps a weak reference to objects whose state gauges read (stream
consumers); it never keeps them alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, TypeVar

__all__ = [
    "AttrValue",
    "Backend",
    "Operation",
    "SpanKind",
    "active",
    "carrier",
    "from_self",
    "hit_or_miss",
    "install",
    "operations",
    "outcome",
    "traced",
    "uninstall",
    "watch",
    "watched",
]

AttrValue = str | bool | int | float
SpanKind = Literal["internal", "client", "producer", "consumer"]
F = TypeVar("F", bound=Callable[..., Any])

TRACEPARENT = "traceparent"
"""The stream field / envelope name of the W3C trace context."""


class Operation:
    """One traced method: what it is called in traces, and how to describe a call.

    ``attrs(self, *args, **kwargs)`` gives the span attributes of a call (only called
    while a backend is installed); ``result(value)`` turns the return value into the
    outcome when the method did not report one with ``outcome()``; ``parent(self, *args,
    **kwargs)`` gives a mapping that may carry a ``traceparent`` to continue (consumers).
    """

    __slots__ = ("attr", "attrs", "func", "kind", "name", "owner", "parent", "result")

    def __init__(
        self,
        name: str,
        func: Callable[..., Any],
        kind: SpanKind,
        attrs: Callable[..., Mapping[str, AttrValue]] | None,
        result: Callable[[Any], str | None] | None,
        parent: Callable[..., Mapping[Any, Any] | None] | None,
    ) -> None:
        self.name = name
        self.func = func
        self.kind: SpanKind = kind
        self.attrs = attrs
        self.result = result
        self.parent = parent
        self.owner: type | None = None
        self.attr = ""

    def __repr__(self) -> str:
        owner = self.owner.__qualname__ if self.owner is not None else "?"
        return f"<Operation {self.name} {owner}.{self.attr}>"


class Backend(Protocol):
    """What ``app.observability`` installs (see ``install``)."""

    def wrap(self, op: Operation) -> Callable[..., Any]:
        """A replacement for ``op.func`` that reports each call."""

    def outcome(self, value: str, error: BaseException | None) -> None:
        """Record *value* as the outcome of the innermost traced call of this task."""

    def carrier(self) -> tuple[str, ...]:
        """``(TRACEPARENT, value)`` for the current trace context, or ``()``."""


_operations: list[Operation] = []
_backend: Backend | None = None
_watched: dict[str, weakref.WeakSet[Any]] = {}


class _Register:
    """The decorator's placeholder: registers the method when its class is created."""

    def __init__(self, op: Operation) -> None:
        self.op = op

    def __set_name__(self, owner: type, attr: str) -> None:
        op = self.op
        op.owner, op.attr = owner, attr
        _operations.append(op)
        backend = _backend
        setattr(owner, attr, op.func if backend is None else backend.wrap(op))


def traced(
    name: str,
    *,
    kind: SpanKind = "internal",
    attrs: Callable[..., Mapping[str, AttrValue]] | None = None,
    result: Callable[[Any], str | None] | None = None,
    parent: Callable[..., Mapping[Any, Any] | None] | None = None,
) -> Callable[[F], F]:
    """Register a method (async or not) as the operation *name*; the method is unchanged.

    Only methods defined in a class body can be registered (the class is patched when a
    backend is installed). Without a backend the class keeps the plain function.
    """

    def register(func: F) -> F:
        placeholder: Any = _Register(Operation(name, func, kind, attrs, result, parent))
        return placeholder  # type: ignore[no-any-return]  # replaced by func in __set_name__

    return register


def from_self(mapping: Mapping[str, str]) -> Callable[..., dict[str, AttrValue]]:
    """An ``attrs`` callable: span attribute -> attribute of the instance, e.g.
    ``from_self({"toolkit.cache.namespace": "namespace"})``."""
    items = tuple(mapping.items())

    def attrs(self: Any, *args: Any, **kwargs: Any) -> dict[str, AttrValue]:
        return {key: _value(getattr(self, name)) for key, name in items}

    return attrs


def hit_or_miss(value: Any) -> str:
    """A ``result`` callable for reads that return None on a miss."""
    return "miss" if value is None or type(value).__name__ == "_Missing" else "hit"


def _value(value: Any) -> AttrValue:
    return value if isinstance(value, str | bool | int | float) else str(value)


def outcome(value: str, error: BaseException | None = None) -> None:
    """Report what the current traced call did (``"hit"``, ``"stale"``, ``"conflict"``...)."""
    backend = _backend
    if backend is not None:
        backend.outcome(value, error)


def carrier() -> tuple[str, ...]:
    """Stream fields / envelope items carrying the current trace context; () when off."""
    backend = _backend
    return () if backend is None else backend.carrier()


def watch(kind: str, obj: Any) -> None:
    """Let gauges of *kind* read *obj* while it lives (a weak reference)."""
    group = _watched.get(kind)
    if group is None:
        group = _watched[kind] = weakref.WeakSet()
    group.add(obj)


def watched(kind: str) -> list[Any]:
    """The live objects registered with ``watch(kind, ...)``."""
    group = _watched.get(kind)
    return [] if group is None else list(group)


def operations() -> tuple[Operation, ...]:
    """Every registered operation, in registration order."""
    return tuple(_operations)


def active() -> Backend | None:
    """The installed backend, or None."""
    return _backend


def install(backend: Backend) -> None:
    """Make *backend* receive every operation (replacing any installed one)."""
    global _backend
    _backend = backend
    for op in _operations:
        if op.owner is not None:
            setattr(op.owner, op.attr, backend.wrap(op))


def uninstall() -> None:
    """Remove the backend; every class gets its original functions back."""
    global _backend
    _backend = None
    for op in _operations:
        if op.owner is not None:
            setattr(op.owner, op.attr, op.func)
