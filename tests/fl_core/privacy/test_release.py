"""What a site's evaluation release lets an attacker read: no more than its ε allows.

The attacker is the worst case of the DP definition: it knows the model (it may have crafted
it), every other test patient's features and label, and the target's features, hence the bin
of the target's score. From the released statistics it guesses the one thing it does not
know. For ``R`` releases at noise ``σ`` a change that moves the target's unit between two cells
is ``μ``-GDP with ``μ = √2·√R/σ`` and no guess is right more often than ``Φ(μ/2)``
(:func:`fl_core.privacy.release.best_guess_accuracy`); each test checks the attack's success
rate against that bound plus a binomial slack, and checks that the same attack reads the old
exact release (4096 exact bins, version 1 of the protocol) every time, so it can fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fl_core.codec.dense import DenseCodec
from fl_core.data.tables import ClientData
from fl_core.federation.messages import EvaluateInstruction, EvaluateReply
from fl_core.federation.site_client import LocalTrainingConfig, SiteClient
from fl_core.model.networks import get_flat_params
from fl_core.privacy.randomness import SeededRandom
from fl_core.privacy.release import (
    EvaluationRelease,
    audit_history,
    best_guess_accuracy,
    evaluation_history,
    evaluation_rounds,
    histogram_figures,
    label_change_mu,
    noisy_auc,
    patient_weights,
    release_guarantee,
)

TRIALS = 1500
OLD_EXACT = EvaluationRelease(bins=4096, noise=0.0)  # what version 1 released (as weights)
TRAINING = LocalTrainingConfig(local_epochs=1, batch_size=8, learning_rate=0.1, seed=0)
AGE = 0  # the crafted model's only feature


def _slack(p: float, n: int = TRIALS) -> float:
    return 3.0 * math.sqrt(p * (1 - p) / n) + 1.0 / n


def _linear(weights: torch.Tensor, bias: float) -> nn.Module:
    model = nn.Linear(weights.numel(), 1)
    with torch.no_grad():
        model.weight.copy_(weights.view(1, -1))
        model.bias.fill_(bias)
    return model


class _Site:
    """One site's test patients with the target's unknown (``secret``) in one of two states,
    answering evaluations through the real :class:`SiteClient` boundary."""

    def __init__(self, x_test: torch.Tensor, y_test: torch.Tensor, model: nn.Module,
                 release: EvaluationRelease, seed: int) -> None:
        n = x_test.shape[0]
        data = ClientData("A", x_test[:4], y_test[:4], x_test, y_test, tuple(range(4)),
                          tuple(range(100, 100 + n)))
        self.client = SiteClient(data=data, model_factory=lambda: _linear(
            torch.zeros(x_test.shape[1]), 0.0), training=TRAINING,
            randomness=SeededRandom(seed), evaluation=release)
        self.payload = DenseCodec().encode(get_flat_params(model))

    def release(self, round_idx: int) -> torch.Tensor:
        reply = self.client.evaluate(EvaluateInstruction("run", round_idx, self.payload))
        assert isinstance(reply, EvaluateReply)
        return reply.histogram


def _attack(x: torch.Tensor, y_others: torch.Tensor, target_states: list[tuple[torch.Tensor,
            float]], model: nn.Module, release: EvaluationRelease, releases: int
            ) -> float:
    """Success rate of the optimal attacker telling the target's two states apart.

    ``target_states`` are the two (features, label) the target may have; the attacker knows
    everything else: it subtracts the others' exact contribution and compares, summed over the
    ``releases`` rounds, the target's two candidate cells (the likelihood-ratio test of a
    Gaussian mean shift)."""
    sites = []
    for i, (features, label) in enumerate(target_states):
        xs = torch.cat([x, features.view(1, -1)])
        ys = torch.cat([y_others, torch.tensor([label])])
        sites.append(_Site(xs, ys, model, release, seed=17 + i))
    with torch.no_grad():
        others = EvaluateReply.from_logits("A", 0, model(x).view(-1), y_others,
                                           torch.arange(x.shape[0]),
                                           release=EvaluationRelease(release.bins, 0.0),
                                           random=None).histogram
        cells = []
        for features, label in target_states:
            p = float(torch.sigmoid(model(features.view(1, -1))).view(()))
            cells.append((int(label), min(int(p * release.bins), release.bins - 1)))
    assert cells[0] != cells[1], "the two states must differ in the released cells"
    secrets = torch.randint(0, 2, (TRIALS,), generator=torch.Generator().manual_seed(5))
    right = 0
    for trial, secret in enumerate(secrets.tolist()):
        evidence = 0.0
        for r in range(releases):
            h = sites[secret].release(trial * releases + r) - others
            evidence += float(h[cells[1]] - h[cells[0]])
        right += int((evidence > 0) == (secret == 1))
    return right / TRIALS


@pytest.fixture(scope="module")
def patients() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(36, 3, generator=g)
    x[:, AGE] = torch.randint(29, 78, (36,), generator=g).float()
    y = (torch.rand(36, generator=g) < 0.45).float()
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize(("noise", "releases"), [(2.0, 1), (4.0, 3)])
def test_label_recovery_succeeds_no_more_than_the_statistics_epsilon_allows(
    patients: tuple[torch.Tensor, torch.Tensor], noise: float, releases: int,
) -> None:
    x, y = patients
    model = _linear(torch.tensor([0.03, 1.2, -0.7]), -1.5)  # some model the attacker knows
    target = torch.tensor([55.0, 0.3, -0.2])  # its features known: its score's bin known
    states = [(target, 0.0), (target, 1.0)]
    bound = best_guess_accuracy(label_change_mu(noise, releases))
    rate = _attack(x, y, states, model, EvaluationRelease(bins=10, noise=noise), releases)
    assert rate <= bound + _slack(bound), (rate, bound)
    assert rate > 0.5 + (bound - 0.5) / 3  # the attack is a real one: near its bound
    # the same attack on the old exact release reads the label every time
    assert _attack(x, y, states, model, OLD_EXACT, 1) == 1.0


@pytest.mark.slow
def test_a_crafted_model_reads_ages_no_better_than_the_epsilon_allows(
    patients: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """A coordinator sends a model with all its weight on age: each test patient's bin is its
    age band, per label. Whether the target (label known: 1) is 45 or 70 is bounded the same
    way; on the old exact release it is read every time."""
    x, y = patients
    crafted = _linear(torch.tensor([0.2, 0.0, 0.0]), -0.2 * 57.5)  # age → probability
    young, old = torch.tensor([45.0, 0.0, 0.0]), torch.tensor([70.0, 0.0, 0.0])
    states = [(young, 1.0), (old, 1.0)]
    noise, releases = 2.0, 2
    bound = best_guess_accuracy(label_change_mu(noise, releases))
    rate = _attack(x, y, states, crafted, EvaluationRelease(bins=10, noise=noise), releases)
    assert rate <= bound + _slack(bound), (rate, bound)
    assert _attack(x, y, states, crafted, OLD_EXACT, 1) == 1.0
    # coarse bins alone do not protect: without noise the attacker still reads it
    assert _attack(x, y, states, crafted, EvaluationRelease(bins=10, noise=0.0), 1) == 1.0


def test_the_bound_is_the_gaussian_trade_off() -> None:
    assert best_guess_accuracy(0.0) == 0.5
    assert best_guess_accuracy(label_change_mu(0.0, 1)) == 1.0
    mu = label_change_mu(2.0, 4)
    assert mu == pytest.approx(math.sqrt(2) * 2 / 2.0)
    assert best_guess_accuracy(mu) == pytest.approx(0.5 * (1 + math.erf(mu / 2 / math.sqrt(2))))
    assert best_guess_accuracy(label_change_mu(1.0, 10)) > best_guess_accuracy(
        label_change_mu(2.0, 10))


def test_accounting_histories_and_the_composed_guarantee() -> None:
    assert evaluation_history(2.0, 3) == ((2.0, 1.0, 3),)
    assert evaluation_history(2.0, 0) == ()
    # sites release the loss-threshold attack only: one patient, one unit, sensitivity 1
    assert audit_history(2.0) == ((2.0, 1.0, 1),)
    with pytest.raises(ValueError, match="no finite"):
        evaluation_history(0.0, 1)
    training = ((0.8, 1.0, 40),)
    g = release_guarantee(training=training, evaluation_noise=4.0, evaluations=1,
                          audit_noise=2.0, delta=1e-5, accountant="rdp")
    assert 0 < g.training_epsilon < g.member_epsilon <= g.epsilon
    assert g.evaluation_epsilon <= g.epsilon
    more = release_guarantee(training=training, evaluation_noise=4.0, evaluations=20,
                             audit_noise=2.0, delta=1e-5, accountant="rdp")
    assert more.evaluation_epsilon > g.evaluation_epsilon  # each release costs
    quiet = release_guarantee(training=training, evaluation_noise=4.0, evaluations=1,
                              audit_noise=None, delta=1e-5, accountant="rdp")
    assert quiet.member_epsilon == quiet.training_epsilon < g.member_epsilon


def test_evaluation_rounds_follow_the_schedule() -> None:
    assert evaluation_rounds(20, 0) == [20]
    assert evaluation_rounds(20, 5) == [5, 10, 15, 20]
    assert evaluation_rounds(7, 3) == [3, 6, 7]
    assert evaluation_rounds(0, 1) == []


def test_patients_weigh_one_and_noisy_figures_are_post_processed() -> None:
    assert patient_weights(torch.tensor([4, 4, 9, 4])).tolist() == pytest.approx(
        [1 / 3, 1 / 3, 1.0, 1 / 3])
    noisy = torch.tensor([[5.0, -1.5, 2.0, -0.5], [-2.0, 0.5, -1.0, 6.0]], dtype=torch.float64)
    figures = histogram_figures(noisy)
    assert figures.confusion == (5.0, 1.5, 3.5, 0.0)  # sums of cells, then clamped at 0
    assert figures.count == pytest.approx(10.0)
    assert 0 <= noisy_auc(noisy) <= 1
    assert math.isnan(noisy_auc(torch.tensor([[1.0, 2.0], [-3.0, 1.0]])))  # no positives


def test_the_test_patients_are_charged_what_the_run_releases_about_them() -> None:
    """The statistics charge names each site's test patients (never its training patients)
    with the evaluation history (and the audit's in sites mode), ε from the accountant."""
    from pathlib import Path

    from adapters.config_files import load_config
    from fl_core.data.tables import ClientSplit, Partition
    from fl_core.privacy.accounting import KIND_STATISTICS, statistics_charge

    root = Path(__file__).resolve().parents[3]
    cfg = load_config(root / "params.yaml", ["privacy.evaluation_every=5"])
    split = Partition((ClientSplit("A", (1, 2, 3), (4, 5)), ClientSplit("B", (6,), (7,))),
                      "by_site", 0)
    site_of = {1: "A", 2: "A", 3: "A", 4: "A", 5: "A", 6: "B", 7: "B"}
    records = {pid: f"fp{pid}" for pid in site_of}
    charge = statistics_charge(cfg, site_of, split, "run1", records)
    assert charge is not None and charge.kind == KIND_STATISTICS
    assert charge.run_id == "run1-statistics"
    assert [s.site for s in charge.sites] == ["A", "B"]
    assert {r.patient_id for r in charge.sites[0].patients} == {4, 5}
    assert {r.patient_id for r in charge.sites[1].patients} == {7}
    assert charge.sites[0].history == ((2.0, 1.0, 4),)  # rounds 5, 10, 15, 20
    assert charge.sites[0].epsilon == pytest.approx(
        release_guarantee(training=(), evaluation_noise=2.0, evaluations=4, audit_noise=None,
                          delta=1e-5, accountant="prv").evaluation_epsilon)
    sites = load_config(root / "params.yaml", ["federation.mode=sites"])
    audited = statistics_charge(sites, site_of, split, "run1", records)
    assert audited is not None and audited.sites[0].history == (
        (2.0, 1.0, 1), (4.0, 1.0, 1))


def test_the_audits_members_are_charged_what_the_sites_mode_audit_releases_about_them() -> None:
    """In sites mode the audit's noisy histograms also hold the trained patients (members):
    a third charge names them with the audit's history, composed by the ledger with their
    training; in simulation (the audit runs where the data is) there is none."""
    from pathlib import Path

    from adapters.config_files import load_config
    from fl_core.data.tables import ClientSplit, Partition
    from fl_core.privacy.accounting import KIND_AUDIT_RELEASE, audit_members_charge

    root = Path(__file__).resolve().parents[3]
    split = Partition((ClientSplit("A", (1, 2, 3), (4, 5)), ClientSplit("B", (6,), (7,))),
                      "by_site", 0)
    site_of = {1: "A", 2: "A", 3: "A", 4: "A", 5: "A", 6: "B", 7: "B"}
    records = {pid: f"fp{pid}" for pid in site_of}
    assert audit_members_charge(load_config(root / "params.yaml"), site_of, split, "run1",
                                records) is None
    sites = load_config(root / "params.yaml", ["federation.mode=sites"])
    charge = audit_members_charge(sites, site_of, split, "run1", records)
    assert charge is not None and charge.kind == KIND_AUDIT_RELEASE
    assert charge.run_id == "run1-audit"
    assert {r.patient_id for r in charge.sites[0].patients} == {1, 2, 3}
    assert {r.patient_id for r in charge.sites[1].patients} == {6}
    assert charge.sites[0].history == ((4.0, 1.0, 1),)
    no_audit = load_config(root / "params.yaml", ["federation.mode=sites", "audit.enabled=false"])
    assert audit_members_charge(no_audit, site_of, split, "run1", records) is None
