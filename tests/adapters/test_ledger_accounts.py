"""The ledger cannot be fooled by how the same patients are written down: renumbered ids,
renamed sites, CRLF and a BOM, shuffled rows, one file per site instead of the pooled file
all charge the same accounts (a second run that would take them past the cap is refused)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from adapters.config_files import load_config
from adapters.ledger_store import PrivacyLedger
from adapters.site_files import site_record_keys
from adapters.tables import ClinicalTable
from fl_core.config.model import PipelineConfig
from fl_core.privacy.accountants import epsilon_for_history
from fl_core.privacy.accounting import planned_charge
from fl_core.privacy.ledger import BudgetExceededError, Charge, Records, SiteCharge
from tests.adapters.test_site_files_one_per_site import write_site_files

RAW = Path("data") / "raw" / "heart_disease_uci.csv"
SIGMA = 2.0  # 2 rounds × 2 epochs × 10 steps at q = 0.1: ε ≈ 1.9


@pytest.fixture(autouse=True)
def fresh_cache():
    ClinicalTable.clear_cache()
    yield
    ClinicalTable.clear_cache()


def _config(project: Path, path: Path | None = None) -> PipelineConfig:
    sets = ["rounds=2", "privacy.sample_rate=0.1"]
    if path is not None:
        sets.append(f"data.path={path}")
    return load_config(project / "params.yaml", sets)


def _charge(cfg: PipelineConfig, project: Path, run_id: str) -> Charge:
    table = ClinicalTable.get(cfg.data, project)
    partition = table.partition(cfg.data, cfg.seed)
    return planned_charge(cfg, table.site_of_patient(), partition, SIGMA, run_id, "train",
                          table.record_keys())


def _rewrite(project: Path, name: str, change: Callable[[pd.DataFrame], pd.DataFrame],
             **to_csv: object) -> Path:
    frame = pd.read_csv(project / RAW, dtype=str, keep_default_na=False)
    path = project / "data" / "raw" / name
    change(frame).to_csv(path, index=False, **to_csv)
    return path


def _renumbered(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(id=(frame["id"].astype(int) + 100_000).astype(str))


def _renamed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(dataset=" " + frame["dataset"].str.lower() + "  ")


def _shuffled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sample(frac=1.0, random_state=7)


def _same(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


VARIANTS = {
    "renumbered ids": ("renumbered.csv", _renumbered, {}),
    "renamed sites": ("renamed.csv", _renamed, {}),
    "CRLF and a BOM": ("crlf_bom.csv", _same, {"lineterminator": "\r\n",
                                                "encoding": "utf-8-sig"}),
    "shuffled rows": ("shuffled.csv", _shuffled, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_same_patients_written_differently_are_the_same_accounts(
        project: Path, variant: str) -> None:
    name, change, options = VARIANTS[variant]
    path = _rewrite(project, name, change, **options)
    if variant == "CRLF and a BOM":
        assert path.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in path.read_bytes()
    base, other = _config(project), _config(project, path)
    first, second = _charge(base, project, "first"), _charge(other, project, "second")
    spent = max(s.epsilon for s in first.sites)
    ledger = PrivacyLedger(project / "ledger.sqlite")
    ledger.charge(first, cap=1.5 * spent)
    with pytest.raises(BudgetExceededError):  # the same patients: over the cap
        ledger.check(second, cap=1.5 * spent)
    ledger.charge(second, cap=100.0)
    accounts = [{p.fingerprint for s in c.sites for p in s.patients} for c in (first, second)]
    with sqlite3.connect(ledger.path) as db:
        stored = {k for k, in db.execute("SELECT patient_key FROM ledger_patients")}
    assert stored == accounts[0] | accounts[1]  # no account but the records' fingerprints
    if variant != "renamed sites":  # (a site's 80/20 split is drawn from its name)
        assert accounts[0] == accounts[1]
        assert all(g.spent.charges == 2 for b in ledger.balances() for g in b.groups)
    # 918 accounts for 920 patients: two pairs of patients with identical records share one
    assert len(set(ClinicalTable.get(other.data, project).record_keys().values())) == 918


@pytest.mark.slow
def test_one_file_per_site_is_the_pooled_files_accounts(project: Path) -> None:
    pooled = ClinicalTable.get(_config(project).data, project).record_keys()
    write_site_files(project)  # one file per hospital, no site column, site_source: file
    per_site = ClinicalTable.get(_config(project).data, project).record_keys()
    assert per_site == pooled


@pytest.mark.slow
def test_a_sites_own_file_gives_the_pooled_files_accounts(project: Path) -> None:
    cfg = _config(project)
    pooled = ClinicalTable.get(cfg.data, project).record_keys()
    frame = pd.read_csv(project / RAW, dtype=str, keep_default_na=False)
    own = project / "hungary.csv"
    frame[frame["dataset"] == "Hungary"].to_csv(own, index=False)
    keys = site_record_keys(cfg, own, "Hungary")
    assert keys and all(pooled[i] == k for i, k in keys.items())


def test_a_ledger_keyed_by_id_still_counts_for_the_same_patient_at_the_same_site(
        tmp_path: Path) -> None:
    """Charges recorded before accounts were fingerprints (site and id) keep counting."""
    step = ((2.0, 1.0, 10),)
    eps = epsilon_for_history(step, 1e-5, "rdp")
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.charge(Charge("old", "train", "heart.csv", (
        SiteCharge("A", eps, 1e-5, "rdp", step, frozenset({1, 2})),)), cap=100.0)
    records = frozenset({Records("f1", 1), Records("f3", 3)})
    with pytest.raises(BudgetExceededError):
        ledger.check(Charge("new", "train", "heart.csv", (
            SiteCharge("A", eps, 1e-5, "rdp", step, records),)), cap=1.5 * eps)
    fresh = frozenset({Records("f3", 3)})
    ledger.check(Charge("new", "train", "heart.csv", (
        SiteCharge("A", eps, 1e-5, "rdp", step, fresh),)), cap=1.5 * eps)


def test_accounts_are_looked_up_across_sites(tmp_path: Path) -> None:
    step = ((2.0, 1.0, 10),)
    eps = epsilon_for_history(step, 1e-5, "rdp")
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    patients = frozenset({Records("f1", 1), Records("f2", 2)})
    ledger.charge(Charge("a", "train", "heart.csv", (
        SiteCharge("Cleveland", eps, 1e-5, "rdp", step, patients),)), cap=100.0)
    renamed = frozenset({Records("f1", 100_001)})
    with pytest.raises(BudgetExceededError):
        ledger.check(Charge("b", "train", "heart.csv", (
            SiteCharge("cleveland", eps, 1e-5, "rdp", step, renamed),)), cap=1.5 * eps)
    ledger.charge(Charge("b", "train", "heart.csv", (
        SiteCharge("cleveland", eps, 1e-5, "rdp", step, renamed),)), cap=100.0)
    by_site = {b.site: b for b in ledger.balances()}
    assert by_site["cleveland"].patients == 1 and by_site["cleveland"].runs == 1
    assert by_site["cleveland"].tight_epsilon > eps  # its account's charge at "Cleveland" too
    assert by_site["Cleveland"].patients == 2



def test_the_same_records_under_two_sites_in_one_run_are_one_patient(tmp_path: Path) -> None:
    """A patient's rows copied under a new id and site in the same file: one account, both
    planned charges composed before anything is charged."""
    step = ((2.0, 1.0, 10),)
    eps = epsilon_for_history(step, 1e-5, "rdp")
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    run = Charge("twice", "train", "heart.csv", (
        SiteCharge("Cleveland", eps, 1e-5, "rdp", step, frozenset({Records("f1", 1)})),
        SiteCharge("Hungary", eps, 1e-5, "rdp", step, frozenset({Records("f1", 100_001)}))))
    with pytest.raises(BudgetExceededError):
        ledger.check(run, cap=1.5 * eps)
    needs = ledger.check(run, cap=100.0)
    assert all(n.total.charges == 2 for n in needs)
