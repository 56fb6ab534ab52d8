"""The privacy-budget ledger: what every use of real patients has cost each patient, across runs.

**The account is the patient's records.** The guarantee is (ε, δ)-DP for the neighbouring
relation add/remove one patient, so the quantity to cap is what one patient's records have
been exposed to, over every training that used them. A patient is charged as
:class:`Records` and keyed by the fingerprint of their records' content
(:func:`patient_key`, :func:`fl_core.data.fingerprint.record_fingerprints`), never by their
id or site: renumbered ids, a renamed site, line endings, a BOM, row order, an extra column,
one file per site or the pooled file are the same account, and past charges are looked up
across every site of the ledger. The old key ``sha256(site ‖ 0x00 ‖ patient id)``
(:func:`id_key`) is looked up alongside (:func:`lookup_keys`), so ledgers written before keep
counting. Limits: identical records of two patients are one account (over-charged, never
under-charged); records changed beyond recognition are new data. The dataset label of a
charge is for display only.

**A charge** is one training on real patients: run id, kind (``train`` for the pipeline's
train task and ``fedpriv stage train``, ``audit-sweep``), dataset label, time, and per site
(:class:`SiteCharge`) δ, the accountant, the mechanism history ``[(σ, q, steps), ...]`` (what
an Opacus accountant takes as ``history``), the ε the run reports and the patients it trained.

**Composition.** For a patient ``p`` with charges ``C(p)``, two figures:

* basic: ``ε_basic(p) = Σ_{c∈C(p)} ε_c`` and ``δ(p) = Σ_{c∈C(p)} δ_c`` (sequential
  composition; always valid, loose);
* tight: ``ε_tight(p)`` = the ε a fresh accountant (``prv`` or ``rdp``) reports for the
  concatenated histories ``⊕_{c∈C(p)} history_c`` at ``δ_tight(p) = min_{c∈C(p)} δ_c``.
  Every charge is a sequence of subsampled Gaussian steps on ``p``'s data, so their
  concatenation is exactly the mechanism ``p`` has been exposed to, and that mechanism is
  (ε(δ), δ)-DP for every δ: no δ needs adding up. Reading it at the *smallest* δ any charge
  used makes the figure monotone: a new charge lengthens the history and can only keep or
  lower that δ, so the composed ε never decreases (read at Σδ, a small run added to a large
  one could lower it). ``ε_tight(p) ≤ ε_basic(p)`` up to the accountant's numerical error.

Patients with the same set of charges share one computation (grouped by the charges' ids), so
the accountant runs once per distinct group, never per patient. A site's figure is the
maximum over its patients (the worst-exposed patient), and what a planned run needs at a site
is the maximum over *that run's* patients of the tight composition including the run.

**The cap** ``privacy.lifetime_epsilon`` is enforced on the tight composition including the
planned run(s): the tight figure is a valid (ε, min δ) guarantee for every patient, and
capping the loose sum instead would refuse runs whose real cost is well within the cap.

Two operations keep the ledger honest:

* :meth:`PrivacyLedger.check` — before training: would the planned charge(s) keep every
  patient within the cap? If not, :class:`BudgetExceededError` and nothing is trained.
* :meth:`PrivacyLedger.charge` — after training and *before* the model is written: in one
  ``BEGIN IMMEDIATE`` transaction, check again with what was actually spent and insert. A run
  killed before the charge leaves no entry and no model; of two concurrent runs that each fit
  alone but not together, the second to commit is refused (SQLite serialises the write
  transactions) and writes no model.

Schema: tables ``ledger_charges``, ``ledger_site_charges`` and ``ledger_patients``. An older
file's dataset-keyed ``budget_entries`` table is left alone and not counted (its rows have no
patient sets or mechanism histories to compose); :meth:`PrivacyLedger.legacy_entries` counts
them so ``fedpriv budget`` can say so.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from fl_core.privacy.accountants import PrivacyError, epsilon_for_history

History = tuple[tuple[float, float, int], ...]  # (noise multiplier σ, sample rate q, steps)
# float rounding slack: a run that spends exactly what is left must fit
_TOLERANCE = 1e-9


# how a site's start-up refusal says it cannot afford the run: the coordinator then refuses
# the whole run before anything trains (adapters/site_reports.py)
BUDGET_REFUSAL = "cannot afford this run: "


class BudgetExceededError(PrivacyError):
    """Planned or spent ε would take some patient past the lifetime cap; ``needed_cap`` is
    the smallest ``privacy.lifetime_epsilon`` that would have allowed it."""

    def __init__(self, message: str, needed_cap: float = float("nan")) -> None:
        super().__init__(message)
        self.needed_cap = needed_cap


class MissingChargeError(PrivacyError):
    """A model's ledger charge is not in the ledger: it must not be registered."""


