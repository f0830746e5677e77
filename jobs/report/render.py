"""The report's HTML: one Jinja2 template (package data), every value autoescaped.

Only the charts are marked safe: SVG drawn here by matplotlib, which escapes the text it writes.
A Content-Security-Policy in the page forbids scripts and any request outside the page itself, so
it opens offline and a string that slipped through escaping still could not run.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import jinja2

from jobs.report.collect import Report


def human_bytes(n) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def num(v) -> str:
    """Counts with thousands separators, other numbers to 4 significant digits."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def short(sha) -> str:
    return sha[:12] if isinstance(sha, str) else "–"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("jobs.report", "templates"),
        autoescape=True,  # every value, whatever the template's name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(human_bytes=human_bytes, num=num, short=short)
    return env


def render(report: Report) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return environment().get_template("report.html.j2").render(r=report, generated=generated)
