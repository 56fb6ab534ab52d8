"""Data validation of the raw clinical table with Great Expectations 1.x, per hospital site.

:func:`validate_file` checks one CSV in three layers and returns a :class:`ValidationReport`;
it never raises for bad data (callers decide, e.g. with :func:`raise_if_failed`):

1. **File-level** (plain Python, site ``"<all>"``): the file exists, is not empty, parses as
   CSV, has at least one row and every required column (the dataset schema's patient-id, site
   and label columns and each feature of ``data.features``), no numeric feature's declared
   range excludes every value, and the label rule gives two classes. If one of these fails,
   GX is not run. A missing column, an empty range and a one-class rule carry the schema key
   they contradict (:attr:`FailedExpectation.schema_key`): :func:`raise_if_failed` raises
   :class:`SchemaMismatchError`, a configuration error, when every failure is of that kind.
   Data that come one file per site (``data.site_files``) are checked file by file, each
   file's rows taking its site, then validated as one table (:func:`validate_sources`).
2. **Table-level** (GX, site ``"<all>"``): the patient id is present and unique across the
   whole table; the site is one of the schema's ``sites``; the label is present (and one of
   the schema's label ``values`` where it lists them).
3. **Per site** (GX, one run per known site): the patient id is an integer in
   [0, 2**63 − 1] (it must fit int64: a 20-digit id fails here, naming the site, instead of
   overflowing the loader); numeric features are numbers (``integer`` ones integers; a text
   value such as ``"abc"`` fails with the offending values), lie within the schema's
   ``[low, high]`` (missing values are ignored there; a number too large for float64,
   ``1e400``, reads as inf and fails its range), categorical features are in their declared
   ``categories``, booleans one of their two tokens, and each feature is missing (empty cell)
   in at most its ``max_missing_rate`` of the site's rows. A "not measured" token
   (``missing_values``) is allowed by the type, category, token and range checks of every
   feature type (R's ``NA_NA`` in a categorical column) and is *not* counted as missing: it is
   a recorded value, which the loader reads as missing and flags in its own input column.

The file is read with every column as text, so that a non-numeric value stays visible instead
of turning a whole column into ``object`` dtype; numeric columns are coerced only for the
range checks. The GX context is ephemeral and built once per call: one pandas datasource, one
dataframe asset with a whole-dataframe batch definition, and three suites (table, per-site
text checks, per-site ranges), named after the schema's ``id``. ``great_expectations`` is
imported on first use (the import alone takes several seconds), so importing this module
stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fl_core.config.model import ConfigError, DataConfig
from fl_core.data.schema import DatasetSchema

ALL_SITES = "<all>"
SAMPLE_SIZE = 5  # distinct unexpected values quoted in a failure

# The GX expectation types, as they appear in results and in FailedExpectation.expectation.
EXPECT_REGEX = "expect_column_values_to_match_regex"
EXPECT_BETWEEN = "expect_column_values_to_be_between"
EXPECT_IN_SET = "expect_column_values_to_be_in_set"
EXPECT_NOT_NULL = "expect_column_values_to_not_be_null"
EXPECT_UNIQUE = "expect_column_values_to_be_unique"
# A decimal number, optionally signed, with an optional exponent; surrounding blanks allowed.
NUMBER_REGEX = r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$"
# An integer (a schema's ``integer`` feature), optionally signed; ``3.0`` is accepted too.
INTEGER_REGEX = r"^\s*[-+]?\d+(?:\.0*)?\s*$"
INT64_MAX = 2**63 - 1


def _at_most_regex(limit: int) -> str:
    """A regex for the decimal integers in [0, ``limit``] (leading zeros and blanks allowed)."""
    digits = str(limit)
    n = len(digits)
    options = [rf"\d{{1,{n - 1}}}"] if n > 1 else []
    for i, d in enumerate(digits):
        if d != "0":
            low = "0" if i else "1"  # the full-length number has no leading zero
            if int(d) > int(low):
                rest = rf"\d{{{n - i - 1}}}" if n - i - 1 else ""
                options.append(f"{digits[:i]}[{low}-{int(d) - 1}]{rest}")
    options.append(digits)
    return rf"^\s*0*(?:{'|'.join(options)})\s*$"


# A patient id: a non-negative integer that fits int64 (a 20-digit id does not).
PATIENT_ID_REGEX = _at_most_regex(INT64_MAX)


@dataclass(frozen=True)
class FailedExpectation:
    """One failed check.

    ``site`` is the hospital, or ``"<all>"`` for file- and table-level checks; ``expectation``
    the GX expectation type (e.g. ``expect_column_values_to_be_between``) or, for file-level
    checks, a name such as ``file_exists``; ``observed`` is JSON-able: the observed value, a
    sample of the unexpected values, or a count. ``detail`` may quote cell values (it stays at
    the site); ``public_detail`` says the same without any cell value, path or parser message,
    and ``unexpected_count`` / ``element_count`` are the counts where the check has them: these
    three are what :func:`site_validation_summary` lets leave a site.
    """

    site: str
    expectation: str
    column: str | None
    observed: object
    detail: str
    public_detail: str = ""
    unexpected_count: int | None = None
    element_count: int | None = None
    # set when the data as a whole contradict the dataset schema: the key to fix there
    schema_key: str | None = None

    def line(self) -> str:
        """One line: site, column, expectation, observed value and the explanation."""
        column = self.column if self.column is not None else "-"
        return (
            f"[{self.site}] {column}: {self.expectation} failed; observed {self.observed!r}. "
            f"{self.detail}"
        )


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of :func:`validate_file`.

    ``sites`` maps each known site found in the file to the number of rows validated for it,
    ``patients`` to its number of distinct patient ids; ``site`` is the hospital whose own file
    this is (set by :func:`validate_site_file`, else None);
    ``results`` is JSON-able: ``results["file"]`` holds the file-level checks,
    ``results["<all>"]`` the GX result of the table-level suite and ``results[site]`` the GX
    results of that site's two suites (``"values"``: types, categories, missing rates;
    ``"ranges"``: value ranges), each as ``ExpectationSuiteValidationResult.to_json_dict()``.
    """

    success: bool
    failures: tuple[FailedExpectation, ...]
    sites: dict[str, int]
    results: dict = field(repr=False)
    patients: dict[str, int] = field(default_factory=dict)
    site: str | None = None

    def message(self) -> str:
        """Multi-line summary: one line per failed expectation, or one line saying it passed."""
        counts = ", ".join(f"{site} {n}" for site, n in self.sites.items())
        if self.success:
            return f"data validation passed: {len(self.sites)} site(s) ({counts})"
        head = f"data validation failed: {len(self.failures)} failed expectation(s)"
        if self.sites:
            head += f" over {len(self.sites)} site(s) ({counts})"
        return "\n".join([head + ":", *(f"  {f.line()}" for f in self.failures)])


