"""The coordinator's side of ``federation.mode=sites``: deploy ``fl-site`` on every site's
pool, start one session per site per run, watch them, restart a failed one, shut them down.

A session is started once per training run (:func:`prefect.deployments.run_deployment`, which
costs a worker pick-up and a new Python process: seconds) and then dials out to the run's
federation endpoint (:mod:`adapters.federation_endpoint`, mutual TLS), which carries every
round's messages (milliseconds). The coordinator never reads a site's Prefect result: what a
site sends arrives as fedpriv's framed messages over its own authenticated channel. The
session's parameters carry the endpoint's address and ids, nothing secret and no path.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from adapters.federation_endpoint import EndpointLimits, FederationEndpoint
from adapters.metrics import EndpointMetrics, endpoint_metrics
from adapters.pki import EndpointTls, endpoint_files
from fl_core.config.model import ConfigError, PipelineConfig, site_slug
from fl_core.federation.coordinator import RoundRecord
from fl_core.federation.messages import (
    Failure,
    MessageError,
    Shutdown,
    SiteReady,
    decode_message,
    encode_message,
)
from fl_core.results import AuditReport, TrainingSummary
from flows.site_flow import SITE_ENTRYPOINT, SITE_FLOW

START_ATTEMPTS = 3
"""Sessions started for a site whose session crashes before it is ready (a Prefect API that
answered 503 to its worker, a killed process): transient, so worth another try."""


def deployment_name(site: str) -> str:
    return f"{SITE_FLOW}/{site_slug(site)}"


def deploy_sites(cfg: PipelineConfig) -> list[str]:
    """Create (or update) each site's process work pool and its ``fl-site`` deployment.
    Returns the deployment names. Idempotent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    names = []
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(SITE_FLOW)
        for spec in cfg.federation.sites:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=spec.pool, type="process"))
            client.create_deployment(
                flow_id=flow_id, name=site_slug(spec.id), work_pool_name=spec.pool,
                entrypoint=SITE_ENTRYPOINT, pull_steps=[], parameter_openapi_schema={},
                description=f"fedpriv site session of {spec.id}: reads only the files its "
                            f"worker's site.yaml names")
            names.append(deployment_name(spec.id))
    return names


