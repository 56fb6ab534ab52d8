"""A hospital's side of ``federation.mode=sites``: one session per training run, at the site.

:func:`serve_site` runs where the site's data lives (the Prefect flow ``fl-site`` on the
site's own work pool calls it; nothing here imports Prefect). It reads only the site's own
file, validates it with GX (the full result stays at the site; the coordinator gets a summary
without cell values), splits its patients 80/20 as the simulation would, charges the site's
own privacy ledger (checked at start, so the coordinator can call off a run some site cannot
afford; charged before the first instruction is answered), then answers the
coordinator's instructions over its one outbound channel to the federation endpoint
(:class:`adapters.site_channel.SiteChannel`) until told to stop. A dropped connection is
retried with backoff; a refusal (a revoked certificate) ends the session. Its state (model
replica, error feedback, DP accountant history) is saved at the site after every answer, so a
session started again for the same run (a crashed worker, a cancelled straggler) rejoins
where it left off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

from adapters.data_report import write_site_data_report
from adapters.gx_validation import validate_site_file
from adapters.ledger_anchor import check_anchor, write_anchor
from adapters.ledger_store import PrivacyLedger
from adapters.site_channel import Backoff, Instruction, SiteChannel, permanent
from adapters.site_files import (
    own_data_config,
    site_client_data,
    site_dropped_rows,
    site_record_keys,
)
from fl_core.audit.federated import site_audit_reply
from fl_core.config.model import PipelineConfig, site_slug
from fl_core.config.site import SitePolicy
from fl_core.data.tables import ClientData, ClientSplit, Partition
from fl_core.federation.channel import READY_SEQ, ChannelRefusedError, Kind
from fl_core.federation.messages import (
    AuditInstruction,
    AuditReply,
    Failure,
    MessageError,
    Shutdown,
    SiteReady,
    decode_message,
    encode_message,
)
from fl_core.federation.site_client import SiteClient
from fl_core.federation.wiring import (
    build_target_model,
    make_dpsgd,
    make_site_client,
)
from fl_core.privacy.accounting import planned_charge, released_charges
from fl_core.privacy.dpsgd import DPSGDConfig
from fl_core.privacy.ledger import BUDGET_REFUSAL, BudgetExceededError, Charge
from fl_core.privacy.policy import policy_refusals
from fl_core.privacy.randomness import make_random

if TYPE_CHECKING:  # prometheus_client only when the site's file asks for monitoring
    from adapters.metrics import SiteMetrics

KIND_SITE_TRAIN = "site-train"


@dataclass(frozen=True)
class SiteSession:
    """Where one site's session talks and keeps its state."""

    channel: SiteChannel
    site: str
    state_dir: Path  # at the site: its own files only
    charge_key: str  # the coordinator's run, stable across retries: one charge per run

    @property
    def run_id(self) -> str:
        return self.channel.run_id


