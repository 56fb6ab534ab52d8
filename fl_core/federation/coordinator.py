"""The round engine (the coordinator): sample → dispatch → decode and sanitise → defend →
aggregate → evaluate → record, once per round.

The engine reaches sites only through a :class:`~fl_core.federation.transport.Transport` and
the typed messages of :mod:`fl_core.federation.messages`, so the same round runs in-process
(the default simulation) or with sites behind a work pool. Byte counts are the lengths of the
codec payloads that cross.

A site that raises, stalls past ``round_timeout_s``, vanishes, replies with something that is
not the expected message, or sends an update that does not decode to the model's size is
*failed for the round*: the round goes on without it and the failure is recorded with its
reason. A round with fewer than ``min_clients`` usable updates raises
:class:`RoundFailedError`. Evaluation works the same way and only ever sees the sites' noisy
histograms (:mod:`fl_core.privacy.release`); it runs on the rounds ``evaluate_every`` picks
(and the last), each run being a release the test patients pay for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fl_core.codec.dense import DenseCodec, dense_size
from fl_core.codec.downlink import ModelBroadcast
from fl_core.codec.framing import PayloadError
from fl_core.codec.payload import decode_payload
from fl_core.codec.topk import TopKQuantizer
from fl_core.config.model import AggregationConfig, AnomalyConfig
from fl_core.federation.messages import (
    EvaluateInstruction,
    EvaluateReply,
    Failure,
    FitInstruction,
    FitReply,
    MessageError,
    decode_message,
    encode_message,
)
from fl_core.federation.round_log import sha256_hex
from fl_core.federation.transport import Transport, TransportFailure
from fl_core.model.metrics import balanced_accuracy
from fl_core.privacy.randomness import RandomSource
from fl_core.privacy.release import histogram_figures, noisy_auc
from fl_core.robust.aggregators import AggregationResult, Aggregator, fedavg
from fl_core.robust.anomaly import Reputation, detect_anomalies, sanitize
from fl_core.robust.attacks import Attack


class RoundFailedError(RuntimeError):
    """Too few clients produced a usable update in a round."""


class ClientUpdateError(ValueError):
    """One client's reply was refused; the message names the client and the reason."""

    def __init__(self, client_id: str, reason: str) -> None:
        super().__init__(f"client {client_id!r}: {reason}")
        self.client_id = client_id
        self.reason = reason


@dataclass
class RoundRecord:
    """One round's outcome; one row of ``reports/rounds.csv``."""

    round: int
    train_loss: float  # NaN: not released (the sites trained with DP-SGD)
    test_loss: float  # NaN (with accuracy, AUC): not evaluated this round
    accuracy: float
    auc: float
    balanced_accuracy: float  # at probability 0.5, like accuracy
    bytes_uploaded: int
    bytes_downloaded: int
    bytes_uploaded_uncompressed: int
    bytes_downloaded_uncompressed: int
    clients_ok: int
    failed_clients: list[str] = field(default_factory=list)
    # why each failed client failed (its first reason this round)
    failure_reasons: dict[str, str] = field(default_factory=dict)
    flagged_clients: list[str] = field(default_factory=list)
    rejected_clients: list[str] = field(default_factory=list)
    excluded_clients: list[str] = field(default_factory=list)
    client_accuracy: dict[str, float] = field(default_factory=dict)
    # the merged (noisy) evaluation histogram [2, bins] as released, and the sites whose
    # evaluation it holds (empty: not evaluated this round); the gate's confidence bounds and
    # counts are post-processing of it (fl_core.audit.bounds)
    evaluation_histogram: list[list[float]] = field(default_factory=list)
    evaluated_clients: list[str] = field(default_factory=list)
    epsilon: float | None = None  # DP-SGD: the largest ε any client has reported so far
    seconds: float = 0.0
    # the sites whose updates the aggregate is made of (what the round log calls participants)
    aggregated_clients: list[str] = field(default_factory=list)
    # SHA-256 (hex) of the new global parameters' bytes (see :func:`params_sha256`): the round
    # log pins each round's model to it
    aggregate_sha256: str = ""
    # each client's anomaly reputation after the round (r ← λ·r + flagged; excluded at
    # anomaly.exclude_at); empty while detection is off or has too few updates
    reputation: dict[str, float] = field(default_factory=dict)


