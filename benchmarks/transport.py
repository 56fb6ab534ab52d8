"""What the federation endpoint (gRPC over mutual TLS) costs a round, and how fast it moves a
large update, each against a baseline measured in the same run.

1. **Rounds** — the same configuration and seed (reproducible noise, so both train the same
   model), 4 sites:

   * *simulation*: the sites in the coordinator's process (``federate``: the in-process
     transport, each site on a thread);
   * *sites*: each site a separate Python process (:func:`adapters.site_session.serve_site`,
     what the Prefect flow ``fl-site`` runs at a hospital) reading only its own CSV and
     dialling out, with its own certificate, to a
     :class:`adapters.federation_endpoint.FederationEndpoint` on 127.0.0.1 (``federate_over``
     with the endpoint as the transport).

   Reported: mean and median seconds per round (fit + evaluation exchange) of each, the
   overhead per round (sites − simulation), the seconds until the four sessions were ready
   (process start, imports, GX validation, split, ledger charge: once per run) and both final
   accuracies.

2. **A dense update** — 10^7 float32 parameters (40 MB) coordinator → site → coordinator: an
   ``EvaluateInstruction`` carrying 40 MB down, a ``FitReply`` carrying 40 MB back, through the
   endpoint (the site a thread of this process with its own :class:`SiteChannel`), against a
   bare TLS 1.3 socket (Python's ``ssl``, the same certificates, mutual authentication, one
   connection, the site a thread echoing the buffer it received) copying the same bytes both
   ways. The instruction is encoded before the clock starts. ``endpoint``: the site answers
   with a reply encoded beforehand, so the figure is the transport's (envelopes, chunks,
   hashes, the signature and the endpoint's checks); ``endpoint_with_codec``: the site
   decodes the instruction and encodes its reply inside the clock, as in a round. Reported:
   median and fastest seconds per round trip after one warm-up, MB/s (80 MB moved per round
   trip, at the median) and each endpoint figure's share of the bare socket's throughput.

A throwaway CA, endpoint and site certificates are made in a temporary folder
(:mod:`adapters.pki`). Output: one JSON object on stdout (``--out``: a copy on disk); about
40 s on 2 cores (``--quick``: 5 rounds and 3 round trips, about 30 s).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transport.py \
        --out benchmarks/results/transport.json
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import emit, environment, require_public_dataset  # benchmarks/report.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters import pki  # noqa: E402
from adapters.config_files import load_config  # noqa: E402
from adapters.federation_endpoint import (  # noqa: E402
    EndpointLimits,
    EndpointTls,
    FederationEndpoint,
)
from adapters.site_channel import SiteChannel  # noqa: E402
from adapters.site_files import split_by_site  # noqa: E402
from adapters.tables import ClinicalTable  # noqa: E402
from fl_core.config.model import PipelineConfig, site_slug  # noqa: E402
from fl_core.federation.channel import SiteCredentials  # noqa: E402
from fl_core.federation.messages import (  # noqa: E402
    EvaluateInstruction,
    FitReply,
    Shutdown,
    SiteReady,
    decode_message,
    encode_message,
)
from fl_core.federation.wiring import federate, federate_over, make_dpsgd  # noqa: E402

RUN_ID = "bench"
LISTEN = "127.0.0.1:0"  # any free port on the loopback
DENSE_PARAMETERS = 10_000_000
MB = 1e6
SITE_PROCESS = """
import sys
from pathlib import Path
from adapters.config_files import load_config
from adapters.site_channel import SiteChannel
from adapters.site_session import SiteSession, serve_site
from fl_core.config.site import SitePolicy
from fl_core.federation.channel import SiteCredentials
root, csv, site, index, address, run_id, key, cert, ca, state = sys.argv[1:11]
cfg = load_config(Path(root) / "params.yaml", sys.argv[11:])
credentials = SiteCredentials(*(Path(p).read_bytes() for p in (key, cert, ca)))
channel = SiteChannel(address=address, site=site, run_id=run_id, credentials=credentials)
serve_site(cfg, csv_path=Path(csv), site=site, index=int(index),
           session=SiteSession(channel, site, Path(state), run_id), idle_timeout_s=120,
           policy=SitePolicy(require_secure=False))  # reproducible noise, as the simulation
