"""HTTP-level pieces shared by middleware and routes: who is calling, client addresses."""

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
