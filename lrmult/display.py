"""Tables for people: plain text in a terminal, HTML in a notebook."""

from __future__ import annotations

import html
from collections.abc import Iterator, Sequence
from typing import Any


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


class Table:
    """An iterable of rows (named tuples) that prints as text and renders as HTML.

    Args:
      rows: the rows, each a `NamedTuple`.
      columns: the fields to show, in order (defaults to every field of the first row).
      title: a caption.
      appendix: tables shown after this one (not iterated: the rows are this table's only).
    """

    def __init__(
        self,
        rows: Sequence[Any],
        columns: Sequence[str] | None = None,
        title: str = "",
        appendix: Sequence[Table] = (),
    ) -> None:
        self._rows = list(rows)
        if columns is None:
            columns = self._rows[0]._fields if self._rows else ()
        self.columns = tuple(columns)
        self.title = title
        self.appendix = list(appendix)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Any:
        return self._rows[i]

    def _cells(self) -> list[list[str]]:
        return [[_cell(getattr(r, c)) for c in self.columns] for r in self._rows]

    def __str__(self) -> str:
        cells = self._cells()
        widths = [len(c) for c in self.columns]
        for row in cells:
            widths = [max(w, len(v)) for w, v in zip(widths, row, strict=True)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
        return "\n\n".join(["\n".join(line.rstrip() for line in lines), *map(str, self.appendix)])

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
            for row in self._cells()
        )
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return (
            f'<table class="lrmult-table">{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>" + "".join(t._repr_html_() for t in self.appendix)
        )
