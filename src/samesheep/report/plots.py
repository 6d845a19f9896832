"""Plots drawn as SVG when the site is built: no script, no library, readable from file://.
Every point or bar carries a <title> (the browser shows it on hover) and may link to a page."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from markupsafe import Markup, escape

WIDTH, HEIGHT = 460, 260
MARGIN = {"left": 52, "right": 12, "top": 14, "bottom": 40}
COLORS = {
    "raw": "#1f5fbf",
    "floor": "#b23b3b",
    "null": "#8a8a8a",
    "across": "#c0a040",
    "ceiling": "#2e8b57",
    "untrained_pair": "#8e5bb5",
    "normalised": "#333333",
    "a": "#1f5fbf",
    "b": "#d9822b",
}


@dataclass
class Series:
    """One line (or one set of bars) of a plot: its name, colour, and (x, y) points; `tips`
    (one per point) are shown on hover, `links` (one per point, or empty) open on click."""

    name: str
    color: str
    points: list[tuple[float, float]]
    dash: str = ""
    tips: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    band: list[tuple[float, float, float]] = field(default_factory=list)  # (x, low, high)


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    # rounded, so that a tick at zero reads "0" and not "-1e-17"
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(v: float, percent: bool) -> str:
    if percent:  # as many decimals as the tick needs (0.25%, 5%), never more than two
        return f"{100 * v:.2f}".rstrip("0").rstrip(".") + "%"
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.0e}"


class Frame:
    """Axes from data ranges to pixels, with gridlines and labels."""

    def __init__(
        self,
        x: tuple[float, float],
        y: tuple[float, float],
        width: int,
        height: int,
        left: float = MARGIN["left"],
        top: float = MARGIN["top"],
    ):
        self.x0, self.x1 = x
        self.y0, self.y1 = y
        self.w, self.h = width, height
        self.left, self.right = left, width - MARGIN["right"]
        self.top, self.bottom = top, height - MARGIN["bottom"]

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (x - self.x0) / span * (self.right - self.left)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.bottom - (y - self.y0) / span * (self.bottom - self.top)

    def axes(
        self, xlabel: str, ylabel: str, x_percent: bool, y_percent: bool, x_ticks: bool = True
    ) -> list[str]:
        out = []
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            out.append(
                f'<line class="grid" x1="{self.left}" x2="{self.right}" y1="{_fmt(y)}" '
                f'y2="{_fmt(y)}"/>'
            )
            out.append(
                f'<text class="tick" x="{self.left - 6}" y="{_fmt(y + 4)}" '
                f'text-anchor="end">{escape(_label(t, y_percent))}</text>'
            )
        if x_ticks:
            for t in _ticks(self.x0, self.x1):
                x = self.px(t)
                out.append(
                    f'<text class="tick" x="{_fmt(x)}" y="{self.bottom + 16}" '
                    f'text-anchor="middle">{escape(_label(t, x_percent))}</text>'
                )
        out.append(
            f'<line class="axis" x1="{self.left}" x2="{self.right}" y1="{self.bottom}" '
            f'y2="{self.bottom}"/>'
        )
        out.append(
            f'<line class="axis" x1="{self.left}" x2="{self.left}" y1="{self.top}" '
            f'y2="{self.bottom}"/>'
        )
        out.append(
            f'<text class="label" x="{(self.left + self.right) / 2}" y="{self.h - 6}" '
            f'text-anchor="middle">{escape(xlabel)}</text>'
        )
        mid = (self.top + self.bottom) / 2
        out.append(
            f'<text class="label" transform="translate(13 {_fmt(mid)}) rotate(-90)" '
            f'text-anchor="middle">{escape(ylabel)}</text>'
        )
        return out


def _svg(body: list[str], width: int, height: int, title: str) -> Markup:
    head = (
        f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}">'
    )
    return Markup(head + "".join(body) + "</svg>")


LEGEND_ROW = 13
"""Pixels per row of a legend, which sits above the plot's frame."""


def _legend_entries(series: list[Series]) -> list[Series]:
    return [s for s in series if s.name]  # a series without a name shares another's entry


def _legend_width(s: Series) -> float:
    return 26 + 5.6 * len(s.name)


def _legend_rows(series: list[Series], width: int, left: float = MARGIN["left"]) -> int:
    """How many rows the legend of these series takes in a plot of this width."""
    rows, x = 1, left
    for s in _legend_entries(series):
        if x > left and x + _legend_width(s) > width - MARGIN["right"]:
            rows, x = rows + 1, left
        x += _legend_width(s)
    return rows if _legend_entries(series) else 0


