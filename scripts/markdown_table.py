"""A benchmark's outputs: its result as JSON (printed, and written to --json) and its row in a table of
BENCHMARKS.md (--markdown). Used by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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


def report(
    result: dict[str, Any], json_path: str | None, markdown_path: str | None, header_start: str, row: str
):
    """Print `result` as JSON, write it to `json_path`, and add `row` to the table of `markdown_path` whose
    header starts with `header_start` (each when given)."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text)
    if markdown_path:
        add_table_row(Path(markdown_path), header_start, row)
