"""A hospital's side, as commands: its configuration file written, checked, and its Prefect
worker started from it (``fedpriv site init|check|worker``).

The worker is Prefect's process worker on the site's pool, guarded (:mod:`flows.site_guard`):
it runs fedpriv's ``fl-site`` session and refuses any other run. What it passes its flow runs
is the site's file (``FEDPRIV_SITE_CONFIG``) and the Prefect client settings the file names
(the API's URL, the site's credentials, the CA of the API's certificate), so that nothing
secret is typed on a command line or sent by the coordinator.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization

from adapters.artifacts import write_text_atomic
from adapters.config_files import SiteFiles
from fl_core.config.model import site_slug
from fl_core.federation.identity import (
    PeerRefusedError,
    PkiError,
    identify_peer,
    load_certificate,
    load_private_key,
)

SITE_CONFIG_ENV = "FEDPRIV_SITE_CONFIG"
SITE_FILE = "site.yaml"
GUARDED_WORKER = "flows.site_guard"  # the worker's module: runs fl-site only


def site_config_text(*, site: str, data: str, endpoint: str | None = None,
                     prefect_url: str | None = None) -> str:
    """A commented ``site.yaml`` for ``site`` whose CSV is ``data`` (relative to the file)."""
    slug = site_slug(site)
    tree = {"site": site, "data": data, "state": ".fedpriv-site",
            "tls": {"key": f"{slug}.key", "cert": f"{slug}.crt", "ca": "ca.crt"},
            "endpoint": endpoint,
            "prefect": {"api_url": prefect_url, "auth_string_file": None},
            "monitoring": None}  # {listen: 127.0.0.1:9465}: the sessions' own /metrics
    return ("# fedpriv site configuration: read by this site's worker only (docs/deployment.md)\n"
            f"# key: `fedpriv pki request --site {slug} --dir .` makes it here; it never "
            f"leaves\n" + yaml.safe_dump(tree, sort_keys=False))


def write_site_config(folder: Path, *, site: str, data: str, **options: str | None) -> Path:
    path = Path(folder) / SITE_FILE
    write_text_atomic(path, site_config_text(site=site, data=data, **options))
    return path


def check_site(files: SiteFiles, *, now: datetime.datetime | None = None) -> list[str]:
    """What a site's worker will use, checked: the certificate is the CA's, current, not a
    server's, names this site, and matches the site's key. Raises :class:`PkiError`."""
    moment = now or datetime.datetime.now(datetime.UTC)
    ca_cert = load_certificate(files.ca.read_bytes())
    try:
        subject = identify_peer(files.cert.read_bytes(), ca_cert=ca_cert, crl=None, now=moment)
    except PeerRefusedError as exc:
        raise PkiError(f"{files.cert}: {exc}") from None
    if subject != site_slug(files.config.site):
        raise PkiError(f"{files.cert} is for site {subject!r}, this file is site "
                       f"{files.config.site!r} ({site_slug(files.config.site)!r})")
    cert = load_certificate(files.cert.read_bytes())
    key = load_private_key(files.key.read_bytes())
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if key.public_key().public_bytes(pem, public) != cert.public_key().public_bytes(pem, public):
        raise PkiError(f"{files.key} is not the key of {files.cert} (renewed with --new-key? "
                       f"ask for a certificate for the new key)")
    if files.key.stat().st_mode & 0o077:
        raise PkiError(f"{files.key} is readable by others: chmod 600 it")
    days = (cert.not_valid_after_utc - moment).days
    return [f"site {files.config.site!r}: data {files.data}, state {files.state}",
            f"certificate {subject} (serial {cert.serial_number:x}) valid for {days} more days",
            f"endpoint: {files.config.endpoint or 'the address the coordinator announces'}",
            f"Prefect API: {files.config.prefect.api_url or os.environ.get('PREFECT_API_URL')}"
            f", pool {files.config.pool}",
            f"metrics: {_metrics_line(files)}"]


def _metrics_line(files: SiteFiles) -> str:
    monitoring = files.config.monitoring
    return ("none (no monitoring in the file)" if monitoring is None
            else f"http://{monitoring.listen}/metrics while a session runs")


def worker_command(files: SiteFiles) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of the site's Prefect worker: fedpriv's guarded
    process worker (:mod:`flows.site_guard`, which runs only ``fl-site``), this
    interpreter with ``-P`` so that the site's folder is not on ``sys.path``."""
    env = {**os.environ, **files.prefect_environment(), SITE_CONFIG_ENV: str(files.source)}
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    if not env.get("PREFECT_API_URL"):
        raise PkiError(f"{files.source}: no prefect.api_url and no PREFECT_API_URL: the worker "
                       f"would not know where the coordinator's Prefect API is")
    return [sys.executable, "-P", "-m", GUARDED_WORKER, "--pool", files.config.pool,
            "--name", f"fedpriv-{site_slug(files.config.site)}"], env
