"""Stage 4: the membership-inference audit of the trained model (Prefect task).

The body is :func:`adapters.audit.audit_model`, the stage's entry in
:data:`adapters.stages.STAGES`; this module only adds Prefect's retries for transient faults
(:func:`tasks.common.task_options`).
"""

from prefect import task

from adapters.stages import STAGES
from tasks.common import task_options

audit = task(**task_options("audit"))(STAGES["audit"].function)
