"""The operator console: see and act on streams, locks, limits, caches and sessions.

Mount it into your own FastAPI app::

    from app.console import create_console
    app.mount("/console", create_console())          # CONSOLE_TOKEN from settings
    app.mount("/ops", create_console(auth=require_admin))  # or your own auth dependency

Off unless configured (404 without a token or an auth dependency). Pages are
server-rendered (Jinja2) with their own static assets
(no CDN); every listing is bounded; every action (POST) needs a CSRF token,
is refused in read-only mode and is written to the audit stream
``<prefix>:console:audit``.
"""

from app.console._access import Audit, AuditEntry, Operator
from app.console._app import ConsoleLimiter
from app.console._create import create_console

__all__ = ["Audit", "AuditEntry", "ConsoleLimiter", "Operator", "create_console"]
