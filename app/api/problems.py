"""The problem answers' public door for apps: ``install_problem_handlers(app)``.

The rendering lives in ``app.http.problems``, below both the routes and the pure
ASGI middleware that send the same answers; this module keeps the import path
apps and ``app.main`` use.
"""

from __future__ import annotations

from app.http.problems import (
    PROBLEM_CONTENT_TYPE,
    PROBLEM_TYPE_BASE,
    install_problem_handlers,
    problem_body,
    problem_response,
    problem_type_uri,
    send_problem,
)

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_BASE",
    "install_problem_handlers",
    "problem_body",
    "problem_response",
    "problem_type_uri",
    "send_problem",
]
