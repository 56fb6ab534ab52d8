"""Stage 3: federated training rounds; writes the model, ``reports/rounds.csv`` and curves."""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task

from fl_core.accounting import (
    KIND_TRAIN,
    client_spending,
    describe_privacy,
    open_ledger,
    planned_charge,
    privacy_summary,
    spent_charge,
)
from fl_core.aggregation import (
    AggregationResult,
    bucketing,
    make_aggregator,
    nearest_neighbour_mixing,
)
from fl_core.anomaly import Reputation
from fl_core.attacks import Attack, choose_malicious
from fl_core.compression import DenseCodec, TopKQuantizer, UpdateCompressor
from fl_core.config import CompressionConfig, ConfigError, PipelineConfig, check_aggregation
from fl_core.data import ClientData, FederatedDataLoader, Partition
from fl_core.engine import Defense, FederationSettings, RoundRecord, TrainingResult
from fl_core.federation.simulation import simulate
from fl_core.federation.site import LocalTrainingConfig, SiteClient
from fl_core.ledger import Charge, new_run_id
from fl_core.models import build_model, get_flat_params, set_flat_params
from fl_core.privacy import (
    DPSGDConfig,
    calibrate_noise,
    check_delta,
    check_model,
    dp_fedavg,
    local_steps,
)
from fl_core.randomness import RandomSource, make_random
from tasks.common import Paths, atomic_path, task_options, write_json_atomic, write_text_atomic
from tasks.partition import load_client_data
from tasks.plots import training_curves


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


def quantizer(c: CompressionConfig, seed: int) -> TopKQuantizer:
    return TopKQuantizer(c.ratio, c.bits, c.chunk_size, c.stochastic_rounding, seed)


def make_compressor(c: CompressionConfig, seed: int) -> UpdateCompressor:
    """A client's uplink pipeline as configured under ``compression``."""
    if not c.enabled:
        return UpdateCompressor(DenseCodec(), error_feedback=False)
    return UpdateCompressor(quantizer(c, seed), c.error_feedback, c.momentum, c.warmup_rounds)


def describe_compression(c: CompressionConfig) -> str:
    if not c.enabled:
        return "uplink dense float32"
    parts = [f"uplink top-{c.ratio:.3g} {c.bits}-bit",
             "error feedback" if c.error_feedback else "no error feedback"]
    if c.momentum:
        parts.append(f"momentum {c.momentum}")
    if c.warmup_rounds:
        parts.append(f"warm-up {c.warmup_rounds} rounds")
    parts.append(f"downlink {c.downlink}")
    return ", ".join(parts)


def make_defense(cfg: PipelineConfig, n_clients: int, random: RandomSource) -> Defense:
    """The server's defense as configured under ``aggregation`` and ``anomaly``; DP-FedAvg's
    noise (``privacy.server``) is drawn from ``random``."""
    agg = cfg.aggregation
    try:
        check_aggregation(agg, n_clients)
    except ValueError as exc:  # by_site: the number of clients is only known now
        raise ConfigError(str(exc)) from None
    f = agg.num_byzantine(n_clients)
    pre = None
    if agg.pre_aggregation == "nnm":
        def pre(u: torch.Tensor) -> torch.Tensor:
            return nearest_neighbour_mixing(u, min(f, u.shape[0] - 1))
    elif agg.pre_aggregation == "bucketing":
        generator = torch.Generator().manual_seed(cfg.seed)

        def pre(u: torch.Tensor) -> torch.Tensor:
            return bucketing(u, agg.bucket_size, generator)
    an = cfg.anomaly
    aggregator = make_aggregator(agg.method, f)
    server = cfg.privacy.server
    if server.enabled:
        noise = random.stream("server-dp")

        def aggregator(u: torch.Tensor, w: torch.Tensor | None,
                       prev: torch.Tensor | None) -> AggregationResult:
            # divide by the *expected* number of clients: the sensitivity stays S / (q·n)
            return dp_fedavg(u, server.clip_norm, server.noise_multiplier,
                             cfg.client_fraction * n_clients, noise)
    return Defense(
        aggregator=aggregator,
        pre_aggregation=pre,
        detect=an.enabled,
        detect_min_clients=an.min_clients,
        z_threshold=an.z_threshold,
        reputation=Reputation(an.reputation_decay, an.exclude_at),
        max_norm_factor=agg.max_norm_factor,
    )


def make_attack(cfg: PipelineConfig, client_ids: list[str]) -> Attack | None:
    a = cfg.attack
    if a.kind == "none" or a.fraction == 0:
        return None
    malicious = choose_malicious(client_ids, a.fraction, cfg.seed)
    return Attack(a.kind, malicious, a.scale, a.noise_std, a.ipm_epsilon)


def poisoned(data: ClientData) -> ClientData:
    """The client's data with its training labels flipped (data poisoning)."""
    return dataclasses.replace(data, y_train=1.0 - data.y_train)


