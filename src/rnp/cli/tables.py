"""Readable tables for the terminal; JSON files hold the same numbers as fractions."""

from __future__ import annotations

METRIC_LABELS = (
    ("clean_accuracy", "CA"),
    ("clean_accuracy_non_target", "CA (non-target)"),
    ("attack_success_rate", "ASR"),
    ("robust_accuracy", "RA"),
)


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def metrics_table(columns: dict[str, dict]) -> str:
    """Rows are metrics, columns are models (e.g. ``{"before": {...}, "after": {...}}``)."""
    names = list(columns)
    rows = [["metric", *names]]
    for key, label in METRIC_LABELS:
        if any(columns[name].get(key) is not None for name in names):
            rows.append([label, *(percent(columns[name].get(key)) for name in names)])
    return render(rows)


def render(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
