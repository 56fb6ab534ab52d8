"""Preprocessing spends no privacy: it is declared, never fitted (issue 11).

The DP-SGD sensitivity C and parallel composition over sites hold only if removing a patient
changes nothing but that patient's own gradient. These tests check that the released
transform, and what it makes of every other patient, do not depend on who is in the data.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.config_files import load_config
from adapters.tables import ClinicalTable
from fl_core.config.model import ConfigError, FeatureReference
from fl_core.data.schema import NUMERIC_TYPES
from fl_core.data.tables import DataError, Partition
from fl_core.data.transform import TabularTransform
from tests.conftest import data_config

ROOT = Path(__file__).resolve().parents[3]
SPEC = data_config().spec  # data/schemas/heart.yaml
CORE_FEATURES = tuple(SPEC.features)
NUMERIC_FEATURES = SPEC.of_type(*NUMERIC_TYPES)
BOOLEAN_FEATURES = SPEC.of_type("boolean")
CATEGORIES = {n: tuple(f.categories or ()) for n, f in SPEC.features.items()
              if f.type == "categorical"}


@pytest.fixture(autouse=True)
def fresh_cache():
    ClinicalTable.clear_cache()
    yield
    ClinicalTable.clear_cache()


def _without(partition: Partition, patient: int) -> Partition:
    clients = tuple(
        type(c)(c.client_id, tuple(i for i in c.train_ids if i != patient), c.test_ids)
        for c in partition.clients)
    return Partition(clients=clients, scheme=partition.scheme, seed=partition.seed)


def test_removing_any_of_50_training_patients_changes_nothing_released(raw_csv: Path) -> None:
    config = data_config(path=str(raw_csv))
    loader = ClinicalTable.get(config)
    partition = loader.partition(config, 0)
    full = loader.fit_transform(config, partition)
    full_state = json.dumps(full.state_dict(), sort_keys=True)
    full_data = {d.client_id: d for d in loader.client_data(partition, full)}
    train_ids = sorted(i for c in partition.clients for i in c.train_ids)
    removed = train_ids[:: len(train_ids) // 50][:50]  # spread over all four sites
    assert len(removed) == 50
    ages = loader.table.set_index("id")["age"].astype(float)
    # the check has power: a fitted training mean moves when one of these patients leaves
    assert any(ages.loc[[i for i in train_ids if i != p]].mean() != ages.loc[train_ids].mean()
               for p in removed)
    for patient in removed:
        smaller = _without(partition, patient)
        transform = loader.fit_transform(config, smaller)
        assert json.dumps(transform.state_dict(), sort_keys=True) == full_state
        for d in loader.client_data(smaller, transform):
            before = full_data[d.client_id]
            kept = torch.tensor([i != patient for i in before.train_ids])
            assert torch.equal(d.x_train, before.x_train[kept])
            assert torch.equal(d.x_test, before.x_test)


@st.composite
def references(draw: st.DrawFn) -> dict[str, FeatureReference]:
    """Arbitrary valid declarations: [low, high], any centre, positive scale, fill inside."""
    out = {}
    for col in NUMERIC_FEATURES:
        low = draw(st.floats(-1e4, 1e4))
        high = low + draw(st.floats(1e-3, 1e4))
        center = draw(st.floats(-1e4, 1e4))
        scale = draw(st.floats(1e-2, 1e4))
        fill = draw(st.floats(low, high))
        out[col] = FeatureReference(low=low, high=high, center=center, scale=scale, fill=fill)
    return out


ABSURD = st.sampled_from([1e9, -1e9, -1.0, 0.0, 1e300, -1e300])
NUMBER = st.one_of(st.none(), ABSURD, st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def tables(draw: st.DrawFn) -> pd.DataFrame:
    """1..12 rows of arbitrary finite (or absurd, or missing) values of the core features."""
    n = draw(st.integers(1, 12))
    columns: dict[str, list[object]] = {}
    for col in CORE_FEATURES:
        if col in NUMERIC_FEATURES:
            values = st.one_of(NUMBER)
        elif col in BOOLEAN_FEATURES:
            values = st.sampled_from([None, "TRUE", "FALSE"])
        else:
            values = st.sampled_from([None, *CATEGORIES[col]])
        columns[col] = draw(st.lists(values, min_size=n, max_size=n))
    return pd.DataFrame(columns)


@settings(max_examples=60, deadline=None)
@given(table=tables(), reference=st.one_of(st.just(None), references()),
       one_hot=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_output_is_a_bounded_function_of_each_row_alone(
    table: pd.DataFrame, reference: dict[str, FeatureReference] | None, one_hot: bool, seed: int
) -> None:
    declared = reference or data_config().reference
    transform = replace(TabularTransform.from_config(data_config()), reference=declared,
                        one_hot=one_hot)
    assert transform.missing_indicators == ("chol",)
    batch = transform.transform(table).numpy()
    assert batch.shape == (len(table), len(transform.columns()))
    assert np.isfinite(batch).all()
    for i in range(len(table)):  # alone == in a batch
        assert np.array_equal(transform.transform(table.iloc[[i]]).numpy()[0], batch[i])
    perm = np.random.default_rng(seed).permutation(len(table))  # permuting permutes
    assert np.array_equal(transform.transform(table.iloc[perm]).numpy(), batch[perm])
    names = transform.columns()
    for col in NUMERIC_FEATURES:  # bounded by the declared range, whatever came in
        ref = declared[col]
        lo, hi = (ref.low - ref.center) / ref.scale, (ref.high - ref.center) / ref.scale
        values = batch[:, names.index(col)].astype(float)
        slack = 1e-6 * max(1.0, abs(lo), abs(hi))  # float32 rounding
        assert (values >= lo - slack).all() and (values <= hi + slack).all(), (col, values)


def test_missing_values_take_the_declared_defaults() -> None:
    config = data_config()
    transform = TabularTransform.from_config(config)
    row = pd.DataFrame([{col: None for col in CORE_FEATURES}])
    x = dict(zip(transform.columns(), transform.transform(row)[0].tolist(), strict=True))
    for col in NUMERIC_FEATURES:
        ref = config.reference[col]
        assert x[col] == pytest.approx((ref.fill - ref.center) / ref.scale)
    assert x["chol_missing"] == 1.0
    assert x["cp=asymptomatic"] == 1.0 and x["restecg=normal"] == 1.0
    assert x["sex=Female"] == 1.0 and x["fbs"] == 0.0 and x["exang"] == 0.0


def test_range_only_declaration_scales_to_minus_one_one() -> None:
    ref = FeatureReference.model_validate({"low": 50, "high": 230})
    assert (ref.center, ref.scale, ref.fill) == (140, 90, 140)
    transform = TabularTransform(features=("thalch",), reference={"thalch": ref},
                                 missing_category={})
    out = transform.transform(pd.DataFrame({"thalch": [50, 230, 140, -1e9, 1e9, None]}))
    assert out[:, 0].tolist() == [-1.0, 1.0, 0.0, -1.0, 1.0, 0.0]


def test_state_dict_round_trips_through_json(raw_csv: Path) -> None:
    transform = TabularTransform.from_config(data_config())
    state = json.loads(json.dumps(transform.state_dict()))
    again = TabularTransform.from_state_dict(state)
    assert again == transform and state["columns"] == transform.columns()
    table = ClinicalTable.get(data_config(path=str(raw_csv))).table
    assert torch.equal(again.transform(table), transform.transform(table))


def test_incomplete_patients_for_the_audit_encode_within_bounds(raw_csv: Path) -> None:
    config = data_config(path=str(raw_csv))
    incomplete = ClinicalTable.get(config).incomplete_table
    assert len(incomplete) == 180
    x = TabularTransform.from_config(config).transform(incomplete)
    assert x.shape == (180, 17) and torch.isfinite(x).all()
    widest = max(max(abs(r.low - r.center), abs(r.high - r.center)) / r.scale
                 for r in config.reference.values())
    assert x.abs().max() <= widest


@pytest.mark.parametrize("item, fragment", [
    ("schema.features.age.low=120", r"features.age: low=120 must be below high=100"),
    ("schema.features.chol.scale=0", r"features.chol.scale: Input should be greater than 0"),
    ("schema.features.chol.scale=-2", r"features.chol.scale: Input should be greater"),
    ("schema.features.age.fill=300", r"features.age: fill=300.0 must be a number in \[low, high\]"),
    ("schema.features.oldpeak.center=.inf", r"features.oldpeak.center: .*finite"),
    ("schema.features.age={type: numeric, high: 100}",
     r"features.age: a numeric feature needs numbers low and high"),
    ("schema.features.cp.fill=unknown", r"features.cp: fill='unknown' is not a value"),
    ("schema.features.fbs.fill=maybe", r"fbs: fill='maybe'.*accepted: FALSE, TRUE"),
    ("schema.features.age.categories=[young]", r"features.age: categories: not a key of a numeric"),
    ("data.features=[age, shoe_size]", r"data: unknown feature\(s\) \['shoe_size'\]"),
    ("data.reference.age.low=120", r"data.reference: unknown key.*dataset schema"),
    ("data.missing_category.cp=unknown", r"data.missing_category: unknown key.*dataset schema"),
    ("data.impute=mean", r"data.impute: unknown key"),
    ("data.scale=standard", r"data.scale: unknown key"),
])
def test_bad_declarations_name_the_key(item: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(ROOT / "params.yaml", [item])


def test_a_transform_without_a_declaration_is_refused() -> None:
    with pytest.raises(DataError, match=r"no declared preprocessing for feature\(s\) \['age'\]"):
        TabularTransform(features=("age", "sex"), reference={},
                          missing_category={"age": "x", "sex": "Male"},
                          categories={"sex": ("Female", "Male")})


def test_a_smaller_table_declares_only_its_features() -> None:
    cfg = load_config(ROOT / "params.yaml", [
        "data.features=[age, sex]", "schema.features.age={type: numeric, low: 18, high: 100}",
        "schema.features.sex.fill=Male"])
    transform = TabularTransform.from_config(cfg.data)
    assert transform.columns() == ["age", "sex=Female", "sex=Male"]
    out = transform.transform(pd.DataFrame({"age": [59, None], "sex": ["Female", None]}))
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_numerically_coded_tokens_are_read_as_their_declared_text() -> None:
    """A coded column (histology 1/2 with true token '2'; stage 1-4 declared as text) is read
    by pandas as numbers, as floats when it has an empty cell: each number is its token, not
    a truthy value (1 and 2 were both "true"), and a category matches its declared text."""
    transform = TabularTransform(
        features=("histol", "stage", "flag"), reference={},
        missing_category={"histol": "1", "stage": "1", "flag": "FALSE"},
        categories={"stage": ("1", "2", "3")},
        booleans={"histol": ("1", "2"), "flag": ("FALSE", "TRUE")}, one_hot=False)
    frame = pd.DataFrame({"histol": [1, 2, 2.0, np.nan], "stage": [1, 3.0, 2, np.nan],
                          "flag": [True, False, 1, 0]})
    out = transform.transform(frame).numpy()
    assert out[:, 0].tolist() == [0.0, 1.0, 1.0, 0.0]  # the empty cell takes the fill '1'
    assert out[:, 1].tolist() == [0.0, 2.0, 1.0, 0.0]
    assert out[:, 2].tolist() == [1.0, 0.0, 1.0, 0.0]  # bools and 0/1 for TRUE/FALSE as before
