"""PNG figures drawn with Pillow alone: bar, line and histogram charts, image grids.

matplotlib is not a dependency of rnp, so the few plots the toolkit needs (the share of clean
images predicted as each class, the class shares over RNP's unlearning steps, the scores of clean
vs poisoned samples, recovered triggers) are drawn here with ``PIL.ImageDraw``. The three charts
share one small axes helper (:func:`_chart`) that lays out the title, ticks, axis labels and
legend and maps data to pixels; each chart only draws its data. Colours come from one palette,
Okabe & Ito, "Color Universal Design" (J*FLY, 2008), which stays distinguishable under the common
colour-vision deficiencies. Text uses the font bundled with Pillow
(``ImageFont.load_default(size=...)``, Pillow >= 10.1), so no font file is needed.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from rnp.errors import RnpError
from rnp.io.files import atomic_path

RGB = tuple[int, int, int]
Tick = tuple[float, str]
LegendEntry = tuple[str, RGB, int]  # label, colour, line width

# Okabe & Ito (2008); yellow last because it is faint on white.
PALETTE: tuple[RGB, ...] = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167),
                            (230, 159, 0), (86, 180, 233), (0, 0, 0), (240, 228, 66))
BASE, ACCENT = PALETTE[0], PALETTE[1]
WHITE, INK, GRID, FRAME = (255, 255, 255), (34, 34, 34), (225, 225, 225), (150, 150, 150)
PLOT_W, PLOT_H = 480, 280  # the data area of every chart, in pixels
PAD, TICK = 8, 4
TITLE_SIZE, LABEL_SIZE, SMALL_SIZE = 15, 13, 11


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _width(text: str, size: int) -> int:
    return math.ceil(_font(size).getlength(text))


def _height(size: int) -> int:
    return sum(_font(size).getmetrics())


def _vertical_text(image: Image.Image, xy: tuple[float, float], text: str, size: int,
                   anchor: str) -> None:
    """Draws ``text`` reading upwards; anchor "mm" centres it on ``xy``, "mt" hangs it below."""
    strip = Image.new("L", (max(_width(text, size), 1), _height(size)), 0)
    ImageDraw.Draw(strip).text((0, 0), text, font=_font(size), fill=255)
    strip = strip.rotate(90, expand=True)
    top = xy[1] - (strip.height // 2 if anchor == "mm" else 0)
    image.paste(INK, (round(xy[0]) - strip.width // 2, round(top)), strip)


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


def _span(lo: float, hi: float) -> tuple[float, float]:
    """Widens an empty range (all values equal) so it can be drawn."""
    if hi > lo:
        return lo, hi
    spread = abs(lo) * 0.1 or 0.5
    return lo - spread, hi + spread


def _margin(lo: float, hi: float, fraction: float = 0.05) -> tuple[float, float]:
    """The data range widened by ``fraction`` on each side, so lines do not run on the frame."""
    lo, hi = _span(lo, hi)
    return lo - fraction * (hi - lo), hi + fraction * (hi - lo)


def _extent(values: Sequence[float]) -> tuple[float, float]:
    return min(values), max(values)


def _ticks(lo: float, hi: float, *, integer: bool = False) -> list[Tick]:
    """Round ticks inside [lo, hi] (lo < hi), about five, 1, 2 or 5 times a power of ten apart."""
    raw = (hi - lo) / 6
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    if integer:
        step = max(step, 1.0)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [(i * step, f"{i * step:.{decimals}f}") for i in range(first, last + 1)]


@dataclass(frozen=True)
class _Axes:
    """The data area of a chart: its pixel box and the data ranges it shows."""

    draw: ImageDraw.ImageDraw
    box: tuple[int, int, int, int]  # left, top, right, bottom
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def px(self, x: float) -> float:
        left, _, right, _ = self.box
        return left + (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (right - left)

    def py(self, y: float) -> float:
        _, top, _, bottom = self.box
        return bottom - (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (bottom - top)


def _chart(title: str, xlabel: str, ylabel: str, plot: Callable[[_Axes], None], *,
           xlim: tuple[float, float], ylim: tuple[float, float], xticks: list[Tick] | None = None,
           legend: Sequence[LegendEntry] = ()) -> Image.Image:
    """Lays out and draws one chart: grid, the data (drawn by ``plot``), frame, ticks, labels and
    a legend right of the plot. ``xticks`` default to round numbers; x tick labels too wide for
    their spacing are turned upright."""
    xticks = xticks or _ticks(*xlim)
    yticks = _ticks(*ylim)
    small, label = _height(SMALL_SIZE), _height(LABEL_SIZE)
    xwidths = [_width(text, SMALL_SIZE) for _, text in xticks]
    upright = max(xwidths) > PLOT_W / len(xticks) - 4
    left = (PAD + (label + PAD if ylabel else 0) + TICK + 3
            + max(_width(text, SMALL_SIZE) for _, text in yticks))
    below = TICK + 2 + (max(xwidths) if upright else small) + (PAD + label if xlabel else 0) + PAD
    gap = max(2 * PAD, xwidths[-1] // 2 + PAD)
    legend_w = max((24 + 2 * PAD + _width(text, SMALL_SIZE) for text, _, _ in legend), default=0)
    height = max(PAD + PLOT_H + below, PAD + len(legend) * (small + 4) + PAD)
    image, top = _canvas(left + PLOT_W + gap + legend_w, height, title)
    draw = ImageDraw.Draw(image)
    axes = _Axes(draw, (left, top + PAD, left + PLOT_W, top + PAD + PLOT_H), xlim, ylim)
    _, plot_top, right, bottom = axes.box
    for value, text in yticks:
        y = axes.py(value)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.line([(left - TICK, y), (left, y)], fill=INK)
        draw.text((left - TICK - 3, y), text, font=_font(SMALL_SIZE), fill=INK, anchor="rm")
    plot(axes)
    draw.rectangle(axes.box, outline=INK)
    for value, text in xticks:
        x = axes.px(value)
        draw.line([(x, bottom), (x, bottom + TICK)], fill=INK)
        if upright:
            _vertical_text(image, (x, bottom + TICK + 2), text, SMALL_SIZE, "mt")
        else:
            draw.text((x, bottom + TICK + 2), text, font=_font(SMALL_SIZE), fill=INK, anchor="ma")
    if xlabel:
        draw.text(((left + right) / 2, bottom + below - PAD - label), xlabel,
                  font=_font(LABEL_SIZE), fill=INK, anchor="ma")
    if ylabel:
        _vertical_text(image, (PAD + label / 2, (plot_top + bottom) / 2), ylabel, LABEL_SIZE, "mm")
    for row, (text, colour, width) in enumerate(legend):
        y = plot_top + row * (small + 4) + small / 2
        draw.line([(right + gap, y), (right + gap + 24, y)], fill=colour, width=width)
        draw.text((right + gap + 24 + PAD, y), text, font=_font(SMALL_SIZE), fill=INK, anchor="lm")
    return image


def _check_positive_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RnpError(f"{what} must be a positive integer, got {value!r}")


def _floats(values, what: str, *, flatten: bool = False) -> torch.Tensor:
    """``values`` as a non-empty 1-D float64 tensor on the CPU, or an RnpError naming ``what``."""
    try:
        tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise RnpError(f"{what}: expected numbers, got {type(values).__name__}") from None
    if flatten:
        tensor = tensor.flatten()
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise RnpError(f"{what}: expected a non-empty list of numbers, "
                       f"got shape {tuple(tensor.shape)}")
    return tensor


def bar_chart(values: Sequence[float], labels: Sequence[str], *, title: str, ylabel: str = "",
              highlight: int | None = None, reference: float | None = None) -> Image.Image:
    """One bar per label (e.g. the share of clean images predicted as each class), its value
    written on top where it fits. The ``highlight`` bar (an index) is drawn in the accent colour;
    ``reference`` (e.g. chance level 1/K) is a dashed horizontal line, its value at the right."""
    heights = _floats(values, "bar_chart values")
    if len(labels) != len(heights):
        raise RnpError(f"bar_chart: {len(heights)} values but {len(labels)} labels")
    if not heights.isfinite().all():
        raise RnpError("bar_chart: values must be finite")
    if highlight is not None and not 0 <= highlight < len(heights):
        raise RnpError(f"bar_chart: highlight {highlight} is not in 0..{len(heights) - 1}")
    if reference is not None and not math.isfinite(reference):
        raise RnpError(f"bar_chart: reference {reference} is not finite")
    lo, hi = _span(*_extent(heights.tolist() + [0.0, 0.0 if reference is None else reference]))
    headroom = 0.1 * (hi - lo)  # room for the values written beside the bars
    ylim = (lo - headroom if lo < 0 else lo, hi + headroom if hi > 0 else hi)

    def plot(axes: _Axes) -> None:
        slot = PLOT_W / len(heights)
        for i, value in enumerate(heights.tolist()):
            top, bottom = sorted((axes.py(value), axes.py(0.0)))
            axes.draw.rectangle((axes.px(i - 0.35), top, axes.px(i + 0.35), bottom),
                                fill=ACCENT if i == highlight else BASE)
            text = f"{value:.3g}"
            if _width(text, SMALL_SIZE) < slot - 2:
                y, anchor = (top - 2, "md") if value >= 0 else (bottom + 2, "ma")
                axes.draw.text((axes.px(i), y), text, font=_font(SMALL_SIZE), fill=INK,
                               anchor=anchor)
        if reference is not None:
            _reference_line(axes, reference)

    return _chart(title, "", ylabel, plot, xlim=(-0.5, len(heights) - 0.5), ylim=ylim,
                  xticks=[(i, str(text)) for i, text in enumerate(labels)])


def _reference_line(axes: _Axes, value: float, dash: int = 6) -> None:
    """A dashed line across the plot at ``value``, labelled on a white patch at its right end."""
    left, _, right, _ = axes.box
    y = axes.py(value)
    for x in range(left, right, 2 * dash):
        axes.draw.line([(x, y), (min(x + dash, right), y)], fill=INK, width=2)
    text = f"{value:.3g}"
    box = axes.draw.textbbox((right - 3, y - 3), text, font=_font(SMALL_SIZE), anchor="rd")
    axes.draw.rectangle(box, fill=WHITE)
    axes.draw.text((right - 3, y - 3), text, font=_font(SMALL_SIZE), fill=INK, anchor="rd")


def line_chart(series: Mapping[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
               x: Sequence[float] | None = None, highlight: str | None = None) -> Image.Image:
    """Several lines (e.g. the share of each class over RNP's unlearning steps).

    ``x`` defaults to 0, 1, 2, ... for each series; when given, every series must have its
    length. The ``highlight`` series is drawn thick in the accent colour, on top of the others.
    Non-finite points (a diverged run) leave gaps in their line."""
    if not series:
        raise RnpError("line_chart: no series")
    if highlight is not None and highlight not in series:
        raise RnpError(f"line_chart: highlight {highlight!r} is not one of the series")
    ys = {name: _floats(values, f"line_chart series {name!r}") for name, values in series.items()}
    shared = None if x is None else _floats(x, "line_chart x")
    if shared is not None and not shared.isfinite().all():
        raise RnpError("line_chart: x must be finite")
    xs = {name: torch.arange(len(y), dtype=torch.float64) if shared is None else shared
          for name, y in ys.items()}
    for name, y in ys.items():
        if len(y) != len(xs[name]):
            raise RnpError(f"line_chart: series {name!r} has {len(y)} points, x has {len(shared)}")
    finite = torch.cat([y[y.isfinite()] for y in ys.values()])
    if finite.numel() == 0:
        raise RnpError("line_chart: no finite values to draw")
    xlim = _span(*_extent(torch.cat(list(xs.values())).tolist()))
    xticks = _ticks(*xlim, integer=shared is None)
    others = itertools.cycle(colour for colour in PALETTE if colour != ACCENT)
    style = {name: (ACCENT, 4) if name == highlight else (next(others), 2) for name in ys}

    def plot(axes: _Axes) -> None:
        for name in sorted(ys, key=lambda name: name == highlight):
            colour, width = style[name]
            runs = itertools.groupby(zip(xs[name].tolist(), ys[name].tolist()),
                                     key=lambda point: math.isfinite(point[1]))
            for drawable, run in runs:
                points = [(axes.px(a), axes.py(b)) for a, b in run if drawable]
                if len(points) == 1:
                    (px, py), r = points[0], width
                    axes.draw.ellipse((px - r, py - r, px + r, py + r), fill=colour)
                elif points:
                    axes.draw.line(points, fill=colour, width=width, joint="curve")

    legend = [(name, *style[name]) for name in ys] if len(ys) > 1 else []
    return _chart(title, xlabel, ylabel, plot, xlim=xlim, ylim=_margin(*_extent(finite.tolist())),
                  xticks=xticks, legend=legend)


def histograms(groups: Mapping[str, torch.Tensor | Sequence[float]], *, title: str, xlabel: str,
               bins: int = 40) -> Image.Image:
    """Overlaid step histograms of score distributions (e.g. "clean" vs "poisoned" samples).

    Every group is flattened, shares the same ``bins`` edges spanning all groups' values, and is
    normalised to unit area (a density) so groups of different sizes compare. NaN and +-inf
    values are dropped (the legend counts them); a group with no finite value is an error. When
    all values are equal the bins span that value +- 10% (+- 0.5 around zero)."""
    if not groups:
        raise RnpError("histograms: no groups")
    _check_positive_int(bins, "histograms: bins")
    data, legend = {}, []
    for index, (name, values) in enumerate(groups.items()):
        tensor = _floats(values, f"histograms group {name!r}", flatten=True)
        data[name] = tensor[tensor.isfinite()]
        if data[name].numel() == 0:
            raise RnpError(f"histograms: group {name!r} has no finite value")
        dropped = tensor.numel() - data[name].numel()
        note = f", {dropped} non-finite dropped" if dropped else ""
        legend.append((f"{name} (n={data[name].numel()}{note})", PALETTE[index % len(PALETTE)], 2))
    lo, hi = _span(*_extent(torch.cat(list(data.values())).tolist()))
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist()
    densities = [torch.histogram(values, bins=bins, range=(lo, hi), density=True).hist.tolist()
                 for values in data.values()]

    def plot(axes: _Axes) -> None:
        for density, (_, colour, width) in zip(densities, legend):
            points = [(axes.px(lo), axes.py(0.0))]
            for i, value in enumerate(density):
                y = axes.py(value)
                points += [(axes.px(edges[i]), y), (axes.px(edges[i + 1]), y)]
            points.append((axes.px(hi), axes.py(0.0)))
            axes.draw.line(points, fill=colour, width=width)

    return _chart(title, xlabel, "density", plot, xlim=_margin(lo, hi, 0.02),
                  ylim=(0.0, 1.05 * max(max(density) for density in densities)),
                  legend=legend if len(legend) > 1 else [])


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
