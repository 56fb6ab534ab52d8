"""Site identity: the project CA's certificates and revocation list, and who a peer is.

Pure (no file or network I/O): keys, requests, certificates and revocation lists are built
and checked here as ``cryptography`` objects and PEM bytes; :mod:`adapters.pki` keeps them in
files. Every key is ECDSA on P-256 with SHA-256: Python's ``ssl`` (OpenSSL) and gRPC
(BoringSSL) both accept it for server and client certificates under TLS 1.3, which Ed25519
certificates do not guarantee across TLS stacks.

A site's identity is the subject CN of the client certificate the project CA signed for it.
:func:`identify_peer` is what the federation endpoint calls for each new connection, with the
CA certificate and the revocation list read afresh, so a revocation or a renewed certificate
counts from the next connection on without a restart.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_ID = re.compile(r"[a-z0-9-]{1,63}")
"""A site id: lower-case letters, digits and '-', 1 to 63 characters (a DNS label's length)."""

CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates start this long before they are signed: a peer whose clock is a little behind
the coordinator's still accepts them at once."""

HASH = hashes.SHA256()


class PkiError(ValueError):
    """A request, certificate or CA that cannot be used; the message says why, in one line."""


class RefusalReason(enum.Enum):
    """Why :func:`identify_peer` refused a certificate."""

    MALFORMED = "malformed certificate"
    UNKNOWN_CA = "unknown CA"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    REVOKED = "revoked"
    NOT_CLIENT = "not a client certificate"
    BAD_SUBJECT = "bad subject"


class PeerRefusedError(PkiError):
    """A peer's certificate is not a site's; :attr:`reason` is one of :class:`RefusalReason`."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def check_site_id(site: str) -> str:
    """``site`` if it is a valid site id, else :class:`PkiError`."""
    if not isinstance(site, str) or not SITE_ID.fullmatch(site):
        raise PkiError(f"invalid site id {site!r}: use 1-63 lower-case letters, digits or '-'")
    return site


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # unencrypted PKCS#8: the file's mode (0600) protects it; a passphrase would have to be
    # stored beside it for an unattended worker to start
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"expected an EC private key, got {type(key).__name__}")
    return key


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes (gRPC hands over PEM, ``ssl`` DER)."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"not a certificate: {exc}") from None


def common_name(name: x509.Name) -> str:
    """The one CN of ``name``; :class:`PkiError` if it has none or several."""
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        raise PkiError(f"the subject must have exactly one CN, it has {len(values)}")
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder, now: datetime.datetime,
              days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise PkiError(f"a certificate must be valid for at least 1 day, not {days}")
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(
        now + datetime.timedelta(days=days))


def _leaf(subject: x509.Name, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
          ca_cert: x509.Certificate, *, now: datetime.datetime, days: int,
          usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
    """The parts a client and a server certificate share: not a CA, signing only, one EKU."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier
                              .from_issuer_subject_key_identifier(ca_ski), critical=False))
    return _validity(builder, now, days)


