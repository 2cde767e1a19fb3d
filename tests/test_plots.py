"""matplotlib charts: the files written (PNG, SVG and the data as CSV), the CSV equal to the data,
distinct colours, error bars over seeds, legends and value labels kept apart, bad input, and
everything working without matplotlib."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer
from PIL import Image

from rnp.errors import RnpError
from rnp.io import plots
from rnp.io.plots import ACCENT, BASE, LEGEND_WIDTH, PALETTE, Bars, Figure, Histograms, Lines, draw, write_figure

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def figure_of_each_kind() -> Figure:
    return Figure([Bars(["a", "b"], [0.25, [1.0, 2.0, 6.0]], title="bars", reference=0.5),
                   Lines({"x, with a comma": [1.0, math.nan, 3.0], 'say "hi"': [0.5, 0.25, 0.0]},
                         title="lines", xlabel="step", ylabel="share", highlight="say \"hi\""),
                   Histograms({"clean": [0.0, 0.1, 0.2, 0.9], "poisoned": [0.8, 1.0]}, title="scores",
                              xlabel="score", bins=4)], title="all three", columns=2)


def test_write_figure_writes_png_svg_and_csv_and_no_temporary_file(tmp_path):
    stem = tmp_path / "out" / "figure.v1"  # a dot in the stem is kept, not taken for a suffix
    assert write_figure(figure_of_each_kind(), stem)
    assert sorted(p.name for p in stem.parent.iterdir()) == ["figure.v1.csv", "figure.v1.png", "figure.v1.svg"]
    with Image.open(stem.parent / "figure.v1.png") as image:
        assert image.format == "PNG" and image.width > 1000
    svg = (stem.parent / "figure.v1.svg").read_text()
    assert ElementTree.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"
    write_figure(figure_of_each_kind(), tmp_path / "again")
    assert (tmp_path / "again.svg").read_text() == svg  # no date, fixed ids: the same file


def test_csv_holds_the_plotted_series(tmp_path):
    write_figure(figure_of_each_kind(), tmp_path / "figure")
    rows = read_csv(tmp_path / "figure.csv")
    assert list(rows[0]) == list(plots.CSV_COLUMNS)
    bars = [r for r in rows if r["panel"] == "bars"]
    assert [(r["x"], float(r["y"]), r["y_min"], r["y_max"], r["n"]) for r in bars] == [
        ("a", 0.25, "", "", "1"), ("b", 3.0, "1.0", "6.0", "3")]
    lines = [r for r in rows if r["panel"] == "lines"]
    assert [r["series"] for r in lines] == ["x, with a comma"] * 3 + ['say "hi"'] * 3
    assert [float(r["x"]) for r in lines] == [0, 1, 2] * 2
    first = [float(r["y"]) for r in lines[:3]]
    assert first[0] == 1.0 and math.isnan(first[1]) and first[2] == 3.0
    assert [float(r["y"]) for r in lines[3:]] == [0.5, 0.25, 0.0]
    bins = [r for r in rows if r["panel"] == "scores"]
    assert len(bins) == 8 and {r["series"] for r in bins} == {"clean", "poisoned"}
    for group, size in (("clean", 4), ("poisoned", 2)):
        mine = [r for r in bins if r["series"] == group]
        assert sum(int(r["n"]) for r in mine) == size
        area = sum(float(r["y"]) * (float(r["x_end"]) - float(r["x"])) for r in mine)
        assert area == pytest.approx(1.0)
    assert float(bins[0]["x"]) == 0.0 and float(bins[3]["x_end"]) == 1.0


def test_floats_in_the_csv_are_exact(tmp_path):
    values = [1 / 3, 0.1 + 0.2, 1e-300]
    write_figure(Figure([Lines({"a": values}, title="t", xlabel="x", ylabel="y")]), tmp_path / "f")
    assert [float(r["y"]) for r in read_csv(tmp_path / "f.csv")] == values


def test_ten_series_get_ten_distinct_colours_and_more_get_other_line_styles():
    series = {name: [i, i + 1.0] for i, name in enumerate(CLASSES)}
    ax = draw(Figure([Lines(series, title="t", xlabel="x", ylabel="y")])).axes[0]
    assert len({to_hex(line.get_color()) for line in ax.get_lines()}) == 10
    groups = {name: [float(i)] * 5 for i, name in enumerate(CLASSES + ["eleventh"])}
    ax = draw(Figure([Histograms(groups, title="t", xlabel="x")])).axes[0]
    styles = {(to_hex(patch.get_edgecolor()), patch.get_linestyle()) for patch in ax.patches}
    assert len({colour for colour, _ in styles}) == 10 and len(styles) == 11


def test_log_density_histograms_draw_a_logarithmic_axis_and_plain_ones_a_linear_one():
    groups = {"masks": [0.1, 0.9, 1.0, 1.0, 1.0]}
    log, plain = draw(Figure([Histograms(groups, title="log", xlabel="x", log_density=True),
                              Histograms(groups, title="plain", xlabel="x")])).axes
    assert (log.get_yscale(), plain.get_yscale()) == ("log", "linear")


def test_grouped_lines_share_their_group_colour_and_take_a_line_style_each():
    series = {"ASR, set 0": [1, 0], "ASR, set 1": [1, 1], "CA, set 0": [1, 1], "CA, set 1": [0, 1]}
    groups = {name: name.split(", ")[1] for name in series}
    ax = draw(Figure([Lines(series, title="t", xlabel="x", ylabel="y", groups=groups)])).axes[0]
    drawn = {line.get_label(): (to_hex(line.get_color()), line.get_linestyle()) for line in ax.get_lines()}
    assert drawn == {"ASR, set 0": (PALETTE[0], "-"), "ASR, set 1": (PALETTE[1], "-"),
                     "CA, set 0": (PALETTE[0], "--"), "CA, set 1": (PALETTE[1], "--")}


def test_error_bars_span_the_seeds_only_where_there_are_several():
    single = draw(Figure([Bars(["a", "b"], [1.0, 2.0], title="t")])).axes[0]
    assert not [c for c in single.containers if isinstance(c, ErrorbarContainer)]
    ax = draw(Figure([Bars(["a", "b"], [[1.0, 2.0, 6.0], [4.0]], title="t",
                           spread_label="smallest to largest over seeds")])).axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()
    assert [(s[0][1], s[1][1]) for s in segments] == [(1.0, 6.0), (4.0, 4.0)]
    assert "smallest to largest over seeds" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_values_sit_above_their_error_bars_apart_from_each_other_and_the_reference_label():
    drawn = draw(Figure([Bars(CLASSES, [[0.1, 0.3]] + [[0.1]] * 9, title="t", reference=0.1,
                              reference_label="chance (1/10)")]))
    drawn.canvas.draw()
    ax = drawn.axes[0]
    renderer = drawn.canvas.get_renderer()
    values = [text for text in ax.texts]
    assert [text.get_text() for text in values] == ["0.2"] + ["0.1"] * 9
    boxes = [text.get_window_extent(renderer) for text in values]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    error_top = ax.transData.transform((0, 0.3))[1]
    assert boxes[0].y0 >= error_top
    legend = ax.get_legend()
    assert {t.get_text() for t in legend.get_texts()} == {"smallest to largest value", "chance (1/10)"}
    frame = ax.get_window_extent(renderer)
    assert legend.get_window_extent(renderer).x0 >= frame.x1  # beside the plot, not on it


def test_the_labels_of_many_bars_do_not_overlap():
    labels = ["ft", "fp", "nad", "nad (betas/10)", "anp", "anp (paper budget)", "ibau", "ibau (lr 1e-4)", "clp",
              "nc", "sau", "sau (paper budget)", "nft", "tsbd", "fp_rnp", "rnp", "rnp (target gradient)",
              "rnp (bf16, masks)"]
    drawn = draw(Figure([Bars(labels, [90.0] * len(labels), title="t")]))
    drawn.canvas.draw()
    renderer = drawn.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in drawn.axes[0].get_xticklabels()]
    assert len(boxes) == len(labels)
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def test_highlights():
    ax = draw(Figure([Bars(["a", "b", "c"], [1, 2, 3], title="t", highlight=1,
                           highlight_label="target")])).axes[0]
    colours = [to_hex(patch.get_facecolor()) for patch in ax.patches]
    assert colours == [BASE, ACCENT, BASE] and ax.patches[1].get_hatch()
    ax = draw(Figure([Lines({"a": [1, 2], "b": [2, 1]}, title="t", xlabel="x", ylabel="y",
                            highlight="b")])).axes[0]
    assert [line.get_linewidth() for line in ax.get_lines()] == [1.5, 3.0]


def test_panels_with_the_same_legend_share_one_and_single_series_have_none():
    curves = Figure([Lines({"ASR": [1, 0], "CA": [1, 1]}, title=f"curve {i}", xlabel="x", ylabel="y")
                     for i in range(4)], columns=3)
    drawn = draw(curves)
    assert len(drawn.legends) == 1 and not any(ax.get_legend() for ax in drawn.axes)
    assert sum(ax.get_visible() for ax in drawn.axes) == 4  # 2 rows of 3, the last two empty
    alone = draw(Figure([Lines({"a": [1, 2]}, title="t", xlabel="x", ylabel="y"),
                         Histograms({"a": [1.0, 2.0]}, title="h", xlabel="x")]))
    assert not drawn.legends[0].get_texts()[0].get_text().startswith("_")
    assert not alone.legends and not any(ax.get_legend() for ax in alone.axes)


def test_a_histogram_legend_can_be_forced_on_for_one_group_or_off_for_several():
    named, unnamed = draw(Figure([Histograms({"rnp = rnp (paper)": [1.0, 2.0]}, title="a", xlabel="x", legend=True),
                                  Histograms({"a": [1.0], "b": [2.0]}, title="b", xlabel="x", legend=False)])).axes
    assert [t.get_text() for t in named.get_legend().get_texts()] == ["rnp = rnp (paper) (n=2)"]
    assert unnamed.get_legend() is None
    long = " = ".join(f"rnp (row {i})" for i in range(8))
    wrapped = draw(Figure([Histograms({long: [1.0]}, title="a", xlabel="x", legend=True)])).axes[0].get_legend()
    text, = wrapped.get_texts()
    lines = text.get_text().split("\n")  # wrapped, so that the name does not squeeze the plot
    assert " ".join(lines) == f"{long} (n=1)" and len(lines) > 1 and max(map(len, lines)) <= LEGEND_WIDTH


def test_a_failed_write_keeps_the_old_files(tmp_path, monkeypatch):
    from matplotlib.figure import Figure as MatplotlibFigure

    figure = Figure([Bars(["a"], [1.0], title="t")])
    write_figure(figure, tmp_path / "f")
    before = (tmp_path / "f.png").read_bytes()

    def half_written(self, target, **kwargs):
        open(target, "wb").write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(MatplotlibFigure, "savefig", half_written)
    with pytest.raises(OSError):
        write_figure(Figure([Bars(["a"], [2.0], title="t")]), tmp_path / "f")
    assert (tmp_path / "f.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv", "f.png", "f.svg"]


def test_without_matplotlib_only_the_csv_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert not plots.available()
    assert write_figure(figure_of_each_kind(), tmp_path / "f") is False
    assert [p.name for p in tmp_path.iterdir()] == ["f.csv"]
    with pytest.raises(RnpError, match=r"rnp-backdoor\[plots\]"):
        draw(figure_of_each_kind())


def test_importing_rnp_and_its_commands_does_not_import_matplotlib():
    code = ("import sys, rnp, rnp.cli.main, rnp.cli.inspection, rnp.cli.bench, rnp.bench.report, rnp.io.plots; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("make", [
    lambda: Bars([], [], title="t"),
    lambda: Bars(["a"], [0.1, 0.2], title="t"),
    lambda: Bars(["a", "b"], [0.1, math.nan], title="t"),
    lambda: Bars(["a", "b"], [0.1, [1.0, math.inf]], title="t"),
    lambda: Bars(["a", "b"], ["x", "y"], title="t"),
    lambda: Bars(["a", "b"], [0.1, []], title="t"),
    lambda: Bars(["a", "b"], [0.1, 0.2], title="t", highlight=2),
    lambda: Bars(["a", "b"], [0.1, 0.2], title="t", highlight="a"),
    lambda: Bars(["a"], [0.1], title="t", reference=math.nan),
    lambda: Lines({}, title="t", xlabel="x", ylabel="y"),
    lambda: Lines({"a": []}, title="t", xlabel="x", ylabel="y"),
    lambda: Lines({"a": [1, 2]}, title="t", xlabel="x", ylabel="y", x=[0, 1, 2]),
    lambda: Lines({"a": [1, 2]}, title="t", xlabel="x", ylabel="y", x=[0, math.inf]),
    lambda: Lines({"a": [1, 2]}, title="t", xlabel="x", ylabel="y", highlight="b"),
    lambda: Lines({"a": [math.nan]}, title="t", xlabel="x", ylabel="y"),
    lambda: Lines({"a": [1], "b": [2]}, title="t", xlabel="x", ylabel="y", groups={"a": "g"}),
    lambda: Lines({"a": [1]}, title="t", xlabel="x", ylabel="y", groups={"a": "g", "c": "g"}),
    lambda: Histograms({}, title="t", xlabel="x"),
    lambda: Histograms({"a": []}, title="t", xlabel="x"),
    lambda: Histograms({"a": [math.nan, math.inf]}, title="t", xlabel="x"),
    lambda: Histograms({"a": [1.0, 2.0]}, title="t", xlabel="x", bins=0),
    lambda: Figure([]),
    lambda: Figure([Bars(["a"], [1.0], title="t")], columns=0),
])
def test_bad_input_is_refused_with_an_rnp_error(make):
    with pytest.raises(RnpError):
        make()


def test_equal_values_and_non_finite_scores_still_draw(tmp_path):
    figure = Figure([Histograms({"all equal": torch.full((50,), 0.5)}, title="t", xlabel="x"),
                     Histograms({"a": [1.0, 1.0], "b": [math.nan, math.inf, 2.0, 3.0]}, title="u",
                                xlabel="x", bins=5)])
    assert write_figure(figure, tmp_path / "f")
    ax = draw(figure).axes[1]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (n=2)", "b (n=2, 2 non-finite dropped)"]
    rows = read_csv(tmp_path / "f.csv")
    assert float(rows[0]["x"]) == pytest.approx(0.45) and float(rows[39]["x_end"]) == pytest.approx(0.55)
