"""Where a privacy ledger's head is recorded, and the check that the ledger still holds it.

A ledger's charges are hash-chained (:mod:`adapters.ledger_store`), so a ledger that only
grew still contains every head it ever had. Deleting the file, pointing ``privacy.ledger`` at
another one, or cutting charges off would reset budgets; each is caught here by comparing the
ledger with a head recorded outside it:

- the coordinator (simulation mode, ``fedpriv stage``): every registered DP-SGD run and its
  model version carry :data:`HEAD_TAG` and :data:`COUNT_TAG` (:func:`head_tags`); before
  anything trains, :func:`check_recorded_head` finds the latest run of the experiment with
  the tag and refuses a missing ledger (:class:`~adapters.preflight.PreflightError`, exit 6)
  or one that does not hold that head or whose chain is broken
  (:class:`~adapters.ledger_store.LedgerIntegrityError`, exit 5);
- a site (sites mode): an anchor file beside its ledger (:func:`write_anchor` after every
  charge, :func:`check_anchor` before the session charges), and the head it reports in its
  ``SiteReady``, which the coordinator records as ``site.<name>.ledger_head``.

A new ledger on purpose (a new deployment) is :func:`start_new_ledger` (``fedpriv budget
new-ledger --reason ...``): an MLflow run recording when, why, which file and its head; the
check then compares against that head, the latest. What this cannot see: a ledger deleted
together with every record of its head (the MLflow store, or a site's anchor file) — the
record is only as safe as where it is kept.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from adapters.ledger_store import GENESIS, LedgerHead, LedgerIntegrityError, PrivacyLedger
from fl_core.config.model import PipelineConfig

HEAD_TAG = "privacy.ledger_head"
COUNT_TAG = "privacy.ledger_charges"
EVENT_TAG = "privacy.ledger_event"  # "new-ledger" on the run of `fedpriv budget new-ledger`
REASON_TAG = "privacy.ledger_reason"
PATH_TAG = "privacy.ledger_path"
NEW_LEDGER = "new-ledger"
ANCHOR_SUFFIX = ".head.json"


def site_head_tag(site: str) -> str:
    """The run/version tag holding the head a site reported of its own ledger."""
    return f"site.{site}.ledger_head"


@dataclass(frozen=True)
class RecordedHead:
    """A head recorded outside the ledger, and by what (for the refusal's message)."""

    head: LedgerHead
    recorded_by: str


def head_tags(ledger: PrivacyLedger) -> dict[str, str]:
    """The tags recording ``ledger``'s current head (run and model version)."""
    head = ledger.head()
    return {HEAD_TAG: head.hash, COUNT_TAG: str(head.count)}


def ledger_file(cfg: PipelineConfig, root: Path) -> Path:
    """The coordinator's ledger file, as :func:`adapters.accounting.open_ledger` opens it."""
    path = cfg.ledger_path
    return path if path.is_absolute() else root / path


# --- the coordinator: against its MLflow store ---------------------------------------------------


def recorded_head(uri: str, experiment: str) -> RecordedHead | None:
    """The latest head recorded in ``experiment`` of the MLflow store at ``uri`` (a
    registration's tag or a new-ledger event), or None if none is recorded."""
    from adapters.mlflow_registration import open_store

    client = open_store(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{HEAD_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    tags = run.data.tags
    what = "the new-ledger event" if tags.get(EVENT_TAG) == NEW_LEDGER else "MLflow run"
    return RecordedHead(LedgerHead(tags[HEAD_TAG], int(tags.get(COUNT_TAG, "0"))),
                        f"{what} {run.info.run_id} of experiment {experiment!r}")


def check_recorded_head(cfg: PipelineConfig, root: Path, uri: str) -> None:
    """Before anything trains: the ledger holds the head its MLflow store last recorded.

    Raises :class:`~adapters.preflight.PreflightError` (exit 6) when the store knows a head
    and the ledger file is missing, :class:`LedgerIntegrityError` (exit 5) when the ledger is
    there but replaced, truncated or altered. Nothing recorded: nothing to compare (a new
    deployment)."""
    from adapters.preflight import PreflightError

    recorded = recorded_head(uri, cfg.mlflow.experiment)
    if recorded is None:
        return
    path = ledger_file(cfg, root)
    key = "privacy.ledger" if cfg.privacy.ledger else "state_dir"
    if not path.is_file():
        raise PreflightError(
            f"{key}: the privacy ledger {path} is missing, but {recorded.recorded_by} "
            f"recorded its head {recorded.head.hash} after {recorded.head.count} charge(s): "
            f"every budget would start again at zero. Restore the ledger that holds that "
            f"head, or start a new ledger deliberately with `fedpriv budget new-ledger "
            f"--reason ...`")
    PrivacyLedger(path).require_intact(recorded.head, recorded.recorded_by)


def start_new_ledger(cfg: PipelineConfig, root: Path, reason: str) -> tuple[LedgerHead, str]:
    """Start (or adopt) the configured ledger on purpose: an MLflow run in the experiment
    records when, why, by whom, the file and its head; later checks compare against it.
    Returns the head and the run id. An existing ledger must be intact (its chain verifies):
    a tampered one is not adopted."""
    if not reason.strip():
        from fl_core.config.model import ConfigError

        raise ConfigError("fedpriv budget new-ledger: --reason must say why the ledger is "
                          "started anew")
    from adapters.artifacts import Paths
    from adapters.mlflow_registration import _ensure_experiment, open_store

    paths = Paths.of(cfg, root)
    located = cfg.model_copy(update={"state_dir": str(paths.state)})
    ledger = PrivacyLedger(ledger_file(cfg, paths.root))
    ledger.require_intact()
    head = ledger.head()
    client = open_store(located.mlflow_tracking_uri)
    artifacts = (paths.state / "mlartifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    experiment_id = _ensure_experiment(client, cfg.mlflow.experiment, artifacts.as_uri())
    run = client.create_run(experiment_id, run_name=NEW_LEDGER, tags={
        EVENT_TAG: NEW_LEDGER, REASON_TAG: reason.strip()[:5000], PATH_TAG: str(ledger.path),
        HEAD_TAG: head.hash, COUNT_TAG: str(head.count),
        "fedpriv.host": socket.gethostname(), "fedpriv.user": _user(),
        "privacy.ledger_started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    client.set_terminated(run.info.run_id, "FINISHED")
    return head, run.info.run_id


def _user() -> str:
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER", "")


# --- a site: against its anchor file -------------------------------------------------------------


def anchor_path(ledger: PrivacyLedger) -> Path:
    """The anchor file beside a site's ledger (``<ledger file>.head.json``)."""
    return ledger.path.with_name(ledger.path.name + ANCHOR_SUFFIX)


def write_anchor(ledger: PrivacyLedger, new_ledger: dict[str, object] | None = None
                 ) -> LedgerHead:
    """Record the ledger's head beside it (atomically), after every charge; the last
    deliberate new-ledger event (``new_ledger``, else the one the anchor holds) is kept."""
    head = ledger.head()
    path = anchor_path(ledger)
    if new_ledger is None and path.exists():
        new_ledger = json.loads(path.read_text()).get("new_ledger")
    record: dict[str, object] = {"hash": head.hash, "count": head.count,
                                 "ledger": ledger.path.name, "at": time.time()}
    if new_ledger:
        record["new_ledger"] = new_ledger
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return head


def start_new_site_ledger(ledger_path: Path, reason: str) -> LedgerHead:
    """``fedpriv site new-ledger``: the site starts (or adopts) its ledger on purpose. The
    anchor then records when, why, by whom and the head it replaced; an existing ledger must
    be intact (an edit is not adopted)."""
    if not reason.strip():
        from fl_core.config.model import ConfigError

        raise ConfigError("fedpriv site new-ledger: --reason must say why the ledger is "
                          "started anew")
    anchor = ledger_path.with_name(ledger_path.name + ANCHOR_SUFFIX)
    replaced = json.loads(anchor.read_text()) if anchor.exists() else None
    ledger = PrivacyLedger(ledger_path)
    ledger.require_intact()
    return write_anchor(ledger, {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason.strip(),
        "user": _user(), "host": socket.gethostname(),
        "replaced": None if replaced is None else {k: replaced.get(k)
                                                   for k in ("hash", "count", "ledger")}})


def check_anchor(ledger_path: Path) -> None:
    """A site's ledger still holds the head its anchor file recorded: raise
    :class:`LedgerIntegrityError` naming what is missing (the ledger itself, or the head).
    No anchor: a site that never charged (or one written before anchors: its ledger's chain
    must still verify)."""
    anchor = ledger_path.with_name(ledger_path.name + ANCHOR_SUFFIX)
    if not anchor.exists():
        if ledger_path.exists():
            PrivacyLedger(ledger_path).require_intact()
        return
    recorded = json.loads(anchor.read_text())
    head = LedgerHead(str(recorded["hash"]), int(recorded["count"]))
    if not ledger_path.exists() and head.hash != GENESIS:
        raise LedgerIntegrityError(
            f"the site's privacy ledger {ledger_path} is missing, but its anchor {anchor} "
            f"recorded the head {head.hash} after {head.count} charge(s): every budget would "
            f"start again at zero. Restore the ledger, or start a new one deliberately with "
            f"`fedpriv site new-ledger --reason ...`")
    PrivacyLedger(ledger_path).require_intact(head, f"the site's anchor {anchor}")
