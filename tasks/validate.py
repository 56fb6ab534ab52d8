"""Stage 1: GX validation of every site's data (Prefect task).

The body is :func:`adapters.validate.validate_data`; this module only adds Prefect's retries for
transient faults (:func:`tasks.common.task_options`).
"""

from prefect import task

from adapters.validate import validate_data
from tasks.common import task_options

validate = task(**task_options("validate"))(validate_data)
