"""Charts as inline SVG strings, drawn in Python: a report that needs no JavaScript and no web host.

Two functions cover the report: :func:`bars` (one or more series per category,
side by side or stacked, optionally with error bars) and :func:`lines` (series
over a numeric or time axis). Every mark carries a ``<title>``, so a browser
shows the exact value on hover without any script.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from html import escape

WIDTH, HEIGHT = 720, 320
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_BOTTOM = 64, 16, 84
LEGEND_ROW = 16
#: longer category names are cut (whole in the hover title) so slanted labels stay inside the picture
LABEL_CHARS = 16
#: colour-blind-safe (Okabe-Ito), in the order series get them
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

X = float | datetime | date


@dataclass(frozen=True)
class Series:
    """One named row of values; ``errors`` are (low, high) bounds drawn as error bars (bars only)."""

    name: str
    values: Sequence[float]
    errors: Sequence[tuple[float, float]] | None = None


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (steps of 1, 2 or 5 × 10ⁿ), so the axis reads at a glance.

    >>> nice_ticks(0, 97)
    [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
    >>> nice_ticks(0.42, 0.91)
    [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    """
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    n = math.ceil((hi - start) / step - 1e-9)
    return [float(round(start + i * step, 12)) for i in range(n + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering ``[lo, hi]`` (lo > 0), for a log axis.

    >>> log_ticks(85, 4.1e8)
    [10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0, 100000000.0, 1000000000.0]
    """
    return [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


def fmt(v: float) -> str:
    """A short label for a number: 1.2k, 3.5M, 0.25, 12.

    >>> [fmt(x) for x in (0, 12, 0.25, 1500, 2_500_000, 1e9)]
    ['0', '12', '0.25', '1.5k', '2.5M', '1G']
    """
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


class _Frame:
    """The plot area under the legend and a y scale (linear, or log for values spanning decades); writes the
    axes, grid and legend (the title is the accessible name: the page's heading names the chart)."""

    def __init__(self, title: str, y_label: str, lo: float, hi: float, names: Sequence[str], log: bool = False):
        self.log = log
        self.ticks = log_ticks(lo, hi) if log else nice_ticks(lo, hi)
        self.lo, self.hi = self.ticks[0], self.ticks[-1]
        self.left = MARGIN_LEFT
        self.width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
        legend = self._legend(names)
        self.top = 14 + LEGEND_ROW * (1 + max((row for row, _, _ in legend), default=0))
        self.height = HEIGHT - self.top - MARGIN_BOTTOM
        self.bottom = self.top + self.height
        self.parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
            *(f'<rect class="legend" x="{x:.0f}" y="{8 + row * LEGEND_ROW}" width="10" height="10" '
              f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{x + 14:.0f}" y="{17 + row * LEGEND_ROW}" '
              f'font-size="11">{escape(names[i])}</text>' for i, (row, x, _) in enumerate(legend)),
            f'<text class="axis-label" transform="translate(14,{self.top + self.height / 2}) rotate(-90)" '
            f'text-anchor="middle" font-size="11">{escape(y_label)}</text>',
        ]
        for t in self.ticks:
            y = self.y(t)
            self.parts.append(f'<line class="grid" x1="{self.left}" x2="{self.left + self.width}" y1="{y:.1f}" '
                              f'y2="{y:.1f}" stroke="#ddd"/>')
            self.parts.append(f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
                              f'{fmt(t)}</text>')
        self.parts.append(f'<line class="axis" x1="{self.left}" x2="{self.left + self.width}" y1="{self.bottom}" '
                          f'y2="{self.bottom}" stroke="#333"/>')

    def y(self, v: float) -> float:
        """The pixel row of ``v``; on a log axis values at or below the lowest tick sit on the axis."""
        if self.log:
            return self.bottom - math.log(max(v, self.lo) / self.lo) / math.log(self.hi / self.lo) * self.height
        return self.bottom - (v - self.lo) / (self.hi - self.lo) * self.height

    def x_label(self, x: float, text: str, rotate: bool) -> None:
        y = self.bottom + 14
        turn = f' transform="rotate(-30 {x:.1f} {y})"' if rotate else ""
        anchor = "end" if rotate else "middle"
        short = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"
        self.parts.append(f'<text x="{x:.1f}" y="{y}" text-anchor="{anchor}" font-size="11"{turn}>{escape(short)}'
                          f'<title>{escape(text)}</title></text>')

    def _legend(self, names: Sequence[str]) -> list[tuple[int, float, str]]:
        """(row, x, name) of each legend entry above the plot, wrapping at the right edge; none for one series."""
        if len(names) < 2:
            return []
        out, row, x = [], 0, float(self.left)
        for name in names:
            w = 14 + 6.5 * len(name) + 14
            if x + w > self.left + self.width and x > self.left:
                row, x = row + 1, float(self.left)
            out.append((row, x, name))
            x += w
        return out

    def svg(self) -> str:
        return "\n".join([*self.parts, "</svg>"])


def _empty(title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart empty" viewBox="0 0 {WIDTH} 40" width="{WIDTH}" '
            f'height="40" aria-label="{escape(title)}"><text x="{MARGIN_LEFT}" y="24" font-size="12" fill="#777">'
            f'no data in this period</text></svg>')


def bars(title: str, categories: Sequence[str], series: Sequence[Series], y_label: str = "",
         stacked: bool = False, log: bool = False) -> str:
    """Vertical bars per category: series side by side (or stacked), with error bars where given;
    ``log`` for positive values spanning decades (side by side only)."""
    if not categories or not series:
        return _empty(title)
    tops = [sum(max(s.values[i], 0) for s in series) for i in range(len(categories))] if stacked else [
        max(s.errors[i][1] if s.errors else s.values[i], s.values[i]) for s in series for i in range(len(categories))]
    bottoms = [0.0] if stacked else [min(s.errors[i][0] if s.errors else 0.0, s.values[i])
                                     for s in series for i in range(len(categories))]
    positive = [v for s in series for v in s.values if v > 0]
    names = [s.name for s in series]
    f = (_Frame(title, y_label, min(positive), max(positive), names, log=True) if log and positive
         else _Frame(title, y_label, min(0.0, *bottoms), max(tops), names))
    slot = f.width / len(categories)
    per = 1 if stacked else len(series)
    bar_w = slot * 0.8 / per
    rotate = max(len(c) for c in categories) * 6.5 > slot
    for i, cat in enumerate(categories):
        x0 = f.left + i * slot + slot * 0.1
        base = 0.0
        for j, s in enumerate(series):
            v = s.values[i]
            lo, hi = (base, base + v) if stacked else (min(f.lo if f.log else 0.0, v), max(0.0, v))
            x = x0 if stacked else x0 + j * bar_w
            tip = f"{cat} · {s.name}: {v:.4g}" + (f" [{s.errors[i][0]:.3g}, {s.errors[i][1]:.3g}]" if s.errors else "")
            f.parts.append(f'<rect class="bar" x="{x:.1f}" y="{f.y(hi):.1f}" width="{bar_w:.1f}" '
                           f'height="{f.y(lo) - f.y(hi):.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                           f'<title>{escape(tip)}</title></rect>')
            if s.errors:
                cx, (e_lo, e_hi) = x + bar_w / 2, s.errors[i]
                f.parts.append(f'<path class="error-bar" d="M{cx:.1f},{f.y(e_lo):.1f}V{f.y(e_hi):.1f}'
                               f'M{cx - 4:.1f},{f.y(e_lo):.1f}h8M{cx - 4:.1f},{f.y(e_hi):.1f}h8" '
                               f'stroke="#222" stroke-width="1.5" fill="none"/>')
            if stacked:
                base += max(v, 0)
        f.x_label(f.left + (i + 0.5) * slot, cat, rotate)
    return f.svg()


def _as_number(x: X) -> float:
    if isinstance(x, datetime):
        return (x if x.tzinfo else x.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(x, date):
        return datetime(x.year, x.month, x.day, tzinfo=timezone.utc).timestamp()
    return float(x)


def _x_formatter(xs: Sequence[X], span_s: float) -> Callable[[float], str]:
    if not isinstance(xs[0], (datetime, date)):
        return fmt
    pattern = "%m-%d %H:%M" if span_s < 3 * 86_400 and isinstance(xs[0], datetime) else "%Y-%m-%d"
    return lambda v: datetime.fromtimestamp(v, timezone.utc).strftime(pattern)


def lines(title: str, xs: Sequence[X], series: Sequence[Series], y_label: str = "",
          y_range: tuple[float, float] | None = None) -> str:
    """Series over a numeric, date or time axis; all share ``xs``, a NaN value is a point a series lacks."""
    points = [v for s in series for v in s.values if not math.isnan(v)]
    if not xs or not points:
        return _empty(title)
    lo, hi = y_range or (min(0.0, *points), max(points))
    f = _Frame(title, y_label, lo, hi, [s.name for s in series])
    nx = [_as_number(x) for x in xs]
    x_lo, x_hi = min(nx), max(nx)
    x_span = (x_hi - x_lo) or 1.0
    px = [f.left + (v - x_lo) / x_span * f.width for v in nx]
    label = _x_formatter(xs, x_span)
    for k in range(6):
        v = x_lo + x_span * k / 5
        f.x_label(f.left + f.width * k / 5, label(v), rotate=isinstance(xs[0], (datetime, date)))
    for j, s in enumerate(series):
        colour = PALETTE[j % len(PALETTE)]
        d = "L".join(f"{x:.1f},{f.y(v):.1f}" for x, v in zip(px, s.values) if not math.isnan(v))
        f.parts.append(f'<path class="line" d="M{d}" stroke="{colour}" stroke-width="2" fill="none">'
                       f'<title>{escape(s.name)}</title></path>')
        if len(xs) <= 60:
            f.parts.extend(f'<circle class="point" cx="{x:.1f}" cy="{f.y(v):.1f}" r="2.5" fill="{colour}">'
                           f'<title>{escape(s.name)}: {v:.4g}</title></circle>'
                           for x, v in zip(px, s.values) if not math.isnan(v))
    return f.svg()
