"""The membership audit in sites mode: per-site loss-threshold scores (no shadow model at a
site), histogram replies, merged figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.tables import ClinicalTable
from fl_core.audit import attack_report
from fl_core.audit.federated import (
    NOT_IN_SITES_MODE,
    SITE_ATTACKS,
    audit_reply_from_scores,
    check_site_attacks,
    loss_to_unit,
    merge_audit_replies,
    merge_histograms,
    site_attack_scores,
    site_audit_reply,
)
from fl_core.codec.dense import DenseCodec
from fl_core.data.tables import ClientData
from fl_core.federation import AuditInstruction, AuditReply, decode_message, encode_message
from fl_core.federation.coordinator import FederationSettings
from fl_core.federation.messages import AUDIT_BINS
from fl_core.federation.simulation import simulate
from fl_core.federation.site_client import LocalTrainingConfig, SiteClient
from fl_core.model.metrics import roc_auc
from fl_core.model.networks import build_model, get_flat_params, set_flat_params
from fl_core.privacy.randomness import SeededRandom
from fl_core.privacy.release import EvaluationRelease
from tests.conftest import data_config, per_example_loss

DELTA = 1e-5
FINE = 4096  # the mechanics of binning and merging, checked on exact (noise 0) fine histograms


def exact_reply(site: str, round_idx: int, scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
                bins: int = FINE) -> AuditReply:
    """An exact audit reply (noise 0: what a run that is not private may release)."""
    return audit_reply_from_scores(site, round_idx, scores, bins=bins, noise=0.0, random=None)


def _labels(members: torch.Tensor, non_members: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(len(members)), torch.zeros(len(non_members))])


@st.composite
def site_scores(draw: st.DrawFn) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random scores in the loss-threshold attack's natural range (negated log-normal losses)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    m, o = draw(st.integers(50, 400)), draw(st.integers(50, 400))  # a tie moves AUC ≤ 1/(2mo)
    log_loss = draw(st.floats(-8, 2))
    spread, shift = draw(st.floats(0.5, 3)), draw(st.floats(-2, 2))
    return {
        "loss_threshold": (-torch.exp(log_loss + spread * torch.randn(m, generator=g)),
                           -torch.exp(log_loss + shift + spread * torch.randn(o, generator=g))),
    }


@settings(max_examples=60, deadline=None)
@given(site_scores())
def test_histogram_auc_is_within_0_005_of_the_exact_auc(
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    reports = merge_audit_replies([exact_reply("A", 1, scores)], delta=DELTA)
    for report in reports:
        members, non_members = scores[report.attack]
        exact = roc_auc(torch.cat([members, non_members]), _labels(members, non_members))
        assert report.auc == pytest.approx(exact, abs=0.005)
        assert (report.members, report.non_members) == (len(members), len(non_members))


@settings(max_examples=40, deadline=None)
@given(site_scores(), site_scores())
def test_merging_two_sites_equals_the_histogram_of_the_pooled_scores(
    a: dict[str, tuple[torch.Tensor, torch.Tensor]],
    b: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    pooled = {k: (torch.cat([a[k][0], b[k][0]]), torch.cat([a[k][1], b[k][1]])) for k in a}
    replies = [exact_reply("A", 2, a), exact_reply("B", 2, b)]
    one = exact_reply("pool", 2, pooled)
    assert torch.equal(merge_histograms(replies), one.histograms)
    assert merge_audit_replies(replies, delta=DELTA) == merge_audit_replies([one], delta=DELTA)


def test_bin_centred_scores_give_the_per_patient_report_exactly() -> None:
    """When binning loses nothing (one score per bin centre), the merged histograms give the
    same ROC, AUC, TPRs, advantage and ε lower bound as the per-patient report."""
    g = torch.Generator().manual_seed(3)
    bins = torch.randint(0, FINE, (700,), generator=g)
    bins[:300] = (bins[:300] + 1500).clamp(max=FINE - 1)  # members score higher
    u = (bins.double() + 0.5) / FINE
    score = -(((1 - u) / u) ** 4)  # loss_to_unit's inverse: u = 1 / (1 + ℓ^¼), score −ℓ
    assert torch.allclose(loss_to_unit(score), u)
    members, non_members = score[:300], score[300:]
    scores = {"loss_threshold": (members, non_members)}
    merged = merge_audit_replies([exact_reply("A", 1, scores)], delta=DELTA)[0]
    exact = attack_report("loss_threshold", score, _labels(members, non_members), DELTA)
    assert merged.summary() == pytest.approx(exact.summary())
    assert merged.fpr == pytest.approx(exact.fpr) and merged.tpr == pytest.approx(exact.tpr)
    assert exact.epsilon_lower_bound > 0.5


def test_the_maps_are_monotone_and_land_in_the_unit_interval() -> None:
    loss = torch.tensor([0.0, 1e-300, 1e-12, 1e-4, 0.5, 1.0, 10.0, 1e6, float("inf")],
                        dtype=torch.float64)
    u = loss_to_unit(-loss)
    assert bool((u[1:] <= u[:-1]).all()) and u[0] == 1 and u[-1] == 0
    assert bool((u[3:-1] < u[2:-2]).all())  # strictly between 10⁻¹² and 10⁶
    assert float(loss_to_unit(torch.tensor(-1.0))) == 0.5


def test_lira_and_shokri_are_refused_in_sites_mode_with_the_reason() -> None:
    assert SITE_ATTACKS == ("loss_threshold",)
    check_site_attacks(SITE_ATTACKS)
    with pytest.raises(ValueError, match="per-patient feature may leave its site"):
        check_site_attacks(["loss_threshold", "shokri_shadow"])
    with pytest.raises(ValueError, match="no bounded sensitivity .* simulation only"):
        check_site_attacks(["loss_threshold", "lira"])
    with pytest.raises(ValueError, match="in sites mode"):
        audit_reply_from_scores("A", 1, {"lira": (torch.zeros(3), torch.zeros(2))}, noise=1.0,
                                random=SeededRandom(0))
    # the attacks a site may not release are refused, each with its reason
    for attack in ("shokri_shadow", "lira", "lira_offline", *NOT_IN_SITES_MODE):
        with pytest.raises(ValueError) as err:
            check_site_attacks([*SITE_ATTACKS, attack])
        assert str(err.value) == f"attack {attack!r} in sites mode: {NOT_IN_SITES_MODE[attack]}"
    with pytest.raises(ValueError, match="unknown attack"):
        check_site_attacks(["made_up"])


def test_merge_refuses_replies_that_cannot_be_merged() -> None:
    u = torch.linspace(-1, 0, 5)
    scores = {a: (u, u) for a in SITE_ATTACKS}
    a, b = exact_reply("A", 1, scores), exact_reply("B", 1, scores)
    with pytest.raises(ValueError, match="same site"):
        merge_audit_replies([a, a], delta=DELTA)
    with pytest.raises(ValueError, match="different rounds"):
        merge_audit_replies([a, exact_reply("B", 2, scores)], delta=DELTA)
    with pytest.raises(ValueError, match="bins"):
        merge_audit_replies([a, exact_reply("B", 1, scores, bins=8)], delta=DELTA)
    with pytest.raises(ValueError, match="no audit replies"):
        merge_audit_replies([], delta=DELTA)
    counts = torch.zeros(1, 2, FINE, dtype=torch.float64)
    counts[:, 1, 0] = 5
    empty = AuditReply("C", 1, 0, 5, 0.0, counts)  # a site with non-members only
    with pytest.raises(ValueError, match="at least one member"):
        merge_audit_replies([empty], delta=DELTA)
    assert len(merge_audit_replies([a, b, empty], delta=DELTA)) == 1


def test_a_noisy_audit_release_is_post_processed_within_its_noise() -> None:
    """The released (noisy, coarse) histograms: the coordinator clamps, clips cumulative
    counts to the public population sizes, and still reads the attack's AUC to within 0.1 at
    the heart data's sizes (≈ 700 members, 180 non-members; σ = 2 per cell at four sites
    gives the AUC a standard deviation of ≈ 0.04)."""
    g = torch.Generator().manual_seed(4)
    members, non_members = torch.randn(700, generator=g) + 0.8, torch.randn(180, generator=g)
    scores = {"loss_threshold": (-torch.exp(-members), -torch.exp(-non_members))}
    exact = roc_auc(torch.cat([members, non_members]), _labels(members, non_members))
    replies = [audit_reply_from_scores(s, 1, {a: (m[i::4], o[i::4]) for a, (m, o) in
                                              scores.items()},
                                       bins=AUDIT_BINS, noise=2.0, random=SeededRandom(i))
               for i, s in enumerate("ABCD")]
    replies = [decode_message(encode_message(r)) for r in replies]
    assert all(not torch.equal(r.histograms, r.histograms.round()) for r in replies)
    for report in merge_audit_replies(replies, delta=DELTA):  # type: ignore[arg-type]
        assert (report.members, report.non_members) == (700, 180)
        assert report.auc == pytest.approx(exact, abs=0.1)
        assert min(report.tpr) >= 0 and max(report.tpr) <= 1 and max(report.fpr) <= 1


# --- on the heart data ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heart(raw_csv: Path) -> list[ClientData]:
    config = data_config(path=str(raw_csv))
    data, _, _ = ClinicalTable.get(config).partitioned(config, 0)
    return data


def _mlp(num_features: int, hidden: int = 256):  # noqa: ANN202
    return lambda: build_model("mlp", num_features, hidden_units=hidden, seed=0)


def _site_replies(factory, params: torch.Tensor, data: list[ClientData]) -> list[AuditReply]:  # noqa: ANN001
    payload = DenseCodec().encode(params)
    replies = []
    for d in data:
        instruction = decode_message(encode_message(
            AuditInstruction(d.client_id, 7, payload)))
        assert isinstance(instruction, AuditInstruction)
        reply = site_audit_reply(instruction, factory, d, bins=FINE, noise=0.0, random=None)
        replies.append(decode_message(encode_message(reply), site=d.client_id,
                                      expect=AuditReply))  # type: ignore[arg-type]
    return replies  # type: ignore[return-value]


@pytest.mark.slow
def test_an_overfit_mlp_is_caught_by_the_site_path(heart: list[ClientData]) -> None:
    factory = _mlp(heart[0].x_train.shape[1])
    model = factory()
    x = torch.cat([d.x_train for d in heart])
    y = torch.cat([d.y_train for d in heart])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(1000):  # full batch, no regularisation: memorises the training patients
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()
    replies = _site_replies(factory, get_flat_params(model), heart)
    reports = {r.attack: r for r in merge_audit_replies(replies, delta=DELTA)}
    assert reports["loss_threshold"].auc > 0.58
    assert reports["loss_threshold"].members == sum(d.num_train for d in heart)
    assert reports["loss_threshold"].non_members == sum(len(d.test_ids) for d in heart)
    assert set(reports) == {"loss_threshold"}  # no site-local LiRA


@pytest.mark.slow
def test_the_site_audit_of_a_simulated_federation_matches_the_pooled_baseline(
    heart: list[ClientData],
) -> None:
    factory = _mlp(heart[0].x_train.shape[1], hidden=128)
    local = LocalTrainingConfig(local_epochs=20, batch_size=16, learning_rate=0.2, seed=0)
    sites = [SiteClient(data=d, model_factory=factory, training=local,
                        evaluation=EvaluationRelease(bins=FINE, noise=0.0)) for d in heart]
    settings = FederationSettings(rounds=5, local_epochs=20, min_clients=1,
                                  round_timeout_s=300.0, client_fraction=1.0)
    result = simulate(sites, initial_params=get_flat_params(factory()), settings=settings)
    replies = _site_replies(factory, result.params, heart)
    site_loss = merge_audit_replies(replies, delta=DELTA)[0]

    model = factory()  # the pooled baseline sees every member's and non-member's loss
    set_flat_params(model, result.params)
    members = -per_example_loss(model, torch.cat([d.x_train for d in heart]),
                                torch.cat([d.y_train for d in heart]))
    non_members = -per_example_loss(model, torch.cat([d.x_test for d in heart]),
                                    torch.cat([d.y_test for d in heart]))
    pooled = attack_report("loss_threshold", torch.cat([members, non_members]),
                           _labels(members, non_members), DELTA)
    assert site_loss.auc == pytest.approx(pooled.auc, abs=0.02)
    assert (site_loss.members, site_loss.non_members) == (pooled.members, pooled.non_members)
    assert site_loss.advantage == pytest.approx(pooled.advantage, abs=0.05)


def test_a_reply_holds_nothing_per_patient(heart: list[ClientData]) -> None:
    """The encoded reply's length does not depend on the number of patients."""
    factory = _mlp(heart[0].x_train.shape[1], hidden=16)
    params = get_flat_params(factory())
    cleveland = heart[0]
    sizes = set()
    for n_train, n_test in ((20, 5), (120, 30), (243, 61)):
        part = ClientData(cleveland.client_id, cleveland.x_train[:n_train],
                          cleveland.y_train[:n_train], cleveland.x_test[:n_test],
                          cleveland.y_test[:n_test], cleveland.train_ids[:n_train],
                          cleveland.test_ids[:n_test])
        scores = site_attack_scores(factory, params, part)
        reply = exact_reply(part.client_id, 1, scores)
        assert (reply.members, reply.non_members) == (n_train, n_test)
        data = encode_message(reply)
        # only the digits of the two counts in the metadata may differ
        sizes.add(len(data) - len(str(n_train)) - len(str(n_test)))
        for members, _ in scores.values():
            assert members[:2].numpy().astype("<f8").tobytes() not in data
    assert len(sizes) == 1