RoundSink = Callable[[RoundRecord], None]  # per-round output: progress, MLflow, Prometheus


def params_sha256(params: torch.Tensor) -> str:
    """SHA-256 (hex) of a parameter vector's raw bytes (its dtype, native byte order): one
    hash over one buffer, no per-parameter work. The saved model's ``params`` hash the same,
    so the round log's last aggregate can be checked against ``model.pt``."""
    return sha256_hex(params.detach().cpu().contiguous().numpy().tobytes())


@dataclass
class TrainingResult:
    params: torch.Tensor
    history: list[RoundRecord]
    failures: list[ClientUpdateError]
    site_epsilon: dict[str, float] = field(default_factory=dict)  # last ε each site reported
    site_dp_steps: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class Defense:
    """What the server does between decoding updates and applying their aggregate.

    In order: reject updates with an absurd norm (``max_norm_factor`` × the round's median;
    0 = off); flag outliers and keep reputations (``detect_anomalies``); drop clients whose
    reputation excludes them; an optional ``pre_aggregation`` step (nearest-neighbour mixing,
    bucketing); then ``aggregator(updates, weights, previous_aggregate)``.

    ``Defense()`` is the bare server (FedAvg, no detection); the thresholds it keeps default to
    the config model's ``anomaly.*`` and ``aggregation.max_norm_factor``, their one place.
    """

    aggregator: Aggregator | None = None
    pre_aggregation: Callable[[torch.Tensor], torch.Tensor] | None = None
    detect: bool = False
    detect_min_clients: int = AnomalyConfig.model_fields["min_clients"].default
    z_threshold: float = AnomalyConfig.model_fields["z_threshold"].default
    reputation: Reputation = field(default_factory=Reputation)
    max_norm_factor: float = AggregationConfig.model_fields["max_norm_factor"].default

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor,
                  previous: torch.Tensor | None) -> AggregationResult:
        if self.pre_aggregation is not None:
            # mixed rows no longer belong to one client: weigh them equally
            updates, weights = self.pre_aggregation(updates), None
        if self.aggregator is None:
            return fedavg(updates, weights)
        return self.aggregator(updates, weights, previous)


@dataclass(frozen=True, kw_only=True)
class FederationSettings:
    """How the coordinator runs rounds (``federation.*`` and the round-level config, read by
    :func:`fl_core.federation.wiring.federation_settings`; no default of its own)."""

    rounds: int
    local_epochs: int
    min_clients: int
    round_timeout_s: float
    client_fraction: float
    run_id: str = "simulation"
    # evaluate (a release charged to the test patients) every k-th round and the last; 0: last
    evaluate_every: int = 1


@dataclass
class _Round:
    """One round's working state, filled in step by step."""

    index: int
    started: float
    participants: list[str]
    failures: list[ClientUpdateError] = field(default_factory=list)
    replies: list[FitReply] = field(default_factory=list)
    updates: torch.Tensor | None = None
    bytes_up: int = 0
    received: int = 0

    def fail(self, site: str, reason: str) -> None:
        self.failures.append(ClientUpdateError(site, reason))


def _reply_or_reason(site: str, raw: object, expected: type, round_idx: int) -> object:
    """The decoded, checked reply of ``site``, or the reason it is refused (a str)."""
    if isinstance(raw, TransportFailure):
        return raw.reason
    try:
        message = decode_message(raw, site=site)  # type: ignore[arg-type]
    except MessageError as exc:
        return f"unreadable reply: {exc.reason}"
    if isinstance(message, Failure):
        return f"site reported failure: {message.reason}"
    if not isinstance(message, expected):
        return f"replied with a {type(message).__name__}, expected a {expected.__name__}"
    if message.round != round_idx:  # type: ignore[attr-defined]
        return f"reply for round {message.round}, expected {round_idx}"  # type: ignore
    return message


def _dispatch_fit(transport: Transport, rnd: _Round, payload: bytes,
                  settings: FederationSettings) -> None:
    request = encode_message(FitInstruction(settings.run_id, rnd.index, payload,
                                            settings.local_epochs))
    answers = transport.exchange({s: request for s in rnd.participants},
                                 settings.round_timeout_s)
    for site, raw in answers.items():
        reply = _reply_or_reason(site, raw, FitReply, rnd.index)
        if isinstance(reply, str):
            rnd.fail(site, f"no update ({reply})")
        else:
            rnd.replies.append(reply)  # type: ignore[arg-type]


