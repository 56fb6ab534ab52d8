"""A hospital's own metrics (adapters.metrics.SiteMetrics): its session serves /metrics where
its ``site.yaml`` says, with the budget left and the cap of its own ledger and policy after
the run's charge, the ε its reply reports, the rounds it answered; a refusal by its policy or
ledger is counted; a taken port only warns; without ``monitoring`` nothing listens and nothing
imports prometheus_client; a real Prometheus scraping a site gets the budget alert's data."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from adapters.config_files import load_config
from adapters.metrics import SiteMetrics
from adapters.site_session import SiteSession, serve_site
from fl_core.config.model import site_slug
from fl_core.config.site import SiteConfig, SitePolicy
from tests.adapters.test_site_session import OVERRIDES, _endpoint, _shutdown, _site_files
from tests.federation import ProjectPki, channel, make_pki, wait_ready
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
# what a site's /metrics carries besides the process collector's
SITE_FAMILIES = {"fedpriv_epsilon_budget_left", "fedpriv_epsilon_lifetime_cap",
                 "fedpriv_epsilon_spent", "fedpriv_policy_refusals_total",
                 "fedpriv_site_rounds_answered_total", "fedpriv_site_bytes_total"}


@pytest.fixture
def pki(tmp_path: Path) -> ProjectPki:
    return make_pki(tmp_path / "pki")


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """``/metrics`` as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _site_yaml(folder: Path, pki: ProjectPki, site: str, data: Path, **extra: object) -> Path:
    """A hospital's ``site.yaml`` naming its enrolled key and certificate and the CA."""
    slug = site_slug(site)
    pki.issued(slug)  # enrols the site: its key and certificate in its folder
    certs = pki.site_folder(slug)
    tree = {"site": site, "data": str(data), "state": str(folder / ".fedpriv-site"),
            "tls": {"key": str(certs / f"{slug}.key"), "cert": str(certs / f"{slug}.crt"),
                    "ca": str(pki.ca_dir / "ca.crt")}, **extra}
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_the_monitoring_key_is_optional_and_checked() -> None:
    base = {"site": "North", "data": "north.csv", "tls": {"key": "k", "cert": "c", "ca": "a"}}
    assert SiteConfig.model_validate(base).monitoring is None
    assert SiteConfig.model_validate({**base, "monitoring": None}).monitoring is None
    assert SiteConfig.model_validate(
        {**base, "monitoring": {}}).monitoring.listen == "127.0.0.1:9465"
    with pytest.raises(ValueError, match="listen"):
        SiteConfig.model_validate({**base, "monitoring": {"listen": "http://x:1/metrics"}})


def test_site_check_says_where_the_metrics_are(tmp_path: Path, pki: ProjectPki) -> None:
    from adapters.config_files import load_site_config
    from adapters.site_worker import check_site

    data = tmp_path / "north.csv"
    data.write_text("id\n1\n")
    lines = check_site(load_site_config(_site_yaml(tmp_path, pki, "North", data)))
    assert lines[-1] == "metrics: none (no monitoring in the file)"
    lines = check_site(load_site_config(_site_yaml(
        tmp_path, pki, "North", data, monitoring={"listen": "127.0.0.1:9999"})))
    assert lines[-1] == "metrics: http://127.0.0.1:9999/metrics while a session runs"


