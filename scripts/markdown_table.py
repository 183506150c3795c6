"""Adding a result row to a table of BENCHMARKS.md (used by the benchmark scripts)."""

from __future__ import annotations

from pathlib import Path


def add_table_row(path: Path, header_start: str, row: str) -> None:
    """Insert `row` after the last row of the table whose header starts with `header_start` (appended to
    the file when there is no such table)."""
    lines = path.read_text().splitlines() if path.exists() else []
    at = next((i for i, line in enumerate(lines) if line.startswith(header_start)), None)
    if at is None:
        lines.append(row)
    else:
        end = at
        while end + 1 < len(lines) and lines[end + 1].startswith("|"):
            end += 1
        lines.insert(end + 1, row)
    path.write_text("\n".join(lines) + "\n")
