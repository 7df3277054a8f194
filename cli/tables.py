"""Small rich helpers shared by the commands."""

from __future__ import annotations

from typing import Mapping


def metrics_table(title: str, rows: Mapping[str, Mapping[str, float]]):
    """A rich table: one row per named result, one column per metric (union, in first-seen order)."""
    from rich.table import Table

    columns: list[str] = []
    for metrics in rows.values():
        for key, value in metrics.items():
            if key not in columns and isinstance(value, (int, float)) and not isinstance(value, bool):
                columns.append(key)
    table = Table(title=title)
    table.add_column("")
    for col in columns:
        table.add_column(short_metric_name(col), justify="right")
    for name, metrics in rows.items():
        table.add_row(name, *(f"{metrics[c]:.2f}" if c in metrics else "-" for c in columns))
    return table


def short_metric_name(name: str) -> str:
    """``recall_subset@1`` → ``Rs@1``, ``recall@5`` → ``R@5`` (keeps tables narrow)."""
    return name.replace("recall_subset@", "Rs@").replace("recall@", "R@")
