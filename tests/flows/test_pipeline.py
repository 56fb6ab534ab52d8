"""End to end: the Prefect flow, the stages, the CLI, failures that must leave nothing behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from adapters.config_files import load_config
from fl_core.data.validation import DataValidationError

pytestmark = pytest.mark.integration

REQUIRED = ("accuracy", "auc", "epsilon", "delta", "mia_auc", "mia_attack_accuracy",
            "mia_tpr_at_1pct_fpr", "mia_tpr_at_0_1pct_fpr", "empirical_epsilon_lower_bound",
            "bytes_uploaded", "bytes_uploaded_uncompressed", "compression_ratio", "rounds",
            "wall_seconds")


def registered_versions(root: Path, name: str = "fedpriv-heart") -> list:
    from mlflow import MlflowClient

    db = root / ".fedpriv" / "mlflow.db"
    assert db.exists(), f"no MLflow store at {db}"
    return MlflowClient(tracking_uri=f"sqlite:///{db}").search_model_versions(f"name='{name}'")


@pytest.mark.slow
def test_flow_end_to_end_two_rounds(project: Path, prefect_harness) -> None:
    from flows.pipeline import fl_pipeline

    outcome = fl_pipeline(overrides=["rounds=2", "audit_dp.in_pipeline=true",
                                     "audit_dp.runs=2"], root=str(project))
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert set(REQUIRED) <= set(metrics)
    # the DP implementation audit ran in the flow; its verdict reached the gate and MLflow
    dp_audit = json.loads((project / "reports" / "audit_dp.json").read_text())
    assert dp_audit["level"] == "patient" and dp_audit["rounds"] == 2
    assert metrics["dp_audit_epsilon"] == dp_audit["epsilon"]
    assert metrics["dp_audit_epsilon_lower_bound"] == dp_audit["epsilon_lower_bound"]
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking_uri=f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}") \
        .get_run(outcome.registration.run_id).data.metrics
    assert logged["dp_audit_epsilon_lower_bound"] == pytest.approx(
        dp_audit["epsilon_lower_bound"])
    assert metrics["rounds"] == 2
    assert 0.95 <= metrics["epsilon"] <= 1.0 and metrics["delta"] == 1e-5  # DP-SGD by default
    audit = json.loads((project / "reports" / "audit.json").read_text())
    attacks = audit["attacks"]
    # the headline figures are the worst case over the attacks' own rows
    assert metrics["empirical_epsilon_lower_bound"] == max(
        a["epsilon_lower_bound"] for a in attacks)
    assert metrics["mia_advantage"] == max(a["advantage"] for a in attacks)
    assert metrics["empirical_epsilon_lower_bound"] <= metrics["epsilon"]
    for a in attacks:
        # balanced accuracy at the best threshold is (1 + advantage) / 2, and a ROC curve with
        # max(TPR − FPR) = A has AUC at most 1/2 + A − A²/2
        assert a["accuracy"] == pytest.approx((1 + a["advantage"]) / 2), a["attack"]
        assert a["auc"] <= 0.5 + a["advantage"] - a["advantage"] ** 2 / 2 + 1e-9, a["attack"]
    assert {a["attack"] for a in audit["attacks"]} == {
        "loss_threshold", "shokri_shadow", "lira_offline"}
    assert audit["shadow_models"] == 8 and audit["members"] == audit["non_members"] == 148
    assert audit["population"] == 148 + 180  # test patients + the incomplete ones
    assert audit["privacy_consistent"] is True
    assert metrics["mia_auc"] == max(a["auc"] for a in audit["attacks"])
    # the audit's time is the audit report's, part of the run's (speed: benchmarks/)
    assert metrics["audit_seconds"] == audit["seconds"]
    assert 0 < metrics["audit_seconds"] < metrics["wall_seconds"]
    assert metrics["accuracy"] > 0.5
    assert metrics["bytes_uploaded"] > 0
    # a logistic regression (18 parameters) is under compression.min_parameters: sent dense
    assert metrics["bytes_uploaded"] == metrics["bytes_uploaded_uncompressed"]
    assert metrics["compression_ratio"] == 1
    assert metrics["bytes_downloaded"] == metrics["bytes_downloaded_uncompressed"]
    rows = list(csv.DictReader((project / "reports" / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2"]
    # the reported accuracy is the last round's (rounds.csv keeps 6 decimals)
    assert metrics["accuracy"] == pytest.approx(float(rows[-1]["accuracy"]), abs=1e-6)
    assert {"train_loss", "accuracy", "auc", "bytes_uploaded", "bytes_downloaded",
            "compression_ratio", "flagged_clients", "accuracy_Cleveland"} <= set(rows[0])
    for png in ("training_curves.png", "mia_roc.png"):
        assert (project / "reports" / png).read_bytes()[:4] == b"\x89PNG"
    # published from the run's workspace, which is gone once published
    assert list((project / ".fedpriv" / "runs").iterdir()) == []
    assert (project / "data" / "models" / "model.pt").exists()
    assert (project / "data" / "processed" / "partition.json").exists()
    registration = outcome.registration
    versions = registered_versions(project)
    assert [str(v.version) for v in versions] == [registration.model_version]
    assert "challenger" in registration.aliases


def _break_age(project: Path) -> None:
    csv_path = project / "data" / "raw" / "heart_disease_uci.csv"
    lines = csv_path.read_text().splitlines()
    fields = lines[400].split(",")
    fields[1] = "150"  # an impossible age in a Hungary row
    lines[400] = ",".join(fields)
    csv_path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_validation_failure_stops_before_training(project: Path, prefect_harness) -> None:
    from flows.pipeline import fl_pipeline

    _break_age(project)
    with pytest.raises(DataValidationError) as err:
        fl_pipeline(overrides=["rounds=2"], root=str(project))
    assert "age" in str(err.value) and "Hungary" in str(err.value)
    # the failed run's report stays in its own workspace; nothing was published
    (workspace,) = (project / ".fedpriv" / "runs").iterdir()
    assert json.loads((workspace / "reports" / "validation.json").read_text())["success"] is False
    # marked as ended, so a later run keeps it (for its reports) instead of reaping it
    record = project / ".fedpriv" / "owners" / f"{workspace.name}.json"
    assert json.loads(record.read_text())["ended"] == "failed"
    for later in ("train.json", "rounds.csv", "metrics.json", "audit.json"):
        assert not (workspace / "reports" / later).exists()
    assert not (project / "reports").exists()
    assert not (project / "data" / "models" / "model.pt").exists()
    assert not (project / ".fedpriv" / "mlflow.db").exists()  # registration never started


def _run_stages(root: Path) -> dict:
    from adapters.audit import audit_model
    from adapters.partition import partition_data
    from adapters.publish import publish_results
    from adapters.train import train_model
    from adapters.validate import validate_data

    # "same seed, same metrics" holds only where the noise is reproducible
    cfg = load_config(root / "params.yaml", ["rounds=3", "privacy.randomness=reproducible"])
    for stage in (validate_data, partition_data, train_model, audit_model, publish_results):
        stage(cfg, root)
    return json.loads((root / "reports" / "metrics.json").read_text())


@pytest.mark.slow
def test_same_seed_same_metrics_and_reproducible_noise_is_never_champion(
    tmp_path: Path, project: Path
) -> None:
    import shutil

    from mlflow import MlflowClient

    twin = tmp_path / "twin"
    shutil.copytree(project, twin)
    a, b = _run_stages(project), _run_stages(twin)
    timing = {"wall_seconds", "audit_seconds"}
    assert {k: v for k, v in a.items() if k not in timing} == \
           {k: v for k, v in b.items() if k not in timing}
    assert a["randomness"] == "reproducible"
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert registration["gate_passed"] is False
    assert registration["aliases"] == ["challenger"]
    assert any(r.startswith("privacy.randomness=reproducible: the DP noise")
               for r in registration["gate_reasons"])
    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}")
    version = client.get_model_version("fedpriv-heart", registration["model_version"])
    assert version.tags["privacy.randomness"] == "reproducible"
    assert "add/remove one patient" in version.tags["privacy.guarantee"]
    run = client.get_run(registration["run_id"])
    assert run.data.tags["privacy.randomness"] == "reproducible"
    assert float(run.data.tags["privacy.epsilon_replace_one"]) > a["epsilon"]


def test_cli_bad_config_exits_2_naming_key(project: Path, capsys) -> None:
    from flows.cli import main

    assert main(["run", "--root", str(project), "--set", "model=cnn"]) == 2
    err = capsys.readouterr().err
    assert "model" in err and "'logreg'" in err and "'mlp'" in err
    assert main(["run", "--root", str(project), "--set", "data.nope=1"]) == 2
    assert "data.nope: unknown key" in capsys.readouterr().err
    assert not (project / "reports").exists()


def test_cli_stage_order_is_enforced(project: Path, capsys) -> None:
    from flows.cli import main

    assert main(["stage", "train", "--root", str(project)]) == 1
    assert "run the 'partition' stage first" in capsys.readouterr().err


def test_cli_config_prints_resolved_values(project: Path, capsys) -> None:
    from flows.cli import main

    assert main(["config", "--root", str(project), "--set", "rounds=7"]) == 0
    assert "rounds: 7" in capsys.readouterr().out


def test_cli_help_explains(capsys) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as code:
        main(["--help"])
    assert code.value.code == 0
    out = capsys.readouterr().out
    assert "--set KEY=VALUE overrides any key" in out
    assert "params.yaml" in out and "exit codes" in out


def test_prefect_summary_shows_every_attack_and_a_privacy_failure() -> None:
    from fl_core.results import AuditReport
    from flows.pipeline import audit_markdown

    attack = {"attack": "lira_offline", "auc": 0.71, "tpr_at_1pct_fpr": 0.1,
              "tpr_at_0_1pct_fpr": 0.05, "advantage": 0.3, "epsilon_lower_bound": 1.4}
    report = AuditReport(enabled=True, attacks=[attack], members=148, non_members=148,
                         shadow_models=8, seconds=5.0, privacy_consistent=False)
    text = audit_markdown(report)
    assert "| lira_offline | 0.710 |" in text and "PRIVACY FAILURE" in text
    assert "gate refuses" in audit_markdown(AuditReport(enabled=False, seconds=0.0))


def test_prefect_summary_shows_the_dp_audit_table() -> None:
    from adapters.dp_audit import dp_audit_markdown
    from fl_core.audit.dp_audit import DPAuditResult

    bound = {"scores": "raw", "method": "gaussian", "mu_hat": 2.6, "mu_lower": 2.4,
             "epsilon_lower_bound": 12.5}
    # as reports/audit_dp.json (and a kept verdict) holds it, read back typed
    report = {"level": "patient", "epsilon": 16.0, "delta": 1e-5, "epsilon_lower_bound": 12.5,
              "confidence": 0.99, "power": 0.78, "canaries": 1152, "canaries_included": 580,
              "runs": 16, "rounds": 2, "training_runs": 32, "seconds": 20.0,
              "noise_multiplier": 1.1, "steps": 4, "privacy_failure": False,
              "bounds": [bound], "drill": None}
    typed = DPAuditResult.from_json(report)
    assert typed.power == pytest.approx(0.78, abs=0.005) and not typed.privacy_failure
    assert typed.to_json() == {**report, "power": typed.power, "verdict": "consistent",
                               "fingerprint": ""}
    text = dp_audit_markdown(typed)
    assert "| raw | gaussian | 2.600 | 2.400 | 12.500 |" in text
    assert "ε 16.000 (accountant" in text and "consistent with the accountant" in text
    failed = dp_audit_markdown(DPAuditResult.from_json(
        {**report, "epsilon_lower_bound": 17.0, "drill": "noise_off"}))
    assert "PRIVACY FAILURE" in failed and "(drill: noise_off)" in failed
