"""A patient's records as content: the fingerprint the privacy ledger keys accounts by.

The ledger must charge the same patients whatever the file looks like and whatever the
patients or sites are called, or renumbering the ids (or renaming a site) would hand every
patient a fresh budget. So a patient's account is the SHA-256 of the *content* of their
records (:func:`record_fingerprints`), not of their id:

* the columns are the schema's label column and every declared feature, by name (sorted):
  never the patient id, the site column or an undeclared/ignored column, so renumbered ids,
  renamed sites, an extra column, column order and one file per site vs the pooled file give
  the same key; a declared feature absent from a file reads as empty;
* a cell is canonical text: missing → empty; a number → its float's shortest ``repr``
  (``63``, ``63.0`` and ``+63.00`` are one value; ``-0`` is ``0``); anything else stripped
  and lower-cased (``TRUE``, ``True`` and `` true`` are one token);
* a patient's rows are sorted, so row order does not matter; line endings and a BOM are
  gone by the time a frame exists.

Limits, stated: two patients whose records are identical share one account (conservative:
the account is charged for both, so each is over-charged, never under-charged); records
changed beyond the canonicalisation above (a value corrected, a feature dropped from the
schema, one patient's records split over two ids) are new data with a fresh account.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd

from fl_core.data.schema import DatasetSchema

_DOMAIN = b"fedpriv-patient-records-v1\x00"
_CELL, _ROW = "\x1f", "\x1e"  # unit / record separators: cannot occur in canonical text


def content_columns(spec: DatasetSchema) -> tuple[str, ...]:
    """The columns a patient's fingerprint covers: the label and every declared feature."""
    return tuple(sorted({spec.label.column, *spec.features}))


def _canonical(column: pd.Series) -> pd.Series:
    """Each cell as canonical text (see the module docstring); vectorised."""
    text = column.astype(str).str.strip()
    number = pd.to_numeric(text, errors="coerce") + 0.0  # + 0.0: -0 becomes 0
    out = text.str.lower()
    is_number = number.notna()
    out[is_number] = number[is_number].map(lambda v: repr(float(v)))
    out[column.isna() | (text == "")] = ""
    return out


def record_fingerprints(frame: pd.DataFrame, spec: DatasetSchema, ids: Any = None
                        ) -> pd.Series:
    """Per patient, the hex SHA-256 of their records' canonical content.

    ``frame`` is a raw clinical table (one row per record); ``ids`` the patient of each row
    (default: ``frame[spec.patient_id]``). Returns a Series indexed by patient id. Rows are
    encoded column-wise (vectorised); only the final per-patient join and hash loop in Python.
    """
    ids = frame[spec.patient_id] if ids is None else ids
    cells = [f"{name}=" + (_canonical(frame[name]) if name in frame.columns
                           else pd.Series("", index=frame.index))
             for name in content_columns(spec)]
    rows = cells[0].str.cat(cells[1:], sep=_CELL) if len(cells) > 1 else cells[0]
    return rows.groupby(pd.Series(ids, index=frame.index), sort=True).agg(
        lambda group: hashlib.sha256(
            _DOMAIN + _ROW.join(sorted(group)).encode()).hexdigest())
