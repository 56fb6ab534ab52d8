"""Tests of fl_core.data.validation: the GX suite passes the real file and names every defect."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from adapters.gx_validation import validate_file
from fl_core.config.model import ConfigError, DataConfig
from fl_core.data.validation import (
    ALL_SITES,
    DataValidationError,
    FailedExpectation,
    SchemaMismatchError,
    ValidationReport,
    raise_if_failed,
)
from tests.conftest import data_config

REAL = Path(__file__).resolve().parents[2] / "data" / "raw" / "heart_disease_uci.csv"
SITE_ROWS = {"Cleveland": 304, "Hungary": 293, "VA Long Beach": 200, "Switzerland": 123}
# Measured on the real file: the sparsest feature per site is Switzerland's fbs (75 of 123 empty,
# 61.0 %), then VA Long Beach's trestbps/oldpeak (28.0 %). A uniform limit of 0.2 rejects the
# real file (see test_uniform_missing_rate_rejects_the_real_file); the defaults carry per-feature
# limits for those sparse features and 0.1 for the rest (data/schemas/heart.yaml).
DATA = data_config()


def uniform_missing_limit(data: DataConfig, limit: float) -> DataConfig:
    """``data`` with one missing-rate limit for every feature (no per-feature limits)."""
    features = {n: f.model_copy(update={"max_missing_rate": None})
                for n, f in data.spec.features.items()}
    spec = data.spec.model_copy(update={"max_missing_rate": limit, "features": features})
    return data.model_copy(update={"spec": spec})

NOT_NULL = "expect_column_values_to_not_be_null"
REGEX = "expect_column_values_to_match_regex"
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
UNIQUE = "expect_column_values_to_be_unique"


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    """The real table as text, empty cells kept as "" so that it round-trips unchanged."""
    return pd.read_csv(REAL, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def real_report() -> ValidationReport:
    return validate_file(REAL, DATA)


def write(tmp_path: Path, frame: pd.DataFrame, name: str = "broken.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def rows(frame: pd.DataFrame, site: str) -> pd.Index:
    return frame.index[frame["dataset"] == site]


def keys(report: ValidationReport) -> set[tuple[str, str | None, str]]:
    return {(f.site, f.column, f.expectation) for f in report.failures}


def only(report: ValidationReport) -> FailedExpectation:
    assert not report.success
    assert len(report.failures) == 1, report.message()
    return report.failures[0]


# ------------------------------------------------------------------------------ real data
def test_real_file_passes(real_report: ValidationReport) -> None:
    assert real_report.success, real_report.message()
    assert real_report.failures == ()
    assert real_report.sites == SITE_ROWS
    assert "passed" in real_report.message()
    # the results are the artifact of record: strict JSON, one entry per site and the table
    text = json.dumps(real_report.results, allow_nan=False)
    assert set(json.loads(text)) == {"file", ALL_SITES, *SITE_ROWS}
    assert real_report.results[ALL_SITES]["success"] is True
    for site in SITE_ROWS:
        assert real_report.results[site]["values"]["success"] is True
        assert real_report.results[site]["ranges"]["success"] is True


def test_unchanged_copy_passes(tmp_path: Path, raw: pd.DataFrame) -> None:
    report = validate_file(write(tmp_path, raw, "copy.csv"), DATA)
    assert report.success, report.message()
    assert report.sites == SITE_ROWS


def test_uniform_missing_rate_rejects_the_real_file() -> None:
    report = validate_file(REAL, uniform_missing_limit(DATA, 0.2))
    assert keys(report) == {
        ("Switzerland", "fbs", NOT_NULL),
        ("VA Long Beach", "trestbps", NOT_NULL),
        ("VA Long Beach", "thalch", NOT_NULL),
        ("VA Long Beach", "exang", NOT_NULL),
        ("VA Long Beach", "oldpeak", NOT_NULL),
    }
    fbs = next(f for f in report.failures if f.column == "fbs")
    assert fbs.observed == pytest.approx(75 / 123, abs=1e-4)
    assert "75 of 123" in fbs.detail


# ------------------------------------------------------------------------------ file level
def test_missing_file(tmp_path: Path) -> None:
    failure = only(validate_file(tmp_path / "nope.csv", DATA))
    assert (failure.site, failure.expectation) == (ALL_SITES, "file_exists")
    assert "nope.csv" in str(failure.observed)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    report = validate_file(path, DATA)
    failure = only(report)
    assert (failure.site, failure.expectation, failure.observed) == (
        ALL_SITES, "file_not_empty", 0)
    assert report.sites == {}
    assert "empty" in report.message()


def test_header_only_file(tmp_path: Path, raw: pd.DataFrame) -> None:
    report = validate_file(write(tmp_path, raw.iloc[:0], "header.csv"), DATA)
    failure = only(report)
    assert (failure.site, failure.expectation, failure.observed) == (
        ALL_SITES, "file_has_rows", 0)
    assert "no data rows" in report.message()


def test_unparseable_csv(tmp_path: Path, raw: pd.DataFrame) -> None:
    path = write(tmp_path, raw.head(5), "ragged.csv")
    with path.open("a") as fh:
        fh.write("6,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19\n")
    failure = only(validate_file(path, DATA))
    assert (failure.site, failure.expectation) == (ALL_SITES, "file_parses_as_csv")
    assert "cannot be parsed as CSV" in failure.detail


def test_missing_column(tmp_path: Path, raw: pd.DataFrame) -> None:
    report = validate_file(write(tmp_path, raw.drop(columns=["chol"])), DATA)
    failure = only(report)
    assert (failure.site, failure.column, failure.expectation) == (
        ALL_SITES, "chol", "required_column_present")
    assert "chol" not in failure.observed  # observed: the header that was found
    assert "'chol'" in report.message()
    assert ALL_SITES not in report.results  # GX did not run


def test_required_columns_follow_the_configured_features(
    tmp_path: Path, raw: pd.DataFrame
) -> None:
    features = [f for f in DATA.features if f != "chol"]
    data = data_config(features=features)
    report = validate_file(write(tmp_path, raw.drop(columns=["chol"])), data)
    assert report.success, report.message()
    assert report.sites == SITE_ROWS


# ------------------------------------------------------------------------------ table level
def test_unknown_site(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    frame.loc[rows(frame, "Cleveland")[:2], "dataset"] = "Mars General"
    report = validate_file(write(tmp_path, frame), DATA)
    failure = only(report)
    assert (failure.site, failure.column, failure.expectation) == (ALL_SITES, "dataset", IN_SET)
    assert failure.observed == ["Mars General"]
    assert "Mars General" in report.message()
    # the unknown site is not validated as a site; the known ones still are
    assert report.sites == {**SITE_ROWS, "Cleveland": 302}


def test_duplicated_patient_id(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    hungary = rows(frame, "Hungary")
    frame.loc[hungary[7], "id"] = frame.loc[rows(frame, "Cleveland")[3], "id"]  # id "4"
    report = validate_file(write(tmp_path, frame), DATA)
    failure = only(report)
    assert (failure.site, failure.column, failure.expectation) == (ALL_SITES, "id", UNIQUE)
    assert failure.observed == ["4"]
    assert "'4'" in report.message()


# ------------------------------------------------------------------------------ per site
def test_text_in_numeric_column(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    frame.loc[rows(frame, "Cleveland")[10], "age"] = "abc"
    report = validate_file(write(tmp_path, frame), DATA)
    failure = only(report)
    assert (failure.site, failure.column, failure.expectation) == ("Cleveland", "age", REGEX)
    assert failure.observed == ["abc"]
    assert "must be a number" in failure.detail
    line = report.message().splitlines()[1]
    assert "[Cleveland] age" in line and "'abc'" in line


def test_out_of_range_age(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    frame.loc[rows(frame, "Hungary")[0], "age"] = "150"
    report = validate_file(write(tmp_path, frame), DATA)
    failure = only(report)
    assert (failure.site, failure.column, failure.expectation) == ("Hungary", "age", BETWEEN)
    assert failure.observed == [150.0]
    assert "[18.0, 100.0]" in failure.detail
    assert "[Hungary] age" in report.message() and "150" in report.message()


def test_zero_cholesterol_is_allowed(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    frame.loc[rows(frame, "Cleveland")[:50], "chol"] = "0"
    report = validate_file(write(tmp_path, frame), DATA)
    assert report.success, report.message()


def test_categories_booleans_and_labels(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    frame.loc[rows(frame, "Cleveland")[0], "sex"] = "Unknown"
    frame.loc[rows(frame, "Switzerland")[0], "fbs"] = "yes"
    frame.loc[rows(frame, "VA Long Beach")[0], "num"] = "7"
    report = validate_file(write(tmp_path, frame), DATA)
    assert keys(report) == {
        ("Cleveland", "sex", IN_SET),
        ("Switzerland", "fbs", IN_SET),
        (ALL_SITES, "num", IN_SET),
    }
    observed = {f.column: f.observed for f in report.failures}
    assert observed == {"sex": ["Unknown"], "fbs": ["yes"], "num": ["7"]}
    assert len(report.message().splitlines()) == 4


def with_missing_values(data: DataConfig, **tokens: list) -> DataConfig:
    """``data`` with "not measured" tokens declared for the named features."""
    features = {n: f.model_copy(update={"missing_values": tokens.get(n, f.missing_values)})
                for n, f in data.spec.features.items()}
    spec = data.spec.model_copy(update={"features": features})
    return data.model_copy(update={"spec": spec})


def test_missing_values_are_accepted_for_every_feature_type(tmp_path: Path,
                                                            raw: pd.DataFrame) -> None:
    """R writes a missing factor as ``NA_NA``: declared in ``missing_values`` it is a
    recorded "not measured" value of a categorical, boolean or numeric feature alike."""
    frame = raw.copy()
    first = rows(frame, "Cleveland")[:3]
    frame.loc[first, "sex"] = "NA_NA"           # categorical
    frame.loc[first, "fbs"] = "NA_NA"           # boolean
    frame.loc[first, "age"] = "."               # integer
    frame.loc[first, "oldpeak"] = " NA_NA "     # numeric, blanks around the token
    path = write(tmp_path, frame)
    refused = validate_file(path, DATA)
    assert {(c, e) for _, c, e in keys(refused)} == {("sex", IN_SET), ("fbs", IN_SET),
                                                     ("age", REGEX), ("oldpeak", REGEX)}
    declared = with_missing_values(DATA, sex=["NA_NA"], fbs=["NA_NA"], age=["."],
                                   oldpeak=["NA_NA"])
    report = validate_file(path, declared)
    assert report.success, report.message()
    frame.loc[first[:1], "sex"] = "Unknown"
    assert keys(validate_file(write(tmp_path, frame), declared)) == {
        ("Cleveland", "sex", IN_SET)}


def test_mostly_empty_column(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    frame.loc[frame.sample(frac=0.8, random_state=0).index, "age"] = ""
    report = validate_file(write(tmp_path, frame), DATA)
    assert keys(report) == {(site, "age", NOT_NULL) for site in SITE_ROWS}
    for failure in report.failures:
        assert 0.7 < failure.observed < 0.9
        assert "may be missing in at most 10.0 %" in failure.detail


def test_missing_rate_threshold_is_per_site(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    cleveland = rows(frame, "Cleveland")
    frame.loc[cleveland[: int(0.6 * len(cleveland)) + 1], "age"] = ""  # 60 % of one site
    report = validate_file(write(tmp_path, frame), DATA)
    # 60 % of one site's ages is far over the 10 % limit; the other sites stay clean
    assert keys(report) == {("Cleveland", "age", NOT_NULL)}
    age = next(f for f in report.failures if f.column == "age")
    assert age.observed == pytest.approx(183 / 304, abs=1e-4)
    assert "183 of 304" in age.detail


# ------------------------------------------------------------------------------ errors
def test_data_validation_error_carries_report(tmp_path: Path, raw: pd.DataFrame) -> None:
    bad = raw.copy()
    bad.loc[0, "age"] = "150"
    path = write(tmp_path, bad, "old.csv")
    report = validate_file(path, DATA)
    with pytest.raises(DataValidationError) as info:
        raise_if_failed(path, report)
    from adapters.stages import data_error_text

    assert info.value.report is report
    assert info.value.path == str(path)
    assert not isinstance(info.value, ConfigError)  # the data, not the schema: exit 3
    # the message names the file, the site, the column, the check and the offending value
    assert str(info.value) == (
        f"{path}: data validation failed: 1 failed expectation(s) over 4 site(s) "
        f"(Cleveland 304, Hungary 293, Switzerland 123, VA Long Beach 200):\n"
        f"  [Cleveland] age: {BETWEEN} failed; observed [150.0]. 'age' must lie in "
        f"[18.0, 100.0] in Cleveland; 1 of 304 values are outside, e.g. [150.0]")
    # a per-site failure: the CLI prints the whole report, not just one detail line
    assert data_error_text(info.value) == str(info.value)


def test_a_file_that_contradicts_the_schema_is_a_configuration_error(
        tmp_path: Path, raw: pd.DataFrame) -> None:
    """A declared column absent from the header: the schema key is named, exit 2."""
    path = write(tmp_path, raw.drop(columns=["chol"]), "no_chol.csv")
    report = validate_file(path, DATA)
    with pytest.raises(SchemaMismatchError) as info:
        raise_if_failed(path, report)
    assert info.value.report is report and isinstance(info.value, ConfigError)
    assert str(info.value) == (f"{path} does not fit the dataset schema (data.schema): "
                               f"features.chol: required column 'chol' is missing from the "
                               f"header")


@pytest.mark.parametrize(("column", "declared", "key"), [
    ("sex", {"type": "numeric", "low": 0, "high": 1}, "features.sex.type"),
    ("oldpeak", {"type": "integer", "low": -3, "high": 7}, None),  # some values are whole
    ("cp", {"type": "categorical", "categories": ["a", "b"], "fill": "a"},
     "features.cp.categories"),
    ("exang", {"type": "boolean", "true_value": "Y", "false_value": "N", "fill": "N"},
     "features.exang.true_value/false_value"),
])
def test_a_type_that_fits_no_value_is_the_schemas_fault(
        tmp_path: Path, raw: pd.DataFrame, column: str, declared: dict, key: str | None) -> None:
    """A declared type (or category list, or boolean tokens) that none of a column's values
    fits is a schema error naming the key (exit 2); one that only some values miss is the
    data's (exit 3, per site)."""
    from adapters.config_files import load_config

    cfg = load_config(REAL.parents[2] / "params.yaml", [f"schema.features.{column}={declared}"])
    path = write(tmp_path, raw)
    report = validate_file(path, cfg.data)
    assert not report.success
    if key is None:
        with pytest.raises(DataValidationError) as info:
            raise_if_failed(path, report)
        assert not isinstance(info.value, SchemaMismatchError)
        assert {f.site for f in report.failures} <= set(cfg.data.spec.sites)
        return
    with pytest.raises(SchemaMismatchError, match=rf"{key}: declared {declared['type']}, but "
                                                  rf"none of the \d+ values of '{column}'"):
        raise_if_failed(path, report)
    assert [f.schema_key for f in report.failures] == [key]
    assert "found e.g." not in report.failures[0].public_detail  # no cell value leaves


