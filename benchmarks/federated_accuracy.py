"""Federated vs centralised vs local-only test accuracy, side by side on the same splits.

For each seed 0..N-1 the data are partitioned as configured (by default one client per hospital,
the 740 complete-case patients, a stratified 80/20 train/test split per client, by patient) and
the transforms are fitted on the pooled training splits. On that one split, in one process:

* ``federated``   FedAvg as ``tasks/train.py`` runs it (a ``SiteClient`` per client,
                  ``simulate``; the model, rounds, local epochs, batch size and learning
                  rate of the config; the seed as model and training seed); the figures are the
                  last round's pooled test accuracy and AUC.
* ``centralised`` the same model class, same initial weights and the same minibatch SGD
                  (``fl_core.federation.site_client.train_local``: batch size, learning
                  rate) on the pooled training rows of all clients, for
                  ``rounds x local_epochs`` epochs by default (the passes over each training
                  patient that FedAvg makes).
* ``local_only``  per client, the same model and SGD on that client's training rows alone, scored
                  on the pooled test set; the figure is the mean over clients.

All three are scored on the pooled test set with ``fl_core.model.metrics``. Output: one JSON
object on stdout (per-seed values, mean and sample sd, mean seconds); one progress line per seed
on stderr.

Run from the project root::

    .venv/bin/python benchmarks/federated_accuracy.py
    .venv/bin/python benchmarks/federated_accuracy.py --set model=mlp --seeds 5 --out acc.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from report import (  # benchmarks/report.py: the script's own folder
    emit,
    require_public_dataset,
    seed_summary,
)
from torch import nn

from adapters.config_files import load_config
from adapters.tables import ClinicalTable
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.data.tables import ClientData, DataError
from fl_core.federation.coordinator import FederationSettings
from fl_core.federation.simulation import simulate
from fl_core.federation.site_client import LocalTrainingConfig, SiteClient, train_local
from fl_core.model.metrics import accuracy, roc_auc
from fl_core.model.networks import build_model, get_flat_params
from fl_core.privacy.release import EvaluationRelease

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("federated", "centralised", "local_only")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pooled test accuracy/AUC of FedAvg vs a centralised model vs site-only "
        "models, on the same split, over several seeds. JSON on stdout, progress on stderr.",
    )
    parser.add_argument("--seeds", type=int, default=10, metavar="N",
                        help="run seeds 0..N-1 (default: 10)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="federated rounds (default: 'rounds' of the params file)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                        help="configuration file (default: params.yaml of the project)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model=mlp (repeatable)")
    parser.add_argument("--central-epochs", type=int, default=None, metavar="E",
                        help="SGD epochs of the centralised and local-only models "
                        "(default: rounds x local_epochs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.central_epochs is not None and args.central_epochs < 1:
        parser.error("--central-epochs must be at least 1")
    return args


def _pooled(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(tensors))


def _score(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return accuracy(logits, y), roc_auc(logits, y)


def run_federated_arm(
    cfg: PipelineConfig, data: list[ClientData], factory: Callable[[], nn.Module], seed: int
) -> tuple[float, float]:
    """FedAvg exactly as ``tasks/train.py`` wires it; the last round's pooled accuracy/AUC."""
    local = LocalTrainingConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                                learning_rate=cfg.learning_rate, seed=seed)
    # every client in every round: plain FedAvg
    settings = FederationSettings(rounds=cfg.rounds, local_epochs=cfg.local_epochs,
                                  min_clients=cfg.min_clients,
                                  round_timeout_s=cfg.federation.round_timeout_s,
                                  client_fraction=1.0)
    # not private: each site releases an exact, fine evaluation histogram (noise 0)
    exact = EvaluationRelease(bins=4096, noise=0.0)
    result = simulate([SiteClient(data=d, model_factory=factory, training=local,
                                  evaluation=exact) for d in data],
                      initial_params=get_flat_params(factory()), settings=settings)
    last = result.history[-1]
    return last.accuracy, last.auc


def run_centralised_arm(
    cfg: PipelineConfig, data: list[ClientData], factory: Callable[[], nn.Module],
    seed: int, epochs: int, x_test: torch.Tensor, y_test: torch.Tensor,
) -> tuple[float, float, float]:
    """The same model and SGD on all clients' training rows pooled; accuracy, AUC, train loss."""
    model = factory()
    sgd = LocalTrainingConfig(local_epochs=epochs, batch_size=cfg.batch_size,
                              learning_rate=cfg.learning_rate, seed=seed)
    x = _pooled([d.x_train for d in data])
    y = _pooled([d.y_train for d in data])
    loss = train_local(model, x, y, sgd, seed)
    acc, auc = _score(model, x_test, y_test)
    return acc, auc, loss


def run_local_arm(
    cfg: PipelineConfig, data: list[ClientData], factory: Callable[[], nn.Module],
    seed: int, epochs: int, x_test: torch.Tensor, y_test: torch.Tensor,
) -> dict[str, tuple[float, float]]:
    """Per client: the same model and SGD on its own training rows; pooled accuracy and AUC."""
    out: dict[str, tuple[float, float]] = {}
    for index, client in enumerate(data):
        model = factory()
        client_seed = seed * 1000 + index
        sgd = LocalTrainingConfig(local_epochs=epochs, batch_size=cfg.batch_size,
                                  learning_rate=cfg.learning_rate, seed=client_seed)
        train_local(model, client.x_train, client.y_train, sgd, client_seed)
        out[client.client_id] = _score(model, x_test, y_test)
    return out


