"""Statistics a site releases besides its model updates, through the Gaussian mechanism.

Every number that leaves a site is either covered by differential privacy or declared public
(docs/privacy.md, the guarantee table). The evaluation of the global model on a site's test
patients and the membership audit's scores are released here, as *noisy histograms*:

* each patient contributes total weight 1: a patient with ``r`` records puts ``1/r`` of a
  unit in the bin of each record's score (:func:`patient_weights`), so adding or removing one
  patient moves the histogram by at most 1 in L2 norm, and changing one patient's label (or
  moving their score to another bin) by at most ``√2``;
* every cell gets independent ``N(0, σ²)`` noise drawn from the site's
  :class:`~fl_core.privacy.randomness.RandomSource` (``secure`` in production), never from
  torch's global generator (:func:`gaussian_release`);
* everything the coordinator reports (count, confusion at 0.5, accuracy, AUC, loss) is
  computed *from the noisy histogram* (post-processing: no further privacy cost). Noisy cells
  may be fractional or negative; only the coordinator clamps them, as post-processing.

**Accounting.** One release of a histogram of sensitivity ``Δ`` with noise ``σ`` is the
Gaussian mechanism of noise multiplier ``σ/Δ`` at sample rate 1; ``R`` releases are the
history ``[(σ/Δ, 1.0, R)]`` (the ledger's format, :class:`fl_core.privacy.ledger.SiteCharge`),
composed by the same accountant as training (:func:`evaluation_history`,
:func:`audit_history`, :func:`release_guarantee`). The evaluation touches the site's *test*
patients only (the split is by patient, disjoint from its training patients): they are charged
the evaluation history alone. The audit touches members (training patients) and non-members
(test patients): its history is composed with each group's other history.

**What an attacker can read** (:func:`label_change_mu`, :func:`best_guess_accuracy`): against
the worst-case attacker (who knows every other patient, the model, and the target's features,
hence its score's bin) the ``R`` releases are ``μ``-GDP for a label change with
``μ = √2·√R/σ``; no test of "label 0 or label 1" (equal priors) is right more often than
``Φ(μ/2)``. The same holds for any change that moves one patient's unit between two cells
(e.g. a crafted model that bins patients by age: "age in bin a or in bin b").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fl_core.model.metrics import histogram_auc
from fl_core.privacy.accountants import epsilon_for_history
from fl_core.privacy.randomness import RandomSource

if TYPE_CHECKING:  # the configuration is only read here
    from fl_core.config.model import PipelineConfig

EVALUATION_SENSITIVITY = 1.0  # L2, add/remove one patient: one unit in one row's bins
# a patient's unit is in one bin of each released attack's histogram; sites release the
# loss-threshold attack only (its score depends on the model and that patient alone)
AUDIT_ATTACK_COUNT = 1
AUDIT_SENSITIVITY = math.sqrt(AUDIT_ATTACK_COUNT)  # 1.0
LABEL_CHANGE_FACTOR = math.sqrt(2.0)  # a unit moved between two cells

History = tuple[tuple[float, float, int], ...]


@dataclass(frozen=True)
class EvaluationRelease:
    """How a site releases an evaluation: ``bins`` equal bins of predicted probability per
    label (even, so that 0.5 is a bin edge and the confusion at 0.5 is a function of the
    histogram) and Gaussian noise of standard deviation ``noise`` per cell (0: exact, only
    for a run that is not private)."""

    bins: int = 4
    noise: float = 2.0

    def __post_init__(self) -> None:
        if self.bins < 2 or self.bins % 2:
            raise ValueError(f"evaluation bins={self.bins}: an even number ≥ 2 (0.5 must be "
                             f"a bin edge)")
        if not math.isfinite(self.noise) or self.noise < 0:
            raise ValueError(f"evaluation noise={self.noise}: a finite σ ≥ 0")


def patient_weights(patients: torch.Tensor) -> torch.Tensor:
    """Per record, ``1/r`` with ``r`` the number of records of its patient: every patient
    weighs 1 in total, whatever its number of records."""
    patients = patients.reshape(-1)
    if patients.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, which, counts = torch.unique(patients, return_inverse=True, return_counts=True)
    return 1.0 / counts[which].to(torch.float64)


def unit_bins(values: torch.Tensor, bins: int) -> torch.Tensor:
    """The bin of each value of ``[0, 1]`` among ``bins`` equal bins (1.0 in the last)."""
    values = values.detach().double().reshape(-1)
    if not bool(((values >= 0) & (values <= 1)).all()):  # NaN fails too
        raise ValueError("scores to histogram must lie in [0, 1]")
    return (values * bins).long().clamp(0, bins - 1)


def weighted_histogram(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                       *, n_rows: int, bins: int) -> torch.Tensor:
    """``[n_rows, bins]`` float64: ``weights`` summed by (row, bin of the value in [0, 1])."""
    which = rows.reshape(-1).long() * bins + unit_bins(values, bins)
    out = torch.zeros(n_rows * bins, dtype=torch.float64)
    out.index_add_(0, which, weights.reshape(-1).to(torch.float64))
    return out.view(n_rows, bins)


def gaussian_release(histogram: torch.Tensor, noise: float, random: RandomSource | None
                     ) -> torch.Tensor:
    """``histogram`` + independent ``N(0, noise²)`` per cell, drawn from ``random``
    (float64). ``noise == 0`` is the exact histogram (a run that is not private)."""
    histogram = histogram.to(torch.float64)
    if noise == 0:
        return histogram.clone()
    if random is None:
        raise ValueError("a noisy release needs its randomness given (secure in production)")
    return histogram + random.normal(tuple(histogram.shape), noise, dtype=torch.float64)


def evaluation_histogram(logits: torch.Tensor, labels: torch.Tensor, patients: torch.Tensor,
                         release: EvaluationRelease, random: RandomSource | None
                         ) -> torch.Tensor:
    """The site's evaluation release: ``[2, bins]`` (row 0: label 0, row 1: label 1) of
    patient weights by predicted probability, plus Gaussian noise."""
    logits, labels = logits.detach().reshape(-1).double(), labels.detach().reshape(-1)
    if not (logits.numel() == labels.numel() == patients.reshape(-1).numel()):
        raise ValueError(f"{logits.numel()} scores, {labels.numel()} labels and "
                         f"{patients.numel()} patient ids: one each per record")
    exact = weighted_histogram(torch.sigmoid(logits), (labels > 0.5).long(),
                               patient_weights(patients), n_rows=2, bins=release.bins)
    return gaussian_release(exact, release.noise, random)


# --- what the coordinator computes from a (noisy) histogram: post-processing -----------------


@dataclass(frozen=True)
class HistogramFigures:
    """Evaluation figures of a (noisy) ``[2, bins]`` histogram: patients, confusion at 0.5
    (tp, fp, tn, fn), accuracy and the cross-entropy sum with scores at the bin centres."""

    count: float
    confusion: tuple[float, float, float, float]
    accuracy: float
    loss_sum: float


def clamp_counts(histogram: torch.Tensor) -> torch.Tensor:
    """Noisy counts shown as counts: negative cells to 0 (post-processing)."""
    return histogram.to(torch.float64).clamp(min=0)


def histogram_figures(histogram: torch.Tensor) -> HistogramFigures:
    """Count, confusion at probability 0.5 (bin ``bins // 2`` onwards predicts 1; 0.5 is its
    lower edge when ``bins`` is even), accuracy and the cross-entropy sum, each patient's
    score taken at its bin's centre.

    Sums over the noisy cells are taken first and clamped at 0 after (clamping each cell
    first would add the positive part of every empty cell's noise: a bias that grows with the
    number of bins); the sums are unbiased, the clamp only bites on tiny populations.
    """
    h = histogram.to(torch.float64)
    neg, pos = h[0], h[1]
    bins = int(h.shape[1])
    half = bins // 2
    tp, fn = max(float(pos[half:].sum()), 0.0), max(float(pos[:half].sum()), 0.0)
    fp, tn = max(float(neg[half:].sum()), 0.0), max(float(neg[:half].sum()), 0.0)
    count = tp + fp + tn + fn
    centre = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    loss_sum = max(float((pos * -torch.log(centre)).sum()
                         + (neg * -torch.log1p(-centre)).sum()), 0.0)
    accuracy = (tp + tn) / count if count > 0 else float("nan")
    return HistogramFigures(count, (tp, fp, tn, fn), accuracy, loss_sum)


def noisy_auc(histogram: torch.Tensor) -> float:
    """The Mann–Whitney AUC of a noisy ``[2, bins]`` histogram (row 0 negatives, row 1
    positives), clipped to ``[0, 1]``: the statistic is bilinear in the two rows, whose noises
    are independent and centred, so its numerator is unbiased on the raw cells (clamping cells
    first would pull it towards ½)."""
    auc = histogram_auc(histogram.to(torch.float64))
    return auc if math.isnan(auc) else min(max(auc, 0.0), 1.0)


# --- accounting -------------------------------------------------------------------------------


def evaluation_history(noise: float, releases: int) -> History:
    """The test patients' history for ``releases`` evaluations at noise ``noise``."""
    if releases <= 0:
        return ()
    if noise <= 0:
        raise ValueError("an exact evaluation (noise 0) has no finite privacy cost")
    return ((noise / EVALUATION_SENSITIVITY, 1.0, releases),)


