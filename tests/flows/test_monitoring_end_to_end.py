"""Monitoring end to end, against a real Pushgateway and Prometheus on 127.0.0.1 (issue 26,
"Must show"): a real ``fedpriv run`` in simulation with monitoring on, a sites-mode run over a
real federation endpoint (four site sessions, one refused by its own policy), a Byzantine
drill and a revoked site's connection attempt all push to the Pushgateway (the endpoint also
serves /metrics, scraped); then every metric family of the contract and every dashboard
panel's query is asked of Prometheus' HTTP API and must return series with the expected
labels; the flagged-clients panel returns exactly the attackers; and a ``promtool test rules``
case written from the scraped refusal series makes the TLS-refusal alert fire.

Everything runs once per module (the runs are the expensive part); each test reads the same
Prometheus. Under CI the tools must be there (``.ci/run`` installs them); elsewhere the
module is skipped without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters import grafana_dashboards, monitor_stack
from adapters.config_files import load_config
from tests.conftest import copy_project
from tests.monitoring import ENDPOINT_METRICS, PROCESS_METRICS, RUN_METRICS, require_tools
from tests.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
HEART_SITES = {"Cleveland", "Hungary", "Switzerland", "VA Long Beach"}
SITES_RUN = "run1"  # the run id tests/adapters/test_site_session.py's sessions are told
REFUSING_SITE = "Switzerland"  # its policy allows 1 round; the run asks for 2
REVOKED_SITE = "Hungary"  # revoked after the run; its next call is refused
STALE_SITE = "Cleveland"  # after the run, dials with an earlier run's id
DRILL_RUN = "published"  # the drill runs the stages outside a flow (as DVC does)
CHEAP = ["rounds=2", "privacy.randomness=reproducible", "audit.shadow_models=2"]

# Contract families a simulated `fedpriv run` does not produce, and why (checked absent for
# its run id, present where the sites-mode run produces them).
NOT_IN_SIMULATION = {
    "fedpriv_policy_refusals_total": "sites mode: a site's own policy or ledger refuses",
    "fedpriv_site_failures_total": "no site fails a round in these runs",
    "fedpriv_site_reputation": "anomaly detection needs anomaly.min_clients (5) updates: "
                               "heart has 4 sites (the drill has it)",
}
# ... and those the sites-mode run (rounds and audit at the sites, no publication) produces
SITES_FAMILIES = {
    "fedpriv_run_info", "fedpriv_run_started_timestamp_seconds", "fedpriv_rounds_planned",
    "fedpriv_round", "fedpriv_round_duration_seconds", "fedpriv_test_loss", "fedpriv_accuracy",
    "fedpriv_auc", "fedpriv_balanced_accuracy", "fedpriv_site_accuracy",
    "fedpriv_uplink_bytes_total", "fedpriv_uplink_dense_bytes_total",
    "fedpriv_downlink_bytes_total", "fedpriv_downlink_dense_bytes_total",
    "fedpriv_compression_ratio", "fedpriv_sites_ok", "fedpriv_site_last_seen_round",
    "fedpriv_updates_rejected_total", "fedpriv_updates_flagged_total",
    "fedpriv_updates_excluded_total", "fedpriv_site_flagged", "fedpriv_epsilon_spent",
    "fedpriv_epsilon", "fedpriv_delta", "fedpriv_epsilon_budget_left",
    "fedpriv_policy_refusals_total", "fedpriv_audit_attack_auc",
    *ENDPOINT_METRICS, *PROCESS_METRICS,
}
# panels whose queries need a failure no run here has (parsed, allowed empty)
EMPTY_PANELS = {"Site failures by reason"}


# ---- Prometheus' HTTP API -----------------------------------------------------------------

def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result; a refused query (parse error) fails the test."""
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        pytest.fail(f"Prometheus refused {expr!r}: {exc.code} {json.load(exc).get('error')}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(prometheus: str, expr: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    """Poll until ``expr`` returns series (a push is scraped ~1 s later here)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(prometheus, expr)
        if result:
            return result
        time.sleep(0.25)
    raise TimeoutError(f"no series for {expr} after {timeout_s} s")


def family_query(name: str, run_id: str | None = None, job: str | None = None) -> str:
    """A family's series (a histogram's by its ``_count``), for one run and job when given."""
    series = f"{name}_count" if RUN_METRICS.get(name, ENDPOINT_METRICS.get(name, ("",)))[0] \
        == "histogram" else name
    matchers = [f'{label}="{value}"' for label, value in (("run_id", run_id), ("job", job))
                if value]
    return f"{series}{{{', '.join(matchers)}}}" if matchers else series


# ---- the stack and the runs -----------------------------------------------------------------

class Monitored:
    """What the module's runs left for the tests to read."""

    def __init__(self, stack: monitor_stack.Stack, endpoint_listen: str,
                 site_listen: dict[str, str]) -> None:
        self.stack = stack
        self.endpoint_listen = endpoint_listen
        self.site_listen = site_listen  # each hospital's own /metrics (fedpriv-sites job)
        self.simulation_run = ""
        self.simulation_output = ""
        self.attackers: list[str] = []
        self.seconds: dict[str, float] = {}

    @property
    def prometheus(self) -> str:
        return self.stack.prometheus_url


def _simulation(monitored: Monitored, project: Path) -> None:
    """The real CLI, its own temporary Prefect server, monitoring on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(project / ".fedpriv" / "prefect")})
    overrides = [*CHEAP, "audit_dp.in_pipeline=true", "audit_dp.runs=2",
                 f"monitoring.pushgateway={monitored.stack.pushgateway_address}",
                 "monitoring.run_deadline_s=3600"]
    command = [sys.executable, "-m", "flows.cli", "run", "--root", str(project)]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    monitored.simulation_output = done.stdout + done.stderr
    match = re.search(r"\brun (\w+): workspace ", monitored.simulation_output)
    assert match, monitored.simulation_output[:3000]
    monitored.simulation_run = match.group(1)


def _drill(monitored: Monitored, project: Path) -> None:
    """A Byzantine drill in-process (the stages as DVC runs them: run id ``published``)."""
    from adapters.partition import partition_data
    from adapters.train import train_model
    from adapters.validate import validate_data

    cfg = load_config(project / "params.yaml", [
        "rounds=2", "privacy.randomness=reproducible", "audit.enabled=false",
        f"monitoring.pushgateway={monitored.stack.pushgateway_address}",
        "attack.kind=sign_flip", "attack.fraction=0.3", "data.partition=by_patient",
        "data.num_clients=10", "anomaly.min_clients=5"])
    for stage in (validate_data, partition_data, train_model):
        stage(cfg, project)
    trained = json.loads((project / "reports" / "train.json").read_text())
    monitored.attackers = sorted(trained["malicious_clients"])


def _sessions(cfg: Any, files: dict[str, Path], endpoint: Any, pki: Any, tmp: Path,
              watched: dict[str, Any]) -> list[threading.Thread]:
    """Each hospital's session (tests/adapters/test_site_session.py's), serving its own
    /metrics as flows/site_flow.py does with a site.yaml's ``monitoring.listen``; one of
    them with a policy that refuses the run."""
    from adapters.site_session import SiteSession, serve_site
    from tests.federation import TEST_POLICY, channel

    threads = []
    for index, (site, path) in enumerate(files.items()):
        policy = TEST_POLICY.model_copy(update={"max_rounds": 1}) if site == REFUSING_SITE \
            else TEST_POLICY
        session = SiteSession(channel(pki, endpoint, site), site, tmp / "state" / site,
                              SITES_RUN)
        thread = threading.Thread(target=serve_site, args=(cfg,), kwargs={
            "csv_path": path, "site": site, "index": index, "session": session,
            "idle_timeout_s": 60, "policy": policy, "metrics": watched[site]}, daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def _sites(monitored: Monitored, project: Path, tmp: Path) -> None:
    """Sites mode over a real endpoint, wired as flows/site_dispatch.run_at_sites wires it:
    the endpoint's metrics served on /metrics (scraped) and pushed when it stops, the site
    check's refusals, the rounds and the audit at the sites pushed; then the revoked site's
    connection attempt."""
    from adapters.audit import audit_at_sites
    from adapters.federation_endpoint import FederationEndpoint
    from adapters.metrics import SiteMetrics, endpoint_metrics, record_site_check
    from adapters.train import train_at_sites
    from fl_core.config.model import site_slug
    from fl_core.federation.messages import SiteReady
    from tests.adapters.test_site_session import _shutdown, _site_files
    from tests.federation import LOOPBACK, channel, make_pki, wait_ready

    cfg = load_config(project / "params.yaml", [
        *CHEAP, f"monitoring.pushgateway={monitored.stack.pushgateway_address}",
        f"monitoring.listen={monitored.endpoint_listen}"])
    pki = make_pki(tmp / "pki")
    files = _site_files(project, tmp / "sites")
    monitor = endpoint_metrics(cfg, SITES_RUN)
    assert monitor is not None
    endpoint = FederationEndpoint(listen=LOOPBACK, run_id=SITES_RUN, sites=list(files),
                                  tls=pki.tls, on_refusal=monitor.on_refusal)
    monitor.instrument(endpoint)
    endpoint.start()
    watched = {site: SiteMetrics(site, SITES_RUN) for site in files}
    for site, site_metrics in watched.items():
        site_metrics.serve(monitored.site_listen[site])
    threads = _sessions(cfg, files, endpoint, pki, tmp, watched)
    try:
        reports = wait_ready(endpoint, list(files))
        ready = {s: m for s, m in reports.items() if isinstance(m, SiteReady)}
        refused = {s: m.reason for s, m in reports.items() if s not in ready}
        assert list(refused) == [REFUSING_SITE], refused
        record_site_check(cfg, SITES_RUN, ready, refused)
        monitor.connected(len(ready))
        coordinator = tmp / "coordinator"
        train_at_sites(cfg, coordinator, SITES_RUN, endpoint, ready)
        audit_at_sites(cfg, coordinator, SITES_RUN, endpoint)
        _shutdown(endpoint)
        for thread in threads:
            thread.join(timeout=30)
        # a site still on an earlier run's id: a message refused (other_run)
        with pytest.raises(Exception, match="another run"):
            channel(pki, endpoint, STALE_SITE, run_id="run0").pull(0, wait_s=2)
        pki.revoke(site_slug(REVOKED_SITE))  # its certificate is revoked; it dials again
        with pytest.raises(Exception, match="revoked"):
            channel(pki, endpoint, REVOKED_SITE).pull(0, wait_s=2)
        # the endpoint's and the sites' /metrics scraped at least twice after the last
        # change, before they stop serving
        wait_for(monitored.prometheus, 'count_over_time(fedpriv_endpoint_tls_refusals_total'
                 '{job="fedpriv-endpoint", reason="revoked"}[1m]) >= 2')
        sessions_over = time.time()  # the sessions ended (joined) before this
        wait_for(monitored.prometheus, 'count(timestamp(fedpriv_site_bytes_total{job='
                 f'"fedpriv-sites", direction="in"}}) > {sessions_over + 0.5}) == {len(files)}')
    finally:
        for site_metrics in watched.values():
            site_metrics.stop()
        endpoint.stop()
        monitor.close()  # pushes the endpoint's counters with the run's, stops serving


@contextlib.contextmanager
def _stack(state: Path, endpoint: str, sites: list[str]) -> Iterator[monitor_stack.Stack]:
    """monitor_stack's Pushgateway and Prometheus (the project's scrape configuration and
    alert rules, every interval 1 s), its fedpriv-sites job reading a targets file of this
    test's (the checked-in ``targets/`` stays as it is); both stopped by PID."""
    targets = state / "targets"
    targets.mkdir()
    (targets / "sites.yml").write_text(yaml.safe_dump([{"targets": sites}]))
    pushgateway_port, prometheus_port = free_port(), free_port()
    pushgateway = f"127.0.0.1:{pushgateway_port}"
    config = monitor_stack.prometheus_config(pushgateway=pushgateway, endpoint=endpoint,
                                             scrape_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "fedpriv-sites"]
    job["file_sd_configs"] = [{"files": [str(targets / "*.yml")]}]
    started = []
    try:
        started.append(monitor_stack.start_pushgateway(pushgateway_port, state / "pushgateway"))
        monitor_stack.wait_ready(f"http://{pushgateway}/-/ready", started[-1])
        started.append(monitor_stack.start_prometheus(config, prometheus_port,
                                                      state / "prometheus"))
        prometheus = f"http://127.0.0.1:{prometheus_port}"
        monitor_stack.wait_ready(f"{prometheus}/-/ready", started[-1])
        yield monitor_stack.Stack(prometheus, f"http://{pushgateway}", pushgateway,
                                  monitor_stack.write_grafana_provisioning(state, prometheus))
    finally:
        for proc in reversed(started):
            monitor_stack.stop(proc)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    """Pushgateway and Prometheus on free loopback ports (1 s scrapes, the endpoint's
    /metrics among the targets), the runs pushed to them; both stopped by PID at the end
    (monitor_stack's finally), whatever fails."""
    require_tools("prometheus", "prometheus-pushgateway", "promtool")
    state = tmp_path_factory.mktemp("monitor")
    listen = f"127.0.0.1:{free_port()}"
    sites = {site: f"127.0.0.1:{free_port()}" for site in sorted(HEART_SITES)}
    with _stack(state, listen, list(sites.values())) as stack:
        monitored = Monitored(stack, listen, sites)
        for name, run in (
                ("simulation", lambda: _simulation(
                    monitored, copy_project(tmp_path_factory.mktemp("simulation")))),
                ("sites", lambda: _sites(monitored, copy_project(
                    tmp_path_factory.mktemp("sites-project")), tmp_path_factory.mktemp("sites"))),
                ("drill", lambda: _drill(
                    monitored, copy_project(tmp_path_factory.mktemp("drill"))))):
            started = time.perf_counter()
            run()
            monitored.seconds[name] = time.perf_counter() - started
        # rate() and increase() need two samples of the last pushes
        wait_for(monitored.prometheus,
                 f'count_over_time(fedpriv_round{{run_id="{DRILL_RUN}"}}[1m]) >= 2')
        yield monitored