class DataValidationError(ValueError):
    """The data file failed validation; :attr:`report` holds the full report."""

    def __init__(self, path: str | Path, report: ValidationReport) -> None:
        self.path = str(path)
        self.report = report
        super().__init__(f"{self.path}: {report.message()}")


class SchemaMismatchError(DataValidationError, ConfigError):
    """The data as a whole contradict the dataset schema (a declared column is not in the
    file, a declared type or category list fits none of a column's values, the label rule
    gives one class, a declared range excludes every value): the
    schema key named is what to fix, so it is a configuration error (exit 2)."""

    def __init__(self, path: str | Path, report: ValidationReport) -> None:
        super().__init__(path, report)
        lines = [f"{f.schema_key}: {f.detail}" for f in report.failures]
        self.args = (f"{path} does not fit the dataset schema (data.schema): "
                     + "; ".join(lines),)

    def __str__(self) -> str:
        return str(self.args[0])


def raise_if_failed(path: str | Path, report: ValidationReport) -> ValidationReport:
    """Return ``report`` if it passed, else raise :class:`DataValidationError` for ``path``
    (:class:`SchemaMismatchError` when every failure is the schema's)."""
    if not report.success:
        if all(f.schema_key for f in report.failures):
            raise SchemaMismatchError(path, report)
        raise DataValidationError(path, report)
    return report


# ------------------------------------------------------------------------------ file level
def _file_failure(expectation: str, column: str | None, observed: object, detail: str,
                  public: str | None = None, schema_key: str | None = None
                  ) -> FailedExpectation:
    """A file-level failure; ``public`` is ``detail`` without values (default: ``detail``);
    ``schema_key``: the schema key the whole file contradicts."""
    return FailedExpectation(ALL_SITES, expectation, column, observed, detail,
                             detail if public is None else public, schema_key=schema_key)


