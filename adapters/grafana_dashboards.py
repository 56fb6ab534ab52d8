"""The three Grafana dashboards of ``infra/grafana/dashboards/`` (Training Overview,
Communication Efficiency, Byzantine Detection), generated here so that every panel shares one
datasource uid, one ``run_id`` variable and unique ids, and so that a test can list every
panel's query and run it against a real Prometheus (Grafana itself cannot run on these
machines, and a dashboard's JSON says nothing about whether its queries parse).

Queries use only the metric names of docs/monitoring.md. Pushed series carry the run's
``run_id`` (the Pushgateway's grouping key); the endpoint's and the processes' series do not,
so their panels are not filtered by run.

``python -m adapters.grafana_dashboards`` rewrites the JSON files; a test checks that the
checked-in files are this module's output.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "infra" / "grafana" / "dashboards"
DATASOURCE_UID = "fedpriv-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
RUN = '{run_id=~"$run_id"}'
# the processes fedpriv runs (the endpoint, site sessions), not the Pushgateway or Prometheus
FEDPRIV_JOBS = '{job=~"fedpriv.*"}'


@dataclass(frozen=True)
class Panel:
    """One panel: its queries as (PromQL, legend) pairs. ``kind`` is Grafana's panel type;
    ``table`` panels query the last value only (instant), one row per series."""

    title: str
    queries: tuple[tuple[str, str], ...]
    description: str
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    mappings: tuple[tuple[str, str, str], ...] = ()  # value, text, colour
    red_below: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _stat(title: str, expr: str, legend: str, description: str, **extra: Any) -> Panel:
    return Panel(title, ((expr, legend),), description, kind="stat", width=6, height=4, **extra)


GATE = (("1", "passed", "green"), ("0", "refused", "red"))
VERDICT = (("1", "yes", "green"), ("0", "no", "red"))

BUDGET_LEFT = Panel(
    "ε budget left per site (share of lifetime cap)",
    ((f"fedpriv_epsilon_budget_left{RUN} / fedpriv_epsilon_lifetime_cap{RUN}", "{{site}}"),),
    "Each site's ledger after this run's charge. Below 10 % the FedprivEpsilonBudgetLow alert "
    "fires; at 0 the site refuses runs (exit 5).", kind="bargauge", unit="percentunit",
    red_below=0.1)
EPSILON_PER_SITE = Panel(
    "ε spent per site", ((f"fedpriv_epsilon_spent{RUN}", "{{site}}"),),
    "The DP-SGD ε each site reported for this run (patient-level, per site).")
POLICY_REFUSALS = Panel(
    "Policy refusals per site", ((f"sum by (site) (fedpriv_policy_refusals_total{RUN})",
                                  "{{site}}"),),
    "Runs or requests a site's privacy policy refused (its ledger, its data rules).")
TLS_REFUSALS = Panel(
    "TLS handshakes refused by reason (last hour)",
    (("sum by (reason) (increase(fedpriv_endpoint_tls_refusals_total[1h]))", "{{reason}}"),),
    "Refused by the federation endpoint: unknown_ca, expired, revoked, identity_mismatch. "
    "Any refusal fires FedprivTLSRefusal: a possible attack.")
MESSAGE_REFUSALS = Panel(
    "Messages refused by reason (last hour)",
    (("sum by (reason) (increase(fedpriv_endpoint_messages_refused_total[1h]))", "{{reason}}"),),
    "Messages from authenticated peers the endpoint refused. Any refusal fires "
    "FedprivMessageRefused.")
GATE_DECISION = _stat("Gate decision", f"fedpriv_gate_passed{RUN}", "{{run_id}}",
                      "The promotion gate's verdict on this run's model (refused: registered "
                      "as challenger only).", mappings=GATE)
ACCURACY = Panel(
    "Accuracy, AUC, balanced accuracy",
    ((f"fedpriv_accuracy{RUN}", "accuracy {{run_id}}"), (f"fedpriv_auc{RUN}", "AUC {{run_id}}"),
     (f"fedpriv_balanced_accuracy{RUN}", "balanced {{run_id}}")),
    "Pooled test metrics of the last evaluated round.", unit="percentunit")
TEST_LOSS = Panel("Test loss", ((f"fedpriv_test_loss{RUN}", "{{run_id}}"),),
                  "Pooled test loss of the last evaluated round.")
SITE_ACCURACY = Panel(
    "Site accuracy (as released, noisy)", ((f"fedpriv_site_accuracy{RUN}", "{{site}}"),),
    "Each site's test accuracy as it releases it under its privacy policy (noisy).",
    unit="percentunit")
SITE_FAILURES = Panel(
    "Site failures by reason", ((f"sum by (site, reason) (fedpriv_site_failures_total{RUN})",
                                 "{{site}} {{reason}}"),),
    "Rounds in which a site's update did not count: timeout, refused, error, payload, ...")
SITES_OK = _stat("Sites OK (last round)", f"fedpriv_sites_ok{RUN}", "{{run_id}}",
                 "Sites whose update counted in the last round.")
ROUND_SECONDS = Panel("Round duration", ((f"fedpriv_round_duration_seconds{RUN}", "{{run_id}}"),),
                      "Wall seconds of the last completed round.", unit="s")

TRAINING = (
    Row("Progress", (
        _stat("Round", f"fedpriv_round{RUN}", "{{run_id}}", "Last completed round."),
        _stat("Rounds planned", f"fedpriv_rounds_planned{RUN}", "{{run_id}}",
              "Rounds the run was configured for."),
        SITES_OK,
        _stat("Deadline in", f"fedpriv_run_deadline_timestamp_seconds{RUN} - time()",
              "{{run_id}}", "Seconds until the run's deadline (negative: past it; "
              "FedprivRunPastDeadline fires while it is not finished).", unit="s"),
        Panel("Run", ((f"fedpriv_run_info{RUN}", ""),),
              "The run's model, mode and dataset.", kind="table", width=12, height=5),
        Panel("Started and finished", (
            (f"fedpriv_run_started_timestamp_seconds{RUN} * 1000", "started {{run_id}}"),
            (f"fedpriv_run_finished_timestamp_seconds{RUN} * 1000", "finished {{run_id}}")),
            "When the run started and finished (absent until it finishes).", kind="stat",
            unit="dateTimeAsIso", height=5),
    )),
    Row("Training", (
        TEST_LOSS, ACCURACY, SITE_ACCURACY, ROUND_SECONDS,
        Panel("Rounds since each site last counted", (
            (f"fedpriv_round{RUN} - on(run_id) group_right fedpriv_site_last_seen_round{RUN}",
             "{{site}}"),),
            "0: the site's update counted in the last round. 3 or more fires "
            "FedprivSiteMissing.", kind="bargauge"),
        SITE_FAILURES,
    )),
    Row("Privacy budget", (
        EPSILON_PER_SITE, BUDGET_LEFT,
        Panel("Run ε and δ", ((f"fedpriv_epsilon{RUN}", "ε {{run_id}}"),
                              (f"fedpriv_delta{RUN}", "δ {{run_id}}")),
              "The run's accounted (ε, δ) per patient.", kind="stat", height=4),
        POLICY_REFUSALS,
    )),
    Row("Gate and audit", (
        GATE_DECISION,
        _stat("Gate refusals", f"sum(fedpriv_gate_refusals_total{RUN})", "refusals",
              "Runs whose model the gate refused champion."),
        _stat("DP audit passed", f"fedpriv_dp_audit_passed{RUN}", "{{run_id}}",
              "The white-box DP canary audit's verdict, when one exists.", mappings=VERDICT),
        _stat("Audit consistent with ε", f"fedpriv_audit_privacy_consistent{RUN}", "{{run_id}}",
              "1: the membership audit's ε lower bound does not exceed the accountant's ε.",
              mappings=VERDICT),
        Panel("Membership attack AUC", ((f"fedpriv_audit_attack_auc{RUN}", "{{attack}}"),),
              "Each attack's AUC against the model (0.5: no better than chance).",
              kind="bargauge"),
        Panel("Audit ε lower bound vs accounted ε", (
            (f"fedpriv_audit_epsilon_lower_bound{RUN}", "lower bound {{run_id}}"),
            (f"fedpriv_epsilon{RUN}", "accounted {{run_id}}")),
            "The empirical lower bound must stay below the accountant's ε.", kind="stat",
            height=4),
        Panel("Alias moves", (("sum by (model, alias) (fedpriv_alias_moves_total)",
                               "{{model}} {{alias}}"),),
              "Times a registry alias (challenger, champion) moved, by hand or by the gate.",
              kind="table"),
    )),
    Row("Security", (TLS_REFUSALS, MESSAGE_REFUSALS)),
)

COMMUNICATION = (
    Row("Bytes on the wire", (
        Panel("Uplink bytes: sent vs dense", (
            (f"fedpriv_uplink_bytes_total{RUN}", "sent {{run_id}}"),
            (f"fedpriv_uplink_dense_bytes_total{RUN}", "dense {{run_id}}")),
            "Sites → coordinator, cumulative; dense: what uncompressed float32 would take.",
            unit="bytes"),
        Panel("Downlink bytes: sent vs dense", (
            (f"fedpriv_downlink_bytes_total{RUN}", "sent {{run_id}}"),
            (f"fedpriv_downlink_dense_bytes_total{RUN}", "dense {{run_id}}")),
            "Coordinator → sites, cumulative.", unit="bytes"),
        Panel("Bytes per round", (
            (f"fedpriv_uplink_bytes_total{RUN} / (fedpriv_round{RUN} > 0)", "up {{run_id}}"),
            (f"fedpriv_downlink_bytes_total{RUN} / (fedpriv_round{RUN} > 0)",
             "down {{run_id}}")),
            "Mean bytes sent per completed round.", unit="bytes"),
        Panel("Compression ratio (uplink)", ((f"fedpriv_compression_ratio{RUN}", "{{run_id}}"),),
              "Dense / sent uplink bytes, cumulative.", kind="stat"),
        ROUND_SECONDS, SITES_OK,
    )),
    Row("Federation endpoint", (
        _stat("Connected sites", "fedpriv_endpoint_connected_sites", "{{run_id}}",
              "Sites connected to the endpoint now."),
        Panel("Endpoint bytes per second", (
            ("sum by (direction) (rate(fedpriv_endpoint_bytes_total[5m]))", "{{direction}}"),),
            "Bytes through the endpoint, in and out.", unit="Bps"),
        Panel("Call latency p50 / p95", (
            ("histogram_quantile(0.5, sum by (le, call) "
             "(rate(fedpriv_endpoint_call_duration_seconds_bucket[5m])))", "p50 {{call}}"),
            ("histogram_quantile(0.95, sum by (le, call) "
             "(rate(fedpriv_endpoint_call_duration_seconds_bucket[5m])))", "p95 {{call}}")),
            "Endpoint calls (pull, push), from the histogram.", unit="s"),
        Panel("Calls per second", (
            ("sum by (call) (rate(fedpriv_endpoint_call_duration_seconds_count[5m]))",
             "{{call}}"),), "Endpoint calls by kind.", unit="reqps"),
    )),
    Row("Failures, security and privacy", (SITE_FAILURES, TLS_REFUSALS, MESSAGE_REFUSALS,
                                           BUDGET_LEFT)),
    Row("Processes", (
        Panel("CPU", ((f"rate(process_cpu_seconds_total{FEDPRIV_JOBS}[5m])",
                       "{{job}} {{instance}}"),), "CPU seconds per second.", unit="percentunit"),
        Panel("Resident memory", ((f"process_resident_memory_bytes{FEDPRIV_JOBS}",
                                   "{{job}} {{instance}}"),), "", unit="bytes"),
        Panel("Open file descriptors (connections)", ((f"process_open_fds{FEDPRIV_JOBS}",
                                                       "{{job}} {{instance}}"),),
              "Open files and sockets of each fedpriv process."),
    )),
)

BYZANTINE = (
    Row("Flagged clients", (
        Panel("Flagged clients", ((f"fedpriv_updates_flagged_total{RUN} > 0", "{{site}}"),),
              "Every site the anomaly detector flagged in this run, with how often. Three or "
              "more fires FedprivClientFlagged.", kind="table"),
        Panel("Flagged in the last round", ((f"fedpriv_site_flagged{RUN} == 1", "{{site}}"),),
              "Sites flagged in the last completed round.", kind="table"),
        Panel("Flags per site", ((f"fedpriv_updates_flagged_total{RUN}", "{{site}}"),),
              "Cumulative flags per site."),
        Panel("Updates rejected per site", ((f"fedpriv_updates_rejected_total{RUN}", "{{site}}"),),
              "Updates refused by sanitation (malformed, non-finite, oversized)."),
        Panel("Updates excluded per site", ((f"fedpriv_updates_excluded_total{RUN}", "{{site}}"),),
              "Updates the reputation rule left out of the aggregate."),
        Panel("Reputation per site", ((f"fedpriv_site_reputation{RUN}", "{{site}}"),),
              "Each site's anomaly reputation (decays each round, +1 when flagged); a site is "
              "excluded while it is at or over anomaly.exclude_at."),
        SITES_OK,
    )),
    Row("Effect on the model", (ACCURACY, SITE_ACCURACY, TEST_LOSS, GATE_DECISION)),
    Row("Security and privacy", (TLS_REFUSALS, MESSAGE_REFUSALS, POLICY_REFUSALS,
                                 EPSILON_PER_SITE, BUDGET_LEFT)),
)

DASHBOARDS = {
    "training-overview": ("fedpriv — Training Overview", TRAINING),
    "communication-efficiency": ("fedpriv — Communication Efficiency", COMMUNICATION),
    "byzantine-detection": ("fedpriv — Byzantine Detection", BYZANTINE),
}


def _target(ref: str, expr: str, legend: str, instant: bool) -> dict[str, Any]:
    target: dict[str, Any] = {"refId": ref, "datasource": DATASOURCE, "expr": expr,
                              "legendFormat": legend}
    if instant:
        target.update(instant=True, range=False, format="table")
    return target


def _field_config(panel: Panel) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if panel.red_below is not None:
        steps = [{"color": "red", "value": None}, {"color": "green", "value": panel.red_below}]
    mappings = [{"type": "value", "options": {value: {"text": text, "color": colour}
                                              for value, text, colour in panel.mappings}}]
    return {"defaults": {"unit": panel.unit, "thresholds": {"mode": "absolute", "steps": steps},
                         "mappings": mappings if panel.mappings else []},
            "overrides": []}


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    instant = panel.kind in ("table", "bargauge", "stat")
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title,
        "description": panel.description, "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": [_target(chr(ord("A") + i), expr, legend, instant)
                    for i, (expr, legend) in enumerate(panel.queries)],
        "fieldConfig": _field_config(panel),
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
        if instant else {"legend": {"displayMode": "list", "placement": "bottom"}},
    }


def _layout(rows: tuple[Row, ...]) -> list[dict[str, Any]]:
    """Rows one under another; a row's panels left to right, wrapping at Grafana's 24
    columns. Ids count up from 1 across the dashboard."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in rows:
        panels.append({"id": len(panels) + 1, "type": "row", "title": row.title,
                       "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y, x, line = y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                y, x, line = y + line, 0, 0
            panels.append(_panel(panel, len(panels) + 1, x, y))
            x, line = x + panel.width, max(line, panel.height)
        y += line
    return panels


def dashboard(uid: str) -> dict[str, Any]:
    """The Grafana JSON model of one dashboard (schema 39, Grafana 10/11)."""
    title, rows = DASHBOARDS[uid]
    return {
        "uid": f"fedpriv-{uid}", "title": title, "tags": ["fedpriv"], "editable": True,
        "schemaVersion": 39, "version": 1, "timezone": "browser", "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "graphTooltip": 1,
        "annotations": {"list": []},
        "templating": {"list": [{
            "name": "run_id", "label": "Run", "type": "query", "datasource": DATASOURCE,
            "definition": "label_values(fedpriv_round, run_id)",
            "query": {"query": "label_values(fedpriv_round, run_id)", "refId": "run_id"},
            "refresh": 2, "sort": 2, "multi": True, "includeAll": True, "allValue": ".*",
            "current": {}, "options": [], "hide": 0,
        }]},
        "panels": _layout(rows),
    }


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (panel title, PromQL) of a dashboard's JSON."""
    return [(panel["title"], target["expr"]) for panel in board["panels"]
            for target in panel.get("targets", [])]


def render(uid: str) -> str:
    return json.dumps(dashboard(uid), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
    for uid in DASHBOARDS:
        (DASHBOARD_DIR / f"{uid}.json").write_text(render(uid), encoding="utf-8")
        print(DASHBOARD_DIR / f"{uid}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
