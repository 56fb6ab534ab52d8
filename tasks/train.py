"""Stage 3: the federated rounds; charges the ledger, writes the model and reports (Prefect task).

The body is :func:`adapters.train.train_model`, the stage's entry in
:data:`adapters.stages.STAGES`; this module only adds Prefect's retries for transient faults
(:func:`tasks.common.task_options`).
"""

from prefect import task

from adapters.stages import STAGES
from tasks.common import task_options

train = task(**task_options("train"))(STAGES["train"].function)
