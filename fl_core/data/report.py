"""The per-site data report: what a table holds at each site before anything is trained.

For each site: rows and patients in the file, rows left out at load and why
(``label.drop_values``: no result; ``data.drop_incomplete``: a selected feature empty), the
patients kept, how many of them are positive (prevalence = positive patients / patients kept),
and per feature the share of the site's rows with an empty cell and with a "not measured"
token (``missing_values``). A row is never dropped by validation: a failed validation stops
the run instead (exit 3), so a report exists only for data that passed.

It is computed from the raw rows exactly as :class:`adapters.tables.ClinicalTable` cleans
them (a patient's site is that of their first record, label drops first, then incomplete
rows), so its kept counts are the training table's. Pure: a frame in, a report out.

Exact per-site counts are fine where the table is already in one place (simulation: the
coordinator holds the data). In sites mode each site makes its own report from its own file
and keeps it at the site (docs/privacy.md): nothing of it is sent to the coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from fl_core.data.schema import DatasetSchema
from fl_core.data.tables import Partition, binary_label, not_measured

NO_SITE = "<no site>"
LABEL_DROP = "label.drop_values"
INCOMPLETE = "data.drop_incomplete"


@dataclass(frozen=True)
class SiteReport:
    """One site's figures (counts of rows and of patients; shares in [0, 1])."""

    site: str
    rows: int
    patients: int
    dropped_rows: dict[str, int]
    dropped_patients: int  # patients none of whose rows is kept
    kept_rows: int
    kept_patients: int
    positive_patients: int
    prevalence: float | None  # positive / kept patients; None without any
    missing: dict[str, float]  # feature → share of the site's rows with an empty cell
    not_measured: dict[str, float]  # feature → share holding a missing_values token
    train_patients: int | None = None
    test_patients: int | None = None


@dataclass(frozen=True)
class DataReport:
    """Every site's :class:`SiteReport`, the totals, and the options that shaped them."""

    dataset: str
    features: list[str]
    drop_incomplete: bool
    sites: list[SiteReport]
    notes: list[str] = field(default_factory=list)

    def total(self, key: str) -> int:
        return sum(int(getattr(s, key) or 0) for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``reports/data_report.json``; the model card reads this)."""
        totals = {key: self.total(key) for key in
                  ("rows", "patients", "dropped_patients", "kept_rows", "kept_patients",
                   "positive_patients")}
        kept = totals["kept_patients"]
        totals["prevalence"] = round(totals["positive_patients"] / kept, 6) if kept else None
        totals["dropped_rows"] = {k: sum(s.dropped_rows.get(k, 0) for s in self.sites)
                                  for k in (LABEL_DROP, INCOMPLETE)}
        return {"schema": self.dataset, "features": list(self.features),
                "drop_incomplete": self.drop_incomplete,
                "sites": [asdict(s) for s in self.sites], "total": totals,
                "notes": list(self.notes)}

    def table_rows(self) -> list[list[str]]:
        """One row per site then the total: the columns of :data:`TABLE_HEAD`."""
        rows = [_row(s.site, s.rows, s.patients, s.dropped_rows, s.kept_patients,
                     s.positive_patients, s.prevalence, s.missing, s.train_patients,
                     s.test_patients) for s in self.sites]
        d = self.to_dict()["total"]
        split = all(s.train_patients is not None for s in self.sites)
        rows.append(_row("total", d["rows"], d["patients"], d["dropped_rows"],
                         d["kept_patients"], d["positive_patients"], d["prevalence"], {},
                         self.total("train_patients") if split else None,
                         self.total("test_patients") if split else None))
        return rows

    def text(self) -> str:
        """The report as a plain-text table (printed before training)."""
        rows = [TABLE_HEAD, *self.table_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEAD))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        return (f"data report ({self.dataset}; per site, before training):\n"
                + "\n".join(lines) + "\n" + self._missing_text() + "".join(
                    f"note: {n}\n" for n in self.notes))

    def _missing_text(self) -> str:
        lines = []
        for s in self.sites:
            shares = [f"{name} {_pct(s.missing[name])}"
                      + (f" (+{_pct(s.not_measured[name])} not measured)"
                         if s.not_measured.get(name) else "")
                      for name in self.features
                      if s.missing.get(name) or s.not_measured.get(name)]
            lines.append(f"  {s.site}: " + (", ".join(shares) or "none"))
        return "missing per feature (share of the site's rows):\n" + "\n".join(lines) + "\n"

    def markdown(self) -> str:
        """The report as markdown (``reports/data_report.md``)."""
        head = "| " + " | ".join(TABLE_HEAD) + " |\n|" + "---|" * len(TABLE_HEAD) + "\n"
        body = "".join("| " + " | ".join(r) + " |\n" for r in self.table_rows())
        missing = "| feature | " + " | ".join(s.site for s in self.sites) + " |\n|" \
            + "---|" * (len(self.sites) + 1) + "\n" + "".join(
                f"| {name} | " + " | ".join(
                    _pct(s.missing.get(name, 0.0))
                    + (f" (+{_pct(s.not_measured[name])} n.m.)" if s.not_measured.get(name)
                       else "") for s in self.sites) + " |\n"
                for name in self.features)
        notes = "".join(f"- {n}\n" for n in self.notes)
        return (f"# Data report: {self.dataset}\n\nPer site, before training. Rows dropped: "
                f"`{LABEL_DROP}` (no result), `{INCOMPLETE}` (a feature empty; "
                f"{'on' if self.drop_incomplete else 'off'}). Prevalence: positive patients / "
                f"patients kept.\n\n{head}{body}\n## Missing cells per feature\n\nShare of "
                f"the site's rows with an empty cell (n.m.: a `missing_values` token).\n\n"
                f"{missing}" + (f"\n## Notes\n\n{notes}" if notes else ""))


TABLE_HEAD = ["site", "rows", "patients", "dropped: no label", "dropped: incomplete",
              "patients kept", "positive", "prevalence", "train/test patients"]


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %"


def _row(site: str, rows: int, patients: int, dropped: Mapping[str, int], kept: int,
         positive: int, prevalence: float | None, missing: Mapping[str, float],
         train: int | None, test: int | None) -> list[str]:
    return [site, str(rows), str(patients), str(dropped.get(LABEL_DROP, 0)),
            str(dropped.get(INCOMPLETE, 0)), str(kept), str(positive),
            "-" if prevalence is None else f"{prevalence:.3f}",
            "-" if train is None else f"{train}/{test}"]


def _shares(mask: pd.DataFrame, by: pd.Series) -> dict[str, dict[str, float]]:
    """site → feature → share of the site's rows where ``mask`` holds."""
    means = mask.groupby(by).mean()
    return {str(site): {c: round(float(v), 6) for c, v in row.items()}
            for site, row in means.iterrows()}


