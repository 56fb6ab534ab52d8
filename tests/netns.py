"""Network namespaces for integration tests: a coordinator and its sites on a private bridge,
each with its own loopback, so that a test can exercise real TCP (TLS, gRPC) between separate
network stacks without touching the host's interfaces or anything outside the machine.

Layout made by :func:`federation_network`::

    <prefix>-coord   br0 10.N.0.1/24, with s0, s1, ... (veth ends) enslaved to it
    <prefix>-s<i>    eth0 10.N.0.<10+i>/24, the peer of s<i>

Everything is created inside the new namespaces (never in the host's), so two runs at once
cannot clash on interface names; the namespace names carry the process id and a counter. Every
process started through :class:`Network` runs in its own process group and is killed on exit,
then the namespaces are deleted, also when the body raised. Needs root (CAP_SYS_ADMIN) and
``ip``: :func:`require_netns` fails a test under CI and skips it elsewhere when they are missing.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

# interface names (at most 15 characters); the coordinator's veth ends are s0, s1, ...
BRIDGE = "br0"
SITE_IF = "eth0"
MAX_SITES = 244  # site addresses are 10.N.0.10 .. 10.N.0.254
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
_COUNTER = itertools.count()


class NetnsError(RuntimeError):
    """An ``ip`` command failed while building or removing the test network."""


def _ip(*args: str) -> str:
    """Run ``ip args`` and return its stdout; a failure raises with ``ip``'s own message, which
    says what the kernel refused (no permission, no bridge module, name taken)."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


@functools.cache
def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can. Probes by making a
    throwaway namespace with a bridge and a veth pair inside it (the kernel pieces the harness
    uses), once per process."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "the `ip` binary (iproute2) is not installed"
    probe = f"fedpriv-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a bridge or veth pair in a namespace: {exc}"
    finally:
        with suppress(NetnsError, OSError, subprocess.TimeoutExpired):
            _ip("netns", "del", probe)
    return None


def require_netns() -> None:
    """Call at the start of a test that needs namespaces: under CI (``CI=true``) a missing
    capability is a failure, since CI runs as root and must exercise these tests; on a
    developer machine without root it is a skip with the reason."""
    import pytest

    reason = netns_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"network namespaces unavailable under CI: {reason}")
    pytest.skip(f"network namespaces unavailable: {reason}")


def _subnet(name: str) -> int:
    """The N of 10.N.0.0/24, from the unique prefix. The subnet only exists inside the test's
    own namespaces, so a coincidence with another run cannot route anywhere; varying it just
    keeps two runs' addresses apart in logs."""
    return 16 + zlib.crc32(name.encode()) % 224


@dataclass
class Network:
    """A built test network: namespace names, addresses, and process helpers that keep track
    of what they start so that exit can kill it."""

    prefix: str
    subnet: int
    coordinator_ns: str
    coordinator_address: str
    site_ns: dict[str, str]
    site_address: dict[str, str]
    grace: float = 3.0
    processes: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def namespaces(self) -> list[str]:
        return [self.coordinator_ns, *self.site_ns.values()]

    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``ns``, which must be one of this network's namespaces (a test
        never reaches into a namespace it did not make)."""
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of this network ({self.namespaces})")
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` in ``ns`` in a new session (its own process group), to be killed as a
        group when the network is torn down. ``ip netns exec`` execs the command, so the
        Popen's pid is the command's own."""
        kw["start_new_session"] = True
        proc = subprocess.Popen(self.command(ns, argv), **kw)
        self.processes.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], *, input: Any = None,
            capture_output: bool = False, timeout: float | None = 60, check: bool = False,
            **kw: Any) -> subprocess.CompletedProcess:
        """Like ``subprocess.run`` inside ``ns``; on timeout the whole process group is killed
        (``subprocess.run`` would kill only the leader) before ``TimeoutExpired`` is raised."""
        if capture_output:
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        proc = self.popen(ns, argv, **kw)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.communicate()
            raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop_processes(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every group, give them ``grace`` seconds together, then SIGKILL every group
    (members that outlived their leader included) and reap the leaders."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=30)


def _kill_stragglers(ns: str) -> None:
    """SIGKILL whatever still runs in ``ns`` (a process that left its group with setsid): it
    would keep the namespace's network stack alive after ``ip netns del``."""
    with suppress(NetnsError, subprocess.TimeoutExpired):
        for pid in _ip("netns", "pids", ns).split():
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def _teardown(net: Network, created: list[str]) -> list[str]:
    """Kill the network's processes, then delete the namespaces made so far; returns what
    could not be deleted (so that a failing body's exception is not masked by cleanup)."""
    problems = []
    try:
        _stop_processes(net.processes, net.grace)
    except (subprocess.TimeoutExpired, OSError) as exc:
        problems.append(f"stopping processes: {exc}")
    for ns in reversed(created):
        _kill_stragglers(ns)
        try:
            _ip("netns", "del", ns)
        except (NetnsError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc))
    return problems


def _build(net: Network, created: list[str]) -> None:
    """Make the namespaces, the bridge and one veth pair per site, all inside the new
    namespaces; ``created`` records each namespace as soon as it exists, for teardown."""
    coord = net.coordinator_ns
    _ip("netns", "add", coord)
    created.append(coord)
    _ip("-n", coord, "link", "set", "lo", "up")
    _ip("-n", coord, "link", "add", BRIDGE, "type", "bridge")
    _ip("-n", coord, "addr", "add", f"{net.coordinator_address}/24", "dev", BRIDGE)
    _ip("-n", coord, "link", "set", BRIDGE, "up")
    for i, (site, ns) in enumerate(net.site_ns.items()):
        port = f"s{i}"
        _ip("netns", "add", ns)
        created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", coord, "link", "add", port, "type", "veth", "peer", "name", SITE_IF,
            "netns", ns)
        _ip("-n", coord, "link", "set", port, "master", BRIDGE, "up")
        _ip("-n", ns, "addr", "add", f"{net.site_address[site]}/24", "dev", SITE_IF)
        _ip("-n", ns, "link", "set", SITE_IF, "up")


def _plan(prefix: str, sites: list[str], grace: float) -> Network:
    if not _NAME.match(prefix):
        raise ValueError(f"prefix {prefix!r}: 1-40 of [A-Za-z0-9_.-]")
    if len(set(sites)) != len(sites) or not 0 < len(sites) <= MAX_SITES:
        raise ValueError(f"sites must be 1..{MAX_SITES} distinct names, got {sites}")
    unique = f"{prefix}-{os.getpid()}-{next(_COUNTER)}"
    n = _subnet(unique)
    return Network(
        prefix=unique, subnet=n, coordinator_ns=f"{unique}-coord",
        coordinator_address=f"10.{n}.0.1",
        site_ns={site: f"{unique}-s{i}" for i, site in enumerate(sites)},
        site_address={site: f"10.{n}.0.{10 + i}" for i, site in enumerate(sites)},
        grace=grace)


@contextmanager
def federation_network(prefix: str, sites: list[str], *,
                       grace: float = 3.0) -> Iterator[Network]:
    """A coordinator namespace with a bridge and one namespace per site wired to it (see the
    module docstring). The process id and a per-process counter are appended to ``prefix``,
    so parallel runs and nested networks never share a namespace. On exit every process
    started through the network gets SIGTERM, then SIGKILL after ``grace`` seconds, and the
    namespaces are deleted, also when the body raised."""
    net = _plan(prefix, list(sites), grace)
    created: list[str] = []
    try:
        _build(net, created)
        yield net
    finally:
        problems = _teardown(net, created)
    if problems:
        raise NetnsError("; ".join(problems))
