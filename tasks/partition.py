"""Stage 2: patients → clients and an 80/20 split per client, by patient (Prefect task).

The body is :func:`adapters.partition.partition_data`, the stage's entry in
:data:`adapters.stages.STAGES`; this module only adds Prefect's retries for transient faults
(:func:`tasks.common.task_options`).
"""

from prefect import task

from adapters.stages import STAGES
from tasks.common import task_options

partition = task(**task_options("partition"))(STAGES["partition"].function)