def test_raise_if_failed_passes_a_good_report(real_report: ValidationReport) -> None:
    assert raise_if_failed(REAL, real_report) is real_report


# ------------------------------------------------------------------------------ representable
@pytest.mark.slow
@pytest.mark.parametrize("bad", ["123456789012345678901", "9223372036854775808", "12.5", "-3"])
def test_patient_id_that_does_not_fit_int64_names_the_site(
    tmp_path: Path, raw: pd.DataFrame, bad: str
) -> None:
    frame = raw.copy()
    frame.loc[rows(frame, "Hungary")[5], "id"] = bad
    report = validate_file(write(tmp_path, frame), DATA)
    failure = only(report)
    assert (failure.site, failure.column, failure.expectation) == ("Hungary", "id", REGEX)
    assert failure.observed == [bad]
    assert "9223372036854775807" in failure.detail and "int64" in failure.detail
    assert "[Hungary] id" in report.message()


def test_the_largest_int64_id_passes(tmp_path: Path, raw: pd.DataFrame) -> None:
    frame = raw.copy()
    frame.loc[rows(frame, "Hungary")[5], "id"] = "9223372036854775807"
    assert validate_file(write(tmp_path, frame), DATA).success


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["1e400", "inf", "-Infinity", "NaN1"])
def test_numeric_values_that_are_not_finite_are_refused(
    tmp_path: Path, raw: pd.DataFrame, bad: str
) -> None:
    frame = raw.copy()
    frame.loc[rows(frame, "Switzerland")[2], "chol"] = bad
    report = validate_file(write(tmp_path, frame), DATA)
    assert not report.success
    assert {(f.site, f.column) for f in report.failures} == {("Switzerland", "chol")}, \
        report.message()
    if bad == "1e400":  # a number too large for float64: caught by the range, quoted as inf
        assert only(report).observed == ["inf"]


