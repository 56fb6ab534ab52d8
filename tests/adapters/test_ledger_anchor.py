"""A ledger cannot be reset silently: its head recorded in MLflow (coordinator) or beside it
(a site), and a deleted, replaced, truncated or altered ledger refused before anything
trains; `fedpriv budget new-ledger` the one deliberate way to start anew."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from adapters.config_files import build_config, load_config
from adapters.ledger_anchor import (
    COUNT_TAG,
    EVENT_TAG,
    HEAD_TAG,
    REASON_TAG,
    anchor_path,
    check_anchor,
    head_tags,
    recorded_head,
    start_new_ledger,
    write_anchor,
)
from adapters.ledger_store import GENESIS, LedgerIntegrityError, PrivacyLedger
from adapters.preflight import PreflightError, preflight
from adapters.stages import exit_code
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.privacy.ledger import Charge, SiteCharge


def _charge(ledger: PrivacyLedger, run: str, patients: range = range(5)) -> None:
    ledger.charge(Charge(run, "train", "heart.csv", (SiteCharge(
        "A", 0.5, 1e-5, "rdp", ((2.0, 1.0, 3),), frozenset(patients)),)), cap=1e6)


def _cfg(project: Path, *overrides: str) -> PipelineConfig:
    return load_config(project / "params.yaml", list(overrides))


def _uri(project: Path) -> str:
    return f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}"


def _ledger(project: Path, name: str = "privacy_ledger.sqlite") -> PrivacyLedger:
    return PrivacyLedger(project / ".fedpriv" / name)


def _register(project: Path, ledger: PrivacyLedger) -> str:
    """What a registration records: a run of the experiment tagged with the ledger's head."""
    from adapters.mlflow_registration import open_store

    client = open_store(_uri(project))
    name = _cfg(project).mlflow.experiment
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, tags=head_tags(ledger))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _refusal(project: Path, *overrides: str) -> tuple[int, str]:
    with pytest.raises((PreflightError, LedgerIntegrityError)) as err:
        preflight(_cfg(project, *overrides), project)
    return exit_code(err.value)


@pytest.fixture
def charged(project: Path) -> tuple[PrivacyLedger, str]:
    """A project whose ledger has three charges, the last head recorded by a registration."""
    ledger = _ledger(project)
    for run in ("r1", "r2", "r3"):
        _charge(ledger, run)
    return ledger, _register(project, ledger)


@pytest.mark.slow
def test_a_ledger_that_only_grew_passes(project: Path, charged: tuple[PrivacyLedger, str]
                                        ) -> None:
    ledger, run = charged
    recorded = recorded_head(_uri(project), _cfg(project).mlflow.experiment)
    assert recorded is not None and recorded.head == ledger.head() and run in recorded.recorded_by
    preflight(_cfg(project), project)
    _charge(ledger, "r4")  # charged since (a DVC train that registered nothing): still holds it
    preflight(_cfg(project), project)


@pytest.mark.slow
def test_a_deleted_ledger_is_exit_6_naming_the_head(project: Path,
                                                    charged: tuple[PrivacyLedger, str]) -> None:
    ledger, run = charged
    head = ledger.head()
    ledger.path.unlink()
    code, line = _refusal(project)
    assert code == 6
    for part in (str(ledger.path), "is missing", head.hash, "after 3 charge(s)", run,
                 "fedpriv budget new-ledger"):
        assert part in line
    assert not ledger.path.exists()  # the check created nothing