def serve_site(cfg: PipelineConfig, *, csv_path: Path, site: str, index: int,
               session: SiteSession, idle_timeout_s: float, policy: SitePolicy,
               metrics: SiteMetrics | None = None) -> str:
    """Validate, split, check the run against the site's ``policy``, charge the site's own
    ledger, then answer instructions until :class:`Shutdown` (or no instruction for
    ``idle_timeout_s``). ``index`` is the site's position in ``federation.sites`` (its codec
    seed, as in simulation). ``metrics``: the site's own figures (its ``site.yaml``'s
    ``monitoring``; None: none kept). Returns why it stopped."""
    report, summary = validate_site_file(cfg, csv_path, site)
    if not summary["passed"]:
        _ready(session, passed=False, summary=summary)
        return "validation failed"
    data = site_client_data(cfg, csv_path, site)
    # the site's own data report: printed and kept here, never sent (docs/privacy.md)
    write_site_data_report(own_data_config(cfg, csv_path, site), session.state_dir, site,
                           ClientSplit(site, data.train_ids, data.test_ids))
    records = site_record_keys(cfg, csv_path, site)  # the ledger's accounts: the records
    dp = make_dpsgd(cfg=cfg, data=[data])  # σ calibrated once: charged, then trained with
    broken = policy_refusals(cfg, policy, noise_multiplier=dp.noise_multiplier if dp else None)
    if broken:  # before the ledger: a run the site does not accept costs it nothing
        _refused(metrics)
        _report(session, encode_message(Failure(site, -1, "refused by the site's policy: "
                                                + "; ".join(broken))))
        return "refused by policy"
    try:
        budget_left = site_budget_left(session, policy)
        _budget(metrics, budget_left, policy)
        ledger_run = check_site_budget(cfg, session, data, dp=dp, policy=policy,
                                       records=records)
    except BudgetExceededError as exc:  # the coordinator refuses the whole run on this
        _refused(metrics)
        _report(session, encode_message(Failure(site, -1, f"{BUDGET_REFUSAL}{exc}")))
        return "cannot afford the run"
    except Exception as exc:  # a broken ledger: the coordinator is told
        _report(session, encode_message(Failure(site, -1, f"{type(exc).__name__}: {exc}")))
        return "ledger refused"
    client = make_site_client(cfg=cfg, data=data, index=index, dp=dp,
                              random=make_random(cfg.privacy.randomness, cfg.seed))
    restore_state(client, session)
    # counts only: the rows the site left out, and its split in records (patients: SiteReady)
    summary = {**summary, "dropped_rows": site_dropped_rows(cfg, csv_path, site),
               "records": {"train": data.num_train, "test": int(data.x_test.shape[0])}}
    _ready(session, passed=True, summary=summary, data=data, ledger_run=ledger_run,
           budget_left=budget_left, ledger_head=site_ledger(session, policy).head().hash)
    answerer = SiteAnswerer(cfg, client, data, session,
                            charge=lambda: _charge(cfg, session, data, dp=dp, policy=policy,
                                                   records=records, metrics=metrics))
    answer = answerer if metrics is None else metrics.watch(answerer)
    return _answer_until_shutdown(answer, session, idle_timeout_s)


def _refused(metrics: SiteMetrics | None) -> None:
    if metrics is not None:
        metrics.refused()


def _budget(metrics: SiteMetrics | None, left: float, policy: SitePolicy) -> None:
    if metrics is not None:
        metrics.budget(left, policy.lifetime_epsilon)


def _charge(cfg: PipelineConfig, session: SiteSession, data: ClientData, *,
            dp: DPSGDConfig | None, policy: SitePolicy, records: Mapping[int, str],
            metrics: SiteMetrics | None) -> str:
    """The run's charge (:func:`charge_site_ledger`), then the budget the ledger has left
    after it, for the site's own metrics."""
    run = charge_site_ledger(cfg, session, data, dp=dp, policy=policy, records=records)
    if metrics is not None:
        _budget(metrics, site_budget_left(session, policy), policy)
    return run


class SiteAnswerer:
    """Bytes in, bytes out: rounds go to the :class:`SiteClient`, the membership audit to
    :func:`fl_core.audit.federated.site_audit_reply` (aggregates only); anything else, or any
    error, becomes a :class:`Failure` message.

    ``charge`` charges the site's ledger for the run; it is called before the first
    instruction is answered (nothing of the site's patients is used before it succeeds), so
    a run the coordinator calls off after the start-up reports costs the site nothing. A
    charge refused then (another run spent the budget meanwhile) refuses every instruction."""

    def __init__(self, cfg: PipelineConfig, client: SiteClient, data: ClientData,
                 session: SiteSession, charge: Callable[[], str] = lambda: "") -> None:
        self.cfg, self.client, self.data, self.session = cfg, client, data, session
        self._charge: Callable[[], str] | None = charge

    def __call__(self, request: bytes) -> bytes:
        if self._charge is not None:
            try:
                self._charge()
            except Exception as exc:  # refused (budget) or a broken ledger: never trains
                return encode_message(Failure(self.session.site, -1,
                                              f"{type(exc).__name__}: {exc}"))
            self._charge = None
        try:
            message = decode_message(request, expect=AuditInstruction)
        except MessageError:  # a round's instruction (or garbage): the client decides
            reply = self.client.handle(request)
            save_state(self.client, self.session)
            return reply
        try:
            return encode_message(self.audit(message))
        except Exception as exc:  # the coordinator gets a message, never a traceback
            return encode_message(Failure(self.session.site, message.round,
                                          f"{type(exc).__name__}: {exc}"))

    def audit(self, instruction: AuditInstruction) -> AuditReply:
        """Attack the final model on this site's own patients with the loss-threshold attack
        only: no shadow model trains here (shadows on the site's own patients would make the
        released histogram's sensitivity unbounded)."""
        cfg = self.cfg
        num_features = int(self.data.x_train.shape[1])
        return site_audit_reply(instruction, lambda: build_target_model(cfg, num_features)[0],
                                self.data, bins=cfg.privacy.audit_bins,
                                noise=cfg.privacy.audit_noise,
                                random=make_random(cfg.privacy.randomness, cfg.seed).stream(
                                    "audit", self.session.site))