def _decode_updates(rnd: _Round, n_params: int) -> None:
    """Decode each update at the model's size; refuse undecodable and non-finite ones."""
    decoded: list[torch.Tensor] = []
    senders: list[FitReply] = []
    for reply in rnd.replies:
        rnd.bytes_up += len(reply.update)
        rnd.received += 1
        try:
            decoded.append(decode_payload(reply.update, n_params))
            senders.append(reply)
        except PayloadError as exc:
            rnd.fail(reply.site, f"undecodable payload: {exc}")
    kept, reasons = sanitize(decoded, n_params, max_norm_factor=0)
    for i, reason in reasons.items():
        rnd.fail(senders[i].site, reason)
    rnd.replies = [senders[i] for i in kept]
    rnd.updates = torch.stack([decoded[i] for i in kept]) if kept else torch.zeros(0, n_params)


@dataclass(frozen=True)
class _Defended:
    kept: list[int]
    rejected: list[str]
    flagged: list[str]
    excluded: list[str]
    reputation: dict[str, float] = field(default_factory=dict)


def _defend(rnd: _Round, defense: Defense, n_params: int) -> _Defended:
    """Absurd norms, anomalies and reputation: who is rejected, flagged, excluded."""
    assert rnd.updates is not None
    ids = [r.site for r in rnd.replies]
    kept, reasons = sanitize(list(rnd.updates), n_params, defense.max_norm_factor)
    rejected = [ids[i] for i in sorted(reasons)]
    flagged: list[str] = []
    if defense.detect and len(kept) >= defense.detect_min_clients:
        report = detect_anomalies(rnd.updates[kept], defense.z_threshold)
        flagged = [ids[kept[i]] for i in report.flagged]
        defense.reputation.update([ids[i] for i in kept], set(flagged))
        kept = [i for i in kept if not defense.reputation.excluded(ids[i])]
    excluded = [ids[i] for i in range(len(ids)) if ids[i] not in rejected and i not in kept]
    return _Defended(kept, rejected, flagged, excluded, dict(defense.reputation.scores))


def _check_enough(rnd: _Round, defended: _Defended, min_clients: int) -> None:
    if len(defended.kept) >= min_clients:
        return
    lost = [str(f) for f in rnd.failures]
    lost += [f"{cid}: rejected" for cid in defended.rejected]
    lost += [f"{cid}: excluded by reputation" for cid in defended.excluded]
    raise RoundFailedError(
        f"round {rnd.index}: {len(defended.kept)} usable update(s) from "
        f"{len(rnd.participants)} client(s) asked, min_clients={min_clients}"
        + (f" ({'; '.join(lost)})" if lost else ""))


@dataclass(frozen=True)
class PooledEvaluation:
    """One round's evaluation over the sites' test splits (NaN figures when none answered)."""

    loss: float
    accuracy: float
    auc: float
    balanced_accuracy: float
    per_site: dict[str, float]  # each site's accuracy
    failures: list[ClientUpdateError]  # the sites whose evaluation failed
    histogram: list[list[float]] = field(default_factory=list)  # merged [2, bins]; [] if none


