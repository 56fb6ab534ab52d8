"""Synthetic rows drawn from a dataset schema alone: for trying a configuration for free.

:func:`synthetic_rows` writes no file and reads no patient: every value comes from what the
schema *declares* (ranges, categories, boolean tokens, "not measured" tokens, sites or site
groups, the label's values and rule, one or several records per patient) and a seeded
generator. ``fedpriv run --dry-run`` validates, partitions, trains and gates on such rows, so
that a schema or configuration mistake shows up before any real patient is used (and before
anything is charged to the privacy ledger). The rows are meant to pass validation: each
feature is left empty at well under its ``max_missing_rate``; the labels are random, so a
model trained on them learns nothing (the dry run says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fl_core.data.schema import DatasetSchema, FeatureSpec

SYNTHETIC_SITE_VALUE = "synthetic other site"
"""A raw site value no ``site_groups`` entry lists: it lands in ``site_default``."""

MAX_MISSING_SHARE = 0.03
"""Largest share of a feature's cells left empty (a quarter of its limit when that is less)."""

TOKEN_SHARE = 0.05
"""Share of a feature's cells holding one of its ``missing_values`` tokens, when it has any."""


@dataclass(frozen=True)
class SyntheticPlan:
    """How many synthetic patients each site gets, how many rows each of them has, and
    the share of positive labels."""

    patients_per_site: int = 100
    max_records: int = 3  # records_per_patient: many → 1..max_records rows per patient
    positive_share: float = 0.4
    seed: int = 0


def missing_share(spec: DatasetSchema, name: str) -> float:
    """The share of ``name``'s cells left empty: a quarter of its per-site limit, at most
    :data:`MAX_MISSING_SHARE` (so a site stays far under the limit whatever the draw)."""
    return min(spec.missing_limit(name) / 4, MAX_MISSING_SHARE)


def _numeric(feature: FeatureSpec, n: int, rng: np.random.Generator) -> list[object]:
    assert feature.low is not None and feature.high is not None
    if feature.type == "integer":
        low, high = math.ceil(feature.low), math.floor(feature.high)
        return [int(v) for v in rng.integers(low, high + 1, size=n)]
    return [round(float(v), 3) for v in rng.uniform(feature.low, feature.high, size=n)]


def feature_values(spec: DatasetSchema, name: str, n: int,
                   rng: np.random.Generator) -> list[object]:
    """``n`` values of feature ``name`` (one site's rows) as they would appear in a CSV:
    numbers in range, declared categories or boolean tokens; exactly
    ``floor(missing_share · n)`` cells empty (None), so the site stays under the limit
    however few its rows, and, where the schema declares ``missing_values``, about
    :data:`TOKEN_SHARE` of the others holding one of those tokens."""
    feature = spec.feature(name)
    values: list[object] = (_numeric(feature, n, rng) if feature.numeric else
                            [str(v) for v in rng.choice(list(feature.accepted()), size=n)])
    empty = rng.permutation(n)[:math.floor(missing_share(spec, name) * n)]
    tokens = list(feature.missing_values)
    if tokens:
        for i in np.flatnonzero(rng.random(n) < TOKEN_SHARE):
            values[i] = tokens[int(rng.integers(len(tokens)))]
    for i in empty:
        values[int(i)] = None
    return values


def _label_pool(spec: DatasetSchema) -> tuple[list[object], list[object], list[object]]:
    """The raw label values to draw from: (positive, negative, dropped)."""
    rule = spec.label
    if rule.values is not None:
        kept = [v for v in rule.values if v not in rule.drop_values]
        positive = [v for v in kept if _is_positive(spec, v)]
        return positive, [v for v in kept if v not in positive], list(rule.drop_values)
    comparison = rule.comparison()
    if comparison is not None:  # numbers around the threshold: both classes whatever the rule
        op, number = comparison
        near = [number - 1, number, number + 1]
        return ([f"{v:g}" for v in near if op(v, number)],
                [f"{v:g}" for v in near if not op(v, number)], [])
    positive = list(rule.positive_values or [])
    return positive, [f"not {positive[0]}"], []


