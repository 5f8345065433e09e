"""The denoising pictures: tokens coloured by the step that revealed them.

- The colour scale runs from light to dark as the step grows, with readable text on each.
- Token pieces: one per generated token, a character split over byte tokens kept whole (at its
  last reveal), the prompt decoded plain.
- HTML: self-contained, one span per piece with its step and colour, markup escaped, a legend.
- PNG: the first and the last step's colours are both drawn, the prompt is not coloured, and
  the file is written atomically where asked.
"""

import pytest
from PIL import Image
from support.tiny_checkpoints import stdlib_tokenizer

from pretrain.inference.denoising_view import (
    DenoisingView,
    step_colour,
    text_colour,
    to_html,
    to_image,
    write_html,
    write_png,
)


def luminance(colour):
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b


def test_later_steps_are_darker_and_text_stays_readable():
    colours = [step_colour(step, 20) for step in range(20)]
    assert all(luminance(a) > luminance(b) for a, b in zip(colours, colours[1:]))
    assert text_colour(colours[0]) == (0, 0, 0) and text_colour(colours[-1]) == (255, 255, 255)
    assert step_colour(0, 1) == colours[0] and step_colour(99, 20) == colours[-1]  # clamped


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return stdlib_tokenizer(tmp_path_factory.mktemp("view") / "tokenizer.json")


def test_pieces_follow_tokens_and_keep_characters_whole(tok):
    prompt = tok.encode("def load(s):")
    answer = tok.encode(" return é<b>\n")
    split = [i for i, t in enumerate(answer) if "\ufffd" in tok.decode([t])]
    assert split, "premise: é is split over byte tokens"
    steps = list(range(len(answer)))[::-1]
    view = DenoisingView.of(tok, prompt, answer, steps, steps=len(answer))
    assert view.prompt == "def load(s):"
    assert "".join(text for text, _ in view.pieces) == " return é<b>\n"
    assert len(view.pieces) == len(answer) - (len(split) - 1)
    whole = next(step for text, step in view.pieces if "é" in text)
    assert whole == max(steps[i] for i in split)  # the character shows when its last byte did
    with pytest.raises(ValueError, match="reveal_steps has 1 entries for"):
        DenoisingView.of(tok, prompt, answer, [0], steps=1)


def test_html_has_one_coloured_span_per_piece(tok, tmp_path):
    view = DenoisingView("x < y", [(" a", 0), ("<b>", 3), (" c", 1)], steps=4)
    page = to_html(view)
    assert page.count('<span class="t"') == 3 and 'title="step 3"' in page
    assert "&lt;b&gt;" in page and "<b>" not in page and "x &lt; y" in page
    assert "#%02x%02x%02x" % step_colour(3, 4) in page and "step 3</span>" in page  # token and legend
    assert "<script" not in page and "http" not in page  # self-contained
    path = write_html(view, tmp_path / "d.html")
    assert path.read_text(encoding="utf-8") == page and not list(tmp_path.glob(".*tmp*"))


def test_png_draws_the_step_colours_and_a_plain_prompt(tmp_path):
    view = DenoisingView("copy: red sun =", [(" red", 0), (" sun", 5), (";", 9), ("\n", 9)], steps=10)
    image = to_image(view)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert step_colour(0, 10) in colours and step_colour(9, 10) in colours
    plain = DenoisingView("copy: red sun =", [], steps=10)
    top = to_image(plain).crop((0, 60, 900, 92))  # the prompt's line: no step colour on it
    assert step_colour(0, 10) not in {c for _, c in top.getcolors(maxcolors=1 << 20)}
    path = write_png(view, tmp_path / "d.png")
    with Image.open(path) as loaded:
        assert loaded.size == image.size and loaded.format == "PNG"
