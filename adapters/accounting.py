"""The privacy ledger at work for a run: plan a charge, refuse before training, charge after
training (the charge rules are :mod:`fl_core.privacy.accounting`)."""

from __future__ import annotations

from pathlib import Path

from adapters.ledger_store import PrivacyLedger
from adapters.tables import ClinicalTable
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.data.tables import Partition
from fl_core.federation.wiring import FederatedRun
from fl_core.privacy.accounting import (
    KIND_TRAIN,
    planned_charge,
    privacy_summary,
    released_charges,
    spent_charge,
)
from fl_core.privacy.dpsgd import DPSGDConfig
from fl_core.privacy.ledger import Charge, new_run_id
from fl_core.results import PrivacyReport


def open_ledger(cfg: PipelineConfig, root: Path, *, state_dir: Path | None = None
                ) -> PrivacyLedger:
    """The ledger at ``privacy.ledger`` (relative to ``root``) or in the state dir:
    ``state_dir`` when given (a site's own state folder), else the configured one."""
    path = cfg.ledger_path
    if state_dir is not None and not cfg.privacy.ledger:
        path = state_dir / path.name
    return PrivacyLedger(path if path.is_absolute() else root / path)


def plan_charge(
    cfg: PipelineConfig, root: Path, partition: Partition, *, dp: DPSGDConfig | None,
    kind: str = KIND_TRAIN,
) -> Charge:
    """What a DP-SGD run of ``cfg`` on ``partition`` will charge at the recipe ``dp`` (the
    run's, calibrated once where the run is set up), under a fresh ledger run id."""
    if dp is None:
        raise ConfigError("only a DP-SGD run (privacy.enabled=true) can be charged")
    table = ClinicalTable.get(cfg.data, root)
    return planned_charge(cfg, table.site_of_patient(), partition, dp.noise_multiplier,
                          new_run_id(), kind, table.record_keys())


def check_budget(
    cfg: PipelineConfig, root: Path, partition: Partition, *, dp: DPSGDConfig | None,
) -> Charge:
    """Refuse before training if this run would take a patient past the lifetime cap.

    Returns the planned charge; its ``run_id`` is the ledger run id of the charge made after
    training (:func:`charge_and_summarise`).
    """
    planned = plan_charge(cfg, root, partition, dp=dp)
    open_ledger(cfg, root).check(with_statistics(cfg, root, partition, planned),
                                 cfg.privacy.lifetime_epsilon)
    return planned


def with_statistics(cfg: PipelineConfig, root: Path, partition: Partition,
                    planned: Charge) -> list[Charge]:
    """A planned training charge and, beside it, what the run's released statistics will
    charge (:func:`released_charges`): what a run needs, checked together."""
    table = ClinicalTable.get(cfg.data, root)
    return [planned, *released_charges(cfg, table.site_of_patient(), partition, planned.run_id,
                                       table.record_keys())]


def charge_and_summarise(
    cfg: PipelineConfig, root: Path, partition: Partition, run: FederatedRun,
    run_id: str | None, kind: str = KIND_TRAIN,
) -> PrivacyReport:
    """Charge the ledger for a DP-SGD run's patients, then summarise its privacy.

    Call it before anything trained is written: if the charge is refused (a concurrent run
    took the budget), :class:`BudgetExceededError` propagates and no model exists.
    """
    charge = None
    if run.dp is not None and run_id is not None:
        table = ClinicalTable.get(cfg.data, root)
        charge = spent_charge(cfg, table.site_of_patient(), partition, run.dp, run.spent,
                              run_id, kind, table.record_keys())
        ledger = open_ledger(cfg, root)
        # the training charge, then what the run released about its patients (the evaluation)
        for each in (charge, *released_charges(cfg, table.site_of_patient(), partition, run_id,
                                               table.record_keys())):
            ledger.charge(each, cfg.privacy.lifetime_epsilon)
    return privacy_summary(cfg, charge, run.spent, run.dp, run.model_fixes,
                           len(run.result.history))
