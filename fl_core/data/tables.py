"""Loading, patient-based partitioning and transforms for the clinical table.

The raw CSV is immutable input. :class:`ClinicalTable` reads it lazily, once per dataset
key, and is the only global state in ``fl_core`` (a documented cache: a class-level map of
instances guarded by a lock). Partitioning works on *patients*: every record of a patient goes
to exactly one client and to one side of that client's train/test split.

Column names, the label rule and "not measured" tokens come from the dataset schema
(``data.schema``, :mod:`fl_core.data.schema`). Preprocessing (clipping, scaling, filling missing
values, one-hot encoding) is *declared* there too, never fitted: no statistic of any patient,
training or test, reaches the model through it, so it spends no privacy (docs/privacy.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fl_core.data.schema import LabelRule

LABEL = "label"
"""The binary label column of the cleaned table (the schema's label rule applied)."""


class DataError(ValueError):
    """The data cannot be loaded or partitioned as configured."""


@dataclass(frozen=True)
class ClientSplit:
    """The patients of one client, by side of its train/test split."""

    client_id: str
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]


@dataclass(frozen=True)
class Partition:
    """Patients → clients, and per client the 80/20 split. Serialisable to JSON."""

    clients: tuple[ClientSplit, ...]
    scheme: str
    seed: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "scheme": self.scheme,
                "seed": self.seed,
                "clients": [
                    {"client_id": c.client_id, "train": list(c.train_ids), "test": list(c.test_ids)}
                    for c in self.clients
                ],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Partition:
        raw = json.loads(text)
        clients = tuple(
            ClientSplit(c["client_id"], tuple(c["train"]), tuple(c["test"])) for c in raw["clients"]
        )
        return cls(clients=clients, scheme=raw["scheme"], seed=raw["seed"])


@dataclass(frozen=True)
class ClientData:
    """One client's encoded tensors. ``x_*`` are float32 ``[patients, features]``."""

    client_id: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    # the patient id of each x_train row (None: one row per patient, in train_ids order)
    train_patients: torch.Tensor | None = None
    # the patient id of each x_test row (None: one row per patient, in test_ids order)
    test_patients: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    def patient_ids(self) -> torch.Tensor:
        """The patient id of each training row: the privacy unit of DP-SGD."""
        if self.train_patients is not None:
            return self.train_patients
        return torch.tensor(self.train_ids, dtype=torch.int64)

    def test_patient_ids(self) -> torch.Tensor:
        """The patient id of each test row (the membership audit's non-member unit)."""
        if self.test_patients is not None:
            return self.test_patients
        return torch.tensor(self.test_ids, dtype=torch.int64)


def strip_text_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the blanks around every text cell removed, a blank-only cell missing.

    R and spreadsheet exports pad factor levels ("8-12 yrs "): the schema's categories, tokens
    and label values are declared without the padding, and a padded cell is the same value."""
    out = frame.copy()
    for col in out.select_dtypes(include=["object", "string"]).columns:
        values = out[col]
        is_text = values.map(lambda v: isinstance(v, str)).astype(bool)
        if not is_text.any():
            continue  # e.g. True/False objects pandas parsed: left as they are
        stripped = values.copy()
        stripped[is_text] = values[is_text].str.strip()
        out[col] = stripped.mask(is_text & (stripped == ""))
    return out


def not_measured(values: pd.Series, tokens: list[float | str]) -> pd.Series:
    """Where ``values`` holds one of the schema's "not measured" ``tokens`` (numbers compare
    as numbers, text as stripped text)."""
    numbers = [t for t in tokens if isinstance(t, int | float)]
    texts = {str(t).strip() for t in tokens if not isinstance(t, int | float)}
    mask = pd.to_numeric(values, errors="coerce").isin(numbers) if numbers else \
        pd.Series(False, index=values.index)
    if texts:
        mask |= values.astype(str).str.strip().isin(texts) & values.notna()
    return mask


def binary_label(values: pd.Series, rule: LabelRule) -> pd.Series:
    """The schema's label rule applied to the raw label column: int64 0/1."""
    comparison = rule.comparison()
    if comparison is not None:
        op, number = comparison
        return op(pd.to_numeric(values), number).astype(np.int64)
    positive = set(rule.positive_values or [])
    return values.astype(str).str.strip().isin(positive).astype(np.int64)
