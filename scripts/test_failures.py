"""Print and keep the failing tests of a pytest run, read from its JUnit XML report.

``python scripts/test_failures.py reports/junit.xml reports/failures.txt`` prints one
line per failed or errored test id at the end of the output (where a CI log is read
first) and writes each with its message and traceback to the text file, so a failed
run tells the next reader what failed and why without rerunning it.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Failure:
    test_id: str
    kind: str  # "failure" or "error"
    message: str
    details: str


def _test_id(case: ET.Element) -> str:
    classname = case.get("classname", "")
    name = case.get("name", "")
    module, _, cls = classname.rpartition(".")
    # pytest writes "tests.unit.test_x.TestY" for a class and "tests.unit.test_x" for a module
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = Path(*parts[:cut]).with_suffix(".py")
        if path.exists():
            rest = parts[cut:]
            return "::".join([path.as_posix(), *rest, name])
    return f"{module}.{cls}::{name}" if module else f"{classname}::{name}"


def read_failures(report: Path) -> list[Failure]:
    """The failed and errored test cases of one JUnit XML report (empty if it is missing)."""
    if not report.exists():
        return []
    failures = []
    for case in ET.parse(report).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                failures.append(
                    Failure(_test_id(case), kind, node.get("message", ""), node.text or "")
                )
    return failures


def format_failures(failures: list[Failure]) -> str:
    blocks = []
    for failure in failures:
        blocks.append(
            f"=== {failure.kind.upper()}: {failure.test_id}\n{failure.message}\n\n{failure.details}\n"
        )
    return "\n".join(blocks)


def main(argv: list[str]) -> int:
    report = Path(argv[1]) if len(argv) > 1 else Path("reports/junit.xml")
    out = Path(argv[2]) if len(argv) > 2 else report.with_name("failures.txt")
    failures = read_failures(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_failures(failures))
    if not failures:
        print(f"no failed test in {report} (the run stopped before its report, see above)")
        return 0
    print(f"\n{len(failures)} failed test(s); tracebacks in {out}:")
    for failure in failures:
        first = failure.message.splitlines()[0] if failure.message else ""
        print(f"  {failure.kind.upper()} {failure.test_id}  {first[:160]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
