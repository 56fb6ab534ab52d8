"""The run's Prometheus metrics (adapters.metrics): each stage's families in a registry of its
own, read back with ``get_sample_value``; a Byzantine drill flags exactly the attackers; with
monitoring off nothing imports prometheus_client; one push to a real Pushgateway."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from adapters.config_files import load_config
from adapters.metrics import (
    EndpointMetrics,
    RunMetrics,
    failure_code,
    run_metrics,
    tls_refusal_reason,
)
from fl_core.federation.channel import Refusal
from fl_core.federation.coordinator import RoundRecord
from fl_core.results import AuditReport
from tests.conftest import copy_project

ROOT = Path(__file__).resolve().parents[2]
RUN = "abc123"
CHEAP = ["rounds=2", "privacy.randomness=reproducible", "audit.enabled=false",
         "monitoring.pushgateway=127.0.0.1:9"]


def _value(metrics: RunMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def _record(round_idx: int, **fields: Any) -> RoundRecord:
    base: dict[str, Any] = dict(
        round=round_idx, train_loss=math.nan, test_loss=0.5, accuracy=0.75, auc=0.8,
        balanced_accuracy=0.7, bytes_uploaded=100, bytes_downloaded=400,
        bytes_uploaded_uncompressed=300, bytes_downloaded_uncompressed=400, clients_ok=2,
        aggregated_clients=["a", "b"], client_accuracy={"a": 0.7, "b": 0.8, "c": 0.6},
        seconds=1.5)
    return RoundRecord(**{**base, **fields})


def test_the_round_sink_fills_every_per_round_family() -> None:
    metrics = RunMetrics(RUN)
    metrics.on_round(_record(1, failed_clients=["c"],
                             failure_reasons={"c": "no update (missed the round deadline of 5 s)"},
                             flagged_clients=["b"]))
    metrics.on_round(_record(2, test_loss=math.nan, accuracy=math.nan, auc=math.nan,
                             balanced_accuracy=math.nan, client_accuracy={},
                             aggregated_clients=["a", "c"], rejected_clients=["b"]))
    run = {"run_id": RUN}
    assert _value(metrics, "fedpriv_round", **run) == 2
    assert _value(metrics, "fedpriv_accuracy", **run) == 0.75  # round 2 was not evaluated
    assert _value(metrics, "fedpriv_test_loss", **run) == 0.5
    assert _value(metrics, "fedpriv_uplink_bytes_total", **run) == 200
    assert _value(metrics, "fedpriv_uplink_dense_bytes_total", **run) == 600
    assert _value(metrics, "fedpriv_downlink_bytes_total", **run) == 800
    assert _value(metrics, "fedpriv_compression_ratio", **run) == 3.0
    assert _value(metrics, "fedpriv_site_accuracy", site="c", **run) == 0.6
    assert _value(metrics, "fedpriv_site_last_seen_round", site="b", **run) == 1
    assert _value(metrics, "fedpriv_site_last_seen_round", site="c", **run) == 2
    assert _value(metrics, "fedpriv_site_failures_total", site="c", reason="timeout",
                  **run) == 1
    assert _value(metrics, "fedpriv_updates_flagged_total", site="b", **run) == 1
    assert _value(metrics, "fedpriv_updates_flagged_total", site="a", **run) == 0
    assert _value(metrics, "fedpriv_updates_rejected_total", site="b", **run) == 1
    assert _value(metrics, "fedpriv_site_flagged", site="b", **run) == 0  # not in round 2
    assert _value(metrics, "fedpriv_round_duration_seconds", **run) == 1.5


def test_failure_reasons_become_bounded_codes() -> None:
    assert failure_code("no update (missed the round deadline of 300 s)") == "timeout"
    assert failure_code("evaluation failed (site reported failure: boom)") == "evaluation"
    assert failure_code("undecodable payload: truncated") == "payload"
    assert failure_code("update has non-finite values") == "payload"
    assert failure_code("no update (site reported failure: OSError)") == "error"
    assert failure_code("something new") == "other"


def test_audit_gate_aliases_and_privacy_recorders() -> None:
    metrics = RunMetrics(RUN)
    metrics.record_audit(AuditReport(enabled=True, seconds=1.0, attacks=[
        {"attack": "loss", "auc": 0.52}, {"attack": "lira", "auc": 0.55}],
        empirical_epsilon_lower_bound=0.1, privacy_consistent=True))
    metrics.record_dp_audit(None)  # no verdict: no series
    metrics.record_gate(False)
    metrics.record_aliases("fedpriv-heart", ["challenger"])
    metrics.record_policy_refusals(["Hungary"])
    run = {"run_id": RUN}
    assert _value(metrics, "fedpriv_audit_attack_auc", attack="lira", **run) == 0.55
    assert _value(metrics, "fedpriv_audit_epsilon_lower_bound", **run) == 0.1
    assert _value(metrics, "fedpriv_audit_privacy_consistent", **run) == 1
    assert _value(metrics, "fedpriv_dp_audit_passed", **run) is None
    assert _value(metrics, "fedpriv_gate_passed", **run) == 0
    assert _value(metrics, "fedpriv_gate_refusals_total", **run) == 1
    assert _value(metrics, "fedpriv_alias_moves_total", model="fedpriv-heart",
                  alias="challenger") == 1
    assert _value(metrics, "fedpriv_policy_refusals_total", site="Hungary", **run) == 1


def test_a_stage_registry_holds_only_the_families_it_used() -> None:
    """A push (POST) replaces the families it carries: an audit stage's push must not blank
    the training stage's series with empty families."""
    metrics = RunMetrics(RUN)
    metrics.record_gate(True)
    names = {m.name for m in metrics.registry.collect()}
    assert names == {"fedpriv_gate_passed", "fedpriv_gate_refusals"}


