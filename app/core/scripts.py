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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from app.core.errors import ConfigurationError

__all__ = ["Script", "ScriptArg"]

ScriptArg = str | bytes | int | float


class Script:
    """One Lua script; safe to share between clients, tasks and event loops."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, source: str, *, name: str = "script") -> None:
        self.source = source
        self.name = name
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()

    @classmethod
    def from_package(cls, package: str, filename: str) -> Script:
        """Load ``filename`` shipped inside *package* (e.g. ``"app.services", "lua/x.lua"``)."""
        text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
        if not text.lstrip().startswith("--"):
            raise ConfigurationError(
                f"{filename}: a script must open with its KEYS/ARGV/returns contract"
            )
        return cls(text, name=filename.rsplit("/", 1)[-1].removesuffix(".lua"))

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
