"""The round engine: broadcast → local training → encoded updates → aggregate → evaluate.

The server talks to clients only through :class:`FederatedClient`, and clients answer only in
bytes produced by a codec, so the same round runs in-process (the default simulation) or with
clients behind a queue or a work pool. Byte counts are the lengths of those byte strings.

A client that raises, vanishes, or sends a payload that does not decode is *failed for the
round*: the round goes on without it and the failure is recorded. A round with fewer than
``min_clients`` usable updates raises :class:`RoundFailedError`.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from fl_core.aggregation import AggregationResult, Aggregator, fedavg
from fl_core.anomaly import Reputation, detect_anomalies, sanitize
from fl_core.attacks import Attack
from fl_core.compression import (
    DenseCodec,
    ModelBroadcast,
    ModelReplica,
    PayloadError,
    TopKQuantizer,
    UpdateCompressor,
    check_finite,
    decode_payload,
    dense_size,
)
from fl_core.data import ClientData
from fl_core.metrics import accuracy, roc_auc
from fl_core.models import get_flat_params, set_flat_params
from fl_core.privacy import DPSGDConfig, PatientDPTrainer, group_records
from fl_core.randomness import RandomSource, SeededRandom


class RoundFailedError(RuntimeError):
    """Too few clients produced a usable update in a round."""


class ClientUpdateError(ValueError):
    """One client's update was refused; the message names the client and the reason."""

    def __init__(self, client_id: str, reason: str) -> None:
        super().__init__(f"client {client_id!r}: {reason}")
        self.client_id = client_id
        self.reason = reason


@dataclass(frozen=True)
class LocalTrainingConfig:
    local_epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ClientEvaluation:
    client_id: str
    logits: torch.Tensor
    labels: torch.Tensor
    loss: float


class FederatedClient(Protocol):
    """What the server may ask of a client. Everything crossing the boundary is bytes."""

    client_id: str
    num_train: int

    def fit(self, global_payload: bytes, round_idx: int) -> bytes:
        """Train from the broadcast model; return the encoded update (local − global)."""
        ...

    def evaluate(self, global_payload: bytes) -> ClientEvaluation:
        """Score the broadcast model on the client's held-out test split."""
        ...


def _seed_for(seed: int, client_id: str, round_idx: int) -> int:
    # stable across processes (unlike hash()), distinct per client and round
    return (seed * 1_000_003 + zlib.crc32(client_id.encode()) * 7919 + round_idx) % (2**63 - 1)


