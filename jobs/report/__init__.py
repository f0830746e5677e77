"""The run report: one self-contained HTML page of what raylm's jobs wrote under a directory.

    python -m jobs.report runs/demo                 # -> runs/demo/report.html
    python -m jobs.report s3://bucket/runs/demo --output report.html

A directory (or s3:// prefix) holding one job's output or a pipeline of them (data/, pretrain/,
sft/, eval/, ...) gives: the data funnel, training curves and checkpoints (verified or not),
sweeps, an eval table by stage (base, SFT, DPO, RL) with confidence intervals, sample generations
and the lineage between them. Charts are inline SVG, the page makes no request: it opens offline.

This package imports neither torch nor Ray (the control API imports it); storage goes through
cluster.storage, so local paths and s3:// work alike.
"""

from __future__ import annotations

from cluster import storage
from jobs.report.collect import Report, collect
from jobs.report.render import render

REPORT_FILE = "report.html"

__all__ = ["REPORT_FILE", "Report", "build_html", "collect", "render", "write_report"]


def build_html(path: str, verify_checkpoints: bool = True, origin: str | None = None) -> str:
    """The report page of the outputs under `path` (a directory or s3:// prefix); `origin` as in `collect`."""
    return render(collect(path, verify_checkpoints=verify_checkpoints, origin=origin))


def write_report(path: str, output: str | None = None, verify_checkpoints: bool = True,
                 origin: str | None = None) -> str:
    """Write the report of `path` to `output` (default: report.html in `path`); return its URI.

    Jobs call this at their end with their output directory.
    """
    html = build_html(path, verify_checkpoints=verify_checkpoints, origin=origin)
    uri = storage.absolute(output) if output else storage.join(storage.absolute(path), REPORT_FILE)
    storage.write_text(uri, html)
    return uri
