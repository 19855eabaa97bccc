"""The HTML report of a run: overview, paper-style figures, unit cards, class sections, image panels.

``write_report(run)`` writes ``run/report.html`` and ``run/figures/``; the figure functions in
:mod:`conceptrank.report.figures` are pure and can be used on their own (e.g. for a paper).
"""

from __future__ import annotations

from conceptrank.report.html import ReportOptions, render_html, write_report

__all__ = ["ReportOptions", "render_html", "write_report"]