"""


@dataclass(frozen=True)
class Pki:
    """A throwaway project PKI: the endpoint's files and each site's key and certificate."""

    root: Path
    tls: EndpointTls

    def site_files(self, site: str) -> tuple[Path, Path, Path]:
        """(key, certificate, CA certificate) of ``site``, enrolled on first use the way a
        site enrols: its own key and request, signed by the CA."""
        slug = site_slug(site)
        folder = self.root / "sites" / slug
        key, cert = folder / f"{slug}.key", folder / f"{slug}.crt"
        if not cert.exists():
            request = pki.request_certificate(slug, folder)
            pki.sign_request(request.csr, self.root / "ca", days=2, out=cert)
        return key, cert, self.tls.ca_cert

    def credentials(self, site: str) -> SiteCredentials:
        return SiteCredentials(*(p.read_bytes() for p in self.site_files(site)))


def make_pki(root: Path) -> Pki:
    ca = root / "ca"
    pki.init_ca(ca, name="fedpriv benchmark CA", days=2)
    key, cert = pki.issue_server_certificate(ca, host="127.0.0.1", days=2,
                                             out_dir=root / "server")
    return Pki(root, EndpointTls(key, cert, ca / pki.CA_CERT, ca / pki.CRL))


def summary(seconds: list[float]) -> dict[str, float]:
    return {"mean_round_seconds": round(statistics.mean(seconds), 4),
            "median_round_seconds": round(statistics.median(seconds), 4)}


# ---- 1. rounds ---------------------------------------------------------------------------

def simulation(cfg: PipelineConfig) -> tuple[list[float], float]:
    data = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, cfg.seed)[0]
    run = federate(cfg, data, dp=make_dpsgd(cfg=cfg, data=data))
    return [float(r.seconds) for r in run.result.history], run.result.history[-1].accuracy


def _site_csvs(cfg: PipelineConfig, tmp: Path) -> dict[str, Path]:
    files = {}
    for site_file in split_by_site(ROOT / cfg.data.path, cfg.data.spec):
        path = tmp / "sites" / site_file.slug / "data.csv"
        path.parent.mkdir(parents=True)
        path.write_text(site_file.text())
        files[site_file.site] = path
    return files


def _wait_ready(endpoint: FederationEndpoint, procs: list[subprocess.Popen[bytes]],
                timeout_s: float = 180) -> dict[str, SiteReady]:
    ready: dict[str, SiteReady] = {}
    end = time.monotonic() + timeout_s
    while len(ready) < len(endpoint.sites):
        if time.monotonic() > end or any(p.poll() is not None for p in procs):
            raise SystemExit(f"benchmarks: site sessions not ready ({sorted(ready)} are)")
        for site in endpoint.sites:
            report = endpoint.ready_report(site)
            if report is not None and site not in ready:
                message = decode_message(report[0], site=site, expect=SiteReady)
                ready[site] = message  # type: ignore[assignment]
        time.sleep(0.02)
    return ready


def sites(cfg: PipelineConfig, overrides: list[str], made: Pki,
          tmp: Path) -> tuple[list[float], float, float]:
    files = _site_csvs(cfg, tmp)
    endpoint = FederationEndpoint(run_id=RUN_ID, sites=list(files), tls=made.tls,
                                  listen=LISTEN).start()
    started = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, "-c", SITE_PROCESS, str(ROOT), str(path), site, str(index),
         endpoint.address, RUN_ID, *map(str, made.site_files(site)),
         str(tmp / "state" / str(index)), *overrides],
        cwd=ROOT) for index, (site, path) in enumerate(files.items())]
    try:
        ready = _wait_ready(endpoint, procs)
        ready_seconds = time.perf_counter() - started
        run = federate_over(cfg, transport=endpoint,
                            patients={s: m.train_patients for s, m in ready.items()},
                            num_features=next(iter(ready.values())).num_features)
    finally:
        endpoint.shutdown(encode_message(Shutdown(RUN_ID, -1, "done")))
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        endpoint.stop()
    if endpoint.refusals:
        raise SystemExit(f"benchmarks: the endpoint refused calls: {endpoint.refusals}")
    history = run.result.history
    return [float(r.seconds) for r in history], history[-1].accuracy, ready_seconds


# ---- 2. a dense update -------------------------------------------------------------------

def _echo_site(channel: SiteChannel, replies: dict[int, bytes] | None, rounds: int) -> None:
    """Answer each instruction with a FitReply carrying its model's bytes: ``replies`` (round →
    framed FitReply, encoded before the clock started), or, when None, decoded and encoded
    here as a site does in a round."""
    after = 0
    while after < rounds:
        instruction = channel.pull(after, wait_s=30)
        if instruction is None:
            continue
        after = instruction.seq
        if replies is not None:
            reply = replies[instruction.round]
        else:
            model = decode_message(instruction.data).model  # type: ignore[union-attr]
            reply = encode_message(FitReply("alpha", instruction.round, model, 10, 0.5, None,
                                            0))
        channel.push(reply, seq=instruction.seq, round_number=instruction.round)


def endpoint_round_trips(made: Pki, payload: bytes, repeats: int, *,
                         codec: bool) -> list[float]:
    """Seconds per exchange of a 40 MB instruction and a 40 MB reply through the endpoint;
    ``codec``: the site decodes and encodes inside the clock (else its replies are ready)."""
    rounds = range(1, repeats + 2)  # the first warms up (HTTP/2 windows, allocator): not counted
    replies = None if codec else {r: encode_message(FitReply("alpha", r, payload, 10, 0.5, None,
                                                             0)) for r in rounds}
    limits = EndpointLimits(max_message_bytes=64 << 20)
    seconds = []
    with FederationEndpoint(run_id=RUN_ID, sites=["alpha"], tls=made.tls, listen=LISTEN,
                            limits=limits) as endpoint:
        channel = SiteChannel(address=endpoint.address, site="alpha", run_id=RUN_ID,
                              credentials=made.credentials("alpha"))
        site = threading.Thread(target=_echo_site, args=(channel, replies, rounds[-1]),
                                daemon=True)
        site.start()
        for round_number in rounds:
            request = encode_message(EvaluateInstruction(RUN_ID, round_number, payload))
            started = time.perf_counter()
            reply = endpoint.exchange({"alpha": request}, deadline_s=120)["alpha"]
            seconds.append(time.perf_counter() - started)
            if not isinstance(reply, bytes) or len(reply) < len(payload):
                raise SystemExit(f"benchmarks: round trip {round_number} failed: {reply}")
        site.join(timeout=30)
        channel.close()
    return seconds[1:]


_LENGTH = struct.Struct("!Q")


def _read_exactly(conn: ssl.SSLSocket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, filled = memoryview(buffer), 0
    while filled < size:
        got = conn.recv_into(view[filled:], min(size - filled, 1 << 20))
        if not got:
            raise ConnectionError(f"closed after {filled} of {size} bytes")
        filled += got
    return buffer


def _send(conn: ssl.SSLSocket, data: bytes | bytearray) -> None:
    conn.sendall(_LENGTH.pack(len(data)))
    conn.sendall(data)


def _receive(conn: ssl.SSLSocket) -> bytearray:
    return _read_exactly(conn, _LENGTH.unpack(_read_exactly(conn, _LENGTH.size))[0])


def _tls_contexts(made: Pki) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(coordinator, site): TLS 1.3 only, each verifying the other against the project CA."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(made.tls.server_cert, made.tls.server_key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(*reversed(made.site_files("alpha")[:2]))
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(made.tls.ca_cert)
        context.verify_mode = ssl.CERT_REQUIRED
    return server, client


def socket_round_trips(made: Pki, payload: bytes,
                       repeats: int) -> tuple[list[float], str]:
    """The same bytes down and back over one mutually authenticated TLS 1.3 connection; the
    coordinator listens, the site (a thread) dials out and echoes. Also returns the protocol
    and cipher negotiated."""
    server_context, client_context = _tls_contexts(made)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def site() -> None:
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            for _ in range(repeats + 1):
                _send(conn, _receive(conn))  # the buffer as received: no copy

    thread = threading.Thread(target=site, daemon=True)
    thread.start()
    seconds = []
    with listener, server_context.wrap_socket(listener.accept()[0], server_side=True) as conn:
        negotiated = f"{conn.version()} {(conn.cipher() or ('?',))[0]}"
        for _ in range(repeats + 1):  # the first warms up (TCP windows, allocator): not counted
            started = time.perf_counter()
            _send(conn, payload)
            echoed = _receive(conn)
            seconds.append(time.perf_counter() - started)
            if len(echoed) != len(payload):
                raise SystemExit("benchmarks: the socket echo lost bytes")
    thread.join(timeout=30)
    return seconds[1:], negotiated


def _figures(seconds: list[float], moved_mb: float) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {"median_seconds": round(median, 4), "min_seconds": round(min(seconds), 4),
            "seconds": [round(s, 4) for s in seconds],
            "mb_per_second": round(moved_mb / median, 1)}


def dense(made: Pki, repeats: int) -> dict[str, Any]:
    payload = os.urandom(4 * DENSE_PARAMETERS)  # incompressible, as float32 updates are
    moved = 2 * len(payload) / MB
    bare, negotiated = socket_round_trips(made, payload, repeats)
    figures = {
        "tls_socket": {**_figures(bare, moved), "tls": negotiated},
        "endpoint": _figures(endpoint_round_trips(made, payload, repeats, codec=False), moved),
        "endpoint_with_codec": _figures(
            endpoint_round_trips(made, payload, repeats, codec=True), moved),
    }
    socket_rate = figures["tls_socket"]["mb_per_second"]
    return {"parameters": DENSE_PARAMETERS, "bytes_each_way": len(payload), "repeats": repeats,
            **figures,
            "endpoint_share_of_socket_throughput": round(
                figures["endpoint"]["mb_per_second"] / socket_rate, 3),
            "endpoint_with_codec_share_of_socket_throughput": round(
                figures["endpoint_with_codec"]["mb_per_second"] / socket_rate, 3)}


# ---- report ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="dense round trips per mode")
    parser.add_argument("--quick", action="store_true", help="5 rounds, 3 round trips")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rounds, repeats = (5, 3) if args.quick else (args.rounds, args.repeats)
    overrides = [f"rounds={rounds}", "privacy.randomness=reproducible"]
    cfg = load_config(ROOT / "params.yaml", overrides)
    require_public_dataset(ROOT / cfg.data.path)  # not charged: public data only
    load_before = os.getloadavg()[0]  # a shared machine: how busy it was, before and after
    sim_rounds, sim_accuracy = simulation(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        made = make_pki(Path(tmp) / "pki")
        site_rounds, site_accuracy, ready_seconds = sites(cfg, overrides, made, Path(tmp))
        update = dense(made, repeats)
    overhead = statistics.mean(site_rounds) - statistics.mean(sim_rounds)
    result: dict[str, Any] = {
        "environment": {**environment(), "cpus": os.cpu_count(),
                        "load_average_1min": [round(load_before, 2),
                                              round(os.getloadavg()[0], 2)]},
        "rounds": {
            "sites": 4, "rounds": rounds, "model": cfg.model,
            "simulation": {**summary(sim_rounds), "accuracy": round(sim_accuracy, 6)},
            "sites_mode": {**summary(site_rounds), "accuracy": round(site_accuracy, 6),
                           "sessions_ready_seconds": round(ready_seconds, 2)},
            "overhead_seconds_per_round": round(overhead, 4),
            "same_accuracy": abs(sim_accuracy - site_accuracy) < 1e-9},
        "dense_update": update,
    }
    return emit(result, args.out, table(result))


def table(result: dict[str, Any]) -> str:
    rounds, update = result["rounds"], result["dense_update"]
    sim, at_sites = rounds["simulation"], rounds["sites_mode"]
    return "\n".join([
        "| mode | mean s/round | median s/round | accuracy |", "|---|---|---|---|",
        f"| simulation (threads) | {sim['mean_round_seconds']} | "
        f"{sim['median_round_seconds']} | {sim['accuracy']:.4f} |",
        f"| sites (processes, endpoint over TLS) | {at_sites['mean_round_seconds']} | "
        f"{at_sites['median_round_seconds']} | {at_sites['accuracy']:.4f} |",
        f"\noverhead {rounds['overhead_seconds_per_round']:+.4f} s per round; sessions ready "
        f"after {at_sites['sessions_ready_seconds']:.1f} s\n",
        "| 40 MB down + 40 MB back | median s | MB/s |", "|---|---|---|",
        *(f"| {name} | {update[name]['median_seconds']} | {update[name]['mb_per_second']} |"
          for name in ("tls_socket", "endpoint", "endpoint_with_codec")),
        f"\nendpoint at {update['endpoint_share_of_socket_throughput']:.0%} of the bare "
        f"socket's throughput ({update['endpoint_with_codec_share_of_socket_throughput']:.0%} "
        f"with the site's decoding and encoding)"])


if __name__ == "__main__":
    raise SystemExit(main())
