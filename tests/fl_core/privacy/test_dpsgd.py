"""Patient-level DP-SGD, its accounting and DP-FedAvg (the ledger:
tests/adapters/test_ledger_store.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fl_core.model.networks import LogisticRegression, build_model, get_flat_params
from fl_core.privacy.accountants import (
    PrivacyError,
    calibrate_noise,
    check_delta,
    epsilon_spent,
)
from fl_core.privacy.dp_fedavg import DPFedAvg
from fl_core.privacy.dpsgd import (
    DPSGDConfig,
    PatientDPTrainer,
    check_model,
    group_records,
    patient_loss,
)
from fl_core.privacy.randomness import SecureRandom, SeededRandom

FEATURES = 5
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _patients(records: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Record rows for patients with the given record counts: x, y, patient id per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n,), 100 + i) for i, n in enumerate(records)])
    x = torch.randn(ids.numel(), FEATURES, generator=g) * 3
    y = (torch.rand(ids.numel(), generator=g) < 0.5).float()
    return x, y, ids


def _fresh_epsilon(sigma: float, q: float, steps: int, delta: float, mechanism: str) -> float:
    """Opacus's own accountant, built here from (σ, q, steps) alone."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = PRVAccountant() if mechanism == "prv" else RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta=delta)


# --- grouping and the per-patient gradient --------------------------------------------------


def test_group_records_pads_and_masks() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    y = torch.tensor([0.0, 1, 1, 0, 1, 0])
    ids = torch.tensor([7, 3, 7, 9, 7, 3])
    p = group_records(x, y, ids)
    assert p.x.shape == (3, 3, 2) and p.num_patients == 3
    assert p.mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]  # ids 3, 7, 9
    assert p.x[1, :, 0].tolist() == [0.0, 4.0, 8.0]  # patient 7's rows, in order
    assert p.y[0, :2].tolist() == [1.0, 0.0]
    assert p.x[2, 1:].abs().sum() == 0  # padding is zero


def test_opacus_per_patient_gradient_matches_single_patient_backward() -> None:
    """Opacus's grad_sample for a padded batch equals each patient's own gradient."""
    from opacus import GradSampleModule

    x, y, ids = _patients([1, 40, 3])
    p = group_records(x, y, ids)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 4), nn.ReLU(), nn.Linear(4, 1))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    patient_loss(gsm(p.x).squeeze(-1), p.y, p.mask).backward()
    samples = torch.cat([q.grad_sample.reshape(3, -1) for q in model.parameters()], dim=1)
    for i in range(3):
        model.zero_grad()
        for q in model.parameters():
            q.grad_sample = None
        alone = model(p.x[i : i + 1]).squeeze(-1)
        patient_loss(alone, p.y[i : i + 1], p.mask[i : i + 1]).backward()
        expected = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
        torch.testing.assert_close(samples[i], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("records", [1, 40])
def test_each_patient_moves_the_model_by_at_most_the_clip_norm(records: int) -> None:
    """One noiseless step on one patient: the update is the clipped patient gradient, so a
    patient with 40 records has no more weight than a patient with one."""
    x, y, ids = _patients([records], seed=records)
    p = group_records(x, y, ids)
    model = LogisticRegression(FEATURES)
    before = get_flat_params(model)
    raw = torch.autograd.grad(patient_loss(model(p.x), p.y, p.mask),
                              list(model.parameters()))
    raw_norm = float(torch.cat([g.reshape(-1) for g in raw]).norm())
    cfg = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0,
                      learning_rate=1.0, delta=1e-5, accountant="rdp", grad_sample_mode="hooks")
    PatientDPTrainer(model=model, data=p, cfg=cfg).train(epochs=1, random=SeededRandom(0))
    step = get_flat_params(model) - before
    assert raw_norm > 0.5  # the clip binds
    assert float(step.norm()) == pytest.approx(0.5, rel=1e-4)
    # direction unchanged: clipping only rescales the patient's mean-over-records gradient
    direction = -torch.cat([g.reshape(-1) for g in raw]) / raw_norm
    torch.testing.assert_close(step / step.norm(), direction, rtol=1e-4, atol=1e-5)


def test_a_site_with_a_batch_over_the_reference_steps_proportionally_further() -> None:
    """``reference_batch``: a site of B patients per step (B > B_ref) takes a step B/B_ref
    times ``learning_rate`` along the same noiseless clipped mean gradient; at or below the
    reference, and with the rule off, the configured step."""
    x, y, ids = _patients([1] * 8, seed=3)
    p = group_records(x, y, ids)

    def step(reference: int | None) -> torch.Tensor:
        model = LogisticRegression(FEATURES)
        before = get_flat_params(model)
        cfg = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0,
                          learning_rate=0.25, delta=1e-5, accountant="rdp",
                          grad_sample_mode="hooks", reference_batch=reference)
        PatientDPTrainer(model=model, data=p, cfg=cfg).train(epochs=1, random=SeededRandom(0))
        return get_flat_params(model) - before

    plain = step(None)
    torch.testing.assert_close(step(8), plain)
    torch.testing.assert_close(step(100), plain)
    torch.testing.assert_close(step(2), 4 * plain)  # B = 8 patients, B_ref = 2
    cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1,
                      learning_rate=0.5, delta=1e-5, accountant="rdp",
                      grad_sample_mode="hooks", reference_batch=256)
    assert cfg.step_size(2560) == 0.5 and cfg.step_size(5120) == pytest.approx(1.0)


