"""The privacy ledger's SQLite store: append-only charges per patient (an account: their
records), checked and written in one ``BEGIN IMMEDIATE`` transaction (the rules are
:mod:`fl_core.privacy.ledger`).

The charges are hash-chained, so that a ledger cannot be edited, truncated or replaced
without it showing: each ``ledger_charges`` row carries ``prev_hash`` (the previous charge's
``hash``, :data:`GENESIS` for the first) and ``hash`` = SHA-256 of ``prev_hash`` and the
canonical encoding of the charge (:func:`_canonical`: run id, kind, dataset, time, each site
charge's fields and its sorted patient keys). :meth:`PrivacyLedger.head` is the last hash and
the number of charges; whoever records it (the MLflow run, a site's anchor file) can later
ask :meth:`PrivacyLedger.contains` whether the ledger still holds it, and
:meth:`PrivacyLedger.verify` walks the chain and names the first broken charge. A file
written before the chain existed gets the two columns and its rows chained once, in id
order, the first time it is opened (what it held before then is trusted as it was found).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import NamedTuple

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
    lookup_keys,
    patient_key,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    dataset TEXT NOT NULL,
    created_at REAL NOT NULL,
    prev_hash TEXT,
    hash TEXT
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


GENESIS = "0" * 64
"""The ``prev_hash`` of a ledger's first charge, and the head of an empty ledger."""


class LedgerHead(NamedTuple):
    """Where a ledger's chain ends: the last charge's hash and the number of charges."""

    hash: str
    count: int


class LedgerIntegrityError(RuntimeError):
    """The ledger's chain is broken, or it does not hold a head recorded earlier (it was
    edited, truncated or replaced): exit 5, a privacy refusal."""


