"""Draft a dataset schema from a CSV: ``fedpriv schema infer``.

The draft is a starting point for a person to review, never a schema to trust blindly. Per
column it guesses the type (``numeric | integer | boolean | categorical``, or ``ignore`` with
the reason), widens the observed range by a margin, writes the preprocessing defaults, the
categories or boolean tokens and the largest missing rate per site, and says in a YAML
comment what was guessed. Things a person must decide (a "not measured" token hiding among
real values, a patient id that validation will refuse) are collected as notes.

Preprocessing defaults use no statistic of the patients beyond the range and the categories:
``center``/``scale`` are the midpoint/half-width of the drafted [low, high], ``fill`` the
center; a categorical ``fill`` is the first category (sorted), a boolean ``fill`` the false
token. Pure: pandas and yaml only, no orchestration.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fl_core.audit.confidence import hanley_mcneil_variance, normal_quantile
from fl_core.config.model import DataConfig, GateConfig
from fl_core.data.schema import DatasetSchema, LabelRule, parse_schema

MARGIN = 0.10
"""The observed range is widened by this share of its width on each side."""
MAX_CATEGORIES = 20
"""A text column with more distinct values is high-cardinality: ignored."""
MAX_LABEL_VALUES = 50
"""The label's ``values`` are listed when it has at most this many distinct ones."""
MISSING_STEP = 0.05
"""``max_missing_rate`` is the largest observed rate per site, rounded up to this step."""
UNIQUE_MIN_ROWS = 10
"""A column with a different value in each of at least this many rows is an identifier."""
ZERO_SHARE = 0.05
"""A non-negative numeric column with at least this share of exact zeros is flagged."""
NEAR_EMPTY = 0.5
"""A column missing in more than this share of all rows is suggested for ``ignore``."""
LEAK_SCORE = 0.9
"""A feature whose values alone separate the labels this well (AUC) may leak: on the utility
panel's tables a follow-up time to relapse reaches 0.95, a gestational age at the outcome
0.99, and no genuine predictor 0.9 (docs/data.md)."""
MIN_SITE_PATIENTS = 20
"""A site with fewer patients is flagged: too small to train or evaluate on its own."""
MINORITY_SHARE = 0.20
"""A label whose smaller class is below this share is flagged as imbalanced."""
MISSING_TOKENS = ("NA", "NA_NA", ".", "-", "NaN", "nan", "null", "NULL", "None", "N/A")
"""Cells that mean "not recorded" (R writes ``NA`` and ``NA_NA``, SAS ``.``); those pandas
does not already read as empty are drafted as ``missing_values``."""
_TIME_NAME = re.compile(r"time|date|days|stop|(^|[_\W\d])(end|dur|duration|follow\w*)"
                        r"($|[_\W\d])", re.IGNORECASE)
"""A name saying time (``futime``, ``tstop``, ``end_date``; not ``gender``)."""
_TRUE = {"true", "t", "yes", "y", "1", "1.0", "positive", "pos"}  # 1.0: a 0/1 column with blanks
_FALSE = {"false", "f", "no", "n", "0", "0.0", "negative", "neg"}  # as R or pandas write it
_ROW_NAME = re.compile(r"^(row[._ ]?names?|row[._ ]?(id|no|nr|number)?|index|"
                       r"unnamed: ?0|x|\.\.\.1)$", re.IGNORECASE)
"""What R (its row names, ``X``, ``...1``), pandas (``Unnamed: 0``) and spreadsheets call the
row number they add."""
_ID_NAME = re.compile(r"(^|[_\W])(id|uuid|key|no|nr|number|name)$", re.IGNORECASE)
_HEAD = {"description", "patient_id", "site", "sites", *DatasetSchema.model_fields} - {
    "label", "max_missing_rate", "features", "ignore"}