def _schema_key_of(spec: DatasetSchema, column: str) -> str:
    """The schema key that declares ``column``."""
    roles = {spec.patient_id: "patient_id", spec.site: "site", spec.label.column: "label.column"}
    return roles.get(column, f"features.{column}")


def _features(data: DataConfig) -> list[str]:
    """The configured features, each once, in order."""
    return list(dict.fromkeys(data.features))


def _required_columns(data: DataConfig) -> list[str]:
    return list(dict.fromkeys([*data.spec.required_columns, *data.features]))


def _numeric_frame(frame: pd.DataFrame, data: DataConfig) -> pd.DataFrame:
    cols = [c for c in _features(data) if data.spec.feature(c).numeric]
    return frame[cols].apply(pd.to_numeric, errors="coerce").astype(float)


# ------------------------------------------------------------------------------ results
def _jsonable(value: Any) -> Any:
    """Recursively turn a GX result into strict JSON types (NaN → None, numpy → Python)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, str):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _sample(values: Iterable[Any]) -> list[Any]:
    # a non-finite number ("1e400" reads as inf) is quoted as text: strict JSON has no inf
    shown = [str(v) if isinstance(v, float) and not math.isfinite(v) else v for v in values]
    distinct = dict.fromkeys(v for v in _jsonable(shown) if v is not None)
    return list(distinct)[:SAMPLE_SIZE]


def _fmt_rate(x: float) -> str:
    return f"{100 * x:.1f} %"


# expectations whose failure quotes a sample of the unexpected values (site-side detail only)
_QUOTES_SAMPLE = (EXPECT_REGEX, EXPECT_BETWEEN, EXPECT_IN_SET, EXPECT_UNIQUE)


def _explain(kind: str, kwargs: dict[str, Any], where: str, bad: int, total: int,
             spec: DatasetSchema) -> str:
    """Why a GX expectation failed, in words and counts: no cell value."""
    column = kwargs.get("column")
    if kind == EXPECT_NOT_NULL and kwargs.get("mostly") is not None:
        rate = bad / total if total else 0.0
        limit = spec.missing_limit(str(column))
        return (f"{column!r} may be missing in at most {_fmt_rate(limit)}"
                f" of the rows {where}; {bad} of {total} ({_fmt_rate(rate)}) are missing")
    if kind == EXPECT_NOT_NULL:
        return f"{column!r} must never be empty {where}; {bad} of {total} rows are empty"
    if kind == EXPECT_REGEX:
        what = {PATIENT_ID_REGEX: f"an integer in [0, {INT64_MAX}] (int64)",
                INTEGER_REGEX: "an integer"}.get(str(kwargs.get("regex")), "a number")
        return f"every value of {column!r} must be {what} {where}; {bad} of {total} are not"
    if kind == EXPECT_BETWEEN:
        return (f"{column!r} must lie in [{kwargs.get('min_value')}, "
                f"{kwargs.get('max_value')}] {where}; {bad} of {total} values are outside")
    if kind == EXPECT_IN_SET:
        allowed = list(kwargs.get("value_set") or [])
        return f"{column!r} must be one of {allowed} {where}; {bad} of {total} values are not"
    if kind == EXPECT_UNIQUE:
        return f"{column!r} must be unique {where}; {bad} rows share a value with another row"
    return f"{kind} on {column!r} failed {where}"


def _count(result: Mapping[str, Any], key: str) -> int | None:
    value = result.get(key)
    return None if value is None else int(value)


def _label_classes_failure(frame: pd.DataFrame, spec: DatasetSchema
                           ) -> FailedExpectation | None:
    """A failure when the label rule makes every labelled row the same class (rows whose
    label is one of ``label.drop_values`` carry no label)."""
    labels = frame[spec.label.column]
    raw = labels[~spec.label.dropped(labels)].dropna().astype(str).str.strip()
    comparison = spec.label.comparison()
    if comparison is None:
        positive = raw.isin(spec.label.positive_values or [])
    else:
        op, threshold = comparison
        positive = op(pd.to_numeric(raw, errors="coerce").dropna(), threshold).astype(bool)
    if positive.empty or (positive.any() and not positive.all()):
        return None  # no label at all fails elsewhere (not null); two classes: fine
    kind = "positive" if positive.all() else "negative"
    rule = spec.label.positive_if or f"positive_values {spec.label.positive_values}"
    key = "label.positive_if" if spec.label.positive_if else "label.positive_values"
    return _file_failure("label_has_two_classes", spec.label.column, kind,
                         f"the label rule {rule!r} makes all {len(positive)} labelled rows "
                         f"{kind}: one class, nothing to learn (schema label)",
                         schema_key=key)


def _ranges_excluding_everything(frame: pd.DataFrame, data: DataConfig
                                 ) -> list[FailedExpectation]:
    """A failure per numeric feature whose declared ``[low, high]`` holds none of the
    file's numbers (its "not measured" tokens aside): the range, not the data, is wrong."""
    out = []
    numbers = _numeric_frame(frame, data)
    for col in numbers.columns:
        spec = data.spec.feature(col)
        values = numbers[col].dropna()
        values = values[~values.isin([t for t in spec.missing_values
                                      if isinstance(t, int | float)])]
        assert spec.low is not None and spec.high is not None
        if values.empty or values.between(spec.low, spec.high).any():
            continue
        out.append(_file_failure(
            "range_holds_some_value", col, [float(values.min()), float(values.max())],
            f"the declared range [{spec.low:g}, {spec.high:g}] excludes all {len(values)} "
            f"values of {col!r} (observed {values.min():g} to {values.max():g})",
            f"the declared range [{spec.low:g}, {spec.high:g}] excludes all {len(values)} "
            f"values of {col!r}", schema_key=f"features.{col}.low/high"))
    return out