class PrivacyLedger:
    """A persistent, append-only, hash-chained record of privacy spent, per patient at a
    site."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.executescript(_SCHEMA)
        self._chain_old_rows()

    def _chain_old_rows(self) -> None:
        """Migrate a file written before the chain: add the columns and chain its rows once,
        in id order (under the write lock: two processes opening it migrate it once)."""
        with closing(self._connect()) as db:
            if "hash" in _columns(db):
                return
        with self._transaction() as db:
            if "hash" in _columns(db):
                return
            db.execute("ALTER TABLE ledger_charges ADD COLUMN prev_hash TEXT")
            db.execute("ALTER TABLE ledger_charges ADD COLUMN hash TEXT")
            prev = GENESIS
            for charge_id, _, _, digest in _chain_rows(db):
                db.execute("UPDATE ledger_charges SET prev_hash = ?, hash = ? WHERE id = ?",
                           (prev, digest(prev), charge_id))
                prev = digest(prev)

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

    def head(self) -> LedgerHead:
        """The last charge's hash and the number of charges (:data:`GENESIS`, 0 if none)."""
        with closing(self._connect()) as db:
            return _head(db)

    def contains(self, head: LedgerHead) -> bool:
        """Whether the chain holds ``head``: its ``count``-th charge has that hash (what a
        ledger that only grew since ``head`` was recorded always does)."""
        if head.count == 0:
            return head.hash == GENESIS
        with closing(self._connect()) as db:
            row = db.execute("SELECT hash FROM ledger_charges ORDER BY id LIMIT 1 OFFSET ?",
                             (head.count - 1,)).fetchone()
        return row is not None and row[0] == head.hash

    def verify(self) -> str | None:
        """Walk the chain: None if every charge's hashes hold, else what is wrong, naming the
        first broken charge (edited, a charge before it removed, reordered), or site
        charges whose charge is gone."""
        with closing(self._connect()) as db:
            prev = GENESIS
            for position, (_, row, stored, digest) in enumerate(_chain_rows(db), start=1):
                run_id, stored_prev = row
                if stored_prev != prev:
                    return (f"charge {position} (run {run_id}) does not follow the charge "
                            f"before it: a charge was removed or the charges reordered")
                if stored != digest(prev):
                    return (f"charge {position} (run {run_id}) was altered: its hash does not "
                            f"match what it records")
                prev = stored
            orphans = db.execute(
                "SELECT COUNT(*) FROM ledger_site_charges s WHERE NOT EXISTS "
                "(SELECT 1 FROM ledger_charges c WHERE c.id = s.charge_id)").fetchone()[0]
        if orphans:
            return f"{orphans} site charge(s) belong to no charge: a charge was removed"
        return None

    def require_intact(self, head: LedgerHead | None = None, recorded_by: str = "") -> None:
        """Raise :class:`LedgerIntegrityError` if the chain is broken or (given ``head``,
        recorded by ``recorded_by``) does not hold that head."""
        problem = self.verify()
        if problem:
            raise LedgerIntegrityError(f"the privacy ledger {self.path} was tampered with: "
                                       f"{problem}. Nothing was trained")
        if head is not None and not self.contains(head):
            now = self.head()
            raise LedgerIntegrityError(
                f"the privacy ledger {self.path} does not contain the head {head.hash} after "
                f"{head.count} charge(s) recorded by {recorded_by or 'an earlier run'}: it was "
                f"replaced or truncated (it holds {now.count} charge(s), head {now.hash}). "
                f"Nothing was trained. Restore the ledger, or start a new one deliberately "
                f"with `fedpriv budget new-ledger --reason ...` (at a site: `fedpriv site "
                f"new-ledger`)")

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
            created_at = time.time()
            sites = [_SiteRow(s.site, float(s.epsilon), float(s.delta), s.accountant,
                              json.dumps([list(step) for step in s.history]), len(s.patients),
                              tuple(sorted({patient_key(s.site, p) for p in s.patients})))
                     for s in sorted(spent.sites, key=lambda s: s.site)]
            prev = _head(db).hash  # under the write lock: no other charge can come between
            digest = _hash(prev, _canonical(spent.run_id, spent.kind, spent.dataset,
                                            created_at, sites))
            charge_id = db.execute(
                "INSERT INTO ledger_charges (run_id, kind, dataset, created_at, prev_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (spent.run_id, spent.kind, spent.dataset, created_at, prev, digest)).lastrowid
            for s in sites:
                site_id = db.execute(
                    "INSERT INTO ledger_site_charges (charge_id, site, epsilon, delta, "
                    "accountant, history, patients) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (charge_id, *s[:6])).lastrowid
                db.executemany(
                    "INSERT INTO ledger_patients (patient_key, site_charge_id) VALUES (?, ?)",
                    [(key, site_id) for key in s.keys])

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


class _SiteRow(NamedTuple):
    """One site charge as stored (and hashed): the history as its JSON text."""

    site: str
    epsilon: float
    delta: float
    accountant: str
    history: str
    patients: int
    keys: tuple[str, ...]  # sorted


def _canonical(run_id: str, kind: str, dataset: str, created_at: float,
               sites: Sequence[_SiteRow]) -> bytes:
    """The bytes a charge's hash covers: everything it records, in one order."""
    return json.dumps([run_id, kind, dataset, created_at, [list(s) for s in sites]],
                      separators=(",", ":"), ensure_ascii=True).encode()


def _hash(prev: str, canonical: bytes) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + canonical).hexdigest()


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(ledger_charges)")}


def _head(db: sqlite3.Connection) -> LedgerHead:
    count, = db.execute("SELECT COUNT(*) FROM ledger_charges").fetchone()
    last = db.execute("SELECT hash FROM ledger_charges ORDER BY id DESC LIMIT 1").fetchone()
    return LedgerHead(last[0] if last and last[0] else GENESIS, int(count))


def _chain_rows(db: sqlite3.Connection) -> Iterator[
        tuple[int, tuple[str, str | None], str | None, Callable[[str], str]]]:
    """Per charge in id order: its id, (run id, stored prev_hash), stored hash, and the hash
    it should have after a given prev_hash (recomputed from its rows as they are now)."""
    has_chain = "hash" in _columns(db)
    chain = ", prev_hash, hash" if has_chain else ", NULL, NULL"
    charges = db.execute("SELECT id, run_id, kind, dataset, created_at" + chain +
                         " FROM ledger_charges ORDER BY id").fetchall()
    for charge_id, run_id, kind, dataset, created_at, prev_hash, stored in charges:
        sites = []
        for site_id, *fields in db.execute(
                "SELECT id, site, epsilon, delta, accountant, history, patients FROM "
                "ledger_site_charges WHERE charge_id = ? ORDER BY site", (charge_id,)).fetchall():
            keys = tuple(sorted(k for k, in db.execute(
                "SELECT patient_key FROM ledger_patients WHERE site_charge_id = ?", (site_id,))))
            sites.append(_SiteRow(*fields, keys))
        canonical = _canonical(run_id, kind, dataset, created_at, sites)
        yield charge_id, (run_id, prev_hash), stored, \
            lambda prev, canonical=canonical: _hash(prev, canonical)


def _history(text: str) -> History:
    return tuple((float(s), float(q), int(n)) for s, q, n in json.loads(text))


def _accounts(db: sqlite3.Connection) -> tuple[dict[int, _Past], dict[str, frozenset[int]]]:
    """Every recorded site charge by id (all sites), and each patient key's set of charge ids.

    Across sites, not ``WHERE site = ?``: an account is the patient's records
    (:func:`~fl_core.privacy.ledger.patient_key`), so a patient charged under another site
    name (renamed, re-cased) is still the same account."""
    past = {row[0]: _Past(row[0], row[1], row[2], row[3], _history(row[4])) for row in db.execute(
        "SELECT s.id, c.run_id, s.epsilon, s.delta, s.history FROM ledger_site_charges s "
        "JOIN ledger_charges c ON c.id = s.charge_id")}
    charged: dict[str, set[int]] = defaultdict(set)
    for key, site_charge in db.execute(
            "SELECT patient_key, site_charge_id FROM ledger_patients"):
        if site_charge in past:
            charged[key].add(site_charge)
    return past, {key: frozenset(ids) for key, ids in charged.items()}


def _site_accounts(db: sqlite3.Connection, site: str) -> tuple[dict[int, _Past],
                                                                 dict[str, frozenset[int]]]:
    """The charges of the accounts charged at ``site``: the site's charges and every other
    charge of those accounts (a balance is displayed per site, an account is global)."""
    past, charged = _accounts(db)
    here = {i for i, in db.execute("SELECT id FROM ledger_site_charges WHERE site = ?",
                                   (site,))}
    mine = {key: ids for key, ids in charged.items() if ids & here}
    used = set().union(*mine.values()) if mine else set()
    return {i: past[i] for i in used | here}, mine


def _site_balance(db: sqlite3.Connection, site: str, accountant: str) -> SiteBalance:
    past, charged = _site_accounts(db, site)
    runs = db.execute("SELECT COUNT(*) FROM ledger_site_charges WHERE site = ?",
                      (site,)).fetchone()[0]
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
        site, runs, len(charged),
        max((g.spent.basic_epsilon for g in groups), default=0.0),
        max((g.spent.basic_delta for g in groups), default=0.0),
        max((g.spent.tight_epsilon for g in groups), default=0.0),
        min((g.spent.tight_delta for g in groups), default=0.0), accountant, tuple(groups))


