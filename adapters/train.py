"""Stage 3: federated training rounds; writes the model, ``reports/rounds.csv`` and curves."""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adapters.accounting import charge_and_summarise, check_budget
from adapters.artifacts import Paths, atomic_path, write_json_atomic, write_text_atomic
from adapters.metrics import RunMetrics, run_metrics
from adapters.partition import load_client_data
from adapters.plots import training_curves
from fl_core.config.model import PipelineConfig
from fl_core.data.tables import DataError
from fl_core.data.transform import TabularTransform
from fl_core.federation.coordinator import RoundRecord, RoundSink
from fl_core.federation.messages import SiteReady
from fl_core.federation.transport import Transport
from fl_core.federation.wiring import (
    FederatedRun,
    describe_compression,
    federate,
    federate_over,
    make_dpsgd,
    parameter_count,
)
from fl_core.model.networks import build_model, set_flat_params
from fl_core.privacy.accounting import describe_privacy, privacy_summary
from fl_core.privacy.dpsgd import check_model
from fl_core.results import TrainingSummary


def _kib(n: int) -> str:
    return f"{n} B" if n < 10_240 else f"{n / 1024:.1f} KiB"


def print_progress(record: RoundRecord, total: int) -> None:
    ratio = record.bytes_uploaded_uncompressed / max(record.bytes_uploaded, 1)
    failed = "".join(
        f"  {label}: {','.join(ids)}" for label, ids in (
            ("failed", record.failed_clients), ("rejected", record.rejected_clients),
            ("flagged", record.flagged_clients), ("excluded", record.excluded_clients))
        if ids)
    if record.failure_reasons:
        failed += " (" + "; ".join(f"{site}: {why}" for site, why
                                   in record.failure_reasons.items()) + ")"
    print(
        f"round {record.round:>3}/{total}  loss {record.test_loss:.4f}  "
        f"acc {record.accuracy:.3f}  auc {record.auc:.3f}  "
        f"up {_kib(record.bytes_uploaded)} ({ratio:.1f}x)  down {_kib(record.bytes_downloaded)}"
        f"  ({record.seconds * 1000:.0f} ms){failed}",
        flush=True,
    )


def round_sinks(cfg: PipelineConfig, metrics: RunMetrics | None) -> RoundSink:
    """The progress line, then (monitoring on) the round's metrics and their push."""
    if metrics is None:
        return lambda rec: print_progress(rec, cfg.rounds)

    def both(record: RoundRecord) -> None:
        print_progress(record, cfg.rounds)
        metrics.on_round(record)
    return both


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model saved by :func:`train_model`, and its metadata."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the 'train' stage first")
    saved = torch.load(path, weights_only=True)
    model = build_model(saved["kind"], saved["num_features"], hidden_units=saved["hidden_units"])
    if saved.get("opacus_fixed"):  # trained as ModuleValidator.fix rewrote it
        model, _ = check_model(model)
    set_flat_params(model, saved["params"])
    return model, saved


def train_model(
    cfg: PipelineConfig, root: str | Path = ".", run_id: str | None = None
) -> TrainingSummary:
    """Run the federated rounds on the partition; write model, rounds.csv, train.json, plot."""
    paths = Paths.of(cfg, root, run_id)
    started = time.perf_counter()
    data, transform, partition = load_client_data(cfg, paths)
    num_features = int(data[0].x_train.shape[1])
    compression = describe_compression(cfg.compression, parameter_count(cfg, num_features))
    print(f"training {cfg.model} on {len(data)} clients "
          f"({', '.join(d.client_id for d in data)}), {cfg.rounds} rounds; "
          f"{compression}; aggregation {cfg.aggregation.method}"
          + (f" after {cfg.aggregation.pre_aggregation}"
             if cfg.aggregation.pre_aggregation != "none" else "")
          + (", anomaly detection" if cfg.anomaly.enabled else ""))
    if cfg.attack.kind != "none" and cfg.attack.fraction > 0:
        print(f"SIMULATED ATTACK {cfg.attack.kind} on {cfg.attack.fraction:.0%} of clients")
    p = cfg.privacy
    dp = make_dpsgd(cfg=cfg, data=data)  # σ calibrated once: planned, trained, then charged
    metrics = run_metrics(cfg, run_id)  # None: monitoring off
    # refuse before any training; charge after it, before the model file exists
    run_id = check_budget(cfg, paths.root, partition, dp=dp).run_id if p.enabled else None
    if metrics is not None:
        metrics.start(cfg, "simulation")
    run = federate(cfg, data, dp=dp, on_round=round_sinks(cfg, metrics))
    attack = run.attack
    privacy = charge_and_summarise(cfg, paths.root, partition, run, run_id)
    print(describe_privacy(privacy))
    if metrics is not None:
        metrics.record_privacy(privacy)
        metrics.push()
    summary = TrainingSummary.of_run(
        run.result, clients=len(data), partition=partition.scheme,
        compression=compression, aggregation=cfg.aggregation.method,
        malicious=sorted(attack.malicious) if attack else [], privacy=privacy,
        seconds=time.perf_counter() - started)
    write_training_outputs(cfg, paths, summary, run, num_features, transform.columns())
    return summary


