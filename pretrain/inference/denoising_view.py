"""Pictures of the reverse process: one sample's text with every generated token coloured by the
denoising step that revealed it, as Table 4 of the LLaDA paper shows it.

The sampler records the step of each reveal (`Sample.reveal_step`); this module turns a prompt,
its answer and those steps into a self-contained HTML page or a PNG (pillow's ImageDraw with its
default font). The prompt is shown plain; generated tokens go from light (revealed early) to
dark (revealed late) along a viridis-like scale, with a legend. `pretrain.generate` writes them
for its first prompt (`--denoising-html FILE`, `--denoising-png FILE`).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pretrain.checkpoint.atomic import atomic_file, atomic_write

# Early (light yellow) to late (dark purple): viridis, reversed.
PALETTE = ((253, 231, 37), (122, 209, 81), (34, 168, 132), (42, 120, 142), (65, 68, 135), (68, 1, 84))
FONT_SIZE = 16
LINE_HEIGHT = 24
TOKEN_GAP = 2  # white pixels between two generated tokens, so their boundaries show
MARGIN = 20


@dataclass
class DenoisingView:
    """prompt: the prompt's text; pieces: (text, step) for the generated tokens in order (a
    multi-byte character split over tokens is one piece, at its last reveal); steps: the
    steps the sample ran."""
    prompt: str
    pieces: list[tuple[str, int]]
    steps: int

    @classmethod
    def of(cls, tokenizer, prompt_ids: list[int], answer_ids: list[int], reveal_steps: list[int],
           steps: int) -> "DenoisingView":
        """From token ids: the prompt decoded without special tokens, each answer token alone."""
        if len(reveal_steps) != len(answer_ids):
            raise ValueError(f"reveal_steps has {len(reveal_steps)} entries for {len(answer_ids)} answer tokens")
        pieces, pending = [], []
        for token, step in zip(answer_ids, reveal_steps):
            pending.append((token, step))
            text = tokenizer.decode([t for t, _ in pending])
            if not text.endswith("\ufffd") or len(pending) == 4:  # a UTF-8 character spans <= 4 bytes
                pieces.append((text, max(s for _, s in pending)))
                pending = []
        if pending:
            pieces.append((tokenizer.decode([t for t, _ in pending]), max(s for _, s in pending)))
        return cls(tokenizer.decode(prompt_ids, skip_special_tokens=True), pieces, steps)


def step_colour(step: int, steps: int) -> tuple[int, int, int]:
    """The background of a token revealed at `step` of `steps` (0 .. steps-1): light to dark."""
    t = min(max(step, 0) / max(steps - 1, 1), 1.0) * (len(PALETTE) - 1)
    low = min(int(t), len(PALETTE) - 2)
    f = t - low
    return tuple(round(a + (b - a) * f) for a, b in zip(PALETTE[low], PALETTE[low + 1]))


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _hex(colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % colour


def _caption(view: DenoisingView) -> str:
    return (f"{len(view.pieces)} generated tokens revealed over {view.steps} steps; each is coloured "
            f"by the step that revealed it (lighter = earlier, darker = later); the prompt is plain")


def to_html(view: DenoisingView, title: str = "LLaDA denoising") -> str:
    """A self-contained page (inline CSS, no scripts); hovering a token shows its step."""
    spans = []
    for text, step in view.pieces:
        background = step_colour(step, view.steps)
        shown = html.escape(text).replace("\n", "\u21b5\n")  # a generated newline stays visible
        spans.append(f'<span class="t" style="background:{_hex(background)};color:{_hex(text_colour(background))}"'
                     f' title="step {step}">{shown}</span>')
    stops = ", ".join(_hex(step_colour(s, 11)) for s in range(11))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
.text {{ font-family: monospace; font-size: 15px; white-space: pre-wrap; line-height: 1.7; }}
.prompt {{ color: #444; }}
.t {{ border-radius: 2px; }}
.legend {{ display: flex; align-items: center; gap: 0.6em; margin-top: 1.5em; font-size: 13px; }}
.bar {{ width: 16em; height: 1em; background: linear-gradient(to right, {stops}); }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<p>{html.escape(_caption(view))}.</p>
<div class="text"><span class="prompt">{html.escape(view.prompt)}</span>{"".join(spans)}</div>
<div class="legend"><span>step 0</span><span class="bar"></span><span>step {max(view.steps - 1, 0)}</span></div>
</body></html>
"""


def _runs(view: DenoisingView):
    """(text, background or None for the prompt) in order; a line break is ("\n", None), and a
    generated newline is also drawn as the two characters \\n on its token's colour (the default
    font has no return sign)."""
    for number, line in enumerate(view.prompt.replace("\t", "    ").split("\n")):
        if number:
            yield "\n", None
        yield line, None
    for text, step in view.pieces:
        background = step_colour(step, view.steps)
        for number, line in enumerate(text.replace("\t", "    ").split("\n")):
            if number:
                yield "\\n", background
                yield "\n", None
            if line:
                yield line, background


def to_image(view: DenoisingView, width: int = 900) -> Image.Image:
    """The text wrapped to `width` pixels, generated tokens on their step's colour, a legend."""
    font = ImageFont.load_default(size=FONT_SIZE)
    small = ImageFont.load_default(size=13)
    placed, x, y = [], MARGIN, MARGIN + 2 * LINE_HEIGHT
    for text, background in _runs(view):
        if text == "\n":
            x, y = MARGIN, y + LINE_HEIGHT
            continue
        for word in [text] if background is not None else _words(text):
            size = font.getlength(word)
            if x + size > width - MARGIN and x > MARGIN:
                x, y = MARGIN, y + LINE_HEIGHT
                if background is None:
                    word = word.lstrip(" ")
                    size = font.getlength(word)
            placed.append((x, y, word, background, size))
            x += size if background is None else size + TOKEN_GAP
    height = y + LINE_HEIGHT + 3 * LINE_HEIGHT + MARGIN
    image = Image.new("RGB", (width, int(height)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), _caption(view), fill=(60, 60, 60), font=small)
    for x, y, word, background, size in placed:
        if background is None:
            draw.text((x, y), word, fill=(70, 70, 70), font=font)
        else:
            draw.rectangle((x, y - 2, x + size, y + LINE_HEIGHT - 4), fill=background)
            draw.text((x, y), word, fill=text_colour(background), font=font)
    legend_y = y + 2 * LINE_HEIGHT
    draw.text((MARGIN, legend_y), "step 0", fill=(60, 60, 60), font=small)
    bar_x, bar_width = MARGIN + 60, 300
    for offset in range(bar_width):
        colour = step_colour(offset, bar_width)
        draw.line((bar_x + offset, legend_y, bar_x + offset, legend_y + 14), fill=colour)
    draw.text((bar_x + bar_width + 10, legend_y), f"step {max(view.steps - 1, 0)}", fill=(60, 60, 60), font=small)
    return image


def _words(text: str) -> list[str]:
    """Plain text split before each space run, so lines wrap between words."""
    words, current = [], ""
    for char in text:
        if char == " " and current and not current.endswith(" "):
            words.append(current)
            current = ""
        current += char
    return words + [current] if current else words


def write_html(view: DenoisingView, path: str | os.PathLike) -> Path:
    return atomic_write(path, to_html(view).encode("utf-8"))


def write_png(view: DenoisingView, path: str | os.PathLike) -> Path:
    image = to_image(view)
    with atomic_file(path) as f:
        image.save(f, format="PNG", optimize=True)
    return Path(path)
