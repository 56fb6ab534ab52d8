"""Stage 2: patients → clients, and an 80/20 train/test split per client (by patient)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from adapters.artifacts import Paths, read_validation, write_text_atomic
from adapters.data_report import run_data_report
from adapters.lineage import DATA_HASH_KEY, data_digest, require_partition_of, require_validated
from adapters.tables import ClinicalTable
from fl_core.config.model import PipelineConfig, check_min_clients
from fl_core.data.tables import ClientData, Partition
from fl_core.data.transform import TabularTransform
from fl_core.results import ClientCounts, PartitionSummary


def partition_data(
    cfg: PipelineConfig, root: str | Path = ".", run_id: str | None = None
) -> PartitionSummary:
    """Write ``data/processed/partition.json`` with the hash of the data it was made from
    (:mod:`adapters.lineage`); return a per-client summary. Refuses unless validation ran,
    passed, and was of this very data."""
    paths = Paths.of(cfg, root, run_id)
    require_validated(read_validation(paths), paths.validation, cfg.data, paths.root)
    started = time.perf_counter()
    loader = ClinicalTable.get(cfg.data, paths.root)
    partition = loader.partition(cfg.data, cfg.seed)
    # by_site: the number of clients is the number of sites, known only now
    check_min_clients(cfg.min_clients, len(partition.clients),
                      f"data.partition={partition.scheme}: one per site in {cfg.data.source_text}"
                      if partition.scheme == "by_site" else "data.partition=by_patient")
    record = {**json.loads(partition.to_json()),
              DATA_HASH_KEY: data_digest(cfg.data, paths.root)}
    write_text_atomic(paths.partition, json.dumps(record, indent=1))
    clients = {c.client_id: ClientCounts(train=len(c.train_ids), test=len(c.test_ids))
               for c in partition.clients}
    dropped = loader.describe_dropped()
    print(f"partition {partition.scheme}: {len(clients)} clients, "
          f"{sum(v.train for v in clients.values())} train / "
          f"{sum(v.test for v in clients.values())} test patients"
          + (f"; {dropped}" if dropped else ""))
    run_data_report(cfg, paths, partition)  # per site, before training (data_report.json)
    return PartitionSummary(scheme=partition.scheme, clients=clients,
                            dropped_rows=loader.dropped_rows(),
                            seconds=round(time.perf_counter() - started, 3))


def load_client_data(
    cfg: PipelineConfig, paths: Paths
) -> tuple[list[ClientData], TabularTransform, Partition]:
    """The partition written by the partition stage, encoded with transforms fitted on train.

    Refuses (:class:`~adapters.lineage.StaleArtifactError`, exit 3) unless the validation
    passed and both it and the partition were made from the data ``cfg`` names: a failed
    validation of new data must not leave training on the old partition."""
    if not paths.partition.exists():
        raise FileNotFoundError(f"{paths.partition} not found: run the 'partition' stage first")
    require_validated(read_validation(paths), paths.validation, cfg.data, paths.root)
    text = paths.partition.read_text()
    require_partition_of(json.loads(text), paths.partition, cfg.data, paths.root)
    partition = Partition.from_json(text)
    loader = ClinicalTable.get(cfg.data, paths.root)
    data, transform = loader.encoded(cfg.data, partition)
    return data, transform, partition


