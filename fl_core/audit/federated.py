"""The membership audit in sites mode: the attacks run at each site, only histograms leave.

In sites mode each hospital's process holds only its own patients, and the coordinator may
receive aggregates only. So the audit is split:

* **at the site** (:func:`site_attack_scores`, :func:`site_audit_reply`): the final model's
  loss-threshold score for each of the site's *members* (its training patients) and
  *non-members* (its held-out test patients), one score per patient; then, per population, a
  histogram of the score mapped to ``[0, 1]`` (:class:`~fl_core.federation.messages.AuditReply`,
  ``audit.bins`` bins, one unit per patient), released with Gaussian noise per cell
  (``privacy.audit_noise``, from the site's own randomness; :mod:`fl_core.privacy.release`
  accounts it). No exact count, score, label or patient id leaves.
* **at the coordinator** (:func:`merge_audit_replies`): the sites' histograms summed, and the
  attack's figures of :class:`~fl_core.audit.report.AttackReport` computed from the merged
  counts: AUC (Mann–Whitney, a member and a non-member in the same bin count ½), the ROC at
  every occupied bin edge, TPR at 1 % and 0.1 % FPR, advantage, best balanced accuracy and
  the Clopper–Pearson ε lower bound (:func:`~fl_core.audit.bounds.epsilon_lower_bound_from_counts`,
  which needs only the error counts at each threshold). With noise the counts are estimates:
  the ε lower bound is then a figure of the noisy ROC, not a Clopper–Pearson guarantee
  (docs/privacy.md states what the audit release costs and what it still shows).

**Only the loss-threshold attack is released** (:data:`SITE_ATTACKS`): a patient's score
depends on the final model and that patient's own records only, so adding or removing a
patient moves one unit of the histogram (sensitivity 1, :mod:`fl_core.privacy.release`).
Site-local LiRA is not run: its shadows would train on the site's own patients, so one patient
would move every other patient's score and the histogram's sensitivity would be unbounded; it
could not be released under DP. No shadow model trains at a site.

**The map to [0, 1]** (fixed and monotone, so binning only merges neighbouring scores): the
score is ``−ℓ`` with ``ℓ`` the patient's mean cross-entropy over their records; mapped to
``u = 1 / (1 + ℓ^¼) = sigmoid(−ln ℓ / 4)``. On the log-loss scale a bin is ``≈ 0.004`` wide at
``ℓ = 1`` and ``≈ 0.1`` at ``ℓ = 10⁻⁸``: a memorised member's tiny loss is still resolved (a map
on ``p_y = e^{−ℓ}`` would put every ``ℓ < 2.4·10⁻⁴`` in the last bin, exactly where low-FPR
attacks live).

The merged histogram of several sites equals the histogram of their pooled scores (binning is
per score), so the coordinator's figures are those of a pooled audit whose scores were
rounded to bins; the AUC differs from the exact one only through member/non-member pairs that
share a bin. Unlike the pooled audit (:mod:`adapters.audit`), members are not subsampled to
balance the non-members: every figure here is a rate within a population, so it needs no
balance, and each site audits all its patients.

**What is not available in sites mode** (:data:`NOT_IN_SITES_MODE`; they stay in the
simulation audit, :mod:`adapters.audit`, which runs where the data already is): online and
offline LiRA, whose shadows would train on the site's own patients (a histogram of their
scores has no bounded sensitivity); Shokri's attack, whose attack model learns "trained on"
from shadows' per-patient features over a pooled population and scores every patient's
features with it (per-patient features may not leave a site).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fl_core.audit.bounds import CONFIDENCE, epsilon_lower_bound_from_counts
from fl_core.audit.report import AttackReport, report_from_roc
from fl_core.audit.shadow import true_class_logit
from fl_core.codec.payload import decode_payload
from fl_core.data.tables import ClientData
from fl_core.federation.messages import (
    AUDIT_ATTACKS,
    AUDIT_BINS,
    AuditInstruction,
    AuditReply,
)
from fl_core.model.networks import get_flat_params, set_flat_params
from fl_core.privacy.randomness import RandomSource
from fl_core.privacy.release import noisy_auc

SITE_ATTACKS = AUDIT_ATTACKS  # what a site computes and releases: ("loss_threshold",)
_LIRA_AT_SITE = ("shadows trained on the site's own patients make every patient's score depend "
                 "on every other patient: its histogram has no bounded sensitivity and cannot "
                 "be released under DP; it runs in simulation only")
NOT_IN_SITES_MODE: dict[str, str] = {
    "lira": "online LiRA: " + _LIRA_AT_SITE,
    "lira_offline": "offline LiRA: " + _LIRA_AT_SITE,
    "shokri_shadow": "Shokri's attack model is trained on shadows' per-patient features over a "
                     "pooled population and applied to every patient's features; in sites mode "
                     "no per-patient feature may leave its site, so it runs in simulation only",
}
LOSS_EXPONENT = 0.25  # loss_threshold: u = 1 / (1 + ℓ^LOSS_EXPONENT)

ModelFactory = Callable[[], nn.Module]
Scores = dict[str, tuple[torch.Tensor, torch.Tensor]]  # attack → (members, non-members)


def check_site_attacks(attacks: Iterable[str]) -> None:
    """Refuse, with the reason, any attack a site cannot run in sites mode."""
    for attack in attacks:
        if attack in NOT_IN_SITES_MODE:
            raise ValueError(f"attack {attack!r} in sites mode: {NOT_IN_SITES_MODE[attack]}")
        if attack not in SITE_ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; sites run {list(SITE_ATTACKS)}")


def loss_to_unit(score: torch.Tensor) -> torch.Tensor:
    """``loss_threshold`` score ``−ℓ`` → ``1 / (1 + ℓ^¼)`` in ``[0, 1]``, increasing."""
    loss = (-score.double()).clamp(min=0)
    return 1.0 / (1.0 + loss.pow(LOSS_EXPONENT))


UNIT_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"loss_threshold": loss_to_unit}


# --- at the site ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SitePool:
    """The site's records, members' then non-members', and each record's patient (0..U−1)."""

    x: torch.Tensor
    y: torch.Tensor
    patient: torch.Tensor  # int64 [records]
    members: int  # patients 0..members−1 are members, the rest non-members
    patients: int


def _site_pool(data: ClientData) -> _SitePool:
    """Group the training rows by patient (``data.patient_ids()``) and the test rows likewise
    (``data.test_patient_ids()``): a patient with several records is one member or one
    non-member."""
    train_ids, test_ids = data.patient_ids(), data.test_patient_ids()
    if data.x_test.shape[0] != test_ids.numel():
        raise ValueError(f"site {data.client_id!r}: {data.x_test.shape[0]} test rows for "
                         f"{test_ids.numel()} test patient ids; non-members cannot be grouped")
    _, member_of_row = torch.unique(train_ids, return_inverse=True)
    _, non_member_of_row = torch.unique(test_ids, return_inverse=True)
    members = int(member_of_row.max()) + 1 if member_of_row.numel() else 0
    non_members = int(non_member_of_row.max()) + 1 if non_member_of_row.numel() else 0
    if members == 0 or non_members == 0:
        raise ValueError(f"site {data.client_id!r}: the audit needs members and non-members "
                         f"({members} and {non_members})")
    patient = torch.cat([member_of_row.reshape(-1), members + non_member_of_row.reshape(-1)])
    return _SitePool(torch.cat([data.x_train, data.x_test]),
                     torch.cat([data.y_train, data.y_test]), patient, members,
                     members + non_members)


def _per_patient_mean(values: torch.Tensor, pool: _SitePool) -> torch.Tensor:
    """``[..., records]`` → ``[..., patients]``: the mean over each patient's records."""
    sums = torch.zeros(*values.shape[:-1], pool.patients, dtype=values.dtype)
    sums.index_add_(-1, pool.patient, values)
    return sums / torch.bincount(pool.patient, minlength=pool.patients).to(values.dtype)


