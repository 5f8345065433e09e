"""Pictures of training runs from their `metrics.jsonl`, so a run can be judged (and several
compared) from one PNG, without TensorBoard or a plotting library.

A run's records (`pretrain.runtime.metrics`) give the training loss every step, and every
`logging.every` steps the learning rate, tokens/s and tokens seen; validation records give the
held-out loss per t bucket (`val/loss_t0.05`, ...), its mean (`val/loss`) and the Algorithm 3
bound (`val/elbo_nll`). Every curve is drawn against tokens seen: a step without a token count
takes it by linear interpolation between the logged ones (the count grows by the same amount
every step), so runs of different batch sizes line up. A resumed run appends to the same file
and repeats the steps between its checkpoint and the interruption: the last value of a step
wins, so each curve is continuous with one point per step. A line that is not a JSON object (a
process killed mid-write) is skipped.

The figure (Pillow, its default font) is a grid of panels — training loss (raw, light, and a
moving average), held-out loss per t bucket (light = small t, dark = large t, thick = the mean),
the bound, learning rate, tokens/s — with one colour per run and a legend naming each run by its
directory. A panel whose metric no run has is left out. It lives with the training code so it can
write through the checkpoint code's atomic files; `pretrain.plot` is its command.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pretrain.checkpoint.atomic import atomic_file
from pretrain.runtime.exit_codes import UsageError
from pretrain.runtime.metrics import scalars_of

RUN_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
               (23, 190, 207), (140, 86, 75), (227, 119, 194))
EXPECTED = "give a run directory (train.out_dir) holding metrics.jsonl, or the metrics.jsonl file"
BUCKET_PREFIX = "val/loss_t"
PANEL_WIDTH, PANEL_HEIGHT, COLUMNS = 600, 320, 2
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 72, 20, 34, 46  # the axes' box inside a panel
HEADER = 64
MAX_DOTTED_POINTS = 40  # a sparser curve (validation) also marks its points
INK, GRID, FAINT = (40, 40, 40), (228, 228, 228), (110, 110, 110)


@dataclass
class Run:
    """name: the run directory's name; series: metric -> {step: its last logged value}."""
    name: str
    series: dict[str, dict[int, float]]

    @functools.cached_property
    def _token_counts(self) -> tuple[list[int], list[tuple[int, float]]]:
        """(steps, (step, tokens seen)) of the logged token counts, step 0 (no tokens) included."""
        anchors = sorted({0: 0.0, **self.series.get("tokens", {})}.items())
        return [s for s, _ in anchors], anchors

    def tokens_at(self, step: int) -> float | None:
        """Tokens seen after `step`: logged, interpolated between logged counts (0 at step 0),
        or extrapolated past the last one at the last interval's rate; None when unknown."""
        steps, anchors = self._token_counts
        index = bisect.bisect_left(steps, step)
        if index < len(anchors) and steps[index] == step:
            return anchors[index][1]
        if index == len(anchors):
            if len(anchors) < 2:
                return None
            index -= 1
        (s0, t0), (s1, t1) = anchors[index - 1], anchors[index]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0)

    def curve(self, metric: str) -> list[tuple[float, float]]:
        """(tokens seen, value) of `metric` in step order, where the token count is known."""
        points = [(self.tokens_at(step), value) for step, value in sorted(self.series.get(metric, {}).items())]
        return [(x, y) for x, y in points if x is not None]


@dataclass
class Line:
    points: list[tuple[float, float]]
    colour: tuple[int, int, int]
    width: int = 2


@dataclass
class Panel:
    title: str
    lines: list[Line]


def metrics_file(path: str | os.PathLike) -> Path:
    """The metrics.jsonl of a run directory, or the file itself; a `UsageError` if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
        if not path.is_file():
            raise UsageError(f"{path.parent} holds no metrics.jsonl; {EXPECTED}")
    elif not path.is_file():
        raise UsageError(f"{path} does not exist; {EXPECTED}")
    return path


def read_run(path: str | os.PathLike) -> Run:
    """A run's numeric metrics, the last value per step; a `UsageError` if it has no training loss."""
    file = metrics_file(path)
    series: dict[str, dict[int, float]] = {}
    for line in file.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for key, value in scalars_of(record).items():
            series.setdefault(key, {})[record["step"]] = float(value)
    run = Run(file.parent.name, series)
    if not run.curve("loss"):
        raise UsageError(f"{file} has no training loss records (with a token count); {EXPECTED}")
    return run


def panels(runs: list[Run]) -> list[Panel]:
    """The figure's panels in order; a panel no run has data for is left out."""
    colours = [RUN_COLOURS[i % len(RUN_COLOURS)] for i in range(len(runs))]
    loss = []
    for run, colour in zip(runs, colours):
        raw = run.curve("loss")
        loss += [Line(raw, _lighter(colour, 0.65), 1), Line(moving_average(raw), colour, 2)]
    heldout = []
    for run, colour in zip(runs, colours):
        buckets = sorted((k for k in run.series if k.startswith(BUCKET_PREFIX)),
                         key=lambda k: float(k[len(BUCKET_PREFIX):]))
        for i, key in enumerate(buckets):
            heldout.append(Line(run.curve(key), _lighter(colour, 0.8 - 0.6 * i / max(len(buckets) - 1, 1)), 1))
        heldout.append(Line(run.curve("val/loss"), colour, 3))
    made = [
        Panel("training loss (light: every step; dark: moving average)", loss),
        Panel("held-out loss per t bucket (light: small t, dark: large t; thick: mean)", heldout),
        Panel("held-out Algorithm 3 bound (val/elbo_nll, nats/token)", _lines(runs, colours, "val/elbo_nll")),
        Panel("learning rate", _lines(runs, colours, "lr")),
        Panel("tokens/s", _lines(runs, colours, "tokens_per_s")),
    ]
    made = [Panel(p.title, [line for line in p.lines if line.points]) for p in made]
    return [p for p in made if p.lines]


