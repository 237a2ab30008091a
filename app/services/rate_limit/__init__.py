"""Rate limiting: one atomic Lua round trip per check, any number of policies.

``RateLimiter`` checks one identifier against one or more policies (a ``Policy``,
built in code or parsed from text as shown below) with one algorithm::

    limiter = RateLimiter(redis, max_requests=3, window_seconds=1)
    await limiter.is_allowed("user-1")              # -> bool; refusals are not counted

    limiter = RateLimiter(redis, policies="burst=10/second;daily=1000/day")
    decision = await limiter.hit("user-1", cost=2)  # one EVALSHA for both policies
    decision.allowed, [(r.name, r.remaining, r.reset_after) for r in decision.results]

Algorithms (each one Lua script, clocked by Redis ``TIME`` or key expiry,
never by the client):

* ``gcra`` (default): one integer per key (the theoretical arrival time);
  smooth, sub-second windows, ``burst`` above the limit, exact to the microsecond.
* ``sliding_counter``: two counts per key (current and previous window),
  weighted; an approximation of a sliding window with constant memory.
* ``sliding_log``: one sorted-set entry per admitted unit: exact, but memory
  and CPU are O(limit) per key, so keep it for small limits.
* ``fixed_window``: one counter per key; the window opens at the first hit.

``ConcurrencyLimiter`` caps requests *in flight*: each admitted request holds
a lease until ``release`` (or until ``lease_seconds`` pass, so a crashed
worker cannot hold slots forever).

Guarantees: a check is one ``EVALSHA`` whatever the number of policies, and
all-or-nothing: a request refused by one policy consumes nothing from the
others. Every key carries a TTL, and the keys of one check share a Cluster
hash tag (the escaped identifier). ``NOSCRIPT`` after a restart or
``SCRIPT FLUSH`` is recovered inside the same call.

**Policies.** A ``Policy`` is a quota (``limit``) over a ``window`` in seconds, with a name
that HTTP headers and ``violated-policies`` report. Policies come from code
(``Policy(100, 60, name="burst")``) or from text::

    "10/second"            10 requests per second        name "10-per-second"
    "100/minute"           100 per minute                name "100-per-minute"
    "5 per 10 seconds"     5 per 10 s                    name "5-per-10s"
    "20/500ms"             20 per half second            name "20-per-500ms"
    "burst=10/second"      a named policy                name "burst"
    "10/second;1000/day"   two policies, checked together (all-or-nothing)
    "4 concurrent"         at most 4 requests in flight  name "4-concurrent"

Units: ``ms``/``millisecond``, ``s``/``sec``/``second``, ``m``/``min``/``minute``,
``h``/``hr``/``hour``, ``d``/``day``, ``week`` (plural ``s`` accepted).
Separators between policies: ``;`` or ``,``.

A policy's storage key is derived from its name, limit, window and burst, so
changing any of them starts a fresh count instead of misreading old state.

Redis down: with ``failure_mode="open"`` (the default, from
``RATE_LIMIT_FAILURE_MODE``) checks allow the request and mark the decision
``degraded``; the circuit breaker makes them answer at once while Redis is
known to be down. With ``"closed"`` they raise ``RedisUnavailable`` (503). A
command Redis refuses (a failing script, a key of the wrong type) counts as
Redis being down. Either way the failure is logged once per change of the
situation (``app.core.guard.FailOpen``), never once per request. Invalid
policies, algorithms, costs and leases raise ``ConfigurationError`` (a
``ValueError``).
"""

from app.services.rate_limit._algorithms import (
    ALGORITHMS,
    Algorithm,
    AlgorithmSpec,
    validate_policies,
)
from app.services.rate_limit._concurrency import ConcurrencyLimiter
from app.services.rate_limit._decision import RateLimitDecision, RateLimitResult
from app.services.rate_limit._policy import (
    Policy,
    PolicyLike,
    QuotaUnit,
    as_policies,
    parse_policies,
)
from app.services.rate_limit._rate import RateLimiter

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "AlgorithmSpec",
    "ConcurrencyLimiter",
    "Policy",
    "PolicyLike",
    "QuotaUnit",
    "RateLimitDecision",
    "RateLimitResult",
    "RateLimiter",
    "as_policies",
    "parse_policies",
    "validate_policies",
]
