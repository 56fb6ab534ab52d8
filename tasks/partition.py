"""Stage 2: patients → clients and an 80/20 split per client, by patient (Prefect task).

The body is :func:`adapters.partition.partition_data`; this module only adds Prefect's retries for
transient faults (:func:`tasks.common.task_options`).
"""

from prefect import task

from adapters.partition import partition_data
from tasks.common import task_options

partition = task(**task_options("partition"))(partition_data)
