"""Site sessions and the federation endpoint without Prefect: four sites, each reading only its
own file, dial a coordinator's endpoint on 127.0.0.1 over mutual TLS; the result is the
simulation's, message for message."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from adapters.artifacts import Paths
from adapters.config_files import load_config
from adapters.federation_endpoint import FederationEndpoint
from adapters.round_log import load_signing_key, read_log, round_log_sink, verify_file
from adapters.site_files import split_by_site
from adapters.site_session import SiteSession, serve_site
from fl_core.config.model import site_slug
from fl_core.federation.channel import Kind
from fl_core.federation.coordinator import params_sha256
from fl_core.federation.messages import (
    EvaluateInstruction,
    Shutdown,
    SiteReady,
    encode_message,
)
from tests.conftest import data_config
from tests.federation import LOOPBACK, TEST_POLICY, ProjectPki, channel, make_pki, wait_ready

OVERRIDES = ["rounds=3", "privacy.randomness=reproducible", "audit.shadow_models=2"]


def _site_files(project: Path, out: Path) -> dict[str, Path]:
    files = {}
    for site_file in split_by_site(project / "data" / "raw" / "heart_disease_uci.csv",
                                   data_config().spec):
        path = out / site_file.slug / "heart_disease_uci.csv"
        path.parent.mkdir(parents=True)
        path.write_text(site_file.text())
        files[site_file.site] = path
    return files


@pytest.fixture
def pki(tmp_path: Path) -> ProjectPki:
    return make_pki(tmp_path / "pki")


def _endpoint(pki: ProjectPki, sites: list[str], run_id: str = "run1") -> FederationEndpoint:
    return FederationEndpoint(listen=LOOPBACK, run_id=run_id, sites=sites, tls=pki.tls).start()


def _start_sessions(cfg, files: dict[str, Path], endpoint: FederationEndpoint, pki: ProjectPki,
                    tmp: Path) -> list[threading.Thread]:
    threads = []
    for index, (site, path) in enumerate(files.items()):
        session = SiteSession(channel(pki, endpoint, site), site, tmp / "state" / site, "run1")
        thread = threading.Thread(target=serve_site, args=(cfg,), kwargs={
            "csv_path": path, "site": site, "index": index, "session": session,
            "idle_timeout_s": 60, "policy": TEST_POLICY}, daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def _shutdown(endpoint: FederationEndpoint) -> None:
    endpoint.shutdown(encode_message(Shutdown(endpoint.run_id, -1, "done")))


def _one_instruction_then_shutdown(endpoint: FederationEndpoint, site: str) -> threading.Thread:
    """The coordinator's side of a run that asks ``site`` one thing (an evaluation of a model
    it cannot decode: answered with a Failure) and stops: the site charges its ledger before
    answering anything."""
    def ask() -> None:
        bogus = encode_message(EvaluateInstruction(endpoint.run_id, 0, b"not a model"))
        endpoint.exchange({site: bogus}, deadline_s=60)
        _shutdown(endpoint)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_sessions_over_the_endpoint_train_exactly_the_simulations_model(
        project: Path, tmp_path: Path, pki: ProjectPki) -> None:
    from adapters.audit import audit_at_sites
    from adapters.partition import partition_data
    from adapters.train import train_at_sites, train_model
    from adapters.validate import validate_data

    cfg = load_config(project / "params.yaml", OVERRIDES)
    validate_data(cfg, project)
    partition_data(cfg, project)
    simulated = train_model(cfg, project)

    files = _site_files(project, tmp_path / "sites")
    endpoint = _endpoint(pki, list(files))
    threads = _start_sessions(cfg, files, endpoint, pki, tmp_path)
    ready = wait_ready(endpoint, list(files))
    assert all(isinstance(m, SiteReady) and m.passed for m in ready.values())
    summary = json.loads(ready["Hungary"].validation)
    assert summary["passed"] and summary["site"] == "Hungary"
    coordinator = tmp_path / "coordinator"
    round_log = Paths.of(cfg, coordinator, "run1").round_log  # as flows.site_dispatch wires it
    sink = round_log_sink(round_log, run_id="run1", receipts=endpoint.receipts,
                          coordinator_key=load_signing_key(pki.tls.server_key))
    try:
        at_sites = train_at_sites(cfg, coordinator, "run1", endpoint, ready, [sink])
        audited = audit_at_sites(cfg, coordinator, "run1", endpoint)
    finally:
        _shutdown(endpoint)
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    endpoint.stop()
    assert endpoint.refusals == []
    # every reply of every round signed by its site, kept for the round log: one record a
    # round, each reply's signature checked against its site's certificate
    assert {r.site for r in endpoint.receipts(1)} == set(files)
    verified = verify_file(round_log, coordinator_certs=[pki.tls.server_cert],
                           site_certs=[pki.site_folder(site_slug(s)) / f"{site_slug(s)}.crt"
                                       for s in files])
    assert (verified.records, verified.unchecked_sites) == (3, ())
    # training replies every round, evaluation replies on the last round only (each evaluation
    # is a DP release charged to the test patients: privacy.evaluation_every=0)
    assert verified.site_signatures == (3 + 1) * len(files)
    assert [r.body["participants"] for r in read_log(round_log)] == [sorted(files)] * 3
    assert read_log(round_log)[-1].body["aggregate_sha256"] == params_sha256(
        torch.load(round_log.parents[1] / "data" / "models" / "model.pt",
                   weights_only=True)["params"])
    assert at_sites.accuracy == pytest.approx(simulated.accuracy, abs=1e-9)
    assert at_sites.auc == pytest.approx(simulated.auc, abs=1e-9)
    sim_model = torch.load(project / "data" / "models" / "model.pt", weights_only=True)
    site_model = torch.load(coordinator / ".fedpriv" / "runs" / "run1" / "data" / "models"
                            / "model.pt", weights_only=True)
    assert torch.allclose(sim_model["params"], site_model["params"], atol=1e-6)
    # every site charged its own ledger, once, at the site
    assert set(at_sites.privacy.site_ledger_runs) == set(files)
    # the audit, from the sites' histograms: every training and held-out patient, the
    # loss-threshold attack only (no site trains a shadow model)
    assert [a["attack"] for a in audited.attacks] == ["loss_threshold"]
    assert audited.shadow_models == 0 and not audited.online
    assert audited.members == sum(m.train_patients for m in ready.values())
    assert audited.non_members == sum(m.test_patients for m in ready.values())
    assert 0.3 < audited.mia_auc < 0.8 and audited.privacy_consistent


def test_a_site_missing_from_later_rounds_leaves_gaps_not_errors(tmp_path: Path) -> None:
    """A site that fails a round's evaluation has no per-site accuracy that round (and one
    that appears late has none before): rounds.csv leaves the cells empty, the curves a gap."""
    import csv
    import io

    from adapters.plots import training_curves
    from adapters.train import rounds_csv_text

    base = {"train_loss": 0.6, "test_loss": 0.6, "accuracy": 0.7, "auc": 0.7, "epsilon": "",
            "bytes_uploaded": 10, "bytes_downloaded": 10, "bytes_uploaded_uncompressed": 20,
            "bytes_downloaded_uncompressed": 20}
    history = [{"round": 1, **base, "accuracy_A": 0.7},
               {"round": 2, **base, "accuracy_A": 0.7, "accuracy_B": 0.6},
               {"round": 3, **base, "accuracy_B": 0.65}]
    rows = list(csv.DictReader(io.StringIO(rounds_csv_text(history))))
    assert [r["accuracy_A"] for r in rows] == ["0.7", "0.7", ""]
    assert [r["accuracy_B"] for r in rows] == ["", "0.6", "0.65"]
    training_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_site_session_started_again_for_the_same_run_charges_its_ledger_once(
        project: Path, tmp_path: Path, pki: ProjectPki) -> None:
    """The ledger charge is keyed by the coordinator's flow run (the same when Prefect
    retries the flow): a second session for that run (a retry, a restart) charges nothing."""
    from adapters.ledger_store import PrivacyLedger

    cfg = load_config(project / "params.yaml", OVERRIDES)
    files = _site_files(project, tmp_path / "sites")
    site, path = next(iter(files.items()))
    state = tmp_path / "state"
    for attempt in ("try1", "try2"):
        with _endpoint(pki, [site], attempt) as endpoint:
            _one_instruction_then_shutdown(endpoint, site)
            session = SiteSession(channel(pki, endpoint, site), site, state, "flowrun1")
            why = serve_site(cfg, csv_path=path, site=site, index=0, session=session,
                             idle_timeout_s=5, policy=TEST_POLICY)
            assert why == "shutdown"
            (ready,) = wait_ready(endpoint, [site]).values()
        assert ready.ledger_run_id == "flowrun1cleveland"
    # the site's own ledger, in its state folder, whatever the coordinator's config says
    ledger = PrivacyLedger(state / TEST_POLICY.ledger)
    # one training charge and one for the test patients (the released evaluation), once
    assert len(ledger.entries()) == 2 and ledger.has_run("flowrun1cleveland")
    assert ledger.has_run("flowrun1cleveland-statistics")
    # the site's own data report: kept in its state folder, its own site only
    report = json.loads((state / "reports" / "data_report.json").read_text())
    assert [s["site"] for s in report["sites"]] == [site]


@pytest.mark.slow
def test_sites_mode_simulation_and_the_dp_audit_build_a_site_client_alike(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: ProjectPki) -> None:
    """One constructor, fl_core.federation.wiring.make_site_client, builds the site's client
    in a site's session, in simulation and in the DP audit; for the same site they have the
    same codec, error feedback, DP-SGD recipe, local training and initial model."""
    import adapters.site_session
    import fl_core.federation.wiring as wiring
    from adapters.tables import ClinicalTable
    from fl_core.audit.dp_audit import audit_dp
    from fl_core.federation.site_client import SiteClient
    from fl_core.model.networks import get_flat_params

    real = wiring.make_site_client
    built: dict[str, list[tuple[dict, SiteClient, torch.Tensor]]] = {"sites": [], "wiring": []}

    def recording(where: str):  # noqa: ANN202
        def make(**kwargs: object) -> SiteClient:
            client = real(**kwargs)  # type: ignore[arg-type]
            # the model as built: the audit's runs train it in place afterwards
            built[where].append((kwargs, client, get_flat_params(client._model).clone()))
            return client
        return make

    monkeypatch.setattr(adapters.site_session, "make_site_client", recording("sites"))
    monkeypatch.setattr(wiring, "make_site_client", recording("wiring"))
    # top-k with error feedback for the regression too: the richer uplink to compare
    cfg = load_config(project / "params.yaml", [*OVERRIDES, "audit_dp.runs=2",
                                                "audit_dp.regenerate=false",
                                                "compression.min_parameters=0"])
    files = _site_files(project, tmp_path / "sites")
    site, path = next(iter(files.items()))  # the first of federation.sites: index 0
    with _endpoint(pki, [site]) as endpoint:
        _shutdown(endpoint)  # answer nothing: stop right after the client is built
        session = SiteSession(channel(pki, endpoint, site), site, tmp_path / "state", "run1")
        assert serve_site(cfg, csv_path=path, site=site, index=0, session=session,
                          idle_timeout_s=5, policy=TEST_POLICY) == "shutdown"
    data = ClinicalTable.get(cfg.data, project).partitioned(cfg.data, cfg.seed)[0]
    assert data[0].client_id == site
    wiring.simulation_setup(cfg, data, dp=wiring.make_dpsgd(cfg=cfg, data=data))
    simulated = len(built["wiring"])
    audit_dp(cfg, data)
    assert simulated == len(data) and len(built["wiring"]) == simulated * (1 + 2)  # 2 runs

    (at_site_kwargs, at_site, at_site_initial), = built["sites"]
    assert at_site_kwargs["index"] == 0 and at_site.client_id == site
    for kwargs, client, initial in [built["wiring"][0], built["wiring"][simulated]]:  # sim, audit
        assert kwargs["index"] == 0 and client.client_id == site
        assert kwargs["dp"] == at_site_kwargs["dp"] is not None  # one σ, one recipe
        assert client.dp_trainer is not None and at_site.dp_trainer is not None
        assert client.dp_trainer.cfg == at_site.dp_trainer.cfg
        assert client._compressor.codec == at_site._compressor.codec  # ratio, bits, seed, ...
        assert client._compressor.warmup_rounds == at_site._compressor.warmup_rounds
        feedback, at_site_feedback = client._compressor.feedback, at_site._compressor.feedback
        assert feedback is not None and at_site_feedback is not None
        assert feedback.momentum == at_site_feedback.momentum
        assert client._training == at_site._training
        assert type(client._model) is type(at_site._model)
        assert torch.equal(initial, at_site_initial)
        assert torch.equal(client._data.x_train, at_site._data.x_train)


def test_sites_that_fail_to_start_are_named_and_too_few_fail_the_run(tmp_path: Path) -> None:
    from adapters.site_reports import record_sites
    from fl_core.data.tables import DataError
    from fl_core.federation.coordinator import RoundFailedError

    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml",
                      ["federation.mode=sites", "min_clients=3"])

    def ready(site: str, passed: bool = True) -> SiteReady:
        summary = {"passed": passed, "site": site, "failures": [] if passed else [
            {"column": "age", "detail": "values outside [18, 100]", "unexpected_count": 1}]}
        return SiteReady(site, -1, passed, 17, 100, 25, json.dumps(summary), "x")

    up = {"Cleveland": ready("Cleveland"), "Hungary": ready("Hungary"),
          "VA Long Beach": ready("VA Long Beach")}
    usable = record_sites(cfg, tmp_path, "r1", up, {"Switzerland": "no session within 180 s"}, 1)
    assert usable == ["Cleveland", "Hungary", "VA Long Beach"]  # configured order
    validation = json.loads((tmp_path / ".fedpriv/runs/r1/reports/validation.json").read_text())
    assert validation["unavailable"] == {"Switzerland": "no session within 180 s"}
    with pytest.raises(RoundFailedError, match="only 2 site.*min_clients=3.*Switzerland"):
        record_sites(cfg, tmp_path, "r2", {k: up[k] for k in ("Cleveland", "Hungary")},
                     {"Switzerland": "no session", "VA Long Beach": "its session ended"}, 1)
    bad = {**up, "Hungary": ready("Hungary", passed=False)}
    with pytest.raises(DataError, match="Hungary"):
        record_sites(cfg, tmp_path, "r3", bad, {"Hungary": "data failed validation: values "
                                                "outside [18, 100]"}, 1)


def test_dvc_stages_refuse_sites_mode_clearly(project: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "train", "--root",
                           str(project), "--set", "federation.mode=sites"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "federation.mode=sites: the 'train' stage runs at the sites" in done.stderr
    assert "Traceback" not in done.stderr


def test_sites_mode_without_a_prefect_server_is_refused_at_once(project: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--root", str(project),
                           "--set", "federation.mode=sites"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "set PREFECT_API_URL" in done.stderr and "Traceback" not in done.stderr


def test_a_session_that_crashes_before_it_is_ready_is_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: ProjectPki) -> None:
    """Start-up: a session that CRASHED before it said ready (its worker could not submit
    it: a Prefect API answering 503 under load) gets another session, up to three in all;
    one that FAILED (its own code raised) is left out at once. The Prefect side is scripted:
    each started session ends as the script says, or comes up (writes its ready message)."""
    from uuid import uuid4

    import prefect.deployments

    from flows.site_dispatch import START_ATTEMPTS, SiteSessions

    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml",
                      ["federation.mode=sites"])
    endpoint = _endpoint(pki, [s.id for s in cfg.federation.sites])
    script = {"Cleveland": ["CRASHED", "READY"], "Hungary": ["CRASHED"] * START_ATTEMPTS,
              "Switzerland": ["FAILED", "READY"], "VA Long Beach": ["READY"]}
    started: dict[str, list[str]] = {site: [] for site in script}
    by_run: dict[str, tuple[str, int]] = {}

    class Run:
        def __init__(self, site: str) -> None:
            self.id = uuid4()
            attempt = len(started[site])
            started[site].append(str(self.id))
            by_run[str(self.id)] = (site, attempt)
            if script[site][attempt] == "READY":
                channel(pki, endpoint, site).push(encode_message(
                    SiteReady(site, -1, True, 17, 100, 25, json.dumps({"passed": True}), "")),
                    seq=0, round_number=-1, kind=Kind.READY)

    def run_deployment(name: str, **kwargs) -> Run:
        return Run(kwargs["parameters"]["site"])

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)

    class Scripted(SiteSessions):
        def _state_name(self, site: str, max_age_s: float = 0.5) -> str | None:
            state = script[site][by_run[str(self.runs[site])][1]]
            return "RUNNING" if state == "READY" else state

    sessions = Scripted(cfg, endpoint, endpoint.address, "run1")
    sessions.start()
    sessions.wait_ready(30)
    endpoint.stop()
    assert set(sessions.ready) == {"Cleveland", "VA Long Beach"}
    assert {site: len(runs) for site, runs in started.items()} == {
        "Cleveland": 2, "Hungary": START_ATTEMPTS, "Switzerland": 1, "VA Long Beach": 1}
    assert sessions.refused == {"Hungary": "its session ended (crashed)",
                                "Switzerland": "its session ended (failed)"}


def _start_once(cfg, path: Path, site: str, pki: ProjectPki, state: Path, run_id: str,
                policy, *, asked: bool = True) -> tuple[str, object]:
    """One session that answers one instruction (``asked``; else none) and stops; why it
    stopped and its start-up report."""
    from fl_core.federation.messages import Failure, decode_message

    with _endpoint(pki, [site], run_id) as endpoint:
        if asked:
            _one_instruction_then_shutdown(endpoint, site)
        else:
            _shutdown(endpoint)
        session = SiteSession(channel(pki, endpoint, site), site, state, run_id)
        why = serve_site(cfg, csv_path=path, site=site, index=0, session=session,
                         idle_timeout_s=5, policy=policy)
        report = endpoint.ready_report(site)
    assert report is not None
    return why, decode_message(report[0], site=site, expect=(SiteReady, Failure))


@pytest.mark.slow
def test_the_sites_policy_not_the_coordinators_config_sets_its_budget_and_limits(
        project: Path, tmp_path: Path, pki: ProjectPki) -> None:
    """A coordinator overriding privacy.lifetime_epsilon and privacy.ledger changes nothing at
    the site: its policy's cap and its own ledger count. A run beyond the policy is refused by
    name before anything is charged; the site reports the budget it has left."""
    from adapters.ledger_store import PrivacyLedger
    from adapters.site_reports import record_sites
    from fl_core.config.site import SitePolicy
    from fl_core.federation.messages import Failure
    from fl_core.privacy.ledger import BUDGET_REFUSAL, BudgetExceededError

    files = _site_files(project, tmp_path / "sites")
    site, path = next(iter(files.items()))
    state = tmp_path / "state"
    elsewhere = tmp_path / "coordinator-chosen.sqlite"
    # (evaluation noise σ = 8: the test patients' charge, ε ≈ 0.45, stays below the cap; the
    # training patients' ε ≈ 1 a run is what the cap of 1.2 allows once)
    greedy = load_config(project / "params.yaml", [
        *OVERRIDES, "privacy.lifetime_epsilon=1000", f"privacy.ledger={elsewhere}",
        "privacy.evaluation_noise=8"])
    policy = SitePolicy(require_secure=False, lifetime_epsilon=1.2)
    why, first = _start_once(greedy, path, site, pki, state, "runA", policy)
    assert why == "shutdown" and isinstance(first, SiteReady)
    assert first.budget_left == pytest.approx(1.2)  # nothing spent before this run
    why, second = _start_once(greedy, path, site, pki, state, "runB", policy)
    assert why == "cannot afford the run" and isinstance(second, Failure)
    assert second.reason.startswith(BUDGET_REFUSAL) and "cap 1.2" in second.reason
    assert not elsewhere.exists()
    assert len(PrivacyLedger(state / policy.ledger).entries()) == 2  # training, test patients
    # the coordinator refuses the whole run on that report (exit 5), before any instruction
    with pytest.raises(BudgetExceededError, match=f"site.s. {site} cannot afford this run"):
        record_sites(greedy, tmp_path / "coordinator", "runB", {}, {site: second.reason}, 1.0)
    # a run called off after the start-up reports (no instruction) costs the site nothing
    why, fourth = _start_once(greedy, path, site, pki, tmp_path / "other-state", "runD",
                              policy, asked=False)
    assert why == "shutdown" and isinstance(fourth, SiteReady) and fourth.ledger_run_id
    assert PrivacyLedger(tmp_path / "other-state" / policy.ledger).entries() == []
    # beyond the policy: refused by name, nothing charged
    bold = load_config(project / "params.yaml", [*OVERRIDES, "rounds=50"])
    why, third = _start_once(bold, path, site, pki, state, "runC",
                             SitePolicy(require_secure=False, max_rounds=10))
    assert why == "refused by policy" and isinstance(third, Failure)
    assert "refused by the site's policy: rounds=50 > policy.max_rounds=10" in third.reason
    assert len(PrivacyLedger(state / policy.ledger).entries()) == 2


@pytest.mark.slow
def test_a_site_refuses_a_session_on_a_deleted_or_replaced_ledger(
        project: Path, tmp_path: Path, pki: ProjectPki) -> None:
    """The site writes its ledger's head beside it after each charge and reports its head in
    SiteReady; a ledger deleted or replaced since refuses the next session by name."""
    from adapters.ledger_anchor import anchor_path
    from adapters.ledger_store import GENESIS, PrivacyLedger
    from fl_core.config.site import SitePolicy
    from fl_core.federation.messages import Failure

    files = _site_files(project, tmp_path / "sites")
    site, path = next(iter(files.items()))
    state = tmp_path / "state"
    cfg = load_config(project / "params.yaml", list(OVERRIDES))
    policy = SitePolicy(require_secure=False)
    why, ready = _start_once(cfg, path, site, pki, state, "runA", policy)
    assert why == "shutdown" and isinstance(ready, SiteReady)
    assert ready.ledger_head == GENESIS  # reported at the start, before this run's charge
    ledger = PrivacyLedger(state / policy.ledger)
    anchored = json.loads(anchor_path(ledger).read_text())
    # two charges: the training patients and the test patients (the released evaluation)
    assert (anchored["hash"], anchored["count"]) == ledger.head() and anchored["count"] == 2
    ledger.path.unlink()
    why, refused = _start_once(cfg, path, site, pki, state, "runB", policy, asked=False)
    assert why == "ledger refused" and isinstance(refused, Failure)
    assert "LedgerIntegrityError" in refused.reason and "is missing" in refused.reason
    assert anchored["hash"] in refused.reason
    PrivacyLedger(ledger.path)  # an empty ledger in its place
    why, refused = _start_once(cfg, path, site, pki, state, "runC", policy, asked=False)
    assert why == "ledger refused" and "does not contain the head" in refused.reason