def _types_fitting_no_value(frame: pd.DataFrame, data: DataConfig) -> list[FailedExpectation]:
    """A failure per feature none of whose recorded values is of its declared type (a number
    for ``numeric``, a whole number for ``integer``, a declared category or token otherwise;
    "not measured" tokens aside): the declaration, not the data, is wrong."""
    out = []
    for col in _features(data):
        feature = data.spec.feature(col)
        values = frame[col].dropna()
        values = values[~values.str.strip().isin([str(t) for t in feature.missing_values])]
        if values.empty:
            continue
        if feature.numeric:
            regex = INTEGER_REGEX if feature.type == "integer" else NUMBER_REGEX
            fits = values.str.fullmatch(regex)
            wanted = "a whole number" if feature.type == "integer" else "a number"
            key = f"features.{col}.type"
        else:
            fits = values.isin(feature.accepted())
            key = (f"features.{col}.categories" if feature.type == "categorical"
                   else f"features.{col}.true_value/false_value")
            wanted = f"one of {list(feature.accepted())}"
        if fits.any():
            continue
        head = f"declared {feature.type}, but none of the {len(values)} values of {col!r} is"
        out.append(_file_failure(
            "type_fits_some_value", col, _sample(values.unique()),
            f"{head} {wanted} (found e.g. {_sample(values.unique())})",
            f"{head} {wanted}", schema_key=key))
    return out


def site_validation_summary(report: ValidationReport) -> dict[str, Any]:
    """What a site may tell the coordinator about its validation: no cell value.

    ``passed``; ``site`` (the report's site, else its only site, else None); ``rows`` (data
    rows in the file, None if it could not be read); ``patients`` (distinct patient ids of
    that site, or of every known site if there is no site; None if no site was validated);
    per failed expectation its type, column, counts and ``FailedExpectation.public_detail``.
    Observed values, samples, paths and parser messages stay in the full report at the site.
    """
    site = report.site
    if site is None and len(report.sites) == 1:
        (site,) = report.sites
    rows = report.results.get("file", {}).get("rows")
    return {
        "passed": bool(report.success),
        "site": site,
        "rows": None if rows is None else int(rows),
        "patients": (report.patients.get(site, 0) if site is not None
                     else sum(report.patients.values())) if report.sites else None,
        "failures": [
            {"expectation": f.expectation, "column": f.column,
             "unexpected_count": f.unexpected_count, "element_count": f.element_count,
             "detail": f.public_detail}
            for f in report.failures
        ],
    }
