"""Pillow image grids: upscaling, layout, side-by-side panels, atomic saving and refusing bad input."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from rnp.errors import RnpError
from rnp.io.figures import image_grid, save_png, side_by_side

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(image: Image.Image) -> torch.Tensor:
    """The image as an (H, W, 3) uint8 tensor."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(
        image.height, image.width, 3)


def where(image: Image.Image, colour) -> torch.Tensor:
    """(H, W) bool: the pixels of exactly ``colour``."""
    return (pixels(image) == torch.tensor(colour, dtype=torch.uint8)).all(-1)


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
    image = image_grid([("tile", torch.rand(3, 4, 4))], title="t")
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


@pytest.mark.parametrize("draw", [
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
