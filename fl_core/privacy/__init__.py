"""Differential privacy, per patient: :mod:`~fl_core.privacy.dpsgd` (per-patient DP-SGD with
Opacus), :mod:`~fl_core.privacy.dp_fedavg` (client-level DP-FedAvg around a sum-compatible
aggregator), :mod:`~fl_core.privacy.accountants` (σ calibration and ε by name),
:mod:`~fl_core.privacy.randomness` (secure or reproducible noise), :mod:`~fl_core.privacy.ledger`
(the ledger's accounts and composition rules) and :mod:`~fl_core.privacy.accounting` (what a
run charges). The ledger's SQLite store is :mod:`adapters.ledger_store`."""
