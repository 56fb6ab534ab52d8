"""The registered model: an MLflow pyfunc that takes raw rows of the dataset's table and
returns the probability of the positive class (the schema's label rule).

:class:`TabularRiskModel` carries two artifacts, the trained weights (``model.pt``'s dict) and
the declared preprocessing (:meth:`fl_core.data.transform.TabularTransform.state_dict` as
JSON), and the code that uses them (``adapters`` and ``fl_core`` as MLflow ``code_paths``, so
``mlflow models serve --env-manager local`` needs nothing but the project's environment). It
is logged as a model from code (:mod:`adapters.pyfunc_model`): nothing in the registry is a
pickle.

Input: a DataFrame with the raw feature columns of the dataset schema as in the CSV
(``data.features``), e.g. straight from ``pd.read_csv``: numbers (int or float, or their text)
for the numeric and integer features, the category strings or boolean tokens for the others
(heart: ``age`` 63, ``sex`` "Male", ``fbs`` "TRUE"); a boolean also as a bool or 0/1 (number or
text); a category read as a number (``1``) as its text. Extra columns are ignored, order is
free. Any number of rows. The signature declares the columns with MLflow's type ``Any``
(:func:`signature` says why): the model does the checking. Output: one float64 per row, the
probability of the positive class (``sigmoid`` of the network's logit), in [0, 1].

Bad rows are refused, never scored: :class:`InvalidRowsError` (an ``MlflowException`` with
``INVALID_PARAMETER_VALUE``, so the scoring server answers HTTP 400) names every bad row's
index, column and value:

* a numeric value that is missing, not a number or outside the declared range (the dataset
  schema's ``low``/``high``; the transform would clip it: a silently wrong score);
* a category or boolean that is not one of the accepted values;
* a missing column.

The message names the bad cells only, never another row (MLflow's server would otherwise
prefix the whole frame; :class:`InvalidRowsError`).

Two documented imputations of the declared transform are applied, not refused:

* a feature with "not measured" tokens in the schema (``missing_values``; heart: ``chol``
  0): a missing value *or a token* means "not measured", as in the training data; the value
  becomes the declared ``fill`` and the column's ``<col>_missing`` indicator is 1;
* a missing categorical or boolean value becomes the schema's ``fill`` for it, the same rule
  the transform applies in training.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from fl_core.data.transform import TabularTransform
from fl_core.model.networks import build_model, set_flat_params

WEIGHTS, TRANSFORM = "weights", "transform"
_ROOT = Path(__file__).resolve().parent.parent
CODE_PATHS = [str(_ROOT / "adapters"), str(_ROOT / "fl_core")]
MODEL_CODE = _ROOT / "adapters" / "pyfunc_model.py"  # sets a TabularRiskModel
_MAX_LISTED = 20  # problems named in one error message


class InvalidRowsError(MlflowException):
    """Rows that cannot be scored; the message names each row index, column and (shortened)
    value.

    Its ``message`` cannot be replaced: MLflow's scoring server rewrites any
    ``MlflowException`` from ``predict`` as ``Failed to predict data '<the whole frame>'.
    Error: ...`` (``mlflow.pyfunc.scoring_server``), which would send every row's clinical
    values back in the 400 body and into logs. The assignment is ignored, so the body names
    the bad cells only."""

    def __init__(self, problems: list[str]) -> None:
        listed = problems[:_MAX_LISTED]
        more = f"; and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
        self._fixed_message: str | None = None
        super().__init__("cannot score: " + "; ".join(listed) + more,
                         error_code=INVALID_PARAMETER_VALUE)
        self.problems = problems

    @property  # type: ignore[override]
    def message(self) -> str:
        """The message set at construction (class docstring)."""
        return self._fixed_message or ""

    @message.setter
    def message(self, value: str) -> None:
        if self._fixed_message is None:  # the constructor's; later rewrites are ignored
            self._fixed_message = value


def model_from_saved(saved: Mapping[str, Any]) -> torch.nn.Module:
    """The torch model ``model.pt``'s dict describes, in eval mode."""
    model = build_model(saved["kind"], saved["num_features"], hidden_units=saved["hidden_units"])
    if saved.get("opacus_fixed"):  # trained as ModuleValidator.fix rewrote it
        from fl_core.privacy.dpsgd import check_model

        model, _ = check_model(model)
    set_flat_params(model, saved["params"])
    return model.eval()


@dataclass(frozen=True)
class ServedModel:
    """What gets registered: the trained weights and the transform they were trained behind."""

    saved: Mapping[str, Any]  # model.pt's dict: kind, num_features, hidden_units, params, ...
    transform: TabularTransform

    def __post_init__(self) -> None:
        columns = self.saved.get("columns")
        if columns is not None and list(columns) != self.transform.columns():
            raise ValueError(f"the model was trained on columns {list(columns)}, the transform "
                             f"gives {self.transform.columns()}")