def write_training_outputs(cfg: PipelineConfig, paths: Paths, summary: TrainingSummary,
                           run: FederatedRun, num_features: int, columns: list[str]) -> None:
    """The model file, ``rounds.csv``, the curves and ``train.json`` (read by later stages):
    the rounds are flattened here, once, into the rows all three hold."""
    with atomic_path(paths.model) as tmp:
        torch.save({
            "kind": cfg.model, "num_features": num_features, "hidden_units": cfg.hidden_units,
            "params": run.result.params, "columns": columns,
            "opacus_fixed": bool(run.model_fixes),
        }, tmp)
    rows = [round_row(r) for r in summary.history]
    write_text_atomic(paths.rounds_csv, rounds_csv_text(rows))
    training_curves(rows, paths.training_plot)
    write_json_atomic(paths.train_summary, {**summary.figures(), "history": rows})


def round_row(record: RoundRecord) -> dict[str, Any]:
    """One round as a flat row (``rounds.csv``, ``train.json``'s history, which the
    registration logs as MLflow step metrics): pooled figures, then each client's test
    accuracy; lists of sites joined by ";" (never split back: later stages read the figures
    they need from ``train.json``'s own fields)."""
    row: dict[str, Any] = {
        "round": record.round,
        "train_loss": round(record.train_loss, 6),
        "test_loss": round(record.test_loss, 6),
        "accuracy": round(record.accuracy, 6),
        "auc": round(record.auc, 6),
        "balanced_accuracy": round(record.balanced_accuracy, 6),
        "bytes_uploaded": record.bytes_uploaded,
        "bytes_downloaded": record.bytes_downloaded,
        "bytes_uploaded_uncompressed": record.bytes_uploaded_uncompressed,
        "bytes_downloaded_uncompressed": record.bytes_downloaded_uncompressed,
        "compression_ratio": round(
            record.bytes_uploaded_uncompressed / max(record.bytes_uploaded, 1), 4),
        "downlink_compression_ratio": round(
            record.bytes_downloaded_uncompressed / max(record.bytes_downloaded, 1), 4),
        "clients_ok": record.clients_ok,
        "failed_clients": ";".join(record.failed_clients),
        "failure_reasons": "; ".join(f"{c}: {why}" for c, why in record.failure_reasons.items()),
        "flagged_clients": ";".join(record.flagged_clients),
        "rejected_clients": ";".join(record.rejected_clients),
        "excluded_clients": ";".join(record.excluded_clients),
        "n_flagged": len(record.flagged_clients),
        "epsilon": "" if record.epsilon is None else round(record.epsilon, 6),
        "seconds": round(record.seconds, 4),
        "aggregated_clients": ";".join(record.aggregated_clients),
        "aggregate_sha256": record.aggregate_sha256,  # what the round log records
    }
    row.update({f"accuracy_{cid}": round(acc, 6) for cid, acc in record.client_accuracy.items()})
    return row


def rounds_csv_text(history: Sequence[Mapping[str, Any]]) -> str:
    """``rounds.csv`` (for people and DVC plots; later stages read ``train.json``): one row
    per round; a site missing from a round (it failed its evaluation) leaves its cell empty."""
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in history for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def train_at_sites(
    cfg: PipelineConfig, root: str | Path, run_id: str, transport: Transport,
    ready: Mapping[str, SiteReady], sinks: Sequence[Callable[[RoundRecord], None]] = (),
) -> TrainingSummary:
    """``federation.mode=sites``: the rounds with every site behind ``transport``; ``ready``
    holds what each site reported at the start (its feature count, patients and its own
    ledger charge). Writes the same outputs as :func:`train_model`."""
    paths = Paths.of(cfg, root, run_id)
    started = time.perf_counter()
    features = {m.num_features for m in ready.values()}
    if len(features) != 1:
        raise DataError(f"the sites encode different feature counts {sorted(features)}: "
                        f"they run different fedpriv versions or configurations")
    num_features = features.pop()
    compression = describe_compression(cfg.compression, parameter_count(cfg, num_features))
    patients = {site: m.train_patients for site, m in ready.items()}
    print(f"training {cfg.model} at {len(ready)} sites ({', '.join(ready)}), {cfg.rounds} "
          f"rounds over the federation endpoint; {compression}")
    metrics = run_metrics(cfg, run_id)
    if metrics is not None:
        metrics.start(cfg, "sites")
    run = federate_over(cfg, transport=transport, patients=patients, num_features=num_features,
                        sinks=[round_sinks(cfg, metrics), *sinks])
    privacy = privacy_summary(cfg, None, run.spent, run.dp, run.model_fixes,
                              len(run.result.history))
    if metrics is not None:  # each site's budget as its session reported it
        metrics.record_privacy(privacy, {s: m.budget_left for s, m in ready.items()})
        metrics.push()
    if privacy.epsilon is not None:
        privacy = dataclasses.replace(
            privacy, site_epsilon=dict(privacy.client_epsilon), site_patients=patients,
            site_ledger_runs={s: m.ledger_run_id for s, m in ready.items()},
            site_ledger_heads={s: m.ledger_head for s, m in ready.items() if m.ledger_head})
    print(describe_privacy(privacy))
    summary = TrainingSummary.of_run(
        run.result, clients=len(ready), partition="by_site",
        compression=compression, aggregation=cfg.aggregation.method,
        malicious=[], privacy=privacy, seconds=time.perf_counter() - started)
    columns = TabularTransform.from_config(cfg.data).columns()
    write_training_outputs(cfg, paths, summary, run, num_features, columns)
    return summary