# ---- the tests ------------------------------------------------------------------------------

def _labels(result: list[dict[str, Any]], label: str) -> set[str]:
    return {series["metric"].get(label, "") for series in result}


def test_a_simulated_run_gives_every_contract_family_with_its_labels(
        monitored: Monitored) -> None:
    run = monitored.simulation_run
    produced = {name: spec for name, spec in RUN_METRICS.items()
                if name not in NOT_IN_SIMULATION}
    empty, wrong = [], []
    for name, (_, labels) in produced.items():
        result = query(monitored.prometheus, family_query(name, run))
        if not result:
            empty.append(name)
            continue
        for series in result:
            metric = series["metric"]
            if metric.get("job") != "fedpriv" or not set(labels) <= set(metric):
                wrong.append((name, metric))
        if "site" in labels and _labels(result, "site") != HEART_SITES:
            wrong.append((name, _labels(result, "site")))
    assert empty == [] and wrong == []
    info = query(monitored.prometheus, f'fedpriv_run_info{{run_id="{run}"}}')
    assert [s["metric"]["mode"] for s in info] == ["simulation"]
    for name in NOT_IN_SIMULATION:  # listed: really not produced by a simulated run
        assert query(monitored.prometheus, family_query(name, run)) == [], name


def test_sites_mode_gives_the_site_and_endpoint_families(monitored: Monitored) -> None:
    prometheus = monitored.prometheus
    missing = [name for name in sorted(SITES_FAMILIES)
               if not query(prometheus, family_query(name))]
    assert missing == []
    for name in SITES_FAMILIES & set(RUN_METRICS):
        # the coordinator's pushes (the sites' own series are checked below)
        result = query(prometheus, family_query(name, SITES_RUN, job="fedpriv"))
        assert result, name
        if "site" in RUN_METRICS[name][1]:
            sites = _labels(result, "site")
            expected = {REFUSING_SITE} if name == "fedpriv_policy_refusals_total" \
                else HEART_SITES - {REFUSING_SITE}
            assert sites == expected, (name, sites)
    info = query(prometheus, f'fedpriv_run_info{{run_id="{SITES_RUN}"}}')
    assert [s["metric"]["mode"] for s in info] == ["sites"]
    # the endpoint, scraped on /metrics while it ran (stale since it stopped: its last
    # value), and pushed with the run when it stopped
    for job in ("fedpriv-endpoint", "fedpriv"):
        def last(selector: str, job: str = job) -> list[dict[str, Any]]:
            return query(prometheus, f'last_over_time({selector}{{job="{job}"}}[10m])')

        connected = last("fedpriv_endpoint_connected_sites")
        assert [float(s["value"][1]) for s in connected] == [3.0], job
        assert _labels(connected, "run_id") == {SITES_RUN}
        bytes_ = [s for s in last("fedpriv_endpoint_bytes_total") if float(s["value"][1]) > 0]
        assert _labels(bytes_, "direction") == {"in", "out"}, job
        calls = [s for s in last("fedpriv_endpoint_call_duration_seconds_count")
                 if float(s["value"][1]) > 0]
        assert _labels(calls, "call") == {"pull", "push"}, job
        refusals = last("fedpriv_endpoint_tls_refusals_total")
        assert {(s["metric"]["reason"], float(s["value"][1])) for s in refusals} == {
            ("revoked", 1.0)}, job
        refused = last("fedpriv_endpoint_messages_refused_total")
        assert {(s["metric"]["reason"], float(s["value"][1])) for s in refused} == {
            ("other_run", 1.0)}, job
        for name in PROCESS_METRICS:
            assert last(name), (name, job)