@dataclass(frozen=True, order=True)
class Records:
    """A patient as a charge names them: the fingerprint of their records' content
    (:func:`fl_core.data.fingerprint.record_fingerprints`: the account) and their id at the
    site (only to find charges a ledger recorded before accounts were fingerprints)."""

    fingerprint: str
    patient_id: int


def patient_key(site: str, patient: object) -> str:
    """The account of one patient: for :class:`Records`, the fingerprint of their records
    (site- and id-independent: renumbered ids, a renamed site, a reformatted or split file are
    the same account); for a bare id, the old key ``sha256(f"{site}\\x00{patient_id}")``
    (:func:`id_key`)."""
    if isinstance(patient, Records):
        return patient.fingerprint
    return id_key(site, patient)


def id_key(site: str, patient_id: object) -> str:
    """``sha256(f"{site}\\x00{patient_id}")`` (hex): how ledgers keyed a patient before
    accounts were fingerprints (still looked up, so their charges keep counting)."""
    return hashlib.sha256(f"{site}\x00{patient_id}".encode()).hexdigest()


def lookup_keys(site: str, patient: object) -> tuple[str, ...]:
    """Every key under which ``patient``'s past charges may be recorded: the account
    (:func:`patient_key`) and, for :class:`Records`, the old id key at ``site``. A patient's
    charges are the union over these keys (each charge counted once)."""
    if isinstance(patient, Records):
        return patient.fingerprint, id_key(site, patient.patient_id)
    return (id_key(site, patient),)


def new_run_id() -> str:
    """A fresh ledger run id (the charge is made before any MLflow run exists)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class SiteCharge:
    """One site's part of a charge: the mechanism its patients went through, and who they are.

    ``patients`` holds :class:`Records` (what every run builds: the account is the records'
    fingerprint) or bare patient ids at ``site`` (keyed by site and id, as before); the ledger
    stores only :func:`patient_key`.
    """

    site: str
    epsilon: float
    delta: float
    accountant: str
    history: History
    patients: frozenset[object]


@dataclass(frozen=True)
class Charge:
    """One training on real patients."""

    run_id: str
    kind: str
    dataset: str
    sites: tuple[SiteCharge, ...]


@dataclass(frozen=True)
class LedgerEntry:
    """One site's part of a recorded charge (patients as a count)."""

    run_id: str
    kind: str
    dataset: str
    created_at: float
    site: str
    epsilon: float
    delta: float
    accountant: str
    history: History
    patients: int


@dataclass(frozen=True)
class Composition:
    """What a group of patients with the same charges has spent (see the module docstring)."""

    charges: int
    basic_epsilon: float
    basic_delta: float
    tight_epsilon: float
    tight_delta: float  # the smallest δ of the charges: where the tight ε is read


@dataclass(frozen=True)
class GroupBalance:
    """Patients of one site that share one set of charges, and what they spent."""

    run_ids: tuple[str, ...]
    patients: int
    spent: Composition


@dataclass(frozen=True)
class SiteBalance:
    """A site's account: its worst-exposed patient's figures, and every group's."""

    site: str
    runs: int
    patients: int
    basic_epsilon: float
    basic_delta: float
    tight_epsilon: float
    tight_delta: float
    accountant: str
    groups: tuple[GroupBalance, ...]


@dataclass(frozen=True)
class _Past:
    """A recorded site charge as composition needs it."""

    id: int
    run_id: str
    epsilon: float
    delta: float
    history: History


@dataclass(frozen=True)
class SiteNeed:
    """What planned charges need at one site: before and after, for the worst patient."""

    site: str
    spent: float  # tight ε already spent by the planned runs' most-exposed patient
    planned_basic: float  # Σ ε of the planned charges alone
    planned_tight: float  # the planned charges composed alone (fresh patients)
    total: Composition  # the worst patient, ledger and planned charges together


def compose(charges: Sequence[tuple[float, float, History]], accountant: str) -> Composition:
    """Basic and tight composition of ``(ε, δ, history)`` charges on one patient.

    basic = (Σ ε, Σ δ); tight = a fresh ``accountant`` on ``⊕ history`` at δ = min δ
    (:func:`fl_core.privacy.accountants.epsilon_for_history`, cached by history).
    """
    history = tuple(step for _, _, h in charges for step in h)
    tight_delta = min((d for _, d, _ in charges), default=0.0)
    tight = epsilon_for_history(history, tight_delta, accountant) if history else 0.0
    return Composition(len(charges), sum(e for e, _, _ in charges),
                       sum(d for _, d, _ in charges), tight, tight_delta)


def _round_up(x: float) -> float:
    """``x`` rounded up to 3 significant digits (a cap that surely fits)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - 2)
    return math.ceil(x / scale - 1e-9) * scale