"""The schema keys written first, one line each (in the model's order)."""
_NUMBER = re.compile(r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$")
_INTEGER = re.compile(r"^\s*[-+]?\d+(?:\.0*)?\s*$")


class InferenceError(ValueError):
    """The draft cannot be made; :attr:`exit_code` is 2 for bad arguments, 3 for bad data."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ColumnGuess:
    """One column's guess: its spec (``None`` when ignored), the comment and the notes."""

    name: str
    kind: str
    spec: dict[str, Any] | None
    comment: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SchemaDraft:
    """The drafted schema: its tree (what ``load_schema`` reads), per-column guesses, notes."""

    tree: dict[str, Any]
    columns: tuple[ColumnGuess, ...]
    notes: tuple[str, ...] = field(default=())
    source: str = ""
    label_checks: tuple[str, ...] = ()
    """Written under the ``label:`` line (class imbalance)."""
    site_checks: tuple[str, ...] = ()
    """Written under the ``sites:`` line (tiny or one-class sites)."""
    gate_checks: tuple[str, ...] = ()
    """Written under the ``label:`` line: the promotion gate this table can meet."""

    @property
    def schema(self) -> DatasetSchema:
        return parse_schema(self.tree, f"draft of {self.source}")

    def yaml_text(self) -> str:
        """The draft as commented YAML."""
        return draft_yaml(self)

    def summary(self) -> str:
        """What was guessed and what the user must check, one line each."""
        return draft_summary(self)


# ------------------------------------------------------------------------------ numbers
def _nice(value: float) -> int | float:
    """``value`` as an int when it is one, else a float with no representation noise."""
    value = float(f"{value:.12g}")
    return int(value) if value.is_integer() else value


def widened_range(low: float, high: float, *, integer: bool, non_negative: bool
                  ) -> tuple[int | float, int | float]:
    """[low, high] widened by :data:`MARGIN` of its width on each side, rounded outwards to a
    step of one significant digit of the margin (at least 1 for an integer column), never
    below 0 for a non-negative column. Always contains [low, high] and low < high."""
    width = high - low if high > low else max(abs(high), 1.0)
    margin = MARGIN * width
    step = 10.0 ** math.floor(math.log10(margin))
    if integer:
        step = max(step, 1.0)
    decimals = max(0, -math.floor(math.log10(step)))
    lo = round(math.floor((low - margin) / step) * step, decimals)
    hi = round(math.ceil((high + margin) / step) * step, decimals)
    lo, hi = min(lo, low), max(hi, high)  # rounding never narrows
    if non_negative:
        lo = max(lo, 0.0)
    return _nice(lo), _nice(hi)


def _missing_limit(frame: pd.DataFrame, column: str, site: str) -> tuple[float, float]:
    """(largest share of empty cells at one site, that share rounded up to the step)."""
    rates = frame[column].isna().groupby(frame[site].fillna("")).mean()
    worst = float(rates.max()) if len(rates) else 0.0
    limit = min(1.0, math.floor(worst / MISSING_STEP + 1e-9) * MISSING_STEP + MISSING_STEP)
    return worst, round(limit, 4)


# ------------------------------------------------------------------------------ columns
def _boolean_tokens(values: list[str]) -> tuple[str, str] | None:
    """(false, true) when the two distinct values are a recognised boolean pair."""
    if len(values) != 2:
        return None
    a, b = values
    if a.lower() in _TRUE and b.lower() in _FALSE:
        return b, a
    if b.lower() in _TRUE and a.lower() in _FALSE:
        return a, b
    return None


def _zeros_note(name: str, numbers: pd.Series) -> str | None:
    """A note when a non-negative column has many exact zeros far below its other values."""
    zeros = int((numbers == 0).sum())
    nonzero = numbers[numbers != 0]
    if zeros < max(3, ZERO_SHARE * len(numbers)) or nonzero.empty or (nonzero < 0).any():
        return None
    distinct = nonzero.drop_duplicates().sort_values()
    spacing = float(distinct.diff().median()) if len(distinct) > 1 else 0.0
    if nonzero.min() < max(0.1 * nonzero.max(), 5 * spacing):
        return None  # zero continues the other values (a count, a dose)
    return (f"{name} has {zeros} zeros (its other values start at {nonzero.min():g}): a "
            f"'not measured' token? add missing_values: [0]")


def _guess_numeric(name: str, text: pd.Series, missing: str, limit: float) -> ColumnGuess:
    numbers = text.astype(float)
    integer = bool(text.str.match(_INTEGER).all())
    kind = "integer" if integer else "numeric"
    lo_seen, hi_seen = float(numbers.min()), float(numbers.max())
    low, high = widened_range(lo_seen, hi_seen, integer=integer, non_negative=lo_seen >= 0)
    center, scale = _nice((low + high) / 2), _nice((high - low) / 2)
    spec = {"type": kind, "low": low, "high": high, "center": center, "scale": scale,
            "fill": center, "max_missing_rate": limit}
    comment = (f"guessed: {kind}, observed {lo_seen:g}..{hi_seen:g}, margin "
               f"{MARGIN:.0%}{' (not below 0)' if lo_seen >= 0 else ''}; center/scale: "
               f"midpoint/half-width, fill: center; {missing}")
    note = _zeros_note(name, numbers)
    return ColumnGuess(name, kind, spec, comment + ("; CHECK zeros" if note else ""),
                       (note,) if note else ())


def _sparse_note(name: str, worst: float) -> tuple[str, ...]:
    if worst <= 0.5:
        return ()
    return (f"{name} is empty in {worst:.0%} of one site's rows: keep it (max_missing_rate "
            f"allows it) or move it to ignore",)


def _guess_text(name: str, text: pd.Series, missing: str, limit: float) -> ColumnGuess:
    values = sorted(text.unique())
    tokens = _boolean_tokens(values)
    if tokens:
        spec = {"type": "boolean", "true_value": tokens[1], "false_value": tokens[0],
                "fill": tokens[0], "max_missing_rate": limit}
        return ColumnGuess(name, "boolean", spec, f"guessed: boolean ({tokens[1]} = true), "
                                                  f"fill: the false token; {missing}")
    spec = {"type": "categorical", "categories": values, "fill": values[0],
            "max_missing_rate": limit}
    return ColumnGuess(name, "categorical", spec,
                       f"guessed: categorical, {len(values)} values (sorted), fill: the "
                       f"first (no clinical default known); {missing}")


def _ignored(name: str, reason: str) -> ColumnGuess:
    return ColumnGuess(name, "ignore", None, reason)


def _row_number(text: pd.Series) -> bool:
    """Consecutive whole numbers in file order (1..n, 0..n-1 or a slice of them): the row
    number or index a spreadsheet or R's ``write.csv`` adds, which says nothing about a
    patient but would let a model learn the file's order."""
    steps = text.astype(float).diff().dropna()
    return bool(len(steps)) and bool((steps == 1).all())


def _numbered_rows(name: str, text: pd.Series) -> bool:
    """Increasing whole numbers under a row-number name (:data:`_ROW_NAME`): a row number
    with gaps where rows were removed after numbering (1..4088 over 4,028 rows in one R
    table)."""
    steps = text.astype(float).diff().dropna()
    return bool(_ROW_NAME.match(name.strip())) and bool(len(steps)) and bool((steps > 0).all())


def _row_number_reason(name: str, text: pd.Series) -> str | None:
    """Why unique whole numbers are a row number, or None."""
    if _row_number(text):
        return (f"consecutive whole numbers {text.iloc[0]}..{text.iloc[-1]} in file "
                f"order: a row number or index, not a patient's value")
    if _numbered_rows(name, text):
        return (f"increasing whole numbers {text.iloc[0]}..{text.iloc[-1]} named like a "
                f"row number: a row number with gaps (rows removed after numbering), not "
                f"a patient's value")
    return None


def _why_ignore(name: str, text: pd.Series, numeric: bool) -> str | None:
    """Why a column is no feature (empty, a row number, an identifier, free text, mixed), or
    None."""
    if text.empty:
        return "empty in every row"
    distinct = text.nunique()
    unique = distinct == len(text) and len(text) >= UNIQUE_MIN_ROWS
    if numeric:
        whole = bool(text.str.match(_INTEGER).all())
        if unique and whole and (reason := _row_number_reason(name, text)):
            return reason
        if unique and whole and _ID_NAME.search(name):
            return f"a different whole number in each of {len(text)} rows: an identifier"
        return None
    numbers = text.str.match(_NUMBER)
    if numbers.mean() >= 0.9:
        odd = sorted(text[~numbers].unique())[:5]
        return (f"numbers, but {int((~numbers).sum())} cell(s) are text {odd}: empty them "
                f"(an empty cell is missing) and infer again")
    if unique:
        return f"a different text in each of {len(text)} rows: a name or identifier"
    if distinct > MAX_CATEGORIES:
        return (f"{distinct} distinct texts in {len(text)} rows (more than "
                f"{MAX_CATEGORIES}): free text, names or codes")
    return None


def _near_empty(frame: pd.DataFrame, name: str, recorded: int) -> str | None:
    """Why a column recorded in at most :data:`NEAR_EMPTY` of all rows is suggested for
    ignore: kept with ``data.drop_incomplete`` it drops most patients (and whole sites)."""
    empty = 1.0 - recorded / max(len(frame), 1)
    if empty <= NEAR_EMPTY:
        return None
    return (f"near-empty: not recorded in {empty:.0%} of rows; suggested ignore (as a "
            f"feature it would drop most incomplete patients, or be mostly its fill)")


def guess_column(frame: pd.DataFrame, name: str, site: str) -> ColumnGuess:
    """The type guess for feature candidate ``name`` (``frame`` read as text). Recognised
    "not recorded" tokens (:data:`MISSING_TOKENS`) are set aside first and drafted as the
    feature's ``missing_values``."""
    text = frame[name].dropna().astype(str).str.strip()
    text = text[text != ""]
    tokens = [t for t in MISSING_TOKENS if t in set(text.unique())]
    text = text[~text.isin(tokens)]
    numeric = bool(len(text)) and bool(text.str.match(_NUMBER).all())
    reason = _why_ignore(name, text, numeric) or _near_empty(frame, name, len(text))
    if reason:
        return _ignored(name, reason)
    worst, limit = _missing_limit(frame, name, site)
    missing = f"missing at most {worst:.1%} per site -> max_missing_rate {limit:g}"
    if numeric and _boolean_tokens(sorted(text.unique())) is None:
        guess = _guess_numeric(name, text, missing, limit)
    else:
        guess = _guess_text(name, text, missing, limit)
    if tokens:
        assert guess.spec is not None
        guess = replace(guess, spec={**guess.spec, "missing_values": tokens},
                        comment=f"{guess.comment}; {tokens} mean not recorded -> "
                                f"missing_values")
    return replace(guess, notes=guess.notes + _sparse_note(name, worst))


# ------------------------------------------------------------------------------ reviewer checks
def _auc(scores: pd.Series, positive: pd.Series) -> float | None:
    """The AUC of ``scores`` for ``positive`` (Mann-Whitney, ties counted half), or None with
    fewer than 5 rows of either class."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if min(n_pos, n_neg) < 5:
        return None
    ranks = scores.rank()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def separation(guess: ColumnGuess, frame: pd.DataFrame, positive: pd.Series) -> float | None:
    """How well ``guess``'s column alone separates the labels: the AUC (either direction) of
    its values, or of its categories mapped to their share of positives (a category mapping;
    only with at least 10 rows per category, so a mapping cannot fit rows one by one)."""
    assert guess.spec is not None
    text = frame.loc[positive.index, guess.name].astype(str).str.strip()
    known = frame.loc[positive.index, guess.name].notna() & \
        ~text.isin(["", *guess.spec.get("missing_values", [])])
    text, y = text[known], positive[known].astype(bool)
    if guess.kind in ("numeric", "integer"):
        scores = text.astype(float)
    elif text.nunique() * 10 <= len(text):
        scores = text.map(y.groupby(text).mean())
    else:
        return None
    auc = _auc(scores, y)
    return None if auc is None else max(auc, 1.0 - auc)


def _leak_notes(guess: ColumnGuess, frame: pd.DataFrame, positive: pd.Series
                ) -> tuple[str, ...]:
    """Why ``guess`` may be an outcome leak: its name says time (an interval end, a
    follow-up, recorded after the outcome), or it alone separates the labels."""
    notes = []
    if _TIME_NAME.search(guess.name):
        notes.append(f"possible leak: {guess.name} looks like a time or date; if it is "
                     f"measured after the outcome (follow-up, an interval's end) move it to "
                     f"ignore")
    score = separation(guess, frame, positive)
    if score is not None and score >= LEAK_SCORE:
        notes.append(f"possible leak: {guess.name} alone separates the label (AUC "
                     f"{score:.3f}); a value known only after the outcome? move it to ignore "
                     f"unless it is known at prediction time")
    return tuple(notes)


def flag_leaks(guesses: tuple[ColumnGuess, ...], frame: pd.DataFrame, positive: pd.Series
               ) -> tuple[ColumnGuess, ...]:
    """``guesses`` with each candidate leak flagged in its comment and notes (kept as a
    feature: a person decides)."""
    out = []
    for guess in guesses:
        notes = _leak_notes(guess, frame, positive) if guess.spec is not None else ()
        if notes:
            guess = replace(guess, comment=f"{guess.comment}; CHECK leak",
                            notes=guess.notes + notes)
        out.append(guess)
    return tuple(out)


def site_checks(frame: pd.DataFrame, patient_id: str, site: str, positive: pd.Series
                ) -> tuple[str, ...]:
    """A line per site too small (fewer than :data:`MIN_SITE_PATIENTS` patients) or with
    one class only: it cannot be evaluated on its own and a gate's figures there mean
    nothing."""
    out = []
    sites = frame.loc[positive.index, site].astype(str)
    for name in sorted(sites.unique()):
        rows = sites == name
        patients = int(frame.loc[rows[rows].index, patient_id].nunique())
        pos, neg = int(positive[rows].sum()), int((~positive[rows]).sum())
        if patients < MIN_SITE_PATIENTS or not pos or not neg:
            out.append(f"site {name}: {patients} patients, {pos} positive and {neg} negative "
                       f"rows: too small or one class to train and evaluate on; merge it "
                       f"into another site (site_groups) or leave its rows out")
    return tuple(out)


def label_checks(positive: pd.Series) -> tuple[str, ...]:
    """A line when the smaller class is below :data:`MINORITY_SHARE`: accuracy rewards a
    model that always answers the majority class."""
    n, pos = len(positive), int(positive.sum())
    minority = min(pos, n - pos)
    if not n or minority / n >= MINORITY_SHARE:
        return ()
    kind = "positive" if pos <= n - pos else "negative"
    return (f"imbalanced label: {minority} {kind} of {n} rows ({minority / n:.0%}); judge "
            f"the model by AUC / balanced accuracy, not accuracy (gate.min_auc_lower, "
            f"gate.min_balanced_accuracy_lower; leave gate.min_accuracy off) and expect few "
            f"{kind}s per site (gate.min_test_positives/negatives)",)


def gate_checks(patient_ids: pd.Series, positive: pd.Series) -> tuple[str, ...]:
    """The gate settings this table calls for, from its patients' classes (a patient is
    positive with any positive row): the test patients the default split would give against
    the default gate's minimums, and the ``data.test_fraction`` that meets them. Lowering the
    minimums instead is how a five-patient test set promoted a model (issue 25): never
    proposed."""
    gate, fraction = GateConfig(), float(DataConfig.model_fields["test_fraction"].default)
    patients = int(patient_ids.nunique())
    pos = int(patient_ids[positive].nunique())
    neg = patients - pos
    need = (gate.min_test_patients, gate.min_test_positives, gate.min_test_negatives)
    expected = f"about {fraction * patients:.0f} test patients ({fraction * pos:.0f} positive, " \
               f"{fraction * neg:.0f} negative) at data.test_fraction {fraction:g}"
    wanted = max(need[0] / max(patients, 1), need[1] / max(pos, 1), need[2] / max(neg, 1))
    minimums = (f"the gate's minimums (gate.min_test_patients {need[0]}, "
                f"gate.min_test_positives {need[1]}, gate.min_test_negatives {need[2]})")
    if wanted <= fraction:
        # the sampling part of the AUC's lower bound at the expected test classes
        width = normal_quantile(gate.confidence) * math.sqrt(hanley_mcneil_variance(
            0.75, fraction * pos, fraction * neg))
        bar = (f"gate: {expected} meet {minimums}; it decides on lower confidence bounds "
               f"(gate.min_auc_lower {gate.min_auc_lower:g}, gate.min_balanced_accuracy_lower "
               f"{gate.min_balanced_accuracy_lower:g}): keep them. On this many test patients "
               f"an AUC near 0.75 has its bound about {width:.2f} lower (before the "
               f"evaluation's DP noise): a model needs AUC {gate.min_auc_lower + width:.2f} "
               f"or more to be promoted")
        return (bar,)
    step = math.ceil(wanted * 20) / 20  # to the next 0.05
    if step <= 0.5:
        return (f"gate: {expected} miss {minimums}: every model would be refused; run with "
                f"--set data.test_fraction={step:g} (or pool more data), not lower minimums",)
    return (f"gate: {expected} miss {minimums}, and no split meets them ({pos} positive, "
            f"{neg} negative patients in all): no model on this table can be promoted; "
            f"lowering the minimums would let a tiny test set decide",)


# ------------------------------------------------------------------------------ label
def _yaml_value(raw: str) -> int | float | str:
    """A raw label value as YAML writes it back unchanged (``0`` as a number, ``01`` as text)."""
    for kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            continue
        if str(value) == raw:
            return value
    return raw


def _default_rule(values: list[str]) -> dict[str, Any]:
    tokens = _boolean_tokens(values)
    if tokens:
        return {"positive_values": [tokens[1]]}
    raise InferenceError(f"give the label rule: --positive-if (e.g. '> 0') or "
                         f"--positive-values; the label has {len(values)} distinct values "
                         f"{values[:10]}")


def label_rule(frame: pd.DataFrame, column: str, positive_if: str | None,
               positive_values: list[str] | None) -> tuple[dict[str, Any], str]:
    """The label tree and a line counting each class; refuses a rule giving one class."""
    raw = frame[column].dropna().astype(str).str.strip()
    values = sorted(raw.unique(), key=lambda v: (not _NUMBER.match(v), _sort_key(v)))
    if positive_if is not None or positive_values is not None:
        given = {"positive_if": positive_if} if positive_if is not None \
            else {"positive_values": list(positive_values or [])}
    else:
        given = _default_rule(values)
    try:
        rule = LabelRule.model_validate({"column": column, **given})
    except ValueError as exc:
        raise InferenceError(f"label rule: {str(exc).splitlines()[-1].strip()}") from None
    positive = _positive(raw, rule)
    counts = f"{int(positive.sum())} positive, {int((~positive).sum())} negative"
    if positive.all() or not positive.any():
        shown = rule.positive_if or f"positive values {rule.positive_values}"
        raise InferenceError(f"label rule {shown!r} on column {column!r} gives one class only "
                             f"({counts}; values {values[:10]}): nothing to learn")
    tree: dict[str, Any] = {"column": column, **given}
    if len(values) <= MAX_LABEL_VALUES:
        tree["values"] = [_yaml_value(v) for v in values]
    return tree, counts


def _sort_key(value: str) -> Any:
    return float(value) if _NUMBER.match(value) else value


def _positive(raw: pd.Series, rule: LabelRule) -> pd.Series:
    comparison = rule.comparison()
    if comparison is None:
        return raw.isin(rule.positive_values or [])
    numbers = pd.to_numeric(raw, errors="coerce")
    if numbers.isna().any():
        odd = sorted(raw[numbers.isna()].unique())[:5]
        raise InferenceError(f"label rule {rule.positive_if!r} compares numbers but the label "
                             f"{rule.column!r} holds text {odd}: use --positive-values")
    op, threshold = comparison
    return op(numbers, threshold).astype(bool)


# ------------------------------------------------------------------------------ draft
def _check_roles(frame: pd.DataFrame, patient_id: str, site: str, label: str) -> None:
    roles = {"--patient-id": patient_id, "--site": site, "--label": label}
    absent = [f"{flag} {col!r}" for flag, col in roles.items() if col not in frame.columns]
    if absent:
        raise InferenceError(f"{', '.join(absent)}: no such column; the header has "
                             f"{list(frame.columns)}")
    if len(set(roles.values())) < 3:
        raise InferenceError(f"--patient-id, --site and --label must be three different "
                             f"columns (got {list(roles.values())})")


def _role_notes(frame: pd.DataFrame, patient_id: str, site: str, label: str) -> list[str]:
    ids = frame[patient_id]
    notes = []
    if ids.isna().any():
        notes.append(f"{patient_id}: {int(ids.isna().sum())} row(s) without a patient id: "
                     f"validation refuses them")
    repeated = int(ids.dropna().duplicated().sum())
    if repeated:
        notes.append(f"{patient_id}: {repeated} row(s) repeat a patient id: drafted "
                     f"records_per_patient: many (the privacy unit stays the patient; each "
                     f"patient belongs to the site of their first record)")
    if not ids.dropna().astype(str).str.fullmatch(r"\s*\+?\d+\s*").all():
        notes.append(f"{patient_id}: validation needs whole-number patient ids in "
                     f"[0, 2**63 - 1]; this column holds others: map them to numbers")
    for col, what in ((site, "site"), (label, "label")):
        empty = int(frame[col].isna().sum())
        if empty:
            notes.append(f"{col}: {empty} row(s) without a {what}: validation refuses them")
    return notes


def default_id(path: str | Path) -> str:
    """A schema ``id`` from the file name (letters, digits, ``_.-``)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).stem).strip("-._")
    return stem or "draft"


