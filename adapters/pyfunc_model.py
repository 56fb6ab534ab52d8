"""The registered pyfunc as an MLflow *model from code*: ``log_served_model`` hands MLflow this
file's path, MLflow copies it into the model beside ``code/`` (``adapters``, ``fl_core``) and
runs it when the model is loaded. The registry therefore holds source code a reviewer can
read, and loading a version unpickles no Python object (the weights load with
``weights_only=True``, the transform is JSON)."""

import mlflow.models

from adapters.serving import TabularRiskModel

mlflow.models.set_model(TabularRiskModel())
