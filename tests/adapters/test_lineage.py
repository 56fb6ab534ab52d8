"""Lineage by data hash: a stage refuses a validation or a partition made from other data
than it is given, and a failed validation blocks training (exit 3, nothing charged)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from adapters.artifacts import Paths
from adapters.config_files import load_config
from adapters.ledger_store import PrivacyLedger
from adapters.lineage import DATA_HASH_KEY, StaleArtifactError, combine, data_digest
from adapters.partition import load_client_data, partition_data
from adapters.stages import exit_code
from adapters.tables import ClinicalTable, file_fingerprint
from adapters.validate import validate_data

RAW = Path("data") / "raw" / "heart_disease_uci.csv"


@pytest.fixture(autouse=True)
def fresh_cache():
    ClinicalTable.clear_cache()
    yield
    ClinicalTable.clear_cache()


def _rewrite(project: Path, **to_csv: object) -> tuple[str, str]:
    """Rewrite the raw file (same patients); returns its hash before and after."""
    before = file_fingerprint(project / RAW)
    frame = pd.read_csv(project / RAW, dtype=str, keep_default_na=False)
    if to_csv.pop("lower_sites", False):
        frame["dataset"] = frame["dataset"].str.lower()
    frame.to_csv(project / RAW, index=False, **to_csv)
    ClinicalTable.clear_cache()
    return before, file_fingerprint(project / RAW)


def _charges(project: Path) -> int:
    path = project / ".fedpriv" / "privacy_ledger.sqlite"
    return PrivacyLedger(path).head().count if path.exists() else 0


def test_one_hash_for_one_file_per_site_is_order_free() -> None:
    assert combine("abc") == "abc" and combine(None) is None
    assert combine({"A": "1", "B": "2"}) == combine({"B": "2", "A": "1"}) != combine(
        {"A": "2", "B": "1"})
    assert combine({"A": "1", "B": None}) is None



def _partitioned(cfg, project: Path) -> Paths:
    """Validate and partition the project's data; the run's paths."""
    validate_data(cfg, project)
    partition_data(cfg, project)
    return Paths.of(cfg, project)

@pytest.mark.slow
def test_the_partition_records_the_hash_of_its_data(project: Path) -> None:
    cfg = load_config(project / "params.yaml")
    paths = _partitioned(cfg, project)
    recorded = json.loads(paths.partition.read_text())[DATA_HASH_KEY]
    assert recorded == file_fingerprint(project / RAW) == data_digest(cfg.data, project)
    assert json.loads(paths.validation.read_text())["sha256"] == recorded
    _, _, partition = load_client_data(cfg, paths)  # the same data: accepted
    assert partition.clients


@pytest.mark.slow
def test_training_on_a_stale_partition_after_a_failed_validation_is_refused(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The audit's case: site names lower-cased, validation and partition fail (exit 3),
    and ``fedpriv stage train`` must not train on the previous partition.json."""
    from flows.cli import main

    assert main(["stage", "validate", "--root", str(project)]) == 0
    assert main(["stage", "partition", "--root", str(project)]) == 0
    _rewrite(project, lower_sites=True)
    assert main(["stage", "validate", "--root", str(project)]) == 3
    assert main(["stage", "partition", "--root", str(project)]) == 3
    capsys.readouterr()
    assert main(["stage", "train", "--root", str(project), "--set", "rounds=1"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validation.json" in err[0] and "failed validation" in err[0]
    assert _charges(project) == 0  # no new accounts, no charge at all
    assert not (project / "models").exists() or not any((project / "models").iterdir())


@pytest.mark.slow
def test_a_stage_refuses_a_validation_or_partition_of_other_data(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    cfg = load_config(project / "params.yaml")
    paths = _partitioned(cfg, project)
    old, new = _rewrite(project, lineterminator="\r\n", encoding="utf-8-sig")  # same rows
    assert old != new
    # not validated again: the validation is stale
    with pytest.raises(StaleArtifactError) as stale:
        load_client_data(cfg, paths)
    line = str(stale.value)
    assert str(paths.validation) in line and old in line and new in line
    assert exit_code(stale.value)[0] == 3
    capsys.readouterr()
    assert main(["stage", "partition", "--root", str(project)]) == 3
    assert "validation.json was made from other data" in capsys.readouterr().err
    # validated again, not partitioned again: the partition is stale
    validate_data(cfg, project)
    with pytest.raises(StaleArtifactError) as stale:
        load_client_data(cfg, paths)
    line = str(stale.value)
    assert str(paths.partition) in line and old in line and new in line
    assert "\n" not in line
    partition_data(cfg, project)
    _, _, partition = load_client_data(cfg, paths)  # made from this data: accepted
    assert partition.clients
    assert _charges(project) == 0


@pytest.mark.slow
def test_a_partition_without_a_data_hash_is_refused(project: Path) -> None:
    """A partition.json written before lineage was recorded is of unknown data."""
    cfg = load_config(project / "params.yaml")
    paths = _partitioned(cfg, project)
    record = json.loads(paths.partition.read_text())
    del record[DATA_HASH_KEY]
    paths.partition.write_text(json.dumps(record))
    with pytest.raises(StaleArtifactError, match="recorded none"):
        load_client_data(cfg, paths)
