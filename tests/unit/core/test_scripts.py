"""Script loading: includes expand to their fragments, the SHA is the expanded text's."""

from __future__ import annotations

import hashlib
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from itertools import takewhile
from pathlib import Path
from typing import Any

import pytest

import app
from app.core.errors import ConfigurationError
from app.core.scripts import Script

APP = Path(app.__file__).parent
FRAGMENTS = APP / "core" / "lua"
SCRIPTS = sorted(p for p in APP.rglob("lua/*.lua") if p.parent != FRAGMENTS)
INCLUDE = re.compile(r"^\s*-- @include (\w+)\s*$", re.MULTILINE)

Load = Callable[[str], Script]


@pytest.fixture
def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Load]:
    """Loads a script text as ``lua/probe.lua`` of a throwaway package."""
    package = f"scripts_probe_{uuid.uuid4().hex}"
    (tmp_path / package / "lua").mkdir(parents=True)
    (tmp_path / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    def _load(text: str) -> Script:
        (tmp_path / package / "lua" / "probe.lua").write_text(text, encoding="utf-8")
        return Script.from_package(package, "lua/probe.lua")

    yield _load
    sys.modules.pop(package, None)


def _fragment(name: str) -> str:
    return (FRAGMENTS / f"{name}.lua").read_text(encoding="utf-8")


async def test_an_include_is_replaced_by_its_fragment(load: Load, fake_redis: Any) -> None:
    head = "-- returns the server time, ms\n"
    script = load(head + "-- @include now_ms\nreturn now\n")

    assert script.source == head + _fragment("now_ms") + "return now\n"
    seconds, micros = await fake_redis.time()
    assert abs(await script(fake_redis) - (seconds * 1000 + micros // 1000)) < 60_000


async def test_the_sha_is_that_of_the_expanded_text(load: Load, fake_redis: Any) -> None:
    text = "-- returns 1\n-- @include now_us\nreturn 1\n"
    script = load(text)

    assert script.sha == hashlib.sha1(script.source.encode(), usedforsecurity=False).hexdigest()
    assert script.sha != hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
    loaded = await fake_redis.script_load(script.source)
    assert (loaded.decode() if isinstance(loaded, bytes) else loaded) == script.sha
    assert await fake_redis.evalsha(script.sha, 0) == 1  # the server knows it by that SHA


def test_an_unknown_include_fails_naming_the_script_and_the_fragment(load: Load) -> None:
    with pytest.raises(ConfigurationError, match=r"probe\.lua.*'no_such_fragment'"):
        load("-- returns 1\n-- @include no_such_fragment\nreturn 1\n")


@pytest.mark.parametrize("line", ["-- @include", "-- @include now-ms", "-- @include ../now_ms"])
def test_a_malformed_include_fails(load: Load, line: str) -> None:
    with pytest.raises(ConfigurationError, match=r"probe\.lua: malformed include"):
        load(f"-- returns 1\n{line}\nreturn 1\n")


def test_a_script_opens_with_its_contract_not_an_include(load: Load) -> None:
    with pytest.raises(ConfigurationError, match="KEYS/ARGV/returns contract"):
        load("-- @include now_ms\nreturn now\n")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_shipped_script_loads_with_its_includes_expanded(path: Path) -> None:
    package = ".".join(path.parent.parent.relative_to(APP.parent).parts)
    script = Script.from_package(package, f"lua/{path.name}")

    assert "@include" not in script.source
    for name in INCLUDE.findall(path.read_text(encoding="utf-8")):
        assert _fragment(name) in script.source


@pytest.mark.parametrize("fragment", sorted(FRAGMENTS.glob("*.lua")), ids=lambda p: p.stem)
def test_every_fragment_states_its_contract_and_is_used(fragment: Path) -> None:
    lines = fragment.read_text(encoding="utf-8").splitlines()
    head = list(takewhile(lambda line: line.startswith("--"), lines))
    assert head[0].startswith(f"-- Fragment {fragment.stem}: ")
    assert any(line.startswith("-- expects: ") for line in head)
    assert any(line.startswith("-- defines: ") for line in head)
    users = [p.name for p in SCRIPTS if fragment.stem in INCLUDE.findall(p.read_text())]
    assert users, f"{fragment.name} is included by no script: use it or delete it"
