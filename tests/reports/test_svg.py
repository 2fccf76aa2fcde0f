"""The hand-written SVG charts: well-formed, escaped, and drawn to one scale (a bar's length and a point's place
follow the number, whatever the numbers are)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st

from services.reports.pages import Report, document
from services.reports.svg import Bar, Interval, bar_chart, heatmap, interval_chart

SVG = "{http://www.w3.org/2000/svg}"
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def rows(svg: str) -> list[ET.Element]:
    return ET.fromstring(svg).findall(f"{SVG}g")


@given(st.lists(finite, min_size=1, max_size=12))
def test_bars_are_as_long_as_their_values(values: list[float]) -> None:
    svg = bar_chart("t", [Bar(f"b{i}", v) for i, v in enumerate(values)], str)
    widths = [float(row.find(f"{SVG}rect").get("width")) for row in rows(svg)]  # type: ignore[union-attr]
    for a, wa in zip(values, widths, strict=True):
        for b, wb in zip(values, widths, strict=True):
            if abs(a) > abs(b) and wa > 1.0:  # bars under a pixel are drawn one pixel wide
                assert wa >= wb - 1e-6


@given(st.lists(st.tuples(finite, finite, finite), min_size=1, max_size=8), st.booleans())
def test_points_sit_inside_their_intervals(triples: list[tuple[float, float, float]], zero: bool) -> None:
    data = [sorted(t) for t in triples]
    svg = interval_chart("t", [Interval(str(i), mid, low, high) for i, (low, mid, high) in enumerate(data)], str, zero)
    for row in rows(svg):
        line, point = row.find(f"{SVG}line"), row.find(f"{SVG}circle")
        assert line is not None and point is not None
        x1, x2, cx = float(line.get("x1", 0)), float(line.get("x2", 0)), float(point.get("cx", 0))
        assert x1 - 0.1 <= cx <= x2 + 0.1


def test_labels_are_text_never_markup() -> None:
    hostile = '<script>alert(1)</script>"&'
    for svg in (
        bar_chart(hostile, [Bar(hostile, 1.0)], lambda v: hostile),
        interval_chart(hostile, [Interval(hostile, 1.0, 0.5, 1.5)], lambda v: hostile),
        heatmap(hostile, [hostile], [hostile], [[1.0]], clip=2.0),
    ):
        root = ET.fromstring(svg)  # well-formed: nothing broke out of an attribute or a text node
        assert not root.findall(f".//{SVG}script") and "<script>" not in svg
        assert any(hostile == (node.text or "") for node in root.iter())
    page = document(Report("x", "ranking", hostile, "2026-01-01T00:00:00", hostile, "<p>ok</p>"))
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_heatmap_colours_say_the_sign() -> None:
    svg = heatmap("t", ["a"], ["low", "zero", "high"], [[-3.0, 0.0, 3.0]], clip=2.0)
    fills = [cell.find(f"{SVG}rect").get("fill") for cell in rows(svg)]  # type: ignore[union-attr]
    assert fills == ["#1d4ed8", "#ffffff", "#c2410c"]  # clipped blue, white, clipped orange
