"""Stage 4: membership-inference audit of the trained model; writes the report and ROC plot.

Who is who:

* **members**: the target's training patients; as many are drawn at random as there are
  non-members, so the evaluation is balanced. The unit is the patient everywhere: a patient
  with several records is one member (scored on their first record), and all their records
  are in or out of a shadow's training half together;
* **non-members**: the held-out test patients of every client;
* **population** (what the shadows train on, never the target's members): the non-members
  plus the patients ``data.drop_incomplete`` kept out of training (missing values filled by
  the target's own declared transform), capped at ``audit.population_size``.

Each of ``audit.shadow_models`` shadows is a federated run with the target's own recipe
(``fl_core.federation.wiring.federate``: same partition scheme, model, rounds, compression,
aggregation and DP-SGD at the same ε) on a random half of the population; with
``audit.online`` the evaluated members join the shadows' pool too, which online LiRA needs.

**Shadow training is not charged to the privacy ledger.** The shadows train on the audit
population (test patients and patients dropped as incomplete; with ``audit.online`` also the
evaluated members), but no shadow model, its parameters or its per-patient scores ever leave
this process: they are built, scored and discarded here. What is released is the audit's
statistics (AUCs, TPRs, the empirical ε lower bound, ROC curves) and those are outside the
stated DP guarantee, which covers the trained model (and everything trained for release) per
training patient. The ledger charges trainings whose outputs are kept: the train stage and
``fedpriv audit-sweep``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.artifacts import Paths, read_training, write_json_atomic
from adapters.metrics import record_audit_report
from adapters.partition import load_client_data
from adapters.plots import roc_plot
from adapters.tables import ClinicalTable
from adapters.train import load_model
from fl_core.audit import ShadowOutputs, balanced_indices, half_splits, membership_audit
from fl_core.audit.federated import merge_audit_replies
from fl_core.audit.membership import AuditResult
from fl_core.codec.dense import DenseCodec
from fl_core.config.model import PipelineConfig
from fl_core.data.partitioning import assign_clients
from fl_core.data.tables import LABEL, ClientData
from fl_core.data.transform import TabularTransform
from fl_core.federation.coordinator import RoundFailedError
from fl_core.federation.messages import (
    AuditInstruction,
    AuditReply,
    Failure,
    MessageError,
    decode_message,
    encode_message,
)
from fl_core.federation.transport import Transport
from fl_core.federation.wiring import build_target_model, federate, make_dpsgd
from fl_core.model.networks import get_flat_params, set_flat_params
from fl_core.results import AuditReport, PrivacyReport

# attack → (FPR, TPR, AUC) of its ROC curve, for the plot
Curves = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(frozen=True)
class AuditPool:
    """Every record the audit touches: features, labels, site, its patient; who is trainable
    by shadows. The unit of membership is the patient (``patient``: each row's patient,
    0..patients−1): a patient's records are all in or all out of a shadow's half, and each
    evaluated patient is scored on one of their records (their first)."""

    x: torch.Tensor
    y: torch.Tensor
    site: list[str]
    trainable: torch.Tensor  # bool per row: may be in a shadow's training half
    eval_index: torch.Tensor  # per evaluated patient, the row it is scored on
    is_member: torch.Tensor  # per evaluated patient
    patient: torch.Tensor | None = None  # int64 per row (None: one row per patient)

    def patient_index(self) -> torch.Tensor:
        return self.patient if self.patient is not None else torch.arange(len(self.y))


def _rows_by_patient(ids: torch.Tensor) -> list[torch.Tensor]:
    """The row indices of each patient of ``ids`` (per row), patients in first-seen order."""
    _, inverse = torch.unique(ids, return_inverse=True)
    order: dict[int, list[int]] = {}
    for row, p in enumerate(inverse.tolist()):
        order.setdefault(p, []).append(row)
    return [torch.tensor(rows) for rows in order.values()]


def audit_pool(cfg: PipelineConfig, root: Path, data: list[ClientData],
               transform: TabularTransform) -> AuditPool:
    """Members (sampled to balance, by patient), non-members and the population, as one pool
    of records grouped by patient."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    loader = ClinicalTable.get(cfg.data, root)
    site_of = loader.site_of_patient()
    x_mem = torch.cat([d.x_train for d in data])
    y_mem = torch.cat([d.y_train for d in data])
    mem_pid = torch.cat([d.patient_ids() for d in data])
    x_out = torch.cat([d.x_test for d in data])
    y_out = torch.cat([d.y_test for d in data])
    out_pid = torch.cat([d.test_patient_ids() for d in data])
    mem_rows, out_rows = _rows_by_patient(mem_pid), _rows_by_patient(out_pid)
    m_idx, o_idx = balanced_indices(len(mem_rows), len(out_rows), g)
    blocks = ([(x_mem, y_mem, mem_pid, None, mem_rows[i]) for i in m_idx.tolist()]
              + [(x_out, y_out, out_pid, None, out_rows[i]) for i in o_idx.tolist()]
              + _incomplete_blocks(cfg, loader, transform, x_mem.shape[1], len(o_idx), g))
    x, y, site, patient_t, first = _stack_blocks(blocks, site_of)
    k = len(m_idx)
    trainable = patient_t >= (0 if cfg.audit.online else k)
    eval_index = torch.tensor(first[: 2 * k], dtype=torch.int64)
    return AuditPool(x, y, site, trainable, eval_index, (torch.arange(2 * k) < k).float(),
                     patient_t)