def train_local(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LocalTrainingConfig, seed: int
) -> float:
    """Plain minibatch SGD on binary cross-entropy; returns the mean loss of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    last = float("nan")
    n = x.shape[0]
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


class InProcessClient:
    """A simulated hospital: its data never leaves this object except as codec bytes.

    With ``privacy`` it trains by patient-level DP-SGD (:class:`PatientDPTrainer`) and keeps
    its own accountant; :attr:`epsilon_spent` is what its updates have cost so far. Its DP
    sampling and noise come from ``randomness`` (one stream per client and round): secret OS
    entropy for a promotable run, a seeded generator for a reproducible simulation.
    """

    def __init__(
        self,
        data: ClientData,
        model_factory: Callable[[], nn.Module],
        training: LocalTrainingConfig,
        compressor: UpdateCompressor | None = None,
        privacy: DPSGDConfig | None = None,
        randomness: RandomSource | None = None,
    ) -> None:
        self.client_id = data.client_id
        self.num_train = data.num_train
        self._data = data
        self._model = model_factory()
        self._training = training
        self._compressor = compressor or UpdateCompressor(DenseCodec(), error_feedback=False)
        self._replica = ModelReplica(get_flat_params(self._model).numel())
        self._randomness = randomness or SeededRandom(training.seed)
        self.last_train_loss = float("nan")
        self._dp: PatientDPTrainer | None = None
        if privacy is not None:  # the factory's model must be one Opacus accepts (check_model)
            patients = group_records(data.x_train, data.y_train, data.patient_ids())
            self._dp = PatientDPTrainer(self._model, patients, privacy)

    @property
    def epsilon_spent(self) -> float | None:
        """ε this client's DP-SGD has spent so far (None without DP)."""
        return None if self._dp is None else self._dp.epsilon()

    @property
    def dp_steps(self) -> int:
        return 0 if self._dp is None else self._dp.steps

    def fit(self, global_payload: bytes, round_idx: int) -> bytes:
        global_params = self._replica.apply(global_payload)
        set_flat_params(self._model, global_params)
        if self._dp is not None:
            random = self._randomness.stream("dp-sgd", self.client_id, round_idx)
            self.last_train_loss = self._dp.train(self._training.local_epochs, random)
        else:  # not private: the minibatch order needs no secrecy
            seed = _seed_for(self._training.seed, self.client_id, round_idx)
            self.last_train_loss = train_local(
                self._model, self._data.x_train, self._data.y_train, self._training, seed
            )
        delta = get_flat_params(self._model) - global_params
        check_finite(delta, f"update of client {self.client_id!r}")
        return self._compressor.compress(delta, round_idx)

    def evaluate(self, global_payload: bytes) -> ClientEvaluation:
        set_flat_params(self._model, decode_payload(global_payload, self._replica.num_elements))
        self._model.eval()
        with torch.no_grad():
            logits = self._model(self._data.x_test)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, self._data.y_test)
        return ClientEvaluation(self.client_id, logits, self._data.y_test, float(loss))


@dataclass
class RoundRecord:
    """One round's outcome; one row of ``reports/rounds.csv``."""

    round: int
    train_loss: float
    test_loss: float
    accuracy: float
    auc: float
    bytes_uploaded: int
    bytes_downloaded: int
    bytes_uploaded_uncompressed: int
    bytes_downloaded_uncompressed: int
    clients_ok: int
    failed_clients: list[str] = field(default_factory=list)
    flagged_clients: list[str] = field(default_factory=list)
    rejected_clients: list[str] = field(default_factory=list)
    excluded_clients: list[str] = field(default_factory=list)
    client_accuracy: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None  # DP-SGD: the largest ε any client has spent so far
    seconds: float = 0.0


@dataclass
class TrainingResult:
    params: torch.Tensor
    history: list[RoundRecord]
    failures: list[ClientUpdateError]


def _valid_evaluation(reply: object, client_id: str) -> ClientEvaluation:
    """The client's evaluation if it is one (matching logits and labels), else ValueError."""
    if not isinstance(reply, ClientEvaluation):
        raise ValueError(f"evaluation reply is a {type(reply).__name__}")
    if reply.logits.shape != reply.labels.shape or reply.logits.ndim != 1:
        raise ValueError(f"evaluation logits {tuple(reply.logits.shape)} and labels "
                         f"{tuple(reply.labels.shape)} disagree")
    if reply.client_id != client_id:
        raise ValueError(f"evaluation reply claims to come from {reply.client_id!r}")
    return reply


def evaluate_pooled(
    clients: Sequence[FederatedClient], payload: bytes
) -> tuple[float, float, float, dict[str, float], list[ClientUpdateError]]:
    """Pooled loss, accuracy and AUC over the clients' test splits, per-client accuracy, and
    the clients whose evaluation failed (raised, vanished or replied with something that is
    not an evaluation): those are left out of this round's figures, the run goes on."""
    evals: list[ClientEvaluation] = []
    failures: list[ClientUpdateError] = []
    for client in clients:
        try:
            evals.append(_valid_evaluation(client.evaluate(payload), client.client_id))
        except Exception as exc:  # one bad site never takes down the round
            failures.append(ClientUpdateError(
                client.client_id, f"evaluation failed ({type(exc).__name__}: {exc})"))
    if not evals:
        nan = float("nan")
        return nan, nan, nan, {}, failures
    logits = torch.cat([e.logits for e in evals])
    labels = torch.cat([e.labels for e in evals])
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, labels))
    per_client = {e.client_id: accuracy(e.logits, e.labels) for e in evals}
    return loss, accuracy(logits, labels), roc_auc(logits, labels), per_client, failures


