"""The namespace harness itself: the bridge carries TCP from every site to the coordinator,
each namespace has its own loopback, and nothing (namespaces, processes) outlives the context,
also when the body raises. Later network tests rely on exactly these properties."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests import netns
from tests.netns import Network, federation_network, require_netns

SITES = ["alpha", "beta", "gamma"]

# listen on argv[1] (an ephemeral port), print the port, answer each connection with argv[2]
SERVE = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(sys.argv[2].encode())
"""

# for each [host, port] in argv[1]: what the server there says, or the error's class name;
# host "self" binds that port on this namespace's 127.0.0.1 and connects to it
PROBE = """
import json, socket, sys
def probe(host, port):
    if host == "self":
        with socket.create_server(("127.0.0.1", port)) as srv:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
                srv.accept()[0].sendall(b"self")
                return c.recv(64).decode()
    try:
        with socket.create_connection((host, port), timeout=3) as c:
            return c.recv(64).decode()
    except OSError as exc:
        return type(exc).__name__
print(json.dumps([probe(h, p) for h, p in json.loads(sys.argv[1])]))
"""


def serve(net: Network, ns: str, host: str, tag: str) -> int:
    """Start SERVE in ``ns`` and return its port once it listens."""
    proc = net.popen(ns, [sys.executable, "-c", SERVE, host, tag], stdout=subprocess.PIPE,
                     text=True)
    line = proc.stdout.readline()
    proc.stdout.close()
    assert line.strip().isdigit(), f"server in {ns} did not start (exit {proc.poll()})"
    return int(line)


def probe(net: Network, ns: str, targets: list[tuple[str, int]]) -> list[str]:
    done = net.run(ns, [sys.executable, "-c", PROBE, json.dumps(targets)],
                   capture_output=True, text=True, timeout=20, check=True)
    return json.loads(done.stdout)


def gone(names: list[str]) -> bool:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout.split()
    return all(n not in listed and not Path("/run/netns", n).exists() for n in names)


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.integration
def test_sites_reach_the_coordinator_over_the_bridge_and_keep_their_own_loopback() -> None:
    require_netns()
    with socket.create_server(("127.0.0.1", 0)) as host_srv:  # the host's own loopback
        host_port = host_srv.getsockname()[1]
        with federation_network("fpt", SITES) as net:
            assert net.coordinator_address == f"10.{net.subnet}.0.1"
            assert list(net.site_address.values()) == [f"10.{net.subnet}.0.{10 + i}"
                                                       for i in range(len(SITES))]
            bridge = serve(net, net.coordinator_ns, net.coordinator_address, "coord-bridge")
            lo = serve(net, net.coordinator_ns, "127.0.0.1", "coord-lo")
            # control: the loopback server answers inside its own namespace
            assert probe(net, net.coordinator_ns, [("127.0.0.1", lo)]) == ["coord-lo"]
            for site in SITES:
                got = probe(net, net.site_ns[site], [
                    (net.coordinator_address, bridge),  # across the bridge
                    ("127.0.0.1", lo),  # the coordinator's loopback: not this one
                    ("127.0.0.1", host_port),  # the host's loopback: not this one either
                    ("self", lo),  # the site's own loopback is up and the port is free
                ])
                assert got == ["coord-bridge", "ConnectionRefusedError",
                               "ConnectionRefusedError", "self"], site
            names = net.namespaces
        assert gone(names)


@pytest.mark.integration
def test_exit_kills_process_groups_and_deletes_namespaces_even_when_the_body_raises() -> None:
    require_netns()
    with pytest.raises(RuntimeError, match="body failed"), \
            federation_network("fpt", ["alpha", "beta"], grace=0.5) as net:
        # a shell whose background child shares its group, and a process ignoring SIGTERM
        shell = net.popen(net.site_ns["alpha"], ["sh", "-c", "sleep 60 & echo $!; wait"],
                          stdout=subprocess.PIPE, text=True)
        child = int(shell.stdout.readline())
        stubborn = net.popen(net.coordinator_ns, [sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             " print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
        assert stubborn.stdout.readline().strip() == "ready"
        names = net.namespaces
        raise RuntimeError("body failed")
    shell.stdout.close()
    stubborn.stdout.close()
    assert shell.returncode is not None and dead(shell.pid)
    assert dead(child)
    assert stubborn.returncode == -9  # outlived SIGTERM, killed after the grace period
    assert gone(names)


@pytest.mark.integration
def test_nested_networks_get_distinct_namespaces_and_refuse_foreign_ones() -> None:
    require_netns()
    with federation_network("fpt", ["a"]) as one, federation_network("fpt", ["a"]) as two:
        assert not set(one.namespaces) & set(two.namespaces)
        assert str(os.getpid()) in one.coordinator_ns
        with pytest.raises(ValueError, match="not a namespace of this network"):
            one.run(two.coordinator_ns, ["true"])
        assert two.run(two.site_ns["a"], ["true"]).returncode == 0
    assert gone(one.namespaces + two.namespaces)


def test_require_netns_fails_under_ci_and_skips_elsewhere(monkeypatch) -> None:
    monkeypatch.setattr(netns, "netns_unavailable", lambda: "no root here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no root here"):
        require_netns()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no root here"):
        require_netns()
