"""The project PKI (issue 23, build item 2): a CA, sites' own keys and requests, signing,
the endpoint's certificate, revocation, and who a connecting peer is.

identify_peer must refuse another CA's certificate, an expired or not-yet-valid one, a revoked
one, a server certificate used as a client's and a subject that is not a site id, and accept
a renewed certificate after the old one is revoked; a real TLS 1.3 handshake on 127.0.0.1
(client certificate required, the project CA as the only trust) lets a signed site in and
turns another CA's away."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import pki
from fl_core.federation import identity
from fl_core.federation.identity import PeerRefusedError, PkiError, RefusalReason
from flows.cli import main

NOW = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class Project:
    ca: Path  # the CA folder
    site: Path  # a site's folder
    other_ca: Path  # another project's CA

    @property
    def ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.ca / pki.CA_CERT).read_bytes())

    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl((self.ca / pki.CRL).read_bytes())

    def enrol(self, site: str, *, ca: Path | None = None, days: int = 30,
              now: datetime.datetime = NOW, new_key: bool = False) -> Path:
        """Request at the site, sign at the coordinator; the certificate's path."""
        req = pki.request_certificate(site, self.site, new_key=new_key)
        out = self.site / f"{site}.crt"
        pki.sign_request(req.csr, ca or self.ca, days=days, out=out, now=now)
        return out

    def identify(self, cert: Path | bytes, now: datetime.datetime = NOW) -> str:
        data = cert if isinstance(cert, bytes) else cert.read_bytes()
        return identity.identify_peer(data, ca_cert=self.ca_cert, crl=self.crl(), now=now)


def make_project(folder: Path, now: datetime.datetime) -> Project:
    p = Project(folder / "ca", folder / "site", folder / "other-ca")
    pki.init_ca(p.ca, name="fedpriv test CA", days=3650, now=now - datetime.timedelta(days=1))
    pki.init_ca(p.other_ca, name="fedpriv test CA", days=3650,  # same name, other key
                now=now - datetime.timedelta(days=1))
    return p


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return make_project(tmp_path, NOW)  # a fixed clock: dates are checked exactly


def refusal(project: Project, cert: Path | bytes, now: datetime.datetime = NOW) -> RefusalReason:
    with pytest.raises(PeerRefusedError) as caught:
        project.identify(cert, now)
    return caught.value.reason


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ---- the CA, requests and signing -------------------------------------------------------

def test_init_writes_a_ca_key_only_its_owner_reads_and_refuses_a_second_ca(
        project: Project) -> None:
    assert mode(project.ca / pki.CA_KEY) == 0o600
    assert mode(project.ca) == 0o700
    ca = project.ca_cert
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert list(project.crl()) == [] and pki.revoked_serials(project.ca) == set()
    with pytest.raises(PkiError, match="already holds a CA"):
        pki.init_ca(project.ca, name="again", days=10)


def test_the_site_makes_its_own_key_and_a_request_naming_it(project: Project) -> None:
    req = pki.request_certificate("hungary", project.site)
    assert req.new_key and mode(req.key) == 0o600
    csr = x509.load_pem_x509_csr(req.csr.read_bytes())
    assert csr.is_signature_valid and identity.common_name(csr.subject) == "hungary"
    key = serialization.load_pem_private_key(req.key.read_bytes(), password=None)
    assert csr.public_key() == key.public_key()
    # renewal reuses the key; --new-key replaces it
    again = pki.request_certificate("hungary", project.site)
    assert not again.new_key and again.key.read_bytes() == req.key.read_bytes()
    before = req.key.read_bytes()
    fresh = pki.request_certificate("hungary", project.site, new_key=True)
    assert fresh.new_key and fresh.key.read_bytes() != before and mode(fresh.key) == 0o600


@given(st.from_regex(r"[a-z0-9-]{1,63}", fullmatch=True))
def test_valid_site_ids_are_accepted(site: str) -> None:
    assert identity.check_site_id(site) == site


@given(st.text(max_size=70).filter(lambda s: not identity.SITE_ID.fullmatch(s)))
@settings(max_examples=200)
def test_anything_else_is_not_a_site_id(site: str) -> None:
    with pytest.raises(PkiError, match="invalid site id"):
        identity.check_site_id(site)


@pytest.mark.parametrize("site", ["", "Hungary", "va long beach", "a" * 64, "süd", "a/b",
                                  "a\n", "../ca"])
def test_a_request_for_an_invalid_site_id_is_refused(project: Project, site: str) -> None:
    with pytest.raises(PkiError, match="invalid site id"):
        pki.request_certificate(site, project.site)


