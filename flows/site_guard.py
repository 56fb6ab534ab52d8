"""The site's own Prefect worker: it runs fedpriv's ``fl-site`` session and nothing else,
whatever anyone with the coordinator's Prefect API puts on the site's pool.

Prefect's process worker runs what a deployment says: its entrypoint, its pull steps
(``git_clone``, ``run_shell_script``: code fetched and run at the site), its storage block, and
the job variables that set the process's ``command``, ``env`` and ``working_dir``. Whoever can
create deployments on the coordinator's API (anyone holding its auth string) could so run any
code in a hospital. This worker refuses such runs before it starts anything:

* the run's deployment must be ``fl-site``'s, entrypoint ``flows.site_flow:fl_site``, with no
  pull steps, no storage block and no job variables (neither on the deployment nor on the run);
* its parameters must be exactly those ``fl_site`` takes, of the types it takes, addressed to
  this site.

A refused run is set FAILED with ``refused by the site: <why>`` as its state message (the
coordinator does not restart a failed session) and the worker goes on polling. A run it
accepts is started with the site's own command, in a new empty folder, with the worker's own
environment: the pool's template and job variables cannot change what is run
(:class:`SiteJobConfiguration`). That command (:data:`ENGINE_MODULE`) imports ``fl_site`` from
the installed fedpriv, never reads the deployment, and checks the run's parameters again in the
process that uses them, so a deployment or run changed after the worker's check changes
nothing.

Started by ``fedpriv site worker`` as ``python -m flows.site_guard --pool P --name N``
(:func:`main`), in place of ``prefect worker start``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prefect.exceptions import Abort, ObjectNotFound
from prefect.states import Failed
from prefect.utilities.dispatch import get_registry_for_type
from prefect.utilities.engine import propose_state
from prefect.utilities.processutils import command_to_string
from prefect.workers.process import (
    ProcessJobConfiguration,
    ProcessWorker,
    ProcessWorkerResult,
)

from flows.site_flow import SITE_ENTRYPOINT, SITE_FLOW

if TYPE_CHECKING:
    from uuid import UUID

    import anyio.abc
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

ENGINE_MODULE = "flows.site_engine"
"""The module every accepted run is started as (``python -P -m``): runs ``fl_site``."""
REFUSED = "refused by the site: "

SITE_PARAMETERS: dict[str, tuple[type, ...]] = {
    "site": (str,), "session": (str,), "index": (int,), "charge_key": (str,),
    "config": (dict,), "endpoint": (str,), "idle_timeout_s": (int, float)}
"""``fl_site``'s parameters and the JSON types each may have (a test checks the signature)."""
OPTIONAL_PARAMETERS = frozenset({"idle_timeout_s"})


def engine_command() -> str:
    """The one command the site's worker starts: this interpreter, ``-P`` so that the
    run's folder is not on ``sys.path``, the site engine module."""
    return command_to_string([sys.executable, "-P", "-m", ENGINE_MODULE])


def deployment_refusal(*, flow_name: str | None, entrypoint: str | None,
                       pull_steps: list[Any] | None, storage_document_id: Any) -> str | None:
    """Why the run's deployment is not fedpriv's ``fl-site``, or None."""
    if entrypoint != SITE_ENTRYPOINT:
        return f"entrypoint {entrypoint!r} is not fl-site ({SITE_ENTRYPOINT})"
    if flow_name != SITE_FLOW:
        return f"flow {flow_name!r} is not {SITE_FLOW}"
    if pull_steps:
        kinds = ", ".join(sorted({next(iter(step), "?") if isinstance(step, dict) else "?"
                                  for step in pull_steps}))
        return (f"the deployment has {len(pull_steps)} pull step(s) ({kinds}): the site runs "
                f"no code that a deployment brings")
    if storage_document_id is not None:
        return "the deployment loads code from a storage block: the site runs only its own"
    return None


def job_variable_refusal(*, deployment: Mapping[str, Any] | None,
                         run: Mapping[str, Any] | None) -> str | None:
    """Why job variables are refused: the site's worker takes none (its command, working
    folder and environment are its own), or None when there are none."""
    for owner, variables in (("deployment", deployment), ("flow run", run)):
        if variables:
            return (f"job variables {', '.join(sorted(map(str, variables)))} on the {owner}: "
                    f"the site's worker takes none")
    return None


