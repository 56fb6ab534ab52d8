"""AUC, accuracy and balanced accuracy of the trained model (data/models) on the test records.

For imbalanced tables (covid_testing: 5.6 % positive) accuracy is the majority class's;
read AUC and balanced accuracy (thresholded at 0.5 and at the training prevalence).
Run after `fedpriv stage train` with the same overrides::

    PYTHONPATH=. .venv/bin/python benchmarks/scores.py --set data.schema=... [--set ...]
"""
import json
import sys

import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from adapters.artifacts import Paths
from adapters.config_files import load_config
from adapters.partition import load_client_data
from adapters.train import load_model

cfg = load_config("params.yaml", [a for a in sys.argv[1:] if a != "--set"])  # KEY=VALUE ...
paths = Paths.of(cfg, ".", None)
data, _, _ = load_client_data(cfg, paths)
model, _ = load_model(paths.model)
model.eval()
with torch.no_grad():
    p = torch.cat([torch.sigmoid(model(d.x_test)).reshape(-1) for d in data]).numpy()
y = torch.cat([d.y_test for d in data]).numpy()
prev = float(torch.cat([d.y_train for d in data]).mean())
out = {"test_records": len(y), "test_patients": sum(len(d.test_ids) for d in data),
       "positives": int(y.sum()), "auc": roc_auc_score(y, p),
       "accuracy@0.5": float(((p > 0.5) == y).mean()),
       "balanced_accuracy@0.5": balanced_accuracy_score(y, p > 0.5),
       f"balanced_accuracy@train_prevalence({prev:.3f})": balanced_accuracy_score(y, p > prev)}
print(json.dumps(out, indent=1))