@pytest.mark.integration
@pytest.mark.slow
def test_a_sites_session_serves_its_own_ledger_and_policy_on_metrics(
        project: Path, tmp_path: Path, pki: ProjectPki,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Prefect flow's body (``fl_site.fn``) from a site.yaml with ``monitoring.listen``: a
    real endpoint asks one training round; while the session runs its /metrics has the
    budget its own ledger has left after the charge under its policy's cap (not the
    coordinator's ``privacy.lifetime_epsilon``), the ε its reply reported, one round
    answered; the port is free again once the session ended."""
    from adapters.ledger_store import PrivacyLedger
    from adapters.site_worker import SITE_CONFIG_ENV
    from fl_core.codec.dense import DenseCodec
    from fl_core.federation.messages import FitInstruction, FitReply, decode_message, encode_message
    from fl_core.federation.wiring import build_target_model
    from fl_core.model.networks import get_flat_params
    from flows.site_flow import fl_site

    cfg = load_config(project / "params.yaml", list(OVERRIDES))
    site, data = next(iter(_site_files(project, tmp_path / "sites").items()))
    port = free_port()
    config = _site_yaml(data.parent, pki, site, data,
                        policy={"require_secure": False, "lifetime_epsilon": 7.5},
                        monitoring={"listen": f"127.0.0.1:{port}"})
    monkeypatch.setenv(SITE_CONFIG_ENV, str(config))
    labels = {"site": site}
    run = {"run_id": "run1", "site": site}
    endpoint = _endpoint(pki, [site], "run1")
    stopped: list[str] = []
    session = threading.Thread(target=lambda: stopped.append(fl_site.fn(
        site=site, session="run1", index=0, charge_key="flowrun1",
        config=cfg.model_dump(mode="json"), endpoint=endpoint.address, idle_timeout_s=30)),
        daemon=True)
    session.start()
    try:
        (ready,) = wait_ready(endpoint, [site]).values()
        before = _scrape(port)  # started, nothing charged yet
        model, _ = build_target_model(cfg, ready.num_features)
        fit = FitInstruction("run1", 1, DenseCodec().encode(get_flat_params(model)), 1)
        replies = endpoint.exchange({site: encode_message(fit)}, deadline_s=120)
        reply = decode_message(replies[site], site=site, expect=FitReply)
        served = _scrape(port)
    finally:
        _shutdown(endpoint)
        session.join(timeout=60)
        endpoint.stop()
    assert stopped == ["shutdown"]

    def value(samples: dict, name: str, **want: str) -> float | None:
        return samples.get((name, frozenset(want.items())))

    assert cfg.privacy.lifetime_epsilon != 7.5
    assert value(before, "fedpriv_epsilon_budget_left", **labels) == ready.budget_left == 7.5
    assert value(before, "fedpriv_site_rounds_answered_total", **run) == 0
    balances = [b.tight_epsilon for b in PrivacyLedger(
        data.parent / ".fedpriv-site" / SitePolicy().ledger).balances() if b.site == site]
    assert balances and max(balances) > 0  # charged before the round was answered
    assert value(served, "fedpriv_epsilon_budget_left", **labels) == pytest.approx(
        7.5 - max(balances))
    assert value(served, "fedpriv_epsilon_lifetime_cap", **labels) == 7.5
    assert reply.epsilon is not None and reply.epsilon > 0
    assert value(served, "fedpriv_epsilon_spent", **run) == pytest.approx(reply.epsilon)
    assert value(served, "fedpriv_site_rounds_answered_total", **run) == 1
    assert value(served, "fedpriv_policy_refusals_total", **run) == 0
    assert value(served, "fedpriv_site_bytes_total", direction="in", **run) >= len(
        encode_message(fit))
    assert value(served, "fedpriv_site_bytes_total", direction="out", **run) == len(
        replies[site])
    names = {name for name, _ in served}
    assert "process_resident_memory_bytes" in names and "process_cpu_seconds_total" in names
    assert {n for n in names if n.startswith("fedpriv_")} >= SITE_FAMILIES
    with pytest.raises(OSError):  # stopped with the session
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def _refused_run(cfg, pki: ProjectPki, data: Path, site: str, state: Path, run_id: str,
                 policy: SitePolicy, watched: SiteMetrics) -> str:
    with _endpoint(pki, [site], run_id) as endpoint:
        _shutdown(endpoint)
        return serve_site(cfg, csv_path=data, site=site, index=0,
                          session=SiteSession(channel(pki, endpoint, site), site, state, run_id),
                          idle_timeout_s=5, policy=policy, metrics=watched)


@pytest.mark.integration
@pytest.mark.slow
def test_refusals_by_the_sites_policy_or_ledger_are_counted_and_a_taken_port_only_warns(
        project: Path, tmp_path: Path, pki: ProjectPki,
        capsys: pytest.CaptureFixture[str]) -> None:
    site, data = next(iter(_site_files(project, tmp_path / "sites").items()))
    watched = SiteMetrics(site, "runC")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        watched.serve(f"127.0.0.1:{taken.getsockname()[1]}")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "monitoring" in line]
    assert len(warnings) == 1 and "cannot serve /metrics" in warnings[0]
    assert "the session goes on" in warnings[0]

    def refusals() -> float | None:
        return watched.metrics.registry.get_sample_value(
            "fedpriv_policy_refusals_total", {"run_id": "runC", "site": site})

    assert refusals() == 0
    bold = load_config(project / "params.yaml", [*OVERRIDES, "rounds=50"])
    why = _refused_run(bold, pki, data, site, tmp_path / "state", "runC",
                       SitePolicy(require_secure=False, max_rounds=10), watched)
    assert why == "refused by policy" and refusals() == 1
    # a budget it cannot afford: refused by its ledger, its budget (untouched) reported
    cfg = load_config(project / "params.yaml", list(OVERRIDES))
    why = _refused_run(cfg, pki, data, site, tmp_path / "state", "runC",
                       SitePolicy(require_secure=False, lifetime_epsilon=0.01), watched)
    assert why == "cannot afford the run" and refusals() == 2
    registry = watched.metrics.registry
    assert registry.get_sample_value("fedpriv_epsilon_budget_left", {"site": site}) == 0.01
    assert registry.get_sample_value("fedpriv_epsilon_lifetime_cap", {"site": site}) == 0.01
    assert registry.get_sample_value("fedpriv_site_rounds_answered_total",
                                     {"run_id": "runC", "site": site}) == 0
    watched.stop()


@pytest.mark.slow
def test_without_monitoring_in_site_yaml_nothing_listens_or_imports(
        tmp_path: Path, pki: ProjectPki) -> None:
    """In a fresh interpreter: the session's modules and a site.yaml without ``monitoring``
    give no metrics object and never import prometheus_client (the Prefect flow's process
    imports it with Prefect itself, which fedpriv does not control)."""
    data = tmp_path / "north.csv"
    data.write_text("id\n1\n")
    config = _site_yaml(tmp_path, pki, "North", data)
    script = textwrap.dedent(f"""
        import sys
        import adapters.site_session
        from adapters.config_files import load_site_config
        from adapters.metrics import site_metrics
        files = load_site_config({str(config)!r})
        print(files.config.monitoring, site_metrics(files.config.monitoring, "North", "r1"))
        print("IMPORTED" if "prometheus_client" in sys.modules else "NOT IMPORTED")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout.splitlines()
    assert out[-2:] == ["None None", "NOT IMPORTED"]


@pytest.mark.integration
@pytest.mark.slow
def test_prometheus_scraping_a_site_gets_the_budget_alerts_data(tmp_path: Path) -> None:
    """A real Prometheus with the checked-in scrape configuration, its fedpriv-sites job
    pointed at a site's /metrics: the budget alert's expression returns the site, labelled
    with its own id, and the alert fires (no run_id: the site's series are not a run's)."""
    from adapters.monitor_stack import prometheus_config, start_prometheus, stop, wait_ready
    from tests.monitoring import require_tools

    require_tools("prometheus")
    watched = SiteMetrics("VA Long Beach", "run1")
    watched.budget(0.4, 5.0)
    site_port, prom_port = free_port(), free_port()
    watched.serve(f"127.0.0.1:{site_port}")
    targets = tmp_path / "targets.yml"
    targets.write_text(yaml.safe_dump([{"targets": [f"127.0.0.1:{site_port}"]}]))
    config = prometheus_config(pushgateway="127.0.0.1:9", endpoint="127.0.0.1:9",
                               scrape_interval="1s")
    (sites,) = [job for job in config["scrape_configs"] if job["job_name"] == "fedpriv-sites"]
    sites["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
    proc = start_prometheus(config, prom_port, tmp_path / "prometheus")
    api = f"http://127.0.0.1:{prom_port}/api/v1/query?query="
    try:
        wait_ready(f"http://127.0.0.1:{prom_port}/-/ready", proc)
        deadline, ratio, alerts = time.monotonic() + 60, [], []
        while time.monotonic() < deadline and not (ratio and alerts):
            time.sleep(0.5)
            ratio, alerts = (json.loads(urllib.request.urlopen(
                api + urllib.parse.quote(query), timeout=5).read())["data"]["result"]
                for query in ("fedpriv_epsilon_budget_left / fedpriv_epsilon_lifetime_cap",
                              'ALERTS{alertname="FedprivEpsilonBudgetLow"}'))
    finally:
        stop(proc)
        watched.stop()
    assert [(r["metric"]["site"], r["metric"]["job"], float(r["value"][1])) for r in ratio] == [
        ("VA Long Beach", "fedpriv-sites", pytest.approx(0.08))]
    assert "exported_site" not in ratio[0]["metric"] and "run_id" not in ratio[0]["metric"]
    assert [a["metric"]["site"] for a in alerts] == ["VA Long Beach"]