def _legend(series: list[Series], frame: Frame) -> list[str]:
    """The legend, row after row above the frame (never over the data)."""
    out, x, y = [], frame.left, 10.0
    for s in _legend_entries(series):
        if x > frame.left and x + _legend_width(s) > frame.right:
            x, y = frame.left, y + LEGEND_ROW
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(
            f'<line x1="{_fmt(x)}" x2="{_fmt(x + 16)}" y1="{_fmt(y - 4)}" y2="{_fmt(y - 4)}" '
            f'stroke="{s.color}" stroke-width="2.5"{dash}/>'
        )
        out.append(f'<text class="legend" x="{_fmt(x + 20)}" y="{_fmt(y)}">{escape(s.name)}</text>')
        x += _legend_width(s)
    return out


def _top(series: list[Series], width: int, left: float = MARGIN["left"]) -> float:
    """The frame's top: room for the legend's rows above it."""
    return MARGIN["top"] + LEGEND_ROW * _legend_rows(series, width, left)


def _point(x: float, y: float, color: str, tip: str, link: str, r: float = 3.2) -> str:
    dot = (
        f'<circle cx="{_fmt(x)}" cy="{_fmt(y)}" r="{r}" fill="{color}">'
        f"<title>{escape(tip)}</title></circle>"
    )
    return f'<a href="{escape(link)}">{dot}</a>' if link else dot


@dataclass(frozen=True)
class LineAxes:
    """The axes of a line plot: the ranges of data it shows (y from 0 to the largest value
    where y_range is None), whether each axis's ticks read as percentages, and the plot's
    size in pixels."""

    x_range: tuple[float, float] = (0.0, 1.0)
    y_range: tuple[float, float] | None = None
    x_percent: bool = False
    y_percent: bool = True
    width: int = WIDTH
    height: int = HEIGHT


def line_plot(
    series: list[Series], xlabel: str, ylabel: str, title: str, axes: LineAxes = LineAxes()
) -> Markup:
    """Lines through each series' points, a dot with its tip on every point."""
    width, height = axes.width, axes.height
    ys = [y for s in series for _, y in s.points if y is not None and math.isfinite(y)]
    y_range = axes.y_range or (0.0, max(ys, default=1.0) or 1.0)
    f = Frame(axes.x_range, y_range, width, height, top=_top(series, width))
    body = f.axes(xlabel, ylabel, axes.x_percent, axes.y_percent)

    def py(y: float) -> float:  # values outside the range are drawn at its edge
        return f.py(min(max(y, f.y0), f.y1))

    for s in series:
        band = [(x, lo, hi) for x, lo, hi in s.band if _finite(lo) and _finite(hi)]
        if band:
            edge = [(x, hi) for x, _, hi in band] + [(x, lo) for x, lo, _ in reversed(band)]
            path = " ".join(f"{_fmt(f.px(x))},{_fmt(py(y))}" for x, y in edge)
            body.append(
                f'<polygon class="band" fill="{s.color}" fill-opacity="0.15" points="{path}"/>'
            )
    for s in series:
        pts = [(x, y) for x, y in s.points if _finite(y)]
        if not pts:
            continue
        path = " ".join(f"{_fmt(f.px(x))},{_fmt(py(y))}" for x, y in pts)
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        body.append(
            f'<polyline fill="none" stroke="{s.color}" stroke-width="2"{dash} points="{path}"/>'
        )
        for i, (x, y) in enumerate(s.points):
            if not _finite(y):
                continue
            tip = s.tips[i] if i < len(s.tips) else f"{s.name}: {y:.3g} at {x:.3g}"
            link = s.links[i] if i < len(s.links) else ""
            body.append(_point(f.px(x), py(y), s.color, tip, link, r=2.6))
    body += _legend(series, f)
    return _svg(body, width, height, title)


@dataclass(frozen=True)
class BarAxes:
    """The axes of a grouped bar plot: whether the value axis's ticks read as percentages,
    the plot's size in pixels, and whether the category labels are slanted below the bars
    (for long ones: the plot grows to hold them, and the x axis's own label is left off)."""

    y_percent: bool = True
    width: int = WIDTH
    height: int = HEIGHT
    rotate: bool = False