def test_signing_makes_a_client_certificate_for_the_site_named(project: Project) -> None:
    out = project.enrol("va-long-beach", days=30)
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert identity.common_name(cert.subject) == "va-long-beach"
    assert cert.issuer == project.ca_cert.subject
    cert.verify_directly_issued_by(project.ca_cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=30)
    assert cert.not_valid_before_utc <= NOW
    # a fresh serial each time, and the CA keeps a copy of what it signed
    second = x509.load_pem_x509_certificate(project.enrol("va-long-beach").read_bytes())
    assert second.serial_number != cert.serial_number
    assert {c.serial for c in pki.issued_certificates(project.ca, now=NOW)} == \
        {cert.serial_number, second.serial_number}
    assert project.identify(out) == "va-long-beach"


def _csr(subject: x509.Name, *extensions: x509.ExtensionType) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())


def _write_csr(path: Path, csr: x509.CertificateSigningRequest) -> Path:
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_request_whose_signature_does_not_verify_is_refused(project: Project,
                                                              tmp_path: Path) -> None:
    der = bytearray(_csr(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hungary")]))
                    .public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the signature's last byte
    pem = tmp_path / "forged.csr"
    pem.write_bytes(x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="signature does not verify"):
        pki.sign_request(pem, project.ca, days=30, out=tmp_path / "x.crt")
    assert not (tmp_path / "x.crt").exists()


@pytest.mark.parametrize("names", [["Hungary"], ["hungary", "swiss"], [], ["a b"]])
def test_a_request_whose_subject_is_not_one_site_id_is_refused(project: Project, tmp_path: Path,
                                                               names: list[str]) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names])
    csr = _write_csr(tmp_path / "bad.csr", _csr(subject))
    with pytest.raises(PkiError, match="CN|site id"):
        pki.sign_request(csr, project.ca, days=30, out=tmp_path / "x.crt")


def test_what_a_request_asks_for_beyond_its_site_id_is_not_granted(project: Project,
                                                                   tmp_path: Path) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hungary"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil")])
    csr = _write_csr(tmp_path / "greedy.csr", _csr(
        subject, x509.BasicConstraints(ca=True, path_length=None),
        x509.SubjectAlternativeName([x509.DNSName("coordinator.example")]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])))
    cert = pki.sign_request(csr, project.ca, days=30, out=tmp_path / "greedy.crt", now=NOW)
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hungary")])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_a_folder_without_a_ca_cannot_sign(project: Project, tmp_path: Path) -> None:
    req = pki.request_certificate("hungary", project.site)
    with pytest.raises(PkiError, match="no CA key"):
        pki.sign_request(req.csr, tmp_path / "empty", days=30, out=tmp_path / "x.crt")
    with pytest.raises(PkiError, match="at least 1 day"):
        pki.sign_request(req.csr, project.ca, days=0, out=tmp_path / "x.crt")


@pytest.mark.parametrize(("host", "kind"), [("127.0.0.1", x509.IPAddress),
                                             ("::1", x509.IPAddress),
                                             ("fl.hospital-net.example", x509.DNSName)])
def test_the_server_certificate_names_its_host(project: Project, tmp_path: Path, host: str,
                                               kind: type) -> None:
    key, crt = pki.issue_server_certificate(project.ca, host=host, days=90,
                                            out_dir=tmp_path / "server", now=NOW)
    assert mode(key) == 0o600
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    cert.verify_directly_issued_by(project.ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [type(n) for n in san] == [kind] and str(san[0].value) in {host, "::1"}
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.SERVER_AUTH]
    # renewal keeps the endpoint's key (it also signs the round log) unless asked not to
    before = key.read_bytes()
    pki.issue_server_certificate(project.ca, host=host, days=90, out_dir=tmp_path / "server")
    assert key.read_bytes() == before
    pki.issue_server_certificate(project.ca, host=host, days=90, out_dir=tmp_path / "server",
                                 new_key=True)
    assert key.read_bytes() != before


@pytest.mark.parametrize("host", ["", "bad host", "-x.example", "a..b", "x" * 64 + ".org"])
def test_an_invalid_host_is_refused(project: Project, tmp_path: Path, host: str) -> None:
    with pytest.raises(PkiError, match="invalid host"):
        pki.issue_server_certificate(project.ca, host=host, days=90, out_dir=tmp_path / "s")


# ---- identify_peer: who is connecting ----------------------------------------------------

def test_another_cas_certificate_is_refused(project: Project) -> None:
    cert = project.enrol("hungary", ca=project.other_ca)
    assert refusal(project, cert) is RefusalReason.UNKNOWN_CA