def _arm(acc: list[float], auc: list[float], seconds: list[float]) -> dict[str, Any]:
    return {
        "accuracy": seed_summary(acc),
        "auc": seed_summary(auc),
        "seconds_mean": round(statistics.fmean(seconds), 4),
    }


def _warm_up(cfg: PipelineConfig, num_features: int) -> None:
    # torch's first optimizer step and backward pass carry a one-off cost of seconds; pay it here
    # so that it does not land in the first seed's timing of whichever arm runs first
    model = build_model(cfg.model, num_features, hidden_units=cfg.hidden_units, seed=0)
    x = torch.zeros(8, num_features)
    warm = LocalTrainingConfig(local_epochs=1, batch_size=4, learning_rate=cfg.learning_rate,
                               seed=0)
    train_local(model, x, torch.zeros(8), warm, 0)


def benchmark(cfg: PipelineConfig, seeds: int, epochs: int) -> dict[str, Any]:
    require_public_dataset(ROOT / cfg.data.path)  # not charged: public data only
    loader = ClinicalTable.get(cfg.data, ROOT)
    acc: dict[str, list[float]] = {arm: [] for arm in ARMS}
    auc: dict[str, list[float]] = {arm: [] for arm in ARMS}
    secs: dict[str, list[float]] = {arm: [] for arm in ARMS}
    per_client: dict[str, dict[str, list[float]]] = {}
    central_loss: list[float] = []
    sizes: dict[str, Any] = {}
    started = time.perf_counter()
    for seed in range(seeds):
        data, _, _ = loader.partitioned(cfg.data, seed)
        num_features = int(data[0].x_train.shape[1])
        x_test = _pooled([d.x_test for d in data])
        y_test = _pooled([d.y_test for d in data])
        if seed == 0:
            _warm_up(cfg, num_features)
            sizes = _sizes(data, len(y_test), num_features)

        def factory(seed: int = seed, num_features: int = num_features) -> nn.Module:
            return build_model(cfg.model, num_features, hidden_units=cfg.hidden_units,
                               seed=seed)

        t0 = time.perf_counter()
        a, u = run_federated_arm(cfg, data, factory, seed)
        t1 = time.perf_counter()
        ca, cu, loss = run_centralised_arm(cfg, data, factory, seed, epochs, x_test, y_test)
        t2 = time.perf_counter()
        local = run_local_arm(cfg, data, factory, seed, epochs, x_test, y_test)
        t3 = time.perf_counter()

        central_loss.append(loss)
        la, lu = _note_local(per_client, local)
        for arm, arm_acc, arm_auc, arm_secs in (
            ("federated", a, u, t1 - t0), ("centralised", ca, cu, t2 - t1),
            ("local_only", la, lu, t3 - t2),
        ):
            acc[arm].append(arm_acc)
            auc[arm].append(arm_auc)
            secs[arm].append(arm_secs)
        print(
            f"seed {seed + 1:>2}/{seeds}  federated acc {a:.3f} auc {u:.3f} ({t1 - t0:.1f} s)  "
            f"centralised acc {ca:.3f} auc {cu:.3f} ({t2 - t1:.1f} s)  "
            f"local_only acc {la:.3f} auc {lu:.3f} ({t3 - t2:.1f} s)",
            file=sys.stderr, flush=True,
        )

    result: dict[str, Any] = {
        "config": _run_config(cfg, seeds, epochs, sizes),
        "federated": _arm(acc["federated"], auc["federated"], secs["federated"]),
        "centralised": {
            **_arm(acc["centralised"], auc["centralised"], secs["centralised"]),
            "train_loss": seed_summary(central_loss),
        },
        "local_only": {
            **_arm(acc["local_only"], auc["local_only"], secs["local_only"]),
            "per_client": {
                cid: {"accuracy": seed_summary(v["accuracy"]), "auc": seed_summary(v["auc"])}
                for cid, v in per_client.items()
            },
        },
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    return result


def _sizes(data: list[ClientData], test_patients: int, num_features: int) -> dict[str, Any]:
    """The split's sizes (seed 0's), reported with the configuration."""
    return {
        "clients": {d.client_id: {"train": d.num_train, "test": len(d.test_ids)}
                    for d in data},
        "train_patients": sum(d.num_train for d in data),
        "test_patients": test_patients,
        "num_features": num_features,
    }


def _note_local(per_client: dict[str, dict[str, list[float]]],
                local: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """Append each client's local-only accuracy and AUC to ``per_client``; their means."""
    for cid, (la, lu) in local.items():
        entry = per_client.setdefault(cid, {"accuracy": [], "auc": []})
        entry["accuracy"].append(la)
        entry["auc"].append(lu)
    return (statistics.fmean(v[0] for v in local.values()),
            statistics.fmean(v[1] for v in local.values()))


def _run_config(cfg: PipelineConfig, seeds: int, epochs: int,
                sizes: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "hidden_units": cfg.hidden_units if cfg.model == "mlp" else None,
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "centralised_epochs": epochs,
        "seeds": list(range(seeds)),
        "partition": cfg.data.partition,
        "num_clients": cfg.data.num_clients if cfg.data.partition == "by_patient" else None,
        "dirichlet_alpha": cfg.data.dirichlet_alpha,
        "test_fraction": cfg.data.test_fraction,
        "torch_threads": torch.get_num_threads(),
        **sizes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"rounds={args.rounds}")
    try:
        cfg = load_config(args.params, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # the models are tiny: extra threads cost more in start-up than they give, and one thread
    # keeps the arithmetic order (and so the figures) independent of the machine's core count
    torch.set_num_threads(1)
    epochs = args.central_epochs or cfg.rounds * cfg.local_epochs
    try:
        result = benchmark(cfg, args.seeds, epochs)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
