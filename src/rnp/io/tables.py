"""Tables as text, rendered one way each: CSV through the :mod:`csv` module (a layer name with a
comma stays one cell), Markdown for reports, and aligned columns for the terminal."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from rnp.io.files import write_text


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """``header`` and ``rows`` as CSV with ``\\n`` line ends; None is an empty cell, other values
    are written with ``str`` (format floats before, to choose their digits)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Writes :func:`csv_text` to ``path`` atomically."""
    write_text(path, csv_text(header, rows))


def _markdown_cell(value) -> str:
    """``value`` as the text of one Markdown table cell: a ``|`` escaped so it does not end the
    cell, a line break folded into a space so it does not end the row (a grid's row name or a
    failed cell's error may hold either)."""
    return " ".join(str(value).replace("|", "\\|").splitlines())


def render_table(rows: Sequence[Sequence], *, markdown: bool = False) -> str:
    """``rows`` (the first is the header) as a table without a final newline: a Markdown table
    (a ``|`` in a cell escaped, a line break folded into a space, an empty cell left blank), or
    columns padded to their widest cell, two spaces apart, with a dashed line under the header,
    for the terminal."""
    if markdown:
        rows = [[_markdown_cell(cell) for cell in row] for row in rows]
        lines = ["|" + "".join(f" {cell} |" if cell else " |" for cell in row) for row in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
        return "\n".join(lines)
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
