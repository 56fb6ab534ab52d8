"""The optional DP-implementation audit before registration (Prefect task;
``audit_dp.in_pipeline``). The body is :func:`adapters.dp_audit.run_dp_audit`."""

from prefect import task

from adapters.dp_audit import run_dp_audit
from tasks.common import task_options

dp_audit = task(**task_options("audit-dp"))(run_dp_audit)