def test_sites_serve_their_own_families(monitored: Monitored) -> None:
    """Each hospital's /metrics (scraped by the fedpriv-sites job while its session ran):
    labelled with its own id, its rounds, bytes, ε and budget; the refusing site's refusal."""
    def last(name: str) -> dict[tuple[str, ...], float]:
        result = query(monitored.prometheus,
                       f'last_over_time({name}{{job="fedpriv-sites"}}[10m])')
        return {tuple(s["metric"].get(k, "") for k in ("site", "direction", "instance")):
                float(s["value"][1]) for s in result}

    trained = HEART_SITES - {REFUSING_SITE}
    instances = set(monitored.site_listen.values())
    answered = last("fedpriv_site_rounds_answered_total")
    assert {key[0]: value for key, value in answered.items()} == {
        **dict.fromkeys(trained, 2.0), REFUSING_SITE: 0.0}
    assert {key[2] for key in answered} == instances
    refusals = last("fedpriv_policy_refusals_total")
    assert {key[0]: value for key, value in refusals.items()} == {
        **dict.fromkeys(trained, 0.0), REFUSING_SITE: 1.0}
    sent = last("fedpriv_site_bytes_total")
    assert {(site, d) for (site, d, _), v in sent.items() if v > 0} == {
        (site, d) for site in trained for d in ("in", "out")}
    for name in ("fedpriv_epsilon_spent", "fedpriv_epsilon_budget_left",
                 "fedpriv_epsilon_lifetime_cap"):
        assert {key[0] for key, value in last(name).items() if value > 0} == trained, name
    for name in PROCESS_METRICS:
        assert {key[2] for key in last(name)} == instances, name


