"""report.png: before/after bars per metric with 95% interval whiskers, drawn with Pillow.

Why not matplotlib: importing it costs about a second on every purify, longer than a GPU run's whole
tuning, for one small chart. Pillow is already a dependency (image folders, trigger images), draws this
in milliseconds and needs no optional extra, so every purify writes its chart.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 24, 72, 56
BACKGROUND, AXIS, GRID, TEXT = "white", "#333333", "#e6e6e6", "#222222"


@dataclass(frozen=True)
class Bar:
    """One bar: a percentage and its 95% interval, in percent."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    bars: list[Bar]  # one per group, in the chart's group order


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def bar_chart_png(title: str, groups: list[str], series: list[Series], y_max: float = 105.0) -> bytes:
    """A grouped bar chart (values in percent, 0..y_max) with interval whiskers, as PNG bytes."""
    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    small, large = _font(13), _font(16)
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    def y_of(percent: float) -> float:
        return bottom - (min(max(percent, 0.0), y_max) / y_max) * (bottom - top)

    for tick in range(0, int(y_max) + 1, 20):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 8, y), f"{tick}", fill=TEXT, font=small, anchor="rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS, width=2)
    draw.text((14, (top + bottom) / 2), "%", fill=TEXT, font=small, anchor="lm")
    draw.text((WIDTH / 2, 18), title, fill=TEXT, font=large, anchor="mt")

    group_width = (right - left) / max(len(groups), 1)
    bar_width = group_width * 0.76 / max(len(series), 1)
    for g, name in enumerate(groups):
        center = left + group_width * (g + 0.5)
        draw.text((center, bottom + 10), name, fill=TEXT, font=small, anchor="mt")
        for s, line in enumerate(series):
            bar = line.bars[g]
            x0 = center + (s - len(series) / 2) * bar_width
            if y_of(bar.value) < bottom - 1:  # a 0% bar has no height to draw
                draw.rectangle([(x0 + 2, y_of(bar.value)), (x0 + bar_width - 2, bottom - 1)], fill=line.color)
            mid = x0 + bar_width / 2
            draw.line([(mid, y_of(bar.low)), (mid, y_of(bar.high))], fill=AXIS, width=2)
            for y in (y_of(bar.low), y_of(bar.high)):
                draw.line([(mid - 5, y), (mid + 5, y)], fill=AXIS, width=2)
            draw.text((mid, y_of(bar.high) - 4), f"{bar.value:.1f}", fill=TEXT, font=small, anchor="mb")

    x = WIDTH / 2 - 60 * len(series)
    for line in series:  # the legend, one row under the title, clear of the bars
        draw.rectangle([(x, 42), (x + 14, 56)], fill=line.color)
        draw.text((x + 20, 49), line.label, fill=TEXT, font=small, anchor="lm")
        x += 120
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
