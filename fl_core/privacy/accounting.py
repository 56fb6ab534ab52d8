"""A training run's privacy accounting as the ledger and the reports see it.

Turns a configuration and a partition into ledger charges (:mod:`fl_core.privacy.ledger`) and the
``privacy`` block of ``train.json``. All DP-SGD clients share one recipe ``(σ, q)`` and differ
at most in their number of steps; a client's patients went through ``steps`` subsampled
Gaussian steps, so the mechanism history of its patients is ``[(σ, q, steps)]``.

What a run releases about its sites' *test* patients (the evaluation's noisy histograms, and
the audit's in sites mode: :mod:`fl_core.privacy.release`) is charged to them as a second
charge of the same run (:func:`statistics_charge`, kind ``statistics``): the ledger holds one
charge per site and run id, and the test patients are other patients than the trained ones.
In sites mode the audit's histograms also release something about the trained patients (the
audit's members): a third charge, :func:`audit_members_charge`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_core.config.model import PipelineConfig
from fl_core.data.tables import Partition
from fl_core.privacy.accountants import (
    epsilon_for_history,
    epsilon_spent,
    local_steps,
    replace_one_epsilon,
)
from fl_core.privacy.dpsgd import DPSGDConfig
from fl_core.privacy.ledger import Charge, Records, SiteCharge
from fl_core.privacy.release import (
    audit_history,
    audit_released,
    statistics_epsilon,
    statistics_history,
)
from fl_core.results import PrivacyReport

KIND_TRAIN = "train"  # the pipeline's train task and `fedpriv stage train`: the same code
KIND_AUDIT_SWEEP = "audit-sweep"
KIND_STATISTICS = "statistics"  # the evaluation (and sites-mode audit) releases
KIND_AUDIT_RELEASE = "audit-release"  # the sites-mode audit's release about its members


def statistics_run_id(run_id: str) -> str:
    """The ledger run id of a run's statistics charge (beside its training charge)."""
    return f"{run_id}-statistics"


def statistics_charge(
    cfg: PipelineConfig, site_of: Mapping[int, str], partition: Partition, run_id: str,
    records: Mapping[int, str],
) -> Charge | None:
    """What a run of ``cfg`` releases about each site's test patients, as a charge: per site,
    its test patients with the history of the evaluation releases (and the audit's in sites
    mode), ``ε`` = :func:`fl_core.privacy.release.statistics_epsilon`. None when the run
    releases nothing about them. ``run_id`` is the run's training charge id."""
    history = statistics_history(cfg)
    if not history:
        return None
    p, epsilon = cfg.privacy, statistics_epsilon(cfg)
    patients: dict[str, set[Records]] = {}
    for split in partition.clients:
        for pid in split.test_ids:
            patients.setdefault(site_of[pid], set()).add(Records(records[pid], int(pid)))
    return Charge(statistics_run_id(run_id), KIND_STATISTICS, dataset_label(cfg), tuple(
        SiteCharge(site, epsilon, p.delta, p.accountant, history, frozenset(patients[site]))
        for site in sorted(patients)))


def audit_members_charge(
    cfg: PipelineConfig, site_of: Mapping[int, str], partition: Partition, run_id: str,
    records: Mapping[int, str],
) -> Charge | None:
    """In sites mode with the audit on, what the audit's noisy histograms release about each
    site's *training* patients (the audit's members), as a third charge of the run (kind
    ``audit-release``, history :func:`fl_core.privacy.release.audit_history`): composed by the
    ledger with their training charge, as :func:`fl_core.privacy.release.run_release_guarantee`
    composes it for the report. None when no audit histogram leaves a site."""
    if not audit_released(cfg):
        return None
    p = cfg.privacy
    history = audit_history(p.audit_noise)
    epsilon = epsilon_for_history(history, p.delta, p.accountant)
    patients: dict[str, set[Records]] = {}
    for split in partition.clients:
        for pid in split.train_ids:
            patients.setdefault(site_of[pid], set()).add(Records(records[pid], int(pid)))
    return Charge(f"{run_id}-audit", KIND_AUDIT_RELEASE, dataset_label(cfg), tuple(
        SiteCharge(site, epsilon, p.delta, p.accountant, history, frozenset(patients[site]))
        for site in sorted(patients)))


