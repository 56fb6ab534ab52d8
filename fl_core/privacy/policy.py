"""A site's privacy policy against what a run asks of it (issue 24's first part).

The policy is the hospital's (:class:`fl_core.config.site.SitePolicy`, in its own
``site.yaml``), never the coordinator's: the run's configuration arrives from the coordinator
and is checked here, at the site, before its ledger is charged or anything trains. Every rule
a run breaks is named, with the value asked and the limit, so that the coordinator can show
why the site stayed out.
"""

from __future__ import annotations

from fl_core.config.model import PipelineConfig
from fl_core.config.site import SitePolicy
from fl_core.privacy.release import audit_released, evaluations_of, statistics_epsilon


def policy_refusals(cfg: PipelineConfig, policy: SitePolicy, *,
                    noise_multiplier: float | None) -> list[str]:
    """The rules of ``policy`` the run ``cfg`` breaks (empty: it may run here).
    ``noise_multiplier`` is the σ the site's DP-SGD would train with (None: not private)."""
    privacy = cfg.privacy
    broken = []
    if policy.require_private and (not privacy.enabled or noise_multiplier is None):
        broken.append("privacy.enabled=false: this site trains only with DP-SGD "
                      "(policy.require_private)")
    if privacy.enabled and privacy.epsilon > policy.max_epsilon_per_run:
        broken.append(f"privacy.epsilon={privacy.epsilon:g} > policy.max_epsilon_per_run="
                      f"{policy.max_epsilon_per_run:g}")
    if noise_multiplier is not None and noise_multiplier < policy.min_noise_multiplier:
        broken.append(f"noise multiplier {noise_multiplier:.3g} < policy.min_noise_multiplier="
                      f"{policy.min_noise_multiplier:g}")
    if policy.require_secure and privacy.enabled and privacy.randomness != "secure":
        broken.append(f"privacy.randomness={privacy.randomness}: this site uses secure noise "
                      f"only (policy.require_secure)")
    if cfg.rounds > policy.max_rounds:
        broken.append(f"rounds={cfg.rounds} > policy.max_rounds={policy.max_rounds}")
    # policy.max_shadow_models is not checked: the sites-mode audit trains no shadow model at
    # the site (audit.shadow_models is the simulation audit's, where the data already is)
    return broken + release_refusals(cfg, policy)


def release_refusals(cfg: PipelineConfig, policy: SitePolicy) -> list[str]:
    """The rules of ``policy`` on the statistics the run would have the site release."""
    broken = []
    if not policy.release_audit and audit_released(cfg):
        broken.append("audit.enabled=true in sites mode: this site releases no audit "
                      "histograms (policy.release_audit=false)")
    statistics = statistics_epsilon(cfg)
    if statistics > policy.max_statistics_epsilon:
        broken.append(f"released statistics ({evaluations_of(cfg)} evaluation(s) at "
                      f"privacy.evaluation_noise={cfg.privacy.evaluation_noise:g}"
                      f"{audit_part(cfg)}) cost ε={statistics:.3g} > "
                      f"policy.max_statistics_epsilon={policy.max_statistics_epsilon:g}")
    return broken


def audit_part(cfg: PipelineConfig) -> str:
    return (f", the audit at privacy.audit_noise={cfg.privacy.audit_noise:g}"
            if audit_released(cfg) else "")
