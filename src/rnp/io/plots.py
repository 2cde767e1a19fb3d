"""Charts drawn with matplotlib (bars, lines, histograms), written as PNG, SVG and CSV.

matplotlib is optional (``pip install rnp-backdoor[plots]``): it is imported only when a chart
is drawn, so ``import rnp`` and every command work without it. A chart is described as plain
data first (:class:`Bars`, :class:`Lines`, :class:`Histograms`, laid out in a :class:`Figure`)
and checked when it is made, so bad input is a one-line :class:`RnpError` before anything is
written. :func:`write_figure` writes ``STEM.csv`` (the plotted series, also without matplotlib)
and, with matplotlib, ``STEM.png`` and ``STEM.svg``, each atomically.

Colours: Petroff's ten-colour sequence, chosen for distinctness under the common colour-vision
deficiencies and by a survey of readers (M. A. Petroff, "Accessible Color Sequences for Data
Visualization", 2021, arXiv:2107.02270). matplotlib >= 3.10 ships it as the style ``petroff10``;
it is written out here so that older matplotlib draws the same. Series beyond the tenth reuse the
colours with another line style.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rnp.errors import RnpError
from rnp.io.files import atomic_path, write_text
from rnp.io.tables import csv_text

PALETTE = ("#3f90da", "#ffa90e", "#bd1f01", "#94a4a2", "#832db6",
           "#a96b59", "#e76300", "#b9ac70", "#717581", "#92dadd")
"""Petroff (2021), ten colours, in the paper's order."""
BASE, ACCENT, INK = PALETTE[0], PALETTE[1], "#222222"
LINE_STYLES = ("-", "--", ":", "-.")
FORMATS = ("png", "svg")
PANEL_SIZE = (6.4, 4.0)  # inches, per panel
LEGEND_WIDTH = 36  # characters a legend line holds before it wraps: a long name must not squeeze the plot
DPI = 120
MAX_VALUE_LABELS = 12  # more bars than this get no value written on them (the CSV has them)
MAX_MARKED_POINTS = 25  # lines of at most this many points mark each point

CSV_COLUMNS = ("panel", "series", "x", "x_end", "y", "y_min", "y_max", "n")
"""A figure's CSV: one row per plotted point. ``panel`` is the panel's title; ``series`` the line
or histogram group (empty for bars); ``x`` a bar's label, a line's x or a bin's left edge;
``x_end`` a bin's right edge; ``y`` a bar's mean, a line's value or a bin's density; ``y_min`` and
``y_max`` the range drawn as a bar's error bar (its smallest and largest value, e.g. over seeds;
empty for a single value); ``n`` how many values ``y`` summarises (a bar's values, a bin's
samples; empty for a line's point)."""
CSV_HEADER = csv_text(CSV_COLUMNS, []).rstrip("\n")
"""The first line of every figure CSV, as :func:`figure_csv` writes it: how ``--force`` knows one."""

MISSING_MATPLOTLIB = ("figures need matplotlib: pip install 'rnp-backdoor[plots]' "
                      "(the plotted data is in the .csv beside each figure)")