def _ready(session: SiteSession, *, passed: bool, summary: dict, data: ClientData | None = None,
           ledger_run: str = "", budget_left: float = 0.0, ledger_head: str = "") -> None:
    message = SiteReady(
        site=session.site, round=-1, passed=passed,
        num_features=0 if data is None else int(data.x_train.shape[1]),
        train_patients=0 if data is None else len(data.train_ids),
        test_patients=0 if data is None else len(data.test_ids),
        validation=json.dumps(summary, default=str), ledger_run_id=ledger_run,
        budget_left=budget_left, ledger_head=ledger_head)
    _report(session, encode_message(message))


def _report(session: SiteSession, message: bytes, attempts: int = 8) -> None:
    """Send the start-up report, retrying while the endpoint is unreachable."""
    backoff = Backoff()
    for attempt in range(attempts):
        try:
            session.channel.push(message, seq=READY_SEQ, round_number=-1, kind=Kind.READY)
            return
        except grpc.RpcError as exc:
            if permanent(exc) or attempt == attempts - 1:
                raise SiteChannelError(f"the endpoint refused the start-up report: "
                                       f"{_status(exc)}") from None
            backoff.wait()


def site_ledger(session: SiteSession, policy: SitePolicy) -> PrivacyLedger:
    """The site's own ledger, where its policy says (in its state folder), never where the
    coordinator's configuration says: the coordinator cannot hand a site a fresh ledger.
    Opened only if it still holds the head its anchor file recorded and its chain verifies
    (:func:`adapters.ledger_anchor.check_anchor`): a deleted, replaced or truncated ledger
    refuses the session (``LedgerIntegrityError``, named to the coordinator)."""
    path = session.state_dir / policy.ledger
    check_anchor(path)
    return PrivacyLedger(path)


def site_budget_left(session: SiteSession, policy: SitePolicy) -> float:
    """The site's lifetime ε (its policy's) minus its most exposed patient's spending."""
    spent = [b.tight_epsilon for b in site_ledger(session, policy).balances()
             if b.site == session.site]
    return max(0.0, policy.lifetime_epsilon - max(spent, default=0.0))


def _site_run_id(session: SiteSession) -> str:
    return f"{session.charge_key}{site_slug(session.site).replace('-', '')}"


def _site_charges(cfg: PipelineConfig, data: ClientData, dp: DPSGDConfig, run_id: str,
                  site: str, records: Mapping[int, str]) -> list[Charge]:
    """The run's charges at this site: its training patients (DP-SGD), then what the run
    releases about its patients (:func:`~fl_core.privacy.accounting.released_charges`: the
    evaluation and audit statistics, and the audit's release about its training patients)."""
    split = Partition((ClientSplit(data.client_id, data.train_ids, data.test_ids),),
                      "by_site", cfg.seed)
    site_of = {int(i): site for i in (*data.train_ids, *data.test_ids)}
    charges = [planned_charge(cfg, site_of, split, dp.noise_multiplier, run_id,
                              KIND_SITE_TRAIN, records)]
    return charges + released_charges(cfg, site_of, split, run_id, records)


