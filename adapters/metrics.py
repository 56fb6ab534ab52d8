"""Prometheus metrics of a run (docs/monitoring.md, "Metrics"): what an operator watches
without opening a CSV.

Each stage of a batch run (train, audit, publish; in sites mode the site check, the rounds
and the endpoint) keeps its figures in a :class:`RunMetrics` of its own, a fresh
``CollectorRegistry`` (no global registry state: two runs in one process never share a
series), and pushes it to ``monitoring.pushgateway`` with ``pushadd`` (HTTP POST, job
``fedpriv``, grouping key ``run_id``): a push replaces only the families it carries, so the
audit stage's push keeps the training stage's series. The rounds push at the end of every
round too (``monitoring.push_every_round``). A failed push prints one warning line and the
run goes on; after one failure the rounds stop trying, the stage's last push tries again.

Families are created on first use: a stage's registry holds only what that stage knows, and
a push never carries an empty family that would blank another stage's.

With ``monitoring.pushgateway`` and ``monitoring.listen`` unset, :func:`run_metrics` returns
None without importing ``prometheus_client``: nothing starts, nothing is printed.

Labels are bounded: the run id (the grouping key), a federation's site ids, and short codes
(reasons, attacks, aliases). Nothing patient-level: the figures are what the run already
releases (the noisy evaluation, the sites' reported ε, the ledger's per-site balance).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # prometheus_client is imported only when monitoring is on
    from prometheus_client import CollectorRegistry

    from adapters.federation_endpoint import FederationEndpoint
    from fl_core.config.model import MonitoringConfig, PipelineConfig
    from fl_core.config.site import SiteMonitoring
    from fl_core.federation.channel import Refusal
    from fl_core.federation.coordinator import RoundRecord
    from fl_core.results import AuditReport, PrivacyReport, Registration

JOB = "fedpriv"
PUBLISHED_RUN = "published"
"""The grouping key of a stage run without a flow run's id (``fedpriv stage``, DVC): the
published workspace's run, each such run replacing the last one's series."""

POLICY_REFUSAL = "refused by the site's policy"
"""How a site's session words a refusal by its policy (``adapters.site_session``)."""

