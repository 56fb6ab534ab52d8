"""The audits and the gate: membership inference (shadow models, LiRA, low-FPR metrics, an
empirical ε bound), the white-box DP canary audit and the promotion gate.

One concept per module: :mod:`~fl_core.audit.shadow` (shadow models' outputs and the Shokri
attack model), :mod:`~fl_core.audit.lira` (offline / online LiRA), :mod:`~fl_core.audit.bounds`
(the Clopper–Pearson ε lower bound), :mod:`~fl_core.audit.report` (metrics of one attack),
:mod:`~fl_core.audit.membership` (the balanced evaluation examples and all attacks on one
target, the loss-threshold baseline among them). Training the shadows is the
caller's: they must follow the target's own recipe.

:mod:`~fl_core.audit.federated` is the sites-mode audit (attacks at each site, histograms to
the coordinator); import it from there (it needs the site's training, ``fl_core.federation``).
:mod:`~fl_core.audit.dp_audit` with :mod:`~fl_core.audit.canary` and :mod:`~fl_core.audit.gdp`
is the white-box DP audit; :mod:`~fl_core.audit.gate` decides promotion.
"""

from fl_core.audit.bounds import (
    clopper_pearson_upper,
    empirical_epsilon_lower_bound,
    epsilon_lower_bound_at,
    epsilon_lower_bound_from_counts,
)
from fl_core.audit.lira import lira_offline, lira_online
from fl_core.audit.membership import AuditResult, balanced_indices, membership_audit
from fl_core.audit.report import AttackReport, attack_report, report_from_roc, tpr_at_fpr
from fl_core.audit.shadow import (
    ShadowOutputs,
    attack_features,
    half_splits,
    shokri_attack,
    true_class_logit,
)

__all__ = [
    "AttackReport", "AuditResult", "ShadowOutputs", "attack_features", "attack_report",
    "balanced_indices", "clopper_pearson_upper", "empirical_epsilon_lower_bound",
    "epsilon_lower_bound_at", "epsilon_lower_bound_from_counts", "half_splits",
    "lira_offline", "lira_online", "membership_audit", "report_from_roc", "shokri_attack",
    "tpr_at_fpr", "true_class_logit",
]
