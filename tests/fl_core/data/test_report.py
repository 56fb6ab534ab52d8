"""The per-site data report (fl_core.data.report) on a small table with every reason to
drop a row: counts, prevalence, missingness and the drop reasons per site."""

from __future__ import annotations

import math

import pandas as pd

from fl_core.data.report import INCOMPLETE, LABEL_DROP, data_report
from fl_core.data.schema import parse_schema
from fl_core.data.tables import ClientSplit, Partition

SPEC = parse_schema({
    "id": "tiny", "patient_id": "pid", "site": "centre", "sites": ["A", "B"],
    "records_per_patient": "many",
    "label": {"column": "y", "positive_values": ["yes"], "values": ["yes", "no", "void"],
              "drop_values": ["void"]},
    "max_missing_rate": 1.0,
    "features": {"age": {"type": "numeric", "low": 0, "high": 120, "missing_values": [-1]},
                 "sex": {"type": "categorical", "categories": ["f", "m"], "fill": "f"}},
}, "test")

RAW = pd.DataFrame({
    # patient 1 (A): two rows, one void; 2 (A): incomplete; 3 (B): positive; 4 (B): negative
    # with a "not measured" age; 5 (B): only a void row
    "pid": [1, 1, 2, 3, 4, 5],
    "centre": ["A", "A", "A", "B", "B", "B"],
    "y": ["yes", "void", "no", "yes", "no", "void"],
    "age": [50, 51, None, 40, -1, 30],
    "sex": ["m", "m", "f", None, "f", "m"],
})


def test_counts_prevalence_missingness_and_drop_reasons_per_site() -> None:
    report = data_report(RAW, SPEC, ["age", "sex"], drop_incomplete=True)
    a, b = report.sites
    assert (a.site, a.rows, a.patients) == ("A", 3, 2)
    assert a.dropped_rows == {LABEL_DROP: 1, INCOMPLETE: 1}
    assert (a.kept_rows, a.kept_patients, a.positive_patients, a.dropped_patients) == (1, 1, 1, 1)
    assert a.prevalence == 1.0
    assert math.isclose(a.missing["age"], 1 / 3, rel_tol=1e-5) and a.missing["sex"] == 0.0
    assert (b.rows, b.patients, b.kept_patients, b.positive_patients) == (3, 3, 1, 0)
    # patient 3 has no sex: incomplete; patient 5 only a void row
    assert b.dropped_rows == {LABEL_DROP: 1, INCOMPLETE: 1} and b.dropped_patients == 2
    assert b.prevalence == 0.0
    assert math.isclose(b.not_measured["age"], 1 / 3, rel_tol=1e-5)  # -1: a token, present
    total = report.to_dict()["total"]
    assert total["rows"] == 6 and total["kept_patients"] == 2 and total["prevalence"] == 0.5
    assert total["dropped_rows"] == {LABEL_DROP: 2, INCOMPLETE: 2}


def test_without_drop_incomplete_nothing_is_dropped_for_an_empty_cell() -> None:
    report = data_report(RAW, SPEC, ["age", "sex"], drop_incomplete=False)
    assert [s.dropped_rows[INCOMPLETE] for s in report.sites] == [0, 0]
    assert [s.kept_patients for s in report.sites] == [2, 2]


def test_the_partition_adds_each_sites_train_and_test_patients_and_it_prints() -> None:
    partition = Partition(clients=(ClientSplit("A", (1,), ()), ClientSplit("B", (3,), (4,))),
                          scheme="by_site", seed=0)
    report = data_report(RAW, SPEC, ["age", "sex"], drop_incomplete=False,
                         partition=partition, notes=["synthetic"])
    assert [(s.train_patients, s.test_patients) for s in report.sites] == [(1, 0), (1, 1)]
    text = report.text()
    assert "prevalence" in text and "age 33.3 %" in text and "note: synthetic" in text
    assert "| total | 6 | 5 |" in report.markdown()