@pytest.mark.slow
def test_a_replaced_truncated_or_altered_ledger_is_exit_5(
        project: Path, charged: tuple[PrivacyLedger, str]) -> None:
    ledger, run = charged
    head = ledger.head()
    kept = ledger.path.read_bytes()
    ledger.path.unlink()
    _charge(PrivacyLedger(ledger.path), "fresh")  # a new file in its place
    code, line = _refusal(project)
    assert code == 5
    for part in ("does not contain the head", head.hash, run, "replaced or truncated",
                 "holds 1 charge(s)"):
        assert part in line
    ledger.path.write_bytes(kept)
    with sqlite3.connect(ledger.path) as db:  # the last charge cut off
        for sql in ("DELETE FROM ledger_patients WHERE site_charge_id = 3",
                    "DELETE FROM ledger_site_charges WHERE id = 3",
                    "DELETE FROM ledger_charges WHERE id = 3"):
            db.execute(sql)
    code, line = _refusal(project)
    assert code == 5 and "holds 2 charge(s)" in line
    ledger.path.write_bytes(kept)
    with sqlite3.connect(ledger.path) as db:
        db.execute("UPDATE ledger_site_charges SET epsilon = 0.0 WHERE id = 2")
    code, line = _refusal(project)
    assert code == 5 and "charge 2 (run r2) was altered" in line


@pytest.mark.slow
def test_pointing_privacy_ledger_elsewhere_is_refused(
        project: Path, charged: tuple[PrivacyLedger, str]) -> None:
    elsewhere = project / "fresh.sqlite"
    code, line = _refusal(project, f"privacy.ledger={elsewhere}")
    assert code == 6 and line.startswith("fedpriv: preflight failed: privacy.ledger: ")
    PrivacyLedger(elsewhere)  # created empty: a ledger that never saw the recorded head
    code, line = _refusal(project, f"privacy.ledger={elsewhere}")
    assert code == 5 and "does not contain the head" in line


@pytest.mark.slow
def test_new_ledger_is_recorded_then_allowed(project: Path,
                                             charged: tuple[PrivacyLedger, str]) -> None:
    from adapters.mlflow_registration import open_store

    ledger, _ = charged
    ledger.path.unlink()
    with pytest.raises(ConfigError, match="--reason"):
        start_new_ledger(_cfg(project), project, "  ")
    head, run = start_new_ledger(_cfg(project), project, "new deployment at site X")
    assert head == (GENESIS, 0) and ledger.path.exists()
    tags = open_store(_uri(project)).get_run(run).data.tags
    assert tags[EVENT_TAG] == "new-ledger" and tags[REASON_TAG] == "new deployment at site X"
    assert tags[HEAD_TAG] == GENESIS and tags[COUNT_TAG] == "0"
    assert "privacy.ledger_started_at" in tags and tags["privacy.ledger_path"] == str(ledger.path)
    preflight(_cfg(project), project)  # compared with the new ledger's head from now on
    _charge(ledger, "after")
    _register(project, ledger)
    preflight(_cfg(project), project)
    # an override to another file needs its own new-ledger event, and only then passes
    elsewhere = f"privacy.ledger={project / 'other.sqlite'}"
    assert _refusal(project, elsewhere)[0] == 6
    start_new_ledger(_cfg(project, elsewhere), project, "a second ledger on purpose")
    preflight(_cfg(project, elsewhere), project)


@pytest.mark.slow
def test_new_ledger_does_not_adopt_a_tampered_ledger(project: Path,
                                                     charged: tuple[PrivacyLedger, str]) -> None:
    ledger, _ = charged
    with sqlite3.connect(ledger.path) as db:
        db.execute("UPDATE ledger_charges SET run_id = 'renamed' WHERE id = 1")
    with pytest.raises(LedgerIntegrityError, match="charge 1 .* was altered"):
        start_new_ledger(_cfg(project), project, "hide the edit")


def test_nothing_recorded_nothing_compared(project: Path) -> None:
    preflight(_cfg(project), project, tracking=False)
    _charge(_ledger(project), "r1")
    preflight(_cfg(project), project)  # no MLflow store yet: a new deployment
    assert not (project / ".fedpriv" / "mlflow.db").exists()


# --- a site: its anchor file --------------------------------------------------------------------