def test_an_expired_or_not_yet_valid_certificate_is_refused(project: Project) -> None:
    cert = project.enrol("hungary", days=10)
    assert project.identify(cert, NOW + datetime.timedelta(days=9)) == "hungary"
    assert refusal(project, cert, NOW + datetime.timedelta(days=10, seconds=1)) is \
        RefusalReason.EXPIRED
    assert refusal(project, cert, NOW - datetime.timedelta(hours=1)) is \
        RefusalReason.NOT_YET_VALID
    # signed in the past: expired today
    old = project.enrol("swiss", days=1, now=NOW - datetime.timedelta(days=5))
    assert refusal(project, old) is RefusalReason.EXPIRED


def test_a_revoked_certificate_is_refused_from_the_next_check(project: Project) -> None:
    hungary, swiss = project.enrol("hungary"), project.enrol("swiss")
    assert project.identify(hungary) == "hungary"
    serial = x509.load_pem_x509_certificate(hungary.read_bytes()).serial_number
    assert pki.revoke("hungary", project.ca, now=NOW) == [serial]
    # the endpoint reads the list per connection: the next check refuses, nothing restarts
    assert refusal(project, hungary) is RefusalReason.REVOKED
    assert project.identify(swiss) == "swiss"
    assert pki.revoked_serials(project.ca) == {serial}
    with pytest.raises(PeerRefusedError, match="revoked"):
        pki.identify_peer_files(hungary.read_bytes(), ca_cert_path=project.ca / pki.CA_CERT,
                                crl_path=project.ca / pki.CRL, now=NOW)


def test_a_renewed_certificate_is_accepted_after_the_old_one_is_revoked(
        project: Project) -> None:
    old = project.enrol("hungary").read_bytes()
    pki.revoke("hungary", project.ca, now=NOW)
    renewed = project.enrol("hungary", new_key=True)
    assert project.identify(renewed) == "hungary"
    assert refusal(project, old) is RefusalReason.REVOKED


def test_a_server_certificate_or_the_ca_itself_is_not_a_client(project: Project,
                                                               tmp_path: Path) -> None:
    _, crt = pki.issue_server_certificate(project.ca, host="127.0.0.1", days=30,
                                          out_dir=tmp_path / "server", now=NOW)
    assert refusal(project, crt) is RefusalReason.NOT_CLIENT
    assert refusal(project, project.ca / pki.CA_CERT) is RefusalReason.NOT_CLIENT


def _client_cert(project: Project, subject: x509.Name) -> bytes:
    """A clientAuth certificate the project CA signed for any subject (bypassing the checks
    of ``sign``, as a mis-used CA key would)."""
    ca_key = identity.load_private_key((project.ca / pki.CA_KEY).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(project.ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("names", [["Not A Site"], ["hungary", "swiss"], []])
def test_a_subject_that_is_not_one_site_id_is_refused(project: Project,
                                                      names: list[str]) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names])
    assert refusal(project, _client_cert(project, subject)) is RefusalReason.BAD_SUBJECT


def test_garbage_and_a_forged_revocation_list_are_refused(project: Project) -> None:
    assert refusal(project, b"not a certificate") is RefusalReason.MALFORMED
    cert = project.enrol("hungary")
    forged = x509.load_pem_x509_crl((project.other_ca / pki.CRL).read_bytes())
    with pytest.raises(PkiError, match="not signed by the project CA"):
        identity.identify_peer(cert.read_bytes(), ca_cert=project.ca_cert, crl=forged, now=NOW)


def test_revocation_by_serial_and_the_lists_numbering(project: Project) -> None:
    cert = x509.load_pem_x509_certificate(project.enrol("hungary").read_bytes())
    assert identity.crl_number(project.crl()) == 1
    assert pki.revoke(cert.serial_number, project.ca) == [cert.serial_number]
    assert pki.revoke(cert.serial_number, project.ca) == []  # already: nothing re-signed
    assert pki.revoke("hungary", project.ca) == []
    assert identity.crl_number(project.crl()) == 2
    with pytest.raises(PkiError, match="no certificate was issued to site 'swiss'"):
        pki.revoke("swiss", project.ca)
    assert [c.status for c in pki.issued_certificates(project.ca)] == ["revoked"]
    # written atomically: no temporary file stays behind
    assert sorted(p.name for p in project.ca.iterdir()) == \
        [".lock", "ca.crt", "ca.key", "crl.pem", "issued"]


# ---- a real TLS 1.3 handshake on 127.0.0.1 -----------------------------------------------

