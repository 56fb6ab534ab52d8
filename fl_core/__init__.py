"""fedpriv's algorithms, free of orchestration: importable without Prefect, MLflow or DVC."""

__version__ = "0.1.0"
