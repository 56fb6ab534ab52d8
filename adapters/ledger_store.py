"""The privacy ledger's SQLite store: append-only charges per patient at a site, checked and
written in one ``BEGIN IMMEDIATE`` transaction (the rules are :mod:`fl_core.privacy.ledger`)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from fl_core.config.model import PrivacyConfig
from fl_core.privacy.ledger import (
    _TOLERANCE,
    BudgetExceededError,
    Charge,
    Composition,
    GroupBalance,
    History,
    LedgerEntry,
    SiteBalance,
    SiteCharge,
    SiteNeed,
    _Past,
    _round_up,
    compose,
    patient_key,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    dataset TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_site_charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    charge_id INTEGER NOT NULL REFERENCES ledger_charges (id),
    site TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon >= 0),
    delta REAL NOT NULL CHECK (delta >= 0),
    accountant TEXT NOT NULL,
    history TEXT NOT NULL,
    patients INTEGER NOT NULL,
    UNIQUE (charge_id, site)
);
CREATE TABLE IF NOT EXISTS ledger_patients (
    patient_key TEXT NOT NULL,
    site_charge_id INTEGER NOT NULL REFERENCES ledger_site_charges (id),
    PRIMARY KEY (patient_key, site_charge_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_site_charges_by_site ON ledger_site_charges (site);
"""


class PrivacyLedger:
    """A persistent, append-only record of privacy spent, per patient at a site."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE
        return sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)

    # --- reading ------------------------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """Every site charge, oldest first."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT c.run_id, c.kind, c.dataset, c.created_at, s.site, s.epsilon, s.delta, "
                "s.accountant, s.history, s.patients FROM ledger_site_charges s "
                "JOIN ledger_charges c ON c.id = s.charge_id ORDER BY s.id").fetchall()
        return [LedgerEntry(*row[:8], _history(row[8]), row[9]) for row in rows]

    def has_run(self, run_id: str) -> bool:
        with closing(self._connect()) as db:
            row = db.execute("SELECT 1 FROM ledger_charges WHERE run_id = ?", (run_id,))
            return row.fetchone() is not None

    def legacy_entries(self) -> int:
        """Rows of the old dataset-keyed ``budget_entries`` table (not counted)."""
        with closing(self._connect()) as db:
            exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                "AND name = 'budget_entries'").fetchone()
            return db.execute("SELECT COUNT(*) FROM budget_entries").fetchone()[0] if exists \
                else 0

    def balances(
        self, accountant: str = PrivacyConfig.model_fields["accountant"].default,
    ) -> list[SiteBalance]:
        """Per site: runs, patients, and the worst patient's basic and tight composition
        (composed by ``accountant``: ``privacy.accountant``, by default the config model's)."""
        with closing(self._connect()) as db:
            sites = [r[0] for r in db.execute(
                "SELECT DISTINCT site FROM ledger_site_charges ORDER BY site")]
            return [_site_balance(db, site, accountant) for site in sites]

    # --- spending -----------------------------------------------------------------------------

    def check(self, planned: Charge | Sequence[Charge], cap: float,
              consequence: str = "Nothing was trained") -> list[SiteNeed]:
        """Raise :class:`BudgetExceededError` unless every patient of ``planned`` (one charge
        or several, composed together) stays within ``cap``; returns the needs per site."""
        charges = [planned] if isinstance(planned, Charge) else list(planned)
        with closing(self._connect()) as db:
            return _refuse_overspend(db, charges, cap, self.path, consequence)

    def charge(self, spent: Charge, cap: float,
               consequence: str = "Nothing was charged and no model was written") -> None:
        """Record ``spent`` atomically if every patient stays within ``cap``."""
        with self._transaction() as db:
            _refuse_overspend(db, [spent], cap, self.path, f"Run {spent.run_id}: {consequence}")
            charge_id = db.execute(
                "INSERT INTO ledger_charges (run_id, kind, dataset, created_at) "
                "VALUES (?, ?, ?, ?)",
                (spent.run_id, spent.kind, spent.dataset, time.time())).lastrowid
            for s in sorted(spent.sites, key=lambda s: s.site):
                site_id = db.execute(
                    "INSERT INTO ledger_site_charges (charge_id, site, epsilon, delta, "
                    "accountant, history, patients) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (charge_id, s.site, float(s.epsilon), float(s.delta), s.accountant,
                     json.dumps([list(step) for step in s.history]), len(s.patients)),
                ).lastrowid
                db.executemany(
                    "INSERT INTO ledger_patients (patient_key, site_charge_id) VALUES (?, ?)",
                    [(patient_key(s.site, p), site_id) for p in s.patients])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")  # take the write lock before reading the balance
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


def _history(text: str) -> History:
    return tuple((float(s), float(q), int(n)) for s, q, n in json.loads(text))


