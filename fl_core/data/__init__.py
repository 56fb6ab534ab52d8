"""Tabular clinical data, pure: :mod:`~fl_core.data.schema` (the dataset schema),
:mod:`~fl_core.data.inference` (drafting a schema from a table), :mod:`~fl_core.data.tables`
(partitions and per-client tensors), :mod:`~fl_core.data.partitioning` (patients to clients,
train/test per client), :mod:`~fl_core.data.transform` (the declared preprocessing) and
:mod:`~fl_core.data.validation` (validation reports and rules). Reading CSV files and running
Great Expectations is ``adapters`` (:mod:`adapters.tables`, :mod:`adapters.gx_validation`)."""
