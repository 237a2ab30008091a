"""Markdown tables on stdout (the JSON in ``bench/results/latest.json`` has every sample)."""

from __future__ import annotations

from collections.abc import Sequence

from bench.harness import CaseResult

__all__ = ["fmt_rate", "markdown_table", "print_table"]


def fmt_rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:,.0f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A markdown table; *align* has one character per column: ``l`` or ``r``.

    A ``|`` inside a cell (an error message, a command) is escaped so it stays in its cell.
    """
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(group: str, results: list[CaseResult]) -> None:
    """One row per case: both shapes side by side, ratios to the case's baseline.

    ``cmds/op`` is the Redis commands sent per operation, counted on the wire;
    ``a / b`` when the 50-task count differs from the sequential one (a library
    coalescing concurrent calls sends fewer).
    """
    print(f"\n### {group}\n")
    names: list[str] = []
    for r in results:
        if r.name not in names:
            names.append(r.name)
    rows: list[list[str]] = []
    for name in names:
        row = {r.shape: r for r in results if r.name == name}
        cells = [name]
        for shape in ("seq", "c50"):
            r = row.get(shape)
            if r is None or r.error:
                cells += ["-", "-", (r.error or "n/a")[:60] if r else "n/a"]
                continue
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            cells += [fmt_rate(r.median), f"{r.spread:.0%}", ratio]
        any_r = next(iter(row.values()))
        counts = [r.commands_per_op for r in row.values() if r.commands_per_op is not None]
        cmds = "-" if not counts else f"{counts[0]:g}"
        if len(counts) > 1 and abs(counts[1] - counts[0]) > 0.05:
            cmds += f" / {counts[1]:g}"
        cells += [cmds, any_r.baseline or "(itself)"]
        rows.append(cells)
    header = ["case", "seq ops/s", "seq spread", "seq ratio", "c50 ops/s", "c50 spread",
              "c50 ratio", "cmds/op", "baseline"]  # fmt: skip
    print(markdown_table(header, rows, "lrrrrrrrl"))
    notes = {r.name: r.note for r in results if r.note}
    if notes:
        print()
        for name, note in notes.items():
            print(f"- {name}: {note}")
