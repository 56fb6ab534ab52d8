"""Prefect tasks around fl_core, one module per stage, plus MLflow / Prometheus side effects."""