def check_site_budget(cfg: PipelineConfig, session: SiteSession, data: ClientData, *,
                      dp: DPSGDConfig | None, policy: SitePolicy,
                      records: Mapping[int, str]) -> str:
    """At session start, before anything is charged or trained: raise
    :class:`BudgetExceededError` if the planned run would take one of the site's patients past
    its policy's lifetime ε. Returns the ledger run id the run will be charged under ("" when
    the run is not private). A session started again for a run already charged passes (only
    the charges not made yet are checked)."""
    if dp is None:
        return ""
    run_id = _site_run_id(session)
    ledger = site_ledger(session, policy)
    pending = [c for c in _site_charges(cfg, data, dp, run_id, session.site, records)
               if not ledger.has_run(c.run_id)]
    if pending:
        ledger.check(pending, policy.lifetime_epsilon, "Nothing was charged or trained")
    return run_id


def charge_site_ledger(cfg: PipelineConfig, session: SiteSession, data: ClientData, *,
                       dp: DPSGDConfig | None, policy: SitePolicy,
                       records: Mapping[int, str]) -> str:
    """Charge the site's own ledger for the planned run of the recipe ``dp`` (the one its
    client trains with) against its policy's lifetime ε, once per session (idempotent: a
    session started again for the same run does not charge twice). Returns the ledger run id
    ("" when the run is not private)."""
    if dp is None:
        return ""
    run_id = _site_run_id(session)
    ledger = site_ledger(session, policy)
    # training, then test patients; each once, whatever stopped an earlier session between
    for charge in _site_charges(cfg, data, dp, run_id, session.site, records):
        if not ledger.has_run(charge.run_id):
            ledger.charge(charge, policy.lifetime_epsilon)
            write_anchor(ledger)  # the new head beside the ledger, after every charge
    return run_id


def _state_file(session: SiteSession) -> Path:
    return session.state_dir / "sessions" / session.run_id / "state.pt"


def restore_state(client: SiteClient, session: SiteSession) -> None:
    path = _state_file(session)
    if path.exists():  # the site's own file, written by save_state below
        client.load_state_dict(torch.load(path, weights_only=True))


def save_state(client: SiteClient, session: SiteSession) -> None:
    path = _state_file(session)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    torch.save(client.state_dict(), tmp)
    tmp.replace(path)


class SiteChannelError(RuntimeError):
    """The endpoint refused this site (its certificate revoked, its calls refused)."""


def _status(error: grpc.RpcError) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code else 'error'}: {details}"


def _answer_until_shutdown(answer: Callable[[bytes], bytes], session: SiteSession,
                           idle_timeout_s: float) -> str:
    """Pull the next instruction, answer it, push the answer, until a :class:`Shutdown`
    arrives or nothing comes for ``idle_timeout_s``. A call cut by the network is retried
    with backoff (gRPC reconnects); one the endpoint refused ends the session."""
    after, last_seen, backoff = 0, time.monotonic(), Backoff()
    while time.monotonic() - last_seen < idle_timeout_s:
        try:
            instruction = session.channel.pull(after)
        except grpc.RpcError as exc:
            if permanent(exc):
                return f"refused by the endpoint ({_status(exc)})"
            backoff.wait()
            continue
        except ChannelRefusedError as exc:  # the endpoint's answer itself was malformed
            print(f"site {session.site}: {exc}", flush=True)
            backoff.wait()
            continue
        backoff.reset()
        if instruction is None:
            continue  # a heartbeat: nothing new yet
        after, last_seen = instruction.seq, time.monotonic()
        try:
            if isinstance(decode_message(instruction.data, expect=Shutdown), Shutdown):
                return "shutdown"
        except ValueError:
            pass  # not a shutdown: the client decodes (and refuses) it itself
        _deliver(session, instruction, answer(instruction.data))
    return f"no instruction for {idle_timeout_s:g} s"


def _deliver(session: SiteSession, instruction: Instruction, reply: bytes,
             attempts: int = 6) -> None:
    """Push one answer, retrying while the connection is down; a refusal (late, replayed) is
    logged at the site and the session goes on to the next instruction."""
    backoff = Backoff()
    for _ in range(attempts):
        try:
            session.channel.push(reply, seq=instruction.seq, round_number=instruction.round)
            return
        except grpc.RpcError as exc:
            if permanent(exc):
                print(f"site {session.site}: answer to instruction {instruction.seq} refused "
                      f"({_status(exc)})", flush=True)
                return
            backoff.wait()
    print(f"site {session.site}: answer to instruction {instruction.seq} not delivered "
          f"after {attempts} tries", flush=True)