def _phi(model: nn.Module, pool: _SitePool) -> torch.Tensor:
    """Per record, the logit-scaled confidence of the true class (float64)."""
    model.eval()
    with torch.no_grad():
        return true_class_logit(model(pool.x), pool.y)


def site_attack_scores(model_factory: ModelFactory, params: torch.Tensor,
                       data: ClientData) -> Scores:
    """Per-patient attack scores at one site: ``{"loss_threshold": (members, non-members)}``,
    higher meaning "more likely a member". Stays at the site.

    *Members* are the patients of ``data.x_train`` (rows grouped by ``data.patient_ids()``:
    a patient with several records is one member), *non-members* those of ``data.x_test``
    (grouped by ``data.test_patient_ids()``). A patient's score is ``−ℓ``, ``ℓ`` their mean
    cross-entropy over their records under the model ``params`` (built by
    ``model_factory``): it depends on the model and that patient only, which is what bounds
    the released histogram's sensitivity to 1. No shadow model is trained (LiRA is
    simulation-only, :data:`NOT_IN_SITES_MODE`).
    """
    pool = _site_pool(data)
    target = model_factory()
    set_flat_params(target, params)
    loss = _per_patient_mean(nn.functional.softplus(-_phi(target, pool)), pool)
    m = pool.members
    return {"loss_threshold": (-loss[:m], -loss[m:])}


def audit_reply_from_scores(site: str, round_idx: int, scores: Scores, *,
                            bins: int = AUDIT_BINS, noise: float,
                            random: RandomSource | None) -> AuditReply:
    """Map each attack's scores to ``[0, 1]`` (:data:`UNIT_MAPS`), histogram them and add
    ``N(0, noise²)`` per cell from ``random``."""
    check_site_attacks(scores)
    for attack, (members, non_members) in scores.items():
        if not bool(torch.isfinite(members).all() and torch.isfinite(non_members).all()):
            raise ValueError(f"attack {attack!r} produced non-finite scores")
    unit = {a: (UNIT_MAPS[a](m), UNIT_MAPS[a](o)) for a, (m, o) in scores.items()}
    return AuditReply.from_unit_scores(site, round_idx, unit, bins=bins, noise=noise,
                                       random=random)


