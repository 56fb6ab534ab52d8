"""The Prefect flow ``fl-site``: one hospital's session of a training run, on its own pool.

Deployed once per site (``fedpriv deploy-sites``) on that site's work pool; the site's own
worker polls the pool (pull-based: the hospital accepts no inbound connection). Everything the
session reads or trusts comes from the site's own configuration file, named by the worker's
``FEDPRIV_SITE_CONFIG`` (``fedpriv site worker --config site.yaml`` sets it): which site it
is, its CSV, its state folder (privacy ledger, session state), its key, certificate and the
project CA. The coordinator's parameters are checked before use and can name no file, key or
ledger: a site id (which must be this site's), a run id, the endpoint's ``host:port`` (used
unless the site's file names its own), the site's index and the run's configuration.
"""

from __future__ import annotations

import os
import re
from typing import Any

from prefect import flow

from adapters.config_files import SiteFiles, load_site_config
from adapters.metrics import site_metrics
from adapters.site_channel import SiteChannel
from adapters.site_session import SiteSession, serve_site
from adapters.site_worker import SITE_CONFIG_ENV
from fl_core.config.model import HOST_PORT_PATTERN, PipelineConfig

_RUN_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")
SITE_FLOW = "fl-site"
SITE_ENTRYPOINT = "flows.site_flow:fl_site"  # what the coordinator deploys, all a site runs


class SiteEnvironmentError(RuntimeError):
    """The site's worker has no site configuration, or the coordinator asked for something
    this site does not accept."""


def site_files(site: str) -> SiteFiles:
    """The site's own configuration, from the worker's environment; refuses a session
    addressed to another site."""
    path = os.environ.get(SITE_CONFIG_ENV)
    if not path:
        raise SiteEnvironmentError(f"this worker has no {SITE_CONFIG_ENV}: start it with "
                                   f"`fedpriv site worker --config site.yaml` "
                                   f"(docs/deployment.md)")
    files = load_site_config(path)
    if files.config.site != site:
        raise SiteEnvironmentError(f"a session for site {site!r} reached the worker of site "
                                   f"{files.config.site!r}: refused (check federation.sites "
                                   f"work pools)")
    return files


def check_parameters(*, session: str, charge_key: str, index: int, endpoint: str) -> None:
    """What the coordinator may send: ids and an address, nothing that names a file."""
    if not _RUN_ID.match(session) or not _RUN_ID.match(charge_key.replace("-", "")):
        raise SiteEnvironmentError("run id or charge key malformed: refused")
    if not 0 <= index < 10_000:
        raise SiteEnvironmentError(f"site index {index} out of range: refused")
    if not re.match(HOST_PORT_PATTERN, endpoint):
        raise SiteEnvironmentError(f"endpoint {endpoint!r} is not host:port: refused")


@flow(name=SITE_FLOW, log_prints=True)
def fl_site(site: str, session: str, index: int, charge_key: str, config: dict[str, Any],
            endpoint: str, idle_timeout_s: float = 600.0) -> str:
    """Serve one training run at this site: validate and split its own data, charge its own
    ledger (once per ``charge_key``: a retried run is not charged twice), dial the
    coordinator's endpoint and answer its instructions until shutdown. Returns why it
    stopped."""
    files = site_files(site)
    check_parameters(session=session, charge_key=charge_key, index=index, endpoint=endpoint)
    cfg = PipelineConfig.model_validate(config)
    address = files.config.endpoint or endpoint
    print(f"site {site}: session {session}, data {files.data.name}, endpoint {address}")
    channel = SiteChannel(address=address, site=site, run_id=session,
                          credentials=files.credentials(),
                          server_name=files.config.server_name, proxy=files.config.proxy,
                          max_message_bytes=int(cfg.federation.endpoint.max_message_mb * 2**20))
    # the site's own /metrics, where its file says (never the coordinator's choice)
    metrics = site_metrics(files.config.monitoring, site, session)
    try:
        why = serve_site(cfg, csv_path=files.data, site=site, index=index,
                         session=SiteSession(channel, site, files.state, charge_key),
                         idle_timeout_s=idle_timeout_s, policy=files.config.policy,
                         metrics=metrics)
    finally:
        channel.close()
        if metrics is not None:
            metrics.stop()
    print(f"site {site}: session ended ({why})")
    return why
