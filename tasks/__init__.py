"""Prefect tasks: each pipeline stage's function from ``adapters/`` (named in
:data:`adapters.stages.STAGES`) wrapped as a task with retries for transient faults only
(:mod:`tasks.common`); :mod:`tasks.at_sites` holds the coordinator's stages in sites mode.
The tasks add orchestration, nothing else: no side effects of their own."""
