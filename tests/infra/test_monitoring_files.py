"""infra/prometheus and infra/grafana hold what they claim: promtool accepts the scrape
configuration and the alert rules and passes their unit tests; every dashboard is the
generator's output, valid JSON with unique panel ids and the provisioned datasource; rules and
panels use only the contract's metric names; and every panel's query parses in a real
Prometheus and returns series for the contract's metrics as they are pushed."""

from __future__ import annotations

import json
import re
import subprocess
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
from tests.monitoring import METRIC_NAMES, metric_names, push_synthetic, require_tools
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "infra" / "prometheus"
GRAFANA = ROOT / "infra" / "grafana"
BOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
RUN_ID = "run-test"


def promtool(*args: str) -> subprocess.CompletedProcess:
    require_tools("promtool")
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args", [("check", "config", "prometheus.yml"),
                                  ("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts_test.yml")],
                         ids=lambda a: " ".join(a))
def test_promtool_accepts(args: tuple[str, ...]) -> None:
    done = promtool(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stdout + done.stderr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_has_severity_summary_description_runbook_and_both_test_cases() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        anchor = rule["alert"].lower()
        assert f"docs/monitoring.md#{anchor}" in rule["annotations"]["runbook"]
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no case that fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: none that doesn't"


def test_a_revoked_sites_connection_attempt_is_a_case_that_fires_the_tls_alert() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    revoked = [t for t in tests if any('reason="revoked"' in s["series"]
                                       for s in t["input_series"])]
    assert revoked
    fired = [a for t in revoked for c in t["alert_rule_test"] if c["alertname"] ==
             "FedprivTLSRefusal" for a in c.get("exp_alerts", [])]
    assert any(a["exp_labels"]["reason"] == "revoked" for a in fired)


def test_rules_and_tests_use_only_contract_metric_names() -> None:
    for name in ("alerts.yml", "alerts_test.yml"):
        used = metric_names((PROMETHEUS / name).read_text())
        assert used and used <= METRIC_NAMES, (name, used - METRIC_NAMES)


def test_dashboards_are_the_generators_output() -> None:
    assert {p.stem for p in BOARDS} == set(grafana_dashboards.DASHBOARDS)
    for path in BOARDS:
        assert path.read_text(encoding="utf-8") == grafana_dashboards.render(path.stem), (
            f"{path.name} is stale: run python -m adapters.grafana_dashboards")


def test_dashboards_are_valid_with_unique_ids_the_provisioned_datasource_and_run_id() -> None:
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "fedpriv.yaml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"] if d["type"] == "prometheus"}
    assert uids == {grafana_dashboards.DATASOURCE_UID}
    titles = set()
    for path in BOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        titles.add(board["title"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["run_id"]["definition"] == "label_values(fedpriv_round, run_id)"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] in uids and panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] in uids for t in panel["targets"])
            assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + \
                panel["gridPos"]["w"] <= 24
    assert titles == {"fedpriv — Training Overview", "fedpriv — Communication Efficiency",
                      "fedpriv — Byzantine Detection"}


def test_dashboards_have_privacy_and_security_panels() -> None:
    for path in BOARDS:
        exprs = " ".join(e for _, e in grafana_dashboards.expressions(json.loads(
            path.read_text(encoding="utf-8"))))
        assert "fedpriv_epsilon_budget_left" in exprs, path.name
        assert "fedpriv_endpoint_tls_refusals_total" in exprs, path.name


def test_dashboard_provisioning_points_at_the_dashboards() -> None:
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "fedpriv.yaml").read_text())["providers"][0]
    assert provider["type"] == "file"
    assert (ROOT / provider["options"]["path"]).resolve() == (GRAFANA / "dashboards").resolve()


def test_panels_use_only_contract_metric_names() -> None:
    for path in BOARDS:
        for title, expr in grafana_dashboards.expressions(json.loads(path.read_text())):
            used = metric_names(expr)
            assert used and used <= METRIC_NAMES, (path.name, title, used - METRIC_NAMES)


def test_docs_metric_list_names_everything_the_rules_and_panels_use() -> None:
    """docs/monitoring.md's metrics section is the contract the metrics module follows; once
    it lists names, whatever the rules and panels use must be among them."""
    page = ROOT / "docs" / "monitoring.md"
    text = page.read_text(encoding="utf-8") if page.exists() else ""
    section = re.search(r"^## Metrics\n(.*?)(?=^## )", text + "\n## ", re.S | re.M)
    documented = metric_names(section.group(1)) if section else set()
    if not documented:
        pytest.skip("docs/monitoring.md lists no metrics yet")
    used = set().union(*(metric_names(e) for p in BOARDS
                         for _, e in grafana_dashboards.expressions(json.loads(p.read_text()))))
    used |= metric_names((PROMETHEUS / "alerts.yml").read_text())
    assert used - documented == set()