def _panel_runs(monitored: Monitored) -> dict[str, str]:
    """$run_id for each dashboard panel query: the simulated run's, the sites-mode run's (the
    policy refusals panel), the drill's (the flagged panels)."""
    return {"simulation": monitored.simulation_run, "sites": SITES_RUN, "drill": DRILL_RUN}


def test_every_dashboard_panel_query_returns_series(monitored: Monitored) -> None:
    empty, checked = [], 0
    for uid in grafana_dashboards.DASHBOARDS:
        board = grafana_dashboards.dashboard(uid)
        for title, expr in grafana_dashboards.expressions(board):
            results = {kind: query(monitored.prometheus, expr.replace("$run_id", run))
                       for kind, run in _panel_runs(monitored).items()}
            checked += 1
            if title in EMPTY_PANELS:
                continue
            if not any(results.values()):
                empty.append(f"{uid} / {title}: {expr}")
                continue
            filtered = "$run_id" in expr
            for kind, result in results.items():
                if filtered and result and "run_id" in result[0]["metric"]:
                    assert _labels(result, "run_id") == {_panel_runs(monitored)[kind]}, title
    assert empty == []
    assert checked > 50


def test_the_flagged_clients_panel_returns_exactly_the_attackers(monitored: Monitored) -> None:
    (expr,) = [e for t, e in grafana_dashboards.expressions(
        grafana_dashboards.dashboard("byzantine-detection")) if t == "Flagged clients"]
    assert expr == 'fedpriv_updates_flagged_total{run_id=~"$run_id"} > 0'
    result = query(monitored.prometheus, expr.replace("$run_id", DRILL_RUN))
    assert len(monitored.attackers) == 3
    assert sorted(_labels(result, "site")) == monitored.attackers
    # the simulated heart run and the sites-mode run flagged nobody
    for run in (monitored.simulation_run, SITES_RUN):
        assert query(monitored.prometheus, expr.replace("$run_id", run)) == []
    # the attackers carry the reputation, and no one else
    reputation = query(monitored.prometheus, f'fedpriv_site_reputation{{run_id="{DRILL_RUN}"}} > 0')
    assert sorted(_labels(reputation, "site")) == monitored.attackers


