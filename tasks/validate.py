"""Stage 1: GX validation of every site's data (Prefect task).

The body is :func:`adapters.validate.validate_data`, the stage's entry in
:data:`adapters.stages.STAGES`; this module only adds Prefect's retries for transient faults
(:func:`tasks.common.task_options`).
"""

from prefect import task

from adapters.stages import STAGES
from tasks.common import task_options

validate = task(**task_options("validate"))(STAGES["validate"].function)
