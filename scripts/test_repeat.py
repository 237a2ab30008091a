"""Run the test suite (or a part of it) several times and keep every failure.

``python scripts/test_repeat.py --times 10 [--contend] -- tests/integration/faults -x``

Each run writes its own JUnit report under ``--reports``; every failure of every run,
with its test id and traceback, is appended to ``failures.txt`` there, and a table of
runs (passed, failed, wall time) is printed at the end. ``--contend`` starts a busy
process pinned to one core beside the suite for the whole time, to flush out tests
that assume how the scheduler shares the CPU. ``--leak-check`` collects garbage after
each integration test (the plugin's ``collect_garbage_after_each_test``), so a leaked
connection fails the test that leaked it instead of a random later one. Exit status: 0
when every run passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_failures import format_failures, read_failures

_SPIN = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"


def _counts(report: Path) -> tuple[int, int]:
    if not report.exists():
        return 0, 0
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return total - bad - skipped, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=5)
    parser.add_argument("--reports", type=Path, default=Path("reports/repeat"))
    parser.add_argument("--contend", action="store_true", help="a busy process pinned to core 0")
    parser.add_argument(
        "--leak-check", action="store_true", help="collect garbage after each integration test"
    )
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()

    args.reports.mkdir(parents=True, exist_ok=True)
    failures_file = args.reports / "failures.txt"
    failures_file.write_text("")
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN]) if args.contend else None
    rows = []
    try:
        for run in range(1, args.times + 1):
            report = args.reports / f"junit-{run}.xml"
            report.unlink(missing_ok=True)
            started = time.monotonic()
            status = subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    f"--junitxml={report}",
                    *(["-o", "collect_garbage_after_each_test=true"] if args.leak_check else []),
                    *args.pytest_args,
                ],
                env={**os.environ, "PYTHONNODEBUGRANGES": "1"},
            )
            wall = time.monotonic() - started
            passed, failed = _counts(report)
            found = read_failures(report)
            if found:
                with failures_file.open("a") as out:
                    out.write(f"##### run {run}\n{format_failures(found)}\n")
            rows.append((run, status, passed, failed, wall, [f.test_id for f in found]))
            print(
                f"run {run}/{args.times}: exit {status}, {passed} passed, {failed} failed, {wall:.0f} s",
                flush=True,
            )
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()

    print(
        f"\n{'run':>4} {'exit':>5} {'passed':>7} {'failed':>7} {'wall s':>7}"
        + ("  (contended)" if args.contend else "")
    )
    for run, status, passed, failed, wall, ids in rows:
        print(f"{run:>4} {status:>5} {passed:>7} {failed:>7} {wall:>7.0f}")
        for test_id in ids:
            print(f"       {test_id}")
    green = sum(1 for row in rows if row[1] == 0)
    print(f"\n{green} of {len(rows)} runs green; failures with tracebacks in {failures_file}")
    return 0 if green == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