_RUN = ("run_id",)
_SITE = ("run_id", "site")
# name → (kind, labels, help); counters are named with their ``_total``
FAMILIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "fedpriv_run_info": ("gauge", ("run_id", "model", "mode", "dataset"), "The run (1)."),
    "fedpriv_run_started_timestamp_seconds": ("gauge", _RUN, "When the run's training began."),
    "fedpriv_run_finished_timestamp_seconds": ("gauge", _RUN, "When the run was published."),
    "fedpriv_run_deadline_timestamp_seconds": ("gauge", _RUN, "When it should be published."),
    "fedpriv_rounds_planned": ("gauge", _RUN, "Rounds the run is configured for."),
    "fedpriv_round": ("gauge", _RUN, "The last completed round."),
    "fedpriv_round_duration_seconds": ("gauge", _RUN, "The last round's wall time."),
    "fedpriv_test_loss": ("gauge", _RUN, "Pooled test loss, last evaluated round."),
    "fedpriv_accuracy": ("gauge", _RUN, "Pooled test accuracy, last evaluated round."),
    "fedpriv_auc": ("gauge", _RUN, "Pooled test AUC, last evaluated round."),
    "fedpriv_balanced_accuracy": ("gauge", _RUN, "Pooled balanced accuracy, last evaluated."),
    "fedpriv_site_accuracy": ("gauge", _SITE, "A site's test accuracy as released (noisy)."),
    "fedpriv_uplink_bytes_total": ("counter", _RUN, "Update bytes sent to the coordinator."),
    "fedpriv_uplink_dense_bytes_total": ("counter", _RUN, "Dense float32 equivalent of them."),
    "fedpriv_downlink_bytes_total": ("counter", _RUN, "Model bytes broadcast to the sites."),
    "fedpriv_downlink_dense_bytes_total": ("counter", _RUN, "Dense float32 equivalent."),
    "fedpriv_compression_ratio": ("gauge", _RUN, "Uplink dense bytes / sent bytes, cumulative."),
    "fedpriv_sites_ok": ("gauge", _RUN, "Sites whose update counted in the last round."),
    "fedpriv_site_failures_total": ("counter", ("run_id", "site", "reason"),
                                    "Rounds a site failed, by reason code."),
    "fedpriv_site_last_seen_round": ("gauge", _SITE, "The last round a site's update counted."),
    "fedpriv_updates_rejected_total": ("counter", _SITE, "Updates rejected (size, NaN, norm)."),
    "fedpriv_updates_flagged_total": ("counter", _SITE, "Updates flagged by anomaly detection."),
    "fedpriv_updates_excluded_total": ("counter", _SITE, "Updates excluded by reputation."),
    "fedpriv_site_flagged": ("gauge", _SITE, "1: the site was flagged in the last round."),
    "fedpriv_site_reputation": ("gauge", _SITE, "Anomaly reputation r <- decay*r + flagged; "
                                "excluded at anomaly.exclude_at."),
    "fedpriv_epsilon_spent": ("gauge", _SITE, "DP-SGD ε a site reported for this run."),
    "fedpriv_epsilon": ("gauge", _RUN, "The run's ε per patient (add/remove one)."),
    "fedpriv_delta": ("gauge", _RUN, "The run's δ."),
    "fedpriv_epsilon_budget_left": ("gauge", ("site",), "ε a site's worst patient has left."),
    "fedpriv_epsilon_lifetime_cap": ("gauge", ("site",), "The lifetime ε cap per patient."),
    "fedpriv_policy_refusals_total": ("counter", _SITE, "Runs a site's policy refused."),
    "fedpriv_audit_attack_auc": ("gauge", ("run_id", "attack"), "Membership-inference AUC."),
    "fedpriv_audit_epsilon_lower_bound": ("gauge", _RUN, "Empirical ε lower bound (audit)."),
    "fedpriv_audit_privacy_consistent": ("gauge", _RUN, "1: the audit agrees with the ε."),
    "fedpriv_dp_audit_passed": ("gauge", _RUN, "1: the DP implementation audit passed."),
    "fedpriv_gate_passed": ("gauge", _RUN, "1: the promotion gate passed (champion)."),
    "fedpriv_gate_refusals_total": ("counter", _RUN, "Promotions the gate refused."),
    "fedpriv_alias_moves_total": ("counter", ("model", "alias"), "Registry aliases moved."),
    # the federation endpoint (sites mode)
    "fedpriv_endpoint_connected_sites": ("gauge", _RUN, "Sites whose session reported ready."),
    "fedpriv_endpoint_tls_refusals_total": ("counter", ("reason",),
                                            "Peer certificates the endpoint refused."),
    "fedpriv_endpoint_messages_refused_total": ("counter", ("reason",),
                                                "Calls refused after the peer was identified."),
    "fedpriv_endpoint_bytes_total": ("counter", ("direction",),
                                     "Bytes through the endpoint's calls (in: pushed by sites)."),
    "fedpriv_endpoint_call_duration_seconds": ("histogram", ("call",),
                                               "Call time (a pull includes its long-poll wait)."),
    # a site's own session (served at the site, SiteMetrics)
    "fedpriv_site_rounds_answered_total": ("counter", _SITE,
                                           "Training rounds the site answered with an update."),
    "fedpriv_site_bytes_total": ("counter", ("run_id", "site", "direction"),
                                 "Bytes of the site's messages (in: instructions, out: replies)."),
}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# what a failure's free-text reason says → a bounded code (first match wins)
_FAILURE_CODES = (
    ("evaluation", "evaluation"), ("deadline", "timeout"), ("timed out", "timeout"),
    ("timeout", "timeout"), ("payload", "payload"), ("non-finite", "payload"),
    ("elements, model has", "payload"), ("site reported failure", "error"),
    ("unreadable", "protocol"), ("replied with", "protocol"), ("reply for round", "protocol"),
    ("refused", "refused"), ("no such site", "missing"), ("gone", "missing"),
)


