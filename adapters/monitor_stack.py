"""``make monitor``: a Pushgateway and a Prometheus on 127.0.0.1 for watching fedpriv runs, and
a Grafana provisioning folder pointed at them.

The checked-in ``infra/prometheus/prometheus.yml`` names the default ports and paths relative
to itself; the Prometheus started here reads a copy (in ``.fedpriv/monitor/``) whose ports are
the ones chosen and whose rule and target files are absolute, so the project's alert rules are
the ones that run, whatever the working directory. Grafana cannot run here, so its provisioning
files are written with the datasource URL and the dashboards' absolute folder, and printed for
the operator's own Grafana. The packages come from Debian: this module never runs ``apt`` (a
Makefile target that installs system packages would need root and surprise whoever runs it);
it prints the command instead. Both servers run in their own sessions and are stopped by PID
on exit, Ctrl-C included. The tests use the same functions to start a real Prometheus.

Run as ``python -m adapters.monitor_stack [--prometheus-port P] [--pushgateway-port P]``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adapters.artifacts import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
GRAFANA_DIR = ROOT / "infra" / "grafana"
# binary name → the Debian package that installs it
TOOLS = {"prometheus": "prometheus", "promtool": "prometheus",
         "prometheus-pushgateway": "prometheus-pushgateway"}
APT_COMMAND = ("apt-get update && apt-get install -y --no-install-recommends "
               "prometheus prometheus-pushgateway")


def missing_tools(names: tuple[str, ...] = tuple(TOOLS)) -> list[str]:
    """The binaries among ``names`` that are not on ``PATH``."""
    return [name for name in names if shutil.which(name) is None]


def prometheus_config(*, pushgateway: str, endpoint: str,
                      scrape_interval: str | None = None) -> dict[str, Any]:
    """The checked-in scrape configuration with the Pushgateway and endpoint addresses given
    and its rule and target files made absolute; ``scrape_interval`` (e.g. ``1s``, for
    tests) replaces every scrape and evaluation interval."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    if scrape_interval is not None:
        config["global"].update(scrape_interval=scrape_interval,
                                evaluation_interval=scrape_interval)
        for job in config["scrape_configs"]:
            job["scrape_interval"] = scrape_interval
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    targets = {"pushgateway": pushgateway, "fedpriv-endpoint": endpoint}
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(PROMETHEUS_DIR / name) for name in sd["files"]]
    return config


def write_grafana_provisioning(out: Path, prometheus_url: str) -> Path:
    """A copy of ``infra/grafana/provisioning`` for this Prometheus: the datasource's URL and
    the dashboards' folder (absolute) filled in. Returns the provisioning folder."""
    source = GRAFANA_DIR / "provisioning"
    datasources = yaml.safe_load((source / "datasources" / "fedpriv.yaml").read_text())
    for datasource in datasources["datasources"]:
        datasource["url"] = prometheus_url
    dashboards = yaml.safe_load((source / "dashboards" / "fedpriv.yaml").read_text())
    for provider in dashboards["providers"]:
        provider["options"]["path"] = str(GRAFANA_DIR / "dashboards")
    folder = out / "grafana" / "provisioning"
    for kind, content in (("datasources", datasources), ("dashboards", dashboards)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / kind / "fedpriv.yaml", yaml.safe_dump(content, sort_keys=False))
    return folder


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    """Start a server in a session of its own (a Ctrl-C in the terminal reaches only this
    process, which then stops the server in order), its output in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def start_pushgateway(port: int, data_dir: Path) -> subprocess.Popen:
    """A Pushgateway on 127.0.0.1:``port`` keeping its pushed groups in ``data_dir`` across a
    restart."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return _start(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}",
                   f"--persistence.file={data_dir / 'pushgateway.db'}"],
                  data_dir / "pushgateway.log")


