"""Stage 5: MLflow registration and the promotion gate (Prefect task).

The body is :func:`adapters.publish.publish_results`, the stage's entry in
:data:`adapters.stages.STAGES`; this module only adds Prefect's retries for transient faults
(:func:`tasks.common.task_options`).
"""

from prefect import task

from adapters.stages import STAGES
from tasks.common import task_options

publish = task(**task_options("register"))(STAGES["register"].function)
