"""The site's worker runs fedpriv's ``fl-site`` only: what its checks refuse, how its job
configuration is pinned, and a real worker on a real Prefect server refusing a deployment with
another entrypoint, one with a pull step, job variables, a parameter ``fl_site`` does not take,
a pool template with its own command, while still running ``fl_site`` itself."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from adapters import pki
from adapters.config_files import load_site_config
from adapters.site_worker import GUARDED_WORKER, SITE_CONFIG_ENV, worker_command, write_site_config
from flows.site_guard import (
    ENGINE_MODULE,
    OPTIONAL_PARAMETERS,
    REFUSED,
    SITE_ENTRYPOINT,
    SITE_PARAMETERS,
    SiteJobConfiguration,
    deployment_refusal,
    engine_command,
    job_variable_refusal,
    parameter_refusal,
)
from tests.federation import make_pki
from tests.servers import BIN, PrefectServer, prefect_server

SITE = "guarded"
GOOD = {"site": SITE, "session": "abc123", "index": 0, "charge_key": "abc-123",
        "config": {}, "endpoint": "127.0.0.1:9", "idle_timeout_s": 5.0}


def test_the_parameters_checked_are_fl_sites() -> None:
    from flows.site_flow import fl_site

    signature = inspect.signature(fl_site.fn)
    assert set(signature.parameters) == set(SITE_PARAMETERS)
    assert {name for name, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty} == OPTIONAL_PARAMETERS


@pytest.mark.parametrize(("change", "why"), [
    ({"code": "import os"}, "unknown parameter(s) code"),
    ({"index": "0"}, "parameter index is str, not int"),
    ({"index": True}, "parameter index is bool"),
    ({"config": "/etc/passwd"}, "parameter config is str, not dict"),
    ({"idle_timeout_s": None}, "parameter idle_timeout_s is NoneType"),
    ({"site": "other"}, "a session for site 'other' reached site 'guarded'"),
])
def test_parameters_fl_site_does_not_take_are_refused(change: dict, why: str) -> None:
    assert parameter_refusal(GOOD, site=SITE) is None
    assert why in (parameter_refusal({**GOOD, **change}, site=SITE) or "")


def test_missing_parameters_are_refused_but_the_optional_one_may_be_left_out() -> None:
    assert parameter_refusal({k: v for k, v in GOOD.items() if k != "idle_timeout_s"}) is None
    assert "missing parameter(s) endpoint" in (
        parameter_refusal({k: v for k, v in GOOD.items() if k != "endpoint"}) or "")
    assert parameter_refusal(["site"]) == "parameters are not a mapping"


def test_only_fl_sites_deployment_is_accepted() -> None:
    fine = {"flow_name": "fl-site", "entrypoint": SITE_ENTRYPOINT, "pull_steps": [],
            "storage_document_id": None}
    assert deployment_refusal(**fine) is None
    assert "entrypoint 'marker.py:write' is not fl-site" in deployment_refusal(
        **{**fine, "entrypoint": "marker.py:write"})
    assert "flow 'other' is not fl-site" in deployment_refusal(**{**fine, "flow_name": "other"})
    steps = [{"prefect.deployments.steps.run_shell_script": {"script": "id"}}]
    assert "1 pull step(s) (prefect.deployments.steps.run_shell_script)" in deployment_refusal(
        **{**fine, "pull_steps": steps})
    assert "storage block" in deployment_refusal(**{**fine, "storage_document_id": uuid4()})


def test_any_job_variable_is_refused() -> None:
    assert job_variable_refusal(deployment={}, run=None) is None
    assert "job variables command on the flow run" in job_variable_refusal(
        deployment={}, run={"command": "sh"})
    assert "job variables env, working_dir on the deployment" in job_variable_refusal(
        deployment={"env": {"A": "1"}, "working_dir": "/"}, run={})


def test_the_job_configuration_is_the_sites_whatever_the_template_says() -> None:
    from prefect.client.schemas.objects import FlowRun

    configuration = SiteJobConfiguration(command="sh -c 'touch x'", working_dir="/tmp",
                                         env={"PYTHONPATH": "/tmp/evil", "LD_PRELOAD": "x.so"})
    run = FlowRun(id=uuid4(), flow_id=uuid4(), name="r")
    configuration.prepare_for_flow_run(run)
    assert configuration.pinned and configuration._command_configured
    assert configuration.command == engine_command()
    assert f"-P -m {ENGINE_MODULE}" in configuration.command
    assert configuration.working_dir is None
    assert "LD_PRELOAD" not in configuration.env
    assert configuration.env.get("PYTHONPATH") == __import__("os").environ.get("PYTHONPATH")
    assert configuration.env["PREFECT__FLOW_RUN_ID"] == str(run.id)


def test_importing_the_guard_leaves_prefects_process_worker_registered() -> None:
    from prefect.utilities.dispatch import lookup_type
    from prefect.workers.base import BaseWorker
    from prefect.workers.process import ProcessWorker

    from flows.site_guard import SiteWorker

    assert SiteWorker.type == "process"  # it serves process pools, as deploy_sites makes them
    assert lookup_type(BaseWorker, "process") is ProcessWorker


def _enrol(made: Any, folder: Path, api: str) -> Path:
    """A site folder as a hospital makes it: key, certificate, CA, a CSV, site.yaml."""
    request = pki.request_certificate(SITE, folder)
    pki.sign_request(request.csr, made.ca_dir, days=30, out=folder / f"{SITE}.crt")
    request.csr.unlink()
    shutil.copy(made.ca_dir / pki.CA_CERT, folder / "ca.crt")
    (folder / "data.csv").write_text("age\n1\n")
    return write_site_config(folder, site=SITE, data="data.csv", prefect_url=api)


def test_the_worker_command_is_the_guarded_worker(tmp_path: Path) -> None:
    config = _enrol(make_pki(tmp_path / "pki"), tmp_path / "site", "http://127.0.0.1:9/api")
    command, env = worker_command(load_site_config(config))
    assert command[:4] == [sys.executable, "-P", "-m", GUARDED_WORKER]
    assert command[4:] == ["--pool", f"site-{SITE}", "--name", f"fedpriv-{SITE}"]
    assert env[SITE_CONFIG_ENV] == str(config) and env["PREFECT_API_URL"].endswith(":9/api")


class Api:
    """The coordinator's Prefect API as anyone holding its credentials can use it."""

    def __init__(self, server: PrefectServer) -> None:
        self.base = server.api

    def __call__(self, method: str, path: str, body: Any = None) -> Any:
        """One call, retried on 503 as Prefect's client does (its SQLite locks under load)."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(10):
            request = urllib.request.Request(f"{self.base}{path}", data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    text = answer.read()
                return json.loads(text) if text else None
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or attempt == 9:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def deploy(self, flow: str, name: str, **fields: Any) -> str:
        flow_id = self("POST", "/flows/", {"name": flow})["id"]
        body = {"name": name, "flow_id": flow_id, "work_pool_name": f"site-{SITE}",
                "entrypoint": SITE_ENTRYPOINT, "pull_steps": [], "parameter_openapi_schema": {},
                "enforce_parameter_schema": False, **fields}
        return self("POST", "/deployments/", body)["id"]

    def start(self, deployment: str, parameters: dict, **fields: Any) -> str:
        return self("POST", f"/deployments/{deployment}/create_flow_run",
                    {"parameters": parameters, **fields})["id"]

    def final(self, runs: list[str], timeout: float) -> dict[str, dict]:
        deadline, states = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            states = {run: self("GET", f"/flow_runs/{run}")["state"] for run in runs}
            if all(s["type"] in ("FAILED", "CANCELLED", "COMPLETED", "CRASHED")
                   for s in states.values()):
                return states
            time.sleep(0.5)
        raise AssertionError(f"runs not finished within {timeout}s: {states}")


def _hostile_pool_template(marker: Path) -> dict:
    """The process pool's template with its own command and environment by default."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    variables = template["variables"]["properties"]
    variables["command"]["default"] = f"touch {marker}"
    variables["env"]["default"] = {"PYTHONSTARTUP": str(marker), "FEDPRIV_SITE_CONFIG": "/x"}
    return template