def test_two_patients_contribute_equally_whatever_their_record_counts() -> None:
    x, y, ids = _patients([1, 40], seed=5)
    p = group_records(x, y, ids)
    model = LogisticRegression(FEATURES)
    before = get_flat_params(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.1, sample_rate=1.0,
                      learning_rate=1.0, delta=1e-5, accountant="rdp", grad_sample_mode="hooks")
    PatientDPTrainer(model=model, data=p, cfg=cfg).train(epochs=1, random=SeededRandom(0))
    step = get_flat_params(model) - before
    # sum of two clipped gradients over the expected batch (2): at most C in norm
    assert float(step.norm()) <= 0.1 + 1e-6
    grads = []
    for i in range(2):
        m = LogisticRegression(FEATURES)
        m.load_state_dict(initial)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            patient_loss(m(p.x[i:i + 1]), p.y[i:i + 1], p.mask[i:i + 1]), list(m.parameters()))]))
    clipped = [g * min(1.0, 0.1 / float(g.norm())) for g in grads]
    torch.testing.assert_close(step, -(clipped[0] + clipped[1]) / 2, rtol=1e-4, atol=1e-6)


# --- accounting -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_reported_epsilon_matches_a_fresh_opacus_accountant(mechanism: str) -> None:
    x, y, ids = _patients([1, 2, 3] * 20, seed=1)
    p = group_records(x, y, ids)
    q, delta, epochs = 0.2, 1e-4, 3
    sigma = calibrate_noise(2.0, delta, q, epochs * 5, mechanism)
    trainer = PatientDPTrainer(
        model=LogisticRegression(FEATURES), data=p,
        cfg=DPSGDConfig(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=q,
                        learning_rate=0.1, delta=delta, accountant=mechanism,
                        grad_sample_mode="hooks"))
    trainer.train(epochs=epochs, random=SeededRandom(3))
    assert trainer.steps == epochs * 5
    fresh = _fresh_epsilon(sigma, q, trainer.steps, delta, mechanism)
    assert trainer.epsilon() == pytest.approx(fresh, rel=1e-9)
    assert epsilon_spent(sigma, q, trainer.steps, delta, mechanism) == pytest.approx(fresh)
    assert 2.0 - 0.05 <= fresh <= 2.0  # calibration meets the target from below


def test_noise_is_reproducible_from_the_seed_and_differs_across_seeds() -> None:
    x, y, ids = _patients([1] * 30, seed=2)
    p = group_records(x, y, ids)

    def run(seed: int) -> torch.Tensor:
        model = build_model("logreg", FEATURES, hidden_units=32, seed=0)
        recipe = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3,
                             learning_rate=0.1, delta=1e-5, accountant="rdp",
                             grad_sample_mode="hooks")
        PatientDPTrainer(model=model, data=p, cfg=recipe).train(2, SeededRandom(seed))
        return get_flat_params(model)

    torch.testing.assert_close(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_delta_must_be_at_most_one_over_ten_n() -> None:
    check_delta(0.001, 100, "client 'a'")  # exactly 1/(10·100) is allowed
    with pytest.raises(PrivacyError,
                       match=r"privacy.delta=0.0011 .*client 'a' has 100 .*1/\(10·100\)"):
        check_delta(0.0011, 100, "client 'a'")
    with pytest.raises(PrivacyError, match=r"δ ≤ 1/\(10·n\)"):
        check_delta(0.004, 243, "client 'Cleveland'")


def test_impossible_budget_is_a_clear_error() -> None:
    with pytest.raises(PrivacyError, match="privacy.epsilon"):
        calibrate_noise(1e-6, 1e-10, 1.0, 10_000, "rdp")


def test_batchnorm_is_fixed_and_reported() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    fixed, fixes = check_model(model)
    assert fixes and "BatchNorm" in fixes[0]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    assert check_model(LogisticRegression(3))[1] == []


# --- DP-FedAvg --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 8), d=st.integers(1, 20), scale=st.floats(0.01, 1e4),
       clip=st.floats(0.1, 5), seed=st.integers(0, 10_000))
def test_dp_fedavg_one_client_moves_the_sum_by_at_most_twice_the_clip(
    n: int, d: int, scale: float, clip: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, d, generator=g, dtype=torch.float64).float() * scale
    changed = updates.clone()
    changed[0] = torch.randn(d, generator=g) * scale * 10
    noiseless = DPFedAvg(clip_norm=clip, noise_multiplier=0.0, expected_clients=float(n),
                         random=SeededRandom(0))
    a = noiseless(updates, None, None).aggregate
    b = noiseless(changed, None, None).aggregate
    assert float((a - b).norm()) * n <= 2 * clip * (1 + 1e-4)
    assert float(a.norm()) * n <= n * clip * (1 + 1e-4)


def test_dp_fedavg_noise_has_the_stated_scale() -> None:
    updates = torch.zeros(4, 20_000)
    for random in (SeededRandom(0), SecureRandom()):
        out = DPFedAvg(clip_norm=2.0, noise_multiplier=1.5, expected_clients=4.0,
                       random=random)(updates, None, None).aggregate
        assert float(out.std()) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.03)