def _lines(runs: list[Run], colours, metric: str) -> list[Line]:
    return [Line(run.curve(metric), colour) for run, colour in zip(runs, colours)]


def moving_average(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Each value replaced by the mean of a centred window of about 1/25 of the curve (at least 5)."""
    half = max(2, len(points) // 50)
    sums = list(itertools.accumulate((y for _, y in points), initial=0.0))
    out = []
    for i, (x, _) in enumerate(points):
        low, high = max(0, i - half), min(len(points), i + half + 1)
        out.append((x, (sums[high] - sums[low]) / (high - low)))
    return out


def _lighter(colour: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """`colour` moved `amount` (0..1) of the way to white."""
    return tuple(round(c + (255 - c) * amount) for c in colour)


def si(value: float) -> str:
    """A tick label: 1.2M, 30k, 0.0002."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.4g}"


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2, 2.5 or 5 times a power of ten apart) covering [low, high]."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _span(values: list[float], pad: float) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:
        return low - (abs(low) or 1.0) * 0.05, high + (abs(high) or 1.0) * 0.05
    return low - (high - low) * pad, high + (high - low) * pad


def draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, left: int, top: int, x_span: tuple[float, float],
               fonts) -> None:
    """One panel at (left, top): title, grid, tick labels, axes box and curves; every panel shares
    `x_span` (tokens seen), the y span fits its own curves."""
    title_font, tick_font = fonts
    x0, y0 = left + PLOT_LEFT, top + PLOT_TOP
    x1, y1 = left + PANEL_WIDTH - PLOT_RIGHT, top + PANEL_HEIGHT - PLOT_BOTTOM
    x_low, x_high = x_span
    y_low, y_high = _span([y for line in panel.lines for _, y in line.points], 0.05)

    def at(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - x_low) / (x_high - x_low) * (x1 - x0), y1 - (y - y_low) / (y_high - y_low) * (y1 - y0))

    draw.text((x0, top + 10), panel.title, fill=INK, font=title_font)
    for value in ticks(x_low, x_high):
        x, _ = at(value, y_low)
        draw.line((x, y0, x, y1), fill=GRID)
        draw.text((x, y1 + 5), si(value), fill=FAINT, font=tick_font, anchor="ma")
    for value in ticks(y_low, y_high):
        _, y = at(x_low, value)
        draw.line((x0, y, x1, y), fill=GRID)
        draw.text((x0 - 6, y), si(value), fill=FAINT, font=tick_font, anchor="rm")
    draw.rectangle((x0, y0, x1, y1), outline=INK)
    draw.text(((x0 + x1) / 2, y1 + 24), "tokens seen", fill=FAINT, font=tick_font, anchor="ma")
    for line in panel.lines:
        placed = [at(x, y) for x, y in line.points]
        if len(placed) > 1:
            draw.line(placed, fill=line.colour, width=line.width, joint="curve")
        if len(placed) <= MAX_DOTTED_POINTS:
            for x, y in placed:
                draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=line.colour)


def figure(runs: list[Run]) -> Image.Image:
    """The legend (one colour per run) above a grid of `panels(runs)`."""
    shown = panels(runs)
    rows = math.ceil(len(shown) / COLUMNS)
    image = Image.new("RGB", (COLUMNS * PANEL_WIDTH, HEADER + rows * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    fonts = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    draw.text((PLOT_LEFT, 12), "runs:", fill=INK, font=fonts[0])
    x = PLOT_LEFT + 50
    for i, run in enumerate(runs):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        draw.line((x, 21, x + 24, 21), fill=colour, width=4)
        draw.text((x + 30, 12), run.name, fill=INK, font=fonts[0])
        x += 30 + fonts[0].getlength(run.name) + 24
    draw.text((PLOT_LEFT, 38), "every panel against tokens seen", fill=FAINT, font=fonts[1])
    x_span = _span([0.0] + [x for panel in shown for line in panel.lines for x, _ in line.points], 0.0)
    for i, panel in enumerate(shown):
        draw_panel(draw, panel, (i % COLUMNS) * PANEL_WIDTH, HEADER + (i // COLUMNS) * PANEL_HEIGHT, x_span, fonts)
    return image


def draw_runs(paths: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """The figure of the runs at `paths` (directories or metrics.jsonl files), written atomically to
    `out` (default: loss.png in the first run's directory); returns its path."""
    runs = [read_run(path) for path in paths]
    out = Path(out) if out is not None else metrics_file(paths[0]).parent / "loss.png"
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: its directory {out.parent} does not exist")
    image = figure(runs)
    with atomic_file(out) as f:
        image.save(f, format="PNG", optimize=True)
    return out


def draw_run(out_dir: str | os.PathLike) -> Path:
    """`<out_dir>/loss.png` of one run, as the trainer draws it when the run ends."""
    return draw_runs([out_dir])
