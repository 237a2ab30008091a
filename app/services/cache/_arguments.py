"""How ``@cached`` turns a call into a key: arguments bound to the signature, canonical JSON.

``Binder`` binds a call's arguments the way the call itself would and leaves
out what never belongs in a key (``self``/``cls``, Starlette request objects,
``exclude``); ``canonical`` is the stable JSON those values are keyed by
(never ``hash()``, never ``repr()``), the same in every process.
"""

from __future__ import annotations

import base64
import inspect
import string
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any, Final

import orjson
from fastapi import params as fastapi_params
from pydantic import BaseModel
from starlette.background import BackgroundTasks
from starlette.requests import HTTPConnection
from starlette.responses import Response

from app.core.errors import UsageError
from app.core.keys import escape

__all__ = ["Binder", "EscapingFormatter", "canonical"]

_EMPTY: Final = inspect.Parameter.empty
_SKIPPED_TYPES: Final = (HTTPConnection, Response, BackgroundTasks)
_SIMPLE_KINDS: Final = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
)


def _key_default(obj: Any) -> Any:
    """Canonical JSON for argument types orjson does not serialize natively."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, set | frozenset):
        return [v for _, v in sorted(((canonical(v), v) for v in obj), key=lambda p: p[0])]
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, Decimal):
        return {"__decimal__": str(obj)}
    if isinstance(obj, timedelta):
        return {"__timedelta__": obj.total_seconds()}
    raise UsageError(type(obj).__name__)  # orjson turns it into its TypeError


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, default=_key_default, option=orjson.OPT_SORT_KEYS)


class EscapingFormatter(string.Formatter):
    """``str.format`` whose substituted fields are escaped (a value cannot add ``:`` parts)."""

    def format_field(self, value: Any, format_spec: str) -> str:
        return escape(format(value, format_spec))


_KEY_MEMO_SIZE: Final = 1024


def _is_dependency(param: inspect.Parameter, annotation: Any) -> bool:
    """True for a parameter FastAPI fills through ``Depends``/``Security`` (default or Annotated)."""
    if isinstance(param.default, fastapi_params.Depends):  # Security subclasses Depends
        return True
    return typing.get_origin(annotation) is typing.Annotated and any(
        isinstance(m, fastapi_params.Depends) for m in annotation.__metadata__
    )


def _is_skipped(annotation: Any) -> bool:
    """True for framework objects (request, response, background tasks): never keyed."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return isinstance(annotation, type) and issubclass(annotation, _SKIPPED_TYPES)


def _type_hints(func: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations; one unresolvable annotation does not hide the others."""
    try:
        return typing.get_type_hints(func, include_extras=True)
    except Exception:
        pass
    namespace = getattr(func, "__globals__", {})
    hints: dict[str, Any] = {}
    for name, annotation in getattr(func, "__annotations__", {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # the developer's own annotation text
            except Exception:
                continue
        hints[name] = annotation
    return hints


class Binder:
    """Binds call arguments to the signature quickly, the way the call itself would."""

    def __init__(self, func: Callable[..., Any], exclude: Iterable[str]) -> None:
        self.signature = inspect.signature(func)
        hints = _type_hints(func)
        params = list(self.signature.parameters.values())
        excluded = set(exclude)
        unknown = excluded - {p.name for p in params}
        if unknown:
            raise UsageError(f"@cached exclude names unknown parameters: {sorted(unknown)}")
        skip: set[str] = set(excluded)
        if params and params[0].name in ("self", "cls") and params[0].kind in _SIMPLE_KINDS:
            skip.add(params[0].name)
        dependencies: set[str] = set()
        for p in params:
            annotation = hints.get(p.name, p.annotation)
            if _is_skipped(annotation):
                skip.add(p.name)
            elif _is_dependency(p, annotation) and p.name not in excluded:
                dependencies.add(p.name)
        self.skip = frozenset(skip)
        self.dependencies = frozenset(dependencies)  # keyed by value, named in key errors
        self.simple = all(p.kind in _SIMPLE_KINDS for p in params)
        self.spec = [(p.name, p.default, p.name in self.skip) for p in params]
        skipped_positions = [i for i, (_, _, skipped) in enumerate(self.spec) if skipped]
        self.leading: int | None = (
            len(skipped_positions)
            if self.simple and skipped_positions == list(range(len(skipped_positions)))
            else None
        )  # the key is args[leading:] when only leading parameters (self) are skipped
        self.index = {p.name: i for i, p in enumerate(params)}
        self.positional_only = frozenset(
            p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY
        )
        self.return_type = hints.get("return", self.signature.return_annotation)
        if self.return_type in (_EMPTY, Any):
            self.return_type = None

    def values(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Sequence[Any]:
        """Values of the key arguments in signature order (defaults applied)."""
        if not kwargs and len(args) == len(self.spec) and self.leading is not None:
            return args[self.leading :]  # every argument given positionally: the common call
        if not self.simple:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return [
                [name, value] for name, value in bound.arguments.items() if name not in self.skip
            ]
        count = len(args)
        if count > len(self.spec):
            raise UsageError(f"takes {len(self.spec)} positional arguments but {count} were given")
        for name in kwargs:
            position = self.index.get(name)
            if position is None or name in self.positional_only:
                raise UsageError(f"got an unexpected keyword argument {name!r}")
            if position < count:
                raise UsageError(f"got multiple values for argument {name!r}")
        out: list[Any] = []
        for position, (name, default, skipped) in enumerate(self.spec):
            if position < count:
                value = args[position]
            elif name in kwargs:
                value = kwargs[name]
            elif default is not _EMPTY:
                value = default
            else:
                raise UsageError(f"missing a required argument: {name!r}")
            if not skipped:
                out.append(value)
        return out

    def mapping(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Every argument by name (for key and tag templates)."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
