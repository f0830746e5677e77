"""Charts as inline SVG, drawn with matplotlib's object API (no pyplot: no global figure state in
the control API's process).

Each drawn series carries an SVG id (`gid`) naming what it is (`train-loss`, `funnel-kept`, ...),
prefixed per chart like every other id, so that several charts share one page without clashing.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

from markupsafe import Markup, escape

# Draw every record (no path simplification: a chart of n steps has n points), keep text as text
# (smaller, selectable, searchable) and treat `$` in file content as a dollar sign, not TeX.
RC = {"svg.fonttype": "none", "path.simplify": False, "text.parse_math": False, "font.size": 9,
      "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}
MAX_POINTS = 20_000  # beyond this a series is thinned to every k-th point (said under the chart)


@dataclass
class Series:
    gid: str
    label: str
    x: list[float]
    y: list[float]
    style: str = "line"
    """`line`, `markers` (evaluations: a few points joined), `step` (a level held until it changes)."""


@dataclass
class Chart:
    name: str
    """What the chart shows, for the page's markup (`data-chart`)."""
    title: str
    svg: Markup
    notes: list[str] = field(default_factory=list)


class Charts:
    """Draws the charts of one page, numbering them so that their SVG ids are unique."""

    def __init__(self):
        self.n = 0

    def _render(self, fig, title: str) -> Markup:
        self.n += 1
        prefix = f"c{self.n}"
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
        text = buf.getvalue()
        text = text[text.index("<svg"):]  # no XML prolog or DOCTYPE inside HTML
        text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', text)
        text = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{prefix}-\1"', text)
        text = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", text)
        text = text.replace("<svg ", f'<svg role="img" aria-label="{escape(title)}" ', 1)
        # matplotlib escapes every text it writes into the SVG (labels may come from files)
        return Markup(text)

    def _figure(self, height: float = 3.0):
        from matplotlib.figure import Figure

        return Figure(figsize=(6.4, height), layout="constrained")

    def lines(self, name: str, title: str, series: list[Series], xlabel: str = "step", ylabel: str = "",
              hlines: list[tuple[str, str, float]] = ()) -> Chart | None:
        """A line chart; `hlines` are (gid, label, y) reference levels. None if nothing to draw."""
        import matplotlib

        notes = []
        drawn = []
        for s in series:
            pts = [(x, y) for x, y in zip(s.x, s.y) if finite(x) and finite(y)]
            if len(pts) < len(s.x):
                notes.append(f"{s.label}: {len(s.x) - len(pts)} non-finite values not drawn")
            if len(pts) > MAX_POINTS:
                k = math.ceil(len(pts) / MAX_POINTS)
                pts = pts[::k]
                notes.append(f"{s.label}: every {k}th of {len(s.x)} points drawn")
            if pts:
                drawn.append((s, pts))
        if not drawn:
            return None
        with matplotlib.rc_context(RC):
            fig = self._figure()
            ax = fig.add_subplot()
            for i, (s, pts) in enumerate(drawn):
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if s.style == "markers":
                    (line,) = ax.plot(xs, ys, "o-", ms=3.5, lw=1, label=s.label, color=f"C{i}")
                elif s.style == "step":
                    (line,) = ax.step(xs, ys, where="post", lw=1.5, label=s.label, color=f"C{i}")
                else:
                    (line,) = ax.plot(xs, ys, lw=1, label=s.label, color=f"C{i}")
                line.set_gid(s.gid)
            for gid, label, y in hlines:
                if finite(y):
                    ax.axhline(y, ls="--", c="gray", lw=1, label=label, gid=gid)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(title, loc="left")
            if len(drawn) + len(hlines) > 1:
                ax.legend(fontsize=8)
            return Chart(name, title, self._render(fig, title), notes)

    def funnel(self, stages: list[dict]) -> Chart | None:
        """Documents kept (bar) and dropped per reason (stacked after it) at each stage."""
        import matplotlib

        if not stages:
            return None
        with matplotlib.rc_context(RC):
            fig = self._figure(0.9 + 0.45 * len(stages))
            ax = fig.add_subplot()
            names = [s["stage"] for s in stages][::-1]
            kept = [s["documents_out"] for s in stages][::-1]
            # bars from the bottom up: the first stage on top; bar ids count stages from the first
            last = len(stages) - 1
            bars = ax.barh(range(len(names)), kept, color="C0", label="kept", tick_label=names)
            for y, bar in enumerate(bars):
                bar.set_gid(f"funnel-kept-{last - y}")
            left = list(kept)
            reasons = sorted({r for s in stages for r in s["dropped"]})
            for i, reason in enumerate(reasons):
                widths = [s["dropped"].get(reason, 0) for s in stages][::-1]
                bars = ax.barh(range(len(names)), widths, left=left, color=f"C{(i + 1) % 10}",
                               label=f"dropped: {reason}")
                for y, bar in enumerate(bars):
                    bar.set_gid(f"funnel-dropped-{i}-{last - y}")
                left = [a + b for a, b in zip(left, widths)]
            for y, (n_out, s) in enumerate(zip(kept, stages[::-1])):
                ax.annotate(f"{s['documents_in']:,} → {n_out:,}", (left[y], y), xytext=(4, 0),
                            textcoords="offset points", va="center", fontsize=8, gid=f"funnel-label-{last - y}")
            ax.set_xlabel("documents")
            ax.set_xlim(0, max(left) * 1.25 if max(left) else 1)
            ax.grid(axis="y", visible=False)
            ax.set_title("documents per stage", loc="left")
            if reasons:
                fig.legend(fontsize=8, loc="outside lower center", ncol=min(4, len(reasons) + 1), frameon=False)
            return Chart("funnel", "documents per stage", self._render(fig, "documents per stage"))

    def sweep(self, rows: list[dict], best_lr: float | None) -> Chart | None:
        """Eval loss against learning rate, one marker per trial status (log lr axis)."""
        import matplotlib
        from matplotlib.ticker import LogFormatter

        pts = [r for r in rows if finite(r.get("lr")) and r["lr"] > 0]
        if not pts:
            return None
        losses = [r["val_loss"] for r in pts if finite(r.get("val_loss"))]
        top = max(losses, default=1.0) * 1.05
        styles = {"completed": ("o", "C0"), "stopped": ("s", "C1"), "diverged": ("x", "C3"), "error": ("x", "gray")}
        with matplotlib.rc_context(RC):
            fig = self._figure()
            ax = fig.add_subplot()
            for status in sorted({r["status"] for r in pts}, key=lambda s: list(styles).index(s) if s in styles else 9):
                marker, color = styles.get(status, ("d", "C4"))
                these = [r for r in pts if r["status"] == status]
                ys = [r["val_loss"] if finite(r.get("val_loss")) else top for r in these]
                ax.scatter([r["lr"] for r in these], ys, marker=marker, c=color, s=40, label=status, zorder=3,
                           gid=f"trials-{_slug(status)}")
            done = sorted((r for r in pts if r["status"] == "completed" and finite(r.get("val_loss"))),
                          key=lambda r: r["lr"])
            if len(done) > 1:
                ax.plot([r["lr"] for r in done], [r["val_loss"] for r in done], c="C0", lw=1, alpha=0.5)
            if best_lr is not None:
                best = [r for r in done if r["lr"] == best_lr]
                if best:
                    ax.scatter([best_lr], [best[0]["val_loss"]], marker="*", s=200, c="gold", edgecolors="k",
                               zorder=4, label=f"best lr {best_lr:.3g}", gid="trials-best")
            ax.set_xscale("log")
            # plain tick labels: the default ones are TeX, which this page's charts do not parse
            for axis_set in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis_set(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.set_xlabel("learning rate")
            ax.set_ylabel("eval loss (diverged at top)")
            ax.set_title("eval loss vs learning rate", loc="left")
            ax.legend(fontsize=8)
            return Chart("sweep", "eval loss vs learning rate", self._render(fig, "eval loss vs learning rate"))


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-") or "x"