def audit_history(noise: float, releases: int = 1) -> History:
    """The audited patients' history for ``releases`` audit replies at noise ``noise`` (a
    patient's unit sits in one bin of the loss-threshold histogram: sensitivity 1)."""
    if releases <= 0:
        return ()
    if noise <= 0:
        raise ValueError("an exact audit release (noise 0) has no finite privacy cost")
    return ((noise / AUDIT_SENSITIVITY, 1.0, releases),)


def evaluation_rounds(rounds: int, every: int) -> list[int]:
    """The rounds whose model is evaluated (and released): every ``every``-th round and the
    last; ``every == 0``: the last only."""
    if rounds <= 0:
        return []
    picked = set(range(every, rounds + 1, every)) if every > 0 else set()
    return sorted(picked | {rounds})


@dataclass(frozen=True)
class ReleaseGuarantee:
    """A run's per-patient ε once its statistics are counted (δ is the run's).

    ``evaluation_epsilon``: the test patients' (evaluation + audit release);
    ``training_epsilon``: the training patients' DP-SGD alone; ``member_epsilon``: the
    training patients' DP-SGD composed with the audit release; ``epsilon``: the largest.
    """

    evaluation_epsilon: float
    training_epsilon: float
    member_epsilon: float
    epsilon: float
    evaluation_history: History
    audit_history: History