@pytest.mark.integration
@pytest.mark.slow
def test_the_sites_worker_refuses_what_is_not_fl_site_and_keeps_serving(
        tmp_path: Path) -> None:
    marks = {name: tmp_path / f"marker-{name}" for name in
             ("entrypoint", "pull-step", "command", "env", "pool")}
    code = tmp_path / "code"
    code.mkdir()
    (code / "marker.py").write_text(
        "from pathlib import Path\nfrom prefect import flow\n\n\n@flow\ndef write():\n"
        f"    Path({str(marks['entrypoint'])!r}).write_text('ran')\n")
    folder = tmp_path / "site"
    with prefect_server(tmp_path) as server:
        api = Api(server)
        api("POST", "/work_pools/", {"name": f"site-{SITE}", "type": "process",
                                     "base_job_template": _hostile_pool_template(
                                         marks["pool"])})
        config = _enrol(make_pki(tmp_path / "pki"), folder, server.api)
        log = tmp_path / "worker.log"
        worker = subprocess.Popen([str(BIN / "fedpriv"), "site", "worker", "--config",
                                   str(config)], cwd=folder, env=server.env,
                                  stdout=log.open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        server.workers[SITE] = worker
        site = api.deploy("fl-site", SITE)
        hostile = {  # one at a time: a loaded machine's SQLite server locks on a burst
            "entrypoint": lambda: api.start(api.deploy(
                "marker", "m", entrypoint="marker.py:write", path=str(code)), {}),
            "pull-step": lambda: api.start(api.deploy("fl-site", "pulls", pull_steps=[
                {"prefect.deployments.steps.run_shell_script": {
                    "script": f"touch {marks['pull-step']}"}}]), GOOD),
            "command": lambda: api.start(site, GOOD, job_variables={
                "command": f"touch {marks['command']}"}),
            "env": lambda: api.start(api.deploy("fl-site", "env", job_variables={
                "env": {"PYTHONSTARTUP": str(marks["env"])}}), GOOD),
            "parameter": lambda: api.start(site, {**GOOD, "code": "import os"}),
        }
        states = {}
        for name, start in hostile.items():
            run = start()
            states[name] = api.final([run], timeout=60)[run]
        reasons = {name: state["message"] for name, state in states.items()}
        assert all(state["type"] == "FAILED" for state in states.values()), states
        assert all(m.startswith(REFUSED) for m in reasons.values()), reasons
        assert "entrypoint 'marker.py:write' is not fl-site" in reasons["entrypoint"]
        assert "pull step(s) (prefect.deployments.steps.run_shell_script)" in reasons[
            "pull-step"]
        assert "job variables command on the flow run" in reasons["command"]
        assert "job variables env on the deployment" in reasons["env"]
        assert "unknown parameter(s) code" in reasons["parameter"]
        assert worker.poll() is None, log.read_text()[-3000:]
        # still polling, and what it accepts is fl_site itself: its own check refuses the
        # malformed session id (the pool template's command did not run instead)
        run = api.start(site, {**GOOD, "session": "not/an/id"})
        state = api.final([run], timeout=120)[run]
        assert state["type"] == "FAILED", state
        assert "run id or charge key malformed" in state["message"], state
        assert REFUSED not in state["message"]
        assert worker.poll() is None, log.read_text()[-3000:]
    assert not [m for m in marks.values() if m.exists()]