def available() -> bool:
    """Whether matplotlib can be imported, i.e. whether :func:`write_figure` draws images."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _floats(values, what: str) -> torch.Tensor:
    """``values`` flattened to a non-empty 1-D float64 tensor, or an RnpError naming ``what``."""
    try:
        tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    except (TypeError, ValueError, RuntimeError):
        raise RnpError(f"{what}: expected numbers, got {type(values).__name__}") from None
    if tensor.numel() == 0:
        raise RnpError(f"{what}: expected at least one number")
    return tensor


def _row(panel: str, series: str, x, y, *, x_end=None, y_min=None, y_max=None, n=None) -> dict:
    return {"panel": panel, "series": series, "x": x, "x_end": x_end, "y": y, "y_min": y_min,
            "y_max": y_max, "n": n}


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _legends(drawn, axes) -> None:
    """Legends right of the plots, where they cannot cover data: one for the whole figure when
    every panel has the same entries (e.g. "ASR" and "CA" in each of several pruning curves),
    else one beside each panel that has entries. Artists labelled "_..." have none. Names
    longer than :data:`LEGEND_WIDTH` wrap onto more lines."""
    entries = [(handles, [textwrap.fill(label, LEGEND_WIDTH) for label in labels])
               for handles, labels in (ax.get_legend_handles_labels() for ax in axes)]
    if len(axes) > 1 and entries[0][1] and all(labels == entries[0][1] for _, labels in entries):
        drawn.legend(*entries[0], loc="outside right upper", frameon=False)
        return
    for ax, (handles, labels) in zip(axes, entries):
        if labels:
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                      fontsize="small")


@dataclass
class Bars:
    """One bar per label. Each value is a number, or several numbers (e.g. one per seed): the bar
    is their mean with an error bar from their smallest to their largest, named ``spread_label``
    in the legend. The mean is written above the bar and its error bar (below, for a negative
    one) on a white patch, so the reference line does not cross it. ``highlight`` (an index) is
    drawn hatched in the accent colour and named ``highlight_label`` in the legend;
    ``reference`` (e.g. chance level) is a dashed line named ``reference_label`` in the legend,
    not on the plot."""

    labels: Sequence[str]
    values: Sequence
    title: str
    ylabel: str = ""
    highlight: int | None = None
    highlight_label: str = "highlighted"
    reference: float | None = None
    reference_label: str = "reference"
    spread_label: str = "smallest to largest value"
    groups: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = [str(label) for label in self.labels]
        if not self.labels:
            raise RnpError(f"bars {self.title!r}: no bars")
        if len(self.values) != len(self.labels):
            raise RnpError(f"bars {self.title!r}: {len(self.values)} values but {len(self.labels)} labels")
        self.groups = [_floats(value, f"bars {self.title!r}, {label!r}")
                       for label, value in zip(self.labels, self.values)]
        if not all(group.isfinite().all() for group in self.groups):
            raise RnpError(f"bars {self.title!r}: values must be finite")
        if self.highlight is not None and (isinstance(self.highlight, bool) or not isinstance(self.highlight, int)
                                           or not 0 <= self.highlight < len(self.labels)):
            raise RnpError(f"bars {self.title!r}: highlight {self.highlight} is not in "
                           f"0..{len(self.labels) - 1}")
        if self.reference is not None and not math.isfinite(self.reference):
            raise RnpError(f"bars {self.title!r}: reference {self.reference} is not finite")

    def rows(self) -> list[dict]:
        return [_row(self.title, "", label, group.mean().item(),
                     y_min=group.min().item() if len(group) > 1 else None,
                     y_max=group.max().item() if len(group) > 1 else None, n=len(group))
                for label, group in zip(self.labels, self.groups)]

    def draw(self, ax) -> None:
        means = [group.mean().item() for group in self.groups]
        spread = [[m - g.min().item() for m, g in zip(means, self.groups)],
                  [g.max().item() - m for m, g in zip(means, self.groups)]]
        positions = range(len(means))
        colours = [ACCENT if i == self.highlight else BASE for i in positions]
        bars = ax.bar(positions, means, width=0.7, color=colours, edgecolor="white", linewidth=0.5,
                      zorder=2)
        if any(len(group) > 1 for group in self.groups):
            ax.errorbar(positions, means, yerr=spread, fmt="none", ecolor=INK, elinewidth=1, capsize=4,
                        zorder=3, label=self.spread_label)
        _style(ax, self.title, "", self.ylabel)
        ax.set_xticks(list(positions), self.labels)
        if len(self.labels) > MAX_VALUE_LABELS:  # upright: slanted long labels of narrow bars overlap
            ax.tick_params(axis="x", labelrotation=90)
        elif max(map(len, self.labels)) * len(self.labels) > 45:
            ax.tick_params(axis="x", labelrotation=30)
            for text in ax.get_xticklabels():
                text.set_horizontalalignment("right")
                text.set_rotation_mode("anchor")
        if self.highlight is not None:
            bars[self.highlight].set_hatch("//")
            bars[self.highlight].set_label(self.highlight_label)
        if self.reference is not None:
            ax.axhline(self.reference, color=INK, linestyle="--", linewidth=1.2, zorder=3,
                       label=self.reference_label)
        if len(means) <= MAX_VALUE_LABELS:
            for i, (mean, group) in enumerate(zip(means, self.groups)):
                above = mean >= 0
                end = group.max().item() if above else group.min().item()
                ax.annotate(f"{mean:.3g}", (i, end), xytext=(0, 3 if above else -3),
                            textcoords="offset points", ha="center", va="bottom" if above else "top",
                            fontsize="small", zorder=4,
                            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"})
        ax.margins(y=0.15)


@dataclass
class Lines:
    """Several lines (e.g. the share of each class over RNP's unlearning steps). ``x`` defaults
    to 0, 1, 2, ... per series; when given, every series must have its length. The ``highlight``
    series is drawn thick and on top. Non-finite points (a diverged run) leave gaps.

    ``groups`` (series name to group name, for every series) draws the series of a group in one
    colour, the first solid, the next dashed, and so on: e.g. one colour per clean set, ASR solid
    and CA dashed, so that a reader tells the measure from the line and the run from its colour.
    Without it each series takes the next colour."""

    series: Mapping[str, Sequence[float]]
    title: str
    xlabel: str
    ylabel: str
    x: Sequence[float] | None = None
    highlight: str | None = None
    groups: Mapping[str, str] | None = None
    ys: dict[str, torch.Tensor] = field(init=False, repr=False)
    xs: dict[str, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.series:
            raise RnpError(f"lines {self.title!r}: no series")
        if self.highlight is not None and self.highlight not in self.series:
            raise RnpError(f"lines {self.title!r}: highlight {self.highlight!r} is not one of the series")
        if self.groups is not None and set(map(str, self.groups)) != set(map(str, self.series)):
            raise RnpError(f"lines {self.title!r}: groups must name every series, and only them")
        self.ys = {str(name): _floats(values, f"lines {self.title!r}, series {name!r}")
                   for name, values in self.series.items()}
        shared = None if self.x is None else _floats(self.x, f"lines {self.title!r}, x")
        if shared is not None and not shared.isfinite().all():
            raise RnpError(f"lines {self.title!r}: x must be finite")
        self.xs = {name: torch.arange(len(y), dtype=torch.float64) if shared is None else shared
                   for name, y in self.ys.items()}
        for name, y in self.ys.items():
            if len(y) != len(self.xs[name]):
                raise RnpError(f"lines {self.title!r}: series {name!r} has {len(y)} points, "
                               f"x has {len(self.xs[name])}")
        if not any(y.isfinite().any() for y in self.ys.values()):
            raise RnpError(f"lines {self.title!r}: no finite value to draw")

    def rows(self) -> list[dict]:
        return [_row(self.title, name, x, y)
                for name in self.ys for x, y in zip(self.xs[name].tolist(), self.ys[name].tolist())]

    def _styles(self) -> dict[str, tuple[str, str]]:
        """Each series' colour and line style."""
        if self.groups is None:
            return {name: (PALETTE[index % len(PALETTE)], LINE_STYLES[index // len(PALETTE) % len(LINE_STYLES)])
                    for index, name in enumerate(self.ys)}
        groups = {str(name): str(group) for name, group in self.groups.items()}
        colours = {group: PALETTE[index % len(PALETTE)] for index, group in enumerate(dict.fromkeys(
            groups[name] for name in self.ys))}
        seen = Counter()
        styles = {}
        for name in self.ys:
            group = groups[name]
            styles[name] = (colours[group], LINE_STYLES[seen[group] % len(LINE_STYLES)])
            seen[group] += 1
        return styles

    def draw(self, ax) -> None:
        styles = self._styles()
        for name in self.ys:
            label = name if len(self.ys) > 1 else f"_{name}"
            y = self.ys[name].clone()
            y[~y.isfinite()] = math.nan  # matplotlib leaves a gap at NaN
            chosen = name == self.highlight
            colour, linestyle = styles[name]
            ax.plot(self.xs[name].tolist(), y.tolist(), label=label, color=colour, linestyle=linestyle,
                    linewidth=3.0 if chosen else 1.5, zorder=3 if chosen else 2,
                    marker="o" if len(y) <= MAX_MARKED_POINTS else None, markersize=3)
        _style(ax, self.title, self.xlabel, self.ylabel)
        if self.x is None or all(float(v).is_integer() for v in self.x):  # steps or counts: whole-number ticks
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


@dataclass
class Histograms:
    """Step histograms of score distributions (e.g. "clean" vs "poisoned" samples). The groups
    share ``bins`` edges spanning all their values and are normalised to unit area (densities),
    so groups of different sizes compare. NaN and +-inf are dropped (the legend counts them); a
    group with no finite value is an error. Equal values get bins over that value +- 10%
    (+- 0.5 around zero). ``log_density`` draws the density on a logarithmic axis, for groups
    whose tail matters beside a tall peak. ``legend`` None names the groups when there are
    several (or values were dropped); True names even a single group, whose name says something
    the title does not (which rows' values it pools); False names none."""

    groups: Mapping[str, Sequence[float] | torch.Tensor]
    title: str
    xlabel: str
    bins: int = 40
    log_density: bool = False
    legend: bool | None = None
    data: dict[str, torch.Tensor] = field(init=False, repr=False)
    dropped: dict[str, int] = field(init=False, repr=False)
    edges: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.groups:
            raise RnpError(f"histograms {self.title!r}: no groups")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 1:
            raise RnpError(f"histograms {self.title!r}: bins must be a positive integer, got {self.bins!r}")
        self.data, self.dropped = {}, {}
        for name, values in self.groups.items():
            tensor = _floats(values, f"histograms {self.title!r}, group {name!r}")
            self.data[str(name)] = tensor[tensor.isfinite()]
            self.dropped[str(name)] = tensor.numel() - self.data[str(name)].numel()
            if self.data[str(name)].numel() == 0:
                raise RnpError(f"histograms {self.title!r}: group {name!r} has no finite value")
        values = torch.cat(list(self.data.values()))
        lo, hi = values.min().item(), values.max().item()
        if hi == lo:
            spread = abs(lo) * 0.1 or 0.5
            lo, hi = lo - spread, hi + spread
        self.edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)

    def _density(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.histogram(self.data[name], bins=self.edges).hist
        widths = self.edges[1:] - self.edges[:-1]
        return counts / (counts.sum() * widths), counts

    def rows(self) -> list[dict]:
        rows = []
        for name in self.data:
            density, counts = self._density(name)
            rows += [_row(self.title, name, lo, d, x_end=hi, n=int(c)) for lo, hi, d, c in
                     zip(self.edges[:-1].tolist(), self.edges[1:].tolist(), density.tolist(), counts.tolist())]
        return rows

    def draw(self, ax) -> None:
        shown = self.legend if self.legend is not None else len(self.data) > 1 or any(self.dropped.values())
        hidden = "" if shown else "_"
        for index, name in enumerate(self.data):
            note = f", {self.dropped[name]} non-finite dropped" if self.dropped[name] else ""
            ax.stairs(self._density(name)[0].tolist(), self.edges.tolist(), linewidth=1.8,
                      color=PALETTE[index % len(PALETTE)],
                      linestyle=LINE_STYLES[index // len(PALETTE) % len(LINE_STYLES)],
                      label=f"{hidden}{name} (n={self.data[name].numel()}{note})")
        _style(ax, self.title, self.xlabel, "density")
        if self.log_density:
            ax.set_yscale("log")


Panel = Bars | Lines | Histograms


@dataclass
class Figure:
    """Panels in rows of ``columns`` (default: all in one row), under an optional title."""

    panels: Sequence[Panel]
    title: str | None = None
    columns: int | None = None

    def __post_init__(self) -> None:
        if not self.panels:
            raise RnpError("a figure needs at least one panel")
        if self.columns is not None and (isinstance(self.columns, bool) or not isinstance(self.columns, int)
                                         or self.columns < 1):
            raise RnpError(f"figure columns must be a positive integer, got {self.columns!r}")

    def rows(self) -> list[dict]:
        return [row for panel in self.panels for row in panel.rows()]


def draw(figure: Figure):
    """``figure`` as a matplotlib figure (on the Agg canvas; pyplot's global state is not used)."""
    if not available():
        raise RnpError(MISSING_MATPLOTLIB)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MatplotlibFigure

    columns = min(figure.columns or len(figure.panels), len(figure.panels))
    rows = math.ceil(len(figure.panels) / columns)
    drawn = MatplotlibFigure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI,
                             layout="constrained")
    FigureCanvasAgg(drawn)
    axes = drawn.subplots(rows, columns, squeeze=False).flatten()
    for ax, panel in zip(axes, figure.panels):
        panel.draw(ax)
    for ax in axes[len(figure.panels):]:
        ax.set_visible(False)
    _legends(drawn, axes[:len(figure.panels)])
    if figure.title:
        drawn.suptitle(figure.title, fontsize="x-large")
    return drawn


def figure_csv(figure: Figure) -> str:
    """The plotted series (:data:`CSV_COLUMNS`) through :func:`rnp.io.tables.csv_text`, so that
    names holding commas or quotes survive; floats in Python's shortest exact form."""
    return csv_text(CSV_COLUMNS, ([row[column] for column in CSV_COLUMNS] for row in figure.rows()))


def write_figure(figure: Figure, stem) -> bool:
    """Writes ``STEM.csv`` and, when matplotlib is installed, ``STEM.png`` and ``STEM.svg``, each
    through a temporary file renamed into place. Returns whether the images were drawn."""
    stem = Path(stem)
    write_text(stem.parent / f"{stem.name}.csv", figure_csv(figure))
    if not available():
        return False
    import matplotlib

    drawn = draw(figure)
    for suffix in FORMATS:
        # no date and fixed element ids in the SVG, so the same figure gives the same file
        with atomic_path(stem.parent / f"{stem.name}.{suffix}") as temporary, \
                matplotlib.rc_context({"svg.hashsalt": "rnp"}):
            drawn.savefig(temporary, format=suffix, metadata={"Date": None} if suffix == "svg" else None)
    return True
