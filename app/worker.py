"""``python -m app.worker``: run stream consumers until SIGTERM or SIGINT, then stop gracefully.

Without options it runs the demo consumer (stream ``events``, group ``demo``, the handler of
``app.api.jobs``, which imports nothing of FastAPI). Point it at your own work with
``--handler package.module:func`` (an ``async def func(message)``), ``--stream`` and
``--group``::

    REDIS_URL=redis://localhost:6379/0 python -m app.worker --consumers 2 \\
        --handler myapp.jobs:send_email --stream emails --group mailers

The first SIGTERM/SIGINT stops reading and gives in-flight handlers ``--shutdown-timeout``
seconds to finish (finished ones are acked, the rest stay pending for other workers); a
second signal cancels them at once. Consumer names are stable (``<hostname>-<pid>``,
``-2``... or ``--name``) so a restarted worker finds its own pending entries.

``serve(consumers)`` is the same loop for programs that build their own consumers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from app.api.jobs import DEMO_GROUP, DEMO_STREAM, demo_handler
from app.core.config import get_settings
from app.core.errors import ConfigurationError
from app.core.redis import close_redis, init_redis
from app.services.streams import Handler, StreamConsumer

__all__ = ["load_handler", "main", "serve"]

log = logging.getLogger("app.worker")


async def serve(
    consumers: Sequence[StreamConsumer[Any]],
    *,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    shutdown_timeout: float | None = None,
) -> None:
    """Run *consumers* until one of *signals* arrives, then ``stop()`` them all.

    The first signal stops them gracefully (in-flight handlers get *shutdown_timeout*
    seconds, default each consumer's own); a second one cancels whatever still runs.
    Returns when every consumer has stopped. A consumer whose ``run()`` fails is logged
    and the others keep going.
    """
    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(c.run(), name=f"consumer:{c.name}") for c in consumers]
    stopping: asyncio.Future[Any] | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal stopping
        if stopping is None:
            log.info("%s: stopping %d consumers gracefully", sig.name, len(consumers))
            stopping = asyncio.ensure_future(
                asyncio.gather(*(c.stop(shutdown_timeout) for c in consumers))
            )
        else:
            log.warning("%s again: cancelling in-flight handlers", sig.name)
            for task in tasks:
                task.cancel()

    installed: list[signal.Signals] = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("a consumer stopped with an error", exc_info=result)
        if stopping is not None:
            await asyncio.gather(stopping, return_exceptions=True)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def load_handler(path: str) -> Handler[Any]:
    """Import ``package.module:function`` (an ``async def function(message)``)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--handler must look like package.module:function, not {path!r}")
    handler = getattr(importlib.import_module(module_name), attr, None)
    if handler is None or not callable(handler):
        raise ConfigurationError(f"{path!r} is not a callable handler")
    return handler  # type: ignore[no-any-return]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.worker", description=__doc__.split("\n")[0])
    p.add_argument("--stream", default=None, help="stream name (default: the demo's 'events')")
    p.add_argument("--group", default=None, help="consumer group (default: the demo's 'demo')")
    p.add_argument("--handler", default=None, help="package.module:function (default: demo)")
    p.add_argument("--name", default=None, help="consumer name (default: <hostname>-<pid>)")
    p.add_argument("--consumers", type=int, default=1, help="consumers in this process")
    p.add_argument("--concurrency", type=int, default=8, help="handlers at once per consumer")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--claim-idle", type=float, default=30.0, help="seconds before taking over")
    p.add_argument("--max-deliveries", type=int, default=5)
    p.add_argument("--retry-backoff", type=float, default=0.5)
    p.add_argument("--block", type=float, default=2.0, help="longest blocking read (seconds)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0)
    p.add_argument("--log-level", default="INFO")
    return p


def _build(args: argparse.Namespace, redis: Any) -> list[StreamConsumer[Any]]:
    handler = load_handler(args.handler) if args.handler else demo_handler
    stream = args.stream or DEMO_STREAM
    group = args.group or DEMO_GROUP
    options: dict[str, Any] = {
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "claim_idle": args.claim_idle,
        "max_deliveries": args.max_deliveries,
        "retry_backoff": args.retry_backoff,
        "block": args.block,
        "shutdown_timeout": args.shutdown_timeout,
    }
    consumers = []
    for i in range(max(1, args.consumers)):
        name = args.name if args.name and args.consumers == 1 else None
        if args.name and args.consumers > 1:
            name = f"{args.name}-{i + 1}"
        consumers.append(StreamConsumer(redis, stream, group, name, handler, **options))
    return consumers


async def _main(args: argparse.Namespace) -> int:
    if get_settings().uses_memory:
        log.warning(
            "REDIS_URL is not set (memory://): this worker only sees its own in-process store; "
            "point REDIS_URL at the Redis your app writes to"
        )
    redis = await init_redis()
    try:
        consumers = _build(args, redis)
        log.info(
            "consuming %r as group %r with %s",
            consumers[0].stream,
            consumers[0].group,
            ", ".join(c.name for c in consumers),
        )
        await serve(consumers)
    finally:
        await close_redis()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m app.worker``; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(_main(args))
    except ConfigurationError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
