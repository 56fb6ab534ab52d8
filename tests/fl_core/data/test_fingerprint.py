"""The fingerprint of a patient's records: the content, not the id, the site or the layout."""

from __future__ import annotations

import pandas as pd

from fl_core.data.fingerprint import content_columns, record_fingerprints
from tests.conftest import data_config

SPEC = data_config(path="unused.csv").spec


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "id": [1, 2, 2, 3],
        "dataset": ["Cleveland", "Hungary", "Hungary", "Cleveland"],
        "age": [63, 67, 67, 41], "sex": ["Male", "Female", "Female", "Male"],
        "cp": ["typical angina", "asymptomatic", "asymptomatic", "non-anginal"],
        "trestbps": [145, 160, 160, None], "chol": [233, 286, 0, 204],
        "fbs": [True, False, False, None], "restecg": ["normal"] * 4,
        "thalch": [150, 108, 108, 172], "exang": [False, True, True, False],
        "oldpeak": [2.3, 1.5, 1.4, 1.4], "num": [0, 2, 2, 0],
    })


def _keys(frame: pd.DataFrame) -> list[str]:
    return record_fingerprints(frame, SPEC).tolist()


def test_the_columns_are_the_label_and_the_declared_features_not_id_or_site() -> None:
    columns = content_columns(SPEC)
    assert SPEC.label.column in columns and set(SPEC.features) <= set(columns)
    assert SPEC.patient_id not in columns and SPEC.site not in columns
    assert not set(SPEC.ignore) & set(columns)


def test_renumbered_ids_and_renamed_sites_keep_the_keys() -> None:
    frame = _frame()
    moved = frame.assign(id=frame["id"] + 100_000,
                         dataset=frame["dataset"].str.lower().map(lambda s: f"  {s} "))
    assert _keys(moved) == _keys(frame)
    assert len(set(_keys(frame))) == 3


def test_layout_does_not_matter_rows_columns_number_and_token_spelling() -> None:
    frame = _frame()
    shuffled = frame.iloc[[3, 2, 0, 1]][list(reversed(frame.columns))]
    assert _keys(shuffled) == _keys(frame)
    extra = frame.assign(slope="flat", comment=["a", "b", "c", "d"])  # undeclared/ignored
    assert _keys(extra) == _keys(frame)
    spelled = frame.astype(str).replace({"True": " TRUE", "False": "false", "nan": ""})
    spelled["age"] = frame["age"].map(lambda v: f"{v}.00")
    spelled["oldpeak"] = frame["oldpeak"].map(lambda v: f"+{v}0")
    assert _keys(spelled) == _keys(frame)


def test_a_changed_value_is_a_new_account_and_identical_records_share_one() -> None:
    frame = _frame()
    changed = frame.copy()
    changed.loc[0, "age"] = 64
    assert _keys(changed)[0] != _keys(frame)[0] and _keys(changed)[1:] == _keys(frame)[1:]
    twin = pd.concat([frame, frame.iloc[[0]].assign(id=9)], ignore_index=True)
    keys = record_fingerprints(twin, SPEC)
    assert keys[9] == keys[1]  # conservative: one account charged for both


def test_a_patients_records_are_one_key_over_all_rows() -> None:
    frame = _frame()
    one_row = frame[~((frame["id"] == 2) & (frame["chol"] == 0))]
    assert record_fingerprints(one_row, SPEC)[2] != record_fingerprints(frame, SPEC)[2]
