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

**Expiry.** Redis enforces both bounds: after every create, write, touch and
restarting load the record's TTL is ``min(idle_ttl, expires_at - now)`` computed
in Lua from the server's ``TIME``, so a session dies after ``idle_ttl`` without
activity and at ``absolute_ttl`` after creation whatever happens. A load within
``touch_after`` of this process's last restart of that session only reads (a
plain ``HGETALL``: no key outlives its deadline), so the idle timeout may end
up to ``touch_after`` early, never late.

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

from app.services.sessions._ids import is_session_id, new_session_id
from app.services.sessions._record import SessionRecord, WriteResult
from app.services.sessions._store import (
    DEFAULT_ABSOLUTE_TTL,
    DEFAULT_IDLE_TTL,
    SessionStore,
    touch_after_seconds,
)

__all__ = [
    "DEFAULT_ABSOLUTE_TTL",
    "DEFAULT_IDLE_TTL",
    "SessionRecord",
    "SessionStore",
    "WriteResult",
    "is_session_id",
    "new_session_id",
    "touch_after_seconds",
]
