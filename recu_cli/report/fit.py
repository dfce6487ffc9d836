"""Tables that fit the terminal: drop the least important columns instead of squeezing
every cell to one character (rich's default on a narrow terminal)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table
from rich.text import Text


@dataclass
class Column:
    header: str
    cells: list[str] = field(default_factory=list)
    justify: str = "right"
    footer: str = ""
    priority: int = 0  # higher survives longer; the first column is always kept

    def width(self) -> int:
        return max([len(self.header), len(self.footer), *(len(c) for c in self.cells)])


def fitted_table(columns: list[Column], width: int, title: str) -> tuple[Table, list[str]]:
    """A rich Table of the columns that fit in `width`; also the headers left out."""
    keep = list(columns)

    def need(cols: list[Column]) -> int:
        return sum(c.width() + 3 for c in cols) + 1  # padding 1 + 1, one border each

    while need(keep) > width and len(keep) > 1:
        keep.remove(min(keep[1:], key=lambda c: c.priority))
    table = Table(
        title=title,
        header_style="bold",
        show_footer=any(c.footer for c in keep),
        footer_style="bold",
    )
    for c in keep:
        table.add_column(c.header, justify=c.justify, footer=c.footer, no_wrap=True)  # type: ignore[arg-type]
    for row in zip(*(c.cells for c in keep), strict=True):
        table.add_row(*(Text(x) for x in row))
    return table, [c.header for c in columns if c not in keep]
