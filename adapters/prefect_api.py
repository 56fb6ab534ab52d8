"""The coordinator's Prefect API, behind basic auth and TLS: how to start it, and what a client
(a site's worker, the coordinator's own flows, the CLI) needs in its environment to reach it.

Site workers poll this API for flow runs on their hospital's pool: whoever reaches it
anonymously could create runs there. Prefect 3 has one shared secret for a self-hosted server,
``PREFECT_SERVER_API_AUTH_STRING`` (``user:password``; every request but ``GET /api/health``
and ``/api/ready`` without it gets 401), which clients send as HTTP basic auth from
``PREFECT_API_AUTH_STRING``. Basic auth is only as private as the channel, so the API is
served over TLS with the project CA's server certificate (``fedpriv pki server --host H``),
and clients trust that CA through ``PREFECT_API_SSL_CERT_FILE``, not the system store.

``prefect server start`` (3.8.8) takes no TLS options, so the server is uvicorn on Prefect's
app factory, which builds the same app ``prefect server start`` runs (API, UI and the
background services: scheduler, late runs, cancellation clean-up, ...). The secrets travel
in the environment, never on the command line (``ps`` shows other users the arguments) and
never in a flow's parameters (they are stored in the API and shown in the UI).

Nothing here imports Prefect: this module only builds command lines and environments.
"""

from __future__ import annotations

import stat
import sys
from dataclasses import dataclass
from pathlib import Path

APP_FACTORY = "prefect.server.api.server:create_app"


class PrefectApiConfigError(ValueError):
    """A setting that would leave the API open or the client unable to check the server."""


@dataclass(frozen=True)
class ServerLaunch:
    argv: list[str]  # run as is (a list: no shell)
    env: dict[str, str]  # put over the caller's environment; holds the auth string
    api_url: str  # https://HOST:PORT/api, what clients set as PREFECT_API_URL


def api_url(host: str, port: int) -> str:
    """``https://host:port/api`` (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"https://{shown}:{port}/api"


def check_auth_string(auth_string: str) -> str:
    """The auth string as Prefect compares it: ``user:password``, both parts non-empty, no
    whitespace (a stray newline from a secret file would never match what clients send)."""
    user, sep, password = auth_string.partition(":")
    if not (sep and user and password):
        raise PrefectApiConfigError("the Prefect API auth string must be 'user:password'")
    if any(c.isspace() for c in auth_string):
        raise PrefectApiConfigError("the Prefect API auth string must not contain whitespace")
    return auth_string


def read_auth_string(path: Path) -> str:
    """The auth string from a secret file (one line; a trailing newline is dropped), refused
    if the group or others have any access to it: it opens the hospitals' pools to whoever
    holds it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PrefectApiConfigError(f"{path}: cannot read the auth string ({exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PrefectApiConfigError(f"{path} is open to other users: chmod 600 it")
    return check_auth_string(text.rstrip("\n"))


def _existing(path: Path, what: str) -> str:
    if not Path(path).is_file():
        raise PrefectApiConfigError(f"{what} {path} does not exist")
    return str(path)


def server_command(*, host: str, port: int, auth_string: str, cert_file: Path,
                   key_file: Path, home: Path | None = None, public_url: str | None = None,
                   python: str = sys.executable) -> ServerLaunch:
    """The command and environment that serve the Prefect API and UI on ``host:port`` over
    TLS (``cert_file``/``key_file``: the server certificate naming the address sites dial)
    with basic auth. ``public_url`` is the API's address as browsers reach it (for the UI),
    by default ``https://host:port/api``; ``home`` sets ``PREFECT_HOME`` (its database)."""
    url = api_url(host, port)
    argv = [python, "-m", "uvicorn", "--factory", APP_FACTORY, "--host", host,
            "--port", str(port), "--ssl-keyfile", _existing(key_file, "key file"),
            "--ssl-certfile", _existing(cert_file, "certificate file")]
    env = {"PREFECT_SERVER_API_AUTH_STRING": check_auth_string(auth_string),
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_API_URL": public_url or url}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    return ServerLaunch(argv, env, url)


def client_environment(*, api_url: str, auth_string: str, ca_file: Path) -> dict[str, str]:
    """What a client of the API (a site's worker, a flow, the CLI) needs in its environment:
    the https URL (the coordinator itself or a TLS-terminating proxy in front of it), the
    auth string, and the CA certificate that signed the server's certificate. Certificate
    checking is set on explicitly, overriding a ``PREFECT_API_TLS_INSECURE_SKIP_VERIFY``
    inherited from the caller's environment."""
    if not api_url.startswith("https://"):
        raise PrefectApiConfigError(f"{api_url}: the auth string is only sent over https")
    return {"PREFECT_API_URL": api_url.rstrip("/"),
            "PREFECT_API_AUTH_STRING": check_auth_string(auth_string),
            "PREFECT_API_SSL_CERT_FILE": _existing(ca_file, "CA certificate"),
            "PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "false"}