def _handshake(project: Project, server_dir: Path, cert: Path, key: Path,
               ) -> tuple[str, bytes | str]:
    """One connection to a TLS 1.3 server that requires a client certificate signed by the
    project CA and then asks identify_peer; (the server's verdict, what the client read)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=project.ca / pki.CA_CERT)
    server_ctx.load_cert_chain(server_dir / "server.crt", server_dir / "server.key")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the server's name and CA
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx.load_verify_locations(cafile=project.ca / pki.CA_CERT)
    client_ctx.load_cert_chain(cert, key)
    verdict: list[str] = []

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True) or b""
                site = pki.identify_peer_files(der, ca_cert_path=project.ca / pki.CA_CERT,
                                               crl_path=project.ca / pki.CRL)
                verdict.append(f"{tls.version()} {site}")
                tls.sendall(site.encode())
        except (ssl.SSLError, PeerRefusedError) as exc:
            verdict.append(f"refused: {exc}")
            conn.close()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        server = threading.Thread(target=serve, args=(listener,), daemon=True)
        server.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                got: bytes | str = tls.recv(100)
        except (ssl.SSLError, OSError) as exc:
            got = f"error: {exc}"
        server.join(timeout=10)
    assert not server.is_alive()
    return verdict[0], got


def test_tls13_a_signed_site_connects_and_another_cas_site_is_turned_away(
        tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)  # OpenSSL checks dates on the real clock
    project = make_project(tmp_path, now)
    pki.issue_server_certificate(project.ca, host="127.0.0.1", days=30,
                                 out_dir=tmp_path / "server")
    site = project.enrol("hungary", now=now)
    key = project.site / "hungary.key"
    verdict, got = _handshake(project, tmp_path / "server", site, key)
    assert verdict == "TLSv1.3 hungary" and got == b"hungary"

    stranger = project.enrol("swiss", ca=project.other_ca, now=now)
    verdict, got = _handshake(project, tmp_path / "server", stranger,
                              project.site / "swiss.key")
    assert verdict.startswith("refused:") and "certificate verify failed" in verdict
    assert got != b"swiss" and (got == b"" or str(got).startswith("error"))

    # revoked: the CA signed it, so TLS lets it finish; the endpoint's check refuses it
    pki.revoke("hungary", project.ca)
    verdict, got = _handshake(project, tmp_path / "server", site, key)
    assert verdict.startswith("refused: revoked")
    assert got == b"" or str(got).startswith("error")


# ---- the CLI ------------------------------------------------------------------------------

def test_the_pki_commands_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["pki", "init", "--ca-dir", "ca"]) == 0
    assert main(["pki", "request", "--site", "hungary", "--dir", "site"]) == 0
    assert main(["pki", "sign", "site/hungary.csr", "--ca-dir", "ca", "--days", "30"]) == 0
    assert (tmp_path / "site" / "hungary.crt").exists()
    assert main(["pki", "server", "--host", "127.0.0.1", "--ca-dir", "ca",
                 "--out-dir", "server"]) == 0
    assert main(["pki", "revoke", "hungary", "--ca-dir", "ca"]) == 0
    assert main(["pki", "list", "--ca-dir", "ca"]) == 0
    out = capsys.readouterr().out
    assert "stays here" in out and "revoked" in out
    listed = [line.split() for line in out.splitlines() if line.endswith(("valid", "revoked"))]
    assert sorted((row[1], row[2], row[-1]) for row in listed) == \
        [("client", "hungary", "revoked"), ("server", "127.0.0.1", "valid")]


@pytest.mark.parametrize(("argv", "message"), [
    (["pki", "init", "--ca-dir", "ca"], "already holds a CA"),
    (["pki", "request", "--site", "Bad_Site", "--dir", "site"], "invalid site id"),
    (["pki", "sign", "missing.csr", "--ca-dir", "ca"], "cannot read the request"),
    (["pki", "sign", "site/x.csr", "--ca-dir", "nowhere"], "no CA key"),
    (["pki", "revoke", "--ca-dir", "ca"], "give a SITE or --serial"),
    (["pki", "revoke", "--serial", "zz", "--ca-dir", "ca"], "not hexadecimal"),
    (["pki", "revoke", "nobody", "--ca-dir", "ca"], "no certificate was issued"),
    (["pki", "server", "--host", "bad host", "--ca-dir", "ca"], "invalid host"),
])
def test_expected_pki_errors_are_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        argv: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    pki.init_ca(tmp_path / "ca", name="ca", days=10)
    pki.request_certificate("x", tmp_path / "site")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("fedpriv: pki ")
    assert "Traceback" not in err


def test_pki_help_explains_who_does_what(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["pki", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "private key never leaves the site" in text and "The coordinator only signs" in text