def _is_positive(spec: DatasetSchema, value: str) -> bool:
    """Whether the raw label ``value`` is positive under the schema's rule."""
    comparison = spec.label.comparison()
    if comparison is None:
        return value in (spec.label.positive_values or [])
    op, number = comparison
    return _is_number(value) and bool(op(float(value), number))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def label_values(spec: DatasetSchema, n: int, plan: SyntheticPlan,
                 rng: np.random.Generator) -> list[object]:
    """``n`` raw label values: positive with ``plan.positive_share``, a ``drop_values``
    value (a test without a result) in about 2 % of rows where the schema has any."""
    positive, negative, dropped = _label_pool(spec)
    if not positive or not negative:
        # validation names this one-class rule (exit 2); draw what there is so it does
        positive, negative = positive or negative, negative or positive
    draw = rng.random(n)
    out: list[object] = []
    for u in draw:
        pool = dropped if dropped and u > 0.98 else positive if u < plan.positive_share \
            else negative
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def site_raw_values(spec: DatasetSchema, site: str) -> list[str]:
    """The raw values of the site column that become ``site``: its ``site_groups`` entry,
    an unlisted value for ``site_default``, else the site's own name."""
    if spec.site_groups is None:
        return [site]
    if site in spec.site_groups and spec.site_groups[site]:
        return list(spec.site_groups[site])
    return [SYNTHETIC_SITE_VALUE]


def _records(spec: DatasetSchema, plan: SyntheticPlan, rng: np.random.Generator) -> list[int]:
    """Rows per patient for one site."""
    if spec.records_per_patient == "one":
        return [1] * plan.patients_per_site
    return [int(v) for v in rng.integers(1, plan.max_records + 1, size=plan.patients_per_site)]


def synthetic_rows(spec: DatasetSchema, plan: SyntheticPlan = SyntheticPlan(),
                   sites: Sequence[str] | None = None) -> pd.DataFrame:
    """A raw table of ``plan.patients_per_site`` synthetic patients at each of ``sites``
    (default: the schema's ``sites``), with the schema's columns (its ignored ones empty).

    Patient ids are integers, unique across sites (1, 2, …); under
    ``records_per_patient: many`` a patient has 1 to ``plan.max_records`` rows, all at one
    site. Under ``site_source: file`` the site column is still filled (with each row's own
    site): a site's file may hold it, and :func:`split_by_site` writes one frame per site.
    """
    rng = np.random.default_rng(plan.seed)
    blocks = []
    next_id = 1
    for site in sites if sites is not None else spec.sites:
        counts = _records(spec, plan, rng)
        ids = [pid for pid, count in enumerate(counts, start=next_id) for _ in range(count)]
        next_id += len(counts)
        blocks.append(_site_block(spec, plan, rng, site, ids))
    return pd.concat(blocks, ignore_index=True)


def _site_block(spec: DatasetSchema, plan: SyntheticPlan, rng: np.random.Generator,
                site: str, ids: list[int]) -> pd.DataFrame:
    """One site's rows for the patients ``ids`` (one entry per row)."""
    n = len(ids)
    columns: dict[str, list[object]] = {
        spec.patient_id: ids,
        spec.site: [str(v) for v in rng.choice(site_raw_values(spec, site), size=n)],
        spec.label.column: label_values(spec, n, plan, rng)}
    for name in spec.features:
        columns[name] = feature_values(spec, name, n, rng)
    for name in spec.ignore:
        columns[name] = [None] * n
    return pd.DataFrame(columns)


def split_by_site(spec: DatasetSchema, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """A table of :func:`synthetic_rows` as one frame per site (``site_source: file``), in
    the schema's site order; each keeps its site column (holding its own site only)."""
    sites = spec.site_values(frame[spec.site])
    return {site: frame[sites == site].reset_index(drop=True) for site in spec.sites
            if bool((sites == site).any())}