def data_report(raw: pd.DataFrame, spec: DatasetSchema, features: Sequence[str], *,
                drop_incomplete: bool, partition: Partition | None = None,
                notes: Sequence[str] = ()) -> DataReport:
    """The report of the raw rows ``raw`` (every row of the file(s), their site column
    attached) read under ``spec`` with the selected ``features`` and ``drop_incomplete``;
    with ``partition`` (by site) also each site's train/test patients."""
    features = list(features)
    ids = raw[spec.patient_id].astype(str).str.strip()
    site = spec.site_of(raw).fillna(NO_SITE).astype(str)
    label_drop = spec.label.dropped(raw[spec.label.column])
    tokens = pd.DataFrame({c: not_measured(raw[c], spec.feature(c).missing_values)
                           if spec.feature(c).missing_values else False for c in features},
                          index=raw.index)
    empty = raw[features].isna()
    complete = ~empty.any(axis=1)
    incomplete = ~label_drop & ~complete if drop_incomplete else label_drop & False
    kept = ~label_drop & ~incomplete
    labels = binary_label(raw.loc[kept, spec.label.column], spec.label)
    positive = labels.groupby(ids[kept]).max()
    missing, marked = _shares(empty, site), _shares(tokens, site)
    splits = {c.client_id: c for c in partition.clients} if partition is not None and \
        partition.scheme == "by_site" else {}
    reports = []
    for name in [s for s in spec.sites if (site == s).any()] + sorted(
            set(site) - set(spec.sites)):
        at = site == name
        kept_ids = ids[at & kept].unique()
        split = splits.get(name)
        reports.append(SiteReport(
            site=name, rows=int(at.sum()), patients=int(ids[at].nunique()),
            dropped_rows={LABEL_DROP: int((at & label_drop).sum()),
                          INCOMPLETE: int((at & incomplete).sum())},
            dropped_patients=int(ids[at].nunique() - len(kept_ids)),
            kept_rows=int((at & kept).sum()), kept_patients=len(kept_ids),
            **_positives(positive, kept_ids),
            missing={c: missing.get(name, {}).get(c, 0.0) for c in features},
            not_measured={c: marked.get(name, {}).get(c, 0.0) for c in features},
            train_patients=len(split.train_ids) if split else None,
            test_patients=len(split.test_ids) if split else None))
    return DataReport(dataset=spec.id, features=features, drop_incomplete=drop_incomplete,
                      sites=reports, notes=list(notes))


def _positives(positive: pd.Series, kept_ids: Any) -> dict[str, Any]:
    """Positive patients among ``kept_ids`` and the prevalence (None without patients)."""
    if not len(kept_ids):
        return {"positive_patients": 0, "prevalence": None}
    chosen = positive.loc[kept_ids]
    return {"positive_patients": int(chosen.sum()), "prevalence": round(float(chosen.mean()), 6)}
