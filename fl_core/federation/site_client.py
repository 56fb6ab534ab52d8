"""The site side of a federation: one hospital's client, built from its own data.

A :class:`SiteClient` answers the coordinator's instructions with typed replies
(:mod:`fl_core.federation.messages`); :meth:`SiteClient.handle` is the whole boundary, bytes in
and bytes out, and it never raises: whatever goes wrong at the site becomes a
:class:`~fl_core.federation.messages.Failure` message. The patients' records never leave the
object; what leaves is a codec payload of the model update, the site's size, its DP-SGD ε and
steps, the training loss only when not private, and the evaluation as a noisy histogram
(:mod:`fl_core.privacy.release`, drawn from the site's own randomness).

The client owns the state that must survive between rounds and can save and restore it
(:meth:`SiteClient.state_dict` / :meth:`SiteClient.load_state_dict`): the downlink replica,
the error-feedback residual and momentum, the stochastic-rounding generator and the DP
accountant's history. Model parameters are not state (every round starts from the broadcast)
and per-round randomness is drawn from a stream derived from (client, round), so a site
stopped after round ``k`` and restored continues exactly as if it had not stopped.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from fl_core.codec.dense import DenseCodec
from fl_core.codec.downlink import ModelReplica
from fl_core.codec.error_feedback import UpdateCompressor
from fl_core.codec.framing import check_finite
from fl_core.codec.payload import decode_payload
from fl_core.codec.topk import TopKQuantizer
from fl_core.data.tables import ClientData
from fl_core.federation.messages import (
    EvaluateInstruction,
    EvaluateReply,
    Failure,
    FitInstruction,
    FitReply,
    Message,
    MessageError,
    decode_message,
    encode_message,
)
from fl_core.model.networks import get_flat_params, set_flat_params
from fl_core.privacy.dpsgd import DPSGDConfig, PatientDPTrainer, group_records
from fl_core.privacy.randomness import RandomSource
from fl_core.privacy.release import EvaluationRelease


@dataclass(frozen=True, kw_only=True)
class LocalTrainingConfig:
    """A client's non-private local SGD (the configuration's ``local_epochs``,
    ``batch_size``, ``learning_rate`` and ``seed``; no default of its own)."""

    local_epochs: int
    batch_size: int
    learning_rate: float
    seed: int


def seed_for(seed: int, client_id: str, round_idx: int) -> int:
    """A per-(client, round) seed for non-private minibatch shuffling: stable across
    processes (unlike ``hash()``)."""
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


class SiteClient:
    """One hospital: its data, its model replica, its codec state and its DP accountant.

    With ``privacy`` it trains by patient-level DP-SGD (:class:`PatientDPTrainer`); its DP
    sampling and noise come from ``randomness`` (one stream per client and round): secret OS
    entropy for a promotable run, a seeded generator for a reproducible simulation. A private
    client must be given its randomness: nothing falls back to seeded noise. The evaluation is
    released as ``evaluation`` says (bins, Gaussian noise per cell, drawn from
    ``randomness``); a noisy release needs the randomness too.
    """

    def __init__(
        self,
        *,
        data: ClientData,
        model_factory: Callable[[], nn.Module],
        training: LocalTrainingConfig,
        compressor: UpdateCompressor | None = None,
        privacy: DPSGDConfig | None = None,
        randomness: RandomSource | None = None,
        evaluation: EvaluationRelease | None = None,
    ) -> None:
        self.client_id = data.client_id
        self._data = data
        self._model = model_factory()
        self._training = training
        self._compressor = compressor or UpdateCompressor(DenseCodec(), error_feedback=False)
        self._replica = ModelReplica(get_flat_params(self._model).numel())
        if privacy is not None and randomness is None:
            raise ValueError("a DP-SGD site client needs its randomness given (secure for a "
                             "promotable run): no seeded default")
        self._evaluation = evaluation or EvaluationRelease()
        if self._evaluation.noise > 0 and randomness is None:
            raise ValueError("a site client releasing a noisy evaluation needs its randomness "
                             "given (secure for a promotable run): no seeded default")
        self._randomness = randomness
        self._num_patients = int(data.patient_ids().unique().numel())
        self._busy = threading.Lock()  # a straggler still training refuses the next request
        self._dp: PatientDPTrainer | None = None
        if privacy is not None:  # the factory's model must be one Opacus accepts (check_model)
            patients = group_records(data.x_train, data.y_train, data.patient_ids())
            self._dp = PatientDPTrainer(model=self._model, data=patients, cfg=privacy)

    @property
    def dp_trainer(self) -> PatientDPTrainer | None:
        """The client's DP-SGD trainer (None when not private): the DP audit's canaries hook
        into it (:attr:`PatientDPTrainer.per_patient_hook`)."""
        return self._dp

    # --- the boundary -------------------------------------------------------------------------

    def handle(self, request: bytes) -> bytes:
        """Decode an instruction, act on it, encode the reply; failures become messages."""
        if not self._busy.acquire(blocking=False):
            return encode_message(Failure(self.client_id, -1, "busy with an earlier request"))
        try:
            instruction = decode_message(request, expect=(FitInstruction, EvaluateInstruction))
            return encode_message(self.answer(instruction))
        except Exception as exc:  # the coordinator gets a message, never a traceback
            round_idx = getattr(locals().get("instruction"), "round", -1)
            return encode_message(Failure(self.client_id, round_idx,
                                          f"{type(exc).__name__}: {exc}"))
        finally:
            self._busy.release()

    def answer(self, instruction: Message) -> Message:
        if isinstance(instruction, FitInstruction):
            return self.fit(instruction)
        if isinstance(instruction, EvaluateInstruction):
            return self.evaluate(instruction)
        raise MessageError(f"cannot answer a {type(instruction).__name__}", self.client_id)

    # --- what the site does ---------------------------------------------------------------------

    def fit(self, instruction: FitInstruction) -> FitReply:
        """Train from the broadcast model; reply with the encoded update (local − global)."""
        round_idx = instruction.round
        global_params = self._replica.apply(instruction.model)
        set_flat_params(self._model, global_params)
        if self._dp is not None:
            assert self._randomness is not None  # checked with privacy in __init__
            random = self._randomness.stream("dp-sgd", self.client_id, round_idx)
            loss = self._dp.train(instruction.local_epochs, random)
        else:  # not private: the minibatch order needs no secrecy
            seed = seed_for(self._training.seed, self.client_id, round_idx)
            training = replace(self._training, local_epochs=instruction.local_epochs)
            loss = train_local(self._model, self._data.x_train, self._data.y_train,
                               training, seed)
        delta = get_flat_params(self._model) - global_params
        check_finite(delta, f"update of client {self.client_id!r}")
        return FitReply(
            site=self.client_id, round=round_idx,
            update=self._compressor.compress(delta, round_idx),
            num_patients=self._num_patients,
            # with DP-SGD the exact loss would be an unaccounted release: not sent
            train_loss=None if self._dp is not None else float(loss),
            epsilon=None if self._dp is None else self._dp.epsilon(),
            dp_steps=0 if self._dp is None else self._dp.steps)

    def evaluate(self, instruction: EvaluateInstruction) -> EvaluateReply:
        """Score the broadcast model on the held-out patients; release a noisy histogram only
        (each patient weighs 1; noise from this client's randomness, one stream per round)."""
        set_flat_params(self._model,
                        decode_payload(instruction.model, self._replica.num_elements))
        self._model.eval()
        with torch.no_grad():
            logits = self._model(self._data.x_test)
        random = None if self._randomness is None else self._randomness.stream(
            "evaluation", self.client_id, instruction.round)
        return EvaluateReply.from_logits(
            self.client_id, instruction.round, logits, self._data.y_test,
            self._data.test_patient_ids(), release=self._evaluation, random=random)

    # --- state that must travel -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the site needs to resume: tensors and plain values (no objects)."""
        feedback = self._compressor.feedback
        codec = self._compressor.codec
        return {
            "client_id": self.client_id,
            "replica": self._replica.params,
            "residual": None if feedback is None else feedback.residual,
            "velocity": None if feedback is None else feedback.velocity,
            "rounding_rng": codec.generator_state() if isinstance(codec, TopKQuantizer)
            else None,
            "accountant_history": [] if self._dp is None else self._dp.history(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["client_id"] != self.client_id:
            raise ValueError(f"state of site {state['client_id']!r} loaded into site "
                             f"{self.client_id!r}")
        self._replica.params = state["replica"]
        feedback = self._compressor.feedback
        if feedback is not None:
            feedback.residual, feedback.velocity = state["residual"], state["velocity"]
        codec = self._compressor.codec
        if isinstance(codec, TopKQuantizer) and state["rounding_rng"] is not None:
            codec.set_generator_state(state["rounding_rng"])
        if self._dp is not None:
            self._dp.load_history(state["accountant_history"])
