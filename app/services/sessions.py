"""Server-side sessions: web2py-style records in Redis, updated without lost writes.

One session is one Redis hash, ``<prefix>:<namespace>:{<family>}:<token>``,
holding the fields of web2py's ``redis_session`` record (``unique_key``,
``client_ip``, ``locked``, ``created_at``, ``modified_at``) plus ``version``,
``expires_at`` (the absolute deadline), ``idle_ms`` and ``subject``. Each
top-level data key is its own field ``d:<name>`` (a codec envelope, so bytes,
datetimes and models round-trip), and ``m:<name>`` remembers the version that
last changed it. A session id is ``<family>.<token>``: the 128-bit random token
is the secret; the family is fixed for the life of a login chain so that a
regenerated id lands in the same Cluster slot as the old one and the move is a
single atomic script.

**Concurrency rule.** A writer says which version it read. Each key it sets or
deletes is applied only if nobody else changed *that key* after that version
(deleting a key that someone else already deleted is fine); keys it did not
touch are never written. So two requests that change different keys both
survive, and a request that changes a key someone else changed since it read
the session gets ``SessionConflict`` and writes nothing: last writer wins per
key only when it had read the latest value of that key. (Two requests that
both increment a counter: one succeeds, one gets the conflict, even though
both would write the same number.) The check and the
write are one Lua call: there is no window between them and no retry loop.

**Retries are safe.** redis-py re-sends a command whose connection broke, not
knowing whether the server ran it. Every write call carries a random nonce,
kept on the record with the write's outcome (the last few writes), so a re-run
of the same call answers as the first run did: a lost reply never turns a
stored write into ``SessionConflict`` or a regeneration into ``SessionNotFound``.

**No resurrection.** Every write requires the record to exist; after
``delete`` a short tombstone lets a late writer learn the session was deleted
(``SessionNotFound``), rather than expired.

**Expiry.** Redis enforces both bounds: after every write, load and touch the
record's TTL is ``min(idle_ttl, expires_at - now)`` computed in Lua from the
server's ``TIME``, so a session dies after ``idle_ttl`` without activity and at
``absolute_ttl`` after creation whatever happens.

**Regeneration ends the old id at once.** ``regenerate`` (after a login) moves
the record to a new id in one script; from that moment the old id reads
nothing (``get``/``load`` return None), writes nothing and cannot be
regenerated again (``SessionNotFound``), so an id planted by an attacker before
the victim logged in (session fixation) is worthless afterwards. No data ever
points from the old id to the new one. For ``regenerate_grace`` seconds the old
id is only remembered as *moved* (``was_regenerated``), so a request that raced
the login (sent with the old cookie before the browser saw the new one) can be
told apart from a forged cookie and need not clear the browser's new cookie.

**Revocation.** When the data key ``subject_key`` (default ``"user"``) is set, the
session is indexed in a per-subject set (TTL: the absolute lifetime, refreshed
on each add) so ``delete_all_for(subject)`` can revoke every session of a user.
The index is written *before* the record names its subject, so it may hold
extra ids (skipped and pruned) but never misses one.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from app.core.codec import Codec, default_codec
from app.core.config import get_settings
from app.core.errors import RedisUnavailable, SessionConflict, SessionNotFound, ToolkitError
from app.core.keys import KeySpace, digest
from app.core.redis import (
    CONNECTION_ERRORS,
    REFUSED_FOR_NOW,
    AnyRedis,
    CircuitBreaker,
    breaker_for,
    client_decodes_responses,
    scan_keys,
)
from app.core.scripts import Script, ScriptArg
from app.core.telemetry import traced

__all__ = [
    "DEFAULT_ABSOLUTE_TTL",
    "DEFAULT_IDLE_TTL",
    "SessionRecord",
    "SessionStore",
    "WriteResult",
    "is_session_id",
    "new_session_id",
]

log = logging.getLogger("app.sessions")

DEFAULT_IDLE_TTL: Final = 30 * 60.0
"""Seconds without a request after which a session ends (OWASP: 15-30 min)."""
DEFAULT_ABSOLUTE_TTL: Final = 12 * 3600.0
"""Seconds after creation after which a session ends whatever its activity."""

_CREATE = Script.from_package("app.services", "lua/session_create.lua")
_LOAD = Script.from_package("app.services", "lua/session_load.lua")
_WRITE = Script.from_package("app.services", "lua/session_write.lua")
_DELETE = Script.from_package("app.services", "lua/session_delete.lua")
_TOUCH = Script.from_package("app.services", "lua/session_touch.lua")

_ID = re.compile(r"^([A-Za-z0-9_-]{8})\.([A-Za-z0-9_-]{22})$")
_BATCH = 100  # HGETALLs per pipeline
_PARALLEL = 16  # concurrent deletes in delete_all_for (leaves the pool to the requests)
_INDEX_MARGIN_MS = 60_000


def new_session_id(family: str | None = None) -> str:
    """A fresh id ``<family>.<token>``: a 128-bit random token, in a new or given family."""
    return f"{family or secrets.token_urlsafe(6)}.{secrets.token_urlsafe(16)}"


def is_session_id(value: str) -> bool:
    """True when *value* has the shape of an id made by ``new_session_id``."""
    return _ID.match(value) is not None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _ms(value: float | dt.timedelta, name: str) -> int:
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
    if seconds <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return max(1, round(seconds * 1000))


def _pairs(flat: Sequence[Any]) -> Iterable[tuple[Any, Any]]:
    return zip(flat[::2], flat[1::2], strict=True)


def _time(ms: Any) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.UTC)


class SessionRecord(BaseModel):
    """One stored session, as web2py's ``redis_session`` keeps it (plus version and deadline).

    ``unique_key`` is a random secret of the record (new on every regeneration),
    usable as a per-session CSRF seed. ``locked`` is an application flag the
    store keeps but does not interpret. Times are UTC, from the Redis clock.
    """

    id: str
    unique_key: str
    client_ip: str | None = None
    locked: bool = False
    created_at: dt.datetime
    modified_at: dt.datetime
    expires_at: dt.datetime = Field(description="Absolute deadline (creation + absolute_ttl).")
    version: int = Field(description="Bumped by every write that changes the record.")
    subject: str | None = Field(default=None, description="Value of the store's subject_key.")
    data: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a write: the session's id (new after a regeneration) and version."""

    id: str
    version: int
    modified_at: dt.datetime