def test_endpoint_refusals_by_reason() -> None:
    assert tls_refusal_reason(Refusal.IDENTITY, "revoked: serial 12") == "revoked"
    assert tls_refusal_reason(Refusal.IDENTITY, "unknown CA: issuer x") == "unknown_ca"
    assert tls_refusal_reason(Refusal.IDENTITY, "expired: not after y") == "expired"
    assert tls_refusal_reason(Refusal.WRONG_SITE, "claims b") == "identity_mismatch"
    assert tls_refusal_reason(Refusal.IDENTITY, "no client certificate") == "identity_mismatch"
    assert tls_refusal_reason(Refusal.LATE, "reply 3") is None
    seen: list[str] = []
    monitor = EndpointMetrics(RunMetrics(RUN), forward=lambda peer, reason, detail:
                              seen.append(peer))
    monitor.on_refusal("ipv4:1", Refusal.IDENTITY, "revoked: serial 12")
    monitor.on_refusal("Hungary", Refusal.REPLAY, "seq 4")
    monitor.connected(3)
    registry = monitor.metrics.registry
    assert registry.get_sample_value("fedpriv_endpoint_tls_refusals_total",
                                     {"reason": "revoked"}) == 1
    assert registry.get_sample_value("fedpriv_endpoint_messages_refused_total",
                                     {"reason": "replay"}) == 1
    assert registry.get_sample_value("fedpriv_endpoint_connected_sites", {"run_id": RUN}) == 3
    assert seen == ["ipv4:1", "Hungary"]  # the endpoint's own printing still happens


def test_monitoring_off_gives_no_metrics_object(project: Path) -> None:
    cfg = load_config(project / "params.yaml", [])
    assert not cfg.monitoring.enabled and run_metrics(cfg, RUN) is None