def build_ca(name: str, *, days: int, now: datetime.datetime,
             key: ec.EllipticCurvePrivateKey | None = None,
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed project CA that may sign leaf certificates only (path length 0)."""
    if not name.strip():
        raise PkiError("the CA needs a name")
    key = key or new_private_key()
    public = key.public_key()
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
               .public_key(public).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))
    return key, _validity(builder, now, days).sign(key, HASH)


def build_request(site: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A site's certificate request: subject CN = the site id, signed by the site's own key."""
    check_site_id(site)
    return x509.CertificateSigningRequestBuilder().subject_name(_name(site)).sign(key, HASH)


def _check_leaf_key(public_key: object) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The key types a site may present: EC P-256/P-384 or RSA of at least 2048 bits."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and \
            isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048:
        return public_key
    raise PkiError(f"unsupported key in the request ({type(public_key).__name__}): "
                   f"use EC P-256 (what `fedpriv pki request` makes)")


def sign_request(csr: x509.CertificateSigningRequest, ca_key: ec.EllipticCurvePrivateKey,
                 ca_cert: x509.Certificate, *, days: int,
                 now: datetime.datetime) -> x509.Certificate:
    """The client certificate for a site's request.

    Only the CN is taken from the request (validated as a site id) and its public key; every
    other attribute or extension the request asks for is ignored, so a site cannot obtain a
    CA or server certificate or a second name."""
    if not csr.is_signature_valid:
        raise PkiError("the request's signature does not verify (altered or not made by the "
                       "key it carries)")
    site = check_site_id(common_name(csr.subject))
    public_key = _check_leaf_key(csr.public_key())
    builder = _leaf(_name(site), public_key, ca_cert, now=now, days=days,
                    usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return builder.sign(ca_key, HASH)


def host_name(host: str) -> x509.GeneralName:
    """The subject alternative name for ``host``: an IP address, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", host):
        raise PkiError(f"invalid host {host!r}: give an IP address or a DNS name")
    return x509.DNSName(host.lower())


def build_server_certificate(host: str, ca_key: ec.EllipticCurvePrivateKey,
                             ca_cert: x509.Certificate, *, days: int, now: datetime.datetime,
                             key: ec.EllipticCurvePrivateKey | None = None,
                             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The coordinator's endpoint key (``key``, or a new one) and certificate: serverAuth and
    a SAN naming ``host``."""
    san = host_name(host)
    key = key or new_private_key()
    builder = _leaf(_name(host), key.public_key(), ca_cert, now=now, days=days,
                    usage=ExtendedKeyUsageOID.SERVER_AUTH)
    builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    return key, builder.sign(ca_key, HASH)


@dataclass(frozen=True)
class Revocation:
    serial: int
    when: datetime.datetime


def build_crl(revocations: list[Revocation], ca_key: ec.EllipticCurvePrivateKey,
              ca_cert: x509.Certificate, *, number: int, now: datetime.datetime,
              next_update_days: int = 365) -> x509.CertificateRevocationList:
    """The CA's revocation list (number ``number``, increasing with each list it signs)."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now).next_update(now + datetime.timedelta(days=next_update_days))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier
                              .from_issuer_subject_key_identifier(ca_ski), critical=False))
    for r in sorted(revocations, key=lambda r: r.serial):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(r.serial).revocation_date(r.when)
            .build())
    return builder.sign(ca_key, HASH)


def crl_revocations(crl: x509.CertificateRevocationList) -> list[Revocation]:
    return [Revocation(r.serial_number, r.revocation_date_utc) for r in crl]


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def check_crl(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> None:
    """:class:`PkiError` unless the project CA signed ``crl`` (a forged list could un-revoke)."""
    public = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(public, ec.EllipticCurvePublicKey) \
            or not crl.is_signature_valid(public):
        raise PkiError("the revocation list is not signed by the project CA")


def _extended_usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_issuer(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PeerRefusedError(RefusalReason.UNKNOWN_CA,
                               f"issued by {cert.issuer.rfc4514_string()!r}, not signed by "
                               f"the project CA {ca_cert.subject.rfc4514_string()!r}") from None


def _check_dates(cert: x509.Certificate, ca_cert: x509.Certificate,
                 now: datetime.datetime) -> None:
    for which, c in (("certificate", cert), ("project CA", ca_cert)):
        if now > c.not_valid_after_utc:
            raise PeerRefusedError(RefusalReason.EXPIRED, f"the {which} expired on "
                                   f"{c.not_valid_after_utc.isoformat()}")
        if now < c.not_valid_before_utc:
            raise PeerRefusedError(RefusalReason.NOT_YET_VALID, f"the {which} is valid from "
                                   f"{c.not_valid_before_utc.isoformat()}")


def identify_peer(cert_pem_or_der: bytes, *, ca_cert: x509.Certificate,
                  crl: x509.CertificateRevocationList | None,
                  now: datetime.datetime) -> str:
    """The site id of a connecting peer, or :class:`PeerRefusedError` saying why not.

    In order: the project CA signed it; it is within its dates (and so is the CA) at ``now``;
    its serial is not on ``crl`` (which must be the CA's own; ``None``: nothing revoked);
    it is a client certificate (clientAuth, not a CA); its subject is one CN that is a site id.
    """
    try:
        cert = load_certificate(cert_pem_or_der)
    except PkiError as exc:
        raise PeerRefusedError(RefusalReason.MALFORMED, str(exc)) from None
    _check_issuer(cert, ca_cert)
    _check_dates(cert, ca_cert, now)
    if crl is not None:
        check_crl(crl, ca_cert)
        revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if revoked is not None:
            raise PeerRefusedError(RefusalReason.REVOKED, f"serial {cert.serial_number:x} "
                                   f"revoked on {revoked.revocation_date_utc.isoformat()}")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in _extended_usages(cert) or _is_ca(cert):
        raise PeerRefusedError(RefusalReason.NOT_CLIENT, f"{cert.subject.rfc4514_string()!r} "
                               f"is not allowed to authenticate a client (no clientAuth)")
    try:
        return check_site_id(common_name(cert.subject))
    except PkiError as exc:
        raise PeerRefusedError(RefusalReason.BAD_SUBJECT, str(exc)) from None


def certificate_kind(cert: x509.Certificate) -> str:
    """``client``, ``server`` or ``authority`` (the CA itself), for listings."""
    if _is_ca(cert):
        return "authority"
    return "client" if ExtendedKeyUsageOID.CLIENT_AUTH in _extended_usages(cert) else "server"
