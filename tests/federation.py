"""A project PKI in a temp folder for tests that start a federation endpoint: the CA, the
endpoint's certificate for a host, sites' certificates (each made as a site would: its own key
and request, signed by the CA), another CA's, an expired one; revocation."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapters import pki
from adapters.federation_endpoint import FederationEndpoint
from adapters.pki import EndpointTls
from adapters.site_channel import SiteChannel
from fl_core.config.model import site_slug
from fl_core.config.site import SitePolicy
from fl_core.federation.channel import SiteCredentials
from fl_core.federation.messages import Failure, SiteReady, decode_message

LOOPBACK = "127.0.0.1:0"  # where test endpoints listen: loopback, any free port
# the tests train with reproducible noise (to compare with the simulation): a site's default
# policy refuses that, so the test sites accept it
TEST_POLICY = SitePolicy(require_secure=False)


@dataclass
class ProjectPki:
    root: Path
    host: str
    _issued: dict[str, SiteCredentials] = field(default_factory=dict)

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def tls(self) -> EndpointTls:
        server = self.root / "server"
        return EndpointTls(server / "server.key", server / "server.crt",
                           self.ca_dir / pki.CA_CERT, self.ca_dir / pki.CRL)

    def site_folder(self, site: str) -> Path:
        return self.root / "sites" / site

    def issued(self, site: str) -> SiteCredentials:
        """The site's current credentials (enrolled on first use)."""
        if site not in self._issued:
            self._issued[site] = self.credentials(site)
        return self._issued[site]

    def credentials(self, site: str, *, ca: Path | None = None, days: int = 30,
                    now: datetime.datetime | None = None, new_key: bool = False,
                    ) -> SiteCredentials:
        """Enrol ``site`` anew (request at the site, sign at ``ca``, by default the
        project's): a new certificate every call."""
        folder = self.site_folder(site)
        request = pki.request_certificate(site, folder, new_key=new_key)
        cert = folder / f"{site}.crt"
        pki.sign_request(request.csr, ca or self.ca_dir, days=days, out=cert, now=now)
        return SiteCredentials((folder / f"{site}.key").read_bytes(), cert.read_bytes(),
                               (self.ca_dir / pki.CA_CERT).read_bytes())

    def other_ca(self) -> Path:
        other = self.root / "other-ca"
        if not (other / pki.CA_CERT).exists():
            pki.init_ca(other, name="fedpriv test CA", days=365)
        return other

    def expired_credentials(self, site: str) -> SiteCredentials:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        return self.credentials(site, days=2, now=past, new_key=True)

    def revoke(self, site: str) -> list[int]:
        return pki.revoke(site, self.ca_dir)


def make_pki(root: Path, host: str = "127.0.0.1") -> ProjectPki:
    made = ProjectPki(root, host)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    pki.init_ca(made.ca_dir, name="fedpriv test CA", days=3650, now=past)
    pki.issue_server_certificate(made.ca_dir, host=host, days=30, out_dir=root / "server")
    return made


def channel(made: ProjectPki, endpoint: FederationEndpoint, site: str, *, run_id: str = "",
            credentials: SiteCredentials | None = None) -> SiteChannel:
    """A site's channel to ``endpoint``, with the site's own certificate unless given."""
    return SiteChannel(address=endpoint.address, site=site, run_id=run_id or endpoint.run_id,
                       credentials=credentials or made.issued(site_slug(site)))


def wait_ready(endpoint: FederationEndpoint, sites: list[str], timeout: float = 60) -> dict:
    """Every site's decoded start-up report (SiteReady or Failure)."""
    end, ready = time.monotonic() + timeout, {}
    while time.monotonic() < end and len(ready) < len(sites):
        for site in sites:
            report = endpoint.ready_report(site)
            if report is not None and site not in ready:
                ready[site] = decode_message(report[0], site=site, expect=(SiteReady, Failure))
        time.sleep(0.05)
    assert len(ready) == len(sites), ready
    return ready
