"""Pillow-only figures: layout, colours measured in the drawn pixels, upscaling, atomic saving and
refusing bad input."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from rnp.errors import RnpError
from rnp.io.figures import (ACCENT, BASE, PALETTE, _ticks, bar_chart, histograms, image_grid,
                            line_chart, save_png, side_by_side)

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(image: Image.Image) -> torch.Tensor:
    """The image as an (H, W, 3) uint8 tensor."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(
        image.height, image.width, 3)


def where(image: Image.Image, colour) -> torch.Tensor:
    """(H, W) bool: the pixels of exactly ``colour``."""
    return (pixels(image) == torch.tensor(colour, dtype=torch.uint8)).all(-1)


def bar_heights(image: Image.Image, colour=BASE) -> list[int]:
    """Height in pixels of each bar of ``colour``, left to right (bars are separate column runs)."""
    columns = where(image, colour).sum(0).tolist()
    heights, current = [], 0
    for count in columns + [0]:
        if count:
            current = max(current, count)
        elif current:
            heights.append(current)
            current = 0
    return heights


def test_every_figure_is_an_rgb_image_larger_than_its_plot():
    figures = [bar_chart([0.2, 0.8], ["a", "b"], title="bars"),
               line_chart({"a": [1, 2, 3]}, title="lines", xlabel="step", ylabel="share"),
               histograms({"a": [0.1, 0.5, 0.9]}, title="scores", xlabel="score"),
               image_grid([("x", torch.rand(3, 4, 4))], title="grid")]
    for figure in figures:
        assert figure.mode == "RGB"
    for chart in figures[:3]:
        assert chart.width > 480 and chart.height > 280
        assert chart.getpixel((0, 0)) == (255, 255, 255)


def test_side_by_side_concatenates_and_adds_a_title_band():
    left, right = Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (40, 50), (0, 0, 255))
    plain = side_by_side([left, right])
    assert plain.size == (70, 50) and plain.mode == "RGB"
    assert plain.getpixel((29, 0)) == (255, 0, 0) and plain.getpixel((30, 0)) == (0, 0, 255)
    assert plain.getpixel((0, 20)) == (255, 255, 255)  # below the shorter panel
    titled = side_by_side([left, right], title="both")
    assert titled.width == 70 and titled.height > 50
    assert where(titled, (255, 0, 0)).sum() == 30 * 20
    stacked = side_by_side([left, right, left], columns=2)
    assert stacked.size == (70, 50 + 20)  # rows of two: the third panel starts a second row
    assert stacked.getpixel((0, 50)) == (255, 0, 0) and stacked.getpixel((30, 50)) == (255, 255, 255)


def test_highlighted_bar_is_drawn_in_the_accent_colour():
    values, labels = [0.5, 0.5, 0.5], ["a", "b", "c"]
    plain = bar_chart(values, labels, title="shares")
    assert where(plain, ACCENT).sum() == 0 and len(bar_heights(plain)) == 3
    marked = bar_chart(values, labels, title="shares", highlight=1)
    accent = where(marked, ACCENT).nonzero()[:, 1]
    base = where(marked, BASE).nonzero()[:, 1]
    assert len(bar_heights(marked)) == 2 and len(bar_heights(marked, ACCENT)) == 1
    assert base[base < accent.min()].numel() > 0 and base[base > accent.max()].numel() > 0