def _draft_tree(frame: pd.DataFrame, path: str | Path, patient_id: str, site: str,
                label_tree: dict[str, Any], guesses: tuple[ColumnGuess, ...],
                dataset_id: str | None) -> dict[str, Any]:
    """The schema tree of the guesses, in the order the draft writes it."""
    sites = sorted(frame[site].dropna().astype(str).unique())
    tree = {**dict(id=dataset_id or default_id(path)),
            "description": f"drafted by fedpriv schema infer from {Path(path).name}; REVIEW",
            "patient_id": patient_id, "site": site, "sites": sites, "label": label_tree,
            # written out for the reviewer: the schema model's default, its one place
            "max_missing_rate": DatasetSchema.model_fields["max_missing_rate"].default,
            "features": {g.name: g.spec for g in guesses if g.spec is not None},
            "ignore": [g.name for g in guesses if g.spec is None]}
    if frame[patient_id].dropna().duplicated().any():
        tree["records_per_patient"] = "many"
    return tree


def infer_schema(frame: pd.DataFrame, path: str | Path, *, patient_id: str, site: str,
                 label: str, positive_if: str | None = None,
                 positive_values: list[str] | None = None,
                 dataset_id: str | None = None) -> SchemaDraft:
    """Draft a schema from ``frame``, the table read as text columns from the CSV at ``path``
    (:func:`adapters.schema_files.read_table`; see the module docstring).

    Raises :class:`InferenceError` (exit code 2) for a column that is not in the header or a
    label rule that gives one class.
    """
    _check_roles(frame, patient_id, site, label)
    label_tree, counts = label_rule(frame, label, positive_if, positive_values)
    rule = LabelRule.model_validate({k: v for k, v in label_tree.items() if k != "values"})
    positive = _positive(frame[label].dropna().astype(str).str.strip(), rule)
    roles = (patient_id, site, label)
    guesses = tuple(guess_column(frame, c, site) for c in frame.columns if c not in roles)
    guesses = flag_leaks(guesses, frame, positive)
    if all(g.spec is None for g in guesses):
        raise InferenceError(f"{path}: no column could be a feature "
                             f"({'; '.join(f'{g.name}: {g.comment}' for g in guesses)})")
    tree = _draft_tree(frame, path, patient_id, site, label_tree, guesses, dataset_id)
    notes = [f"label {label}: {counts}", *_role_notes(frame, patient_id, site, label)]
    checks = label_checks(positive), site_checks(frame, patient_id, site, positive)
    gate = gate_checks(frame.loc[positive.index, patient_id].astype(str).str.strip(),
                       positive)
    notes += [*checks[0], *checks[1], *gate]
    notes += [n for g in guesses for n in g.notes]
    notes += [f"{g.name}: {g.comment}" for g in guesses if g.comment.startswith("near-empty")]
    draft = SchemaDraft(tree, guesses, tuple(notes), str(path), *checks, gate_checks=gate)
    draft.schema  # noqa: B018 - a draft load_schema refuses is a bug here, not the user's
    return draft


