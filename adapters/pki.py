"""The project's certificates in files: the CA, the sites' requests and certificates, the
coordinator's server certificate and the revocation list (``fedpriv pki ...``).

The objects are built and checked in :mod:`fl_core.federation.identity`; here they are read
and written. Private keys are created with mode 0600 and replaced atomically, never readable
by another user even for an instant. A site's key is made at the site and never leaves it:
the coordinator only ever sees its request (public key + site id) and signs it.

Folders::

    CA folder (coordinator only)   ca.key (0600)  ca.crt  crl.pem  issued/<serial>.pem
    site folder (at the site)      <site>.key (0600)  <site>.csr  (+ <site>.crt once signed)
    server folder (coordinator)    server.key (0600)  server.crt

``issued/`` keeps a copy of every certificate the CA signed, so that ``revoke SITE`` can find
a site's serials and ``list`` can show what is valid, expired or revoked.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.artifacts import atomic_path
from fl_core.config.model import PipelineConfig
from fl_core.federation.identity import (
    PeerRefusedError,
    PkiError,
    RefusalReason,
    Revocation,
    build_ca,
    build_crl,
    build_request,
    build_server_certificate,
    certificate_kind,
    certificate_pem,
    check_crl,
    check_site_id,
    common_name,
    crl_number,
    crl_revocations,
    identify_peer,
    load_private_key,
    new_private_key,
    private_key_pem,
)
from fl_core.federation.identity import sign_request as sign_csr

__all__ = ["CA_CERT", "CA_KEY", "CRL", "EndpointTls", "IssuedCertificate", "PeerRefusedError",
           "PkiError", "endpoint_files",
           "RefusalReason", "SiteRequest", "identify_peer", "identify_peer_files", "init_ca",
           "issue_server_certificate", "issued_certificates", "load_trust", "request_certificate",
           "revoke", "revoked_serials", "sign_request"]

CA_KEY, CA_CERT, CRL, ISSUED = "ca.key", "ca.crt", "crl.pem", "issued"
PRIVATE, PUBLIC = 0o600, 0o644


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now or datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically; the temporary file is 0600 from its creation (mkstemp)."""
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(mode)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _folder(directory: Path) -> Path:
    # the CA and site folders hold private keys: only their owner may list them
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


@contextlib.contextmanager
def _ca_lock(ca_directory: Path) -> Iterator[None]:
    """One writer at a time in a CA folder (two revocations at once must not lose one)."""
    with (ca_directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load_cert(path: Path, what: str) -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path} is not a PEM certificate ({what})") from None