def release_guarantee(*, training: History, evaluation_noise: float, evaluations: int,
                      audit_noise: float | None, delta: float, accountant: str
                      ) -> ReleaseGuarantee:
    """Per-patient ε of a run whose training patients went through ``training`` (the DP-SGD
    history), whose test patients' evaluation was released ``evaluations`` times at
    ``evaluation_noise``, and (``audit_noise`` not None) whose audit histograms were released
    once at ``audit_noise`` (members and non-members alike)."""
    evaluation = evaluation_history(evaluation_noise, evaluations)
    audit = audit_history(audit_noise) if audit_noise is not None else ()
    test_eps = epsilon_for_history(evaluation + audit, delta, accountant)
    train_eps = epsilon_for_history(training, delta, accountant)
    member_eps = epsilon_for_history(training + audit, delta, accountant)
    return ReleaseGuarantee(test_eps, train_eps, member_eps, max(test_eps, member_eps),
                            evaluation, audit)


def audit_released(cfg: PipelineConfig) -> bool:
    """Whether a run of ``cfg`` releases audit histograms from the sites (sites mode with the
    audit on; in simulation the audit runs where the data already is)."""
    return cfg.audit.enabled and cfg.federation.mode == "sites"


def evaluations_of(cfg: PipelineConfig) -> int:
    """How many evaluation releases a run of ``cfg`` makes (``privacy.evaluation_every``)."""
    return len(evaluation_rounds(cfg.rounds, cfg.privacy.evaluation_every))


def statistics_history(cfg: PipelineConfig) -> History:
    """A site's test patients' history in a run of ``cfg``: the evaluation releases and, in
    sites mode with the audit, the audit release (each non-member is in it)."""
    p = cfg.privacy
    audit = audit_history(p.audit_noise) if audit_released(cfg) else ()
    return evaluation_history(p.evaluation_noise, evaluations_of(cfg)) + audit


def statistics_epsilon(cfg: PipelineConfig) -> float:
    """ε of what a run of ``cfg`` releases about a site's test patients (∞ when a statistic
    is released exact), at the run's δ and accountant: what ``policy.max_statistics_epsilon``
    bounds."""
    p = cfg.privacy
    if p.evaluation_noise <= 0 or (audit_released(cfg) and p.audit_noise <= 0):
        return math.inf
    return epsilon_for_history(statistics_history(cfg), p.delta, p.accountant)


def run_release_guarantee(cfg: PipelineConfig, training: History) -> ReleaseGuarantee:
    """The per-patient guarantee of a run of ``cfg`` whose training patients went through
    ``training`` (the DP-SGD history the ledger charges): evaluation and audit releases
    included (:func:`release_guarantee`)."""
    p = cfg.privacy
    return release_guarantee(
        training=training, evaluation_noise=p.evaluation_noise, evaluations=evaluations_of(cfg),
        audit_noise=p.audit_noise if audit_released(cfg) else None, delta=p.delta,
        accountant=p.accountant)


def label_change_mu(noise: float, releases: int) -> float:
    """GDP ``μ`` of ``releases`` noisy histograms for a change that moves one patient's unit
    between two cells (a label change; a crafted model's bin): ``√2·√R/σ``."""
    if noise <= 0:
        return math.inf
    return LABEL_CHANGE_FACTOR * math.sqrt(releases) / noise


def best_guess_accuracy(mu: float) -> float:
    """The highest probability with which any attacker tells two ``μ``-GDP neighbours apart
    (equal priors): ``Φ(μ/2)``."""
    if math.isinf(mu):
        return 1.0
    return 0.5 * (1.0 + math.erf(mu / 2.0 / math.sqrt(2.0)))