@dataclass
class Defense:
    """What the server does between decoding updates and applying their aggregate.

    In order: reject updates with an absurd norm (``max_norm_factor`` × the round's median;
    0 = off); flag outliers and keep reputations (``detect_anomalies``); drop clients whose
    reputation excludes them; an optional ``pre_aggregation`` step (nearest-neighbour mixing,
    bucketing); then ``aggregator(updates, weights, previous_aggregate)``.
    """

    aggregator: Aggregator | None = None
    pre_aggregation: Callable[[torch.Tensor], torch.Tensor] | None = None
    detect: bool = False
    detect_min_clients: int = 5
    z_threshold: float = 3.0
    reputation: Reputation = field(default_factory=Reputation)
    max_norm_factor: float = 100.0

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor,
                  previous: torch.Tensor | None) -> AggregationResult:
        if self.pre_aggregation is not None:
            # mixed rows no longer belong to one client: weigh them equally
            updates, weights = self.pre_aggregation(updates), None
        if self.aggregator is None:
            return fedavg(updates, weights)
        return self.aggregator(updates, weights, previous)


def _fail(failures: list[ClientUpdateError], failed: list[str], cid: str, reason: str) -> None:
    failures.append(ClientUpdateError(cid, reason))
    failed.append(cid)


def run_federated(
    clients: Sequence[FederatedClient],
    initial_params: torch.Tensor,
    rounds: int,
    min_clients: int = 1,
    downlink: TopKQuantizer | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    defense: Defense | None = None,
    attack: Attack | None = None,
    seed: int = 0,
    client_fraction: float = 1.0,
    randomness: RandomSource | None = None,
) -> TrainingResult:
    """Run ``rounds`` federated rounds; FedAvg weighted by training-set size by default.

    Updates are decoded with whichever fedpriv codec wrote them. The broadcast is the dense
    model each round, or with ``downlink`` the dense model once and compressed deltas after
    (:class:`ModelBroadcast`). Byte counts are payload lengths; the uncompressed figures are
    what dense float32 payloads would have been. Evaluation is a measurement of the
    simulation and sends the dense model, uncounted. ``attack`` (simulation only) rewrites
    the updates of its malicious clients once the round's honest updates are known.
    ``client_fraction < 1`` asks each client to train with that probability per round
    (Poisson client sampling drawn from ``randomness``, by default seeded by ``seed``; the
    amplification DP-FedAvg claims for it needs a secret source); the others sit it out.
    """
    if client_fraction < 1 and downlink is not None:
        raise ValueError("client sampling with a compressed downlink: a client that sits a "
                         "round out would miss that round's model delta")
    if min_clients > len(clients):
        raise ValueError(f"min_clients={min_clients} but only {len(clients)} clients exist")
    defense = defense or Defense()
    broadcast = ModelBroadcast(downlink)
    dense = DenseCodec()
    generator = torch.Generator().manual_seed(seed)  # simulated attacks only
    sampling = (randomness or SeededRandom(seed)).stream("client-sampling")
    params = initial_params.detach().clone().to(torch.float32)
    previous: torch.Tensor | None = None
    n_params = params.numel()
    history: list[RoundRecord] = []
    failures: list[ClientUpdateError] = []
    for round_idx in range(1, rounds + 1):
        started = time.perf_counter()
        global_payload = broadcast.payload(params)
        received_updates: list[torch.Tensor] = []
        senders: list[FederatedClient] = []
        failed: list[str] = []
        bytes_up, received = 0, 0
        participants = list(clients)
        if client_fraction < 1:
            picked = sampling.uniform(len(clients)) < client_fraction
            participants = [c for c, p in zip(clients, picked.tolist(), strict=True) if p]
        for client in participants:
            try:
                payload = client.fit(global_payload, round_idx)
            except Exception as exc:  # a client that crashes or vanishes fails only its round
                _fail(failures, failed, client.client_id,
                      f"no update ({type(exc).__name__}: {exc})")
                continue
            if not isinstance(payload, bytes):
                _fail(failures, failed, client.client_id,
                      f"no update (reply is a {type(payload).__name__}, not bytes)")
                continue
            bytes_up += len(payload)
            received += 1
            try:
                received_updates.append(decode_payload(payload, n_params))
                senders.append(client)
            except PayloadError as exc:
                _fail(failures, failed, client.client_id, f"undecodable payload: {exc}")
        kept, reasons = sanitize(received_updates, n_params, max_norm_factor=0)
        for i, reason in reasons.items():
            _fail(failures, failed, senders[i].client_id, reason)
        senders = [senders[i] for i in kept]
        ids = [c.client_id for c in senders]
        updates = (torch.stack([received_updates[i] for i in kept]) if kept
                   else torch.zeros(0, n_params))
        if attack is not None and kept:
            rows = [i for i, cid in enumerate(ids) if cid in attack.malicious]
            updates = attack.craft(updates, rows, generator)

        # absurd norms, anomalies and reputation: rejected, flagged, excluded
        kept, reasons = sanitize(list(updates), n_params, defense.max_norm_factor)
        rejected = [ids[i] for i in sorted(reasons)]
        flagged: list[str] = []
        if defense.detect and len(kept) >= defense.detect_min_clients:
            report = detect_anomalies(updates[kept], defense.z_threshold)
            flagged = [ids[kept[i]] for i in report.flagged]
            defense.reputation.update([ids[i] for i in kept], set(flagged))
            kept = [i for i in kept if not defense.reputation.excluded(ids[i])]
        excluded = [ids[i] for i in range(len(ids))
                    if ids[i] not in rejected and i not in kept]
        if len(kept) < min_clients:
            lost = [str(f) for f in failures[-len(failed):]] if failed else []
            lost += [f"{cid}: rejected" for cid in rejected]
            lost += [f"{cid}: excluded by reputation" for cid in excluded]
            raise RoundFailedError(
                f"round {round_idx}: {len(kept)} usable update(s) from {len(participants)} "
                f"client(s) asked, min_clients={min_clients}"
                + (f" ({'; '.join(lost)})" if lost else "")
            )
        weights = torch.tensor([float(senders[i].num_train) for i in kept])
        result = defense.aggregate(updates[kept], weights, previous)
        previous = result.aggregate
        params = params + result.aggregate
        test_loss, acc, auc, per_client, eval_failures = evaluate_pooled(
            clients, dense.encode(params))
        for failure in eval_failures:
            _fail(failures, failed, failure.client_id, failure.reason)
        losses = torch.tensor([getattr(senders[i], "last_train_loss", float("nan"))
                               for i in kept])
        train_loss = float((losses * weights).sum() / weights.sum())
        spent = [e for c in clients if (e := getattr(c, "epsilon_spent", None)) is not None]
        record = RoundRecord(
            round=round_idx,
            train_loss=train_loss,
            test_loss=test_loss,
            accuracy=acc,
            auc=auc,
            bytes_uploaded=bytes_up,
            bytes_downloaded=len(global_payload) * len(participants),
            bytes_uploaded_uncompressed=dense_size(n_params) * received,
            bytes_downloaded_uncompressed=dense_size(n_params) * len(participants),
            clients_ok=len(kept),
            failed_clients=failed,
            flagged_clients=flagged,
            rejected_clients=rejected,
            excluded_clients=excluded,
            client_accuracy=per_client,
            epsilon=max(spent) if spent else None,
            seconds=time.perf_counter() - started,
        )
        history.append(record)
        if on_round is not None:
            on_round(record)
    return TrainingResult(params=params, history=history, failures=failures)