def failure_code(reason: str) -> str:
    """A failure's reason as a short label value (``fedpriv_site_failures_total``): free text
    would make a series per message."""
    text = reason.lower()
    return next((code for key, code in _FAILURE_CODES if key in text), "other")


class RunMetrics:
    """One stage's metrics of one run, in a registry of its own (see the module docstring)."""

    def __init__(self, run_id: str, *, pushgateway: str | None = None,
                 push_every_round: bool = False) -> None:
        from prometheus_client import CollectorRegistry

        self.run_id = run_id
        self.pushgateway = pushgateway
        self.push_every_round = push_every_round
        self.registry: CollectorRegistry = CollectorRegistry()
        self._families: dict[str, Any] = {}
        self._sites: set[str] = set()
        self._dense_up = self._sent_up = 0
        self._warned = False

    # ---- families ----------------------------------------------------------------------
    def family(self, name: str) -> Any:
        """The family ``name`` of :data:`FAMILIES`, registered on first use."""
        if name not in self._families:
            import prometheus_client

            kind, labels, doc = FAMILIES[name]
            if kind == "histogram":
                self._families[name] = prometheus_client.Histogram(
                    name, doc, labels, registry=self.registry, buckets=_BUCKETS)
            else:
                cls = prometheus_client.Gauge if kind == "gauge" else prometheus_client.Counter
                self._families[name] = cls(name, doc, labels, registry=self.registry)
        return self._families[name]

    def _child(self, name: str, labels: Mapping[str, str]) -> Any:
        names = FAMILIES[name][1]
        values = {"run_id": self.run_id, **labels}
        return self.family(name).labels(**{k: str(values[k]) for k in names})

    def set(self, name: str, value: float | None, **labels: str) -> None:
        """Set a gauge; None or NaN leaves it as it was (not evaluated, not released)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        self._child(name, labels).set(float(value))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._child(name, labels).inc(amount)

    # ---- the run -----------------------------------------------------------------------
    def start(self, cfg: PipelineConfig, mode: str) -> None:
        """The run's identity and plan, as training starts (``mode``: simulation or sites,
        as the rounds run)."""
        self.set("fedpriv_run_info", 1, model=cfg.model, mode=mode, dataset=cfg.data.spec.id)
        now = time.time()
        self.set("fedpriv_run_started_timestamp_seconds", now)
        self.set("fedpriv_rounds_planned", cfg.rounds)
        deadline = cfg.monitoring.run_deadline_s
        if deadline is not None:
            self.set("fedpriv_run_deadline_timestamp_seconds", now + deadline)

    def on_round(self, record: RoundRecord) -> None:
        """The round sink (:data:`fl_core.federation.coordinator.RoundSink`): every per-round
        family, then a push when ``push_every_round``."""
        self._round_figures(record)
        self._round_sites(record)
        if self.push_every_round:
            self.push(during_rounds=True)

    def _round_figures(self, record: RoundRecord) -> None:
        self.set("fedpriv_round", record.round)
        self.set("fedpriv_round_duration_seconds", record.seconds)
        for name, value in (("fedpriv_test_loss", record.test_loss),
                            ("fedpriv_accuracy", record.accuracy), ("fedpriv_auc", record.auc),
                            ("fedpriv_balanced_accuracy", record.balanced_accuracy)):
            self.set(name, value)
        for name, value in (
                ("fedpriv_uplink_bytes_total", record.bytes_uploaded),
                ("fedpriv_uplink_dense_bytes_total", record.bytes_uploaded_uncompressed),
                ("fedpriv_downlink_bytes_total", record.bytes_downloaded),
                ("fedpriv_downlink_dense_bytes_total", record.bytes_downloaded_uncompressed)):
            self.inc(name, value)
        self._sent_up += record.bytes_uploaded
        self._dense_up += record.bytes_uploaded_uncompressed
        self.set("fedpriv_compression_ratio", self._dense_up / max(self._sent_up, 1))
        self.set("fedpriv_sites_ok", record.clients_ok)

    def _round_sites(self, record: RoundRecord) -> None:
        self._sites.update(record.aggregated_clients, record.failed_clients,
                           record.flagged_clients, record.rejected_clients,
                           record.excluded_clients, record.client_accuracy)
        for site, accuracy in record.client_accuracy.items():
            self.set("fedpriv_site_accuracy", accuracy, site=site)
        for site in record.aggregated_clients:
            self.set("fedpriv_site_last_seen_round", record.round, site=site)
        for site in record.failed_clients:
            reason = failure_code(record.failure_reasons.get(site, ""))
            self.inc("fedpriv_site_failures_total", site=site, reason=reason)
        for name, sites in (("fedpriv_updates_rejected_total", record.rejected_clients),
                            ("fedpriv_updates_flagged_total", record.flagged_clients),
                            ("fedpriv_updates_excluded_total", record.excluded_clients)):
            for site in self._sites:  # every known site has its series (0 until it happens)
                self.inc(name, float(site in sites), site=site)
        for site in self._sites:
            self.set("fedpriv_site_flagged", float(site in record.flagged_clients), site=site)
        for site, score in record.reputation.items():  # while anomaly detection runs
            self.set("fedpriv_site_reputation", score, site=site)

    def record_privacy(self, privacy: PrivacyReport, budget_left: Mapping[str, float] = {},
                       cap: float | None = None) -> None:
        """The run's ε and δ, each site's reported ε, and (after the ledger's charge) the ε
        each site's worst-exposed patient has left under the lifetime cap."""
        self.set("fedpriv_epsilon", privacy.epsilon)
        self.set("fedpriv_delta", privacy.delta)
        for site, eps in (privacy.site_epsilon or privacy.client_epsilon).items():
            self.set("fedpriv_epsilon_spent", eps, site=site)
        for site, left in budget_left.items():
            self.set("fedpriv_epsilon_budget_left", left, site=site)
            self.set("fedpriv_epsilon_lifetime_cap", cap, site=site)

    def record_policy_refusals(self, refused: Iterable[str]) -> None:
        """The sites whose own policy refused this run (their budget, their rules)."""
        for site in refused:
            self.inc("fedpriv_policy_refusals_total", site=site)

    def record_audit(self, report: AuditReport) -> None:
        """The membership-inference audit: each attack's AUC, the ε lower bound, the verdict."""
        if not report.enabled:
            return
        for attack in report.attacks:
            self.set("fedpriv_audit_attack_auc", attack.get("auc"), attack=str(attack["attack"]))
        self.set("fedpriv_audit_epsilon_lower_bound", report.empirical_epsilon_lower_bound)
        self.set("fedpriv_audit_privacy_consistent", float(report.privacy_consistent))

    def record_dp_audit(self, passed: bool | None) -> None:
        self.set("fedpriv_dp_audit_passed", None if passed is None else float(passed))

    def record_gate(self, passed: bool) -> None:
        self.set("fedpriv_gate_passed", float(passed))
        self.inc("fedpriv_gate_refusals_total", float(not passed))

    def record_aliases(self, model: str, aliases: Iterable[str]) -> None:
        """The aliases this run's version now holds: each one moved to it."""
        for alias in aliases:
            self.inc("fedpriv_alias_moves_total", model=model, alias=alias)

    def finish(self) -> None:
        """The run is over (published): its finish time, and the last push."""
        self.set("fedpriv_run_finished_timestamp_seconds", time.time())
        self.push()

    # ---- pushing -----------------------------------------------------------------------
    def push(self, *, during_rounds: bool = False) -> None:
        """Push this registry (POST: only its own families are replaced). A failure prints
        one line (once) and the run goes on; the rounds stop trying after one."""
        if self.pushgateway is None or (during_rounds and self._warned):
            return
        from prometheus_client import pushadd_to_gateway

        try:
            pushadd_to_gateway(self.pushgateway, job=JOB, registry=self.registry,
                               grouping_key={"run_id": self.run_id}, timeout=5)
        except Exception as exc:  # noqa: BLE001 - monitoring never fails a run
            if not self._warned:
                print(f"monitoring: push to the Pushgateway {self.pushgateway} failed "
                      f"({type(exc).__name__}: {exc}); the run goes on", flush=True)
            self._warned = True


def run_metrics(cfg: PipelineConfig, run_id: str | None) -> RunMetrics | None:
    """This stage's :class:`RunMetrics` when monitoring is on, else None (nothing imported).
    ``run_id`` None: a stage run outside a flow (:data:`PUBLISHED_RUN`)."""
    monitoring: MonitoringConfig = cfg.monitoring
    if not monitoring.enabled:
        return None
    return RunMetrics(run_id or PUBLISHED_RUN, pushgateway=monitoring.pushgateway,
                      push_every_round=monitoring.push_every_round)


def record_audit_report(cfg: PipelineConfig, run_id: str | None, report: AuditReport) -> None:
    """The audit stage's figures and their push (monitoring on only)."""
    metrics = run_metrics(cfg, run_id)
    if metrics is not None:
        metrics.record_audit(report)
        metrics.push()


def record_site_check(cfg: PipelineConfig, run_id: str, ready: Iterable[str],
                      refused: Mapping[str, str]) -> None:
    """Sites mode, once the sessions are up: the policy refusals (a site whose own policy or
    ledger refused the run); pushed (monitoring on only)."""
    metrics = run_metrics(cfg, run_id)
    if metrics is None:
        return
    from fl_core.privacy.ledger import BUDGET_REFUSAL

    metrics.record_policy_refusals(
        site for site, why in refused.items()
        if why.startswith((POLICY_REFUSAL, BUDGET_REFUSAL)))
    metrics.push()


def record_publication(cfg: PipelineConfig, root: Any, run_id: str | None,
                       privacy: PrivacyReport, registration: Registration) -> None:
    """The publish stage's figures (monitoring on): the gate's decision, the aliases moved,
    the DP audit's kept verdict, each site's ε and budget left after the run's charge (the
    ledger's balance), the finish time; then the run's last push."""
    metrics = run_metrics(cfg, run_id)
    if metrics is None:
        return
    from adapters.dp_audit import kept_verdicts

    metrics.record_gate(registration.gate_passed)
    if registration.model_name:
        metrics.record_aliases(registration.model_name, registration.aliases)
    verdicts = kept_verdicts(cfg, root)
    metrics.record_dp_audit(not any(v.privacy_failure for v in verdicts) if verdicts else None)
    cap = registration.lifetime_epsilon
    metrics.record_privacy(privacy, {site: max(cap - spent, 0.0) for site, spent
                                     in registration.budget_spent.items()}, cap)
    metrics.finish()


def record_alias_change(cfg: PipelineConfig, action: str, model: str,
                        aliases: Iterable[str]) -> None:
    """A champion moved by hand (``fedpriv model rollback|retire``), pushed as its own group
    (``run_id`` = the action and the time: each change is one group, never merged with a
    run's)."""
    moved = list(aliases)
    metrics = run_metrics(cfg, f"{action}{int(time.time())}") if moved else None
    if metrics is not None:
        metrics.record_aliases(model, moved)
        metrics.push()


# ---- serving /metrics ---------------------------------------------------------------------

def serve_registry(registry: CollectorRegistry, listen: str) -> Any:
    """Serve ``registry`` on ``http://host:port/metrics`` (a thread of prometheus_client's),
    with the process's CPU, memory and open files added to it; the server, for
    :func:`stop_serving`. Raises ``OSError`` when the address is taken."""
    from prometheus_client import ProcessCollector, start_http_server

    ProcessCollector(registry=registry)
    host, port = listen.rsplit(":", 1)
    server, _ = start_http_server(int(port), addr=host, registry=registry)
    return server


def stop_serving(server: Any) -> None:
    """Stop a :func:`serve_registry` server (None: nothing served) and free its port."""
    if server is not None:
        server.shutdown()
        server.server_close()


# ---- the federation endpoint ------------------------------------------------------------

# identify_peer's reason (the first words of an IDENTITY refusal's detail) → the TLS label
_TLS_REASONS = {"unknown CA": "unknown_ca", "expired": "expired", "not yet valid": "expired",
                "revoked": "revoked", "not a client certificate": "identity_mismatch",
                "bad subject": "identity_mismatch"}


def tls_refusal_reason(reason: Refusal, detail: str) -> str | None:
    """The ``fedpriv_endpoint_tls_refusals_total`` reason of an endpoint refusal, or None when
    the refusal is of a message (the peer was identified)."""
    from fl_core.federation.channel import Refusal

    if reason is Refusal.IDENTITY:
        head = detail.split(":", 1)[0].strip()
        return _TLS_REASONS.get(head, "identity_mismatch" if head == "no client certificate"
                                else "other")
    if reason in (Refusal.UNKNOWN_SITE, Refusal.WRONG_SITE):
        return "identity_mismatch"
    if reason is Refusal.OLD_TLS:
        return "other"
    return None


class EndpointMetrics:
    """The federation endpoint's counters: an ``on_refusal`` sink (wrapping the endpoint's
    own printing one) and the sites connected. In the run's :class:`RunMetrics` registry,
    pushed with the run; served on ``monitoring.listen`` by :meth:`serve`.

    Only what the endpoint itself refuses is counted: a certificate from an unknown CA or an
    expired one is refused by gRPC in the TLS handshake, before any Python code sees the
    connection; the endpoint's own check (:func:`fl_core.federation.identity.identify_peer`
    against the CA and revocation list on disk now) counts revoked certificates, and the
    unknown-CA and expired ones only when the handshake let them through (a CA bundle or
    certificate changed since the connection was made)."""

    def __init__(self, metrics: RunMetrics, forward: Any = None) -> None:
        self.metrics = metrics
        self._forward = forward
        self._server: Any = None

    def on_refusal(self, peer: str, reason: Refusal, detail: str) -> None:
        tls = tls_refusal_reason(reason, detail)
        if tls is not None:
            self.metrics.inc("fedpriv_endpoint_tls_refusals_total", reason=tls)
        else:
            self.metrics.inc("fedpriv_endpoint_messages_refused_total",
                             reason=reason.name.lower())
        if self._forward is not None:
            self._forward(peer, reason, detail)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        self.metrics._child(name, labels).observe(seconds)  # noqa: SLF001 - same module

    def instrument(self, endpoint: FederationEndpoint) -> None:
        """Wrap the endpoint's two handlers (before it starts): bytes in and out, call time.
        The handlers are bound at ``start``; nothing else of the endpoint changes."""
        pull, push = endpoint._pull, endpoint._push  # noqa: SLF001 - instrumented, not changed
        count = self.metrics.inc

        def timed_pull(request: bytes, context: Any) -> Iterator[bytes]:
            started = time.perf_counter()
            count("fedpriv_endpoint_bytes_total", len(request), direction="in")
            try:
                for chunk in pull(request, context):
                    count("fedpriv_endpoint_bytes_total", len(chunk), direction="out")
                    yield chunk
            finally:
                self.observe("fedpriv_endpoint_call_duration_seconds",
                             time.perf_counter() - started, call="pull")

        def counted(stream: Iterator[bytes]) -> Iterator[bytes]:
            for chunk in stream:
                count("fedpriv_endpoint_bytes_total", len(chunk), direction="in")
                yield chunk

        def timed_push(stream: Iterator[bytes], context: Any) -> bytes:
            started = time.perf_counter()
            try:
                answer = push(counted(stream), context)
                count("fedpriv_endpoint_bytes_total", len(answer), direction="out")
                return answer
            finally:
                self.observe("fedpriv_endpoint_call_duration_seconds",
                             time.perf_counter() - started, call="push")

        endpoint._pull, endpoint._push = timed_pull, timed_push  # type: ignore[method-assign]  # noqa: SLF001

    def connected(self, sites: int) -> None:
        self.metrics.set("fedpriv_endpoint_connected_sites", sites)

    def serve(self, listen: str | None) -> None:
        """Serve the registry's ``/metrics`` on ``host:port`` (nothing when None)."""
        if listen is None:
            return
        self._server = serve_registry(self.metrics.registry, listen)

    def close(self) -> None:
        """The endpoint stopped: push its counters with the run's, stop serving."""
        self.metrics.push()
        self.stop()

    def stop(self) -> None:
        stop_serving(self._server)
        self._server = None


def endpoint_metrics(cfg: PipelineConfig, run_id: str) -> EndpointMetrics | None:
    """The federation endpoint's metrics (monitoring on), serving ``/metrics`` on
    ``monitoring.listen`` when set; :meth:`EndpointMetrics.close` pushes and stops."""
    metrics = run_metrics(cfg, run_id)
    if metrics is None:
        return None
    from adapters.federation_endpoint import print_refusal

    monitor = EndpointMetrics(metrics, forward=print_refusal)
    monitor.serve(cfg.monitoring.listen)
    return monitor


# ---- a site's own session -----------------------------------------------------------------

class SiteMetrics:
    """A hospital's own figures while its session runs, served at the site on its
    ``site.yaml``'s ``monitoring.listen`` (never an address of the coordinator's choosing):
    its budget left and lifetime cap from its own ledger and policy (after the run's charge),
    the DP-SGD ε its replies report, its policy's refusals, the rounds it answered, its
    messages' bytes, and the process's CPU and memory. Nothing is pushed: the hospital decides
    whether anything scrapes it. Nothing patient-level: these are the figures the site
    already reports to the coordinator, or counts."""

    def __init__(self, site: str, run_id: str) -> None:
        self.site = site
        self.metrics = RunMetrics(run_id)
        self._server: Any = None
        # the counters exist from the start (0 until it happens): increase() sees the first
        self.metrics.inc("fedpriv_policy_refusals_total", 0, site=site)
        self.metrics.inc("fedpriv_site_rounds_answered_total", 0, site=site)
        for direction in ("in", "out"):
            self.metrics.inc("fedpriv_site_bytes_total", 0, site=site, direction=direction)

    def serve(self, listen: str) -> None:
        """Serve ``/metrics`` on ``host:port``; an address in use prints one line and the
        session goes on without it (a second session of the site at the same time)."""
        try:
            self._server = serve_registry(self.metrics.registry, listen)
        except OSError as exc:
            print(f"site {self.site}: monitoring: cannot serve /metrics on {listen} ({exc}); "
                  f"the session goes on", flush=True)

    def budget(self, left: float, cap: float) -> None:
        """The ε the site's most exposed patient has left, and the policy's lifetime cap."""
        self.metrics.set("fedpriv_epsilon_budget_left", left, site=self.site)
        self.metrics.set("fedpriv_epsilon_lifetime_cap", cap, site=self.site)

    def refused(self) -> None:
        """The site's own policy or ledger refused the run."""
        self.metrics.inc("fedpriv_policy_refusals_total", site=self.site)

    def answered(self, request: bytes, reply: bytes) -> None:
        """One instruction answered: its bytes; a training instruction answered with an
        update: one round more, and the ε the reply reports (read from the frame's scalars,
        the update itself untouched)."""
        from fl_core.federation.messages import (
            FitInstruction,
            FitReply,
            MessageError,
            peek_message,
        )

        count = self.metrics.inc
        count("fedpriv_site_bytes_total", len(request), site=self.site, direction="in")
        count("fedpriv_site_bytes_total", len(reply), site=self.site, direction="out")
        try:
            (asked, _), (kind, meta) = peek_message(request), peek_message(reply)
        except MessageError:
            return
        if asked is FitInstruction and kind is FitReply:
            count("fedpriv_site_rounds_answered_total", site=self.site)
            self.metrics.set("fedpriv_epsilon_spent", meta.get("epsilon"), site=self.site)

    def watch(self, answer: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        """``answer`` (instruction bytes → reply bytes), each call counted."""
        def counted(request: bytes) -> bytes:
            reply = answer(request)
            self.answered(request, reply)
            return reply

        return counted

    def stop(self) -> None:
        """The session ended: stop serving (the port is free again)."""
        stop_serving(self._server)
        self._server = None


def site_metrics(monitoring: SiteMonitoring | None, site: str,
                 run_id: str) -> SiteMetrics | None:
    """The site session's :class:`SiteMetrics`, serving on ``monitoring.listen``; None without
    a ``monitoring`` section in the site's file (nothing started, nothing imported)."""
    if monitoring is None:
        return None
    watched = SiteMetrics(site, run_id)
    watched.serve(monitoring.listen)
    return watched
