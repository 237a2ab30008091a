"""The server's own limit: ``redis-benchmark`` on the same server, bounded in requests."""

from __future__ import annotations

import csv
import io
import shutil
import statistics
import subprocess
from typing import Any

TESTS = "get,set,incr"


def run(port: int, *, rounds: int, requests: int) -> list[dict[str, Any]]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return [{"error": "redis-benchmark not on PATH"}]
    rows: dict[tuple[str, int, int], list[float]] = {}
    for _ in range(rounds):
        for clients in (1, 50):
            for pipeline in (1, 16):
                out = subprocess.run(
                    [binary, "-h", "127.0.0.1", "-p", str(port), "-t", TESTS,
                     "-n", str(requests * pipeline), "-c", str(clients), "-P", str(pipeline),
                     "--csv", "-q"],
                    capture_output=True, text=True, timeout=120, check=True,
                ).stdout  # fmt: skip
                for row in csv.reader(io.StringIO(out)):
                    if len(row) < 2 or row[0] == "test":
                        continue
                    rows.setdefault((row[0], clients, pipeline), []).append(float(row[1]))
    return [
        {"test": t, "clients": c, "pipeline": p, "median_rps": round(statistics.median(v), 1),
         "spread": round((max(v) - min(v)) / statistics.median(v), 3)}
        for (t, c, p), v in sorted(rows.items())
    ]  # fmt: skip
