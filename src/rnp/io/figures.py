"""Image grids drawn with Pillow: captioned tiles of actual images (e.g. recovered triggers).

These are pictures, not charts (the charts are :mod:`rnp.io.plots`, drawn with matplotlib), so
they need nothing beyond Pillow and every command can write them. Text uses the font bundled
with Pillow (``ImageFont.load_default(size=...)``, Pillow >= 10.1), so no font file is needed.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from rnp.errors import RnpError
from rnp.io.files import atomic_path

WHITE, INK, FRAME = (255, 255, 255), (34, 34, 34), (150, 150, 150)
PAD = 8
TITLE_SIZE, SMALL_SIZE = 15, 11


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _width(text: str, size: int) -> int:
    return math.ceil(_font(size).getlength(text))


def _height(size: int) -> int:
    return sum(_font(size).getmetrics())


def _canvas(width: int, height: int, title: str | None) -> tuple[Image.Image, int]:
    """A white RGB canvas with ``title`` centred on top; returns it and where the content starts."""
    top = PAD + _height(TITLE_SIZE) + PAD if title else 0
    if title:
        width = max(width, _width(title, TITLE_SIZE) + 2 * PAD)
    image = Image.new("RGB", (width, top + height), WHITE)
    if title:
        ImageDraw.Draw(image).text((width / 2, PAD), title, font=_font(TITLE_SIZE), fill=INK,
                                   anchor="ma")
    return image, top


def _check_positive_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RnpError(f"{what} must be a positive integer, got {value!r}")


def image_grid(images: Sequence[tuple[str, torch.Tensor]], *, scale: int = 4,
               columns: int | None = None, title: str | None = None) -> Image.Image:
    """Captioned tiles (e.g. "true trigger", "recovered (unlearned)", "recovered (original)").

    Each tensor is (C, H, W) with C = 1 or 3, or (H, W) (a mask, drawn grey), float in [0, 1]
    (values outside are clipped; uint8 is read as 0..255). Tiles are enlarged ``scale`` times by
    nearest neighbour so single pixels stay sharp, and framed in grey so a white or black trigger
    shows on the white page. ``columns`` defaults to min(count, 5)."""
    if not images:
        raise RnpError("image_grid: no images")
    _check_positive_int(scale, "image_grid: scale")
    if columns is not None:
        _check_positive_int(columns, "image_grid: columns")
    tiles = []
    for caption, tensor in images:
        tile = _to_image(tensor, str(caption))
        tiles.append((str(caption), tile.resize((tile.width * scale, tile.height * scale),
                                                Image.Resampling.NEAREST)))
    columns = columns or min(len(tiles), 5)
    cell_w = 2 * PAD + max(max(tile.width, _width(caption, SMALL_SIZE)) for caption, tile in tiles)
    cell_h = max(tile.height for _, tile in tiles) + 2 + PAD // 2 + _height(SMALL_SIZE) + PAD
    rows = math.ceil(len(tiles) / columns)
    image, top = _canvas(columns * cell_w, PAD + rows * cell_h, title)
    draw = ImageDraw.Draw(image)
    for index, (caption, tile) in enumerate(tiles):
        row, column = divmod(index, columns)
        x, y = column * cell_w + (cell_w - tile.width) // 2, top + PAD + row * cell_h + 1
        draw.rectangle((x - 1, y - 1, x + tile.width, y + tile.height), outline=FRAME)
        image.paste(tile, (x, y))
        draw.text((column * cell_w + cell_w / 2, y + tile.height + 1 + PAD // 2), caption,
                  font=_font(SMALL_SIZE), fill=INK, anchor="ma")
    return image


def _to_image(tensor: torch.Tensor, caption: str) -> Image.Image:
    """A (C, H, W) or (H, W) tensor in [0, 1] as an RGB image; one channel becomes grey."""
    pixels = torch.as_tensor(tensor).detach().cpu()
    shape = tuple(pixels.shape)
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(0)
    if pixels.dim() != 3 or pixels.shape[0] not in (1, 3) or 0 in pixels.shape:
        raise RnpError(f"image_grid: {caption!r} has shape {shape}; "
                       "expected (C, H, W) with C = 1 or 3, or (H, W)")
    pixels = pixels.double() / 255 if pixels.dtype == torch.uint8 else pixels.double()
    if not pixels.isfinite().all():
        raise RnpError(f"image_grid: {caption!r} has non-finite pixels")
    pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1)
    rows = pixels.permute(1, 2, 0).contiguous().numpy().tobytes()
    return Image.frombytes("RGB", (pixels.shape[2], pixels.shape[1]), rows)


def side_by_side(panels: Sequence[Image.Image], *, title: str | None = None,
                 columns: int | None = None) -> Image.Image:
    """Places figures left to right, top-aligned, under an optional common title; with
    ``columns``, in rows of that many (e.g. one chart per attack of a benchmark grid)."""
    if not panels:
        raise RnpError("side_by_side: no panels")
    columns = len(panels) if columns is None else columns
    _check_positive_int(columns, "side_by_side: columns")
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    heights = [max(panel.height for panel in row) for row in rows]
    image, top = _canvas(max(sum(panel.width for panel in row) for row in rows), sum(heights), title)
    for row, height in zip(rows, heights):
        x = 0
        for panel in row:
            image.paste(panel.convert("RGB"), (x, top))
            x += panel.width
        top += height
    return image


def save_png(image: Image.Image, path) -> None:
    """Writes ``image`` as PNG through a temporary file renamed onto ``path``, so a reader sees the
    old file or the complete new one, never half of one."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
