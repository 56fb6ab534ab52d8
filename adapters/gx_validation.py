"""Great Expectations runs over the raw CSV file(s): the suite built from the dataset schema,
run per site and on the whole table (the rules and the report are
:mod:`fl_core.data.validation`)."""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from adapters.csv_header import duplicate_columns, duplicate_columns_text
from fl_core.config.model import DataConfig, PipelineConfig
from fl_core.data.schema import DatasetSchema
from fl_core.data.tables import strip_text_cells
from fl_core.data.validation import (
    _QUOTES_SAMPLE,
    ALL_SITES,
    EXPECT_NOT_NULL,
    INTEGER_REGEX,
    NUMBER_REGEX,
    PATIENT_ID_REGEX,
    FailedExpectation,
    ValidationReport,
    _count,
    _explain,
    _features,
    _file_failure,
    _jsonable,
    _label_classes_failure,
    _numeric_frame,
    _ranges_excluding_everything,
    _required_columns,
    _sample,
    _schema_key_of,
    _types_fitting_no_value,
    site_validation_summary,
)

# BASIC gives counts and a sample of unexpected values at about half the cost of SUMMARY
# (which adds value counts and row indices).
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 20}


def _read_table(path: Path, data: DataConfig, site: str | None = None
                ) -> tuple[pd.DataFrame | None, list[FailedExpectation], dict[str, Any]]:
    """Read ``path`` as text columns; return (frame or None, file-level failures, summary).
    ``site``: the site the file holds (``site_source: file``), attached as its site column."""
    summary: dict[str, Any] = {"path": str(path)}
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        failure = _file_failure("file_exists", None, str(path), f"the data file {path} {what}",
                                f"the data file {what}")
        return None, [failure], summary
    size = path.stat().st_size
    summary["bytes"] = size
    if size == 0:
        failure = _file_failure("file_not_empty", None, 0, "the data file is empty (0 bytes)")
        return None, [failure], summary
    duplicated = duplicate_columns(path)
    if duplicated:
        return None, [_file_failure("unique_column_names", None, duplicated,
                                    duplicate_columns_text(duplicated))], summary
    try:
        frame = strip_text_cells(  # as the loader reads it: padded cells stripped
            pd.read_csv(path, dtype=str, keep_default_na=True, encoding="utf-8-sig"))
    except pd.errors.EmptyDataError:
        return None, [_file_failure("file_not_empty", None, size,
                                    "the data file has no header and no rows")], summary
    except (pd.errors.ParserError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, [_file_failure("file_parses_as_csv", None, reason,
                                    f"the data file cannot be parsed as CSV: {reason}",
                                    "the data file cannot be parsed as CSV")], summary
    summary["rows"] = len(frame)
    summary["columns"] = [str(c) for c in frame.columns]
    failures: list[FailedExpectation] = []
    header = [str(c) for c in frame.columns]
    frame, foreign = data.spec.attach_file_site(frame, site)
    if foreign:
        failures.append(_file_failure(
            "file_rows_of_one_site", data.spec.site, foreign,
            f"{foreign} of {len(frame)} rows name another site than {site!r} in column "
            f"{data.spec.site!r}; a site's file holds its own rows only"))
    for col in _required_columns(data):
        if col not in frame.columns:
            failures.append(_file_failure(
                "required_column_present", col, header,
                f"required column {col!r} is missing from the header",
                schema_key=_schema_key_of(data.spec, col),
            ))
    if len(frame) == 0:
        failures.append(_file_failure("file_has_rows", None, 0,
                                      "the data file has a header but no data rows"))
    return frame, failures, summary


def _read_sources(sources: Sequence[tuple[Path, str | None]], data: DataConfig
                  ) -> tuple[pd.DataFrame | None, list[FailedExpectation], dict[str, Any]]:
    """:func:`_read_table` of every source; several (one file per site) are checked file by
    file (each failure names its site and file) and validated as one table."""
    if len(sources) == 1:
        return _read_table(Path(sources[0][0]), data, sources[0][1])
    frames, failures, summaries = [], [], []
    for path, site in sources:
        frame, found, summary = _read_table(Path(path), data, site)
        frames.append(frame)
        summaries.append({"site": site, **summary})
        where = f"site {site!r}" if str(path) in "".join(f.detail for f in found) else \
            f"site {site!r} ({path})"
        failures += [replace(f, detail=f"{where}: {f.detail}",
                             public_detail=f"site {site!r}: {f.public_detail}") for f in found]
    summary = {"files": summaries, "rows": sum(s.get("rows", 0) for s in summaries),
               "columns": summaries[0].get("columns", [])}
    if failures or any(f is None for f in frames):
        return None, failures, summary
    return pd.concat(frames, ignore_index=True), failures, summary


# ------------------------------------------------------------------------------ GX suites
def _table_expectations(gxe: Any, spec: DatasetSchema) -> list[Any]:
    """Table-wide checks: patient id present and unique, site known, label present (and one
    of the schema's label values where it lists them)."""
    out = [
        gxe.ExpectColumnValuesToNotBeNull(column=spec.patient_id),
        *([gxe.ExpectColumnValuesToBeUnique(column=spec.patient_id)]
          if spec.records_per_patient == "one" else []),  # "many": several rows per patient
        gxe.ExpectColumnValuesToNotBeNull(column=spec.site),
        gxe.ExpectColumnValuesToBeInSet(column=spec.site, value_set=list(spec.sites)),
        gxe.ExpectColumnValuesToNotBeNull(column=spec.label.column),
    ]
    if spec.label.values:
        out.append(gxe.ExpectColumnValuesToBeInSet(column=spec.label.column,
                                                   value_set=list(spec.label.values)))
    return out


def _value_expectations(gxe: Any, data: DataConfig) -> list[Any]:
    """Per-site checks on the text columns: types, categories, booleans, missing rates."""
    spec = data.spec
    out: list[Any] = [gxe.ExpectColumnValuesToMatchRegex(column=spec.patient_id,
                                                         regex=PATIENT_ID_REGEX)]
    for col in _features(data):
        feature = spec.feature(col)
        mostly = round(1.0 - spec.missing_limit(col), 12)
        out.append(gxe.ExpectColumnValuesToNotBeNull(column=col, mostly=mostly))
        tokens = [str(t) for t in feature.missing_values]
        if feature.numeric:
            regex = INTEGER_REGEX if feature.type == "integer" else NUMBER_REGEX
            out.append(gxe.ExpectColumnValuesToMatchRegex(column=col,
                                                          regex=or_tokens(regex, tokens)))
        else:  # a "not measured" token is a recorded value of every type (R's NA_NA)
            out.append(gxe.ExpectColumnValuesToBeInSet(
                column=col, value_set=list(dict.fromkeys([*feature.accepted(), *tokens]))))
    return out


def or_tokens(regex: str, tokens: Sequence[str]) -> str:
    """``regex`` (anchored ``^...$``) that also accepts each "not measured" token (surrounding
    blanks allowed, as the loader strips them): a numeric column may record ``NA_NA`` or
    ``.`` for a value not measured."""
    if not tokens:
        return regex
    alternatives = "|".join(re.escape(t.strip()) for t in tokens)
    return f"^(?:{regex.removeprefix('^').removesuffix('$')}|\\s*(?:{alternatives})\\s*)$"


def _range_expectations(gxe: Any, data: DataConfig) -> list[Any]:
    """Per-site range checks on the numeric features (coerced to float; nulls ignored)."""
    out: list[Any] = []
    for col in _features(data):
        feature = data.spec.feature(col)
        if feature.numeric:
            out.append(gxe.ExpectColumnValuesToBeBetween(
                column=col, min_value=float(feature.low or 0), max_value=float(feature.high or 0)))
    return out


# ------------------------------------------------------------------------------ entry point
def describe_failure(site: str, res: Any, spec: DatasetSchema
              ) -> FailedExpectation:
    """Turn one failed GX expectation result (``ExpectationValidationResult``) into a
    :class:`FailedExpectation`."""
    cfg = res.expectation_config
    kind = str(cfg.type)
    kwargs = dict(cfg.kwargs)
    column = kwargs.get("column")
    where = f"in {site}" if site != ALL_SITES else "in the table"
    info = res.exception_info or {}
    if info.get("raised_exception"):
        msg = str(info.get("exception_message") or "unknown error")
        public = f"GX could not evaluate {kind} on {column!r} {where}"
        return FailedExpectation(site, kind, column, msg, f"{public}: {msg}", public)
    result = res.result or {}
    total = int(result.get("element_count") or 0)
    bad = int(result.get("unexpected_count") or 0)
    sample = _sample(result.get("partial_unexpected_list") or [])
    public = _explain(kind, kwargs, where, bad, total, spec)
    observed: object
    if kind == EXPECT_NOT_NULL:
        detail = public
        observed = (round(bad / total if total else 0.0, 4)
                    if kwargs.get("mostly") is not None else bad)
    elif kind in _QUOTES_SAMPLE:
        observed = sample
        detail = f"{public}, e.g. {sample}"
    else:
        observed = _jsonable(result.get("observed_value", sample))
        detail = f"{public} (observed {observed!r})"
    return FailedExpectation(site, kind, column, observed, detail, public,
                             _count(result, "unexpected_count"), _count(result, "element_count"))


def _failures(site: str, result: Any,
              spec: DatasetSchema) -> list[FailedExpectation]:
    return [describe_failure(site, r, spec) for r in result.results if not r.success]


class _Runner:
    """The ephemeral GX context of one :func:`validate_file` call: suites built once."""

    def __init__(self, data: DataConfig) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.spec = spec = data.spec
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False,
                                                         metric_calculations=False)
        batch = (ctx.data_sources.add_pandas(spec.id)
                 .add_dataframe_asset("table")
                 .add_batch_definition_whole_dataframe("whole"))
        gxe = gx.expectations
        suites = {
            "table": _table_expectations(gxe, spec),
            "values": _value_expectations(gxe, data),
            "ranges": _range_expectations(gxe, data),
        }
        self.definitions: dict[str, Any] = {}
        for name, expectations in suites.items():
            suite = ctx.suites.add(
                gx.ExpectationSuite(name=f"{spec.id}-{name}", expectations=expectations))
            self.definitions[name] = ctx.validation_definitions.add(
                gx.ValidationDefinition(name=f"{spec.id}-{name}", data=batch, suite=suite))

    def run(self, name: str, site: str, frame: pd.DataFrame
            ) -> tuple[dict[str, Any], list[FailedExpectation]]:
        """Run suite ``name`` on ``frame``; return (JSON result, failures)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                result = self.definitions[name].run(
                    batch_parameters={"dataframe": frame.reset_index(drop=True)},
                    result_format=RESULT_FORMAT,
                )
        except Exception as exc:  # GX itself failed: report it instead of raising
            msg = f"{type(exc).__name__}: {exc}"
            public = f"GX could not run the {name} suite"
            failure = FailedExpectation(site, f"suite_{self.spec.id}-{name}", None, msg,
                                        f"{public}: {msg}", public)
            return {"success": False, "exception": msg}, [failure]
        return _jsonable(result.to_json_dict()), _failures(site, result, self.spec)


def check_sources(sources: Sequence[tuple[Path, str | None]], data: DataConfig, *,
                  both_classes: bool = True
                  ) -> tuple[pd.DataFrame | None, ValidationReport]:
    """The file-level checks alone (no GX, milliseconds) over ``sources`` (each file with the
    site it holds under ``site_source: file``, else None), read as one table: every file
    exists, parses, has rows and every required column, and (``both_classes``) the label rule
    gives two classes. Returns the frame (None if unreadable) and a report whose
    ``results["file"]`` lists them."""
    frame, failures, summary = _read_sources(sources, data)
    if frame is not None and not failures:
        failures += _types_fitting_no_value(frame, data)
        failures += _ranges_excluding_everything(frame, data)
        if both_classes:
            failures += [f for f in [_label_classes_failure(frame, data.spec)] if f]
    summary["checks"] = [
        {"expectation": f.expectation, "column": f.column, "success": False,
         "observed": _jsonable(f.observed), "detail": f.detail}
        for f in failures
    ]
    return frame, ValidationReport(not failures, tuple(failures), {}, {"file": summary})


def validate_file(path: str | Path, data: DataConfig, *, both_classes: bool = True,
                  site: str | None = None) -> ValidationReport:
    """Validate the raw CSV at ``path``: file-level checks, then the GX suites per site.

    Never raises for bad data: a failing file gives a report with ``success=False`` whose
    failures name the site, column, expectation and observed values. ``both_classes``: the
    label rule must give both classes over the file (not asked of one site's own file).
    ``site``: the site the file holds, under ``site_source: file`` (no site column).
    """
    return validate_sources([(Path(path), site)], data, both_classes=both_classes)


def validate_sources(sources: Sequence[tuple[Path, str | None]], data: DataConfig, *,
                     both_classes: bool = True) -> ValidationReport:
    """:func:`validate_file` over several files (one per site, ``data.site_files``): each
    file checked on its own, then the suites on their rows as one table (a patient id is
    unique across the files)."""
    frame, checked = check_sources(sources, data, both_classes=both_classes)
    failures = list(checked.failures)
    results: dict[str, Any] = dict(checked.results)
    if frame is None or failures:
        return replace(checked, success=False)

    spec = data.spec
    if spec.site_groups is not None:  # raw values → declared sites (unlisted: empty, refused)
        frame = frame.assign(**{spec.site: spec.site_of(frame)})
    runner = _Runner(data)
    table_cols = list(spec.required_columns)
    results[ALL_SITES], found = runner.run("table", ALL_SITES, frame[table_cols])
    failures += found

    numeric = _numeric_frame(frame, data)
    sites: dict[str, int] = {}
    patients: dict[str, int] = {}
    for site in spec.sites:
        mask = (frame[spec.site] == site).fillna(False).to_numpy(dtype=bool)
        if not mask.any():
            continue
        sites[site] = int(mask.sum())
        patients[site] = int(frame.loc[mask, spec.patient_id].nunique())
        site_results: dict[str, Any] = {}
        site_results["values"], found = runner.run(
            "values", site, frame.loc[mask, [spec.patient_id, *_features(data)]])
        failures += found
        site_results["ranges"], found = runner.run("ranges", site, numeric.loc[mask])
        failures += found
        results[site] = site_results
    return ValidationReport(not failures, tuple(failures), sites, results, patients)


# ------------------------------------------------------------------------------ sites mode
def validate_site_file(cfg: PipelineConfig, csv_path: str | Path, site_id: str
                       ) -> tuple[ValidationReport, dict[str, Any]]:
    """Validate one hospital's own file (sites mode): :func:`validate_file`, and every row
    must be ``site_id``'s. Returns the full report (it stays at the site) and
    :func:`site_validation_summary` of it (what may go to the coordinator)."""
    site = site_id if cfg.data.spec.site_source == "file" else None  # no site column
    report = validate_file(csv_path, cfg.data, both_classes=False, site=site)  # one class ok
    file_rows = report.results.get("file", {}).get("rows")
    failures = list(report.failures)
    if file_rows:  # the file was read and has rows
        foreign = int(file_rows) - report.sites.get(site_id, 0)
        if foreign:
            public = (f"every row must belong to site {site_id!r} (column "
                      f"{cfg.data.spec.site!r}); "
                      f"{foreign} of {file_rows} rows do not")
            failures.append(FailedExpectation(site_id, "file_rows_of_one_site",
                                              cfg.data.spec.site, foreign,
                                              public, public, foreign, int(file_rows)))
    report = replace(report, success=not failures, failures=tuple(failures), site=site_id)
    return report, site_validation_summary(report)
