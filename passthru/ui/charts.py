"""Bar charts drawn on the server as inline SVG: the geometry here, the markup in templates/ui/chart.html. No script
and no style attribute, so the page's Content-Security-Policy holds; every bar carries its value as text too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

WIDTH = 600.0  # the viewBox; the SVG scales to its box
HEIGHT = 160.0
AXIS = 20.0  # room below the bars for the first and last day


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # the day
    value: str  # its figure as text (each bar's <title>, for screen readers and a pointer's tooltip)


@dataclass(frozen=True)
class Chart:
    title: str
    bars: tuple[Bar, ...]
    top: str  # the largest figure, written at the top of the scale
    first: str  # the first and last labels, under the bars
    last: str
    width: float = WIDTH
    height: float = HEIGHT
    base: float = HEIGHT - AXIS  # where the bars stand


def bar_chart(title: str, points: Sequence[tuple[str, float]], shown: Callable[[float], str]) -> Chart:
    """One bar per point (label, figure), scaled to the largest figure; figures shown as `shown` writes them."""
    most = max((value for _, value in points), default=0.0)
    base = HEIGHT - AXIS
    step = WIDTH / max(1, len(points))
    gap = min(2.0, step / 4)
    bars = []
    for index, (label, value) in enumerate(points):
        height = 0.0 if most <= 0 else (base - 4) * value / most
        bars.append(Bar(round(index * step + gap / 2, 2), round(base - height, 2), round(step - gap, 2),
                        round(height, 2), label, shown(value)))  # fmt: skip
    return Chart(title, tuple(bars), shown(most), points[0][0] if points else "", points[-1][0] if points else "")