# One patient of the pool: (features, labels, patient ids, each row's site or None to look it
# up by patient id, the patient's row indices into those tensors).
_Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str] | None, torch.Tensor]


def _incomplete_blocks(cfg: PipelineConfig, loader: ClinicalTable, transform: TabularTransform,
                       n_features: int, n_out: int, g: torch.Generator) -> list[_Block]:
    """The incomplete patients (left out of training: a core feature is missing) as extra
    population, in random order (``g``); with ``audit.population_size`` only as many as fill
    the ``n_out`` non-members up to it."""
    incomplete = loader.incomplete_table
    x_inc = transform.transform(incomplete) if len(incomplete) else torch.zeros(0, n_features)
    y_inc = torch.tensor(incomplete[LABEL].to_numpy(), dtype=torch.float32)
    inc_pid = torch.tensor(incomplete[cfg.data.spec.patient_id].to_numpy(), dtype=torch.int64)
    inc_site = incomplete[cfg.data.spec.site].astype(str).tolist()
    inc_rows = _rows_by_patient(inc_pid) if len(incomplete) else []
    extra = torch.randperm(len(inc_rows), generator=g)
    cap = cfg.audit.population_size
    if cap is not None:  # the non-members stay; the incomplete patients fill up to the cap
        extra = extra[: max(cap - n_out, 0)]
    return [(x_inc, y_inc, inc_pid, inc_site, inc_rows[i]) for i in extra.tolist()]


def _stack_blocks(blocks: list[_Block], site_of: dict[int, str]
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor, list[int]]:
    """The pool's rows patient after patient: features, labels, sites, each row's patient
    (its block's position) and the first row of each patient."""
    xs, ys, site, patient, first = [], [], [], [], []
    count = 0
    for p, (bx, by, bpid, bsite, rows) in enumerate(blocks):
        first.append(count)
        xs.append(bx[rows])
        ys.append(by[rows])
        site += ([bsite[int(r)] for r in rows] if bsite is not None
                 else [site_of[int(bpid[rows[0]])]] * len(rows))
        patient.append(torch.full((len(rows),), p, dtype=torch.int64))
        count += len(rows)
    return torch.cat(xs), torch.cat(ys), site, torch.cat(patient), first


def _shadow_clients(cfg: PipelineConfig, pool: AuditPool, trained: torch.Tensor,
                    g: torch.Generator) -> list[ClientData]:
    """The shadow's federation, partitioned like the target's (:func:`assign_clients`, by
    patient): every pool patient goes to a client with all their records; they train there
    if they are in the shadow's half."""
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
    patient = pool.patient_index()
    n = int(patient.max()) + 1
    _, first = np.unique(patient.numpy(), return_index=True)  # each patient's first row
    label = np.zeros(n, dtype=np.int64)
    np.maximum.at(label, patient.numpy(), pool.y.numpy().astype(np.int64))  # any positive
    groups = assign_clients(np.arange(n), np.asarray(pool.site)[first], label, cfg.data, rng)
    clients = []
    for cid, members in groups.items():
        rows = torch.nonzero(torch.isin(patient, torch.as_tensor(members))).flatten()
        idx = rows[trained[rows]].tolist()
        if len(idx) < 2:  # a site with (almost) no population patients sits this shadow out
            continue
        test = rows[~trained[rows]].tolist() or idx[:1]
        clients.append(ClientData(cid, pool.x[idx], pool.y[idx], pool.x[test], pool.y[test],
                                  tuple(idx), tuple(test), train_patients=patient[idx],
                                  test_patients=patient[test]))
    return clients