class _Guard:
    """Breaker + error wrapping around Redis calls (a class: cheaper than @contextmanager)."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    def __enter__(self) -> None:
        self._breaker.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, REFUSED_FOR_NOW):  # OOM under noeviction, or a read-only replica
            self._breaker.record_success()  # the server answered
            raise RedisUnavailable(f"Redis refused a session write for now: {exc}") from exc
        if isinstance(exc, RedisError) and not isinstance(exc, CONNECTION_ERRORS):
            self._breaker.record_success()  # the server answered
            raise ToolkitError(f"Redis refused a session command: {exc}") from exc
        self._breaker.__exit__(exc_type, exc, tb)


class SessionStore:
    """Sessions in Redis: create, read, update without lost writes, expire, revoke.

    Args:
        redis: any ``redis.asyncio`` client (``decode_responses`` True or False),
            fakeredis, or a ``RedisCluster``.
        idle_ttl: seconds (or timedelta) without activity after which a session ends.
        absolute_ttl: seconds after creation after which it ends regardless.
        namespace: key namespace (``<prefix>:<namespace>:...``).
        codec: encodes each data value (default: the shared JSON codec).
        subject_key: the data key naming the session's owner, indexed for
            ``delete_all_for``; ``None`` disables the index.
        regenerate_grace: seconds an id replaced by ``regenerate`` is remembered as
            moved (``was_regenerated``; writes through it say so). It never
            resolves to the new session: 0 forgets it at once.
        tombstone_ttl: seconds a deleted id is remembered as deleted.

    Every method is one Redis round trip unless its docstring says otherwise,
    and raises ``RedisUnavailable`` when Redis cannot be reached (or the circuit
    breaker is open). Writes are single Lua scripts: cancelled mid-call, a write
    has either happened entirely or not at all.
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        idle_ttl: float | dt.timedelta = DEFAULT_IDLE_TTL,
        absolute_ttl: float | dt.timedelta = DEFAULT_ABSOLUTE_TTL,
        namespace: str = "session",
        codec: Codec | None = None,
        subject_key: str | None = "user",
        regenerate_grace: float | dt.timedelta = 10.0,
        tombstone_ttl: float | dt.timedelta = 60.0,
    ) -> None:
        self.redis = redis
        self.idle_ms = _ms(idle_ttl, "idle_ttl")
        self.absolute_ms = _ms(absolute_ttl, "absolute_ttl")
        grace = (
            regenerate_grace.total_seconds()
            if isinstance(regenerate_grace, dt.timedelta)
            else float(regenerate_grace)
        )
        if grace < 0:
            raise ValueError(f"regenerate_grace must be >= 0, got {regenerate_grace!r}")
        self.grace_ms = round(grace * 1000)
        self.tombstone_ms = _ms(tombstone_ttl, "tombstone_ttl")
        self.subject_key = subject_key
        self.codec = (codec or default_codec()).with_text_safe(client_decodes_responses(redis))
        prefix = get_settings().redis_key_prefix
        self._records = KeySpace(prefix, namespace)
        self._moved = KeySpace(prefix, f"{namespace}.moved")
        self._gone = KeySpace(prefix, f"{namespace}.gone")
        self._index = KeySpace(prefix, f"{namespace}.subject")
        self._root = self._records.root
        # Ids match _ID, whose alphabet escape() leaves untouched, so these f-string keys are
        # exactly KeySpace.tagged(family, token) without re-escaping on every request.
        self._record_root = self._records.root + "{"
        self._moved_root = self._moved.root + "{"
        self._gone_root = self._gone.root + "{"
        self._guard = _Guard(breaker_for(redis))
        self._idle_arg = str(self.idle_ms)
        self._absolute_arg = str(self.absolute_ms)

    # -- keys -----------------------------------------------------------------

    def _parts(self, session_id: str) -> tuple[str, str] | None:
        match = _ID.match(session_id)
        return (match[1], match[2]) if match else None

    def _record_key(self, family: str, token: str) -> str:
        return f"{self._record_root}{family}}}:{token}"

    def _moved_key(self, family: str, token: str) -> str:
        return f"{self._moved_root}{family}}}:{token}"

    def _gone_key(self, family: str, token: str) -> str:
        return f"{self._gone_root}{family}}}:{token}"

    def _index_key(self, subject: str) -> str:
        return self._index.tagged(digest(subject))

    # -- create ---------------------------------------------------------------

    @traced("session.save", result=lambda _: "saved")
    async def create(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        client_ip: str | None = None,
        locked: bool = False,
    ) -> SessionRecord:
        """Store a new session with a fresh random id and return its record.

        TTL: ``min(idle_ttl, absolute_ttl)`` from now. When *data* names a
        subject (``subject_key``), the id is first added to that subject's index
        (a second round trip). Atomic: the record appears whole or not at all.
        """
        values = dict(data or {})
        encoded = self._encode_items(values)
        subject = self._subject_of(values)
        for _ in range(3):
            session_id = new_session_id()
            family, token = session_id.split(".")
            unique_key = secrets.token_urlsafe(16)
            if subject:
                await self._add_to_index(subject, session_id)
            args: builtins.list[ScriptArg] = [
                self._idle_arg,
                self._absolute_arg,
                unique_key,
                client_ip or "",
                "1" if locked else "0",
                subject,
            ]
            for name, value in encoded:
                args += (name, value)
            with self._guard:
                reply = await _CREATE(self.redis, keys=[self._record_key(family, token)], args=args)
            if int(reply[0]) == 1:
                created = _time(reply[1])
                return SessionRecord.model_construct(
                    id=session_id,
                    unique_key=unique_key,
                    client_ip=client_ip,
                    locked=locked,
                    created_at=created,
                    modified_at=created,
                    expires_at=_time(reply[2]),
                    version=1,
                    subject=subject or None,
                    data=values,
                )
        raise ToolkitError("could not allocate a unique session id after 3 attempts")

    # -- read -----------------------------------------------------------------

    @traced("session.load", result=lambda record: "found" if record else "missing")
    async def get(self, session_id: str) -> SessionRecord | None:
        """The record of *session_id*, or None when unknown, expired or deleted.

        A pure read: it does not extend the idle timeout (``load`` does). An id
        that ``regenerate`` replaced reads None. Undecodable data raises
        ``CodecError``.
        """
        parts = self._parts(session_id)
        if parts is None:
            return None
        with self._guard:
            fields = await self.redis.hgetall(self._record_key(*parts))
        if not fields:
            return None
        return self._parse(session_id, fields.items())

    @traced("session.load", result=lambda record: "found" if record else "missing")
    async def load(self, session_id: str, *, touch: bool = True) -> SessionRecord | None:
        """Read a session as a request does, restarting its idle timeout.

        With *touch* the TTL restarts at ``min(idle_ttl, time to expires_at)``
        in the same script that reads. Returns None when the id is unknown,
        expired, deleted or was replaced by ``regenerate`` (whenever that was:
        the old id of a regenerated session never reads the new one's data).
        """
        parts = self._parts(session_id)
        if parts is None:
            return None
        keys = [self._record_key(*parts), self._moved_key(*parts)]
        with self._guard:
            reply = await _LOAD(self.redis, keys=keys, args=["1" if touch else "0"])
        if int(reply[0]) == 1:
            return self._parse(session_id, _pairs(reply[1]))
        return None

    async def was_regenerated(self, session_id: str) -> bool:
        """True when *session_id* was replaced by ``regenerate`` less than ``regenerate_grace`` ago.

        Only a fact about the old id (it gives no access to the new session):
        the session middleware uses it to leave the browser's cookie alone for
        a request that raced a login, instead of clearing it as a forged one.
        """
        parts = self._parts(session_id)
        if parts is None:
            return False
        with self._guard:
            return bool(await self.redis.exists(self._moved_key(*parts)))

    async def touch(self, session_id: str) -> bool:
        """Restart the idle timeout (never past the absolute deadline); False if gone."""
        parts = self._parts(session_id)
        if parts is None:
            return False
        with self._guard:
            left = await _TOUCH(self.redis, keys=[self._record_key(*parts)])
        return int(left) > 0

    # -- write ----------------------------------------------------------------

    @traced("session.save", result=lambda _: "saved")
    async def update(
        self,
        session_id: str,
        *,
        data: Mapping[str, Any] | None = None,
        locked: bool | None = None,
        expected_version: int | None = None,
    ) -> SessionRecord:
        """Replace the data (when given) and/or set ``locked``; return the stored record.

        *data* replaces every data key (removed keys count as changed for
        concurrent ``merge`` callers). With *expected_version* the write happens
        only if the record is still at that version, else ``SessionConflict``.
        Raises ``SessionNotFound`` when the session is unknown, expired or
        deleted: an update never recreates it. Refreshes the idle timeout; a
        call that changes nothing keeps ``version`` and ``modified_at``.
        """
        reply = await self._write(
            session_id,
            mode="keep" if data is None else "replace",
            base_version=expected_version or 0,
            changes=data,
            deleted=(),
            locked=locked,
            regenerate=False,
            known_subject=None,
            want_record=True,
        )
        assert isinstance(reply, SessionRecord)
        return reply

    @traced("session.save", result=lambda _: "saved")
    async def merge(
        self,
        session_id: str,
        *,
        base_version: int,
        changes: Mapping[str, Any] | None = None,
        deleted: Iterable[str] = (),
        locked: bool | None = None,
        regenerate: bool = False,
        subject: str | None = None,
    ) -> WriteResult:
        """Apply a request's changes to the session it read at *base_version*.

        Each key in *changes* / *deleted* is written unless another writer
        changed that key after *base_version* (a key both deleted is no
        conflict): then nothing is written and ``SessionConflict`` lists the keys. Other keys are
        untouched, so concurrent writers of different keys never undo each
        other. ``base_version=0`` skips the check (last writer wins per key).

        With *regenerate* the session moves to a new id (same family, new
        ``unique_key``) in the same script, and the old id stops working for
        reads and writes at once; *subject* is the session's current
        subject if the caller knows it (saves a round trip when indexed).
        Raises ``SessionNotFound`` when the session is unknown, expired or
        deleted: a write never resurrects it.
        """
        reply = await self._write(
            session_id,
            mode="merge",
            base_version=base_version,
            changes=changes,
            deleted=deleted,
            locked=locked,
            regenerate=regenerate,
            known_subject=subject,
            want_record=False,
        )
        assert isinstance(reply, WriteResult)
        return reply

    async def regenerate(self, session_id: str) -> str:
        """Move the session to a new id (fixation defence after a login); return it.

        Atomic: data, version and TTL move with the record; ``unique_key``
        changes. The old id is dead from that moment: it reads None, writes
        nothing, and ``regenerate`` through it raises ``SessionNotFound`` (as
        for a session that is gone), so a fixated id never yields a valid one.
        """
        result = await self.merge(session_id, base_version=0, regenerate=True)
        return result.id

    async def _write(
        self,
        session_id: str,
        *,
        mode: str,
        base_version: int,
        changes: Mapping[str, Any] | None,
        deleted: Iterable[str],
        locked: bool | None,
        regenerate: bool,
        known_subject: str | None,
        want_record: bool,
    ) -> WriteResult | SessionRecord:
        parts = self._parts(session_id)
        if parts is None:
            raise SessionNotFound(f"session {session_id[:12]!r}... does not exist")
        family, token = parts
        values = dict(changes or {})
        removed = [name for name in deleted if name not in values]
        subject_arg = self._subject_change(values, removed, replace=mode == "replace")
        new_id = new_session_id(family) if regenerate else session_id
        new_token = new_id.split(".")[1]
        record_key = self._record_key(family, token)
        target_key = self._record_key(family, new_token) if regenerate else record_key
        indexed = subject_arg if subject_arg is not None else (known_subject or "")
        pre_indexed = bool(indexed) and (regenerate or subject_arg is not None)
        if pre_indexed:
            await self._add_to_index(indexed, new_id)
        args: builtins.list[ScriptArg] = [
            mode,
            base_version,
            "" if locked is None else ("1" if locked else "0"),
            "" if subject_arg is None else "s",
            subject_arg or "",
            indexed,
            self.grace_ms,
            secrets.token_urlsafe(16) if regenerate else "",
            new_token,
            "1" if want_record else "0",
            len(values),
            secrets.token_urlsafe(12),  # the nonce a retried call recognises itself by
        ]
        for name, value in self._encode_items(values):
            args += (name, value)
        args += removed
        keys = [
            record_key,
            target_key,
            self._moved_key(family, token),
            self._gone_key(family, token),
        ]
        for _ in range(3):
            with self._guard:
                reply = await _WRITE(self.redis, keys=keys, args=args)
            code = int(reply[0])
            if code == -3:  # the record names a subject the new id is not indexed under yet
                indexed = _text(reply[1])
                pre_indexed = True
                await self._add_to_index(indexed, new_id)
                args[5] = indexed
                continue
            if code == -4:  # new id taken (never in practice: 128 random bits)
                new_id = new_session_id(family)
                new_token = new_id.split(".")[1]
                keys[1] = self._record_key(family, new_token)
                args[8] = new_token
                if indexed:
                    await self._add_to_index(indexed, new_id)
                continue
            break
        if code == 1:
            previous = _text(reply[3])
            final_subject = previous if subject_arg is None else subject_arg
            if previous and (previous != final_subject or regenerate):
                await self._drop_from_index(previous, session_id)
            if want_record:
                return self._parse(new_id, _pairs(reply[4]))
            return WriteResult(id=new_id, version=int(reply[1]), modified_at=_time(reply[2]))
        if pre_indexed:  # nothing was written: take back the index entry made for it
            await self._drop_from_index(indexed, new_id)
        if code == 0:
            names = [_text(n) for n in reply[2:]]
            raise SessionConflict(
                "the session changed since it was read"
                + ("" if names == ["*"] else f" (keys: {', '.join(sorted(names))})")
                + "; reload it and retry the request"
            )
        if code == -2:
            raise SessionNotFound(f"session {family}.{token[:4]}... was deleted")
        if code == -5:
            raise SessionNotFound(
                f"session {family}.{token[:4]}... was regenerated: the old id no longer works"
            )
        if code in (-3, -4):
            raise SessionConflict(
                "the session's subject kept changing while it was regenerated; retry the request"
            )
        raise SessionNotFound(f"session {family}.{token[:4]}... does not exist or has expired")

    # -- delete ---------------------------------------------------------------

    async def delete(self, session_id: str) -> bool:
        """Delete a session (logout); True when it existed.

        Leaves a tombstone for ``tombstone_ttl`` so a request still holding the
        session cannot write it back (it gets ``SessionNotFound``), and stops an
        id replaced by ``regenerate`` from resolving. Also removes the id from
        its subject's index (a second round trip when it had a subject).
        """
        parts = self._parts(session_id)
        if parts is None:
            return False
        reply = await self._delete(parts, expected_subject="")
        if int(reply[0]) != 1:
            return False
        subject = _text(reply[1])
        if subject:
            await self._drop_from_index(subject, session_id)
        return True

    async def _delete(self, parts: tuple[str, str], *, expected_subject: str) -> Any:
        family, token = parts
        keys = [
            self._record_key(family, token),
            self._gone_key(family, token),
            self._moved_key(family, token),
        ]
        with self._guard:
            return await _DELETE(self.redis, keys=keys, args=[self.tombstone_ms, expected_subject])

    async def delete_all_for(self, subject: str | int) -> int:
        """Revoke every session of *subject* (the value of ``subject_key``); return how many.

        Reads the subject's index and deletes each session that still names
        this subject (each with its tombstone), pruning stale ids; repeats
        while sessions were added during the pass (at most 5 passes). One round
        trip per session (16 in flight at a time) plus two per pass.
        """
        if self.subject_key is None:
            raise ToolkitError("delete_all_for needs a SessionStore with a subject_key")
        name = str(subject)
        index = self._index_key(name)
        deleted = 0
        for _ in range(5):
            with self._guard:
                members = await self.redis.smembers(index)
            if not members:
                break
            ids = [_text(m) for m in members]
            for start in range(0, len(ids), _PARALLEL):
                chunk = ids[start : start + _PARALLEL]
                replies = await asyncio.gather(
                    *(self._delete(p, expected_subject=name) for p in map(self._parts, chunk) if p)
                )
                deleted += sum(1 for r in replies if int(r[0]) == 1)
            with self._guard:
                await self.redis.srem(index, *ids)
        return deleted

    async def list_for(self, subject: str | int) -> builtins.list[SessionRecord]:
        """The live sessions of *subject* (a device list); prunes stale index entries."""
        name = str(subject)
        index = self._index_key(name)
        with self._guard:
            members = await self.redis.smembers(index)
        ids = sorted(_text(m) for m in members)
        records = await self._get_many(ids)
        stale = [i for i, r in zip(ids, records, strict=True) if r is None or r.subject != name]
        if stale:
            with self._guard:
                await self.redis.srem(index, *stale)
        return [r for r in records if r is not None and r.subject == name]

    # -- index ----------------------------------------------------------------

    async def _add_to_index(self, subject: str, session_id: str) -> None:
        key = self._index_key(subject)
        with self._guard:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(key, session_id)
                pipe.pexpire(key, self.absolute_ms + _INDEX_MARGIN_MS)
                await pipe.execute()

    async def _drop_from_index(self, subject: str, session_id: str) -> None:
        # Best effort after a successful write: a stale member is harmless (pruned later,
        # and the index expires), so a failure here must not turn success into an error.
        try:
            with self._guard:
                await self.redis.srem(self._index_key(subject), session_id)
        except ToolkitError as exc:
            log.debug("could not prune session index of %r: %s", subject, exc)

    # -- helpers --------------------------------------------------------------

    def _subject_of(self, data: Mapping[str, Any]) -> str:
        key = self.subject_key
        if key is None:
            return ""
        value = data.get(key)
        return "" if value is None else str(value)

    def _subject_change(
        self, values: Mapping[str, Any], removed: Sequence[str], *, replace: bool
    ) -> str | None:
        """The subject the write sets ('' clears it), or None when it keeps it."""
        key = self.subject_key
        if key is None:
            return None
        if key in values:
            return self._subject_of(values)
        if replace or key in removed:
            return ""
        return None

    def _encode_items(self, values: Mapping[str, Any]) -> builtins.list[tuple[str, bytes]]:
        encode = self.codec.encode
        out = []
        for name, value in values.items():
            if not isinstance(name, str) or not name:
                raise ToolkitError(f"session data keys must be non-empty strings, got {name!r}")
            out.append((name, encode(value)))
        return out

    def _parse(self, session_id: str, items: Iterable[tuple[Any, Any]]) -> SessionRecord:
        meta: dict[str, str] = {}
        data: dict[str, Any] = {}
        decode = self.codec.decode
        for raw_name, value in items:
            name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
            kind = name[:2]
            if kind == "d:":
                data[name[2:]] = decode(value)
            elif kind != "m:" and kind != "w:":  # per-key versions, write nonces
                meta[name] = value.decode() if isinstance(value, bytes) else value
        get = meta.get
        return SessionRecord.model_construct(
            id=session_id,
            unique_key=get("unique_key", ""),
            client_ip=get("client_ip") or None,
            locked=get("locked") == "1",
            created_at=_time(get("created_at", 0)),
            modified_at=_time(get("modified_at", 0)),
            expires_at=_time(get("expires_at", 0)),
            version=int(get("version", 0)),
            subject=get("subject") or None,
            data=data,
        )

    def _id_of_key(self, key: bytes | str) -> str | None:
        text = _text(key)
        rest = text[len(self._root) :]
        if not rest.startswith("{"):
            return None
        family, _, token = rest[1:].partition("}:")
        session_id = f"{family}.{token}"
        return session_id if is_session_id(session_id) else None

    async def _get_many(self, ids: Sequence[str]) -> builtins.list[SessionRecord | None]:
        found: dict[str, SessionRecord] = {}
        valid = [(i, p) for i in ids if (p := self._parts(i)) is not None]
        for start in range(0, len(valid), _BATCH):
            chunk = valid[start : start + _BATCH]
            with self._guard:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for _, parts in chunk:
                        pipe.hgetall(self._record_key(*parts))
                    replies = await pipe.execute()
            for (session_id, _), fields in zip(chunk, replies, strict=True):
                if fields:
                    found[session_id] = self._parse(session_id, fields.items())
        return [found.get(i) for i in ids]

    async def list(self) -> AsyncIterator[SessionRecord]:
        """Every live session (SCAN over every primary, then HGETALL in batches of 100).

        Not a snapshot: sessions created or deleted during the walk may or may
        not appear, and one may appear twice (SCAN's guarantee). Reads only.
        """
        batch: builtins.list[str] = []
        keys = scan_keys(self.redis, self._records.pattern("*"))
        while True:
            with self._guard:
                try:
                    key = await anext(keys)
                except StopAsyncIteration:
                    break
            session_id = self._id_of_key(key)
            if session_id is None:
                continue
            batch.append(session_id)
            if len(batch) >= _BATCH:
                for record in await self._get_many(batch):
                    if record is not None:
                        yield record
                batch = []
        if batch:
            for record in await self._get_many(batch):
                if record is not None:
                    yield record
