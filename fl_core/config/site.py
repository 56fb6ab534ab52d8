"""A hospital's own configuration in ``federation.mode=sites``: a file at the site, read by
its worker, never sent by the coordinator.

It says which site this is, where its data and state are, its TLS key and certificate and the
project CA it trusts, and how its worker reaches the coordinator's Prefect API (with its
credentials). Relative paths are relative to the file's folder (resolved by
:func:`adapters.config_files.load_site_config`). What the coordinator sends a session (its
flow parameters) can never point it at another file, key or ledger.
"""

from __future__ import annotations

from pydantic import Field

from fl_core.config.model import HOST_PORT_PATTERN, _Section, site_slug


class SiteTls(_Section):
    key: str = Field(min_length=1)  # made at the site (fedpriv pki request); never leaves it
    cert: str = Field(min_length=1)  # the site's certificate, signed by the project CA
    ca: str = Field(min_length=1)  # the project CA: the only authority the site trusts


class SitePrefect(_Section):
    """How this site's worker reaches the coordinator's Prefect API."""

    api_url: str | None = None  # e.g. https://coordinator.example:4200/api
    auth_string_file: str | None = None  # a file holding "user:password" (mode 0600)
    ca: str | None = None  # the CA of the API's TLS certificate (default: tls.ca)


class SitePolicy(_Section):
    """What this hospital accepts, whatever the coordinator's configuration asks: its own
    lifetime budget and ledger, the most one run may spend, the least noise, secure noise,
    the most rounds, the most ε its released statistics may cost. Checked at
    the site before anything trains (:func:`fl_core.privacy.policy.policy_refusals`); a
    refusal names the rule."""

    lifetime_epsilon: float = Field(10.0, gt=0)  # per patient, over all runs, at this site
    ledger: str = "privacy_ledger.sqlite"  # in the site's state folder (relative to it)
    max_epsilon_per_run: float = Field(2.0, gt=0)
    min_noise_multiplier: float = Field(0.3, ge=0)
    require_private: bool = True  # no run without patient-level DP-SGD
    require_secure: bool = True  # secure noise only (reproducible noise can be regenerated)
    max_rounds: int = Field(500, ge=1)
    # kept so that existing site.yaml files still load; no longer checked: sites train no
    # shadow model (the sites-mode audit is the loss-threshold attack alone, docs/privacy.md)
    max_shadow_models: int = Field(32, ge=0)
    # the statistics the site releases about its test patients (the evaluation's noisy
    # histograms, and the audit's in sites mode): the most ε it spends on them per run
    max_statistics_epsilon: float = Field(3.0, gt=0)
    # answer the membership audit in sites mode (the loss-threshold attack's noisy
    # histograms, charged to the audited patients, docs/privacy.md): false refuses runs that
    # audit here
    release_audit: bool = True


class SiteMonitoring(_Section):
    """The site's own ``/metrics`` (docs/monitoring.md, "A site's own metrics"): where its
    session serves them while it runs. The hospital's choice, never the coordinator's."""

    listen: str = Field("127.0.0.1:9465", pattern=HOST_PORT_PATTERN)  # loopback by default


class SiteConfig(_Section):
    """One site's file (``site.yaml``); docs/deployment.md shows one."""

    site: str = Field(min_length=1, max_length=200)  # its id in federation.sites
    data: str = Field(min_length=1)  # its CSV: only its own patients
    state: str = ".fedpriv-site"  # its privacy ledger and session state
    tls: SiteTls
    work_pool: str | None = None  # default site-<slug>, as federation.sites
    # host:port to dial instead of the address the coordinator announces (a proxy, a NAT)
    endpoint: str | None = Field(None, pattern=HOST_PORT_PATTERN)
    server_name: str | None = None  # the endpoint certificate's host, when not the address's
    # the hospital's HTTP CONNECT proxy for the endpoint, http://[user:password@]host:port;
    # "direct": none (ignores https_proxy); null: gRPC's environment (lower-case https_proxy)
    proxy: str | None = Field(None, pattern=r"^(direct|http://([^@/\s]+@)?[^@/\s:]+:\d{1,5}/?)$")
    prefect: SitePrefect = Field(default_factory=SitePrefect)
    policy: SitePolicy = Field(default_factory=SitePolicy)
    # null: no /metrics, nothing started (prometheus_client not even imported)
    monitoring: SiteMonitoring | None = None

    @property
    def pool(self) -> str:
        return self.work_pool or f"site-{site_slug(self.site)}"