def make_dpsgd(cfg: PipelineConfig, data: list[ClientData]) -> DPSGDConfig | None:
    """Every client's DP-SGD recipe, σ calibrated so the whole run costs ``privacy.epsilon``.

    All clients share the sample rate and the number of steps, hence one σ. Raises
    :class:`ConfigError` when ``privacy.delta`` is not below 1/patients at some client.
    """
    p = cfg.privacy
    if not p.enabled:
        return None
    patients = {d.client_id: int(d.patient_ids().unique().numel()) for d in data}
    largest = max(patients, key=patients.__getitem__)  # the binding bound: 1/most patients
    try:
        check_delta(p.delta, patients[largest], f"client {largest!r}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    steps = local_steps(cfg.rounds, cfg.local_epochs, p.sample_rate)
    try:
        sigma = calibrate_noise(p.epsilon, p.delta, p.sample_rate, steps, p.accountant)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return DPSGDConfig(sigma, p.max_grad_norm, p.sample_rate,
                       p.learning_rate or cfg.learning_rate, p.delta, p.accountant,
                       p.grad_sample_mode)


def plan_charge(
    cfg: PipelineConfig, root: Path, partition: Partition, data: list[ClientData],
    kind: str = KIND_TRAIN,
) -> Charge:
    """What a DP-SGD run of ``cfg`` on ``partition`` will charge, under a fresh ledger run id."""
    dp = make_dpsgd(cfg, data)  # σ calibrated exactly as the run will (cached)
    if dp is None:
        raise ConfigError("only a DP-SGD run (privacy.enabled=true) can be charged")
    site_of = FederatedDataLoader.get(cfg.data, root).site_of_patient()
    return planned_charge(cfg, site_of, partition, dp.noise_multiplier, new_run_id(), kind)


def check_budget(
    cfg: PipelineConfig, root: Path, partition: Partition, data: list[ClientData]
) -> Charge:
    """Refuse before training if this run would take a patient past the lifetime cap.

    Returns the planned charge; its ``run_id`` is the ledger run id of the charge made after
    training (:func:`charge_and_summarise`).
    """
    planned = plan_charge(cfg, root, partition, data)
    open_ledger(cfg, root).check(planned, cfg.privacy.lifetime_epsilon)
    return planned


def charge_and_summarise(
    cfg: PipelineConfig, root: Path, partition: Partition, run: FederatedRun,
    run_id: str | None, kind: str = KIND_TRAIN,
) -> dict[str, Any]:
    """Charge the ledger for a DP-SGD run's patients, then summarise its privacy.

    Call it before anything trained is written: if the charge is refused (a concurrent run
    took the budget), :class:`BudgetExceededError` propagates and no model exists.
    """
    charge = None
    if run.dp is not None and run_id is not None:
        site_of = FederatedDataLoader.get(cfg.data, root).site_of_patient()
        charge = spent_charge(cfg, site_of, partition, run.dp, run.spent, run_id, kind)
        open_ledger(cfg, root).charge(charge, cfg.privacy.lifetime_epsilon)
    return privacy_summary(cfg, charge, run.spent, run.dp, run.model_fixes,
                           len(run.result.history))


def build_target_model(cfg: PipelineConfig, num_features: int) -> tuple[torch.nn.Module, list[str]]:
    """The configured model, initialised from ``seed``; with DP-SGD, one Opacus accepts
    (server, clients and audit shadows share it). Returns the model and Opacus's fixes."""
    model = build_model(cfg.model, num_features, cfg.hidden_units, seed=cfg.seed)
    if cfg.privacy.enabled:
        return check_model(model)
    return model, []


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


@dataclass(frozen=True)
class FederatedRun:
    """A finished federated run and what made it: its DP recipe and the attack."""

    result: TrainingResult
    dp: DPSGDConfig | None
    attack: Attack | None
    model_fixes: list[str]  # what ModuleValidator.fix changed for Opacus (usually nothing)

    @property
    def spent(self) -> dict[str, tuple[float, int]]:
        """client id → (ε, DP steps), as the clients reported them."""
        return client_spending(self.result.site_epsilon, self.result.site_dp_steps)


def federate(
    cfg: PipelineConfig, data: list[ClientData],
    on_round: Callable[[RoundRecord], None] | None = None,
) -> FederatedRun:
    """The configured federated run on ``data``: clients, DP, compression, defense, attack."""
    num_features = int(data[0].x_train.shape[1])
    model_fixes: list[str] = []

    def factory() -> torch.nn.Module:
        model, fixes = build_target_model(cfg, num_features)
        model_fixes[:] = fixes
        return model

    local = LocalTrainingConfig(cfg.local_epochs, cfg.batch_size, cfg.learning_rate, cfg.seed)
    comp = cfg.compression
    random = make_random(cfg.privacy.randomness, cfg.seed)
    defense = make_defense(cfg, len(data), random)
    attack = make_attack(cfg, [d.client_id for d in data])
    if attack is not None and attack.flips_labels:
        data = [poisoned(d) if d.client_id in attack.malicious else d for d in data]
    dp = make_dpsgd(cfg, data)
    sites = [SiteClient(d, factory, local, make_compressor(comp, cfg.seed + i), dp,
                        randomness=random) for i, d in enumerate(data)]
    downlink = quantizer(comp, cfg.seed) if comp.enabled and comp.downlink == "compressed" \
        else None
    settings = FederationSettings(
        rounds=cfg.rounds, local_epochs=cfg.local_epochs, min_clients=cfg.min_clients,
        round_timeout_s=cfg.federation.round_timeout_s, client_fraction=cfg.client_fraction)
    result = simulate(sites, initial_params=get_flat_params(factory()), settings=settings,
                      downlink=downlink, sinks=[on_round] if on_round else (),
                      defense=defense, attack=attack, seed=cfg.seed, randomness=random)
    return FederatedRun(result, dp, attack, model_fixes)


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


train = task(**task_options("train"))(train_model)