class TabularRiskModel(PythonModel):
    """Raw rows → validated → declared transform → network → probability (module docstring)."""

    def load_context(self, context: Any) -> None:
        saved = torch.load(context.artifacts[WEIGHTS], weights_only=True)
        state = json.loads(Path(context.artifacts[TRANSFORM]).read_text(encoding="utf-8"))
        self.transform = TabularTransform.from_state_dict(state)
        ServedModel(saved, self.transform)  # the columns agree
        self.model = model_from_saved(saved)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """P(positive class) per row (float64 in [0, 1]); :class:`InvalidRowsError` for bad
        rows."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(
            model_input)
        clean = validated_rows(frame, self.transform)
        with torch.no_grad():
            logits = self.model(self.transform.transform(clean))
        return torch.sigmoid(logits).reshape(-1).double().numpy()


# --- validation -----------------------------------------------------------------------------


def validated_rows(frame: pd.DataFrame, transform: TabularTransform) -> pd.DataFrame:
    """``frame``'s feature columns ready for ``transform``; raises :class:`InvalidRowsError`
    naming every bad (row, column, value). Applies the two declared imputations only."""
    absent = [c for c in transform.features if c not in frame.columns]
    if absent:
        raise InvalidRowsError([f"column {c!r} is missing" for c in absent])
    problems: list[str] = []
    clean = {}
    for col in transform.features:
        if col in transform.reference:
            clean[col] = _numeric(frame[col], col, transform, problems)
        else:
            clean[col] = _category(frame[col], col, transform, problems)
    if problems:
        raise InvalidRowsError(problems)
    return pd.DataFrame(clean, index=frame.index)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        not isinstance(value, str) and bool(pd.isna(value)))


def _numeric(values: pd.Series, col: str, transform: TabularTransform,
             problems: list[str]) -> pd.Series:
    """Floats; NaN only where the schema declares the value not measured (its
    ``missing_values``, e.g. chol 0)."""
    ref = transform.reference[col]
    imputed = col in transform.missing_indicators
    tokens = transform.missing_tokens.get(col, ())
    out = pd.Series(np.nan, index=values.index, dtype=float)
    for pos, (row, value) in enumerate(values.items()):
        if _missing(value):
            if not imputed:
                problems.append(f"row {row}, column {col!r}: missing value (required)")
            continue
        number = _as_number(value)
        if number is None:
            problems.append(f"row {row}, column {col!r}: {_shown(value)} is not a number")
        elif imputed and number in tokens:
            continue  # declared "not measured" (the schema's missing_values)
        elif not ref.low <= number <= ref.high:
            problems.append(f"row {row}, column {col!r}: {_shown(value)} is outside the declared "
                            f"range [{ref.low:g}, {ref.high:g}]")
        else:
            out.iloc[pos] = number
    return out


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _category(values: pd.Series, col: str, transform: TabularTransform,
              problems: list[str]) -> pd.Series:
    """Accepted category strings; None where missing (the transform's declared default).
    A cell ``pd.read_csv`` or JSON typed as a number or bool is read as the CSV's text first
    (``1`` → "1"), so a consumer sends what the file holds."""
    boolean = col in transform.booleans
    accepted = transform.booleans[col] if boolean else transform.categories[col]
    out = pd.Series(None, index=values.index, dtype=object)
    for pos, (row, value) in enumerate(values.items()):
        if _missing(value):
            continue  # the schema's fill, applied by the transform
        text = _bool_text(value, accepted) if boolean else _as_text(value, ("FALSE", "TRUE"))
        if text not in accepted:
            problems.append(f"row {row}, column {col!r}: unknown value {_shown(value)}; "
                            f"accepted: {', '.join(accepted)}")
        else:
            out.iloc[pos] = text
    return out


_FALSE_TRUE = (("0", "FALSE", "F", "NO"), ("1", "TRUE", "T", "YES"))  # 0/1 and bool spellings


def _bool_text(value: Any, tokens: tuple[str, str]) -> Any:
    """A boolean cell as its declared token (``tokens``: false, true): the token in any case
    (also where pandas read a ``0``/``1`` token column as numbers), else a bool or a 0/1
    number or text (``True``, ``1``, ``"0"``, ``"true"``) by its truth; anything else
    unchanged (refused by the caller)."""
    if isinstance(value, bool | np.bool_):
        return tokens[1] if value else tokens[0]
    text = _as_text(value, tokens)
    if text is None:
        return value
    folded = text.strip().upper()
    for token in tokens:
        if folded == token.strip().upper():
            return token
    for token, spellings in zip(tokens, _FALSE_TRUE, strict=True):
        if folded in spellings:
            return token
    return value


def _shown(value: Any, limit: int = 40) -> str:
    """``value`` as named in an error: its repr, cut to ``limit`` characters (the message
    identifies the cell; it need not return a long free text)."""
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def as_model_input(frame: pd.DataFrame, transform: TabularTransform) -> pd.DataFrame:
    """``frame``'s feature columns as the CSV's text and numbers: integer columns as float;
    categorical and boolean columns as the CSV's text (``TRUE``/``FALSE`` cells read as bool,
    ``0``/``1`` tokens read as numbers), missing cells as None. Not needed to call the model
    (its ``predict`` reads a frame straight from ``pd.read_csv``, :func:`validated_rows`);
    kept for callers that want the text form, e.g. to send JSON strings."""
    out = {}
    for col in transform.features:
        values = frame[col]
        if col in transform.reference:
            kind = values.dtype.kind
            out[col] = values.astype(float) if kind in "iu" else values
        else:
            tokens = transform.booleans.get(col, ("FALSE", "TRUE"))
            out[col] = values.astype(object).map(lambda v, t=tokens: _as_text(v, t))
    return pd.DataFrame(out, index=frame.index)


def _as_text(value: Any, tokens: tuple[str, str]) -> str | None:
    """A categorical or boolean cell as the text the CSV holds: ``pd.read_csv`` reads a
    column of ``0``/``1`` tokens as int64 (or float64 where a cell is empty) and
    ``TRUE``/``FALSE`` as bool."""
    if _missing(value):
        return None
    if isinstance(value, bool | np.bool_):
        return _bool_text(value, tokens)
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


# --- logging --------------------------------------------------------------------------------


def signature(transform: TabularTransform) -> Any:
    """The raw feature columns by name, each of MLflow's type ``Any`` and optional; one double
    out.

    Why not ``double``/``string``: MLflow enforces a typed signature before ``predict`` runs
    and refuses what ``pd.read_csv`` gives for valid rows (an int64 ``age`` for a double, an
    int64 ``0``/``1`` column or a bool for a string); and every refusal it raises quotes the
    whole input frame (``Failed to enforce schema of data '<frame>'``), other patients'
    values included. The model checks and coerces each cell itself (:func:`validated_rows`)
    and names only the bad ones. Optional for the same reason: a missing column is named by
    the model, not by MLflow with the frame. MLflow still selects the named columns (extra
    ones are dropped) and orders them."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema([ColSpec(AnyType(), c, required=False) for c in transform.features])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double")]))