def parameter_refusal(parameters: Any, *, site: str | None = None) -> str | None:
    """Why the run's parameters are not ``fl_site``'s (unknown or missing names, a wrong
    type, another site's id), or None. ``fl_site`` checks their values itself."""
    if not isinstance(parameters, Mapping):
        return "parameters are not a mapping"
    unknown = sorted(set(map(str, parameters)) - set(SITE_PARAMETERS))
    if unknown:
        return f"unknown parameter(s) {', '.join(unknown)}: fl-site takes no such thing"
    missing = sorted(set(SITE_PARAMETERS) - OPTIONAL_PARAMETERS - set(parameters))
    if missing:
        return f"missing parameter(s) {', '.join(missing)}"
    for name, value in parameters.items():
        types = SITE_PARAMETERS[name]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            return f"parameter {name} is {type(value).__name__}, not {wanted}"
    if site is not None and parameters["site"] != site:
        return f"a session for site {parameters['site']!r} reached site {site!r}"
    return None


class SiteJobConfiguration(ProcessJobConfiguration):
    """A process job whose command, working folder and environment are the site's, whatever
    the pool's template or the job variables say: :func:`engine_command`, a new empty
    folder, the worker's own environment and Prefect's per-run variables."""

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        self.command, self.env, self.working_dir = None, {}, None
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name,
                                     worker_id=worker_id)
        self.command = engine_command()
        self._command_configured = True

    @property
    def pinned(self) -> bool:
        return self.command == engine_command() and self.working_dir is None


with warnings.catch_warnings():  # defining it registers it as Prefect's "process" worker:
    warnings.simplefilter("ignore")  # Prefect warns, and the registry is restored below

    class SiteWorker(ProcessWorker):
        """Prefect's process worker, refusing every run that is not this site's ``fl-site``
        session (:func:`deployment_refusal`, :func:`job_variable_refusal`,
        :func:`parameter_refusal`) and starting the others as :class:`SiteJobConfiguration`
        says."""

        type = "process"
        job_configuration = SiteJobConfiguration

        def __init__(self, work_pool_name: str, *, site: str | None = None,
                     **options: Any) -> None:
            super().__init__(work_pool_name, **options)
            self.site = site

        async def refusal(self, flow_run: FlowRun) -> str | None:
            """Why this run is not one the site runs, read now from the API, or None."""
            if flow_run.deployment_id is None:
                return "a flow run without a deployment is not fl-site"
            try:
                current = await self.client.read_flow_run(flow_run.id)
                deployment = await self.client.read_deployment(flow_run.deployment_id)
                flow = await self.client.read_flow(current.flow_id)
            except ObjectNotFound as exc:
                return f"its deployment or flow is gone ({exc})"
            return (deployment_refusal(flow_name=flow.name, entrypoint=deployment.entrypoint,
                                       pull_steps=deployment.pull_steps,
                                       storage_document_id=deployment.storage_document_id)
                    or job_variable_refusal(deployment=deployment.job_variables,
                                            run=current.job_variables)
                    or parameter_refusal(current.parameters, site=self.site))

        async def run(
            self,
            flow_run: FlowRun,
            configuration: ProcessJobConfiguration,
            task_status: anyio.abc.TaskStatus[int] | None = None,
        ) -> ProcessWorkerResult:
            reason = await self.refusal(flow_run)
            if reason is None and not (isinstance(configuration, SiteJobConfiguration)
                                       and configuration.pinned):
                reason = "its job configuration is not the site's own"
            if reason is None:
                return await super().run(flow_run, configuration, task_status)
            await self.refuse(flow_run, reason)
            if task_status is not None:
                task_status.started(0)  # nothing started: no process id to record
            return ProcessWorkerResult(status_code=0, identifier="refused")

        async def refuse(self, flow_run: FlowRun, reason: str) -> None:
            """Set the run FAILED (not crashed: the coordinator restarts crashed sessions)
            with why, in its log and state message."""
            message = REFUSED + reason
            self.get_flow_run_logger(flow_run).error(message)
            self._logger.warning("flow run %s %s", flow_run.id, message)
            with contextlib.suppress(Abort):  # already over: it does not run either way
                await propose_state(self.client, Failed(message=message),
                                    flow_run_id=flow_run.id)


if (_workers := get_registry_for_type(ProcessWorker)) is not None:
    _workers[ProcessWorker.type] = ProcessWorker  # importing this module changes no other worker


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.site_guard",
                                     description="the site's guarded Prefect worker")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the site's worker until interrupted, as ``prefect worker start`` would (its
    signal handling included); the site comes from the file ``FEDPRIV_SITE_CONFIG`` names."""
    import anyio
    from prefect.utilities.processutils import setup_signal_handlers_worker

    from adapters.config_files import load_site_config
    from adapters.site_worker import SITE_CONFIG_ENV

    args = _parse(argv)
    path = os.environ.get(SITE_CONFIG_ENV)
    site = load_site_config(path).config.site if path else None
    setup_signal_handlers_worker(os.getpid(), "the site's worker", print)
    worker = SiteWorker(args.pool, name=args.name, site=site)
    with contextlib.suppress(KeyboardInterrupt):  # the first SIGINT/SIGTERM: a clean stop
        anyio.run(worker.start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
