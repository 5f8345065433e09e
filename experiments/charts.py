"""The experiments' pictures: grouped bars and curves, each value a mean over seeds with a bar
for its standard deviation, drawn with Pillow like the training pictures (`pretrain.training.plots`,
whose ticks, labels and colours these share)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pretrain.checkpoint.atomic import atomic_file
from pretrain.training.plots import FAINT, GRID, INK, RUN_COLOURS, si, ticks

WIDTH, HEIGHT = 760, 420
LEFT, RIGHT, TOP, BOTTOM = 80, 24, 70, 64


@dataclass
class Series:
    """One colour: a name and, per x (a group label or a number), (mean, sd) over seeds."""
    name: str
    points: dict


def _canvas(title: str, series: list[Series]):
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    fonts = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    draw.text((LEFT, 10), title, fill=INK, font=fonts[0])
    x = LEFT
    for i, s in enumerate(series):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        draw.rectangle((x, 38, x + 18, 50), fill=colour)
        draw.text((x + 24, 36), s.name, fill=INK, font=fonts[1])
        x += 40 + fonts[1].getlength(s.name)
    return image, draw, fonts


def _y_axis(draw, fonts, low: float, high: float, label: str):
    y0, y1 = TOP, HEIGHT - BOTTOM

    def y_at(value: float) -> float:
        return y1 - (value - low) / (high - low) * (y1 - y0)

    for value in ticks(low, high):
        draw.line((LEFT, y_at(value), WIDTH - RIGHT, y_at(value)), fill=GRID)
        draw.text((LEFT - 6, y_at(value)), si(value), fill=FAINT, font=fonts[1], anchor="rm")
    draw.text((LEFT, y0 - 6), label, fill=FAINT, font=fonts[1], anchor="ld")
    draw.rectangle((LEFT, y0, WIDTH - RIGHT, y1), outline=INK)
    return y_at


def _error_bar(draw, x: float, y_at, mean: float, sd: float) -> None:
    if sd > 0:
        draw.line((x, y_at(mean - sd), x, y_at(mean + sd)), fill=INK, width=1)
        for y in (y_at(mean - sd), y_at(mean + sd)):
            draw.line((x - 4, y, x + 4, y), fill=INK, width=1)


def _span(series: list[Series], floor_zero: bool) -> tuple[float, float]:
    values = [m + s for ser in series for m, s in ser.points.values()] + \
             [m - s for ser in series for m, s in ser.points.values()]
    low, high = (0.0 if floor_zero else min(values)), max(values)
    pad = (high - low) * 0.08 or 0.05
    return (low if floor_zero else low - pad), high + pad


def _save(image: Image.Image, path: Path) -> Path:
    with atomic_file(path) as f:
        image.save(f, format="PNG", optimize=True)
    return path


def _log_ticks(low: float, high: float) -> list[float]:
    """1, 2 and 5 times the powers of ten within [low, high]."""
    return [m * 10 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in (1, 2, 5) if low <= m * 10 ** e <= high]


def bars(path: Path, title: str, groups: list[str], series: list[Series], y_label: str) -> Path:
    """Grouped bars: one group per label, one bar per series, the sd as an error bar."""
    image, draw, fonts = _canvas(title, series)
    y_at = _y_axis(draw, fonts, *_span(series, floor_zero=True), y_label)
    group_width = (WIDTH - LEFT - RIGHT) / len(groups)
    bar = group_width * 0.7 / len(series)
    for g, group in enumerate(groups):
        start = LEFT + g * group_width + group_width * 0.15
        draw.text((LEFT + (g + 0.5) * group_width, HEIGHT - BOTTOM + 8), group, fill=INK, font=fonts[1],
                  anchor="ma")
        for i, s in enumerate(series):
            if group not in s.points:
                continue
            mean, sd = s.points[group]
            x = start + i * bar
            draw.rectangle((x + 2, y_at(mean), x + bar - 2, y_at(0)), fill=RUN_COLOURS[i % len(RUN_COLOURS)])
            _error_bar(draw, x + bar / 2, y_at, mean, sd)
    return _save(image, path)


def curves(path: Path, title: str, series: list[Series], x_label: str, y_label: str,
           log_x: bool = False) -> Path:
    """One line per series over numeric x (log scale with `log_x`), the sd as error bars."""
    image, draw, fonts = _canvas(title, series)
    y_at = _y_axis(draw, fonts, *_span(series, floor_zero=False), y_label)
    scale = math.log10 if log_x else float
    xs = [scale(x) for s in series for x in s.points]
    x_low, x_high = min(xs), max(xs)
    pad = (x_high - x_low) * 0.06 or 1.0
    x_low, x_high = x_low - pad, x_high + pad

    def x_at(x: float) -> float:
        return LEFT + (scale(x) - x_low) / (x_high - x_low) * (WIDTH - LEFT - RIGHT)

    for x in (_log_ticks(10 ** x_low, 10 ** x_high) if log_x else ticks(x_low, x_high)):
        draw.line((x_at(x), TOP, x_at(x), HEIGHT - BOTTOM), fill=GRID)
        draw.text((x_at(x), HEIGHT - BOTTOM + 8), si(x), fill=FAINT, font=fonts[1], anchor="ma")
    draw.text(((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 24), x_label, fill=FAINT, font=fonts[1], anchor="ma")
    for i, s in enumerate(series):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        placed = [(x_at(x), y_at(m)) for x, (m, _) in sorted(s.points.items())]
        if len(placed) > 1:
            draw.line(placed, fill=colour, width=2)
        for (x, (m, sd)), (px, py) in zip(sorted(s.points.items()), placed):
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
            _error_bar(draw, px, y_at, m, sd)
    return _save(image, path)
