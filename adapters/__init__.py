"""Side effects that are not Prefect: the pipeline's stages as plain functions (read a
stage's inputs, call ``fl_core``, write its outputs atomically), MLflow registration, plots.

Never imports Prefect: ``tasks/`` wraps these functions as Prefect tasks, ``fedpriv stage``
and DVC call them directly, benchmarks reuse them.
"""
