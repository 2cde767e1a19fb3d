"""Readable tables for the terminal; JSON files hold the same numbers as fractions."""

from __future__ import annotations

from rnp.io.tables import render_table

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
    return render_table(rows)

