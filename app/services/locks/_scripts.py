"""The Lua scripts of the package (``lua/``), loaded once and run with EVALSHA."""

from __future__ import annotations

from app.core.scripts import Script

__all__ = [
    "FENCED_WRITE",
    "LOCK_ACQUIRE",
    "LOCK_ACQUIRE_FAST",
    "LOCK_EXTEND",
    "LOCK_RELEASE",
    "SEMAPHORE_ACQUIRE",
    "SEMAPHORE_COUNT",
    "SEMAPHORE_EXTEND",
    "SEMAPHORE_RELEASE",
]

_PACKAGE = "app.services.locks"

LOCK_ACQUIRE = Script.from_package(_PACKAGE, "lua/lock_acquire.lua")
LOCK_ACQUIRE_FAST = Script.from_package(_PACKAGE, "lua/lock_acquire_fast.lua")
LOCK_RELEASE = Script.from_package(_PACKAGE, "lua/lock_release.lua")
LOCK_EXTEND = Script.from_package(_PACKAGE, "lua/lock_extend.lua")
FENCED_WRITE = Script.from_package(_PACKAGE, "lua/lock_fenced_write.lua")
SEMAPHORE_ACQUIRE = Script.from_package(_PACKAGE, "lua/lock_semaphore_acquire.lua")
SEMAPHORE_RELEASE = Script.from_package(_PACKAGE, "lua/lock_semaphore_release.lua")
SEMAPHORE_EXTEND = Script.from_package(_PACKAGE, "lua/lock_semaphore_extend.lua")
SEMAPHORE_COUNT = Script.from_package(_PACKAGE, "lua/lock_semaphore_count.lua")