def start_prometheus(config: dict[str, Any], port: int, data_dir: Path) -> subprocess.Popen:
    """A Prometheus on 127.0.0.1:``port`` with ``config`` (written to ``data_dir``) and its
    TSDB in ``data_dir/tsdb``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = data_dir / "prometheus.yml"
    write_text_atomic(config_file, yaml.safe_dump(config, sort_keys=False))
    return _start(["prometheus", f"--config.file={config_file}",
                   f"--storage.tsdb.path={data_dir / 'tsdb'}",
                   f"--web.listen-address=127.0.0.1:{port}"],
                  data_dir / "prometheus.log")


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Wait until ``url`` (a server's readiness page) answers 200; fail at once if the server
    exited (a port taken, a bad flag) instead of waiting for the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} "
                               "answered (see its log)")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a server started here: SIGTERM (both flush their data), SIGKILL after
    ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


@dataclass(frozen=True)
class Stack:
    """What ``make monitor`` started: the two URLs and the Grafana provisioning folder."""

    prometheus_url: str
    pushgateway_url: str
    pushgateway_address: str
    grafana_provisioning: Path


@contextlib.contextmanager
def monitor_stack(state_dir: Path, *, prometheus_port: int = 9090, pushgateway_port: int = 9091,
                  endpoint: str = "127.0.0.1:9464",
                  scrape_interval: str | None = None) -> Iterator[Stack]:
    """Pushgateway and Prometheus on loopback, data in ``state_dir``; both stopped on exit."""
    pushgateway_address = f"127.0.0.1:{pushgateway_port}"
    config = prometheus_config(pushgateway=pushgateway_address, endpoint=endpoint,
                               scrape_interval=scrape_interval)
    started: list[subprocess.Popen] = []
    try:
        started.append(start_pushgateway(pushgateway_port, state_dir / "pushgateway"))
        wait_ready(f"http://{pushgateway_address}/-/ready", started[-1])
        started.append(start_prometheus(config, prometheus_port, state_dir / "prometheus"))
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        wait_ready(f"{prometheus_url}/-/ready", started[-1])
        yield Stack(prometheus_url, f"http://{pushgateway_address}", pushgateway_address,
                    write_grafana_provisioning(state_dir, prometheus_url))
    finally:
        for proc in reversed(started):
            stop(proc)


def _instructions(stack: Stack) -> str:
    return "\n".join([
        f"Prometheus   {stack.prometheus_url}  (alerts: {stack.prometheus_url}/alerts)",
        f"Pushgateway  {stack.pushgateway_url}",
        "Runs push to it with:",
        f"  fedpriv run --set monitoring.pushgateway={stack.pushgateway_address}",
        "Grafana: point its provisioning at this folder (datasource URL "
        f"{stack.prometheus_url}, the three fedpriv dashboards):",
        f"  GF_PATHS_PROVISIONING={stack.grafana_provisioning} grafana-server ...",
        "Ctrl-C stops both.",
    ])


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM (a process manager, ``kill``) ends the wait, and both servers are
    stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.monitor_stack",
                                     description="Pushgateway and Prometheus on 127.0.0.1")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--pushgateway-port", type=int, default=9091)
    parser.add_argument("--endpoint", default="127.0.0.1:9464",
                        help="the federation endpoint's /metrics address to scrape")
    parser.add_argument("--dir", type=Path, default=Path(".fedpriv/monitor"))
    args = parser.parse_args(argv)
    missing = missing_tools(("prometheus", "prometheus-pushgateway"))
    if missing:
        print(f"not installed: {', '.join(missing)}. Install them (as root) with:\n"
              f"  {APT_COMMAND}", file=sys.stderr)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a script's `&` ignores it
        signal.signal(signum, _interrupt)
    try:
        with monitor_stack(args.dir.resolve(), prometheus_port=args.prometheus_port,
                           pushgateway_port=args.pushgateway_port,
                           endpoint=args.endpoint) as stack:
            print(_instructions(stack), flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped Prometheus and the Pushgateway", file=sys.stderr)
    except (RuntimeError, TimeoutError) as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
