"""Synthetic rows from a schema alone (fl_core.data.synthetic): every schema in data/schemas/
gives rows that pass validation, with its declared ids, sites, labels and records per patient."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.schema_files import load_schema
from fl_core.data.synthetic import SyntheticPlan, split_by_site, synthetic_rows
from tests.conftest import data_config

ROOT = Path(__file__).resolve().parents[3]
SCHEMAS = sorted((ROOT / "data" / "schemas").glob("*.yaml"))


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.stem)
def test_rows_hold_the_declared_ids_sites_and_labels(path: Path) -> None:
    spec = load_schema(path)
    frame = synthetic_rows(spec, SyntheticPlan(patients_per_site=30, seed=1))
    ids = frame[spec.patient_id]
    assert ids.dtype.kind == "i" and ids.min() >= 1
    # every row's raw site value becomes a declared site (site_groups and site_default too)
    assert set(spec.site_values(frame[spec.site])) == set(spec.sites)
    assert set(spec.site_of(frame)) == set(spec.sites)
    per_site = frame.groupby(spec.site_of(frame))[spec.patient_id].nunique()
    assert (per_site == 30).all()
    if spec.records_per_patient == "one":
        assert ids.is_unique
    else:
        # several rows per patient, all at one site (raw values of one site group may differ)
        assert not ids.is_unique
        assert spec.site_values(frame[spec.site]).groupby(ids).nunique().max() == 1
    labels = set(frame[spec.label.column].astype(str))
    if spec.label.values is not None:
        assert labels <= set(spec.label.values)
    assert set(spec.ignore) <= set(frame.columns) and frame[spec.ignore].isna().all().all()
    assert list(frame.columns)[:3] == [spec.patient_id, spec.site, spec.label.column]


def test_the_generator_is_seeded_and_reads_nothing() -> None:
    spec = load_schema(ROOT / "data" / "schemas" / "heart.yaml")
    one = synthetic_rows(spec, SyntheticPlan(patients_per_site=20, seed=7))
    assert one.equals(synthetic_rows(spec, SyntheticPlan(patients_per_site=20, seed=7)))
    assert not one.equals(synthetic_rows(spec, SyntheticPlan(patients_per_site=20, seed=8)))


def test_declared_missing_tokens_and_empty_cells_appear_under_the_limits() -> None:
    spec = load_schema(ROOT / "data" / "schemas" / "heart.yaml")
    frame = synthetic_rows(spec, SyntheticPlan(patients_per_site=400, seed=3))
    site = spec.site_of(frame)
    assert (frame["chol"] == 0).any()  # chol's "not measured" token
    for name in spec.features:
        rates = frame[name].isna().groupby(site).mean()
        assert (rates <= spec.missing_limit(name)).all(), name
    assert frame["age"].isna().any()  # some empty cells: drop_incomplete has work to do


def test_one_file_per_site_keeps_each_sites_rows_only() -> None:
    spec = load_schema(ROOT / "data" / "schemas" / "heart.yaml")
    frame = synthetic_rows(spec, SyntheticPlan(patients_per_site=10))
    parts = split_by_site(spec, frame)
    assert list(parts) == spec.sites
    assert all(set(part[spec.site]) == {site} for site, part in parts.items())
    assert sum(len(p) for p in parts.values()) == len(frame)


@pytest.mark.slow
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(SCHEMAS), seed=st.integers(0, 2**31),
       patients=st.integers(10, 60), drop_incomplete=st.booleans())
def test_any_schema_gives_rows_that_pass_validation(tmp_path: Path, path: Path, seed: int,
                                                     patients: int, drop_incomplete: bool
                                                     ) -> None:
    from adapters.dry_run import write_synthetic
    from adapters.gx_validation import validate_sources
    from adapters.tables import ClinicalTable

    spec = load_schema(path)
    data = data_config(spec=spec, schema=str(path), drop_incomplete=drop_incomplete)
    cfg = _Cfg(data)
    files, rows, _ = write_synthetic(cfg, tmp_path / f"s{seed}", SyntheticPlan(
        patients_per_site=patients, seed=seed))
    if None in files:
        data = data.model_copy(update={"path": str(files[None])})
    else:
        data = data.model_copy(update={"site_files": {s: str(p) for s, p in files.items()}})
    report = validate_sources(data.sources(), data)
    assert report.success, [f.line() for f in report.failures]
    assert sum(report.sites.values()) == rows
    table = ClinicalTable.get(data).table  # and the loader reads them
    assert set(table[spec.site]) <= set(spec.sites) and len(table) > 0


class _Cfg:
    """The part of a PipelineConfig write_synthetic reads."""

    def __init__(self, data: object) -> None:
        self.data = data
