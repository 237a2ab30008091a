"""Lua scripts: loaded once, called with EVALSHA, reloaded on NOSCRIPT.

A ``Script`` knows its source and SHA1 (computed locally, so the first call
needs no round trip). ``await script(client, keys, args)`` sends ``EVALSHA``;
when the server answers ``NOSCRIPT`` (after a restart, a failover or
``SCRIPT FLUSH``) it sends ``EVAL`` with the source, which also caches the
script again, and later calls go back to ``EVALSHA``. On Redis Cluster the
call is routed by its first key, and every node loads the script on demand the
same way, so a script works on any topology as long as its keys share a hash
tag (which ``KeySpace.tagged`` provides).

Scripts must not read the client clock: they take ``redis.call('TIME')``.
Every script file starts with its contract::

    -- KEYS[1] lock key
    -- ARGV[1] owner token
    -- returns 1 if released, else 0

Includes: a line that reads exactly ``-- @include <name>`` (leading blanks
allowed) is replaced, when ``Script.from_package`` loads the file, by the
text of the fragment ``app/core/lua/<name>.lua``. Fragments are Lua that
several scripts share (the server clock, waking waiters, ...); each opens
with a comment that states what it expects and what it defines (which
locals or local functions), and a script includes one before its first use
of those names. A fragment includes nothing. An include naming no fragment
raises ``ConfigurationError`` at import, naming the script and the fragment.
``Script.source`` and ``Script.sha`` are those of the expanded text, which is
what the server runs (so line numbers in a server error count in it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from app.core.errors import ConfigurationError

__all__ = ["Script", "ScriptArg"]

ScriptArg = str | bytes | int | float

_INCLUDE = re.compile(r"^[ \t]*--[ \t]*@include\b(?P<rest>.*)$", re.MULTILINE)
_NAME = re.compile(r"[a-z0-9_]+")


def _fragment(name: str, script: str) -> str:
    """The text of fragment *name* (without its final newline) for *script*'s include."""
    if not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"{script}: malformed include '-- @include {name}'; write '-- @include <name>' "
            "with a fragment name of lowercase letters, digits and '_'"
        )
    path = resources.files("app.core").joinpath("lua", f"{name}.lua")
    if not path.is_file():
        raise ConfigurationError(
            f"{script}: includes fragment {name!r}, but app/core/lua/{name}.lua does not exist"
        )
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("--") or _INCLUDE.search(text):
        raise ConfigurationError(
            f"app/core/lua/{name}.lua (included by {script}): a fragment opens with its "
            "expects/defines contract and includes nothing"
        )
    return text.rstrip("\n")


def _expand(text: str, script: str) -> str:
    """*text* with each ``-- @include <name>`` line replaced by its fragment."""
    return _INCLUDE.sub(lambda found: _fragment(found["rest"].strip(), script), text)


class Script:
    """One Lua script; safe to share between clients, tasks and event loops."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, source: str, *, name: str = "script") -> None:
        self.source = source
        self.name = name
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()

    @classmethod
    def from_package(cls, package: str, filename: str) -> Script:
        """Load ``filename`` shipped inside *package* (e.g. ``"app.services", "lua/x.lua"``).

        Its ``-- @include`` lines are expanded (see the module docstring).
        """
        text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
        first = text.lstrip()
        if not first.startswith("--") or _INCLUDE.match(first):
            raise ConfigurationError(
                f"{filename}: a script must open with its KEYS/ARGV/returns contract"
            )
        return cls(_expand(text, filename), name=filename.rsplit("/", 1)[-1].removesuffix(".lua"))

    async def __call__(
        self, client: Any, keys: Sequence[ScriptArg] = (), args: Sequence[ScriptArg] = ()
    ) -> Any:
        """Run the script on *client* (one round trip unless the server lost it)."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)

    async def load(self, client: Any) -> None:
        """Preload the script (optional: the first call loads it anyway)."""
        await client.script_load(self.source)

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:12]})"
