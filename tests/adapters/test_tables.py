import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.tables import ClinicalTable
from fl_core.config.model import DataConfig
from fl_core.data.tables import DataError
from fl_core.data.transform import TabularTransform
from tests.conftest import data_config


@pytest.fixture(autouse=True)
def fresh_cache():
    ClinicalTable.clear_cache()
    yield
    ClinicalTable.clear_cache()


def loader(raw_csv: Path, **kw) -> ClinicalTable:
    return ClinicalTable.get(data_config(path=str(raw_csv), **kw))


def cfg(raw_csv: Path, **kw) -> DataConfig:
    return data_config(path=str(raw_csv), **kw)


def test_singleton_under_threads_reads_once(raw_csv: Path) -> None:
    got: list[ClinicalTable] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        inst = loader(raw_csv)
        _ = inst.table
        got.append(inst)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(g) for g in got}) == 1
    assert got[0].reads == 1


def test_lazy_nothing_read_until_first_use(raw_csv: Path) -> None:
    inst = loader(raw_csv)
    assert inst.reads == 0 and inst._table is None
    assert len(inst.table) == 740
    assert inst.reads == 1


def test_different_options_are_different_instances(raw_csv: Path) -> None:
    assert loader(raw_csv) is loader(raw_csv)
    assert loader(raw_csv) is not loader(raw_csv, drop_incomplete=False)
    assert len(loader(raw_csv, drop_incomplete=False).table) == 920


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        ClinicalTable.get(data_config(path=str(tmp_path / "nope.csv")))


def _check_partition(inst: ClinicalTable, config: DataConfig, seed: int) -> None:
    part = inst.partition(config, seed)
    seen: set[int] = set()
    for c in part.clients:
        train, test = set(c.train_ids), set(c.test_ids)
        assert not train & test, f"patient on both sides in {c.client_id}"
        assert not (train | test) & seen, "patient in two clients"
        seen |= train | test
    assert seen == set(inst.table["id"])


def test_by_site_partition_disjoint_and_complete(raw_csv: Path) -> None:
    inst = loader(raw_csv)
    _check_partition(inst, inst.config, 0)
    part = inst.partition(inst.config, 0)
    assert [c.client_id for c in part.clients] == [
        "Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    sizes = {c.client_id: len(c.train_ids) + len(c.test_ids) for c in part.clients}
    assert sizes == {"Cleveland": 304, "Hungary": 260, "Switzerland": 46, "VA Long Beach": 130}


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_by_patient_partition(raw_csv: Path, alpha: float | None) -> None:
    c = cfg(raw_csv, partition="by_patient", num_clients=20, dirichlet_alpha=alpha)
    inst = ClinicalTable.get(c)
    _check_partition(inst, c, 3)
    part = inst.partition(c, 3)
    assert len(part.clients) == 20
    assert all(len(c.train_ids) + len(c.test_ids) >= 5 for c in part.clients)


def test_dirichlet_skews_labels(raw_csv: Path) -> None:
    iid = cfg(raw_csv, partition="by_patient", num_clients=10)
    skew = cfg(raw_csv, partition="by_patient", num_clients=10, dirichlet_alpha=0.1)
    inst = ClinicalTable.get(iid)
    assert ClinicalTable.get(skew) is inst  # same file, same cached table
    labels = inst.table.set_index("id")["label"]

    def spread(config: DataConfig) -> float:
        rates = [labels.loc[list(c.train_ids) + list(c.test_ids)].mean()
                 for c in inst.partition(config, 1).clients]
        return float(np.std(rates))

    assert spread(skew) > 2 * spread(iid)


def test_split_is_stratified_per_client(raw_csv: Path) -> None:
    inst = loader(raw_csv)
    labels = inst.table.set_index("id")["label"]
    for c in inst.partition(inst.config, 7).clients:
        n = len(c.train_ids) + len(c.test_ids)
        assert abs(len(c.test_ids) / n - 0.2) < 0.03
        if len(c.test_ids) >= 20:
            assert abs(labels.loc[list(c.test_ids)].mean()
                       - labels.loc[list(c.train_ids)].mean()) < 0.05


def test_partition_is_seeded(raw_csv: Path) -> None:
    c = cfg(raw_csv, partition="by_patient", num_clients=8, dirichlet_alpha=1.0)
    inst = ClinicalTable.get(c)
    assert inst.partition(c, 5) == inst.partition(c, 5)
    assert inst.partition(c, 5) != inst.partition(c, 6)


def test_too_many_clients_is_a_clear_error(raw_csv: Path) -> None:
    c = cfg(raw_csv, partition="by_patient", num_clients=500)
    with pytest.raises(DataError, match="num_clients=500"):
        ClinicalTable.get(c).partition(c, 0)


def test_declared_transform_encodes_every_client(raw_csv: Path) -> None:
    inst = loader(raw_csv)
    part = inst.partition(inst.config, 0)
    transform = inst.fit_transform(inst.config, part)
    assert transform == TabularTransform.from_config(inst.config)  # nothing fitted
    data = inst.client_data(part, transform)
    assert len(transform.columns()) == data[0].x_train.shape[1] == 17
    age = inst.config.reference["age"]
    cleveland = data[0]
    raw_age = inst.table.set_index("id").loc[list(cleveland.train_ids), "age"].to_numpy()
    age_col = transform.columns().index("age")
    expected = (raw_age - age.center) / age.scale
    assert np.allclose(cleveland.x_train[:, age_col].numpy(), expected, atol=1e-6)
    # chol == 0 became missing: indicator set, value the declared fill
    miss_col = transform.columns().index("chol_missing")
    chol_col = transform.columns().index("chol")
    chol = inst.config.reference["chol"]
    swiss = next(d for d in data if d.client_id == "Switzerland")
    assert swiss.x_train[:, miss_col].min() == 1.0
    assert np.allclose(swiss.x_train[:, chol_col].numpy(), (chol.fill - chol.center) / chol.scale)


def test_transform_of_a_table_without_a_feature_is_a_clear_error(raw_csv: Path) -> None:
    table = loader(raw_csv).table.drop(columns=["age"])
    transform = TabularTransform.from_config(data_config(features=["age", "sex"]))
    with pytest.raises(DataError, match=r"\['age'\] missing"):
        transform.transform(table)
    with pytest.raises(DataError, match=r"\['age'\] missing"):
        transform.fit(table)


def test_padded_text_cells_are_their_stripped_value(raw_csv: Path, tmp_path: Path) -> None:
    """R's exports pad factor levels ("8-12 yrs "): a padded category, site or label value is
    the declared one, and a blank-only cell is missing, not an unknown category."""
    import pandas as pd

    frame = pd.read_csv(raw_csv)
    frame["sex"] = frame["sex"] + "  "
    frame["cp"] = " " + frame["cp"]
    padded = tmp_path / "padded.csv"
    frame.to_csv(padded, index=False)
    plain, spaced = loader(raw_csv), loader(padded)
    assert len(spaced.table) == len(plain.table) == 740
    data, _, _ = spaced.partitioned(cfg(padded), seed=0)
    expected, _, _ = plain.partitioned(cfg(raw_csv), seed=0)
    for got, want in zip(data, expected, strict=True):
        assert torch.equal(got.x_train, want.x_train)