def test_docs_describe_every_alert_and_every_panel() -> None:
    text = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
    for rule in alert_rules():
        assert f"### {rule['alert']}\n" in text, rule["alert"]
    dashboards = text[text.index("## Dashboards"):]
    dashboards = dashboards[:dashboards.index("\n## ")]
    for path in BOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        assert board["uid"] in dashboards, board["uid"]
        for panel in board["panels"]:
            assert panel["title"] in dashboards, (path.name, panel["title"])


def test_grafana_provisioning_copy_has_the_url_and_absolute_dashboards(tmp_path: Path) -> None:
    folder = monitor_stack.write_grafana_provisioning(tmp_path, "http://127.0.0.1:19090")
    datasource = yaml.safe_load((folder / "datasources" / "fedpriv.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://127.0.0.1:19090"
    assert datasource["datasources"][0]["uid"] == grafana_dashboards.DATASOURCE_UID
    provider = yaml.safe_load((folder / "dashboards" / "fedpriv.yaml").read_text())
    path = Path(provider["providers"][0]["options"]["path"])
    assert path.is_absolute() and sorted(path.glob("*.json")) == BOARDS


def test_prometheus_config_copy_fills_ports_and_absolute_files() -> None:
    config = monitor_stack.prometheus_config(pushgateway="127.0.0.1:19091",
                                             endpoint="127.0.0.1:19464")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["pushgateway"]["honor_labels"] is True
    assert jobs["pushgateway"]["static_configs"] == [{"targets": ["127.0.0.1:19091"]}]
    assert jobs["fedpriv-endpoint"]["static_configs"] == [{"targets": ["127.0.0.1:19464"]}]
    assert all(Path(f).is_absolute() for f in config["rule_files"])
    assert all(Path(f).is_absolute() for f in jobs["fedpriv-sites"]["file_sd_configs"][0]["files"])


# --- against a real Prometheus -----------------------------------------------------------------


def query(prometheus: str, expr: str) -> tuple[int, dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[monitor_stack.Stack]:
    """Pushgateway and Prometheus on free loopback ports, the Pushgateway scraped every
    second, the contract's metrics pushed once."""
    require_tools("prometheus", "prometheus-pushgateway")
    state = tmp_path_factory.mktemp("monitor")
    with monitor_stack.monitor_stack(state, prometheus_port=free_port(),
                                     pushgateway_port=free_port(),
                                     endpoint=f"127.0.0.1:{free_port()}",
                                     scrape_interval="1s") as running:
        push_synthetic(running.pushgateway_url, RUN_ID)
        _wait_for_scrapes(running.prometheus_url)
        yield running


def _wait_for_scrapes(prometheus: str, timeout_s: float = 30) -> None:
    """Until the pushed counters have two samples each (rate() and increase() need two)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = query(prometheus, 'count_over_time(fedpriv_round[1m]) >= 2')
        if status == 200 and body["data"]["result"]:
            return
        time.sleep(0.5)
    raise TimeoutError("the pushed series were not scraped twice")


def all_panel_expressions() -> list[tuple[str, str, str]]:
    return [(path.stem, title, expr) for path in BOARDS
            for title, expr in grafana_dashboards.expressions(json.loads(path.read_text()))]


@pytest.mark.integration
@pytest.mark.slow
def test_every_panel_query_parses_and_returns_series(stack: monitor_stack.Stack) -> None:
    empty, refused = [], []
    for board, title, expr in all_panel_expressions():
        status, body = query(stack.prometheus_url, expr.replace("$run_id", RUN_ID))
        if status != 200:
            refused.append(f"{board} / {title}: {status} {body.get('error')}")
        elif not body["data"]["result"]:
            empty.append(f"{board} / {title}: {expr}")
    assert refused == []
    assert empty == []


@pytest.mark.integration
@pytest.mark.slow
def test_a_malformed_query_is_refused_with_400(stack: monitor_stack.Stack) -> None:
    """What the test above relies on: a parse error is a 400, not an empty result."""
    status, body = query(stack.prometheus_url, "sum by (site (fedpriv_round)")
    assert status == 400 and body["errorType"] == "bad_data"


@pytest.mark.integration
@pytest.mark.slow
def test_prometheus_runs_the_projects_alert_rules(stack: monitor_stack.Stack) -> None:
    with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/rules", timeout=10) as r:
        groups = json.load(r)["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule["alert"] for rule in alert_rules()}
    assert all(rule["health"] != "err" for group in groups for rule in group["rules"])
