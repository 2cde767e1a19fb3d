"""The one CSV writer and the one table renderer of :mod:`rnp.io.tables`."""

from __future__ import annotations

import csv

from rnp.io.tables import csv_text, render_table, write_csv


def test_csv_quotes_a_cell_with_a_comma_and_writes_none_as_empty(tmp_path):
    rows = [["features.0,conv", 3, "0.500000"], ["layer4", 0, None]]
    assert csv_text(["layer", "channel", "value"], rows) == (
        'layer,channel,value\n"features.0,conv",3,0.500000\nlayer4,0,\n')
    write_csv(tmp_path / "t.csv", ["layer", "channel", "value"], rows)
    with open(tmp_path / "t.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [["layer", "channel", "value"], ["features.0,conv", "3", "0.500000"],
                                            ["layer4", "0", ""]]


def test_terminal_table_pads_columns_and_underlines_the_header():
    assert render_table([["metric", "before"], ["CA", "91.20%"], ["ASR (long)", "1%"]]) == (
        "metric      before\n"
        "----------  ------\n"
        "CA          91.20%\n"
        "ASR (long)  1%")


def test_markdown_table_leaves_empty_cells_blank():
    assert render_table([["a", "b", "c"], [1, "x", ""]], markdown=True) == (
        "| a | b | c |\n|---|---|---|\n| 1 | x | |")


def test_markdown_table_escapes_a_bar_and_folds_a_line_break():
    assert render_table([["defense", "result"], ["rnp | fast", "n/a: failed\nat step 2"]], markdown=True) == (
        "| defense | result |\n|---|---|\n| rnp \\| fast | n/a: failed at step 2 |")
