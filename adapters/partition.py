"""Stage 2: patients → clients, and an 80/20 train/test split per client (by patient)."""

from __future__ import annotations

import time
from pathlib import Path

from adapters.artifacts import Paths, read_validation, write_text_atomic
from adapters.tables import ClinicalTable
from fl_core.config.model import PipelineConfig, check_min_clients
from fl_core.data.tables import ClientData, DataError, Partition
from fl_core.data.transform import TabularTransform
from fl_core.results import ClientCounts, PartitionSummary


def partition_data(
    cfg: PipelineConfig, root: str | Path = ".", run_id: str | None = None
) -> PartitionSummary:
    """Write ``data/processed/partition.json``; return a per-client summary."""
    paths = Paths.of(cfg, root, run_id)
    if not read_validation(paths).success:  # validation must have run, and passed
        raise DataError(f"{paths.validation}: the data failed validation; fix "
                        f"{cfg.data.source_text} and run the 'validate' stage again")
    started = time.perf_counter()
    loader = ClinicalTable.get(cfg.data, paths.root)
    partition = loader.partition(cfg.data, cfg.seed)
    # by_site: the number of clients is the number of sites, known only now
    check_min_clients(cfg.min_clients, len(partition.clients),
                      f"data.partition={partition.scheme}: one per site in {cfg.data.source_text}"
                      if partition.scheme == "by_site" else "data.partition=by_patient")
    write_text_atomic(paths.partition, partition.to_json())
    clients = {c.client_id: ClientCounts(train=len(c.train_ids), test=len(c.test_ids))
               for c in partition.clients}
    dropped = loader.describe_dropped()
    print(f"partition {partition.scheme}: {len(clients)} clients, "
          f"{sum(v.train for v in clients.values())} train / "
          f"{sum(v.test for v in clients.values())} test patients"
          + (f"; {dropped}" if dropped else ""))
    return PartitionSummary(scheme=partition.scheme, clients=clients,
                            dropped_rows=loader.dropped_rows(),
                            seconds=round(time.perf_counter() - started, 3))


def load_client_data(
    cfg: PipelineConfig, paths: Paths
) -> tuple[list[ClientData], TabularTransform, Partition]:
    """The partition written by the partition stage, encoded with transforms fitted on train."""
    if not paths.partition.exists():
        raise FileNotFoundError(f"{paths.partition} not found: run the 'partition' stage first")
    partition = Partition.from_json(paths.partition.read_text())
    loader = ClinicalTable.get(cfg.data, paths.root)
    data, transform = loader.encoded(cfg.data, partition)
    return data, transform, partition