def _alert(name: str) -> dict[str, Any]:
    groups = yaml.safe_load((monitor_stack.PROMETHEUS_DIR / "alerts.yml").read_text())
    return next(r for g in groups["groups"] for r in g["rules"] if r.get("alert") == name)


def _series_text(metric: dict[str, str]) -> str:
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f'{metric["__name__"]}{{{labels}}}'


def test_a_revoked_sites_refusal_fires_the_tls_alert_in_a_rule_test_from_scraped_series(
        monitored: Monitored, tmp_path: Path) -> None:
    """The revoked site's refusal as Prometheus scraped it (one sample per second: the
    endpoint's /metrics, and the Pushgateway's copy once the endpoint pushed) becomes a
    ``promtool test rules`` case; the project's FedprivTLSRefusal must fire for each series."""
    scraped = query(monitored.prometheus,
                    'fedpriv_endpoint_tls_refusals_total{reason="revoked"}[10m]')
    assert {s["metric"]["job"] for s in scraped} == {"fedpriv-endpoint", "fedpriv"}
    rule = _alert("FedprivTLSRefusal")
    series, expected, last = [], [], 0
    for item in scraped:
        values = [float(v) for _, v in item["values"]]
        assert values and values[-1] == 1.0
        series.append({"series": _series_text(item["metric"]),
                       "values": " ".join(f"{v:g}" for v in values)})
        last = max(last, len(values) - 1)
        labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
        annotations = {
            key: text.replace("{{ $labels.reason }}", labels["reason"])
                     .replace("{{ $labels.instance }}", labels.get("instance", ""))
            for key, text in rule["annotations"].items()}
        expected.append({"exp_labels": {**labels, **rule["labels"]},
                         "exp_annotations": annotations})
    case = {"rule_files": [str(monitor_stack.PROMETHEUS_DIR / "alerts.yml")],
            "evaluation_interval": "1s",
            "tests": [{"interval": "1s", "input_series": series, "alert_rule_test": [
                {"eval_time": f"{last}s", "alertname": "FedprivTLSRefusal",
                 "exp_alerts": expected}]}]}
    test_file = tmp_path / "revoked_test.yml"
    test_file.write_text(yaml.safe_dump(case, sort_keys=False))
    done = subprocess.run(["promtool", "test", "rules", str(test_file)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr + test_file.read_text()
    assert "SUCCESS" in done.stdout + done.stderr


def test_the_runs_took(monitored: Monitored) -> None:
    """The whole module's cost, printed (docs/results.md)."""
    print("monitoring end to end:", {k: round(v, 1) for k, v in monitored.seconds.items()})
    assert monitored.seconds["simulation"] > 0