def test_bar_heights_follow_the_values():
    image = bar_chart([0, 1], ["short", "tall"], title="t")
    columns = where(image, BASE).sum(0)  # the gap between the two bars is mid-image
    short, tall = columns[: image.width // 2].max(), columns[image.width // 2:].max()
    assert tall > 200 and short <= 1
    quarter = bar_heights(bar_chart([1.0, 0.25], ["a", "b"], title="t"))
    assert quarter[0] / quarter[1] == pytest.approx(4, rel=0.05)


def test_reference_line_is_dashed_and_drawn_over_the_bars():
    plain = bar_chart([0.8, 0.8], ["a", "b"], title="t")
    chance = bar_chart([0.8, 0.8], ["a", "b"], title="t", reference=0.5)
    assert where(chance, BASE).sum() < where(plain, BASE).sum()  # the dashes cross the bars


def test_highlighted_line_is_thick_accent_and_the_others_thin():
    image = line_chart({"target": [0.8] * 10, "other": [0.2] * 10}, title="t", xlabel="step",
                       ylabel="share", highlight="target")
    column = image.width * 2 // 5  # inside the plot, left of the legend
    assert where(image, ACCENT)[:, column].sum() == 4
    others = [c for c in PALETTE if c != ACCENT]
    assert where(image, others[0])[:, column].sum() == 2
    plain = line_chart({"target": [0.8] * 10, "other": [0.2] * 10}, title="t", xlabel="step",
                       ylabel="share")
    assert where(plain, ACCENT).sum() == 0


def test_line_chart_leaves_gaps_at_non_finite_points():
    image = line_chart({"a": [1.0] * 9 + [math.nan] * 12 + [1.0] * 9}, title="t", xlabel="x",
                       ylabel="y")
    drawn = where(image, BASE).any(0).nonzero()[:, 0]
    columns = set(drawn.tolist())
    missing = [c for c in range(drawn.min(), drawn.max()) if c not in columns]
    assert len(missing) > 100  # about 12/29 of the 480-pixel plot is empty


def test_histograms_put_separated_groups_on_their_own_sides_at_equal_density():
    generator = torch.Generator().manual_seed(0)
    image = histograms({"clean": torch.randn(2000, generator=generator),
                        "poisoned": torch.randn(500, generator=generator) + 10},
                       title="scores", xlabel="score", bins=30)
    band = slice(int(image.height * 0.3), int(image.height * 0.7))  # below the legend
    clean = where(image, PALETTE[0])[band].nonzero()[:, 1]
    poisoned = where(image, PALETTE[1])[band].nonzero()[:, 1]
    assert clean.numel() > 0 and poisoned.numel() > 0
    assert clean.max() < poisoned.min()
    rows = [where(image, colour)[:, : image.width * 2 // 3].nonzero()[:, 0] for colour in PALETTE[:2]]
    heights = [int(r.max() - r.min()) for r in rows]
    assert heights[0] / heights[1] == pytest.approx(1, abs=0.25)  # densities, not counts (4:1)


def test_histograms_handle_constant_groups_and_drop_non_finite_values():
    constant = histograms({"all equal": torch.full((50,), 0.5)}, title="t", xlabel="x")
    assert where(constant, PALETTE[0]).sum() > 0
    mixed = histograms({"a": [1.0, 1.0, 1.0], "b": [math.nan, math.inf, -math.inf, 2.0, 3.0]},
                       title="t", xlabel="x", bins=5)
    assert where(mixed, PALETTE[1]).sum() > 0


def test_image_grid_upscales_by_nearest_neighbour():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 255)]
    tile = torch.tensor(colours, dtype=torch.float64).T.reshape(3, 2, 2) / 255
    image = image_grid([("tile", tile)], scale=3)
    corners = []
    for colour in colours:
        found = where(image, colour).nonzero()
        assert len(found) == 9
        (top, left), (bottom, right) = found.min(0).values, found.max(0).values
        assert (bottom - top, right - left) == (2, 2)
        corners.append((int(top), int(left)))
    (y, x) = corners[0]
    assert corners == [(y, x), (y, x + 3), (y + 3, x), (y + 3, x + 3)]


@pytest.mark.parametrize("mask", [torch.full((2, 2), 0.4), torch.full((1, 2, 2), 0.4),
                                  torch.full((2, 2), 102, dtype=torch.uint8)])
def test_image_grid_draws_one_channel_grey(mask):
    image = image_grid([("", mask)], scale=3)
    found = where(image, (102, 102, 102)).nonzero()
    assert len(found) == 36
    assert (found.max(0).values - found.min(0).values).tolist() == [5, 5]


def test_image_grid_lays_out_rows_and_columns():
    tiles = [(str(i), torch.zeros(3, 2, 2)) for i in range(5)]
    wide, narrow = image_grid(tiles, scale=2), image_grid(tiles, scale=2, columns=2)
    assert narrow.width < wide.width and narrow.height > wide.height
    assert where(narrow, (0, 0, 0)).sum() == where(wide, (0, 0, 0)).sum()


def test_save_png_round_trips_and_leaves_no_temporary_file(tmp_path):
    image = bar_chart([0.1, 0.9], ["a", "b"], title="t", highlight=1)
    path = tmp_path / "figures" / "bars.png"
    save_png(image, path)
    with Image.open(path) as loaded:
        assert loaded.format == "PNG" and loaded.mode == "RGB"
        assert loaded.tobytes() == image.tobytes()
    assert [p.name for p in path.parent.iterdir()] == ["bars.png"]


def test_save_png_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "bars.png"
    save_png(Image.new("RGB", (3, 3), (255, 0, 0)), path)
    before = path.read_bytes()

    def half_written(self, target, **kwargs):
        open(target, "wb").write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (3, 3), (0, 0, 255)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bars.png"]


def test_ticks_are_round_numbers_inside_the_range():
    assert [text for _, text in _ticks(0.0, 1.0)] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert [value for value, _ in _ticks(0.0, 19.0, integer=True)] == [0, 5, 10, 15]
    assert [text for _, text in _ticks(-0.013, 0.031)] == ["-0.01", "0.00", "0.01", "0.02", "0.03"]


@pytest.mark.parametrize("draw", [
    lambda: bar_chart([], [], title="t"),
    lambda: bar_chart([0.1, 0.2], ["a"], title="t"),
    lambda: bar_chart([0.1, math.nan], ["a", "b"], title="t"),
    lambda: bar_chart(["x", "y"], ["a", "b"], title="t"),
    lambda: bar_chart([0.1, 0.2], ["a", "b"], title="t", highlight=2),
    lambda: bar_chart([[0.1, 0.2]], ["a"], title="t"),
    lambda: line_chart({}, title="t", xlabel="x", ylabel="y"),
    lambda: line_chart({"a": []}, title="t", xlabel="x", ylabel="y"),
    lambda: line_chart({"a": [1, 2]}, title="t", xlabel="x", ylabel="y", x=[0, 1, 2]),
    lambda: line_chart({"a": [1, 2]}, title="t", xlabel="x", ylabel="y", highlight="b"),
    lambda: line_chart({"a": [math.nan]}, title="t", xlabel="x", ylabel="y"),
    lambda: histograms({}, title="t", xlabel="x"),
    lambda: histograms({"a": []}, title="t", xlabel="x"),
    lambda: histograms({"a": [math.nan, math.inf]}, title="t", xlabel="x"),
    lambda: histograms({"a": [1.0, 2.0]}, title="t", xlabel="x", bins=0),
    lambda: image_grid([]),
    lambda: image_grid([("two channels", torch.zeros(2, 4, 4))]),
    lambda: image_grid([("batch", torch.zeros(1, 3, 4, 4))]),
    lambda: image_grid([("vector", torch.zeros(5))]),
    lambda: image_grid([("empty", torch.zeros(3, 0, 4))]),
    lambda: image_grid([("nan", torch.full((3, 2, 2), math.nan))]),
    lambda: image_grid([("x", torch.zeros(3, 2, 2))], scale=0),
    lambda: image_grid([("x", torch.zeros(3, 2, 2))], columns=0),
    lambda: side_by_side([]),
])
def test_bad_input_is_refused_with_an_rnp_error(draw):
    with pytest.raises(RnpError):
        draw()