def shadow_outputs(cfg: PipelineConfig, pool: AuditPool) -> ShadowOutputs:
    """Train ``audit.shadow_models`` shadows with the target's recipe; their logits on the pool."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    n = cfg.audit.shadow_models
    patient = pool.patient_index()
    trainable = torch.zeros(int(patient.max()) + 1, dtype=torch.bool)
    trainable[patient[pool.trainable]] = True
    by_patient = torch.zeros(n, len(trainable), dtype=torch.bool)
    by_patient[:, trainable] = half_splits(int(trainable.sum()), n, g)
    trained_on = by_patient[:, patient]  # a patient's records are all in or all out
    shadow_cfg = cfg.model_copy(update={
        "attack": cfg.attack.model_copy(update={"kind": "none", "fraction": 0.0})})
    logits = []
    for s in range(n):
        clients = _shadow_clients(cfg, pool, trained_on[s], g)
        # a shadow whose clients are fewer than min_clients still trains
        run_cfg = shadow_cfg.model_copy(update={
            "seed": cfg.seed + 1000 + s, "min_clients": min(cfg.min_clients, len(clients))})
        run = federate(run_cfg, clients, dp=make_dpsgd(cfg=run_cfg, data=clients))
        model, _ = build_target_model(cfg, pool.x.shape[1])
        set_flat_params(model, run.result.params)
        model.eval()
        with torch.no_grad():
            logits.append(model(pool.x))
    return ShadowOutputs(torch.stack(logits), pool.y, trained_on)


def audit_trained(
    cfg: PipelineConfig, root: Path, data: list[ClientData], transform: TabularTransform,
    model: torch.nn.Module, privacy: PrivacyReport,
) -> tuple[AuditReport, Curves]:
    """Audit ``model`` (trained on ``data`` under ``cfg``): the report ``audit.json`` holds,
    with the per-attack ROC curves under ``"curves"``."""
    started = time.perf_counter()
    pool = audit_pool(cfg, root, data, transform)
    population = len(torch.unique(pool.patient_index()[pool.trainable]))
    print(f"audit: {int(pool.is_member.sum())} members vs {int((1 - pool.is_member).sum())} "
          f"non-members (patients); {cfg.audit.shadow_models} shadow models on halves of "
          f"{population} population patients"
          + (" (online LiRA: members included)" if cfg.audit.online else ""), flush=True)
    shadows = shadow_outputs(cfg, pool)
    model.eval()
    with torch.no_grad():
        target_logits = model(pool.x[pool.eval_index])
    delta = float(privacy.delta or cfg.privacy.delta)
    result = membership_audit(target_logits, pool.is_member, pool.eval_index, shadows, delta,
                              cfg.audit.confidence)
    report = _report(cfg, result, privacy, delta, started, members=int(pool.is_member.sum()),
                     non_members=int((1 - pool.is_member).sum()),
                     population=population, online=cfg.audit.online,
                     shadow_models=cfg.audit.shadow_models)
    return report, {r.attack: (r.fpr, r.tpr, r.auc) for r in result.reports}


def _report(cfg: PipelineConfig, result: AuditResult, privacy: PrivacyReport, delta: float,
            started: float, *, members: int, non_members: int, population: int,
            online: bool, shadow_models: int) -> AuditReport:
    """``audit.json``: the worst case over the attacks, checked against the accountant."""
    headline = result.metrics()
    epsilon = privacy.epsilon
    return AuditReport(
        enabled=True, seconds=round(time.perf_counter() - started, 3), **headline,
        attacks=[r.summary() for r in result.reports], members=members,
        non_members=non_members, population=population,
        shadow_models=shadow_models, online=online, delta=delta,
        confidence=cfg.audit.confidence, accountant_epsilon=epsilon,
        privacy_consistent=epsilon is None or headline["empirical_epsilon_lower_bound"] <= epsilon)


def describe_audit(report: AuditReport) -> str:
    lines = [f"  {a['attack']:<15} AUC {a['auc']:.3f}  TPR@1%FPR {a['tpr_at_1pct_fpr']:.3f}  "
             f"TPR@0.1%FPR {a['tpr_at_0_1pct_fpr']:.3f}  advantage {a['advantage']:.3f}  "
             f"ε_lb {a['epsilon_lower_bound']:.3f}" for a in report.attacks]
    epsilon = report.accountant_epsilon
    lines.append(
        f"audit: worst case AUC {report.mia_auc:.3f} ({report.mia_strongest_attack}), "
        f"ε_lb {report.empirical_epsilon_lower_bound:.3f}"
        + (f" vs accountant ε {epsilon:.3f}" if epsilon is not None else "")
        + ("" if report.privacy_consistent
           else "  PRIVACY FAILURE: the attack beats the DP guarantee")
        + f"; {report.seconds:.1f} s")
    return "\n".join(lines)


def audit_model(
    cfg: PipelineConfig, root: str | Path = ".", run_id: str | None = None
) -> AuditReport:
    """Attack the final model with every attack; the worst case is what the gate reads.
    Writes ``audit.json`` and returns it (the flow's summary reads it)."""
    paths = Paths.of(cfg, root, run_id)
    if not cfg.audit.enabled:
        return _disabled(paths)
    data, transform, _ = load_client_data(cfg, paths)
    model, _ = load_model(paths.model)
    privacy = read_training(paths).privacy
    report, curves = audit_trained(cfg, paths.root, data, transform, model, privacy)
    roc_plot(curves, "Membership inference on the target", paths.roc_plot)
    write_json_atomic(paths.audit, report.to_dict())
    print(describe_audit(report))
    record_audit_report(cfg, run_id, report)  # monitoring on only
    return report


def _disabled(paths: Paths) -> AuditReport:
    report = AuditReport(enabled=False, seconds=0.0)
    write_json_atomic(paths.audit, report.to_dict())
    print("audit disabled (audit.enabled=false): MIA metrics stay null; the gate refuses")
    return report


def audit_at_sites(cfg: PipelineConfig, root: str | Path, run_id: str,
                   transport: Transport) -> AuditReport:
    """``federation.mode=sites``: every site attacks the final model on its own patients with
    the loss-threshold attack and returns noisy score histograms only; the coordinator merges
    them (:func:`fl_core.audit.federated.merge_audit_replies`). LiRA (its shadows would train
    on the site's own patients: no bounded sensitivity) and Shokri's attack (pooled
    patient-level features) run in simulation only. Members are every training patient,
    non-members every held-out one (not balanced: the ROC does not need it)."""
    paths = Paths.of(cfg, root, run_id)
    if not cfg.audit.enabled:
        return _disabled(paths)
    started = time.perf_counter()
    model, _ = load_model(paths.model)
    privacy = read_training(paths).privacy
    payload = DenseCodec().encode(get_flat_params(model).detach())
    sites = list(privacy.site_patients or privacy.client_steps)
    requests = {s: encode_message(AuditInstruction(s, -1, payload)) for s in sites}
    print(f"audit at {len(sites)} sites: the loss-threshold attack, no shadow model; noisy "
          f"score histograms only", flush=True)
    replies = []
    for site, answer in transport.exchange(requests, cfg.federation.audit_timeout_s).items():
        try:
            reply = decode_message(answer, site=site, expect=(AuditReply, Failure))
        except MessageError as exc:  # a transport failure (no bytes) says why itself
            reply = Failure(site, -1, getattr(answer, "reason", str(exc)))
        if isinstance(reply, Failure):
            print(f"audit: site {site} gave no audit ({reply.reason})")
            continue
        replies.append(reply)
    if not replies:
        raise RoundFailedError("the audit got no answer from any site: nothing to gate on")
    delta = float(privacy.delta or cfg.privacy.delta)
    result = AuditResult(tuple(merge_audit_replies(replies, delta=delta,
                                                   alpha=1 - cfg.audit.confidence)))
    report = _report(cfg, result, privacy, delta, started,
                     members=sum(r.members for r in replies),
                     non_members=sum(r.non_members for r in replies), population=0,
                     online=False, shadow_models=0)  # the sites train no shadow model
    roc_plot({r.attack: (r.fpr, r.tpr, r.auc) for r in result.reports},
             "Membership inference at the sites (merged histograms)", paths.roc_plot)
    write_json_atomic(paths.audit, report.to_dict())
    print(describe_audit(report))
    record_audit_report(cfg, run_id, report)  # monitoring on only
    return report
