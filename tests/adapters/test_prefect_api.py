"""The coordinator's Prefect API is not anonymous: basic auth over TLS with the project CA.

The integration tests start a real Prefect server (uvicorn on Prefect's app factory, with the
server certificate ``adapters.pki`` issues for 127.0.0.1) and check what a site's worker meets:
with the right auth string and CA it registers on its pool; with a wrong auth string it is
refused (the worker exits non-zero on the 401); trusting another CA it never connects; without
credentials every request but the health check gets 401; plain http gets no answer.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters import pki
from adapters.prefect_api import (
    PrefectApiConfigError,
    api_url,
    check_auth_string,
    client_environment,
    read_auth_string,
    server_command,
)
from tests.servers import BIN, PrefectServer, prefect_server, stop

AUTH = f"fedpriv:{secrets.token_urlsafe(16)}"


# ---- the adapter alone (no server) -----------------------------------------------------------

def test_the_secret_stays_out_of_the_command_line(tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("c")
    key.write_text("k")
    launch = server_command(host="10.0.0.5", port=4200, auth_string=AUTH, cert_file=cert,
                            key_file=key, home=tmp_path / "home")
    assert AUTH not in " ".join(launch.argv)
    assert launch.argv[1:5] == ["-m", "uvicorn", "--factory",
                                "prefect.server.api.server:create_app"]
    assert {"--ssl-keyfile", "--ssl-certfile"} <= set(launch.argv)
    assert launch.env["PREFECT_SERVER_API_AUTH_STRING"] == AUTH
    assert launch.env["PREFECT_UI_API_URL"] == launch.api_url == "https://10.0.0.5:4200/api"
    assert launch.env["PREFECT_HOME"] == str(tmp_path / "home")
    with pytest.raises(PrefectApiConfigError, match="does not exist"):
        server_command(host="h", port=1, auth_string=AUTH, cert_file=cert,
                       key_file=tmp_path / "missing.key")


def test_the_client_settings_demand_https_and_a_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("ca")
    env = client_environment(api_url="https://coordinator:4200/api/", auth_string=AUTH,
                             ca_file=ca)
    assert env == {"PREFECT_API_URL": "https://coordinator:4200/api",
                   "PREFECT_API_AUTH_STRING": AUTH, "PREFECT_API_SSL_CERT_FILE": str(ca),
                   "PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "false"}
    with pytest.raises(PrefectApiConfigError, match="https"):
        client_environment(api_url="http://coordinator:4200/api", auth_string=AUTH, ca_file=ca)
    with pytest.raises(PrefectApiConfigError, match="does not exist"):
        client_environment(api_url="https://c/api", auth_string=AUTH, ca_file=tmp_path / "no")
    assert api_url("::1", 4200) == "https://[::1]:4200/api"


@pytest.mark.parametrize("bad", ["", "nocolon", ":pw", "user:", "user:pw with space",
                                 "user:pw\n"])
def test_an_auth_string_is_user_colon_password(bad: str) -> None:
    with pytest.raises(PrefectApiConfigError):
        check_auth_string(bad)


def test_the_auth_string_file_is_private(tmp_path: Path) -> None:
    secret = tmp_path / "prefect-auth"
    secret.write_text(AUTH + "\n")
    secret.chmod(0o600)
    assert read_auth_string(secret) == AUTH
    secret.chmod(0o640)
    with pytest.raises(PrefectApiConfigError, match="chmod 600"):
        read_auth_string(secret)
    with pytest.raises(PrefectApiConfigError, match="cannot read"):
        read_auth_string(tmp_path / "absent")


# ---- a real server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca = pki.init_ca(root / "ca", name="fedpriv test CA", days=30)
    other_ca = pki.init_ca(root / "other", name="fedpriv test CA", days=30)  # same name
    key, crt = pki.issue_server_certificate(root / "ca", host="127.0.0.1", days=30,
                                            out_dir=root / "server")
    return {"ca": ca, "other_ca": other_ca, "cert": crt, "key": key}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           certs: dict[str, Path]) -> Iterator[PrefectServer]:
    with prefect_server(tmp_path_factory.mktemp("prefect"), auth_string=AUTH,
                        tls=(certs["cert"], certs["key"], certs["ca"])) as handle:
        yield handle


def _status(url: str, *, ca: Path | None, auth: str | None, body: dict | None = None) -> int:
    """The HTTP status of a GET (or a POST of ``body``), 4xx/5xx included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", f"Basic {base64.b64encode(auth.encode()).decode()}")
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _workers(server: PrefectServer, pool: str, ca: Path) -> list[dict]:
    request = urllib.request.Request(
        f"{server.api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
        headers={"Content-Type": "application/json",
                 "Authorization": f"Basic {base64.b64encode(AUTH.encode()).decode()}"})
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return json.loads(response.read())