def evaluate_sites(
    transport: Transport, sites: Sequence[str], params: torch.Tensor, round_idx: int,
    settings: FederationSettings,
) -> PooledEvaluation:
    """Pooled loss, accuracy, AUC and balanced accuracy over the sites' test patients, from
    their noisy histograms; per-site accuracy; and the sites whose evaluation failed (left out
    of the figures).

    Every figure is post-processing of the released histograms, summed raw (noise cancels in
    sums; :func:`fl_core.privacy.release.histogram_figures` clamps totals at 0): AUC from the
    merged histograms (:func:`fl_core.privacy.release.noisy_auc`; patients sharing a bin count
    as ties),
    accuracy and balanced accuracy at probability 0.5 (a bin edge), loss with each patient's
    score at its bin's centre. Counts are patients (each weighs 1), possibly fractional.
    """
    request = encode_message(EvaluateInstruction(settings.run_id, round_idx,
                                                 DenseCodec().encode(params)))
    answers = transport.exchange({s: request for s in sites}, settings.round_timeout_s)
    replies: list[EvaluateReply] = []
    failures: list[ClientUpdateError] = []
    for site, raw in answers.items():
        reply = _reply_or_reason(site, raw, EvaluateReply, round_idx)
        if isinstance(reply, str):
            failures.append(ClientUpdateError(site, f"evaluation failed ({reply})"))
        else:
            replies.append(reply)  # type: ignore[arg-type]
    nan = float("nan")
    if replies:  # histograms of other bins than the first reply's cannot be merged with it
        shape = replies[0].histogram.shape
        failures += [ClientUpdateError(r.site, f"evaluation histogram of {r.histogram.shape[1]}"
                                       f" bins, not {shape[1]}")
                     for r in replies if r.histogram.shape != shape]
        replies = [r for r in replies if r.histogram.shape == shape]
    if not replies:
        return PooledEvaluation(nan, nan, nan, nan, {}, failures)
    merged = torch.stack([r.histogram for r in replies]).sum(0)
    pooled = histogram_figures(merged)
    if pooled.count <= 0:
        return PooledEvaluation(nan, nan, nan, nan, {}, failures)
    per_site = {r.site: r.figures().accuracy for r in replies}
    return PooledEvaluation(
        loss=pooled.loss_sum / pooled.count, accuracy=pooled.accuracy,
        auc=noisy_auc(merged), balanced_accuracy=balanced_accuracy(*pooled.confusion),
        per_site=per_site, failures=failures, histogram=merged.double().tolist())


def evaluates(round_idx: int, settings: FederationSettings) -> bool:
    """Whether round ``round_idx`` evaluates (and so releases): every ``evaluate_every``-th
    round and the last (:func:`fl_core.privacy.release.evaluation_rounds`)."""
    every = settings.evaluate_every
    return round_idx == settings.rounds or (every > 0 and round_idx % every == 0)


def _skipped_evaluation() -> PooledEvaluation:
    nan = float("nan")
    return PooledEvaluation(nan, nan, nan, nan, {}, [])


def _sample(sites: Sequence[str], fraction: float, sampling: RandomSource | None) -> list[str]:
    """Poisson client sampling: each site is asked with probability ``fraction``."""
    if fraction >= 1:
        return list(sites)
    assert sampling is not None  # run_federated refuses a fraction < 1 without randomness
    picked = sampling.uniform(len(sites)) < fraction
    return [s for s, p in zip(sites, picked.tolist(), strict=True) if p]


def run_federated(
    *,
    transport: Transport,
    sites: Sequence[str],
    initial_params: torch.Tensor,
    settings: FederationSettings,
    downlink: TopKQuantizer | None = None,
    sinks: Sequence[RoundSink] = (),
    defense: Defense | None = None,
    attack: Attack | None = None,
    seed: int = 0,
    randomness: RandomSource | None = None,
    first_round: int = 1,
) -> TrainingResult:
    """Run ``settings.rounds`` rounds over ``sites``; FedAvg weighted by patients by default.

    The broadcast is the dense model each round, or with ``downlink`` the dense model once and
    compressed deltas after (:class:`ModelBroadcast`). Byte counts are payload lengths; the
    uncompressed figures are what dense float32 payloads would have been. Evaluation sends the
    dense model, uncounted. ``attack`` (simulation only) rewrites the updates of its malicious
    clients once the round's honest updates are known. ``settings.client_fraction < 1`` asks
    each site with that probability per round (Poisson sampling drawn from ``randomness``,
    which must then be given: the amplification DP-FedAvg claims for it needs a secret source,
    and nothing falls back to a seeded one). ``first_round > 1``
    resumes a run from its round-``first_round − 1`` model (sites restored from their
    ``state_dict``).
    """
    _check_run(settings, sites, downlink)
    defense = defense or Defense()
    broadcast = ModelBroadcast(downlink)
    generator = torch.Generator().manual_seed(seed)  # simulated attacks only
    if settings.client_fraction < 1 and randomness is None:  # no seeded default (issue 24)
        raise ValueError("client sampling at client_fraction < 1 needs its randomness given "
                         "(secure for a promotable run): no seeded default")
    sampling = None if randomness is None else randomness.stream("client-sampling")
    params = initial_params.detach().clone().to(torch.float32)
    n_params = params.numel()
    result = TrainingResult(params, [], [])
    previous: torch.Tensor | None = None
    for round_idx in range(first_round, settings.rounds + 1):
        rnd = _Round(round_idx, time.perf_counter(),
                     _sample(sites, settings.client_fraction, sampling))
        payload = broadcast.payload(params)
        _dispatch_fit(transport, rnd, payload, settings)
        _decode_updates(rnd, n_params)
        if attack is not None:
            _attack(rnd, attack, generator)
        assert rnd.updates is not None
        defended = _defend(rnd, defense, n_params)
        _check_enough(rnd, defended, settings.min_clients)
        kept = [rnd.replies[i] for i in defended.kept]
        weights = torch.tensor([float(r.num_patients) for r in kept])
        aggregate = defense.aggregate(rnd.updates[defended.kept], weights, previous).aggregate
        previous, params = aggregate, params + aggregate
        _note_privacy(result, rnd.replies)
        evaluation = (evaluate_sites(transport, sites, params, round_idx, settings)
                      if evaluates(round_idx, settings) else _skipped_evaluation())
        record = _record(rnd, defended, kept, weights, payload, n_params, result, evaluation)
        record.aggregate_sha256 = params_sha256(params)
        result.history.append(record)
        for sink in sinks:
            sink(record)
    result.params = params
    return result


