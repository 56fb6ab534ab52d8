"""Two runs with different settings at once in one checkout: each registered version's params,
metrics, audit and weights come from its own run, and the published view is one run's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

ONE_RUN = """
import hashlib, json, sys, torch
from pathlib import Path
from adapters.artifacts import Paths, new_run_id, publish_run
from adapters.audit import audit_model
from adapters.partition import partition_data
from adapters.publish import publish_results
from adapters.train import train_model
from adapters.validate import validate_data
from adapters.config_files import load_config
root, rounds = Path(sys.argv[1]), int(sys.argv[2])
cfg = load_config(root / "params.yaml", [f"rounds={rounds}", "audit.shadow_models=2",
                                         "gate.min_accuracy=0"])
run_id = new_run_id()
for stage in (validate_data, partition_data, train_model, audit_model):
    stage(cfg, root, run_id=run_id)
out = publish_results(cfg, root, run_id=run_id)
params = torch.load(Paths.of(cfg, root, run_id).model, weights_only=True)["params"]
digest = hashlib.sha256(params.to(torch.float32).numpy().tobytes()).hexdigest()
publish_run(cfg, root, run_id)
print("RESULT " + json.dumps({"version": out.registration.model_version,
                              "rounds": rounds, "digest": digest}))
"""


def _weights_digest(model: torch.nn.Module) -> str:
    from fl_core.model.networks import get_flat_params

    flat = get_flat_params(model).detach().to(torch.float32)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def test_two_concurrent_runs_never_mix_their_outputs(project: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", ONE_RUN, str(project), str(rounds)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rounds in (2, 3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    results = [json.loads(next(line for line in out.splitlines()
                               if line.startswith("RESULT "))[7:]) for out, _ in outs]
    assert len({r["version"] for r in results}) == 2

    uri = f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through the global registry
    mlflow.set_registry_uri(uri)
    try:
        _check_versions(client, results)
    finally:  # leave no global store behind for later tests
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    _check_published(project, results)


def _check_versions(client: object, results: list[dict]) -> None:
    import mlflow.pyfunc

    for result in results:
        mv = client.get_model_version("fedpriv-heart", result["version"])
        run = client.get_run(mv.run_id)
        assert run.data.params["rounds"] == str(result["rounds"])
        assert run.data.metrics["rounds"] == result["rounds"]
        audit = json.loads(Path(client.download_artifacts(mv.run_id, "reports/audit.json"))
                           .read_text())
        assert audit["shadow_models"] == 2
        trained = json.loads(Path(client.download_artifacts(mv.run_id, "reports/train.json"))
                             .read_text())
        assert trained["rounds"] == result["rounds"] and len(trained["history"]) == \
            result["rounds"]
        served = mlflow.pyfunc.load_model(f"models:/fedpriv-heart/{result['version']}")
        model = served.unwrap_python_model().model  # the pyfunc's torch network
        assert _weights_digest(model) == result["digest"]  # the weights of its own run


def _check_published(project: Path, results: list[dict]) -> None:
    """The published view is one whole run, not a mix of the two."""
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    train = json.loads((project / "reports" / "train.json").read_text())
    assert metrics["rounds"] == train["rounds"] == len(train["history"])
    published = torch.load(project / "data" / "models" / "model.pt", weights_only=True)
    digest = hashlib.sha256(published["params"].to(torch.float32).numpy().tobytes()).hexdigest()
    assert digest == next(r["digest"] for r in results if r["rounds"] == metrics["rounds"])
    assert list((project / ".fedpriv" / "runs").iterdir()) == []


def test_two_first_runs_in_a_fresh_clone_share_prefects_database_cleanly(
        project: Path) -> None:
    """Two first `fedpriv run` at once, with no Prefect database yet: each starts its own
    temporary server on the same SQLite file. Both complete with no error in their logs (the
    servers used to race on the migrations: `duplicate column name`, a server that failed to
    start), and both flow runs are COMPLETED."""
    from tests.killing import rows

    home = project / ".fedpriv" / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home)})
    command = [sys.executable, "-m", "flows.cli", "run", "--root", str(project),
               "--set", "rounds=2", "--set", "audit.shadow_models=2",
               "--set", "gate.min_accuracy=0"]
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [out[-1500:] for out in outs]
    for out in outs:
        assert "Traceback" not in out and "| ERROR" not in out, out[-3000:]
    completed = "SELECT COUNT(*) FROM flow_run WHERE state_type = 'COMPLETED'"
    assert rows(home / "prefect.db", completed) == 2
