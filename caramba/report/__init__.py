"""The compile report: one self-contained HTML page of a compile (`caramba report MODEL`,
`caramba.compile(..., report="report.html")`): the pass timeline with diffs and drawings, the final graph per layer,
fusion coverage, the kernels the target runs, the KV-cache layout. collect.py gathers it, render.py writes it."""
from caramba.report.collect import Report, ReportCollector

__all__ = ["Report", "ReportCollector"]
