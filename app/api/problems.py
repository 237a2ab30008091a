"""The problem answers' public door for apps: ``install_problem_handlers(app)``.

The rendering lives in ``app.http.problems``, below both the routes and the pure
ASGI middleware that send the same answers; this module keeps the import path
apps and ``app.main`` use, re-exporting exactly that module's ``__all__``.
"""

from __future__ import annotations

from app.http.problems import *  # noqa: F403  (one list of public names, kept in app.http.problems)
from app.http.problems import __all__ as __all__
