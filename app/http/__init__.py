"""HTTP-level pieces shared by middleware and routes.

Who is calling and the client address (re-exported here), plus the modules
``app.http.problems`` (RFC 9457 answers, ``send_problem``), ``app.http.asgi``
(sending through a raw ASGI ``send``, the request target) and
``app.http.headers`` (structured field values).
"""

from app.http.caller import (
    Caller,
    CallerResolver,
    caller_resolver,
    forget_caller,
    resolve_caller,
    set_principal,
)
from app.http.client_ip import ClientIP

__all__ = [
    "Caller",
    "CallerResolver",
    "ClientIP",
    "caller_resolver",
    "forget_caller",
    "resolve_caller",
    "set_principal",
]