@pytest.mark.integration
@pytest.mark.slow
def test_requests_without_the_auth_string_get_401(server: PrefectServer,
                                                  certs: dict[str, Path]) -> None:
    ca, filter_pools = certs["ca"], f"{server.api}/work_pools/filter"
    assert server.api.startswith("https://127.0.0.1:")
    assert _status(f"{server.api}/health", ca=ca, auth=None) == 200  # probes stay open
    assert _status(filter_pools, ca=ca, auth=None, body={}) == 401
    assert _status(filter_pools, ca=ca, auth="fedpriv:wrong", body={}) == 401
    assert _status(filter_pools, ca=ca, auth=AUTH, body={}) == 200
    assert _status(f"{server.api}/flow_runs/", ca=ca, auth=None,
                   body={"flow_id": "00000000-0000-0000-0000-000000000000"}) == 401


@pytest.mark.integration
@pytest.mark.slow
def test_the_server_is_only_reachable_over_tls_it_can_verify(server: PrefectServer,
                                                             certs: dict[str, Path]) -> None:
    with pytest.raises(urllib.error.URLError) as refused:  # trusting only another CA
        _status(f"{server.api}/health", ca=certs["other_ca"], auth=AUTH)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    plain = server.api.replace("https://", "http://")
    with pytest.raises(OSError):  # the TLS port drops a plain-http request unanswered
        _status(f"{plain}/health", ca=None, auth=AUTH)


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_needs_the_auth_string_and_the_ca(server: PrefectServer,
                                                   certs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "hospital-a",
                              "--type", "process"], env=server.env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stdout + created.stderr
    logs = {name: tmp_path / f"{name}.log" for name in ("right", "wrong", "other_ca")}
    right = server.start_worker("right", "hospital-a", tmp_path, {}, logs["right"])
    wrong = server.start_worker("wrong", "hospital-a", tmp_path,
                                {"PREFECT_API_AUTH_STRING": "fedpriv:guessed"}, logs["wrong"])
    other = server.start_worker("other_ca", "hospital-a", tmp_path,
                                {"PREFECT_API_SSL_CERT_FILE": str(certs["other_ca"])},
                                logs["other_ca"])
    try:
        # a wrong auth string: the worker's start-up check gets 401 and it exits non-zero
        assert wrong.wait(timeout=60) != 0
        assert "401 Unauthorized" in logs["wrong"].read_text()
        # another CA: the worker cannot verify the server and keeps retrying, connected to
        # nothing
        _wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in logs["other_ca"].read_text(), 60,
                  "the worker trusting another CA reports the failed verification")
        assert other.poll() is None
        stop(other)
        # the right settings: the worker registers on its pool and heartbeats
        _wait_for(lambda: any(w["status"] == "ONLINE"
                              for w in _workers(server, "hospital-a", certs["ca"])), 60,
                  "the worker with the right auth string and CA comes online")
        assert right.poll() is None
        assert len(_workers(server, "hospital-a", certs["ca"])) == 1  # only that one
    finally:
        for proc in (right, wrong, other):
            stop(proc)