def site_audit_reply(
    instruction: AuditInstruction, model_factory: ModelFactory, data: ClientData, *,
    bins: int = AUDIT_BINS, noise: float, random: RandomSource | None,
) -> AuditReply:
    """The site's answer to an :class:`AuditInstruction`: :func:`site_attack_scores` on the
    instruction's (dense) model, histogrammed with noise ``noise`` drawn from ``random``.
    Nothing per patient is in it, and no shadow model trains."""
    if instruction.site != data.client_id:
        raise ValueError(f"an audit instruction for site {instruction.site!r} reached site "
                         f"{data.client_id!r}")
    params = decode_payload(instruction.model, get_flat_params(model_factory()).numel())
    scores = site_attack_scores(model_factory, params, data)
    return audit_reply_from_scores(data.client_id, instruction.round, scores, bins=bins,
                                   noise=noise, random=random)


# --- at the coordinator ------------------------------------------------------------------------


def histogram_attack_report(attack: str, histogram: torch.Tensor, *, delta: float,
                            alpha: float = 1 - CONFIDENCE, sizes: tuple[int, int] | None = None,
                            ) -> AttackReport:
    """An attack's report from ``[2, bins]`` counts (row 0: members, row 1: non-members),
    possibly noisy: negative cells count 0, and with ``sizes`` (members, non-members; public
    site sizes) the cumulative counts are clipped to them (post-processing).

    Thresholds are the occupied bins' lower edges ("member if the bin is ≥ b"); the ε lower
    bound holds with confidence ``1 − alpha`` (Bonferroni over those thresholds) when the
    counts are exact.
    """
    members, non_members = histogram.to(torch.float64)
    positives, negatives = sizes or (round(float(members.sum())), round(float(non_members.sum())))
    if positives <= 0 or negatives <= 0:
        raise ValueError(f"attack {attack!r}: the audit needs at least one member and one "
                         f"non-member ({positives} and {negatives})")
    occupied = (members + non_members).flip(0) > 0
    # raw cumulative sums (the noise of a sum is centred), clipped to the populations and made
    # non-decreasing: a ROC again (post-processing)
    true_pos = torch.cummax(torch.cumsum(members.flip(0), 0).clamp(0, positives), 0).values
    false_pos = torch.cummax(torch.cumsum(non_members.flip(0), 0).clamp(0, negatives), 0).values
    true_pos, false_pos = true_pos[occupied], false_pos[occupied]
    zero = torch.zeros(1, dtype=torch.float64)
    return report_from_roc(
        attack, torch.cat([zero, false_pos / negatives]), torch.cat([zero, true_pos / positives]),
        auc=noisy_auc(torch.stack([non_members, members])),
        epsilon_lower_bound=epsilon_lower_bound_from_counts(
            true_pos, false_pos, positives, negatives, delta, 1.0 - alpha),
        members=positives, non_members=negatives)


def merge_histograms(replies: Sequence[AuditReply]) -> torch.Tensor:
    """The sites' histograms summed, ``[attacks, 2, bins]``; refuses replies that cannot be
    merged (none, a site twice, different rounds or bin counts)."""
    if not replies:
        raise ValueError("no audit replies to merge")
    sites = [r.site for r in replies]
    if len(set(sites)) != len(sites):
        raise ValueError(f"audit replies from the same site more than once: {sorted(sites)}")
    if len({r.round for r in replies}) != 1:
        raise ValueError(f"audit replies of different rounds: {[r.round for r in replies]}")
    if len({tuple(r.histograms.shape) for r in replies}) != 1:
        raise ValueError("audit replies with different numbers of bins")
    return torch.stack([r.histograms.to(torch.float64) for r in replies]).sum(0)


def merge_audit_replies(
    replies: Sequence[AuditReply], *, delta: float, alpha: float = 1 - CONFIDENCE,
) -> list[AttackReport]:
    """Per attack of :data:`SITE_ATTACKS`, the report of the sites' merged histograms.

    ``AuditResult(tuple(reports)).metrics()`` (:mod:`fl_core.audit.membership`) gives the
    worst case the gate reads. LiRA and Shokri's attack are not among them
    (:data:`NOT_IN_SITES_MODE`).
    """
    merged = merge_histograms(replies)
    sizes = (sum(r.members for r in replies), sum(r.non_members for r in replies))
    return [histogram_attack_report(attack, merged[i], delta=delta, alpha=alpha, sizes=sizes)
            for i, attack in enumerate(SITE_ATTACKS)]
