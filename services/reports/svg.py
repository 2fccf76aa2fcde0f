"""Small charts as inline SVG strings: horizontal bars, point estimates with 95% intervals, and a heat map.

Hand-written on purpose: three chart shapes need no plotting library, and SVG text is searchable, scales with the
page and passes the pages' Content-Security-Policy (colours are presentation attributes, never `style=`). Every
label goes through `html.escape`; every mark carries its number in `data-*` attributes, so a test (or a reader
with the inspector) can check a plot against the figures it draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

Format = Callable[[float], str]

LABEL_W = 190  # left column for the row labels
PLOT_W = 440
VALUE_W = 200  # right column for the printed value (and its interval)
ROW_H = 26
AXIS_H = 26
BAR = "#1d4ed8"
HIGHLIGHT = "#0a7d4f"
MUTED = "#94a3b8"
GRID = "#d9dee5"


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    highlight: bool = False


@dataclass(frozen=True)
class Interval:
    label: str
    value: float
    low: float | None
    high: float | None
    highlight: bool = False


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    if not raw > 0:  # a zero span, or one so small (subnormal) that dividing it underflows to 0
        raw = 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _scale(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """A padded, rounded axis range containing [lo, hi] and its tick values."""
    # A flat range, or one too narrow for floats to draw ticks on (e.g. [0, 5e-324]), gets a visible one.
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        hi = lo + (abs(lo) or 1.0)
    step = _nice_step(hi - lo)
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    ticks = [start + i * step for i in range(round((end - start) / step) + 1)]
    return start, end, ticks


def _axis(x: Callable[[float], float], ticks: Sequence[float], top: float, bottom: float, fmt: Format) -> list[str]:
    parts = []
    for tick in ticks:
        px = x(tick)
        parts.append(f'<line class="grid" x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="{GRID}"/>')
        label = escape(fmt(tick))
        parts.append(f'<text class="tick" x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">{label}</text>')
    return parts


def _frame(kind: str, title: str, rows: int, body: list[str]) -> str:
    height = rows * ROW_H + AXIS_H + 8
    width = LABEL_W + PLOT_W + VALUE_W
    return (
        f'<svg class="chart {kind}" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
        + "".join(body)
        + "</svg>"
    )


def bar_chart(title: str, bars: Sequence[Bar], fmt: Format) -> str:
    """One horizontal bar per row, from zero (negative values to the left of it)."""
    values = _finite([b.value for b in bars])
    start, end, ticks = _scale(min([0.0, *values]), max([0.0, *values]))

    def x(value: float) -> float:
        return LABEL_W + (value - start) / (end - start) * PLOT_W

    body = _axis(x, ticks, 4, len(bars) * ROW_H + 4, fmt)
    for i, bar in enumerate(bars):
        y = 4 + i * ROW_H
        value = bar.value if math.isfinite(bar.value) else 0.0
        left, right = sorted((x(0.0), x(value)))
        colour = HIGHLIGHT if bar.highlight else BAR
        body.append(
            f'<g class="row" data-label="{escape(bar.label)}" data-value="{bar.value!r}">'
            f'<text class="label" x="{LABEL_W - 8}" y="{y + 17}" text-anchor="end">{escape(bar.label)}</text>'
            f'<rect class="bar" x="{left:.1f}" y="{y + 5}" width="{max(right - left, 1.0):.1f}" height="{ROW_H - 10}" '
            f'fill="{colour}"/>'
            f'<text class="value" x="{LABEL_W + PLOT_W + 8}" y="{y + 17}">{escape(fmt(bar.value))}</text></g>'
        )
    return _frame("bars", title, len(bars), body)


def interval_chart(title: str, rows: Sequence[Interval], fmt: Format, zero_line: bool = False) -> str:
    """A point per row with its 95% interval as a whisker; `zero_line` marks "no difference"."""
    values = _finite([v for r in rows for v in (r.value, r.low, r.high)])
    extent = [*values, 0.0] if zero_line else values
    start, end, ticks = _scale(min(extent), max(extent))

    def x(value: float) -> float:
        return LABEL_W + (value - start) / (end - start) * PLOT_W

    bottom = len(rows) * ROW_H + 4
    body = _axis(x, ticks, 4, bottom, fmt)
    if zero_line:
        body.append(f'<line class="zero" x1="{x(0):.1f}" y1="4" x2="{x(0):.1f}" y2="{bottom}" stroke="#1c2430"/>')
    for i, row in enumerate(rows):
        y = 4 + i * ROW_H + ROW_H / 2
        colour = HIGHLIGHT if row.highlight else BAR
        marks = []
        if row.low is not None and row.high is not None and math.isfinite(row.low) and math.isfinite(row.high):
            marks.append(
                f'<line class="ci" x1="{x(row.low):.1f}" y1="{y:.1f}" x2="{x(row.high):.1f}" y2="{y:.1f}" '
                f'stroke="{colour}" stroke-width="3"/>'
            )
            interval = f" ({fmt(row.low)} … {fmt(row.high)})"
        else:
            interval = ""
        if math.isfinite(row.value):
            marks.append(f'<circle class="point" cx="{x(row.value):.1f}" cy="{y:.1f}" r="5" fill="{colour}"/>')
        body.append(
            f'<g class="row" data-label="{escape(row.label)}" data-value="{row.value!r}" data-low="{row.low!r}" '
            f'data-high="{row.high!r}">'
            f'<text class="label" x="{LABEL_W - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(row.label)}</text>'
            + "".join(marks)
            + f'<text class="value" x="{LABEL_W + PLOT_W + 8}" y="{y + 4:.1f}">{escape(fmt(row.value) + interval)}'
            "</text></g>"
        )
    return _frame("intervals", title, len(rows), body)


def _diverging(value: float, clip: float) -> str:
    """Blue below zero, orange above, white at zero (a colour-blind-safe pair)."""
    t = max(-1.0, min(1.0, value / clip)) if math.isfinite(value) else 0.0
    target = (29, 78, 216) if t < 0 else (194, 65, 12)
    r, g, b = (round(255 + (c - 255) * abs(t)) for c in target)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(
    title: str, rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float]], clip: float
) -> str:
    """Rows × columns of cells coloured by value (clipped at ±clip), the value printed in each cell."""
    cell_w, cell_h, label_w, head_h = 46, 24, 170, 120
    width = label_w + cell_w * len(columns) + 8
    height = head_h + cell_h * len(rows) + 8
    body = []
    for j, column in enumerate(columns):
        cx = label_w + j * cell_w + cell_w / 2
        body.append(
            f'<text class="column" transform="translate({cx:.1f},{head_h - 6}) rotate(-55)">{escape(column)}</text>'
        )
    for i, row in enumerate(rows):
        y = head_h + i * cell_h
        body.append(f'<text class="label" x="{label_w - 8}" y="{y + 16}" text-anchor="end">{escape(row)}</text>')
        for j, column in enumerate(columns):
            value = values[i][j]
            x = label_w + j * cell_w
            body.append(
                f'<g class="cell" data-row="{escape(row)}" data-column="{escape(column)}" data-value="{value!r}">'
                f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{_diverging(value, clip)}"/>'
                f'<text x="{x + cell_w / 2 - 1:.1f}" y="{y + 15}" text-anchor="middle">{value:+.1f}</text></g>'
            )
    return (
        f'<svg class="chart heatmap" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
        + "".join(body)
        + "</svg>"
    )
