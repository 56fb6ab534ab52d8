"""fedpriv's algorithms and federation protocol, pure: functions over tensors, frames and
dataclasses, with no file, database or network I/O and no Prefect, MLflow, GX or Prometheus
(those are ``adapters/``, ``tasks/`` and ``flows/``).

Subpackages, one concept each:

* :mod:`fl_core.config` -- the typed configuration (``params.yaml``'s model) and overrides;
* :mod:`fl_core.data` -- the dataset schema, schema inference, tables, partitioning, the
  declared transform and the validation rules;
* :mod:`fl_core.model` -- the networks and the evaluation metrics;
* :mod:`fl_core.codec` -- the update codecs: framing, dense, top-k with Rice-coded indices,
  error feedback, the downlink;
* :mod:`fl_core.robust` -- robust aggregators, anomaly detection, simulated attacks;
* :mod:`fl_core.privacy` -- DP-SGD per patient, DP-FedAvg, accountants, randomness, the
  ledger's rules and a run's charges;
* :mod:`fl_core.federation` -- typed messages, the transport interface, the coordinator's
  round loop, the site client, and the wiring that builds a run from the configuration;
* :mod:`fl_core.audit` -- membership inference, the white-box DP canary audit, the bounds,
  and the promotion gate.

:mod:`fl_core.registry` is name lookup for pluggable parts (not the MLflow model registry);
:mod:`fl_core.results` holds the typed results the stages hand each other.
"""

__version__ = "0.1.0"
