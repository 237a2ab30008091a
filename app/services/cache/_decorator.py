"""``@cached``: cache an async function's results in a ``CacheService`` (see ``cached``)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import (
    Any,
    Concatenate,
    Final,
    Generic,
    ParamSpec,
    TypeVar,
    cast,
    overload,
)

from app.core.errors import CodecError, ConfigurationError, RedisUnavailable, UsageError
from app.core.guard import Duration
from app.core.keys import digest
from app.core.redis import get_redis
from app.services.cache import _registry
from app.services.cache._arguments import Binder, EscapingFormatter, canonical
from app.services.cache._policy import TTL, CachePolicy
from app.services.cache._service import CacheService, get_cache

__all__ = ["BoundCachedFunction", "CachedFunction", "cached"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")

_FORMATTER: Final = EscapingFormatter()
_KEY_MEMO_SIZE: Final = 1024


KeyArg = str | Callable[..., str] | None
TagsArg = Sequence[str] | Callable[..., Iterable[str]]


class CachedFunction(Generic[P, R]):
    """An async function whose results are cached; see ``cached``."""

    __name__: str
    __qualname__: str

    def __init__(
        self,
        func: Callable[P, Awaitable[R]],
        *,
        ttl: TTL | None,
        key: KeyArg,
        tags: TagsArg,
        namespace: str,
        stale_ttl: TTL | None,
        early_refresh: float,
        cache: CacheService | Callable[[], CacheService] | None,
        exclude: Iterable[str],
        version: str | int | None,
        lease: Duration | None,
        wait_timeout: Duration | None,
    ) -> None:
        if not inspect.iscoroutinefunction(func):
            raise UsageError(f"@cached needs an async function; {func!r} is not one")
        functools.update_wrapper(self, func)
        self.__globals__ = getattr(func, "__globals__", {})
        self.__wrapped__ = func
        self._func = func
        self._binder = Binder(func, exclude)
        name = f"{func.__module__}.{func.__qualname__}"
        self.name = name if version is None else f"{name}:v{version}"
        self._key = key
        self._tags = tags
        self.namespace = namespace
        self._cache = cache
        self._fixed: CacheService | None = cache if isinstance(cache, CacheService) else None
        self._options: dict[str, Any] = {
            "stale_ttl": stale_ttl,
            "early_refresh": early_refresh,
            "lease": lease,
            "wait_timeout": wait_timeout,
        }
        self._ttl = ttl
        self.return_type = self._binder.return_type
        self._client: Any = None
        self._service: CacheService | None = None
        self._policy: CachePolicy | None = None
        self._registry = -1
        self._keys: dict[bytes, str] = {}
        self._rkeys: dict[bytes, str] = {}

    def __repr__(self) -> str:
        return f"<cached {self.name}>"

    # -- resolution -------------------------------------------------------------

    @property
    def cache(self) -> CacheService:
        """The ``CacheService`` this function uses right now."""
        return self._resolve()[0]

    def _resolve(self) -> tuple[CacheService, CachePolicy]:
        configured = self._cache
        if configured is None:
            client = get_redis()
            if client is self._client and _registry.version == self._registry:
                return self._service, self._policy  # type: ignore[return-value]
            service = get_cache(self.namespace, redis=client)
            self._client, self._registry = client, _registry.version
        elif self._fixed is not None:
            service = self._fixed
        else:
            service = cast("Callable[[], CacheService]", configured)()
        if service is not self._service or self._policy is None:
            self._policy = service.policy(self._ttl, **self._options)
            self._service = service
            self._rkeys.clear()  # Redis keys depend on the service's prefix and namespace
        return service, self._policy

    # -- keys --------------------------------------------------------------------

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key (before namespacing) of a call with these arguments."""
        return self._make_key(args, kwargs)

    def _make_key(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        template = self._key
        if template is None:
            values = self._binder.values(args, kwargs)
            try:
                blob = canonical(values)
            except TypeError as exc:
                self._refuse_dependency(args, kwargs)
                raise UsageError(
                    f"@cached {self.name}: cannot build a stable cache key from an argument of "
                    f"type {exc}; pass key=..., exclude=[...] or make it JSON-serializable "
                    "(pydantic models, dataclasses, str/int/float/bool/None, lists, dicts with "
                    "str keys, sets, datetimes, UUIDs and enums are)"
                ) from exc
            found = self._keys.get(blob)
            if found is None:
                if len(self._keys) >= _KEY_MEMO_SIZE:
                    self._keys.clear()
                found = self._keys[blob] = f"{self.name}:{digest(blob)}"
            return found
        if isinstance(template, str):
            return _FORMATTER.vformat(template, (), self._binder.mapping(args, kwargs))
        return template(*args, **kwargs)

    def _refuse_dependency(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Raise ``ConfigurationError`` naming the dependency whose value cannot be keyed, if any.

        Dropping it from the key silently would share one caller's result with
        every caller, so the decoration has to say so (``exclude=``) or key it.
        """
        if not self._binder.dependencies:
            return
        mapping = self._binder.mapping(args, kwargs)
        for name in sorted(self._binder.dependencies):
            value = mapping.get(name)
            try:
                canonical(value)
            except TypeError:
                raise ConfigurationError(
                    f"@cached {self.name}: the dependency parameter {name!r} (a "
                    f"{type(value).__name__}) cannot be part of the cache key; add "
                    f"exclude=[{name!r}] if the result is the same for every value of it, "
                    "pass key=..., or make the dependency return a JSON-serializable value "
                    "(for example the user id)"
                ) from None

    def _tag_list(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[str]:
        tags = self._tags
        if callable(tags):
            return list(tags(*args, **kwargs))
        if not tags:
            return []
        mapping = self._binder.mapping(args, kwargs)
        return [t.format_map(mapping) if "{" in t else t for t in tags]

    # -- calls -------------------------------------------------------------------

    def _redis_key(
        self, service: CacheService, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> str:
        """The Redis key of a call (memoized per argument blob for auto keys)."""
        if self._key is not None:
            return service.redis_key(self._make_key(args, kwargs))
        try:
            blob = canonical(self._binder.values(args, kwargs))
        except TypeError:
            return service.redis_key(self._make_key(args, kwargs))  # raises the helpful error
        found = self._rkeys.get(blob)
        if found is None:
            if len(self._rkeys) >= _KEY_MEMO_SIZE:
                self._rkeys.clear()
            found = self._rkeys[blob] = service.redis_key(self._make_key(args, kwargs))
        return found

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        service = self._service
        if service is None or (
            self._fixed is None
            and (
                self._cache is not None  # a callable: asked on every call
                or get_redis() is not self._client
                or _registry.version != self._registry
            )
        ):
            service, _ = self._resolve()
        rkey = self._redis_key(service, args, kwargs)
        policy = cast("CachePolicy", self._policy)
        if policy.simple and service.local is None:
            # Flights.get_or_set's plain-hit read, inlined (same package) so a hit
            # costs one coroutine frame less; everything else is the service's.
            try:
                with service._guard:
                    data = await service._redis.get(rkey)
            except (
                RedisUnavailable
            ) as exc:  # fail open (or raise in closed mode), as the service does
                return await service._flights.single_flight(  # type: ignore[no-any-return]
                    rkey, self._factory(args, kwargs), policy, self._tags_for(args, kwargs),
                    self.return_type, exc,
                )  # fmt: skip
            else:
                if data is not None and data[:1] != service._marker:
                    try:
                        value: R = service._decode(data, self.return_type)
                    except CodecError:
                        service._stats.decode_errors += 1
                    else:
                        service._stats.hits += 1
                        return value
                return await service._flights.after_read(  # type: ignore[no-any-return]
                    rkey, data, self._factory(args, kwargs), policy, self._tags_for(args, kwargs),
                    self.return_type,
                )  # fmt: skip
        result: R = await service._flights.get_or_set(
            rkey, self._factory(args, kwargs), policy, self._tags_for(args, kwargs),
            self.return_type,
        )  # fmt: skip
        return result

    def _factory(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Callable[[], Awaitable[R]]:
        func = self._func
        return lambda: func(*args, **kwargs)

    def _tags_for(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Callable[[], Iterable[str]] | tuple[()]:
        return (lambda: self._tag_list(args, kwargs)) if self._tags else ()

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function (skipping the cache read) and store its result."""
        service, _ = self._resolve()
        value = await self._func(*args, **kwargs)
        await service.set(
            self._make_key(args, kwargs),
            value,
            self._ttl,
            tags=self._tag_list(args, kwargs),
            stale_ttl=self._options["stale_ttl"],
        )
        return value

    async def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function without reading or writing the cache."""
        return await self._func(*args, **kwargs)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the entry of a call with these arguments; True if it existed."""
        service, _ = self._resolve()
        return bool(await service.delete(self._make_key(args, kwargs)))

    async def invalidate_all(self) -> int:
        """Delete every entry of this function (auto keys only); returns how many."""
        if self._key is not None:
            raise UsageError(
                f"@cached {self.name} uses a custom key; invalidate its entries by pattern or tag"
            )
        service, _ = self._resolve()
        return await service.invalidate(service.literal(self.name) + ":*")

    # -- methods -------------------------------------------------------------------

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> CachedFunction[P, R]: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None
    ) -> BoundCachedFunction[P2, R]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        return BoundCachedFunction(self, instance)


class BoundCachedFunction(Generic[P, R]):
    """A ``@cached`` method bound to an instance (``self`` is not part of the key)."""

    __slots__ = ("__self__", "_cached")

    def __init__(self, cached_function: CachedFunction[Any, R], instance: Any) -> None:
        self._cached = cached_function
        self.__self__ = instance

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self._cached._func.__get__(self.__self__)  # type: ignore[no-any-return]

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._cached(self.__self__, *args, **kwargs)

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._cached.key(self.__self__, *args, **kwargs)

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._cached.refresh(self.__self__, *args, **kwargs)

    async def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._cached.bypass(self.__self__, *args, **kwargs)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        return await self._cached.invalidate(self.__self__, *args, **kwargs)


@overload
def cached(func: Callable[P, Awaitable[R]], /) -> CachedFunction[P, R]: ...


@overload
def cached(
    ttl: TTL | None = None,
    *,
    key: KeyArg = None,
    tags: TagsArg = (),
    namespace: str = "cache",
    stale_ttl: TTL | None = None,
    early_refresh: float = 0.0,
    cache: CacheService | Callable[[], CacheService] | None = None,
    exclude: Iterable[str] = (),
    version: str | int | None = None,
    lease: Duration | None = None,
    wait_timeout: Duration | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]: ...


def cached(
    ttl: Any = None,
    *,
    key: KeyArg = None,
    tags: TagsArg = (),
    namespace: str = "cache",
    stale_ttl: TTL | None = None,
    early_refresh: float = 0.0,
    cache: CacheService | Callable[[], CacheService] | None = None,
    exclude: Iterable[str] = (),
    version: str | int | None = None,
    lease: Duration | None = None,
    wait_timeout: Duration | None = None,
) -> Any:
    """Cache an async function's results.

    ::

        @cached(ttl=60, tags=["users", "user:{user_id}"])
        async def load_user(user_id: int) -> User: ...

        await load_user(1)                 # computed, then served from Redis (a User again)
        await load_user.invalidate(1)      # drops exactly that entry
        await load_user.refresh(1)         # recompute and store, skipping the read
        await load_user.bypass(1)          # call the function, no cache at all

    * **Signature kept**: ``CachedFunction[P, R]`` is generic in the function's
      ``ParamSpec`` and return type, so type checkers see the same parameters,
      and ``inspect.signature`` / FastAPI see the original function.
    * **Stable keys across processes**: ``<module>.<qualname>:<sha256 of the
      arguments as canonical JSON>`` (never ``hash()``, never ``repr()``).
      Arguments are bound to the signature first, so ``f(1)``, ``f(x=1)`` and a
      defaulted call share a key. Arguments are keyed by their JSON value (a
      tuple, a list and a set of the same items are one key; a model by its
      fields). An argument without a canonical JSON form (an arbitrary object, a
      dict with non-str keys) raises ``UsageError`` (a ``TypeError``) naming it:
      pass ``key=`` or exclude it.
    * **Skipped arguments**: ``self``/``cls``, anything annotated as a Starlette
      ``Request``/``WebSocket``/``Response``/``BackgroundTasks`` and the names in
      ``exclude``. Nothing else is left out silently.
    * **Dependencies are part of the key**: a parameter filled by FastAPI's
      ``Depends``/``Security`` (a default or ``Annotated[..., Depends()]``) is
      keyed by its value like any argument, so a route whose result depends on
      ``user = Depends(current_user)`` caches one entry per user, never one for
      everyone. A dependency whose result does not change the answer (a database
      session, a client) must be named in ``exclude=[...]`` (or the decoration
      gives ``key=``); left in the key, a value without a canonical JSON form
      raises ``ConfigurationError`` naming the parameter on the first call,
      before the function runs.
    * **Typed results**: hits are decoded to the return annotation (pydantic
      models come back as models, ``list[Item]`` as a list of ``Item``).
    * ``key=`` may be a template (``"user:{user_id}"``, fields escaped, so the
      entry is shared with ``cache.get("user:1")``) or a callable with the
      function's parameters; ``tags=`` templates or a callable likewise.

    Everything else (TTLs, stale-while-revalidate, early refresh, stampede
    control, fail-open when Redis is down) is ``CacheService.get_or_set``.

    Args:
        ttl: fresh lifetime (``None``: the service's ``default_ttl``).
        key: ``None`` (function name + digest of the arguments), a template
            such as ``"user:{user_id}"`` or a callable taking the function's arguments.
        tags: tag templates (``"user:{user_id}"``) or a callable returning tags.
        namespace: the ``CacheService`` namespace (resolved per call through
            ``get_cache``, so it follows ``get_redis()``).
        stale_ttl / early_refresh / lease / wait_timeout: as in ``get_or_set``.
        cache: a ``CacheService`` (or a callable returning one) instead of the default.
        exclude: parameter names left out of the key. ``Depends``/``Security``
            parameters are keyed by their value unless named here (or ``key=``
            is given); an unkeyable one raises ``ConfigurationError``.
        version: bump to ignore every entry written by an older version.

    Usable bare (``@cached``) or with arguments (``@cached(ttl=60)``).
    """
    if callable(ttl) and not isinstance(ttl, int | float | timedelta):
        return cached()(ttl)

    def decorate(func: Callable[P, Awaitable[R]]) -> CachedFunction[P, R]:
        return CachedFunction(
            func,
            ttl=ttl,
            key=key,
            tags=tags,
            namespace=namespace,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
            cache=cache,
            exclude=exclude,
            version=version,
            lease=lease,
            wait_timeout=wait_timeout,
        )

    return decorate
