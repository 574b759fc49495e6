"""lrmult/display.py: `Table` as text and HTML, and how one cell is written."""

from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest

from lrmult.display import Table, _cell


class Row(NamedTuple):
    name: str
    lr: float
    frozen: bool


ROWS = [Row("a", 0.1, False), Row("long_name", 1 / 3, True)]


# -- _cell -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (0.1, "0.1"),
        (2.0, "2"),  # %g drops a trailing .0
        (1 / 3, "0.333333"),  # six significant digits
        (123456.0, "123456"),
        (1234567.0, "1.23457e+06"),
        (1e-7, "1e-07"),
        (-0.5, "-0.5"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (np.float64(1 / 3), "0.333333"),  # a float subclass
        (3, "3"),
        (True, "True"),
        ("x<y", "x<y"),  # text is escaped by the HTML renderer, not here
        ((2, 3), "(2, 3)"),
        ((5,), "(5,)"),  # a one-element shape keeps Python's comma
        ((), "()"),  # a scalar's shape
        (None, "None"),
    ],
)
def test_cell_writes_floats_with_six_significant_digits_and_shapes_as_tuples(value, text):
    assert _cell(value) == text


# -- text ------------------------------------------------------------------------------------------


def test_text_pads_columns_to_their_widest_cell_and_strips_trailing_spaces():
    # widths: name max(4, 1, 9) = 9, lr max(2, 3, 8) = 8, frozen max(6, 5, 4) = 6
    assert str(Table(ROWS, title="Rules")) == (
        "Rules\n"
        "name       lr        frozen\n"
        "---------  --------  ------\n"
        "a          0.1       False\n"
        "long_name  0.333333  True"
    )


def test_text_without_a_title_starts_with_the_header_and_repr_is_the_text():
    table = Table(ROWS[:1])
    assert str(table) == "name  lr   frozen\n----  ---  ------\na     0.1  False"
    assert repr(table) == str(table)


def test_columns_choose_and_order_the_fields():
    table = Table(ROWS, columns=("frozen", "name"))
    assert table.columns == ("frozen", "name")
    assert str(table) == "frozen  name\n------  ---------\nFalse   a\nTrue    long_name"


def test_a_column_wider_than_its_header():
    class Wide(NamedTuple):
        n: tuple

    assert str(Table([Wide((128, 64))])) == "n\n---------\n(128, 64)"


# -- empty -----------------------------------------------------------------------------------------


def test_empty_table_with_columns_has_a_header_and_no_rows():
    table = Table([], columns=("name", "lr"), title="none")
    assert str(table) == "none\nname  lr\n----  --"
    assert len(table) == 0 and list(table) == []
    assert table._repr_html_() == (
        '<table class="lrmult-table"><caption>none</caption>'
        "<thead><tr><th>name</th><th>lr</th></tr></thead><tbody></tbody></table>"
    )


def test_empty_table_without_columns_has_none():
    table = Table([])
    assert table.columns == () and len(table) == 0 and list(table) == []
    assert table._repr_html_() == (
        '<table class="lrmult-table"><thead><tr></tr></thead><tbody></tbody></table>'
    )
    with pytest.raises(IndexError):
        table[0]


# -- HTML ------------------------------------------------------------------------------------------


def test_html_has_a_caption_a_header_and_one_row_per_row():
    assert Table(ROWS, title="Rules")._repr_html_() == (
        '<table class="lrmult-table"><caption>Rules</caption>'
        "<thead><tr><th>name</th><th>lr</th><th>frozen</th></tr></thead><tbody>"
        "<tr><td>a</td><td>0.1</td><td>False</td></tr>"
        "<tr><td>long_name</td><td>0.333333</td><td>True</td></tr>"
        "</tbody></table>"
    )


def test_html_escapes_title_headers_and_cells():
    class Odd(NamedTuple):
        a_b: str

    table = Table([Odd("<script>&'\"")], title="x < y & z")
    html = table._repr_html_()
    assert "<caption>x &lt; y &amp; z</caption>" in html
    assert "<th>a_b</th>" in html
    assert "<td>&lt;script&gt;&amp;&#x27;&quot;</td>" in html
    assert "<script>" not in html
    # a column name is escaped too (rows need only attributes, not a NamedTuple)
    header = Table([SimpleNamespace(**{"<b>": "v"})], columns=["<b>"])._repr_html_()
    assert "<th>&lt;b&gt;</th>" in header and "<td>v</td>" in header


def test_html_has_no_caption_without_a_title():
    assert "<caption>" not in Table(ROWS)._repr_html_()


# -- a sequence of rows ----------------------------------------------------------------------------


def test_iteration_len_and_indexing_give_the_rows():
    rows = list(ROWS)
    table = Table(rows)
    assert len(table) == 2
    assert list(table) == rows and list(table) == rows  # iterable more than once
    assert table[0] is rows[0] and table[-1] is rows[1]
    assert table[1].lr == 1 / 3  # the row keeps the number; only the text rounds
    rows.append(Row("late", 1.0, False))
    assert len(table) == 2 and list(table) == ROWS  # the table holds its own list


def test_rows_may_come_from_a_generator():
    table = Table(r for r in ROWS)  # read once, kept
    assert len(table) == 2 and list(table) == ROWS and list(table) == ROWS
    assert table.columns == ("name", "lr", "frozen")
