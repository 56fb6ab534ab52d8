"""Noise nobody can regenerate: the secure source, the attack it stops, and the rules around it.

The attack (issue 11): whoever holds ``params.yaml`` rebuilds a client's DP noise from
(seed, client id, round) and subtracts it from the update, recovering the noise-free clipped
gradient sum. With ``privacy.randomness=reproducible`` that works (and the gate refuses the
model); with ``secure`` it must not.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from adapters.config_files import load_config
from adapters.tables import ClinicalTable
from fl_core.codec.payload import decode_payload
from fl_core.config.model import ConfigError
from fl_core.federation import FitInstruction
from fl_core.federation.site_client import LocalTrainingConfig, SiteClient
from fl_core.model.networks import build_model, get_flat_params
from fl_core.privacy.accountants import ACCOUNTANTS, epsilon_spent, replace_one_epsilon
from fl_core.privacy.dpsgd import DPSGDConfig
from fl_core.privacy.randomness import RANDOMNESS, SecureRandom, SeededRandom, make_random

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
ROOT = Path(__file__).resolve().parents[3]


# --- the sources -------------------------------------------------------------------------------


def test_secure_uniform_and_normal_have_the_right_distribution() -> None:
    source = SecureRandom()
    u = source.uniform(50_000)
    assert u.dtype == torch.float64 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-4
    z = source.normal((200, 250), std=3.0, dtype=torch.float64)
    assert z.shape == (200, 250)
    assert float(z.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(z.std()) == pytest.approx(3.0, rel=0.02)
    assert stats.kstest((z / 3.0).reshape(-1).numpy(), "norm").pvalue > 1e-4


def test_secure_draws_never_repeat_and_streams_share_nothing_derivable() -> None:
    source = SecureRandom()
    assert not torch.equal(source.normal((64,), 1.0), source.normal((64,), 1.0))
    assert source.stream("dp-sgd", "Cleveland", 1) is source  # nothing to seed


def test_seeded_streams_are_reproducible_and_distinct() -> None:
    a = SeededRandom(42).stream("dp-sgd", "Cleveland", 3)
    b = SeededRandom(42).stream("dp-sgd", "Cleveland", 3)
    c = SeededRandom(42).stream("dp-sgd", "Cleveland", 4)
    assert torch.equal(a.normal((100,), 1.0), b.normal((100,), 1.0))
    assert not torch.equal(SeededRandom(42).stream("x").uniform(10), c.uniform(10))


@pytest.mark.parametrize("name", list(RANDOMNESS))
def test_every_randomness_is_what_it_is_named_and_secret_exactly_when_secure(name: str) -> None:
    """A secure source draws differently on every build whatever the seed; any other source
    can be regenerated from the seed (what the gate refuses to promote)."""
    a, b = make_random(name, 7), make_random(name, 7)
    assert a.name == name
    same = torch.equal(a.stream("dp-sgd", 1).normal((64,), 1.0),
                       b.stream("dp-sgd", 1).normal((64,), 1.0))
    assert same is not a.secure


def test_randomness_registry_and_config() -> None:
    assert isinstance(make_random("secure", 1), SecureRandom)
    assert load_config(ROOT / "params.yaml").privacy.randomness == "secure"  # the default
    names = ", ".join(repr(name) for name in RANDOMNESS)
    with pytest.raises(ConfigError, match=rf"privacy.randomness: unknown name; accepted: "
                                          rf"{names} \("):
        load_config(ROOT / "params.yaml", ["privacy.randomness=mersenne"])


# --- the attack ---------------------------------------------------------------------------------


def _client(randomness: object, sigma: float) -> tuple[SiteClient, torch.Tensor, int]:
    cfg = load_config(ROOT / "params.yaml")
    data, _, _ = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, cfg.seed)
    cleveland = next(d for d in data if d.client_id == "Cleveland")
    features = int(cleveland.x_train.shape[1])

    def factory() -> torch.nn.Module:
        return build_model("logreg", features, hidden_units=32, seed=0)

    dp = DPSGDConfig(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=1.0,
                     learning_rate=0.5, delta=1e-5, accountant="prv", grad_sample_mode="hooks")
    local = LocalTrainingConfig(local_epochs=1, batch_size=32, learning_rate=0.1, seed=cfg.seed)
    client = SiteClient(data=cleveland, model_factory=factory, training=local, privacy=dp,
                        randomness=randomness)
    return client, get_flat_params(factory()), int(cleveland.patient_ids().unique().numel())


def _noise_in_update(randomness: object) -> tuple[torch.Tensor, int]:
    """The Gaussian noise one round of DP-GD added, measured as noisy − noise-free update."""
    from fl_core.codec.dense import DenseCodec

    noisy, start, patients = _client(randomness, sigma=1.0)
    clean, _, _ = _client(SeededRandom(0), sigma=0.0)
    instruction = FitInstruction("r", 1, DenseCodec().encode(start), 1)
    diff = decode_payload(noisy.fit(instruction).update) - decode_payload(
        clean.fit(instruction).update)
    # θ ← θ − η/(q·N)·(Σ clipped + noise): the noise is −diff·N/η
    return -diff * patients / 0.5, patients


def _rebuild_noise_from_config(seed: int, client_id: str, round_idx: int,
                               patients: int, n_params: int) -> torch.Tensor:
    """What an adversary holding params.yaml computes: the stream, sampling draw, noise."""
    stream = SeededRandom(seed).stream("dp-sgd", client_id, round_idx)
    stream.uniform(patients)  # the Poisson sampling draw comes first
    weight = stream.normal((1, n_params - 1), 1.0)  # Linear: weight, then bias
    bias = stream.normal((1,), 1.0)
    return torch.cat([weight.reshape(-1), bias])


def test_reproducible_noise_is_regenerated_from_the_config_and_secure_noise_is_not() -> None:
    seed = load_config(ROOT / "params.yaml").seed
    used, patients = _noise_in_update(make_random("reproducible", seed))
    rebuilt = _rebuild_noise_from_config(seed, "Cleveland", 1, patients, used.numel())
    torch.testing.assert_close(used, rebuilt, rtol=0, atol=1e-3)  # the attack works

    used, patients = _noise_in_update(make_random("secure", seed))
    rebuilt = _rebuild_noise_from_config(seed, "Cleveland", 1, patients, used.numel())
    assert float((used - rebuilt).abs().max()) > 0.5  # ... and no longer matches
    assert float(used.std()) == pytest.approx(1.0, abs=0.6)  # still N(0, σ²C²) noise


def test_two_secure_runs_with_the_same_seed_differ_and_reproducible_runs_agree() -> None:
    from fl_core.federation.wiring import federate, make_dpsgd

    def params(randomness: str) -> torch.Tensor:
        cfg = load_config(ROOT / "params.yaml", ["rounds=2", f"privacy.randomness={randomness}"])
        data, _, _ = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, cfg.seed)
        return federate(cfg, data, dp=make_dpsgd(cfg=cfg, data=data)).result.params

    assert torch.equal(params("reproducible"), params("reproducible"))
    assert not torch.equal(params("secure"), params("secure"))


# --- the stated guarantee ----------------------------------------------------------------------


def _gdp_epsilon(mu: float, delta: float) -> float:
    """ε at δ of a μ-GDP mechanism (Dong, Roth, Su 2019), in closed form via its δ(ε)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gdp_delta(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    return brentq(lambda e: gdp_delta(e) - delta, 0.0, 100.0)


@pytest.mark.parametrize("accountant", list(ACCOUNTANTS))
def test_full_batch_epsilons_match_the_gaussian_closed_form(accountant: str) -> None:
    """q = 1: T steps of the Gaussian mechanism with noise σC compose to μ-GDP with
    μ = √T·Δ/(σC): Δ = C for add/remove, 2C for replace-one. PRV is exact (within its
    discretisation), RDP an upper bound."""
    sigma, steps, delta = 7.0, 40, 1e-5
    add_remove = epsilon_spent(sigma, 1.0, steps, delta, accountant)
    replace, replace_delta = replace_one_epsilon(sigma, 1.0, steps, delta, accountant)
    exact_ar = _gdp_epsilon(math.sqrt(steps) / sigma, delta)
    exact_r1 = _gdp_epsilon(2 * math.sqrt(steps) / sigma, delta)
    rel = 0.01 if accountant == "prv" else 0.25
    assert add_remove == pytest.approx(exact_ar, rel=rel) and add_remove >= exact_ar * 0.99
    assert replace == pytest.approx(exact_r1, rel=rel) and replace >= exact_r1 * 0.99
    assert replace_delta == delta and replace > 1.9 * add_remove


def test_subsampled_replace_one_is_the_group_privacy_bound() -> None:
    eps = epsilon_spent(2.0, 0.3, 50, 1e-5, "rdp")
    assert replace_one_epsilon(2.0, 0.3, 50, 1e-5, "rdp") == pytest.approx(
        (2 * eps, (1 + math.exp(eps)) * 1e-5))


# --- refusals, exit 2 ---------------------------------------------------------------------------

SERVER_DP = ["privacy.server.enabled=true", "aggregation.method=fedavg", "anomaly.enabled=false",
             "aggregation.max_norm_factor=0"]


@pytest.mark.parametrize(("override", "named"), [
    ("aggregation.pre_aggregation=nnm", "aggregation.pre_aggregation=nnm"),
    ("aggregation.pre_aggregation=bucketing", "aggregation.pre_aggregation=bucketing"),
    ("aggregation.max_norm_factor=100", "aggregation.max_norm_factor=100"),
    ("anomaly.enabled=true", "anomaly.enabled=true"),
])
def test_server_dp_refuses_anything_acting_on_raw_updates(override: str, named: str) -> None:
    load_config(ROOT / "params.yaml", SERVER_DP)  # the accepted combination
    with pytest.raises(ConfigError, match="unmixed and unfiltered") as err:
        load_config(ROOT / "params.yaml", [*SERVER_DP, override])
    assert named in str(err.value)


def _fedpriv(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--root", str(project)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_cli_refuses_server_dp_with_nnm_with_exit_2(project: Path) -> None:
    out = _fedpriv(project, "config", *[a for o in SERVER_DP for a in ("--set", o)],
                   "--set", "aggregation.pre_aggregation=nnm")
    assert out.returncode == 2, out.stderr
    assert "configuration error" in out.stderr and "pre_aggregation=nnm" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_refuses_a_large_delta_with_exit_2_naming_the_rule(project: Path) -> None:
    for stage in ("validate", "partition"):
        assert _fedpriv(project, "stage", stage).returncode == 0
    out = _fedpriv(project, "stage", "train", "--set", "privacy.delta=0.004")
    assert out.returncode == 2, out.stderr
    assert "privacy.delta=0.004" in out.stderr and "1/(10·n)" in out.stderr
    assert "243 training patients" in out.stderr and "Traceback" not in out.stderr
    assert not (project / "data" / "models" / "model.pt").exists()


def test_a_private_site_client_without_randomness_is_refused_not_seeded() -> None:
    """No silent default: a DP-SGD client must be handed its noise source (issue 24)."""
    with pytest.raises(ValueError, match="no seeded default"):
        _client(None, sigma=1.0)