def _check_run(settings: FederationSettings, sites: Sequence[str],
               downlink: TopKQuantizer | None) -> None:
    """Refuse, before any round, a run that could not complete as configured."""
    if settings.client_fraction < 1 and downlink is not None:
        raise ValueError("client sampling with a compressed downlink: a client that sits a "
                         "round out would miss that round's model delta")
    if settings.min_clients > len(sites):
        raise ValueError(f"min_clients={settings.min_clients} but only {len(sites)} clients "
                         f"exist")


def _attack(rnd: _Round, attack: Attack, generator: torch.Generator) -> None:
    """Rewrite the malicious clients' rows of the round's updates (simulation only)."""
    assert rnd.updates is not None
    if rnd.replies:
        rows = [i for i, r in enumerate(rnd.replies) if r.site in attack.malicious]
        rnd.updates = attack.craft(rnd.updates, rows, generator)


def _note_privacy(result: TrainingResult, replies: Sequence[FitReply]) -> None:
    """Each replying site's spent ε (when it reports one) and DP steps so far."""
    for reply in replies:
        if reply.epsilon is not None:
            result.site_epsilon[reply.site] = reply.epsilon
        result.site_dp_steps[reply.site] = reply.dp_steps


def _train_loss(kept: list[FitReply], weights: torch.Tensor) -> float:
    """The patient-weighted mean of the train losses the sites released (NaN: none did; a site
    training with DP-SGD releases none)."""
    released = [(r.train_loss, float(w)) for r, w in zip(kept, weights.tolist(), strict=True)
                if r.train_loss is not None]
    total = sum(w for _, w in released)
    return sum(loss * w for loss, w in released) / total if total > 0 else float("nan")


def _record(
    rnd: _Round, defended: _Defended, kept: list[FitReply], weights: torch.Tensor,
    payload: bytes, n_params: int, result: TrainingResult,
    evaluation: PooledEvaluation,
) -> RoundRecord:
    rnd.failures += evaluation.failures
    result.failures += rnd.failures
    spent = result.site_epsilon.values()
    return RoundRecord(
        round=rnd.index, train_loss=_train_loss(kept, weights),
        test_loss=evaluation.loss, accuracy=evaluation.accuracy, auc=evaluation.auc,
        balanced_accuracy=evaluation.balanced_accuracy,
        bytes_uploaded=rnd.bytes_up,
        bytes_downloaded=len(payload) * len(rnd.participants),
        bytes_uploaded_uncompressed=dense_size(n_params) * rnd.received,
        bytes_downloaded_uncompressed=dense_size(n_params) * len(rnd.participants),
        clients_ok=len(kept),
        failed_clients=list(dict.fromkeys(f.client_id for f in rnd.failures)),  # unique
        failure_reasons={f.client_id: f.reason for f in reversed(rnd.failures)},
        flagged_clients=defended.flagged, rejected_clients=defended.rejected,
        excluded_clients=defended.excluded, client_accuracy=evaluation.per_site,
        reputation=dict(defended.reputation),
        evaluation_histogram=evaluation.histogram, evaluated_clients=sorted(evaluation.per_site),
        epsilon=max(spent) if spent else None,
        seconds=time.perf_counter() - rnd.started,
        aggregated_clients=[r.site for r in kept],
    )
