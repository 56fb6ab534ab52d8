"""Shared fixtures. Every test that touches Prefect or MLflow gets its own temp state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAW_CSV = ROOT / "data" / "raw" / "heart_disease_uci.csv"

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def per_example_loss(model: Any, x: Any, y: Any) -> Any:
    """Each example's binary cross-entropy under ``model`` (eval mode, no gradient): the
    score of the loss-threshold attack, negated."""
    import torch

    model.eval()
    with torch.no_grad():
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x), y,
                                                                    reduction="none")


def data_config(**fields: Any) -> Any:
    """A ``DataConfig`` of ``fields`` (a test's own data section), its dataset schema
    (``schema``, default ``data/schemas/heart.yaml``) read from the working directory or the
    checkout unless a loaded ``spec`` is given."""
    from adapters.schema_files import load_schema
    from fl_core.config.model import DataConfig
    from fl_core.data.schema import DEFAULT_SCHEMA

    if fields.get("spec") is None:
        fields["spec"] = load_schema(fields.get("schema", DEFAULT_SCHEMA))
    return DataConfig(**fields)


def copy_project(target: Path) -> Path:
    """A throwaway project root at ``target``: params.yaml, the dataset schemas and the raw
    CSV, nothing derived."""
    (target / "data" / "raw").mkdir(parents=True)
    shutil.copy(RAW_CSV, target / "data" / "raw" / RAW_CSV.name)
    shutil.copytree(ROOT / "data" / "schemas", target / "data" / "schemas")
    shutil.copy(ROOT / "params.yaml", target / "params.yaml")
    return target


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """:func:`copy_project` in the test's own temp folder."""
    return copy_project(tmp_path)


@pytest.fixture(scope="session")
def raw_csv() -> Path:
    return RAW_CSV


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect API (SQLite in a temp PREFECT_HOME) for the whole session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


# The integration pass runs on two xdist workers (`make test`); these modules hold tests whose
# servers, workers and kills are timed against each other (a namespace federation's start-up,
# a kill when a file appears, two runs racing): they run one after another on one worker
# (--dist loadgroup), beside the self-contained ones on the other.
SERIAL_INTEGRATION = frozenset({
    "tests/flows/test_site_dispatch.py", "tests/test_netns.py", "tests/flows/test_kill.py",
    "tests/flows/test_concurrency.py", "tests/flows/test_site_guard.py",
    "tests/adapters/test_prefect_api.py", "tests/flows/test_orchestration.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parents[1]
    for item in items:
        module = Path(str(item.fspath)).resolve().relative_to(root).as_posix()
        if module in SERIAL_INTEGRATION:
            item.add_marker(pytest.mark.xdist_group(name="serial"))
