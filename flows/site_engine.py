"""The process a site's worker starts for an accepted ``fl-site`` run (``python -P -m
flows.site_engine``, the flow run's id in ``PREFECT__FLOW_RUN_ID``), in place of Prefect's
``python -m prefect.engine``.

Prefect's engine loads the flow the run's deployment names, running the deployment's pull steps
and storage first, all read from the API when the process starts: a deployment changed after
the worker checked it would still run. This one reads the flow run once, checks its parameters
again (:func:`flows.site_guard.parameter_refusal`, against the object it then runs), and
runs ``fl_site`` as imported from the installed fedpriv; it never reads the deployment.
"""

from __future__ import annotations

import os
import sys
from uuid import UUID

from flows.site_guard import REFUSED, parameter_refusal


def main() -> int:
    """Run the flow run named by ``PREFECT__FLOW_RUN_ID`` as ``fl_site``; a run whose
    parameters are refused is set FAILED and its process exits 0 (it was handled)."""
    from prefect._internal.control_listener import configure_from_env
    from prefect.client.orchestration import get_client
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import flow_run_logger, load_flow_run, run_flow
    from prefect.states import Failed

    try:
        flow_run_id = UUID(os.environ.get("PREFECT__FLOW_RUN_ID", ""))
    except ValueError:
        print("fedpriv site engine: no flow run id in PREFECT__FLOW_RUN_ID", file=sys.stderr)
        return 1
    configure_from_env()  # the runner's control channel: graceful cancellation
    with handle_engine_signals(flow_run_id):
        flow_run = load_flow_run(flow_run_id=flow_run_id)
        logger = flow_run_logger(flow_run=flow_run)
        reason = parameter_refusal(flow_run.parameters)
        if reason is not None:
            logger.error(REFUSED + reason)
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run_id, Failed(message=REFUSED + reason))
            return 0
        from flows.site_flow import fl_site

        run_flow(fl_site, flow_run=flow_run, error_logger=logger)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