def _site_need(site: str, planned: Sequence[SiteCharge],
               accounts: dict[str, tuple[frozenset[str], frozenset[int]]],
               past: dict[int, _Past], charged: dict[str, frozenset[int]]) -> SiteNeed:
    """The worst patient at ``site`` among those the planned site charges train on. A
    patient's past charges are the union over their lookup keys, at any site, and their
    planned charges every planned site charge that names their account, at any site (the same
    records planned under two site names are one patient)."""
    here = [i for i, s in enumerate(planned) if s.site == site]
    accountant = planned[here[0]].accountant
    # a patient's signature: (recorded charge ids, indices of the planned charges on them)
    signatures: set[tuple[frozenset[int], frozenset[int]]] = set()
    for keys, plans in accounts.values():
        if any(planned[i].site == site for i in plans):
            ids = frozenset().union(*(charged.get(k, frozenset()) for k in keys))
            signatures.add((ids, plans))
    spent, worst = 0.0, Composition(0, 0.0, 0.0, 0.0, 0.0)
    for ids, plans in signatures:
        before = [(p.epsilon, p.delta, p.history)
                  for p in sorted((past[i] for i in ids), key=lambda p: p.id)]
        after = before + [(planned[i].epsilon, planned[i].delta, planned[i].history)
                          for i in sorted(plans)]
        spent = max(spent, compose(before, accountant).tight_epsilon)
        total = compose(after, accountant)
        worst = max(worst, total, key=lambda c: c.tight_epsilon)
    alone = [(planned[i].epsilon, planned[i].delta, planned[i].history) for i in here]
    return SiteNeed(site, spent, sum(planned[i].epsilon for i in here),
                    compose(alone, accountant).tight_epsilon, worst)


def _planned_patients(planned: Sequence[SiteCharge]
                      ) -> dict[str, tuple[frozenset[str], frozenset[int]]]:
    """Account key → (every key its past charges may be under, indices of the planned site
    charges that train on it, at any site) (:func:`~fl_core.privacy.ledger.lookup_keys`)."""
    keys: dict[str, set[str]] = defaultdict(set)
    plans: dict[str, set[int]] = defaultdict(set)
    for i, s in enumerate(planned):
        for p in s.patients:
            account = patient_key(s.site, p)
            keys[account].update(lookup_keys(s.site, p))
            plans[account].add(i)
    return {a: (frozenset(keys[a]), frozenset(idx)) for a, idx in plans.items()}


def _refuse_overspend(
    db: sqlite3.Connection, charges: Iterable[Charge], cap: float, path: Path, consequence: str,
) -> list[SiteNeed]:
    planned = [s for charge in charges for s in charge.sites]
    accounts = _planned_patients(planned)
    past, charged = _accounts(db)  # read once for every site
    needs = [_site_need(site, planned, accounts, past, charged)
             for site in sorted({s.site for s in planned})]
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
