"""Stage 4: membership-inference audit of the trained model; writes the report and ROC plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from prefect import task

from fl_core.audit import loss_threshold_attack
from fl_core.config import PipelineConfig
from tasks.common import Paths, task_options, write_json_atomic
from tasks.partition import load_client_data
from tasks.plots import roc_plot
from tasks.train import load_model


def audit_model(cfg: PipelineConfig, root: str | Path = ".") -> dict[str, Any]:
    """Attack the final model: members are all training patients, non-members all test ones."""
    paths = Paths.of(cfg, root)
    if not cfg.audit.enabled:
        report: dict[str, Any] = {"enabled": False, "seconds": 0.0}
        write_json_atomic(paths.audit, report)
        print("audit disabled (audit.enabled=false): MIA metrics stay null")
        return report
    started = time.perf_counter()
    data, _, _ = load_client_data(cfg, paths)
    model, _ = load_model(paths.model)
    result = loss_threshold_attack(
        model,
        torch.cat([d.x_train for d in data]), torch.cat([d.y_train for d in data]),
        torch.cat([d.x_test for d in data]), torch.cat([d.y_test for d in data]),
        seed=cfg.seed,
    )
    roc_plot(result.fpr, result.tpr, result.mia_auc,
             f"Membership inference ({result.attack})", paths.roc_plot)
    report = {
        "enabled": True,
        "attack": result.attack,
        **result.metrics(),
        "members": result.members,
        "non_members": result.non_members,
        "empirical_epsilon_lower_bound": None,  # comes with the full audit
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(paths.audit, report)
    print(f"audit ({result.attack}): AUC {result.mia_auc:.3f}, "
          f"attack accuracy {result.mia_attack_accuracy:.3f}, "
          f"TPR@1%FPR {result.mia_tpr_at_1pct_fpr:.3f} on {result.members}+{result.non_members}")
    return report


audit = task(**task_options("audit"))(audit_model)
