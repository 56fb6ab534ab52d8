"""Shared pieces of the monitoring tests: the metric-name contract (docs/monitoring.md's
metrics, as the rules and dashboards may use them), the tools' check (a failure under CI,
which installs them in ``.ci/run``; a skip elsewhere), and a synthetic push of every contract
metric with its labels, to check queries against the series' real shape."""

from __future__ import annotations

import os
import re

import pytest

# name → (type, labels besides the Pushgateway's job and run_id grouping key). ``endpoint``
# metrics are served on /metrics by the federation endpoint (no run_id); ``process_*`` come
# from prometheus_client's process collector.
RUN_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fedpriv_run_info": ("gauge", ("model", "mode", "dataset")),
    "fedpriv_run_started_timestamp_seconds": ("gauge", ()),
    "fedpriv_run_finished_timestamp_seconds": ("gauge", ()),
    "fedpriv_run_deadline_timestamp_seconds": ("gauge", ()),
    "fedpriv_rounds_planned": ("gauge", ()),
    "fedpriv_round": ("gauge", ()),
    "fedpriv_round_duration_seconds": ("gauge", ()),
    "fedpriv_test_loss": ("gauge", ()),
    "fedpriv_accuracy": ("gauge", ()),
    "fedpriv_auc": ("gauge", ()),
    "fedpriv_balanced_accuracy": ("gauge", ()),
    "fedpriv_site_accuracy": ("gauge", ("site",)),
    "fedpriv_uplink_bytes_total": ("counter", ()),
    "fedpriv_uplink_dense_bytes_total": ("counter", ()),
    "fedpriv_downlink_bytes_total": ("counter", ()),
    "fedpriv_downlink_dense_bytes_total": ("counter", ()),
    "fedpriv_compression_ratio": ("gauge", ()),
    "fedpriv_sites_ok": ("gauge", ()),
    "fedpriv_site_failures_total": ("counter", ("site", "reason")),
    "fedpriv_site_last_seen_round": ("gauge", ("site",)),
    "fedpriv_updates_rejected_total": ("counter", ("site",)),
    "fedpriv_updates_flagged_total": ("counter", ("site",)),
    "fedpriv_updates_excluded_total": ("counter", ("site",)),
    "fedpriv_site_flagged": ("gauge", ("site",)),
    "fedpriv_site_reputation": ("gauge", ("site",)),
    "fedpriv_epsilon_spent": ("gauge", ("site",)),
    "fedpriv_epsilon": ("gauge", ()),
    "fedpriv_delta": ("gauge", ()),
    "fedpriv_epsilon_budget_left": ("gauge", ("site",)),
    "fedpriv_epsilon_lifetime_cap": ("gauge", ("site",)),
    "fedpriv_policy_refusals_total": ("counter", ("site",)),
    "fedpriv_audit_attack_auc": ("gauge", ("attack",)),
    "fedpriv_audit_epsilon_lower_bound": ("gauge", ()),
    "fedpriv_audit_privacy_consistent": ("gauge", ()),
    "fedpriv_dp_audit_passed": ("gauge", ()),
    "fedpriv_gate_passed": ("gauge", ()),
    "fedpriv_gate_refusals_total": ("counter", ()),
    "fedpriv_alias_moves_total": ("counter", ("model", "alias")),
}
ENDPOINT_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fedpriv_endpoint_connected_sites": ("gauge", ("run_id",)),
    "fedpriv_endpoint_tls_refusals_total": ("counter", ("reason",)),
    "fedpriv_endpoint_messages_refused_total": ("counter", ("reason",)),
    "fedpriv_endpoint_bytes_total": ("counter", ("direction",)),
    "fedpriv_endpoint_call_duration_seconds": ("histogram", ("call",)),
}
PROCESS_METRICS = ("process_cpu_seconds_total", "process_resident_memory_bytes",
                   "process_open_fds")
METRIC_NAMES = frozenset({*RUN_METRICS, *ENDPOINT_METRICS, *PROCESS_METRICS})
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names(promql: str) -> set[str]:
    """The fedpriv and process metric names a PromQL expression (or any text) uses, a
    histogram's _bucket/_count/_sum series counted as the histogram."""
    names = set(re.findall(r"\b(?:fedpriv|process)_[a-z0-9_]*[a-z0-9]", promql))
    out = set()
    for name in names:
        base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES
                     if name.endswith(s) and name.removesuffix(s) in METRIC_NAMES), name)
        out.add(base)
    return out


def require_tools(*names: str) -> None:
    """Under CI (``CI=true``; ``.ci/run`` installs the Debian packages) a missing tool is a
    failure, since these tests must run there; elsewhere a skip that says how to install."""
    from adapters.monitor_stack import APT_COMMAND, missing_tools

    missing = missing_tools(names)
    if not missing:
        return
    message = f"not installed: {', '.join(missing)} ({APT_COMMAND})"
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"under CI: {message}")
    pytest.skip(message)


def push_synthetic(pushgateway: str, run_id: str, sites: tuple[str, ...] = ("north", "south"),
                   ) -> None:
    """Push one series (per site, where a metric has a site) of every contract metric: the
    run's under ``{job="fedpriv", run_id}``, the endpoint's and a process collector's under
    ``{job="fedpriv-endpoint"}``, as the Pushgateway and /metrics would give them."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        ProcessCollector,
        push_to_gateway,
    )

    def fill(metrics: dict[str, tuple[str, tuple[str, ...]]], registry: CollectorRegistry) -> None:
        kinds = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}
        for name, (kind, labels) in metrics.items():
            metric = kinds[kind](name, name, labels, registry=registry)
            for site in sites:
                values = {label: site if label == "site" else f"{label}_1" for label in labels}
                child = metric.labels(**values) if labels else metric
                {"gauge": lambda c: c.set(1), "counter": lambda c: c.inc(3),
                 "histogram": lambda c: c.observe(0.05)}[kind](child)

    run = CollectorRegistry()
    fill(RUN_METRICS, run)
    push_to_gateway(pushgateway, job="fedpriv", grouping_key={"run_id": run_id}, registry=run)
    endpoint = CollectorRegistry()
    fill(ENDPOINT_METRICS, endpoint)
    ProcessCollector(registry=endpoint)
    push_to_gateway(pushgateway, job="fedpriv-endpoint", registry=endpoint)