def bar_plot(
    categories: list[str],
    series: list[Series],
    xlabel: str,
    ylabel: str,
    title: str,
    axes: BarAxes = BarAxes(),
) -> Markup:
    """Grouped bars: one group per category, one bar per series (its points' y, in order)."""
    width, rotate = axes.width, axes.rotate
    ys = [y for s in series for _, y in s.points if y is not None and math.isfinite(y)]
    bottom = axes.height + (60 if rotate else 0)
    y_range = (0.0, max(ys, default=1.0) or 1.0)
    f = Frame((0, max(len(categories), 1)), y_range, width, bottom, top=_top(series, width))
    body = f.axes(xlabel if not rotate else "", ylabel, False, axes.y_percent, x_ticks=False)
    group = (f.right - f.left) / max(len(categories), 1)
    bar = group * 0.8 / max(len(series), 1)
    for i, cat in enumerate(categories):
        x = f.left + i * group + group * 0.1
        label_x = x + group * 0.4
        if rotate:
            body.append(
                f'<text class="tick" transform="translate({_fmt(label_x)} '
                f'{f.bottom + 10}) rotate(35)">{escape(cat)}</text>'
            )
        else:
            body.append(
                f'<text class="tick" x="{_fmt(label_x)}" y="{f.bottom + 16}" '
                f'text-anchor="middle">{escape(cat)}</text>'
            )
        for j, s in enumerate(series):
            y = s.points[i][1] if i < len(s.points) else None
            if y is None or not math.isfinite(y):
                continue
            top = f.py(y)
            tip = s.tips[i] if i < len(s.tips) else f"{cat}, {s.name}: {y:.3g}"
            rect = (
                f'<rect x="{_fmt(x + j * bar)}" y="{_fmt(top)}" width="{_fmt(bar)}" '
                f'height="{_fmt(f.bottom - top)}" fill="{s.color}">'
                f"<title>{escape(tip)}</title></rect>"
            )
            link = s.links[i] if i < len(s.links) else ""
            body.append(f'<a href="{escape(link)}">{rect}</a>' if link else rect)
    body += _legend(series, f)
    return _svg(body, width, bottom, title)


LABEL_CHARS = 30
"""Characters of a category's label a horizontal bar plot shows (the whole label on hover)."""


def hbar_plot(
    categories: list[str],
    series: list[Series],
    xlabel: str,
    title: str,
    x_percent: bool = True,
    width: int = WIDTH,
) -> Markup:
    """Horizontal bars: one row per category, its label at the left (never cut by the
    plot's edge: long labels are shortened, the whole one shown on hover), one bar per
    series (its points' y, in order)."""
    xs = [y for s in series for _, y in s.points if _finite(y)]
    longest = max((len(c) for c in categories), default=4)
    left = 12 + 5.8 * min(longest, LABEL_CHARS)
    bar = 11.0
    row = bar * max(len(series), 1) + 7
    top = _top(series, width, left)
    height = int(top + row * max(len(categories), 1) + MARGIN["bottom"])
    f = Frame((0.0, max(xs, default=1.0) or 1.0), (0.0, 1.0), width, height, left, top)
    body = []
    for t in _ticks(f.x0, f.x1):
        x = f.px(t)
        body.append(
            f'<line class="grid" x1="{_fmt(x)}" x2="{_fmt(x)}" y1="{_fmt(f.top)}" '
            f'y2="{_fmt(f.bottom)}"/>'
        )
        body.append(
            f'<text class="tick" x="{_fmt(x)}" y="{_fmt(f.bottom + 16)}" '
            f'text-anchor="middle">{escape(_label(t, x_percent))}</text>'
        )
    for i, cat in enumerate(categories):
        y = f.top + i * row + 3
        shown = cat if len(cat) <= LABEL_CHARS else cat[: LABEL_CHARS - 1] + "…"
        body.append(
            f'<text class="tick" x="{_fmt(f.left - 6)}" y="{_fmt(y + row / 2)}" '
            f'text-anchor="end"><title>{escape(cat)}</title>{escape(shown)}</text>'
        )
        for j, s in enumerate(series):
            v = s.points[i][1] if i < len(s.points) else None
            if not _finite(v):
                continue
            tip = s.tips[i] if i < len(s.tips) else f"{cat}, {s.name}: {v:.3g}"
            rect = (
                f'<rect x="{_fmt(f.left)}" y="{_fmt(y + j * bar)}" '
                f'width="{_fmt(f.px(v) - f.left)}" height="{_fmt(bar - 1)}" fill="{s.color}">'
                f"<title>{escape(tip)}</title></rect>"
            )
            link = s.links[i] if i < len(s.links) else ""
            body.append(f'<a href="{escape(link)}">{rect}</a>' if link else rect)
    body.append(
        f'<line class="axis" x1="{_fmt(f.left)}" x2="{_fmt(f.left)}" y1="{_fmt(f.top)}" '
        f'y2="{_fmt(f.bottom)}"/>'
    )
    body.append(
        f'<text class="label" x="{_fmt((f.left + f.right) / 2)}" y="{height - 6}" '
        f'text-anchor="middle">{escape(xlabel)}</text>'
    )
    body += _legend(series, f)
    return _svg(body, width, height, title)


