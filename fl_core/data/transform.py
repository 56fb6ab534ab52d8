"""The declared preprocessing of a table: scaling from declared ranges, one-hot categories,
missing indicators (nothing fitted on patients)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from fl_core.config.model import DataConfig, FeatureReference
from fl_core.data.tables import DataError


@dataclass(frozen=True)
class TabularTransform:
    """Declared preprocessing: clipping, scaling and encoding with constants fixed in advance.

    Numeric column j (declared ``low_j, high_j, center_j, scale_j, fill_j`` in the dataset
    schema) becomes ``(clip(x_j, low_j, high_j) − center_j) / scale_j``, a missing value being
    ``fill_j`` first, so every output lies in ``[(low_j − center_j)/scale_j,
    (high_j − center_j)/scale_j]``; each column in ``missing_indicators`` (a feature with
    "not measured" tokens) also gets a 0/1 indicator of missingness. Categorical columns become
    one-hot blocks over their declared ``categories`` (or their ordinal code), booleans 0/1
    (``booleans``: the false and true tokens); a missing category becomes its
    ``missing_category`` default. Nothing is estimated from rows: each output row is a
    function of its input row alone, and :meth:`fit` only checks the columns.
    """

    features: tuple[str, ...]
    reference: dict[str, FeatureReference]
    missing_category: dict[str, str]
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    booleans: dict[str, tuple[str, str]] = field(default_factory=dict)
    one_hot: bool = DataConfig.model_fields["one_hot"].default
    missing_indicators: tuple[str, ...] = ()
    # per feature, the recorded values that mean "not measured" (read as missing)
    missing_tokens: dict[str, tuple[float | str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        undeclared = [f for f in self.features if f not in self.reference and not (
            f in self.missing_category and (f in self.categories or f in self.booleans))]
        if undeclared:
            raise DataError(f"no declared preprocessing for feature(s) {undeclared} "
                            f"(data.schema)")

    @classmethod
    def from_config(cls, config: DataConfig) -> TabularTransform:
        """The transform ``data.*`` and its dataset schema declare."""
        spec = config.spec
        chosen = [spec.feature(f) for f in config.features]
        return cls(features=tuple(config.features), reference=dict(config.reference),
                   missing_category=dict(config.missing_category),
                   categories={n: tuple(f.categories) for n, f in zip(config.features, chosen,
                                                                      strict=True)
                               if f.type == "categorical" and f.categories},
                   booleans={n: f.tokens for n, f in zip(config.features, chosen, strict=True)
                             if f.type == "boolean"},
                   one_hot=config.one_hot, missing_indicators=config.missing_indicators,
                   missing_tokens={n: tuple(f.missing_values) for n, f
                                   in zip(config.features, chosen, strict=True)
                                   if f.missing_values})

    def fit(self, train: pd.DataFrame) -> TabularTransform:
        """Check that ``train`` has the declared columns; read no value. Returns ``self``."""
        self._check_columns(train)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The whole transform as plain JSON-able data (to save beside a model)."""
        return {
            "features": list(self.features),
            "reference": {k: v.model_dump() for k, v in self.reference.items()},
            "missing_category": dict(self.missing_category),
            "categories": {k: list(v) for k, v in self.categories.items()},
            "booleans": {k: list(v) for k, v in self.booleans.items()},
            "one_hot": self.one_hot,
            "missing_indicators": list(self.missing_indicators),
            "missing_tokens": {k: list(v) for k, v in self.missing_tokens.items()},
            "columns": self.columns(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TabularTransform:
        """Inverse of :meth:`state_dict` (the declared constants are validated again)."""
        return cls(features=tuple(state["features"]),
                   reference={k: FeatureReference.model_validate(v)
                              for k, v in state["reference"].items()},
                   missing_category=dict(state["missing_category"]),
                   categories={k: tuple(v) for k, v in state["categories"].items()},
                   booleans={k: (v[0], v[1]) for k, v in state["booleans"].items()},
                   one_hot=bool(state["one_hot"]),
                   missing_indicators=tuple(state["missing_indicators"]),
                   missing_tokens={k: tuple(v) for k, v
                                   in state.get("missing_tokens", {}).items()})

    def columns(self) -> list[str]:
        """The encoded model input columns, in order (``<feature>=<category>``,
        ``<feature>_missing``)."""
        names: list[str] = []
        for col in self.features:
            if col in self.categories and self.one_hot:
                names += [f"{col}={c}" for c in self.categories[col]]
            else:
                names.append(col)
            if col in self.missing_indicators:
                names.append(f"{col}_missing")
        return names

    def transform(self, frame: pd.DataFrame) -> torch.Tensor:
        """``[rows, len(columns())]`` float32, row by row as the class docstring states."""
        self._check_columns(frame)
        blocks: list[np.ndarray] = []
        for col in self.features:
            values = frame[col]
            if col in self.reference:
                blocks.append(_scaled(values, self.reference[col])[:, None])
            elif col in self.booleans:
                filled = values.fillna(self.missing_category[col])
                false, true = self.booleans[col]
                blocks.append(filled.map(lambda v, t=true, f=false: _as_bool(v, t, f))
                              .to_numpy(dtype=float)[:, None])
            else:
                blocks.append(self._encoded(col, values.fillna(self.missing_category[col])))
            if col in self.missing_indicators:
                blocks.append(values.isna().to_numpy().astype(float)[:, None])
        return torch.tensor(np.hstack(blocks), dtype=torch.float32)

    def _encoded(self, col: str, values: pd.Series) -> np.ndarray:
        cats = self.categories[col]
        lookup = {c: i for i, c in enumerate(cats)}
        # a coded column (stage 1-4) is read as numbers; its categories are declared as text
        codes = values.map(lambda v: lookup.get(_token_text(v)))
        if codes.isna().any():
            unknown = sorted(set(values[codes.isna()].astype(str)))
            raise DataError(f"{col}: unknown categor(y/ies) {unknown}; accepted: {list(cats)}")
        index = codes.to_numpy(dtype=int)
        return np.eye(len(cats))[index] if self.one_hot else index[:, None].astype(float)

    def _check_columns(self, frame: pd.DataFrame) -> None:
        absent = [c for c in self.features if c not in frame.columns]
        if absent:
            raise DataError(f"column(s) {absent} missing from the table to transform")


def _scaled(values: pd.Series, ref: FeatureReference) -> np.ndarray:
    """``(clip(x, low, high) − center) / scale``, a missing (or non-numeric) x read as ``fill``."""
    num = pd.to_numeric(values, errors="coerce").astype(float).fillna(ref.fill).to_numpy()
    return (np.clip(num, ref.low, ref.high) - ref.center) / ref.scale


def _token_text(value: object) -> object:
    """A raw cell as the text a schema declares its tokens in: strings as they are, numbers
    without a spurious decimal (pandas reads a coded column as int, or as float when it has
    an empty cell: ``2``, ``2.0`` and ``'2'`` are one token); anything else unchanged."""
    if isinstance(value, str | bool | np.bool_):
        return value
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value) if isinstance(value, float | np.floating) else value


def _as_bool(value: object, true: str, false: str) -> float:
    """1.0 for the true token (case and surrounding blanks ignored), else 0.0. A number that
    is one of the two tokens is read as that token (a 1/2 coding with true token ``2`` reads
    1 as false, not as a truthy number); any other number or a bool (pandas reads TRUE/FALSE
    as one; 0/1 sent for TRUE/FALSE) by its truth value."""
    if isinstance(value, str):
        return 1.0 if value.strip().upper() == true.strip().upper() else 0.0
    text = _token_text(value)
    if isinstance(text, str) and text.upper() in (true.strip().upper(), false.strip().upper()):
        return 1.0 if text.upper() == true.strip().upper() else 0.0
    return float(bool(value))