@pytest.mark.slow
def test_a_site_anchor_catches_a_deleted_replaced_or_truncated_ledger(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    check_anchor(ledger.path)  # no anchor yet: the chain must verify, nothing else
    for run in ("a", "b"):
        _charge(ledger, run)
        head = write_anchor(ledger)
    recorded = json.loads(anchor_path(ledger).read_text())
    assert (recorded["hash"], recorded["count"]) == head == ledger.head()
    check_anchor(ledger.path)
    kept = ledger.path.read_bytes()
    ledger.path.unlink()
    with pytest.raises(LedgerIntegrityError, match="is missing, but its anchor") as err:
        check_anchor(ledger.path)
    assert head.hash in str(err.value) and exit_code(err.value)[0] == 5
    _charge(PrivacyLedger(ledger.path), "fresh")
    with pytest.raises(LedgerIntegrityError, match="does not contain the head"):
        check_anchor(ledger.path)
    ledger.path.write_bytes(kept)
    with sqlite3.connect(ledger.path) as db:
        db.execute("UPDATE ledger_charges SET kind = 'audit' WHERE id = 2")
    with pytest.raises(LedgerIntegrityError, match="charge 2 .* was altered"):
        check_anchor(ledger.path)


def test_a_site_reports_its_head_and_the_coordinator_records_it() -> None:
    from adapters.publish import ledger_head_tags
    from adapters.site_reports import _summary
    from fl_core.federation.messages import SiteReady, decode_message, encode_message
    from fl_core.results import PrivacyReport

    head = "ab" * 32
    sent = SiteReady("Cleveland", -1, True, 17, 100, 25, json.dumps({"passed": True}), "run",
                     1.5, head)
    received = decode_message(encode_message(sent), expect=SiteReady)
    assert received.ledger_head == head
    assert _summary(received)["ledger_head"] == head  # in the run's validation.json
    privacy = PrivacyReport(enabled=True, randomness="secure", epsilon=1.0,
                            site_ledger_runs={"Cleveland": "run", "Hungary": "run2"},
                            site_ledger_heads={"Cleveland": head, "Hungary": "not a hash"})
    assert ledger_head_tags(build_config({}), Path("."), privacy) == {
        "site.Cleveland.ledger_head": head}


def test_a_site_starts_a_new_ledger_only_by_its_command(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    for name in ("site.csv", "site.key", "site.crt", "ca.crt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "site.yaml").write_text(
        "site: Hungary\ndata: site.csv\nstate: state\n"
        "tls: {key: site.key, cert: site.crt, ca: ca.crt}\n")
    ledger = PrivacyLedger(tmp_path / "state" / "privacy_ledger.sqlite")
    _charge(ledger, "a")
    before = write_anchor(ledger)
    ledger.path.unlink()
    with pytest.raises(LedgerIntegrityError, match="fedpriv site new-ledger"):
        check_anchor(ledger.path)
    config = ["site", "new-ledger", "--config", str(tmp_path / "site.yaml")]
    assert main(config) == 2  # no reason given
    assert "--reason" in capsys.readouterr().err
    assert main([*config, "--reason", "new server, old ledger lost"]) == 0
    assert "head " + GENESIS in capsys.readouterr().out
    check_anchor(ledger.path)  # the new ledger is the recorded one now
    event = json.loads(anchor_path(ledger).read_text())["new_ledger"]
    assert event["reason"] == "new server, old ledger lost"
    assert event["replaced"]["hash"] == before.hash and event["replaced"]["count"] == 1
    _charge(ledger, "b")
    write_anchor(ledger)  # later charges keep the event on record
    assert json.loads(anchor_path(ledger).read_text())["new_ledger"] == event
    with sqlite3.connect(ledger.path) as db:  # an edited ledger is not adopted
        db.execute("UPDATE ledger_charges SET dataset = 'x' WHERE id = 1")
    assert main([*config, "--reason", "hide it"]) == 5
    assert "was altered" in capsys.readouterr().err
