"""A CSV's header checked before pandas reads the file: every column name once.

pandas renames a repeated ``x`` to ``x.1`` without a word, so a file with two ``x`` columns
would be validated, trained on, charged and registered with one of them chosen silently (and
``x.1`` possibly taken for a column of that name). Every reader of a clinical CSV (validation,
the table the model trains on, a site's own file, ``split-sites``, ``schema infer``) refuses
it first, naming the repeated names (a :class:`~fl_core.data.tables.DataError`, exit 3).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from fl_core.data.tables import DataError


def duplicate_columns(path: str | Path) -> list[str]:
    """The column names the CSV's header holds more than once, in header order; ``[]`` for a
    file that cannot be read (its reader reports that fault in its own words)."""
    try:
        with Path(path).open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    counts = Counter(header)
    return [name for name in counts if counts[name] > 1]


def duplicate_columns_text(names: list[str]) -> str:
    """The refusal's words (without the file)."""
    return (f"duplicate column name(s) {', '.join(repr(n) for n in names)} in the header: "
            f"each column needs its own name (rename or remove the repeats)")


def refuse_duplicate_columns(path: str | Path) -> None:
    """:class:`~fl_core.data.tables.DataError` (exit 3) naming the repeated column names."""
    names = duplicate_columns(path)
    if names:
        raise DataError(f"{path}: {duplicate_columns_text(names)}")
