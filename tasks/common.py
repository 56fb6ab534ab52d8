"""What every Prefect task shares: the transient-error retry rule and the task options."""

from __future__ import annotations

import sqlite3
from typing import Any


class TransientError(RuntimeError):
    """A fault worth retrying: I/O hiccup, network, a service briefly unavailable."""


# Errors that may go away on their own: I/O and network faults (OSError covers ConnectionError
# and TimeoutError) and a locked SQLite store. FileNotFoundError/PermissionError are OSErrors
# that will not, and a ValueError (bad data, bad config, privacy refusal) never does.
_TRANSIENT = (TransientError, OSError, sqlite3.OperationalError)
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException | None) -> bool:
    if exc is None or isinstance(exc, _PERMANENT_OS):
        return False
    return isinstance(exc, _TRANSIENT)


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is transient."""
    try:
        state.result()
    except Exception as exc:  # the state's exception is re-raised by .result()
        return is_transient(exc)
    return False


def task_options(name: str, retries: int = 2) -> dict[str, Any]:
    """Prefect ``@task`` options shared by the stages: retries for transient faults only."""
    from prefect.cache_policies import NO_CACHE

    return {
        "name": name,
        "retries": retries,
        "retry_delay_seconds": [1, 4, 8][:retries] or 0,
        "retry_condition_fn": retry_on_transient,
        "cache_policy": NO_CACHE,  # stages write files and registries: never skip them
    }