def test_patients_with_several_records_are_one_member_each(heart: list[ClientData]) -> None:
    d = heart[3]
    rows = torch.cat([torch.arange(d.num_train), torch.arange(10)])  # 10 patients twice
    doubled = ClientData(d.client_id, d.x_train[rows], d.y_train[rows], d.x_test, d.y_test,
                         d.train_ids, d.test_ids, train_patients=d.patient_ids()[rows])
    factory = _mlp(d.x_train.shape[1], hidden=16)
    params = get_flat_params(factory())
    once = site_attack_scores(factory, params, d)
    twice = site_attack_scores(factory, params, doubled)
    assert len(twice["loss_threshold"][0]) == d.num_train
    # a patient's records are identical here, so the mean loss is the single record's
    assert torch.allclose(twice["loss_threshold"][0], once["loss_threshold"][0])
    with pytest.raises(ValueError, match="test rows"):
        site_attack_scores(factory, params, ClientData(
            d.client_id, d.x_train, d.y_train, d.x_test, d.y_test, d.train_ids,
            d.test_ids[:-1]))


def test_site_attack_scores_are_deterministic_and_finite(heart: list[ClientData]) -> None:
    factory = _mlp(heart[0].x_train.shape[1], hidden=32)
    params = get_flat_params(factory())
    first, again = (site_attack_scores(factory, params, heart[0]) for _ in range(2))
    assert set(first) == {"loss_threshold"}
    assert all(bool(torch.isfinite(t).all()) for t in first["loss_threshold"])
    assert all(torch.equal(a, b) for a, b in zip(first["loss_threshold"],
                                                 again["loss_threshold"], strict=True))