def test_a_failed_push_warns_once_and_never_raises(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.servers import free_port

    metrics = RunMetrics(RUN, pushgateway=f"127.0.0.1:{free_port()}",  # nothing listens
                         push_every_round=True)
    metrics.on_round(_record(1))
    metrics.on_round(_record(2))  # the rounds stop trying after one failure
    metrics.finish()
    out = capsys.readouterr().out
    assert out.count("monitoring: push to the Pushgateway") == 1


# ---- a simulated run ----------------------------------------------------------------------

Pushes = list[tuple[RunMetrics, bool]]


def _capture(patch: pytest.MonkeyPatch) -> Pushes:
    """Every push any stage makes from now on (the registry, and whether it was a round's),
    none sent."""
    seen: Pushes = []

    def capture(self: RunMetrics, *, during_rounds: bool = False) -> None:
        seen.append((self, during_rounds))

    patch.setattr(RunMetrics, "push", capture)
    return seen


def _stages(root: Path, overrides: list[str], *, publish: bool) -> None:
    from adapters.audit import audit_model
    from adapters.partition import partition_data
    from adapters.publish import publish_results
    from adapters.train import train_model
    from adapters.validate import validate_data

    cfg = load_config(root / "params.yaml", overrides)
    for stage in (validate_data, partition_data, train_model, audit_model):
        stage(cfg, root)
    if publish:
        publish_results(cfg, root, register=False)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = copy_project(tmp_path_factory.mktemp("monitored"))
    with pytest.MonkeyPatch.context() as patch:
        pushes = _capture(patch)
        _stages(root, CHEAP, publish=True)
    train = [m for m, _ in pushes if _value(m, "fedpriv_round", run_id="published")]
    reports = root / "reports"
    return {"pushes": list(pushes), "train": train[-1],
            "publish": pushes[-1][0],
            "rows": list(csv.DictReader((reports / "rounds.csv").open())),
            "metrics": json.loads((reports / "metrics.json").read_text()),
            "registration": json.loads((reports / "registration.json").read_text()),
            "trained": json.loads((reports / "train.json").read_text())}


@pytest.mark.slow
def test_a_simulated_run_gives_every_family_matching_its_reports(
        simulated: dict[str, Any]) -> None:
    rows, train = simulated["rows"], simulated["train"]
    run = {"run_id": "published"}  # a stage run outside a flow run
    # a push per round, one after the charge, one at publication
    assert [during for _, during in simulated["pushes"]] == [True, True, False, False]
    assert _value(train, "fedpriv_run_info", model="logreg", mode="simulation",
                  dataset="heart", **run) == 1
    assert _value(train, "fedpriv_rounds_planned", **run) == 2
    assert _value(train, "fedpriv_round", **run) == 2
    last = rows[-1]
    assert _value(train, "fedpriv_accuracy", **run) == pytest.approx(float(last["accuracy"]),
                                                                      abs=1e-6)
    assert _value(train, "fedpriv_auc", **run) == pytest.approx(float(last["auc"]), abs=1e-6)
    assert _value(train, "fedpriv_test_loss", **run) == pytest.approx(
        float(last["test_loss"]), abs=1e-6)
    for column, name in (("bytes_uploaded", "fedpriv_uplink_bytes_total"),
                         ("bytes_downloaded", "fedpriv_downlink_bytes_total"),
                         ("bytes_uploaded_uncompressed", "fedpriv_uplink_dense_bytes_total"),
                         ("bytes_downloaded_uncompressed",
                          "fedpriv_downlink_dense_bytes_total")):
        assert _value(train, name, **run) == sum(int(r[column]) for r in rows), name
    assert _value(train, "fedpriv_sites_ok", **run) == int(last["clients_ok"])
    sites = [c.removeprefix("accuracy_") for c in last if c.startswith("accuracy_")]
    assert len(sites) == 4
    for site in sites:
        assert _value(train, "fedpriv_site_accuracy", site=site, **run) == pytest.approx(
            float(last[f"accuracy_{site}"]), abs=1e-6)
        assert _value(train, "fedpriv_site_last_seen_round", site=site, **run) == 2
        assert _value(train, "fedpriv_updates_flagged_total", site=site, **run) == 0
        assert _value(train, "fedpriv_site_flagged", site=site, **run) == 0
    metrics, registration = simulated["metrics"], simulated["registration"]
    assert _value(train, "fedpriv_epsilon", **run) == pytest.approx(metrics["epsilon"])
    privacy = simulated["trained"]["privacy"]
    for site, eps in (privacy["site_epsilon"] or privacy["client_epsilon"]).items():
        assert _value(train, "fedpriv_epsilon_spent", site=site, **run) == pytest.approx(eps)
    publish = simulated["publish"]
    assert _value(publish, "fedpriv_gate_passed", **run) == float(registration["gate_passed"])
    assert _value(publish, "fedpriv_gate_refusals_total", **run) == 1  # reproducible noise
    assert _value(publish, "fedpriv_run_finished_timestamp_seconds", **run) <= time.time()
    cap = registration["lifetime_epsilon"]
    assert registration["budget_spent"]
    for site, spent in registration["budget_spent"].items():
        assert _value(publish, "fedpriv_epsilon_budget_left", site=site) == pytest.approx(
            cap - spent)
        assert _value(publish, "fedpriv_epsilon_lifetime_cap", site=site) == cap


@pytest.mark.slow
def test_a_byzantine_drill_flags_exactly_the_attackers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_project(tmp_path / "drill")
    pushes = _capture(monkeypatch)
    _stages(root, ["rounds=2", "privacy.randomness=reproducible", "audit.enabled=false",
                   "monitoring.pushgateway=127.0.0.1:9", "attack.kind=sign_flip",
                   "attack.fraction=0.3", "data.partition=by_patient", "data.num_clients=10",
                   "anomaly.min_clients=5"], publish=False)
    train = pushes[-1][0]
    malicious = json.loads((root / "reports" / "train.json").read_text())["malicious_clients"]
    assert len(malicious) == 3
    counted = {s.labels["site"]: s.value for m in train.registry.collect()
               if m.name == "fedpriv_updates_flagged" for s in m.samples
               if s.name.endswith("_total")}
    assert len(counted) == 10
    assert sorted(site for site, n in counted.items() if n > 0) == sorted(malicious)
    flagged = {s.labels["site"]: s.value for m in train.registry.collect()
               if m.name == "fedpriv_site_flagged" for s in m.samples}
    assert sorted(site for site, v in flagged.items() if v == 1) == sorted(malicious)
    # flagged in both rounds: reputation 0.8·1 + 1 = 1.8 for the attackers, 0 for the rest
    reputation = {s.labels["site"]: s.value for m in train.registry.collect()
                  if m.name == "fedpriv_site_reputation" for s in m.samples}
    assert len(reputation) == 10
    assert sorted(site for site, v in reputation.items() if v > 0) == sorted(malicious)


@pytest.mark.slow
def test_monitoring_off_imports_nothing_and_prints_the_same(tmp_path: Path) -> None:
    """In a fresh interpreter: a run with monitoring off never imports prometheus_client, and
    prints what it printed before the metrics existed (no line of monitoring's)."""
    root = copy_project(tmp_path / "off")
    script = textwrap.dedent(f"""
        import sys
        from adapters.config_files import load_config
        from adapters.partition import partition_data
        from adapters.train import train_model
        from adapters.validate import validate_data
        cfg = load_config({str(root / 'params.yaml')!r},
                          ["rounds=1", "privacy.randomness=reproducible"])
        for stage in (validate_data, partition_data, train_model):
            stage(cfg, {str(root)!r})
        print("IMPORTED" if "prometheus_client" in sys.modules else "NOT IMPORTED")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert out.rstrip().endswith("NOT IMPORTED")
    assert "monitoring" not in out and "prometheus" not in out.lower()


@pytest.mark.integration
@pytest.mark.slow
def test_a_push_reaches_a_real_pushgateway(tmp_path: Path) -> None:
    gateway = shutil.which("prometheus-pushgateway")
    if gateway is None:
        pytest.skip("prometheus-pushgateway is not installed (Debian package)")
    from tests.servers import free_port, stop

    port = free_port()
    proc = subprocess.Popen(
        [gateway, f"--web.listen-address=127.0.0.1:{port}",
         f"--persistence.file={tmp_path / 'pg.db'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        train = RunMetrics(RUN, pushgateway=f"127.0.0.1:{port}", push_every_round=True)
        train.on_round(_record(1, flagged_clients=["b"]))  # pushed at the round's end
        publish = RunMetrics(RUN, pushgateway=f"127.0.0.1:{port}")
        publish.record_gate(True)
        publish.finish()  # POST: the training stage's families stay
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        stop(proc)
    assert 'fedpriv_round{instance="",job="fedpriv",run_id="abc123"} 1' in text
    assert 'fedpriv_updates_flagged_total{instance="",job="fedpriv",run_id="abc123",' \
           'site="b"} 1' in text
    assert 'fedpriv_gate_passed{instance="",job="fedpriv",run_id="abc123"} 1' in text


@pytest.mark.integration
@pytest.mark.slow
def test_the_endpoint_counts_refusals_bytes_and_calls_and_serves_them(tmp_path: Path) -> None:
    """A real endpoint on 127.0.0.1: an honest site answers a round, a revoked one is refused
    on its next call; the counters are in the registry and on /metrics."""
    from adapters.federation_endpoint import FederationEndpoint, print_refusal
    from fl_core.federation.messages import Shutdown, encode_message
    from tests.adapters.test_federation_endpoint import (
        LIMITS,
        SITES,
        Honest,
        _instruction,
    )
    from tests.federation import LOOPBACK, channel, make_pki
    from tests.servers import free_port

    pki = make_pki(tmp_path / "pki")
    monitor = EndpointMetrics(RunMetrics(RUN), forward=print_refusal)
    endpoint = FederationEndpoint(listen=LOOPBACK, run_id="run1", sites=SITES, tls=pki.tls,
                                  limits=LIMITS, on_refusal=monitor.on_refusal)
    monitor.instrument(endpoint)
    endpoint.start()
    port = free_port()
    monitor.serve(f"127.0.0.1:{port}")
    try:
        honest = Honest(pki, endpoint, "beta")
        replies = endpoint.exchange({"beta": _instruction("run1", 1)}, deadline_s=10)
        assert isinstance(replies["beta"], bytes)
        alpha = channel(pki, endpoint, "alpha")
        assert alpha.pull(0, wait_s=2) is None
        pki.revoke("alpha")
        with pytest.raises(Exception, match="revoked"):
            alpha.pull(0, wait_s=2)
        monitor.connected(2)
        served = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                        timeout=5).read().decode()
        endpoint.shutdown(encode_message(Shutdown("run1", -1, "done")))
        honest.thread.join(timeout=10)
    finally:
        endpoint.stop()
        monitor.close()  # no Pushgateway: nothing pushed; stops serving
    registry = monitor.metrics.registry
    assert registry.get_sample_value("fedpriv_endpoint_tls_refusals_total",
                                     {"reason": "revoked"}) == 1
    assert registry.get_sample_value("fedpriv_endpoint_bytes_total", {"direction": "in"}) > 0
    assert registry.get_sample_value("fedpriv_endpoint_bytes_total", {"direction": "out"}) > 0
    assert registry.get_sample_value("fedpriv_endpoint_call_duration_seconds_count",
                                     {"call": "push"}) >= 2  # READY, then the reply
    assert registry.get_sample_value("fedpriv_endpoint_call_duration_seconds_count",
                                     {"call": "pull"}) >= 2
    assert 'fedpriv_endpoint_tls_refusals_total{reason="revoked"} 1.0' in served
    assert 'fedpriv_endpoint_connected_sites{run_id="abc123"} 2.0' in served
    assert "process_resident_memory_bytes" in served
    with pytest.raises(OSError):  # stopped with the endpoint
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.integration
@pytest.mark.slow
def test_sites_mode_rounds_and_audit_carry_the_hospitals_and_their_budgets(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four site sessions over a real endpoint (as tests/adapters/test_site_session.py runs
    them): the rounds' families are labelled by hospital, the budget left is each site's own,
    the audit at the sites pushes its AUC."""
    from adapters.audit import audit_at_sites
    from adapters.train import train_at_sites
    from tests.adapters.test_site_session import (
        _endpoint,
        _shutdown,
        _site_files,
        _start_sessions,
    )
    from tests.federation import make_pki, wait_ready

    pushes = _capture(monkeypatch)
    cfg = load_config(project / "params.yaml", ["rounds=2", "privacy.randomness=reproducible",
                                                 "monitoring.pushgateway=127.0.0.1:9"])
    pki = make_pki(tmp_path / "pki")
    files = _site_files(project, tmp_path / "sites")
    endpoint = _endpoint(pki, list(files))
    threads = _start_sessions(cfg, files, endpoint, pki, tmp_path)
    ready = wait_ready(endpoint, list(files))
    coordinator = tmp_path / "coordinator"
    try:
        train_at_sites(cfg, coordinator, "run1", endpoint, ready)
        audit_at_sites(cfg, coordinator, "run1", endpoint)
    finally:
        _shutdown(endpoint)
        for thread in threads:
            thread.join(timeout=30)
        endpoint.stop()
    train, audit = pushes[0][0], pushes[-1][0]
    run = {"run_id": "run1"}
    assert [during for _, during in pushes] == [True, True, False, False]
    assert _value(train, "fedpriv_run_info", model="logreg", mode="sites", dataset="heart",
                  **run) == 1
    for site, message in ready.items():
        assert _value(train, "fedpriv_site_last_seen_round", site=site, **run) == 2
        assert _value(train, "fedpriv_epsilon_budget_left", site=site) == message.budget_left
        assert _value(train, "fedpriv_epsilon_spent", site=site, **run) > 0
    assert _value(audit, "fedpriv_audit_attack_auc", attack="loss_threshold", **run) > 0


def test_a_champion_moved_by_hand_is_pushed_as_its_own_group(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.metrics import record_alias_change

    pushes = _capture(monkeypatch)
    cfg = load_config(project / "params.yaml", ["monitoring.pushgateway=127.0.0.1:9"])
    record_alias_change(cfg, "rollback", "fedpriv-heart", ["champion"])
    record_alias_change(cfg, "retire", "fedpriv-heart", [])  # nothing moved: nothing pushed
    ((metrics, _),) = pushes
    assert metrics.run_id.startswith("rollback") and metrics.run_id.isalnum()
    assert _value(metrics, "fedpriv_alias_moves_total", model="fedpriv-heart",
                  alias="champion") == 1


def test_only_a_sites_own_policy_or_ledger_counts_as_a_policy_refusal(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.metrics import POLICY_REFUSAL, record_site_check
    from fl_core.privacy.ledger import BUDGET_REFUSAL

    pushes = _capture(monkeypatch)
    cfg = load_config(project / "params.yaml", ["monitoring.pushgateway=127.0.0.1:9"])
    record_site_check(cfg, "r1", ["Cleveland"], {
        "Hungary": f"{POLICY_REFUSAL}: min_noise_multiplier 1.0",
        "Switzerland": f"{BUDGET_REFUSAL}over the cap",
        "VA Long Beach": "no session within 180 s (not started)"})
    ((metrics, _),) = pushes
    refusals = {s.labels["site"]: s.value for m in metrics.registry.collect()
                for s in m.samples if s.name == "fedpriv_policy_refusals_total"}
    assert refusals == {"Hungary": 1, "Switzerland": 1}