@dataclass
class SiteSessions:
    """One training run's site sessions (Prefect flow runs) and their endpoint."""

    cfg: PipelineConfig
    endpoint: FederationEndpoint
    address: str  # what the sites dial
    charge_key: str
    runs: dict[str, UUID] = field(default_factory=dict)
    ready: dict[str, SiteReady] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    _states: dict[str, tuple[float, str | None]] = field(default_factory=dict)
    _rejoining: dict[str, float] = field(default_factory=dict)  # site → restart time
    _starts: dict[str, int] = field(default_factory=dict)  # site → sessions started

    @property
    def site_ids(self) -> list[str]:
        return [s.id for s in self.cfg.federation.sites]

    def start(self, site: str | None = None) -> None:
        """Create the flow run of every site's session (or of one), without waiting."""
        from prefect.deployments import run_deployment

        config = self.cfg.model_dump(mode="json")
        for index, spec in enumerate(self.cfg.federation.sites):
            if site is not None and spec.id != site:
                continue
            run = run_deployment(
                deployment_name(spec.id), timeout=0, as_subflow=True,
                flow_run_name=f"{site_slug(spec.id)}-{self.endpoint.run_id}",
                parameters={"site": spec.id, "session": self.endpoint.run_id, "index": index,
                            "charge_key": self.charge_key, "config": config,
                            "endpoint": self.address,
                            "idle_timeout_s": self.cfg.federation.session_idle_timeout_s})
            self.runs[spec.id] = run.id
            self._starts[spec.id] = self._starts.get(spec.id, 0) + 1

    def wait_ready(self, timeout_s: float) -> None:
        """Collect every site's :class:`SiteReady` (or its refusal) until ``timeout_s``. A
        session that *crashed* before it said ready (its infrastructure failed: the worker
        could not submit it, its process was killed) is started again, up to
        :data:`START_ATTEMPTS` sessions in all; one that failed or refused is left out."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for site in self.site_ids:
                if site not in self.ready and site not in self.refused:
                    self._read_ready(site)
                    gone = self.gone(site)
                    if site not in self.ready and site not in self.refused and gone:
                        self._start_again_or_refuse(site, gone)
            if len(self.ready) + len(self.refused) == len(self.site_ids):
                return
            time.sleep(0.05)
        for site in self.site_ids:
            if site not in self.ready and site not in self.refused:
                self.refused[site] = (f"no session within {timeout_s:g} s "
                                      f"({self._state_name(site) or 'not started'}): is its "
                                      f"worker running on pool {self._pool(site)}?")

    def _start_again_or_refuse(self, site: str, gone: str) -> None:
        """A session that ended before it was ready: crashed → a new one, else left out."""
        if self._state_name(site) == "CRASHED" and self._starts.get(site, 0) < START_ATTEMPTS:
            print(f"site {site}: its session crashed before it was ready; starting another "
                  f"({self._starts[site] + 1} of {START_ATTEMPTS})", flush=True)
            self.start(site)
            self._states.pop(site, None)
        else:
            self.refused[site] = gone

    def _read_ready(self, site: str) -> None:
        report = self.endpoint.ready_report(site)
        if report is None:
            return
        raw = report[0]
        try:
            message = decode_message(raw, site=site, expect=(SiteReady, Failure))
        except MessageError as exc:
            self.refused[site] = str(exc)
            return
        if isinstance(message, Failure):
            self.refused[site] = message.reason
        elif not message.passed:
            self.refused[site] = "data failed validation: " + _failed(message.validation)
            self.ready[site] = message
        else:
            self.ready[site] = message

    def gone(self, site: str) -> str | None:
        """Why the site's session is not running any more (None while it is, or might be).
        A restarted site is skipped until its new session has said it is ready."""
        if site in self._rejoining and not self._rejoined(site):
            return "restarted: its new session is not up yet"
        if self.ended(site):
            return f"its session ended ({str(self._state_name(site)).lower()})"
        return None

    def _rejoined(self, site: str) -> bool:
        """Whether a restarted site's new session has said it is ready (said once)."""
        report = self.endpoint.ready_report(site)
        if report is None or report[1] < self._rejoining[site]:
            return False
        del self._rejoining[site]
        print(f"site {site} rejoined")
        return True

    def announce_rejoined(self) -> None:
        """Say which restarted sites are back (after each round: a fast round never waits
        long enough for :meth:`gone` to be asked)."""
        for site in list(self._rejoining):
            self._rejoined(site)

    def ended(self, site: str, max_age_s: float = 0.5) -> bool:
        """Whether the site's current session run has ended (or is being cancelled)."""
        return self._state_name(site, max_age_s) in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED", "CANCELLING")

    def _state_name(self, site: str, max_age_s: float = 0.5) -> str | None:
        """The site's flow run state, read at most every ``max_age_s``."""
        from prefect.client.orchestration import get_client

        cached = self._states.get(site)
        if cached and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        state = None
        if site in self.runs:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(self.runs[site])
            state = run.state.type.value if run.state else None
        self._states[site] = (time.monotonic(), state)
        return state

    def restart(self, site: str) -> bool:
        """Cancel a failed or straggling session and start another (it resumes from the state
        the site saved). A session still waiting for a worker is left as it is."""
        state = self._state_name(site, max_age_s=0)
        if site in self._rejoining or state in ("SCHEDULED", "PENDING"):
            return False  # already restarting, or still waiting for its worker
        self.cancel(site)
        self._rejoining[site] = time.time()
        self.start(site)
        self._states.pop(site, None)
        return True

    def cancel(self, site: str, *, abandon: bool = False) -> None:
        """Cancel the site's session: a running one is killed by its worker (Cancelling);
        one never picked up, or (``abandon``) one whose worker may be gone, ends Cancelled."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Cancelling

        run_id = self.runs.get(site)
        if run_id is None:
            return
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
            if run.state is None or run.state.is_final():
                return
            running = run.state.is_running() and not abandon
            state = Cancelling() if running else Cancelled(
                message="the coordinator's run ended; this session was abandoned")
            client.set_flow_run_state(run_id, state, force=True)

    def close(self, reason: str, grace_s: float = 5.0) -> None:
        """Tell every session to stop; cancel those still running after ``grace_s``."""
        self.endpoint.shutdown(encode_message(Shutdown(self.endpoint.run_id, -1, reason)))
        end = time.monotonic() + grace_s
        while time.monotonic() < end and any(
                self._state_name(s, 0.2) in ("RUNNING", "PENDING") for s in self.runs):
            time.sleep(0.2)
        for site in self.runs:
            self.cancel(site, abandon=True)

    def _pool(self, site: str) -> str:
        return next(s.pool for s in self.cfg.federation.sites if s.id == site)


def _failed(summary: str) -> str:
    """The failed expectations of a site's validation summary, for one log line."""
    try:
        parsed: Any = json.loads(summary)
        failures = parsed.get("failures", []) if isinstance(parsed, dict) else []
        return "; ".join(str(f.get("detail") or f) for f in failures[:5]) or "see the site"
    except ValueError:
        return "unreadable summary"