PALETTE = ("#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b")
"""A sequential blue scale, low to high."""
BELOW = "#d9d9d9"
"""The stroke across a heatmap cell whose value does not pass its threshold."""


def _shade(t: float) -> str:
    """The palette's colour at t in [0, 1], interpolated between its anchors."""
    t = min(max(t, 0.0), 1.0) * (len(PALETTE) - 1)
    i = min(int(t), len(PALETTE) - 2)
    lo, hi = PALETTE[i], PALETTE[i + 1]
    mix = [
        round(int(lo[k : k + 2], 16) * (1 - (t - i)) + int(hi[k : k + 2], 16) * (t - i))
        for k in (1, 3, 5)
    ]
    return "#" + "".join(f"{c:02x}" for c in mix)


@dataclass
class Grid:
    """The cells of a heatmap: values [rows][cols] (rows: y, cols: x), whether each passes
    its threshold (None: no threshold), the outlined cell of each row (or None), and a tip
    per cell (empty: no tips)."""

    values: list[list[float]]
    passes: list[list[bool]] | None = None
    outlined: list[int | None] = field(default_factory=list)
    tips: list[list[str]] = field(default_factory=list)


def heatmap(
    grid: Grid,
    xlabel: str,
    ylabel: str,
    title: str,
    value_range: tuple[float, float],
    cell: int = 13,
) -> Markup:
    """Cells coloured by value on a shared scale, row 0 at the bottom; a cell that does not
    pass (or has no value) is shown as such, not as a colour: blank, struck through; each
    row's outlined cell framed, a colour bar at the right."""
    rows, cols = len(grid.values), len(grid.values[0]) if grid.values else 0
    left, top, bottom, bar = 40, 10, 38, 46
    width, height = left + cols * cell + bar + 8, top + rows * cell + bottom
    lo, hi = value_range
    span = (hi - lo) or 1.0
    body = []
    for r, line in enumerate(grid.values):
        y = top + (rows - 1 - r) * cell
        for c, v in enumerate(line):
            x = left + c * cell
            ok = (grid.passes is None or grid.passes[r][c]) and math.isfinite(v)
            tip = f"<title>{escape(grid.tips[r][c])}</title>" if grid.tips else ""
            if not ok:  # nothing survives here
                body.append(
                    f'<rect class="none" x="{x}" y="{y}" width="{cell}" height="{cell}" '
                    f'fill="#fff">{tip}</rect><line x1="{x + 2}" y1="{y + cell - 2}" '
                    f'x2="{x + cell - 2}" y2="{y + 2}" stroke="{BELOW}" stroke-width="1"/>'
                )
                continue
            fill = _shade((v - lo) / span)
            body.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}">{tip}</rect>'
            )
        best = grid.outlined[r] if r < len(grid.outlined) else None
        if best is not None:
            body.append(
                f'<rect class="best" x="{left + best * cell + 1}" y="{y + 1}" width="{cell - 2}" '
                f'height="{cell - 2}" fill="none" stroke="#e6550d" stroke-width="2"/>'
            )
    step = max(1, math.ceil(max(rows, cols) / 10))
    for c in range(0, cols, step):
        body.append(
            f'<text class="tick" x="{left + c * cell + cell / 2}" y="{top + rows * cell + 12}" '
            f'text-anchor="middle">{c}</text>'
        )
    for r in range(0, rows, step):
        body.append(
            f'<text class="tick" x="{left - 4}" y="{top + (rows - r) * cell - 3}" '
            f'text-anchor="end">{r}</text>'
        )
    body.append(
        f'<text class="label" x="{left + cols * cell / 2}" y="{height - 6}" '
        f'text-anchor="middle">{escape(xlabel)}</text>'
    )
    mid = top + rows * cell / 2
    body.append(
        f'<text class="label" transform="translate(12 {_fmt(mid)}) rotate(-90)" '
        f'text-anchor="middle">{escape(ylabel)}</text>'
    )
    bx, bh = left + cols * cell + 8, rows * cell
    for i in range(20):
        body.append(
            f'<rect x="{bx}" y="{_fmt(top + bh - (i + 1) * bh / 20)}" width="10" '
            f'height="{_fmt(bh / 20 + 0.5)}" fill="{_shade(i / 19)}"/>'
        )
    for v, y in ((hi, top + 8), (lo, top + bh)):
        body.append(f'<text class="tick" x="{bx + 13}" y="{_fmt(y)}">{v:.2f}</text>')
    return _svg(body, width, height, title)
