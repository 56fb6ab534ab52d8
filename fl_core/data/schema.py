"""The dataset schema: what a clinical table holds, declared in a YAML file, not in code.

A :class:`DatasetSchema` (``data/schemas/<dataset>.yaml``, selected by ``data.schema``) names
the patient-id and site columns, the label column and the rule that makes it binary, and every
feature: its type (``numeric | integer | categorical | boolean``), unit, valid range, categories
or boolean tokens, the tokens that mean "not measured", the largest share of empty cells one
site may have, and the declared preprocessing constants (``center``/``scale``/``fill``, never
fitted on patients). Loader, transform, model input size, Great Expectations suites and
site files all derive from it; ``fl_core`` holds no column or site name of any dataset.

:func:`load_schema` reads and validates a schema file; every error is a
:class:`SchemaError` naming the schema key, what was found and what is accepted.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FEATURE_TYPES = ("numeric", "integer", "categorical", "boolean")
NUMERIC_TYPES = ("numeric", "integer")
DEFAULT_SCHEMA = "data/schemas/heart.yaml"
"""``data.schema`` when none is given (relative to the project root)."""

_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}
_RULE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class SchemaError(ValueError):
    """A dataset schema file cannot be read or declares something invalid."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LabelRule(_Part):
    """The label column and the rule that makes it binary (1 = positive).

    Exactly one of ``positive_if`` (a comparison with a number, e.g. ``"> 0"``) and
    ``positive_values`` (the raw values that are positive). ``values``, if given, are all the
    raw values the column may take (checked by data validation). ``drop_values`` (a subset of
    ``values``, none of them positive) are results that are no label at all (a test that
    gave no result): their rows are dropped when the table is loaded (counted and reported),
    never read as negatives. Raw values compare as stripped text.
    """

    column: str = Field(min_length=1)
    positive_if: str | None = None
    positive_values: list[str] | None = Field(None, min_length=1)
    values: list[str] | None = Field(None, min_length=1)
    drop_values: list[str] = Field(default_factory=list)

    @field_validator("positive_values", "values", "drop_values", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value

    @field_validator("positive_if")
    @classmethod
    def _rule_parses(cls, value: str | None) -> str | None:
        if value is not None and not _RULE.match(value):
            raise ValueError(f"label rule {value!r} does not parse; expected a comparison "
                             f"with a number: one of {', '.join(_COMPARISONS)} then a number, "
                             f"e.g. '> 0'")
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> LabelRule:
        if (self.positive_if is None) == (self.positive_values is None):
            raise ValueError("give exactly one of positive_if (e.g. '> 0') and "
                             "positive_values (a list of raw values)")
        return self

    @model_validator(mode="after")
    def _drops_are_label_values(self) -> LabelRule:
        if not self.drop_values:
            return self
        if self.values is None:
            raise ValueError(f"drop_values {self.drop_values} needs values (every raw value "
                             f"of the label column) to check them against")
        unknown = [v for v in self.drop_values if v not in self.values]
        if unknown:
            raise ValueError(f"drop_values {unknown} not in values {self.values}")
        positive = [v for v in self.drop_values if v in (self.positive_values or [])]
        if positive:
            raise ValueError(f"drop_values {positive} also in positive_values: a row is "
                             f"either dropped or positive")
        return self

    def dropped(self, raw: Any) -> Any:
        """Per value of the raw label column (a pandas Series), whether it is one of
        ``drop_values`` (its row is dropped at load)."""
        return raw.notna() & raw.astype(str).str.strip().isin(self.drop_values)

    def comparison(self) -> tuple[Callable[[Any, Any], Any], float] | None:
        """``positive_if`` as (operator, number), or None under ``positive_values``."""
        if self.positive_if is None:
            return None
        match = _RULE.match(self.positive_if)
        assert match is not None  # checked at validation
        return _COMPARISONS[match.group(1)], float(match.group(2))


def with_range_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A numeric declaration with numbers ``low < high`` (else ValueError), its missing
    ``center``/``scale``/``fill`` defaulted: the midpoint, the half-width, the center."""
    low, high = raw["low"], raw["high"]
    if not low < high:
        raise ValueError(f"low={low:g} must be below high={high:g}")
    out = dict(raw)
    if out.get("center") is None:
        out["center"] = (low + high) / 2
    if out.get("scale") is None:
        out["scale"] = (high - low) / 2
    if out.get("fill") is None:
        out["fill"] = out["center"]
    return out


class FeatureSpec(_Part):
    """One feature column: its type, unit, valid values and declared preprocessing.

    * ``numeric`` / ``integer``: ``low`` < ``high`` is the valid range (checked by validation,
      and the clipping range of preprocessing); a value becomes
      ``(clip(x, low, high) − center) / scale``, a missing one ``fill`` first. Left out,
      ``center`` is the midpoint, ``scale`` the half-width and ``fill`` the centre.
    * ``categorical``: ``categories`` (fixed, so every client encodes the same columns);
      ``fill`` is the category that stands in for a missing value.
    * ``boolean``: ``true``/``false`` tokens (``true_value``/``false_value``); ``fill`` the
      token that stands in for a missing value.

    ``missing_values`` are recorded values that mean "not measured" (a cholesterol of
    ``0``): read as missing by the loader, which also adds a ``<name>_missing`` 0/1 input
    column.
    ``max_missing_rate`` is the largest share of empty cells allowed at one site (default:
    the schema's ``max_missing_rate``).
    """

    type: Literal["numeric", "integer", "categorical", "boolean"]
    unit: str | None = None
    description: str | None = None
    low: float | None = None
    high: float | None = None
    center: float | None = None
    scale: float | None = Field(None, gt=0)
    fill: float | str | None = None
    categories: list[str] | None = None
    true_value: str | None = None
    false_value: str | None = None
    missing_values: list[float | str] = Field(default_factory=list)
    max_missing_rate: float | None = Field(None, ge=0, le=1)

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        if value not in FEATURE_TYPES:
            raise ValueError(f"unknown type {value!r}; accepted: {', '.join(FEATURE_TYPES)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or raw.get("type") not in NUMERIC_TYPES:
            return raw
        low, high = raw.get("low"), raw.get("high")
        if not all(isinstance(v, int | float) for v in (low, high)):
            raise ValueError(f"a {raw['type']} feature needs numbers low and high "
                             f"(got low={low!r}, high={high!r})")
        return with_range_defaults(raw)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        if self.type in NUMERIC_TYPES:
            self._check_numeric()
        elif self.type == "categorical":
            self._check_categorical()
        else:
            self._check_boolean()
        return self

    def _check_numeric(self) -> None:
        assert self.low is not None and self.high is not None
        if not isinstance(self.fill, int | float) or not self.low <= self.fill <= self.high:
            raise ValueError(f"fill={self.fill!r} must be a number in [low, high] = "
                             f"[{self.low:g}, {self.high:g}]")
        self._no_keys("categories", "true_value", "false_value")

    def _check_categorical(self) -> None:
        if not self.categories:
            raise ValueError("a categorical feature needs a non-empty list of categories "
                             f"(got {self.categories!r})")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories {self.categories} name a category twice")
        self._check_fill(self.categories)
        self._no_keys("low", "high", "center", "scale", "true_value", "false_value")

    def _check_boolean(self) -> None:
        if not self.true_value or not self.false_value or self.true_value == self.false_value:
            raise ValueError("a boolean feature needs two different tokens true_value and "
                             f"false_value (got {self.true_value!r}, {self.false_value!r})")
        self._check_fill(list(self.tokens))
        self._no_keys("low", "high", "center", "scale", "categories")

    def _check_fill(self, accepted: list[str]) -> None:
        if self.fill not in accepted:
            raise ValueError(f"fill={self.fill!r} is not a value of this feature; accepted: "
                             f"{', '.join(accepted)}")

    def _no_keys(self, *keys: str) -> None:
        given = [k for k in keys if getattr(self, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not a key of a {self.type} feature")

    @property
    def numeric(self) -> bool:
        """Numeric or integer: scaled, range-checked."""
        return self.type in NUMERIC_TYPES

    @property
    def tokens(self) -> tuple[str, str]:
        """A boolean feature's (false, true) tokens."""
        assert self.false_value is not None and self.true_value is not None
        return self.false_value, self.true_value

    def accepted(self) -> tuple[str, ...]:
        """The values a categorical or boolean feature may take."""
        return tuple(self.categories) if self.categories else self.tokens


class DatasetSchema(_Part):
    """A dataset: its id, the patient-id, site and label columns, features, ignored columns.

    ``sites`` are the site values data validation accepts (and validates one by one);
    ``max_missing_rate`` the default share of empty cells per feature and site.

    ``site_groups`` (optional) declares how raw values of the site column become sites when
    the table has more of them than a federation should have (88 clinics → 4 sites): site
    name → the raw values it gathers; ``site_default`` the site of every raw value not listed
    (left out: an unlisted value is an error). With groups, ``sites`` must be exactly the
    group names (and ``site_default``). A patient belongs to one site: that of their first
    record in file order (:meth:`site_of`).
    ``records_per_patient``: ``one`` (the patient id is unique) or ``many`` (a patient may
    have several rows; the privacy unit stays the patient).

    ``site_source``: ``column`` (default: the table has a site column, ``site``) or ``file``
    (the data come as one file per site, with no site column: a row's site is the file it is
    in, named by ``data.site_files`` in simulation or by the site's worker in sites mode;
    ``site`` is then the name of the column fedpriv adds, default ``site``). A file that
    does have such a column must hold only its own site's value there
    (:meth:`attach_file_site`).
    """

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str | None = None
    patient_id: str = Field(min_length=1)
    site: str = Field(min_length=1)
    site_source: Literal["column", "file"] = "column"
    sites: list[str] = Field(min_length=1)
    label: LabelRule
    max_missing_rate: float = Field(0.1, ge=0, le=1)
    features: dict[str, FeatureSpec] = Field(min_length=1)
    ignore: list[str] = Field(default_factory=list)
    site_groups: dict[str, list[str]] | None = None
    site_default: str | None = None
    records_per_patient: Literal["one", "many"] = "one"

    @model_validator(mode="before")
    @classmethod
    def _file_site_column(cls, raw: Any) -> Any:
        # one file per site: the column fedpriv adds may be left unnamed
        if isinstance(raw, dict) and raw.get("site_source") == "file" and "site" not in raw:
            return {**raw, "site": "site"}
        return raw

    @field_validator("site_groups", mode="before")
    @classmethod
    def _groups_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): [str(v) for v in vs] if isinstance(vs, list) else vs
                    for k, vs in value.items()}
        return value

    @model_validator(mode="after")
    def _groups_consistent(self) -> DatasetSchema:
        if self.site_source == "file" and self.site_groups is not None:
            raise ValueError("site_groups maps values of a site column; with site_source: "
                             "file a row's site is the file it is in")
        if self.site_groups is None:
            if self.site_default is not None:
                raise ValueError("site_default needs site_groups")
            return self
        declared = [*self.site_groups, *([self.site_default] if self.site_default else [])]
        if sorted(set(declared)) != sorted(self.sites) or len(set(declared)) != len(declared):
            raise ValueError(f"with site_groups, sites {self.sites} must be exactly the group "
                             f"names and site_default ({declared})")
        raw = [v for vs in self.site_groups.values() for v in vs]
        twice = sorted({v for v in raw if raw.count(v) > 1})
        if twice:
            raise ValueError(f"site_groups: raw value(s) {twice} in more than one group")
        return self

    def site_values(self, raw: Any) -> Any:
        """The raw site column (a pandas Series) as sites: mapped through ``site_groups``
        (unlisted values → ``site_default``; without one they become missing), else as text."""
        text = raw.astype(str).where(raw.notna())
        if self.site_groups is None:
            return text
        lookup = {v.strip(): site for site, vs in self.site_groups.items() for v in vs}
        mapped = text.str.strip().map(lookup)
        if self.site_default is not None:
            mapped = mapped.where(mapped.notna() | text.isna(), self.site_default)
        return mapped

    def attach_file_site(self, frame: Any, site: str | None) -> tuple[Any, int]:
        """Under ``site_source: file``, ``frame`` (one site's raw file) with its site column
        set to ``site``, and how many rows named another site there (a file that has the
        column must hold its own site's rows only; an empty cell takes the file's site).
        Under ``column`` (or without a site) the frame as it is, and 0."""
        if self.site_source != "file" or site is None:
            return frame, 0
        foreign = 0
        if self.site in frame.columns:
            named = frame[self.site].astype(str).str.strip().where(frame[self.site].notna())
            foreign = int((named.notna() & (named != site)).sum())
        return frame.assign(**{self.site: site}), foreign

    def site_of(self, frame: Any) -> Any:
        """Per row of ``frame`` (raw table), its patient's site: the site
        (:meth:`site_values`) of the patient's first record in file order, so that all of a
        patient's records go to one site even when they were taken at several."""
        sites = self.site_values(frame[self.site])
        return sites.groupby(frame[self.patient_id].astype(str).str.strip()).transform("first")

    @model_validator(mode="after")
    def _columns_distinct(self) -> DatasetSchema:
        roles = [self.patient_id, self.site, self.label.column, *self.features, *self.ignore]
        twice = sorted({c for c in roles if roles.count(c) > 1})
        if twice:
            raise ValueError(f"column(s) {twice} declared in more than one role (patient_id, "
                             f"site, label, features, ignore)")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites {self.sites} name a site twice")
        return self

    def feature(self, name: str) -> FeatureSpec:
        """The spec of feature ``name``."""
        return self.features[name]

    def missing_limit(self, column: str) -> float:
        """Largest share of empty cells allowed for ``column`` at one site."""
        spec = self.features.get(column)
        if spec is None or spec.max_missing_rate is None:
            return self.max_missing_rate
        return spec.max_missing_rate

    def of_type(self, *types: str) -> tuple[str, ...]:
        """The features of the given types, in declared order."""
        return tuple(n for n, f in self.features.items() if f.type in types)

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Patient id, site and label columns (the features come on top)."""
        return self.patient_id, self.site, self.label.column


def _describe(error: Any) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if error["type"] == "missing":
        return f"{loc}: required key missing"
    if error["type"] == "literal_error" and "unknown type" not in msg:
        msg = f"unknown type {error.get('input')!r}; accepted: {', '.join(FEATURE_TYPES)}"
    if not loc or isinstance(error.get("input"), dict):  # a rule across keys: no input dump
        return f"{loc}: {msg}" if loc else msg
    return f"{loc}: {msg} (got {error.get('input')!r})"


def parse_schema(tree: dict[str, Any], source: str) -> DatasetSchema:
    """Validate a schema tree; raise :class:`SchemaError` naming each bad key of ``source``."""
    try:
        return DatasetSchema.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise SchemaError(f"invalid dataset schema {source} (data.schema):\n  "
                          + "\n  ".join(lines)) from None