def _site_accounts(db: sqlite3.Connection, site: str) -> tuple[dict[int, _Past],
                                                                 dict[str, frozenset[int]]]:
    """A site's recorded charges by id, and each charged patient key's set of charge ids."""
    past = {row[0]: _Past(row[0], row[1], row[2], row[3], _history(row[4])) for row in db.execute(
        "SELECT s.id, c.run_id, s.epsilon, s.delta, s.history FROM ledger_site_charges s "
        "JOIN ledger_charges c ON c.id = s.charge_id WHERE s.site = ?", (site,))}
    charged: dict[str, set[int]] = defaultdict(set)
    for key, site_charge in db.execute(
            "SELECT p.patient_key, p.site_charge_id FROM ledger_patients p "
            "JOIN ledger_site_charges s ON s.id = p.site_charge_id WHERE s.site = ?", (site,)):
        charged[key].add(site_charge)
    return past, {key: frozenset(ids) for key, ids in charged.items()}


def _site_balance(db: sqlite3.Connection, site: str, accountant: str) -> SiteBalance:
    past, charged = _site_accounts(db, site)
    patients_of: dict[frozenset[int], int] = defaultdict(int)
    for ids in charged.values():  # group patients by their set of charges
        patients_of[ids] += 1
    groups = []
    for ids, count in patients_of.items():
        mine = sorted((past[i] for i in ids), key=lambda p: p.id)
        spent = compose([(p.epsilon, p.delta, p.history) for p in mine], accountant)
        groups.append(GroupBalance(tuple(p.run_id for p in mine), count, spent))
    groups.sort(key=lambda g: -g.spent.tight_epsilon)
    return SiteBalance(
        site, len(past), len(charged),
        max((g.spent.basic_epsilon for g in groups), default=0.0),
        max((g.spent.basic_delta for g in groups), default=0.0),
        max((g.spent.tight_epsilon for g in groups), default=0.0),
        min((g.spent.tight_delta for g in groups), default=0.0), accountant, tuple(groups))


def _site_need(db: sqlite3.Connection, site: str, planned: Sequence[SiteCharge]) -> SiteNeed:
    """The worst patient at ``site`` among those the planned site charges train on."""
    past, charged = _site_accounts(db, site)
    accountant = planned[0].accountant
    # a patient's signature: (recorded charge ids, indices of the planned charges on them)
    signatures: set[tuple[frozenset[int], frozenset[int]]] = set()
    for key, plans in _planned_patients(site, planned).items():
        signatures.add((charged.get(key, frozenset()), plans))
    spent, worst = 0.0, Composition(0, 0.0, 0.0, 0.0, 0.0)
    for ids, plans in signatures:
        before = [(p.epsilon, p.delta, p.history)
                  for p in sorted((past[i] for i in ids), key=lambda p: p.id)]
        after = before + [(planned[i].epsilon, planned[i].delta, planned[i].history)
                          for i in sorted(plans)]
        spent = max(spent, compose(before, accountant).tight_epsilon)
        total = compose(after, accountant)
        worst = max(worst, total, key=lambda c: c.tight_epsilon)
    alone = [(s.epsilon, s.delta, s.history) for s in planned]
    return SiteNeed(site, spent, sum(s.epsilon for s in planned),
                    compose(alone, accountant).tight_epsilon, worst)


def _planned_patients(site: str, planned: Sequence[SiteCharge]) -> dict[str, frozenset[int]]:
    """Patient key → indices of the planned site charges that train on that patient."""
    plans: dict[str, set[int]] = defaultdict(set)
    for i, s in enumerate(planned):
        for p in s.patients:
            plans[patient_key(site, p)].add(i)
    return {key: frozenset(idx) for key, idx in plans.items()}


def _refuse_overspend(
    db: sqlite3.Connection, charges: Iterable[Charge], cap: float, path: Path, consequence: str,
) -> list[SiteNeed]:
    by_site: dict[str, list[SiteCharge]] = defaultdict(list)
    for charge in charges:
        for s in charge.sites:
            by_site[s.site].append(s)
    needs = [_site_need(db, site, planned) for site, planned in sorted(by_site.items())]
    over = [n for n in needs if n.total.tight_epsilon > cap + _TOLERANCE]
    if over:
        needed_cap = max(n.total.tight_epsilon for n in needs)
        detail = "; ".join(
            f"site {n.site!r}: its most-exposed patient has spent ε={n.spent:.4g}, this needs "
            f"ε={n.planned_tight:.4g} composed ({n.planned_basic:.4g} summed), total "
            f"ε={n.total.tight_epsilon:.4g} composed ({n.total.basic_epsilon:.4g} summed, "
            f"δ={n.total.basic_delta:.2g}) > cap {cap:g}" for n in over)
        raise BudgetExceededError(
            f"privacy budget exhausted (privacy.lifetime_epsilon={cap:g} per patient, "
            f"ledger {path}): {detail}. {consequence}. Lower privacy.epsilon; a lifetime cap "
            f"of privacy.lifetime_epsilon={_round_up(needed_cap):g} or more would allow it "
            f"(a policy decision); see `fedpriv budget`", needed_cap)
    return needs
