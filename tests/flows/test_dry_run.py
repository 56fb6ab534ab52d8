"""``fedpriv run --dry-run``: the configuration tried on synthetic rows charges nothing,
registers nothing, publishes nothing and reads no patient file; a broken configuration or
schema fails with its usual exit code, still without a charge."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from flows.cli import main

pytestmark = pytest.mark.slow


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nothing_written(project: Path) -> None:
    assert not (project / "reports").exists()
    assert not (project / "data" / "processed").exists()
    assert not (project / "data" / "models").exists()
    assert not (project / ".fedpriv" / "mlflow.db").exists()  # no model version, no run
    assert not (project / ".fedpriv" / "runs").exists()


def test_a_dry_run_charges_nothing_and_reads_no_patient(project: Path, capsys) -> None:
    from adapters.ledger_store import PrivacyLedger

    (project / "data" / "raw" / "heart_disease_uci.csv").unlink()  # no patient file at all
    ledger = project / "elsewhere" / "ledger.sqlite"
    PrivacyLedger(ledger).head()  # an existing ledger: it must stay byte for byte
    before = _digest(ledger)
    code = main(["run", "--dry-run", "--root", str(project), "--set", "rounds=3",
                 "--set", f"privacy.ledger={ledger}", "--synthetic-patients", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert _digest(ledger) == before
    assert not (project / ".fedpriv" / "privacy_ledger.sqlite").exists()
    _nothing_written(project)
    assert "validation passed: 240 rows" in out
    assert "data report (heart; per site, before training)" in out
    assert "round   2/2" in out  # a few rounds, not the configured three
    assert "(dry run: not charged)" in out
    assert out.rstrip().endswith(
        "dry run: schema and config OK on 240 synthetic rows (240 patients) at 4 sites; "
        "nothing was charged, nothing registered")


@pytest.mark.parametrize(("override", "words"), [
    # one site too few for the federation: found by the partition, as in a real run
    ("min_clients=5", "min_clients"),
    # a label rule no declared value meets: one class (a schema the data contradict)
    ("schema.label.positive_if='> 10'", "label"),
    # every patient in every step at a δ the synthetic sites' size cannot meet
    ("privacy.delta=0.5", "privacy.delta"),
    # the gate refuses every model of this configuration, whatever the data
    ("privacy.randomness=reproducible", "the gate would refuse every model"),
])
def test_a_broken_configuration_fails_with_its_exit_code_and_no_charge(
        project: Path, capsys, override: str, words: str) -> None:
    code = main(["run", "--dry-run", "--root", str(project), "--set", override,
                 "--synthetic-patients", "40"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedpriv: configuration error:") and words in err
    assert not (project / ".fedpriv" / "privacy_ledger.sqlite").exists()
    _nothing_written(project)


def test_dry_run_is_explained_in_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--dry-run" in out and "Nothing is charged" in out and "Simulation only" in out
