"""Reports: matplotlib plots, Markdown/HTML tables and a small self-contained HTML report."""

from hafloc.reports.html import ReportImage, Section, Table, render_report, write_report
from hafloc.reports.plots import (
    coinciding_curves,
    plot_attention,
    plot_history,
    plot_recall_curves,
    plot_retrievals,
    plot_seed_spread,
    plot_weights_table,
)
from hafloc.reports.tables import format_cell, html_table, markdown_table

__all__ = [
    "ReportImage",
    "Section",
    "Table",
    "render_report",
    "write_report",
    "coinciding_curves",
    "plot_attention",
    "plot_history",
    "plot_recall_curves",
    "plot_retrievals",
    "plot_seed_spread",
    "plot_weights_table",
    "format_cell",
    "html_table",
    "markdown_table",
]
