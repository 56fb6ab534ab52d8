"""Byzantine robustness: :mod:`~fl_core.robust.aggregators` (FedAvg, Multi-Krum, trimmed mean,
median, geometric median, centered clipping, pre-aggregation), :mod:`~fl_core.robust.anomaly`
(sanitising, robust z-scores, reputation) and :mod:`~fl_core.robust.attacks` (simulated
attacks for drills and benchmarks)."""