# ------------------------------------------------------------------------------ output
def _flow(value: Any) -> str:
    """``value`` as one line of flow-style YAML."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9,
                          allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _head_lines(head: dict[str, Any], site_notes: tuple[str, ...]) -> list[str]:
    """The head keys, one line each, the site checks under ``sites:``."""
    lines = []
    for key, value in head.items():
        lines.append(f"{key}: {_flow(value)}")
        if key == "sites":
            lines += [f"#   CHECK: {n}" for n in site_notes]
    return lines


def draft_yaml(draft: SchemaDraft) -> str:
    """The draft as YAML with a comment on every guess (``load_schema`` reads it)."""
    tree = draft.tree
    head = {k: tree[k] for k in DatasetSchema.model_fields if k in _HEAD and k in tree}
    lines = [f"# Drafted by `fedpriv schema infer` from {Path(draft.source).name}: REVIEW "
             f"before use.",
             "# Every guess is commented. Ranges are the observed ones widened by "
             f"{MARGIN:.0%}; center/scale are",
             "# their midpoint/half-width and fill the center (no patient statistic); "
             "replace them by clinical",
             "# reference values where you have them (docs/data.md).",
             *_head_lines(head, draft.site_checks),
             f"label: {_flow(tree['label'])}",
             *(f"#   CHECK: {n}" for n in draft.label_checks),
             *(f"#   {n}" for n in draft.gate_checks),
             f"max_missing_rate: {tree['max_missing_rate']:g}   # default per feature and site",
             "features:"]
    for guess in draft.columns:
        if guess.spec is not None:
            lines.append(f"  # {guess.name}: {guess.comment}")
            lines += [f"  #   CHECK: {n}" for n in guess.notes]
            lines.append(f"  {_flow(guess.name)}: {_flow(guess.spec)}")
    ignored = [g for g in draft.columns if g.spec is None]
    lines.append(f"ignore: {_flow([g.name for g in ignored])}")
    lines += [f"  # {g.name}: {g.comment}" for g in ignored]
    return "\n".join(lines) + "\n"


def draft_summary(draft: SchemaDraft) -> str:
    """One line per column guessed, then what the user must check."""
    spec = draft.schema
    out = [f"drafted schema {spec.id!r} from {draft.source}: patient id "
           f"{spec.patient_id!r}, site {spec.site!r} ({len(spec.sites)} sites: "
           f"{', '.join(spec.sites[:8])}), label {spec.label.column!r}"]
    width = max(len(g.name) for g in draft.columns)
    for g in draft.columns:
        detail = g.comment.split("; missing at most")[0].removeprefix("guessed: ")
        detail = detail.removeprefix(f"{g.kind}, ").removeprefix(g.kind).strip()
        out.append(f"  {g.name.ljust(width)}  {'ignored' if g.spec is None else g.kind}: "
                   f"{detail}")
    out.append("check before use:")
    out += [f"  - {n}" for n in draft.notes]
    out.append("  - ranges, fills and centers are guesses from this file: declare clinical "
               "reference values where you have them")
    return "\n".join(out) + "\n"