def declared_example(transform: TabularTransform, rows: int = 3) -> pd.DataFrame:
    """An input example made of declared constants, no patient's record (the registry is not
    covered by the privacy guarantee's data handling): numeric values at the declared centre
    and half a scale either side, categories in turn."""
    records = []
    for i in range(rows):
        record: dict[str, Any] = {}
        for col in transform.features:
            if col in transform.reference:
                ref = transform.reference[col]
                value = ref.center + (i - 1) * ref.scale / 2
                record[col] = float(min(max(value, ref.low), ref.high))
            else:
                accepted = transform.booleans.get(col) or transform.categories[col]
                record[col] = accepted[i % len(accepted)]
        records.append(record)
    return pd.DataFrame(records, columns=list(transform.features))


def log_served_model(served: ServedModel, step: int) -> Any:
    """Log ``served`` as the pyfunc ``model`` of the active run (a model from code:
    :mod:`adapters.pyfunc_model`); return its ModelInfo."""
    import mlflow
    import mlflow.pyfunc

    # what importing this module and fl_core.data.tables pulls in (for env managers other than
    # local; opacus only to rebuild a model that ModuleValidator.fix rewrote)
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"numpy=={np.__version__}", f"pandas=={pd.__version__}", "pydantic", "pyyaml",
                    "scipy", *(["opacus"] if served.saved.get("opacus_fixed") else [])]
    with tempfile.TemporaryDirectory(prefix="fedpriv-model-") as tmp:
        weights, transform = Path(tmp) / "model.pt", Path(tmp) / "transform.json"
        torch.save(dict(served.saved), weights)
        transform.write_text(json.dumps(served.transform.state_dict(), indent=1) + "\n",
                             encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={WEIGHTS: str(weights), TRANSFORM: str(transform)},
            code_paths=CODE_PATHS,
            signature=signature(served.transform),
            input_example=declared_example(served.transform),
            pip_requirements=requirements,
            step=step,
        )

