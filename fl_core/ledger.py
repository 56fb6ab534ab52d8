"""The privacy-budget ledger: what every released model has cost each site, across runs.

A run at ``(ε, δ)`` on a dataset spends ``ε`` of each participating site's lifetime budget;
by sequential composition the costs of all runs on the same data add up (ε and δ both). The
ledger is one SQLite file (the project state directory by default) with one row per
(dataset fingerprint, site, run).

Two operations keep it honest:

* :meth:`PrivacyLedger.check` — before training: would this run's planned ε, on top of what
  the ledger holds, stay within the lifetime cap at every site? If not,
  :class:`BudgetExceededError` and nothing is trained.
* :meth:`PrivacyLedger.charge` — at release: in one ``BEGIN IMMEDIATE`` transaction, check
  again with the ε actually spent and insert the rows. Call it as the last step of the
  registration it pays for (``register_model(on_registered=...)``): if it raises, the
  registration is rolled back; if the registration fails first, it never runs. A crashed run
  therefore leaves no entry, and of two concurrent runs that each fit alone but not together,
  the second to commit is refused (SQLite serialises the write transactions).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from fl_core.privacy import PrivacyError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    site TEXT NOT NULL,
    run_id TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon >= 0),
    delta REAL NOT NULL CHECK (delta >= 0),
    accountant TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (fingerprint, site, run_id)
);
CREATE INDEX IF NOT EXISTS budget_by_data ON budget_entries (fingerprint, site);
"""
# float rounding slack: a run that spends exactly what is left must fit
_TOLERANCE = 1e-9


class BudgetExceededError(PrivacyError):
    """This run's ε plus what the ledger holds would exceed a site's lifetime cap."""


@dataclass(frozen=True)
class LedgerEntry:
    fingerprint: str
    site: str
    run_id: str
    epsilon: float
    delta: float
    accountant: str
    created_at: float


@dataclass(frozen=True)
class SiteBudget:
    """One site's account on one dataset."""

    fingerprint: str
    site: str
    runs: int
    epsilon: float
    delta: float


class PrivacyLedger:
    """A persistent, append-only record of privacy spent, per dataset and site."""

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

    def entries(self, fingerprint: str | None = None) -> list[LedgerEntry]:
        query = ("SELECT fingerprint, site, run_id, epsilon, delta, accountant, created_at "
                 "FROM budget_entries")
        args: tuple[str, ...] = ()
        if fingerprint is not None:
            query, args = query + " WHERE fingerprint = ?", (fingerprint,)
        with closing(self._connect()) as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [LedgerEntry(*row) for row in rows]

    def balances(self, fingerprint: str | None = None) -> list[SiteBudget]:
        """ε and δ spent so far per (dataset, site), by basic composition (sums)."""
        with closing(self._connect()) as db:
            return _balances(db, fingerprint)

    # --- spending -----------------------------------------------------------------------------

    def check(self, fingerprint: str, planned: Mapping[str, float], cap: float) -> None:
        """Raise :class:`BudgetExceededError` if ``planned`` ε per site would exceed ``cap``."""
        with closing(self._connect()) as db:
            _refuse_overspend(db, fingerprint, planned, cap, self.path,
                              "Nothing was trained or registered")

    def charge(
        self, fingerprint: str, spent: Mapping[str, float], delta: float, accountant: str,
        run_id: str, cap: float,
    ) -> None:
        """Record ``spent`` ε per site for ``run_id`` atomically, if it fits under ``cap``."""
        with self._transaction() as db:
            _refuse_overspend(db, fingerprint, spent, cap, self.path,
                              f"Run {run_id} was not registered")
            now = time.time()
            db.executemany(
                "INSERT INTO budget_entries (fingerprint, site, run_id, epsilon, delta, "
                "accountant, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(fingerprint, site, run_id, float(eps), float(delta), accountant, now)
                 for site, eps in sorted(spent.items())],
            )

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


def _balances(db: sqlite3.Connection, fingerprint: str | None) -> list[SiteBudget]:
    query = ("SELECT fingerprint, site, COUNT(*), SUM(epsilon), SUM(delta) FROM budget_entries"
             + (" WHERE fingerprint = ?" if fingerprint is not None else "")
             + " GROUP BY fingerprint, site ORDER BY fingerprint, site")
    args = (fingerprint,) if fingerprint is not None else ()
    return [SiteBudget(*row) for row in db.execute(query, args).fetchall()]


def _refuse_overspend(
    db: sqlite3.Connection, fingerprint: str, planned: Mapping[str, float], cap: float,
    path: Path, consequence: str,
) -> None:
    spent = {b.site: b.epsilon for b in _balances(db, fingerprint)}
    over = [(site, spent.get(site, 0.0), eps) for site, eps in sorted(planned.items())
            if spent.get(site, 0.0) + eps > cap + _TOLERANCE]
    if over:
        detail = "; ".join(f"site {site!r} has spent ε={used:.4g}, this run needs ε={eps:.4g}, "
                           f"total {used + eps:.4g} > {cap:g}" for site, used, eps in over)
        raise BudgetExceededError(
            f"privacy budget exhausted (privacy.lifetime_epsilon={cap:g}, ledger {path}, "
            f"dataset {fingerprint[:12]}): {detail}. {consequence}; lower privacy.epsilon, "
            f"or see `fedpriv budget`")