def released_charges(
    cfg: PipelineConfig, site_of: Mapping[int, str], partition: Partition, run_id: str,
    records: Mapping[int, str],
) -> list[Charge]:
    """Every charge of a run besides its training one: what its released statistics cost the
    test patients (:func:`statistics_charge`) and, in sites mode, the audit's members
    (:func:`audit_members_charge`); checked and charged with the training charge."""
    released = (statistics_charge(cfg, site_of, partition, run_id, records),
                audit_members_charge(cfg, site_of, partition, run_id, records))
    return [c for c in released if c is not None]


def dataset_label(cfg: PipelineConfig) -> str:
    """How a charge names its data, for display only (the key is the patient): the file's
    name, or the dataset's id for one file per site."""
    return cfg.data.spec.id if cfg.data.site_files else Path(cfg.data.path).name


def site_charges(
    cfg: PipelineConfig, site_of: Mapping[int, str], partition: Partition, sigma: float,
    spent: Mapping[str, tuple[float, int]], records: Mapping[int, str],
) -> tuple[SiteCharge, ...]:
    """Per site, the training patients and what they went through.

    ``records`` maps patient id → the fingerprint of their records
    (:func:`fl_core.data.fingerprint.record_fingerprints`): a patient is charged as
    :class:`Records`, so the account is their records, whatever their id or site is called.

    ``spent`` maps client id → (ε, steps). A site's patients may be spread over clients
    (``data.partition=by_patient``): the site's history is ``[(σ, q, max steps)]`` and its ε
    the largest client ε, a bound for every patient of the site (more steps never cost
    less). Clients that took no step charge nothing.
    """
    p = cfg.privacy
    patients: dict[str, set[Records]] = {}
    worst: dict[str, tuple[float, int]] = {}
    for split in partition.clients:
        eps, steps = spent.get(split.client_id, (0.0, 0))
        if steps <= 0:
            continue
        for pid in split.train_ids:
            site = site_of[pid]
            patients.setdefault(site, set()).add(Records(records[pid], int(pid)))
            old_eps, old_steps = worst.get(site, (0.0, 0))
            worst[site] = (max(old_eps, eps), max(old_steps, steps))
    return tuple(
        SiteCharge(site, worst[site][0], p.delta, p.accountant,
                   ((sigma, p.sample_rate, worst[site][1]),), frozenset(patients[site]))
        for site in sorted(patients))


def planned_charge(
    cfg: PipelineConfig, site_of: Mapping[int, str], partition: Partition, sigma: float,
    run_id: str, kind: str, records: Mapping[int, str],
) -> Charge:
    """What a run of ``cfg`` will charge if every client takes its planned steps at ``σ``."""
    p = cfg.privacy
    steps = local_steps(cfg.rounds, cfg.local_epochs, p.sample_rate)
    spent = {c.client_id: (p.epsilon, steps) for c in partition.clients}
    return Charge(run_id, kind, dataset_label(cfg),
                  site_charges(cfg, site_of, partition, sigma, spent, records))


def spent_charge(
    cfg: PipelineConfig, site_of: Mapping[int, str], partition: Partition, dp: DPSGDConfig,
    spent: Mapping[str, tuple[float, int]], run_id: str, kind: str, records: Mapping[int, str],
) -> Charge:
    """What a finished run actually spent: each client's reported ε and steps
    (:func:`client_spending`)."""
    return Charge(run_id, kind, dataset_label(cfg),
                  site_charges(cfg, site_of, partition, dp.noise_multiplier, spent, records))


