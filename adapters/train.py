"""Stage 3: federated training rounds; writes the model, ``reports/rounds.csv`` and curves."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import torch

from adapters.artifacts import Paths, atomic_path, write_json_atomic, write_text_atomic
from adapters.partition import load_client_data
from adapters.plots import training_curves
from fl_core.accounting import (
    charge_and_summarise,
    check_budget,
    describe_privacy,
)
from fl_core.config import PipelineConfig
from fl_core.engine import RoundRecord
from fl_core.federation.build import describe_compression, federate
from fl_core.models import build_model, set_flat_params
from fl_core.privacy import (
    check_model,
)


def round_row(record: RoundRecord) -> dict[str, Any]:
    """One ``rounds.csv`` row: pooled figures, then each client's test accuracy."""
    row: dict[str, Any] = {
        "round": record.round,
        "train_loss": round(record.train_loss, 6),
        "test_loss": round(record.test_loss, 6),
        "accuracy": round(record.accuracy, 6),
        "auc": round(record.auc, 6),
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
        "flagged_clients": ";".join(record.flagged_clients),
        "rejected_clients": ";".join(record.rejected_clients),
        "excluded_clients": ";".join(record.excluded_clients),
        "n_flagged": len(record.flagged_clients),
        "epsilon": "" if record.epsilon is None else round(record.epsilon, 6),
        "seconds": round(record.seconds, 4),
    }
    row.update({f"accuracy_{cid}": round(acc, 6) for cid, acc in record.client_accuracy.items()})
    return row


def _kib(n: int) -> str:
    return f"{n} B" if n < 10_240 else f"{n / 1024:.1f} KiB"


def print_progress(record: RoundRecord, total: int) -> None:
    ratio = record.bytes_uploaded_uncompressed / max(record.bytes_uploaded, 1)
    failed = "".join(
        f"  {label}: {','.join(ids)}" for label, ids in (
            ("failed", record.failed_clients), ("rejected", record.rejected_clients),
            ("flagged", record.flagged_clients), ("excluded", record.excluded_clients))
        if ids)
    print(
        f"round {record.round:>3}/{total}  loss {record.test_loss:.4f}  "
        f"acc {record.accuracy:.3f}  auc {record.auc:.3f}  "
        f"up {_kib(record.bytes_uploaded)} ({ratio:.1f}x)  down {_kib(record.bytes_downloaded)}"
        f"  ({record.seconds * 1000:.0f} ms){failed}",
        flush=True,
    )


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model saved by :func:`train_model`, and its metadata."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the 'train' stage first")
    saved = torch.load(path, weights_only=True)
    model = build_model(saved["kind"], saved["num_features"], saved["hidden_units"])
    if saved.get("opacus_fixed"):  # trained as ModuleValidator.fix rewrote it
        model, _ = check_model(model)
    set_flat_params(model, saved["params"])
    return model, saved


def train_model(cfg: PipelineConfig, root: str | Path = ".") -> dict[str, Any]:
    """Run the federated rounds on the partition; write model, rounds.csv, train.json, plot."""
    paths = Paths.of(cfg, root)
    started = time.perf_counter()
    data, transform, partition = load_client_data(cfg, paths)
    num_features = int(data[0].x_train.shape[1])
    print(f"training {cfg.model} on {len(data)} clients "
          f"({', '.join(d.client_id for d in data)}), {cfg.rounds} rounds; "
          f"{describe_compression(cfg.compression)}; aggregation {cfg.aggregation.method}"
          + (f" after {cfg.aggregation.pre_aggregation}"
             if cfg.aggregation.pre_aggregation != "none" else "")
          + (", anomaly detection" if cfg.anomaly.enabled else ""))
    if cfg.attack.kind != "none" and cfg.attack.fraction > 0:
        print(f"SIMULATED ATTACK {cfg.attack.kind} on {cfg.attack.fraction:.0%} of clients")
    p = cfg.privacy
    # refuse before any training; charge after it, before the model file exists
    run_id = check_budget(cfg, paths.root, partition, data).run_id if p.enabled else None
    run = federate(cfg, data, lambda rec: print_progress(rec, cfg.rounds))
    result, attack = run.result, run.attack
    privacy = charge_and_summarise(cfg, paths.root, partition, run, run_id)
    print(describe_privacy(privacy))
    history = [round_row(r) for r in result.history]
    last = result.history[-1]

    with atomic_path(paths.model) as tmp:
        torch.save({
            "kind": cfg.model, "num_features": num_features, "hidden_units": cfg.hidden_units,
            "params": result.params, "columns": transform.columns(),
            "opacus_fixed": bool(run.model_fixes),
        }, tmp)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(paths.rounds_csv, buffer.getvalue())
    training_curves(history, paths.training_plot)

    bytes_up = sum(r.bytes_uploaded for r in result.history)
    bytes_up_raw = sum(r.bytes_uploaded_uncompressed for r in result.history)
    bytes_down = sum(r.bytes_downloaded for r in result.history)
    bytes_down_raw = sum(r.bytes_downloaded_uncompressed for r in result.history)
    summary = {
        "accuracy": last.accuracy,
        "auc": last.auc,
        "test_loss": last.test_loss,
        "rounds": len(result.history),
        "clients": len(data),
        "partition": partition.scheme,
        "bytes_uploaded": bytes_up,
        "bytes_downloaded": bytes_down,
        "bytes_uploaded_uncompressed": bytes_up_raw,
        "bytes_downloaded_uncompressed": bytes_down_raw,
        "compression_ratio": bytes_up_raw / max(bytes_up, 1),
        "downlink_compression_ratio": bytes_down_raw / max(bytes_down, 1),
        "compression": describe_compression(cfg.compression),
        "client_accuracy": last.client_accuracy,
        "client_failures": [str(f) for f in result.failures],
        "flagged_clients": sorted({c for r in result.history for c in r.flagged_clients}),
        "flagged_client_rounds": sum(len(r.flagged_clients) for r in result.history),
        "rejected_client_rounds": sum(len(r.rejected_clients) for r in result.history),
        "excluded_clients": sorted({c for r in result.history for c in r.excluded_clients}),
        "malicious_clients": sorted(attack.malicious) if attack else [],
        "aggregation": cfg.aggregation.method,
        "privacy": privacy,
        "epsilon": privacy["epsilon"],
        "delta": privacy["delta"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(paths.train_summary, summary)
    return summary

