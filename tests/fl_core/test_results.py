"""Typed stage results and the one table of run metrics."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fl_core.federation.coordinator import RoundRecord, TrainingResult
from fl_core.results import (
    RUN_METRICS,
    AuditReport,
    PrivacyReport,
    Registration,
    TrainingReport,
    TrainingSummary,
    run_metrics,
)

# reports/metrics.json must keep at least these (shared/ARCHITECTURE.md)
ARCHITECTURE_METRICS = {
    "accuracy", "auc", "epsilon", "delta", "mia_auc", "mia_attack_accuracy",
    "mia_tpr_at_1pct_fpr", "mia_tpr_at_0_1pct_fpr", "empirical_epsilon_lower_bound",
    "bytes_uploaded", "bytes_uploaded_uncompressed", "compression_ratio", "rounds",
    "wall_seconds"}


def _summary() -> TrainingSummary:
    records = [RoundRecord(round=r, train_loss=0.5 / r, test_loss=0.6 / r, accuracy=0.7,
                           auc=0.8, balanced_accuracy=0.6 + 0.05 * r, bytes_uploaded=100,
                           bytes_downloaded=400,
                           bytes_uploaded_uncompressed=400, bytes_downloaded_uncompressed=400,
                           clients_ok=2, flagged_clients=["b"] if r == 2 else [],
                           client_accuracy={"a": 0.6, "b": 0.8}, epsilon=0.1 * r)
               for r in (1, 2, 3)]
    result = TrainingResult(torch.zeros(3), records, [])
    privacy = PrivacyReport(enabled=True, epsilon=0.3, delta=1e-5, randomness="secure",
                            epsilon_replace_one=0.7)
    return TrainingSummary.of_run(result, clients=2, partition="by_site", compression="dense",
                                  aggregation="fedavg", malicious=[], privacy=privacy,
                                  seconds=1.23456)


def _train_json(summary: TrainingSummary) -> dict:
    """``train.json`` as the train stage writes it (adapters.train), through JSON."""
    from adapters.train import round_row

    raw = {**summary.figures(), "history": [round_row(r) for r in summary.history]}
    return json.loads(json.dumps(raw))


def test_training_summary_round_trips_through_json_with_its_history() -> None:
    summary = _summary()
    assert all(isinstance(r, RoundRecord) for r in summary.history)  # typed until written
    again = TrainingReport.from_dict(_train_json(summary))
    assert again.figures() == summary.figures()
    assert [row["round"] for row in again.round_rows] == [1, 2, 3]
    assert again.bytes_uploaded == 300 and again.compression_ratio == 4.0
    assert again.flagged_clients == ["b"] and again.flagged_client_rounds == 1
    assert again.round_rows[2]["epsilon"] == pytest.approx(0.3)
    assert again.round_rows[1]["flagged_clients"] == "b"
    assert isinstance(again.privacy, PrivacyReport) and again.privacy.epsilon_replace_one == 0.7
    assert run_metrics(again, AuditReport(enabled=False, seconds=0.0), 1.0) == run_metrics(
        summary, AuditReport(enabled=False, seconds=0.0), 1.0)


def test_train_json_keeps_its_keys_history_last() -> None:
    raw = _train_json(_summary())
    assert list(raw)[-1] == "history" and list(raw)[:3] == ["accuracy", "auc",
                                                            "balanced_accuracy"]
    assert set(raw["privacy"]) == {f for f in PrivacyReport.__dataclass_fields__}


def test_failed_rounds_come_from_the_typed_records() -> None:
    records = [RoundRecord(round=r, train_loss=0.5, test_loss=0.6, accuracy=0.7, auc=0.8,
                           balanced_accuracy=0.6, bytes_uploaded=1, bytes_downloaded=1,
                           bytes_uploaded_uncompressed=1, bytes_downloaded_uncompressed=1,
                           clients_ok=1, failed_clients=failed)
               for r, failed in ((1, ["b"]), (2, []), (3, ["c", "b"]))]
    summary = dataclasses.replace(_summary(), history=tuple(records))
    assert summary.failed_rounds() == {"b": [1, 3], "c": [3]}


def test_an_old_train_json_is_refused_saying_what_to_do() -> None:
    raw = _train_json(_summary())
    del raw["history"]
    with pytest.raises(ValueError, match="lacks history: re-run the 'train' stage"):
        TrainingReport.from_dict(raw)


def test_registration_json_has_no_run_id_when_nothing_was_registered() -> None:
    common = {"model_name": "m", "aliases": [], "gate_passed": False, "gate_reasons": ["x"],
              "privacy": "none", "budget_spent": {}, "lifetime_epsilon": 10.0,
              "charged_at_sites": []}
    unregistered = Registration(registered=False, run_id=None, model_version=None, **common)
    assert "run_id" not in unregistered.to_dict()
    registered = Registration(registered=True, run_id="r1", model_version="3", **common)
    assert registered.to_dict()["run_id"] == "r1" and registered.to_dict()["registered"]


def test_run_metrics_has_every_field_once_with_its_source() -> None:
    assert set(RUN_METRICS) >= ARCHITECTURE_METRICS
    audit = AuditReport(enabled=True, mia_auc=0.55, mia_attack_accuracy=0.58,
                        mia_tpr_at_1pct_fpr=0.02, mia_tpr_at_0_1pct_fpr=0.0,
                        empirical_epsilon_lower_bound=0.0, mia_advantage=0.16, seconds=5.0)
    metrics = run_metrics(_summary(), audit, 12.3456)
    assert list(metrics) == list(RUN_METRICS)
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)  # the last round's
    assert metrics["accuracy"] == 0.7 and metrics["mia_auc"] == 0.55
    assert metrics["epsilon_replace_one"] == 0.7 and metrics["randomness"] == "secure"
    assert metrics["wall_seconds"] == 12.346 and metrics["audit_seconds"] == 5.0
    disabled = AuditReport(enabled=False, seconds=0.0)  # the audit did not run
    assert run_metrics(_summary(), disabled, 1.0)["mia_auc"] is None


def test_audit_report_round_trips_and_an_old_one_is_refused() -> None:
    report = AuditReport(enabled=True, seconds=1.0, mia_auc=0.5, attacks=[{"attack": "x"}])
    assert AuditReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    with pytest.raises(ValueError, match="AuditReport lacks seconds: re-run the 'audit' stage"):
        AuditReport.from_dict({"enabled": True})


def test_the_gate_reads_the_last_evaluation_and_every_site_that_trained() -> None:
    """train.json (and so metrics.json) keeps the final round's released histogram, the sites
    it holds and every site whose update went into an aggregate in any round."""
    records = [RoundRecord(round=r, train_loss=0.5, test_loss=0.6, accuracy=0.7, auc=0.8,
                           balanced_accuracy=0.7, bytes_uploaded=1, bytes_downloaded=1,
                           bytes_uploaded_uncompressed=1, bytes_downloaded_uncompressed=1,
                           clients_ok=2, aggregated_clients=sites, evaluated_clients=["a"],
                           evaluation_histogram=[[float(r), 1.0], [2.0, 3.0]])
               for r, sites in ((1, ["a", "b"]), (2, ["a"]))]
    privacy = PrivacyReport(enabled=True, epsilon=0.3, delta=1e-5, randomness="secure",
                            epsilon_replace_one=0.7)
    summary = TrainingSummary.of_run(
        TrainingResult(torch.zeros(3), records, []), clients=2, partition="by_site",
        compression="dense", aggregation="fedavg", malicious=[], privacy=privacy, seconds=1.0)
    figures = TrainingReport.from_dict(_train_json(summary)).figures()
    assert figures["evaluation_histogram"] == [[2.0, 1.0], [2.0, 3.0]]
    assert figures["evaluated_sites"] == ["a"] and figures["trained_sites"] == ["a", "b"]


def test_a_summary_prints_delta_as_it_is_and_histograms_as_their_shape() -> None:
    """δ = 1e-05 printed to four decimals read 0.0000 in the Prefect summary; the merged
    evaluation histogram printed its every float."""
    from fl_core.results import format_metric

    assert format_metric(1e-5) == "1e-05"
    assert format_metric(0.8176) == "0.8176" and format_metric(1234) == "1,234"
    assert format_metric(None) == "—" and format_metric(True) == "True"
    assert format_metric([[40.95, 23.41, 11.8, 15.6], [13.3, 6.9, 16.1, 40.9]]) == \
        "2 × 4 noisy counts (metrics.json)"
    assert format_metric(["Cleveland", "Hungary"]) == "Cleveland, Hungary"


def test_bounds_are_rounded_the_way_that_keeps_them_true() -> None:
    """ε and δ are stated as at most: rounded up; a lower confidence bound as at least:
    rounded down; δ in scientific notation (1e-05, never 0.000)."""
    from fl_core.results import format_bound

    assert format_bound(0.9931525083615094, up=True) == "0.994"  # nearest: 0.993 < ε
    assert format_bound(0.9931525083615094, 6, up=True) == "0.993153"
    assert format_bound(2.1276, 3, up=True) == "2.13"
    assert format_bound(0.5199, up=False) == "0.519"  # nearest would claim 0.52
    assert format_bound(1e-5, up=True) == "1e-05" and format_bound(4.01e-4, 2, up=True) == "0.00041"
    assert format_bound(2.0032, 6, up=True) == "2.0032"  # exact decimals are not bumped
    assert format_bound(0.0, up=False) == "0" and format_bound(None, up=True) == "—"
