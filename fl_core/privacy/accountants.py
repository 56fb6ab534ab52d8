"""Privacy accountants (Opacus' PRV, RDP, GDP) by name: σ calibration, ε for a mechanism
history ``[(σ, q, steps)]``, the δ rule, local steps per run."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from fl_core.registry import lookup


def _opacus_accountant(mechanism: str) -> Callable[[], Any]:
    def create() -> Any:  # opacus' IAccountant; imported late, config must not need opacus
        from opacus.accountants import create_accountant

        return create_accountant(mechanism=mechanism)

    return create


ACCOUNTANTS: dict[str, Callable[[], Any]] = {
    "prv": _opacus_accountant("prv"),  # privacy random variables (Gopi et al. 2021): tight
    "rdp": _opacus_accountant("rdp"),  # Rényi DP (Mironov 2017): an upper bound, looser
}
"""``privacy.accountant`` → a fresh accountant. The names are Opacus's mechanism names, which
:func:`calibrate_noise` also hands to Opacus's ``get_noise_multiplier``."""


class PrivacyError(ValueError):
    """A privacy setting cannot be honoured; the message names the setting and the fix."""


DELTA_RULE = "δ ≤ 1/(10·n), n = training patients at the largest site"


def check_delta(delta: float, num_patients: int, who: str) -> None:
    """Refuse ``δ > 1/(10 n)``.

    (ε, δ)-DP allows a δ-probability failure per patient; with ``δ ≥ 1/n`` a mechanism that
    publishes one random patient's records in the clear qualifies. The usual rule takes δ well
    below ``1/n``; fedpriv requires a factor 10 at the site with the most training patients.
    """
    limit = 1.0 / (10 * num_patients) if num_patients > 0 else math.inf
    if delta > limit:
        raise PrivacyError(
            f"privacy.delta={delta:g} breaks the rule {DELTA_RULE}: {who} has {num_patients} "
            f"training patients, so δ must be ≤ 1/(10·{num_patients}) = {limit:.3g} "
            f"(a larger δ permits releasing a patient's records in the clear); use e.g. 1e-5"
        )


# --- accounting ------------------------------------------------------------------------------


def local_steps(rounds: int, local_epochs: int, sample_rate: float) -> int:
    """DP-SGD steps a client takes over a run: ``rounds × local_epochs × ⌈1/q⌉``."""
    return rounds * local_epochs * steps_per_epoch(sample_rate)


def steps_per_epoch(sample_rate: float) -> int:
    return math.ceil(1.0 / sample_rate - 1e-9)


def _accountant(mechanism: str) -> Any:  # opacus' IAccountant
    try:
        create = lookup(ACCOUNTANTS, mechanism, "privacy.accountant")
    except ValueError as exc:
        raise PrivacyError(str(exc)) from None
    return create()


# a run calibrates once (fl_core.federation.wiring.dp_recipe) and carries σ; the cache spares
# the runs of one recipe in one process (the audit's shadows, a sweep's seeds) the ~0.5 s each
@lru_cache(maxsize=256)
def calibrate_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest noise multiplier σ (to 0.01 in ε) such that ``steps`` Poisson-subsampled
    Gaussian steps at rate ``sample_rate`` are ``(epsilon, delta)``-DP under ``accountant``."""
    from opacus.accountants.utils import get_noise_multiplier

    _accountant(accountant)  # validates the name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant, epsilon_tolerance=0.01))
        except ValueError as exc:
            raise PrivacyError(
                f"privacy.epsilon={epsilon:g} cannot be met with δ={delta:g} over {steps} "
                f"steps at sample rate {sample_rate:g}: {exc}") from None


@lru_cache(maxsize=4096)
def epsilon_for_history(
    history: tuple[tuple[float, float, int], ...], delta: float, accountant: str
) -> float:
    """ε of a composition of ``(σ, q, steps)`` phases, from a fresh Opacus accountant."""
    if not history:
        return 0.0
    import numpy as np

    acc = _accountant(accountant)
    acc.history = list(history)
    # the PRV accountant takes log(0) at q = 1 by design; numpy's error state is per thread
    # (sites answer on threads), unlike the warnings filters
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str,
) -> float:
    """ε after ``steps`` steps of the subsampled Gaussian mechanism (0 for no steps)."""
    if steps == 0:
        return 0.0
    return epsilon_for_history(((noise_multiplier, sample_rate, steps),), delta, accountant)


def replace_one_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str,
) -> tuple[float, float]:
    """The run's guarantee under the *replace-one* relation, as ``(ε', δ')``.

    Replacing one patient's records moves the clipped sum by up to ``2C`` (remove one
    gradient, add another). With ``q = 1`` (full-batch DP-GD, the default) every step is a
    Gaussian mechanism of sensitivity ``2C``, i.e. noise multiplier ``σ/2``: exact,
    ``δ' = δ``. With Poisson sampling (``q < 1``) we use group privacy over the
    remove-then-add pair, ``(2ε, (1 + e^ε)·δ)``: an upper bound, not tight.
    """
    if steps == 0:
        return 0.0, delta
    if sample_rate >= 1.0:
        return epsilon_spent(noise_multiplier / 2.0, 1.0, steps, delta, accountant), delta
    epsilon = epsilon_spent(noise_multiplier, sample_rate, steps, delta, accountant)
    return 2.0 * epsilon, (1.0 + math.exp(epsilon)) * delta
