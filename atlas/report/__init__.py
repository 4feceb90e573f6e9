"""Report stage: the static HTML site of an atlas (``atlas report``), rendered with the Jinja
templates of ``reports/`` from query results (the atlas is read only through :mod:`atlas.query`).

    from atlas.report import render_report
    result = render_report("data/atlases/demo")          # -> data/atlases/demo/report/index.html
    print(result.index, result.summary())

Imports no torch.
"""

from atlas.report.site import ReportResult, render_report
from atlas.report.writer import ReportDirError

__all__ = ["ReportDirError", "ReportResult", "render_report"]