def test_cli_validate_refuses_a_20_digit_patient_id_with_exit_3(project: Path, capsys) -> None:
    from flows.cli import main

    csv_path = project / "data" / "raw" / "heart_disease_uci.csv"
    lines = csv_path.read_text().splitlines()
    fields = lines[400].split(",")  # a Hungary row
    fields[0] = "123456789012345678901"
    lines[400] = ",".join(fields)
    csv_path.write_text("\n".join(lines) + "\n")
    assert main(["stage", "validate", "--root", str(project)]) == 3
    err = capsys.readouterr().err
    assert "[Hungary] id" in err and "123456789012345678901" in err and "int64" in err
    assert "Traceback" not in err
    assert main(["stage", "partition", "--root", str(project)]) == 3  # nothing to partition
    assert "failed validation" in capsys.readouterr().err
    assert not (project / "data" / "processed" / "partition.json").exists()


def test_cli_validate_refuses_a_file_missing_a_declared_column_with_exit_2(
        project: Path, capsys) -> None:
    """The schema's fault, not the data's: a configuration error naming the schema key."""
    from flows.cli import main

    csv_path = project / "data" / "raw" / "heart_disease_uci.csv"
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    frame.drop(columns=["chol"]).to_csv(csv_path, index=False)
    assert main(["stage", "validate", "--root", str(project)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpriv: configuration error: ")
    assert "does not fit the dataset schema (data.schema): features.chol: required column " \
           "'chol' is missing from the header" in err
    assert "Traceback" not in err


def test_padded_categories_validate(tmp_path: Path, raw: pd.DataFrame) -> None:
    """A category written with blanks around it ("Male  ", R's padded factor levels) is the
    declared category, as the loader reads it; an undeclared one is still refused."""
    frame = raw.copy()
    frame["sex"] = frame["sex"].astype(str) + "  "
    assert validate_file(write(tmp_path, frame), DATA).success
    frame.loc[rows(frame, "Cleveland")[:1], "sex"] = " Unknown "
    assert keys(validate_file(write(tmp_path, frame), DATA)) == {("Cleveland", "sex", IN_SET)}