def privacy_summary(
    cfg: PipelineConfig, charge: Charge | None, spent: Mapping[str, tuple[float, int]],
    dp: DPSGDConfig | None, model_fixes: Sequence[str], rounds: int,
) -> PrivacyReport:
    """What the run spent: per client, per site, and the model's (ε, δ) per patient.

    The model's ε is the largest client ε: patients live at one client, so by parallel
    composition ``max_c ε_c`` bounds any one patient's exposure in this run.
    """
    p = cfg.privacy
    server: dict[str, Any] = {}
    if p.server.enabled:
        server = {"client_level_epsilon": epsilon_spent(
                      p.server.noise_multiplier, cfg.client_fraction, rounds, p.delta,
                      p.accountant),
                  "client_rate": cfg.client_fraction,
                  "server_noise_multiplier": p.server.noise_multiplier,
                  "server_clip_norm": p.server.clip_norm}
    if dp is None:
        return PrivacyReport(enabled=p.enabled, randomness=p.randomness, **server)
    client_epsilon = {c: eps for c, (eps, _) in spent.items()}
    replace_eps, replace_delta = replace_one_epsilon(
        dp.noise_multiplier, p.sample_rate, max((n for _, n in spent.values()), default=0),
        p.delta, p.accountant)
    return PrivacyReport(
        enabled=p.enabled, randomness=p.randomness, **server,
        epsilon=max(client_epsilon.values(), default=0.0),
        statistics_epsilon=statistics_epsilon(cfg),
        epsilon_replace_one=replace_eps, delta_replace_one=replace_delta, delta=p.delta,
        target_epsilon=p.epsilon, lifetime_epsilon=p.lifetime_epsilon,
        accountant=p.accountant, noise_multiplier=dp.noise_multiplier,
        sample_rate=p.sample_rate, max_grad_norm=p.max_grad_norm,
        grad_sample_mode=p.grad_sample_mode,
        steps_planned=local_steps(cfg.rounds, cfg.local_epochs, p.sample_rate),
        client_steps={c: n for c, (_, n) in spent.items()}, client_epsilon=client_epsilon,
        site_epsilon={s.site: s.epsilon for s in charge.sites} if charge else {},
        site_patients={s.site: len(s.patients) for s in charge.sites} if charge else {},
        ledger_run_id=charge.run_id if charge else None, dataset=dataset_label(cfg),
        model_fixes=list(model_fixes))


def describe_privacy(privacy: PrivacyReport) -> str:
    """One line for the log: the guarantee the trained model carries."""
    parts = []
    if privacy.epsilon is not None:
        parts.append(
            f"patient-level DP-SGD: (ε={privacy.epsilon:.3f}, δ={privacy.delta:g}) per "
            f"patient, add/remove one patient (replace-one: ε={privacy.epsilon_replace_one:.3f}"
            f", δ={privacy.delta_replace_one:.2g}) "
            f"[{privacy.accountant}, σ={privacy.noise_multiplier:.3f}, "
            f"q={privacy.sample_rate:g}, C={privacy.max_grad_norm:g}, "
            f"{privacy.steps_planned} steps per client; noise {privacy.randomness}]")
        if privacy.statistics_epsilon is not None:
            parts.append(f"released statistics (noisy evaluation histograms): "
                         f"ε={privacy.statistics_epsilon:.3f} per test patient")
        if privacy.randomness != "secure":
            parts.append("REPRODUCIBLE NOISE: anyone with params.yaml can regenerate it; "
                         "this model can never be champion")
        if privacy.ledger_run_id:
            parts.append(f"ledger charged (run {privacy.ledger_run_id})")
        if privacy.model_fixes:
            parts.append("model fixed for Opacus: " + "; ".join(privacy.model_fixes))
    if privacy.client_level_epsilon is not None:
        parts.append(f"client-level DP-FedAvg: ε={privacy.client_level_epsilon:.3f}")
    return "; ".join(parts) if parts else "NOT DIFFERENTIALLY PRIVATE (privacy.enabled=false)"