def _load_ca(ca_directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not (ca_directory / CA_KEY).exists():
        raise PkiError(f"no CA key in {ca_directory}: run `fedpriv pki init` there first "
                       "(signing happens at the coordinator, where the CA lives)")
    data = _read(ca_directory / CA_KEY, "the CA key")
    try:
        key = load_private_key(data)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{ca_directory / CA_KEY}: not a usable CA key ({exc})") from None
    return key, _load_cert(ca_directory / CA_CERT, "the CA certificate")


def _record_issued(ca_directory: Path, cert: x509.Certificate) -> None:
    _write(_folder(ca_directory / ISSUED) / f"{cert.serial_number:x}.pem",
           certificate_pem(cert), PUBLIC)


def init_ca(directory: Path, *, name: str, days: int,
            now: datetime.datetime | None = None) -> Path:
    """Create the project CA in ``directory`` (ca.key 0600, ca.crt, an empty crl.pem).

    Refuses a folder that already holds a CA: replacing it would orphan every certificate it
    signed. Returns the CA certificate's path (the one file sites receive)."""
    directory = _folder(Path(directory))
    existing = [n for n in (CA_KEY, CA_CERT) if (directory / n).exists()]
    if existing:
        raise PkiError(f"{directory} already holds a CA ({', '.join(existing)}); "
                       "choose another folder")
    moment = _now(now)
    key, cert = build_ca(name, days=days, now=moment)
    _write(directory / CA_KEY, private_key_pem(key), PRIVATE)
    _write(directory / CA_CERT, certificate_pem(cert), PUBLIC)
    crl = build_crl([], key, cert, number=1, now=moment)
    _write(directory / CRL, crl.public_bytes(serialization.Encoding.PEM), PUBLIC)
    return directory / CA_CERT


@dataclass(frozen=True)
class SiteRequest:
    key: Path  # stays at the site
    csr: Path  # goes to the coordinator
    new_key: bool  # False when an existing key was reused (renewal)


def request_certificate(site: str, directory: Path, *, new_key: bool = False) -> SiteRequest:
    """At the site: its key (made here if absent, or with ``new_key``) and a request for it.

    Renewal reuses the key by default; ``new_key`` replaces it (after a suspected compromise;
    the old certificate then stops matching the key and should be revoked)."""
    check_site_id(site)
    directory = _folder(Path(directory))
    key_path, csr_path = directory / f"{site}.key", directory / f"{site}.csr"
    key = _existing_key(key_path, new_key)
    fresh = key is None
    if key is None:
        key = new_private_key()
        _write(key_path, private_key_pem(key), PRIVATE)
    csr = build_request(site, key)
    _write(csr_path, csr.public_bytes(serialization.Encoding.PEM), PUBLIC)
    return SiteRequest(key_path, csr_path, fresh)


def sign_request(csr_path: Path, ca_directory: Path, *, days: int, out: Path,
                 now: datetime.datetime | None = None) -> x509.Certificate:
    """At the coordinator: sign a site's request into its client certificate at ``out``."""
    ca_directory = Path(ca_directory)
    ca_key, ca_cert = _load_ca(ca_directory)
    data = _read(Path(csr_path), "the request")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise PkiError(f"{csr_path} is not a PEM certificate request") from None
    cert = sign_csr(csr, ca_key, ca_cert, days=days, now=_now(now))
    with _ca_lock(ca_directory):
        _record_issued(ca_directory, cert)
    _write(Path(out), certificate_pem(cert), PUBLIC)
    return cert


def _existing_key(path: Path, new_key: bool) -> ec.EllipticCurvePrivateKey | None:
    """The key at ``path`` to reuse (renewal), or None to make one."""
    if new_key or not path.exists():
        return None
    data = _read(path, "the key")
    try:
        return load_private_key(data)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not a usable key ({exc}); give --new-key") from None


def issue_server_certificate(ca_directory: Path, *, host: str, days: int, out_dir: Path,
                             new_key: bool = False,
                             now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """The endpoint's key and certificate for ``host``, written to ``out_dir``.

    An existing ``server.key`` there is kept unless ``new_key``: the same key signs the round
    log, so keeping it lets one certificate verify the log across renewals."""
    ca_directory = Path(ca_directory)
    ca_key, ca_cert = _load_ca(ca_directory)
    out = _folder(Path(out_dir))
    kept = _existing_key(out / "server.key", new_key)
    key, cert = build_server_certificate(host, ca_key, ca_cert, days=days, now=_now(now),
                                         key=kept)
    if kept is None:
        _write(out / "server.key", private_key_pem(key), PRIVATE)
    _write(out / "server.crt", certificate_pem(cert), PUBLIC)
    with _ca_lock(ca_directory):
        _record_issued(ca_directory, cert)
    return out / "server.key", out / "server.crt"


def load_crl(ca_cert: x509.Certificate, crl_path: Path) -> x509.CertificateRevocationList:
    """The revocation list at ``crl_path``, checked to be the CA's own."""
    data = _read(crl_path, "the revocation list")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise PkiError(f"{crl_path} is not a PEM revocation list") from None
    check_crl(crl, ca_cert)
    return crl


def revoked_serials(ca_directory: Path) -> set[int]:
    """The serials on the CA's revocation list."""
    ca_directory = Path(ca_directory)
    ca_cert = _load_cert(ca_directory / CA_CERT, "the CA certificate")
    return {r.serial for r in crl_revocations(load_crl(ca_cert, ca_directory / CRL))}


def _issued(ca_directory: Path) -> list[x509.Certificate]:
    folder = ca_directory / ISSUED
    paths = sorted(folder.glob("*.pem")) if folder.is_dir() else []
    return [_load_cert(p, "an issued certificate") for p in paths]


def _serials_to_revoke(target: str | int, issued: list[x509.Certificate],
                       already: set[int]) -> list[int]:
    if isinstance(target, int):
        return [] if target in already else [target]
    site = check_site_id(target)
    mine = [c.serial_number for c in issued
            if certificate_kind(c) == "client" and common_name(c.subject) == site]
    if not mine:
        raise PkiError(f"no certificate was issued to site {site!r} by this CA")
    return [s for s in mine if s not in already]


def revoke(target: str | int, ca_directory: Path, *,
           now: datetime.datetime | None = None) -> list[int]:
    """Revoke every certificate issued to site ``target`` (a str) or the serial ``target``
    (an int); the CA signs a new revocation list, written atomically. Returns the serials
    newly revoked (empty if they all were already)."""
    ca_directory = Path(ca_directory)
    ca_key, ca_cert = _load_ca(ca_directory)
    with _ca_lock(ca_directory):
        old = load_crl(ca_cert, ca_directory / CRL)
        current = crl_revocations(old)
        new = _serials_to_revoke(target, _issued(ca_directory), {r.serial for r in current})
        if new:
            moment = _now(now)
            crl = build_crl(current + [Revocation(s, moment) for s in new], ca_key, ca_cert,
                            number=crl_number(old) + 1, now=moment)
            _write(ca_directory / CRL, crl.public_bytes(serialization.Encoding.PEM), PUBLIC)
    return new


@dataclass(frozen=True)
class EndpointTls:
    """The federation endpoint's files: its key and certificate, the project CA, the CRL."""

    server_key: Path
    server_cert: Path
    ca_cert: Path
    crl: Path | None


def endpoint_files(cfg: PipelineConfig, root: Path) -> EndpointTls:
    """The endpoint's files under ``federation.endpoint.pki`` (relative: to ``root``):
    ``ca/`` and ``server/``, as ``fedpriv pki init`` and ``fedpriv pki server`` write them.
    ``server.key`` also signs the round log."""
    pki_dir = Path(cfg.federation.endpoint.pki)
    pki_dir = pki_dir if pki_dir.is_absolute() else Path(root) / pki_dir
    return EndpointTls(pki_dir / "server" / "server.key", pki_dir / "server" / "server.crt",
                       pki_dir / "ca" / CA_CERT, pki_dir / "ca" / CRL)


@dataclass(frozen=True)
class IssuedCertificate:
    serial: int
    kind: str  # client | server
    name: str  # the site id, or the server's host
    not_after: datetime.datetime
    status: str  # valid | expired | revoked


def issued_certificates(ca_directory: Path, *,
                        now: datetime.datetime | None = None) -> list[IssuedCertificate]:
    """Every certificate the CA signed, oldest expiry first, with its status at ``now``."""
    ca_directory = Path(ca_directory)
    revoked = revoked_serials(ca_directory)
    moment = _now(now)
    rows = []
    for c in _issued(ca_directory):
        status = "revoked" if c.serial_number in revoked else \
            "expired" if moment > c.not_valid_after_utc else "valid"
        rows.append(IssuedCertificate(c.serial_number, certificate_kind(c), common_name(c.subject),
                                      c.not_valid_after_utc, status))
    return sorted(rows, key=lambda r: (r.not_after, r.serial))


def load_trust(ca_cert_path: Path, crl_path: Path | None,
               ) -> tuple[x509.Certificate, x509.CertificateRevocationList | None]:
    """The CA certificate and its revocation list, read now (the endpoint calls this for each
    new connection, so a revocation counts without a restart)."""
    ca_cert = _load_cert(Path(ca_cert_path), "the CA certificate")
    return ca_cert, load_crl(ca_cert, Path(crl_path)) if crl_path is not None else None


def identify_peer_files(cert_pem_or_der: bytes, *, ca_cert_path: Path, crl_path: Path | None,
                        now: datetime.datetime | None = None) -> str:
    """:func:`~fl_core.federation.identity.identify_peer` with the CA and CRL read from files."""
    ca_cert, crl = load_trust(ca_cert_path, crl_path)
    return identify_peer(cert_pem_or_der, ca_cert=ca_cert, crl=crl, now=_now(now))