def test_a_sites_mode_audit_reply_holds_the_loss_threshold_row_only_and_trains_nothing(
    heart: list[ClientData], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The site builds the target model (and one model for the payload's size) and trains
    none: no shadow model, no backward pass; its reply is one attack's [1, 2, bins]
    histogram, noisy, and decodes as such."""
    d = heart[0]
    built = 0

    def factory() -> torch.nn.Module:
        nonlocal built
        built += 1
        return build_model("mlp", d.x_train.shape[1], hidden_units=16, seed=0)

    def no_training(*_: object, **__: object) -> None:
        raise AssertionError("the sites-mode audit trained a model")

    monkeypatch.setattr(torch.autograd, "backward", no_training)
    payload = DenseCodec().encode(get_flat_params(factory()))
    built = 0
    reply = site_audit_reply(AuditInstruction(d.client_id, -1, payload), factory, d,
                             bins=AUDIT_BINS, noise=2.0, random=SeededRandom(0))
    assert built == 2  # the payload's size, the target: no shadow
    assert tuple(reply.histograms.shape) == (1, 2, AUDIT_BINS)
    assert (reply.members, reply.non_members) == (d.num_train, len(d.test_ids))
    decoded = decode_message(encode_message(reply), site=d.client_id, expect=AuditReply)
    assert decoded == reply
    [report] = merge_audit_replies([decoded], delta=DELTA)  # type: ignore[list-item]
    assert report.attack == "loss_threshold"
