"""The Prefect flow ``fl-site``: one hospital's session of a training run, on its own pool.

Deployed once per site (``fedpriv deploy-sites``) on that site's work pool; the site's own
worker polls the pool (pull-based: the hospital accepts no inbound connection). What the
site reads comes from *its* environment, set where its worker starts, never from the
coordinator's parameters:

- ``FEDPRIV_SITE_ID``: the site this worker serves (a run addressed to another site is
  refused);
- ``FEDPRIV_SITE_DATA``: its CSV (only its own patients);
- ``FEDPRIV_SITE_STATE``: its state folder (its privacy ledger, session state; default
  ``.fedpriv-site`` next to the CSV);
- ``FEDPRIV_MESSAGE_STORE`` (optional): its path to the message store, when it differs from
  the coordinator's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow

from adapters.message_store import FolderStore
from adapters.site_session import SiteSession, serve_site
from fl_core.config.model import PipelineConfig


class SiteEnvironmentError(RuntimeError):
    """The site's worker environment does not say which site it is or where its data is."""


def site_environment(site: str) -> tuple[Path, Path]:
    """The site's own data file and state folder, from the worker's environment."""
    own = os.environ.get("FEDPRIV_SITE_ID")
    if own is None or "FEDPRIV_SITE_DATA" not in os.environ:
        raise SiteEnvironmentError("this worker has no FEDPRIV_SITE_ID / FEDPRIV_SITE_DATA: "
                                   "start it as docs/sites-mode.md shows")
    if own != site:
        raise SiteEnvironmentError(f"a session for site {site!r} reached the worker of site "
                                   f"{own!r}: refused (check federation.sites work pools)")
    data = Path(os.environ["FEDPRIV_SITE_DATA"]).resolve()
    state = Path(os.environ.get("FEDPRIV_SITE_STATE", data.parent / ".fedpriv-site"))
    return data, state.resolve()


@flow(name="fl-site", log_prints=True)
def fl_site(site: str, session: str, index: int, charge_key: str, config: dict[str, Any],
            message_store: str, idle_timeout_s: float = 600.0) -> str:
    """Serve one training run at this site: validate and split its own data, charge its own
    ledger (once per ``charge_key``: a retried run is not charged twice), answer the
    coordinator's messages until shutdown. Returns why it stopped."""
    data, state = site_environment(site)
    cfg = PipelineConfig.model_validate(config)
    store = FolderStore(Path(os.environ.get("FEDPRIV_MESSAGE_STORE", message_store)), session)
    print(f"site {site}: session {session}, data {data.name}, store {store.path}")
    session_at_site = SiteSession(store, site, state, charge_key)
    why = serve_site(cfg, csv_path=data, site=site, index=index, session=session_at_site,
                     idle_timeout_s=idle_timeout_s)
    print(f"site {site}: session ended ({why})")
    return why
