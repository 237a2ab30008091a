"""The write path: one Lua call checks per-key versions and writes (see the package docstring).

The script answers with a code; besides success (1) it may ask for one more
try (-3: index the new id under the record's subject first; -4: the new id
is taken) or refuse the write (0: conflict; -2: deleted; -5: regenerated;
anything else: gone). A refused write takes back the index entry made for it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from app.core.errors import SessionConflict, SessionNotFound, ToolkitError
from app.core.guard import Guard, as_text
from app.core.redis import AnyRedis
from app.core.scripts import Script, ScriptArg
from app.services.sessions._fields import RecordFields
from app.services.sessions._ids import new_session_id, split_id
from app.services.sessions._index import SubjectIndex
from app.services.sessions._keys import SessionKeys
from app.services.sessions._record import SessionRecord, WriteResult, hash_of, time_of

__all__ = ["SessionWriter"]

_WRITE = Script.from_package("app.services.sessions", "lua/session_write.lua")


@dataclass(slots=True)
class _Attempt:
    """One write: its keys and arguments, adjusted between tries when the script asks."""

    session_id: str
    family: str
    new_id: str
    subject_arg: str | None
    regenerate: bool
    want_record: bool
    indexed: str
    pre_indexed: bool
    keys: list[str]
    args: list[ScriptArg]


class SessionWriter:
    """Runs ``merge``/``update``/``regenerate`` writes for a ``SessionStore``."""

    __slots__ = ("_fields", "_grace_ms", "_guard", "_index", "_keys", "redis")

    def __init__(
        self,
        redis: AnyRedis,
        *,
        keys: SessionKeys,
        guard: Guard,
        index: SubjectIndex,
        fields: RecordFields,
        grace_ms: int,
    ) -> None:
        self.redis = redis
        self._keys = keys
        self._guard = guard
        self._index = index
        self._fields = fields
        self._grace_ms = grace_ms

    async def write(
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
        parts = split_id(session_id)
        if parts is None:
            raise SessionNotFound(f"session {session_id[:12]!r}... does not exist")
        family, token = parts
        values = dict(changes or {})
        removed = [name for name in deleted if name not in values]
        subject_arg = self._fields.subject_change(values, removed, replace=mode == "replace")
        new_id = new_session_id(family) if regenerate else session_id
        new_token = new_id.split(".")[1]
        record_key = self._keys.record(family, token)
        target_key = self._keys.record(family, new_token) if regenerate else record_key
        indexed = subject_arg if subject_arg is not None else (known_subject or "")
        pre_indexed = bool(indexed) and (regenerate or subject_arg is not None)
        if pre_indexed:
            await self._index.add(indexed, new_id)
        args: list[ScriptArg] = [
            mode,
            base_version,
            "" if locked is None else ("1" if locked else "0"),
            "" if subject_arg is None else "s",
            subject_arg or "",
            indexed,
            self._grace_ms,
            secrets.token_urlsafe(16) if regenerate else "",
            new_token,
            "1" if want_record else "0",
            len(values),
            secrets.token_urlsafe(12),  # the nonce a retried call recognises itself by
        ]
        for name, value in self._fields.encode_items(values):
            args += (name, value)
        args += removed
        keys = [
            record_key,
            target_key,
            self._keys.moved(family, token),
            self._keys.gone(family, token),
        ]
        attempt = _Attempt(
            session_id=session_id,
            family=family,
            new_id=new_id,
            subject_arg=subject_arg,
            regenerate=regenerate,
            want_record=want_record,
            indexed=indexed,
            pre_indexed=pre_indexed,
            keys=keys,
            args=args,
        )
        reply = await self._run(attempt)
        code = int(reply[0])
        if code == 1:
            return await self._written(attempt, reply)
        if attempt.pre_indexed:  # nothing was written: take back the index entry made for it
            await self._index.drop(attempt.indexed, attempt.new_id)
        raise _refusal(code, reply, family, token)

    async def _run(self, attempt: _Attempt) -> Any:
        """The script's reply, after at most three tries (it may ask for another)."""
        for _ in range(3):
            with self._guard:
                reply = await _WRITE(self.redis, keys=attempt.keys, args=attempt.args)
            code = int(reply[0])
            if code == -3:  # the record names a subject the new id is not indexed under yet
                attempt.indexed = as_text(reply[1])
                attempt.pre_indexed = True
                await self._index.add(attempt.indexed, attempt.new_id)
                attempt.args[5] = attempt.indexed
                continue
            if code == -4:  # new id taken (never in practice: 128 random bits)
                attempt.new_id = new_session_id(attempt.family)
                new_token = attempt.new_id.split(".")[1]
                attempt.keys[1] = self._keys.record(attempt.family, new_token)
                attempt.args[8] = new_token
                if attempt.indexed:
                    await self._index.add(attempt.indexed, attempt.new_id)
                continue
            break
        return reply

    async def _written(self, attempt: _Attempt, reply: Any) -> WriteResult | SessionRecord:
        previous = as_text(reply[3])
        final_subject = previous if attempt.subject_arg is None else attempt.subject_arg
        if previous and (previous != final_subject or attempt.regenerate):
            await self._index.drop(previous, attempt.session_id)
        if attempt.want_record:
            return self._fields.parse(attempt.new_id, hash_of(reply[4]))
        return WriteResult(id=attempt.new_id, version=int(reply[1]), modified_at=time_of(reply[2]))


def _refusal(code: int, reply: Any, family: str, token: str) -> ToolkitError:
    """The error a refused write raises."""
    if code == 0:
        names = [as_text(n) for n in reply[2:]]
        return SessionConflict(
            "the session changed since it was read"
            + ("" if names == ["*"] else f" (keys: {', '.join(sorted(names))})")
            + "; reload it and retry the request"
        )
    if code == -2:
        return SessionNotFound(f"session {family}.{token[:4]}... was deleted")
    if code == -5:
        return SessionNotFound(
            f"session {family}.{token[:4]}... was regenerated: the old id no longer works"
        )
    if code in (-3, -4):
        return SessionConflict(
            "the session's subject kept changing while it was regenerated; retry the request"
        )
    return SessionNotFound(f"session {family}.{token[:4]}... does not exist or has expired")
