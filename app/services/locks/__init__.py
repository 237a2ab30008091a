"""Distributed locks on Redis: ``RedisLock`` with fencing tokens and a watchdog.

``Semaphore`` (at most ``limit`` holders) and ``Redlock`` (a quorum of independent
masters) build on the same machinery; every public name is imported from here::

    from app.services.locks import RedisLock, Semaphore, Redlock

    lock = RedisLock(redis, "resource:1", timeout=5)     # a 5 s lease, always
    if await lock.acquire():                             # non-blocking -> bool
        try:
            await write(resource, fence=lock.fence)      # check the fence at the resource
        finally:
            await lock.release()                         # compare-and-delete

    async with RedisLock(redis, "jobs:42", timeout=10, auto_renew=True):
        ...   # waits up to blocking_timeout (default: the lease), else LockNotAcquired;
              # renewed every timeout/3; if the lock is lost, or no renewal is
              # confirmed by lock.deadline, the block is cancelled and LockLost raised

What makes it correct by construction:

* **Ownership** is a random token per acquisition, held by the ``RedisLock``
  object (never thread-local or global). Release and extend are
  compare-and-act Lua scripts: nobody else's lock is ever deleted or extended.
  One object is one owner: tasks sharing an object queue for it locally, the
  way they would for an ``asyncio.Lock``, and a task holding it that acquires
  it again waits (it is not reentrant).
* **A lease is required.** Every key expires; blocking waits are finite by
  default (``blocking_timeout`` defaults to the lease).
* **Fencing tokens.** The acquire script increments ``{name}:fence`` in the
  same call that takes the lock (both keys share a hash tag), so every
  acquisition gets a strictly larger integer (``lock.fence``). Pass it to the
  protected resource, which refuses writes carrying a smaller token than the
  largest it has seen. The counter expires after ``fence_ttl`` idle time; it
  then restarts from the server clock in microseconds, which is above every
  token issued before unless the server clock went backwards.
* **A deadline kept locally.** With ``auto_renew`` the lease is tracked on the
  lock's ``clock`` (the event loop's, unless a test injects its own) from when
  the acquire/renewal was *sent*; ``deadline`` is that time + the lease -
  ``drift``. A timer on that clock (not the renewal call, which a
  stalled link may hold for socket_timeout x retries) ends the hold there unless
  a renewal was confirmed first: the block is cancelled and ``LockLost`` raised
  ``drift`` before another owner can acquire. Each renewal is bounded by the
  time left.
* **Cancellation safety.** A cancelled ``acquire`` runs a shielded
  compare-and-delete with its token, so a ``SET`` that reached the server
  before the cancellation leaves no key; a cancelled ``release`` still
  completes; cancelling the body of ``async with`` releases the lock.
* **A fast path when nobody waits.** A non-fair acquire is ``SET NX PX`` plus
  the fencing counter in one short script; a release is a compare-and-delete
  that touches the queue and the wake list only when a waiter left its mark
  (a failed non-fair attempt sets ``{name}:waiting`` for a few seconds; fair
  waiters are in ``{name}:queue``).
* **Waiting without polling storms.** A release that finds a waiter pushes a
  marker to a per-lock wake list (``LPUSH``, trimmed to one, short TTL). In each process
  one waiter per lock blocks on it with ``BLPOP`` (bounded below the client's
  ``socket_timeout``, and at most 16 such waits per client, since each holds a
  pooled connection); the others park in memory and are woken by releases in
  the same process, with jittered back-off polling as the fallback (and a
  wait no longer than the holder's remaining lease). ``fair=True`` queues
  waiters in FIFO order (a sorted set with per-waiter heartbeats, so a crashed
  waiter leaves the queue within seconds) and wakes the head directly.

Checking the fence at the resource (the pattern Kleppmann describes): the
resource keeps the largest token it has accepted and refuses smaller ones.
``fenced_write()`` does it for a Redis hash in one script::

    -- KEYS[1] resource hash; ARGV[1] fence; ARGV[2] value
    local last = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
    if tonumber(ARGV[1]) < last then return 0 end      -- a newer holder wrote already
    redis.call('HSET', KEYS[1], 'value', ARGV[2], 'fence', ARGV[1])
    return 1

and in SQL the same check is a conditional update (0 rows -> you are stale)::

    UPDATE jobs SET result = :result, fence = :fence
     WHERE id = :id AND fence <= :fence;

What Redis cannot guarantee (see docs/locks.md, "Guarantees and non-guarantees"): replication is
asynchronous, so a failover can lose a just-taken lock and grant it twice;
leases run on the server clock, so a clock jump shortens them; a holder
paused longer than its lease (GC, swap, a blocked event loop) keeps running
without the lock. The watchdog narrows these windows, fencing closes them
for resources that check the token.

When Redis is down every operation raises ``RedisUnavailable`` (locks never
fail open); the lease bounds how long a lock whose release could not be sent
stays held. A command Redis refuses (a key of the wrong type) raises
``LockError`` naming the lock; Redis's text stays in ``__cause__``. Every call
goes through one ``app.core.guard.Guard`` per lock object.
"""

# The parts, in private modules; each imports only modules listed below it, and code
# outside the package imports only this door:
#   _lock       RedisLock, fenced_write
#   _semaphore  Semaphore, Permit
#   _redlock    Redlock
#   _lease      a held lease: token, watchdog, loss, the async-with body
#   _waiting    the acquire loop: waiting for a release (wake lists, parking, polling)
#   _tasks      clean-ups that finish even when their caller is cancelled
#   _scripts    the Lua in lua/
#   _common     lease durations, tokens, the lock's Guard (app.core.guard)

from app.core.clock import LOOP_CLOCK, Clock  # re-exported: what clock= takes
from app.core.guard import as_seconds  # re-exported: the one duration validator
from app.services.locks._common import LostCallback, Seconds, lease_drift, wait_bound
from app.services.locks._lock import DEFAULT_FENCE_TTL, RedisLock, fenced_write
from app.services.locks._redlock import Redlock
from app.services.locks._semaphore import Permit, Semaphore

__all__ = [
    "DEFAULT_FENCE_TTL",
    "LOOP_CLOCK",
    "Clock",
    "LostCallback",
    "Permit",
    "RedisLock",
    "Redlock",
    "Seconds",
    "Semaphore",
    "as_seconds",
    "fenced_write",
    "lease_drift",
    "wait_bound",
]
