import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fl_core.audit import AttackReport, attack_report, balanced_indices, tpr_at_fpr
from fl_core.model.metrics import accuracy, balanced_accuracy, roc_auc, roc_curve
from fl_core.model.networks import MLP, build_model
from tests.conftest import per_example_loss


def loss_threshold_attack(
    model: torch.nn.Module,
    x_members: torch.Tensor, y_members: torch.Tensor,
    x_non_members: torch.Tensor, y_non_members: torch.Tensor,
    seed: int = 0, delta: float = 1e-5,
) -> AttackReport:
    """The loss-threshold attack (Yeom et al. 2018) on balanced members / non-members of a
    model trained outside the pipeline: a low loss means "member"."""
    m_idx, o_idx = balanced_indices(len(y_members), len(y_non_members),
                                    torch.Generator().manual_seed(seed))
    scores = -torch.cat([
        per_example_loss(model, x_members[m_idx], y_members[m_idx]),
        per_example_loss(model, x_non_members[o_idx], y_non_members[o_idx]),
    ])
    is_member = torch.cat([torch.ones(len(m_idx)), torch.zeros(len(o_idx))])
    return attack_report("loss_threshold", scores, is_member, delta)


@given(st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=2, max_size=60))
def test_auc_matches_sklearn_with_ties(pairs: list[tuple[int, bool]]) -> None:
    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([float(y) for _, y in pairs])
    if labels.min() == labels.max():
        assert math.isnan(roc_auc(scores, labels))
    else:
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_balanced_accuracy_matches_sklearn(pairs: list[tuple[bool, bool]]) -> None:
    from sklearn.metrics import balanced_accuracy_score

    predicted = [p for p, _ in pairs]
    actual = [a for _, a in pairs]
    counts = [sum(p and a for p, a in pairs), sum(p and not a for p, a in pairs),
              sum(not p and not a for p, a in pairs), sum(not p and a for p, a in pairs)]
    if len(set(actual)) < 2:
        assert math.isnan(balanced_accuracy(*counts))
    else:
        assert balanced_accuracy(*counts) == pytest.approx(
            balanced_accuracy_score(actual, predicted))


def test_balanced_accuracy_sees_through_the_majority_class() -> None:
    """covid_testing's 5.6 % positives: answering "negative" is 94.4 % accurate, 0.5 balanced."""
    assert balanced_accuracy(tp=0, fp=0, tn=944, fn=56) == 0.5
    assert balanced_accuracy(tp=28, fp=472, tn=472, fn=28) == 0.5  # a coin
    assert balanced_accuracy(tp=56, fp=0, tn=944, fn=0) == 1.0


def test_roc_endpoints_and_tpr_at_fpr() -> None:
    fpr, tpr = roc_curve(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1.0, 0, 1, 0]))
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert tpr_at_fpr(fpr, tpr, 0.0) == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.5) == 1.0
    assert accuracy(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0])) == 0.5


def _overfit(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MLP(x.shape[1], hidden_units=256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    return model


def test_attack_has_power_on_an_overfit_model() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g)
    y = (torch.rand(400, generator=g) > 0.5).float()  # random labels: only memorisation helps
    model = _overfit(x[:200], y[:200])
    result = loss_threshold_attack(model, x[:200], y[:200], x[200:], y[200:])
    assert result.auc > 0.8
    assert result.accuracy > 0.7
    assert result.members == result.non_members == 200


def test_no_false_alarm_when_members_were_not_trained_on() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1200, 10, generator=g)
    y = (torch.rand(1200, generator=g) > 0.5).float()
    model = _overfit(x[:200], y[:200])
    # "members" drawn from data the model never saw
    result = loss_threshold_attack(model, x[200:700], y[200:700], x[700:], y[700:])
    assert abs(result.auc - 0.5) < 0.05


def test_build_model_seeded_and_validated() -> None:
    a = build_model("mlp", 5, hidden_units=8, seed=3)
    b = build_model("mlp", 5, hidden_units=8, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="accepted"):
        build_model("cnn", 5, hidden_units=8)