def endpoint_tls(cfg: PipelineConfig, root: Path) -> EndpointTls:
    """The endpoint's certificate files under ``federation.endpoint.pki``; a missing one is
    a configuration error that says which command makes it."""
    tls = endpoint_files(cfg, root)
    makers = {tls.ca_cert: "fedpriv pki init", tls.crl: "fedpriv pki init",
              tls.server_key: "fedpriv pki server --host HOST",
              tls.server_cert: "fedpriv pki server --host HOST"}
    missing = [f"{path} ({maker})" for path, maker in makers.items() if not path.is_file()]
    if missing:
        raise ConfigError(f"federation.mode=sites needs the endpoint's certificates: missing "
                          f"{', '.join(missing)}; docs/deployment.md")
    return tls


def open_endpoint(cfg: PipelineConfig, root: Path, run_id: str,
                  monitor: EndpointMetrics | None = None) -> tuple[FederationEndpoint, str]:
    """The run's endpoint, listening; and the address the sites are told to dial. With
    ``monitor`` its refusals are counted too (docs/monitoring.md)."""
    settings = cfg.federation.endpoint
    limits = EndpointLimits(max_message_bytes=int(settings.max_message_mb * 2**20))
    endpoint = FederationEndpoint(run_id=run_id, sites=[s.id for s in cfg.federation.sites],
                                  tls=endpoint_tls(cfg, root), listen=settings.listen,
                                  limits=limits,
                                  **({"on_refusal": monitor.on_refusal} if monitor else {}))
    if monitor is not None:
        monitor.instrument(endpoint)
    endpoint.start()
    address = settings.address or endpoint.address
    if settings.address and settings.address.endswith(":0"):
        address = f"{settings.address.rsplit(':', 1)[0]}:{endpoint.port}"
    print(f"federation endpoint for run {run_id}: listening on {endpoint.address}, sites dial "
          f"{address}", flush=True)
    return endpoint, address


def run_at_sites(cfg: PipelineConfig, root: Path, run_id: str, *,
                 charge_key: str) -> tuple[TrainingSummary, AuditReport]:
    """Validate, train and audit with every site in its own session; returns the training
    and the audit.

    The flow's body in ``federation.mode=sites``: one session per site for the whole run
    (started here, stopped at the end whatever happens), a failed or straggling site's
    session cancelled and started again (it rejoins once up). ``charge_key`` names the
    sites' ledger charges: the Prefect flow run's id, the same when the flow is retried, so
    a retried run does not charge a site twice."""
    from tasks.at_sites import audit_sites, check_sites, train_sites

    deploy_sites(cfg)
    monitor = endpoint_metrics(cfg, run_id)  # None: monitoring off
    endpoint, address = open_endpoint(cfg, root, run_id, monitor)
    sessions = SiteSessions(cfg, endpoint, address, charge_key)
    started = time.perf_counter()
    try:
        sessions.start()
        sessions.wait_ready(cfg.federation.site_start_timeout_s)
        usable = check_sites(cfg, root, run_id, sessions.ready, sessions.refused,
                             time.perf_counter() - started)
        endpoint.alive = sessions.gone
        transport = endpoint
        if monitor is not None:
            monitor.connected(len(usable))

        def rejoin(record: RoundRecord) -> None:
            sessions.announce_rejoined()
            # restart a session that ended or straggles, not one that is merely coming up
            for site in record.failed_clients:
                if (sessions.ended(site, max_age_s=0) or transport.straggling(site)) \
                        and sessions.restart(site):
                    print(f"site {site} failed round {record.round}: its session was "
                          f"cancelled and started again (it rejoins once up)")

        # the round log: one record per round, signed with the endpoint's key, in the run's
        # reports (docs/deployment.md, "The round log")
        from adapters.artifacts import Paths
        from adapters.round_log import load_signing_key, round_log_sink

        round_log = round_log_sink(Paths.of(cfg, root, run_id).round_log, run_id=run_id,
                                   coordinator_key=load_signing_key(endpoint.tls.server_key),
                                   receipts=endpoint.receipts)
        trained = train_sites(cfg, root, run_id, transport,
                              {s: sessions.ready[s] for s in usable}, [rejoin, round_log])
        return trained, audit_sites(cfg, root, run_id, transport)
    finally:
        sessions.close("the run is over")
        endpoint.stop()
        if monitor is not None:
            monitor.close()
        print(refusal_summary(endpoint.refusals), flush=True)


def refusal_summary(refusals: list[tuple[str, Any, str]]) -> str:
    """One line for the end of a run: what the endpoint refused, by reason."""
    if not refusals:
        return "federation endpoint: no call refused"
    counts = Counter(reason.value for _, reason, _ in refusals)
    return (f"federation endpoint: {len(refusals)} call(s) refused — "
            + ", ".join(f"{reason} ×{n}" for reason, n in counts.most_common())
            + " (each logged above with its peer)")
