"""Idempotency keys in Redis: remember that a request was seen, and what it returned.

Two layers over one record per key (a Redis hash that expires):

* The DESIGN.md contract for plain code: ``is_duplicate(key)`` (atomically marks
  the key as seen and says whether it already was), ``store_request(key, result)``
  and ``get_result(key)``.
* The primitives the HTTP middleware is built on: ``claim`` answers *new*,
  *in flight*, *completed* (with the stored result) or *mismatch* (the key was
  used with another fingerprint) in one Lua round trip, and hands the caller
  of a new claim an owner token. ``complete`` and ``release`` succeed only with
  that token, so a slow worker whose claim expired cannot overwrite or delete a
  newer claim. While the work runs, a ``heartbeat`` renews a short in-flight
  lease; a crashed worker's key becomes claimable once the lease runs out,
  not after the 24 h result TTL.

Record lifecycle::

    (absent) --claim--> in flight (lease, renewed by the heartbeat)
        in flight --complete(token)--> completed (kept for ttl)
        in flight --release(token) / lease expiry--> (absent)

Waiters (``claim(..., wait=5)``) park on a per-key list with ``BLPOP``; the
owner's ``complete`` or ``release`` pushes one element per waiter, so they
wake at once instead of polling. Every key of one record shares a hash tag
(Redis Cluster). Redis down: every method raises ``RedisUnavailable`` (the
service fails closed; the middleware turns that into 503).
"""

from app.services.idempotency._claim import Claim, ClaimStatus
from app.services.idempotency._heartbeat import Heartbeat
from app.services.idempotency._service import IdempotencyService

__all__ = ["Claim", "ClaimStatus", "Heartbeat", "IdempotencyService"]
