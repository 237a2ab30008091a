"""Every Python example in README.md and docs/ runs, against fakeredis.

A page's ```python blocks run in order in one namespace (so a later block uses
the imports and names of an earlier one, as a reader does), with top-level
``await`` allowed. The namespace starts with ``redis``: the test's fakeredis
client, which is also the global client (``get_redis()``), so FastAPI apps in the
examples use it too. After each block, the ``test_*`` functions it defined are
called with the plugin's fixtures they name, as pytest would. The page's namespace is
also importable as the module ``main`` while it runs, so a test block can say
``from main import app`` as a reader's ``test_main.py`` would.

A block that cannot run here (it needs your own database, a second process, a
cluster) says so on the line before its fence::

    <!-- example: not run (needs a Redis Cluster) -->

Such blocks are counted against MAX_NOT_RUN (none today).
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.core import redis as core_redis
from app.testing.plugin import AppClientFactory

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"<!-- example: not run \((?P<reason>[^)]+)\) -->")
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```$", re.M | re.S)
MAX_NOT_RUN = 0  # raise it only with a reason on each marked block


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    code: str
    not_run: str | None  # the reason, for a block marked "not run"

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples(page: Path) -> list[Example]:
    """The ```python blocks of *page*, in order, with their "not run" marks."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match["info"].split()[:1] != ["python"]:
            continue
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        mark = NOT_RUN.fullmatch(before.strip())
        line = text.count("\n", 0, match.start()) + 1
        found.append(Example(page, line, match["code"], mark["reason"] if mark else None))
    return found


ALL = {page: examples(page) for page in PAGES}
RUNNABLE = [page for page, found in ALL.items() if any(e.not_run is None for e in found)]


async def _run(example: Example, namespace: dict[str, Any], fixtures: dict[str, Any]) -> None:
    before = set(namespace)
    code = compile(
        example.code, example.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    result = eval(code, namespace)  # a coroutine when the block awaits at top level
    if inspect.iscoroutine(result):
        await result
    for name in sorted(set(namespace) - before):
        test = namespace[name]
        if name.startswith("test_") and inspect.iscoroutinefunction(test):
            await test(**{p: fixtures[p] for p in inspect.signature(test).parameters})


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
async def test_the_examples_of_a_page_run(
    page: Path,
    fake_redis: Any,
    make_app_client: AppClientFactory,
    settings_override: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core_redis.redis_client = fake_redis
    main = types.ModuleType("main")
    monkeypatch.setitem(sys.modules, "main", main)
    namespace: dict[str, Any] = main.__dict__
    namespace["redis"] = fake_redis
    fixtures = {
        "fake_redis": fake_redis,
        "make_app_client": make_app_client,
        "settings_override": settings_override,
    }
    for example in ALL[page]:
        if example.not_run is None:
            try:
                await _run(example, namespace, fixtures)
            except Exception as exc:
                raise AssertionError(f"the example at {example.where} failed: {exc!r}") from exc


def test_few_examples_are_left_unrun() -> None:
    not_run = [e.where for found in ALL.values() for e in found if e.not_run]
    assert len(not_run) <= MAX_NOT_RUN, not_run


def test_python_blocks_say_they_are_python() -> None:
    """An unlabelled fence holding Python would escape this test: label it ``python``."""
    unlabelled = []
    for page in PAGES:
        for match in FENCE.finditer(page.read_text()):
            if not match["info"].strip() and re.search(
                r"^(from|import|async def|await) ", match["code"], re.M
            ):
                unlabelled.append(f"{page.relative_to(ROOT)}:{match['code'][:40]!r}")
    assert unlabelled == []


# HTTP URLs only: WebSocket routes (ws://) are not in the OpenAPI schema checked below
DEMO_URL = re.compile(r"""(?<!ws://)localhost:8000(?P<path>/[^\s'"?&;]*)""")


def _demo_paths() -> list[tuple[str, str]]:
    """(where, path) of every demo URL in the shell blocks of docs/ (the demo listens on :8000).

    The getting-started page's commands call the reader's own first app, not the demo.
    """
    found = []
    for page in PAGES[1:]:
        if page.name == "getting-started.md":
            continue
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match["info"].split()[:1] in (["bash"], ["sh"]):
                for url in DEMO_URL.finditer(match["code"]):
                    found.append((str(page.relative_to(ROOT)), url["path"]))
    return found


def _template(path: str) -> re.Pattern[str]:
    """An OpenAPI path template as a regex: ``{name}`` one segment, ``{name:path}`` the rest."""
    pattern = re.sub(r"\\\{[^}:]+:path\\\}", ".+", re.escape(path))
    return re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", pattern) + "/?")


def test_the_shell_examples_name_routes_the_demo_serves() -> None:
    """Every demo URL a page tells readers to curl is one the demo app serves."""
    from starlette.routing import Mount

    from app.main import create_app

    app = create_app()
    served = [_template(path) for path in app.openapi()["paths"]]
    mounts = [r.path for r in app.router.routes if isinstance(r, Mount)]
    paths = _demo_paths()
    unknown = [
        f"{where}: {path}"
        for where, path in paths
        if not any(p.fullmatch(path) for p in served)
        and not any(path.startswith(m) for m in mounts)
    ]
    assert len(paths) > 30
    assert unknown == []
