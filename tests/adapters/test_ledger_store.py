"""The patient-keyed privacy ledger: accounts, composition, refusals, atomicity."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import sqlite3
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from adapters.config_files import build_config
from adapters.ledger_store import GENESIS, LedgerHead, LedgerIntegrityError, PrivacyLedger
from fl_core.data.tables import ClientSplit, Partition
from fl_core.privacy import ledger as ledger_module
from fl_core.privacy.accountants import ACCOUNTANTS, epsilon_for_history
from fl_core.privacy.accounting import site_charges
from fl_core.privacy.ledger import (
    BudgetExceededError,
    Charge,
    Records,
    SiteCharge,
    compose,
    patient_key,
)

STEP = (2.0, 1.0, 10)  # σ, q, steps: ε ≈ 8.08 at δ = 1e-5 under rdp
EPS = epsilon_for_history((STEP,), 1e-5, "rdp")


def _charge(run: str, sites: dict[str, range], steps: int = 10, sigma: float = 2.0,
            dataset: str = "heart.csv", accountant: str = "rdp") -> Charge:
    history = ((sigma, 1.0, steps),)
    eps = epsilon_for_history(history, 1e-5, accountant)
    return Charge(run, "train", dataset, tuple(
        SiteCharge(site, eps, 1e-5, accountant, history, frozenset(ids))
        for site, ids in sites.items()))


def test_patients_not_files_hold_the_account(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    cap = EPS + 0.5  # room for one run, not two
    ledger.charge(_charge("run-1", {"A": range(10)}), cap)
    # the same patients under another file name, listed in another order: refused
    again = _charge("run-2", {"A": range(9, -1, -1)}, dataset="renamed.csv")
    with pytest.raises(BudgetExceededError) as err:
        ledger.check(again, cap)
    message = str(err.value)
    for part in ("site 'A'", f"has spent ε={EPS:.4g}", f"this needs ε={EPS:.4g}",
                 f"privacy.lifetime_epsilon={cap:g}", str(ledger.path), "Nothing was trained"):
        assert part in message
    assert err.value.needed_cap > cap
    # one shared patient is enough to refuse; the run's spending is its worst patient's
    with pytest.raises(BudgetExceededError):
        ledger.check(_charge("run-3", {"A": range(9, 30)}), cap)
    # other patients at A, and the same ids at another hospital, are other people
    ledger.check(_charge("run-4", {"A": range(10, 30), "B": range(10)}), cap)
    assert patient_key("A", 3) != patient_key("B", 3)
    assert [(e.run_id, e.site, e.patients) for e in ledger.entries()] == [("run-1", "A", 10)]


def test_charge_rechecks_inside_the_transaction(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.charge(_charge("run-1", {"A": range(5)}), cap=EPS + 0.5)
    with pytest.raises(BudgetExceededError, match="Run run-2: Nothing was charged"):
        ledger.charge(_charge("run-2", {"A": range(3)}), cap=EPS + 0.5)
    assert [e.run_id for e in ledger.entries()] == ["run-1"]
    assert ledger.has_run("run-1") and not ledger.has_run("run-2")


def test_tight_composition_is_a_fresh_accountant_on_the_concatenated_histories(
    tmp_path: Path,
) -> None:
    from opacus.accountants import PRVAccountant

    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    first = _charge("r1", {"A": range(10)}, steps=10, sigma=2.0, accountant="prv")
    second = _charge("r2", {"A": range(10)}, steps=20, sigma=3.0, accountant="prv")
    for c in (first, second):
        ledger.charge(c, cap=100.0)
    (site,) = ledger.balances("prv")
    fresh = PRVAccountant()
    fresh.history = [(2.0, 1.0, 10), (3.0, 1.0, 20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = fresh.get_epsilon(delta=1e-5)  # the smallest δ of the two charges
    assert site.tight_epsilon == pytest.approx(expected, rel=1e-9) and site.tight_delta == 1e-5
    basic = first.sites[0].epsilon + second.sites[0].epsilon
    assert site.basic_epsilon == pytest.approx(basic) and site.basic_delta == pytest.approx(2e-5)
    assert site.tight_epsilon <= basic
    assert (site.runs, site.patients) == (2, 10)


@pytest.mark.parametrize("accountant", list(ACCOUNTANTS))
def test_two_identical_runs_compose_to_strictly_less_than_twice(accountant: str) -> None:
    run = (epsilon_for_history((STEP,), 1e-5, accountant), 1e-5, (STEP,))
    twice = compose([run, run], accountant)
    assert twice.basic_epsilon == pytest.approx(2 * run[0])
    assert run[0] < twice.tight_epsilon < 2 * run[0]


@pytest.mark.parametrize("accountant", list(ACCOUNTANTS))
def test_composed_epsilon_never_decreases_when_a_charge_is_added(accountant: str) -> None:
    """Read at Σδ, a small run after a large one lowered the composed ε (9.49 → 9.29): the
    cap could be crept past with small runs. Read at the smallest δ, it only grows."""
    big = (9.0, 1e-5, ((0.6, 1.0, 40),))
    small = (0.5, 1e-5, ((8.0, 1.0, 10),))
    before = compose([big], accountant).tight_epsilon
    after = compose([big, small], accountant).tight_epsilon
    assert after > before
    larger_delta = (0.5, 1e-4, ((8.0, 1.0, 10),))
    assert compose([big, larger_delta], accountant).tight_epsilon > before


def test_patients_sharing_their_charges_share_one_accountant_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.charge(_charge("r1", {"A": range(100)}), cap=100.0)
    ledger.charge(_charge("r2", {"A": range(50, 150)}, steps=5), cap=100.0)
    calls: list[tuple] = []

    def counting(history: tuple, delta: float, accountant: str) -> float:
        calls.append(history)
        return epsilon_for_history(history, delta, accountant)

    monkeypatch.setattr(ledger_module, "epsilon_for_history", counting)
    (site,) = ledger.balances("rdp")
    # three groups: r1 only (0-49), both (50-99), r2 only (100-149)
    assert len(calls) == 3
    assert sorted(g.patients for g in site.groups) == [50, 50, 50]
    assert site.groups[0].run_ids == ("r1", "r2")  # the worst group first
    assert site.patients == 150
    calls.clear()
    needs = ledger.check(_charge("r3", {"A": range(40, 60)}), cap=100.0)
    # the planned patients fall in two groups: (r1) and (r1, r2); before and after each
    assert len(calls) == 2 * 2 + 1  # and the planned charge alone, once
    assert needs[0].total.charges == 3


def test_a_site_spread_over_clients_is_charged_its_most_steps() -> None:
    cfg = build_config({})
    partition = Partition((
        ClientSplit("c0", (1, 2, 3), (9,)), ClientSplit("c1", (4, 5), ()),
        ClientSplit("c2", (6,), ())), "by_patient", 0)
    site_of = {1: "A", 2: "A", 3: "B", 4: "A", 5: "B", 6: "C", 9: "A"}
    charges = site_charges(cfg, site_of, partition, 1.5,
                           {"c0": (0.8, 40), "c1": (0.9, 30), "c2": (0.0, 0)},
                           {i: f"records-{i}" for i in site_of})
    by_site = {s.site: s for s in charges}
    assert set(by_site) == {"A", "B"}  # c2 took no step: C is not charged
    assert by_site["A"].patients == frozenset(  # training patients only, as their records
        Records(f"records-{i}", i) for i in (1, 2, 4))
    assert by_site["A"].history == ((1.5, cfg.privacy.sample_rate, 40),)
    assert by_site["A"].epsilon == 0.9


def test_an_old_ledger_file_does_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE budget_entries (id INTEGER PRIMARY KEY, fingerprint TEXT, "
                   "site TEXT, run_id TEXT, epsilon REAL, delta REAL, accountant TEXT, "
                   "created_at REAL)")
        db.execute("INSERT INTO budget_entries VALUES (1, 'f', 'A', 'r', 9.0, 1e-5, 'prv', 0)")
    ledger = PrivacyLedger(path)
    assert ledger.legacy_entries() == 1
    assert ledger.balances() == [] and ledger.entries() == []
    ledger.charge(_charge("new", {"A": range(3)}), cap=10.0)
    assert [b.site for b in ledger.balances("rdp")] == ["A"]
    assert PrivacyLedger(tmp_path / "fresh.sqlite").legacy_entries() == 0


def test_failure_inside_the_charge_leaves_no_entry(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.charge(_charge("r", {"A": range(3)}), cap=100.0)
    with pytest.raises(sqlite3.IntegrityError):
        # the same run id twice: the insert violates the key, the whole charge rolls back
        ledger.charge(_charge("r", {"C": range(3)}), cap=100.0)
    assert {e.site for e in ledger.entries()} == {"A"}
    assert ledger.check(_charge("x", {"C": range(3)}), cap=100.0)[0].spent == 0.0


T = TypeVar("T")


def _at_once(worker: Callable[..., T], path: str, runs: list[str]) -> list[T]:
    """``worker(path, run, barrier)`` for every run, each in its own process, released together
    by the barrier (on a ledger created first)."""
    PrivacyLedger(path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(len(runs))
        with ctx.Pool(len(runs)) as pool:
            return pool.starmap(worker, [(path, run, barrier) for run in runs])


def _race(path: str, run: str, barrier: multiprocessing.synchronize.Barrier) -> bool:
    ledger = PrivacyLedger(path)
    planned = _charge(run, {"A": range(20)})
    ledger.check(planned, cap=EPS + 1.0)  # all pass the early check...
    barrier.wait()
    try:
        ledger.charge(planned, cap=EPS + 1.0)  # ...one commits
        return True
    except BudgetExceededError:
        return False


@pytest.mark.slow
def test_concurrent_runs_cannot_both_spend_the_last_budget(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.sqlite")
    results = _at_once(_race, path, [f"run-{i}" for i in range(4)])
    assert sorted(results) == [False, False, False, True]
    entries = PrivacyLedger(path).entries()
    assert len(entries) == 1 and entries[0].epsilon == pytest.approx(EPS)


# --- what is not charged ------------------------------------------------------------------------


def test_benchmarks_train_only_on_the_public_dataset(tmp_path: Path, raw_csv: Path) -> None:
    import importlib
    import sys

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        report = importlib.import_module("report")
    finally:
        sys.path.remove(str(bench))
    report.require_public_dataset(raw_csv)  # the embedded public data: allowed
    resaved = tmp_path / "heart.csv"
    resaved.write_bytes(raw_csv.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(SystemExit, match="not charged to the privacy ledger") as err:
        report.require_public_dataset(resaved)
    assert "fedpriv run" in str(err.value.code)
    # every benchmark that reads the configured data guards it
    for script in bench.glob("*.py"):
        text = script.read_text()
        if "ClinicalTable" in text or "train_model" in text:
            assert "require_public_dataset(" in text, script.name


# --- the hash chain ----------------------------------------------------------------------------


def _chained(tmp_path: Path, runs: int = 3) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    for i in range(runs):
        ledger.charge(_charge(f"run-{i}", {"A": range(5), "B": range(i, i + 4)}), cap=1e6)
    return ledger


def test_the_chain_grows_with_each_charge_and_verifies(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    assert ledger.head() == (GENESIS, 0) and ledger.verify() is None
    assert ledger.contains(LedgerHead(GENESIS, 0))
    heads = []
    for i in range(3):
        ledger.charge(_charge(f"run-{i}", {"A": range(5)}), cap=1e6)
        heads.append(ledger.head())
    assert [h.count for h in heads] == [1, 2, 3]
    assert len({h.hash for h in heads}) == 3 and GENESIS not in {h.hash for h in heads}
    assert all(ledger.contains(h) for h in heads) and ledger.verify() is None
    assert not ledger.contains(LedgerHead(heads[0].hash, 2))  # a hash at another place
    ledger.require_intact(heads[1], "MLflow run x")
    with sqlite3.connect(ledger.path) as db:
        rows = db.execute("SELECT prev_hash, hash FROM ledger_charges ORDER BY id").fetchall()
    assert rows[0][0] == GENESIS and rows[1][0] == rows[0][1] and rows[2][0] == rows[1][1]


@pytest.mark.parametrize(("sql", "problem"), [
    ("UPDATE ledger_site_charges SET epsilon = 0.01 WHERE id = 3",
     "charge 2 (run run-1) was altered"),
    ("UPDATE ledger_charges SET dataset = 'x.csv' WHERE id = 1",
     "charge 1 (run run-0) was altered"),
    ("DELETE FROM ledger_patients WHERE site_charge_id = 1 AND patient_key = "
     "(SELECT MIN(patient_key) FROM ledger_patients WHERE site_charge_id = 1)",
     "charge 1 (run run-0) was altered"),
    ("DELETE FROM ledger_charges WHERE id = 2",
     "charge 2 (run run-2) does not follow the charge before it"),
    ("UPDATE ledger_charges SET id = id + 10 WHERE id = 1",
     "charge 1 (run run-1) does not follow"),
])
def test_an_edited_removed_or_reordered_charge_is_named(tmp_path: Path, sql: str,
                                                        problem: str) -> None:
    ledger = _chained(tmp_path)
    before = ledger.head()
    with sqlite3.connect(ledger.path) as db:
        db.execute(sql)
    assert problem in (ledger.verify() or "")
    with pytest.raises(LedgerIntegrityError, match="tampered with"):
        ledger.require_intact(before)


def test_a_removed_charge_with_its_site_charges_left_is_named(tmp_path: Path) -> None:
    ledger = _chained(tmp_path, runs=1)
    with sqlite3.connect(ledger.path) as db:
        db.execute("DELETE FROM ledger_charges")
    assert "belong to no charge" in (ledger.verify() or "")


def test_a_truncated_or_replaced_ledger_no_longer_holds_the_head(tmp_path: Path) -> None:
    ledger = _chained(tmp_path)
    recorded = ledger.head()
    with sqlite3.connect(ledger.path) as db:  # the last charge cut off, cleanly
        db.execute("DELETE FROM ledger_patients WHERE site_charge_id IN "
                   "(SELECT id FROM ledger_site_charges WHERE charge_id = 3)")
        db.execute("DELETE FROM ledger_site_charges WHERE charge_id = 3")
        db.execute("DELETE FROM ledger_charges WHERE id = 3")
    assert ledger.verify() is None  # what is left is a valid chain...
    with pytest.raises(LedgerIntegrityError) as err:  # ...that lacks the recorded head
        ledger.require_intact(recorded, "MLflow run abc")
    for part in (recorded.hash, "after 3 charge(s)", "MLflow run abc", "replaced or truncated",
                 "holds 2 charge(s)", "fedpriv budget new-ledger"):
        assert part in str(err.value)
    fresh = _chained(tmp_path / "other")  # the same charges made again: other times, other hashes
    assert fresh.head().count == 3 and not fresh.contains(recorded)


def test_a_ledger_written_before_the_chain_is_chained_once(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    ledger = _chained(tmp_path / "new")
    with sqlite3.connect(ledger.path) as db, sqlite3.connect(path) as old:
        db.backup(old)
        old.execute("ALTER TABLE ledger_charges DROP COLUMN hash")
        old.execute("ALTER TABLE ledger_charges DROP COLUMN prev_hash")
    migrated = PrivacyLedger(path)
    assert migrated.verify() is None and migrated.head() == ledger.head()
    assert PrivacyLedger(path).head() == ledger.head()  # chained once: reopening changes nothing
    migrated.charge(_charge("after", {"A": range(3)}), cap=1e6)
    assert migrated.verify() is None and migrated.head().count == 4


def _charge_many(path: str, run: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    ledger = PrivacyLedger(path)
    barrier.wait()
    for i in range(5):
        ledger.charge(_charge(f"{run}-{i}", {"A": range(20)}), cap=1e6)


@pytest.mark.slow
def test_concurrent_charges_keep_one_chain(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.sqlite")
    _at_once(_charge_many, path, ["p0", "p1"])
    ledger = PrivacyLedger(path)
    assert ledger.head().count == 10 and ledger.verify() is None


_KILLED_CHARGER = """
import sys, time
from adapters.ledger_store import PrivacyLedger
from fl_core.privacy.ledger import Charge, SiteCharge
ledger = PrivacyLedger(sys.argv[1])
for i in range(10_000):
    ledger.charge(Charge(f"{sys.argv[2]}-{i}", "train", "heart.csv", (SiteCharge(
        "A", 0.1, 1e-5, "rdp", ((2.0, 1.0, 1),), frozenset(range(2000))),)), cap=1e9)
"""


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_charge_leaves_a_verifiable_chain(tmp_path: Path) -> None:
    from tests.killing import kill_when, rows

    path = tmp_path / "ledger.sqlite"
    PrivacyLedger(path)
    root = Path(__file__).resolve().parents[2]
    for after in (1, 4):
        killed, _ = kill_when(
            [sys.executable, "-c", _KILLED_CHARGER, str(path), f"k{after}"],
            lambda after=after: rows(path, "SELECT COUNT(*) FROM ledger_charges") >= after * 2,
            cwd=root, timeout=120)
        assert killed
        ledger = PrivacyLedger(path)
        assert ledger.verify() is None
        count = ledger.head().count
        ledger.charge(_charge(f"after-{after}", {"A": range(3)}), cap=1e9)
        assert ledger.verify() is None and ledger.head().count == count + 1
