"""Duplicate column names are refused (exit 3) before anything is validated, trained or
charged: pandas would silently rename the second ``age`` to ``age.1``."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.csv_header import duplicate_columns, refuse_duplicate_columns
from adapters.gx_validation import validate_file
from fl_core.data.tables import DataError
from tests.conftest import RAW_CSV, data_config


def with_repeated_age(source: Path, target: Path) -> Path:
    """``source`` with a second ``age`` column appended (the same values)."""
    lines = source.read_text(encoding="utf-8").splitlines()
    header, body = lines[0], lines[1:]
    age = header.split(",").index("age")
    target.write_text("\n".join([header + ",age",
                                 *(row + "," + row.split(",")[age] for row in body)]) + "\n",
                      encoding="utf-8")
    return target


def test_duplicate_columns_are_read_from_the_raw_header(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,x,x.1,age,age,y,y\n1,2,3,4,5,6,7\n")
    assert duplicate_columns(path) == ["age", "y"]  # x and x.1 are two names
    with pytest.raises(DataError, match=r"duplicate column name\(s\) 'age', 'y'"):
        refuse_duplicate_columns(path)
    path.write_text("\ufeffid,x\n1,2\n")  # a BOM is not part of the first name
    assert duplicate_columns(path) == []
    assert duplicate_columns(tmp_path / "absent.csv") == []


def test_validation_refuses_duplicate_columns(tmp_path: Path) -> None:
    report = validate_file(with_repeated_age(RAW_CSV, tmp_path / "dup.csv"), data_config())
    assert not report.success
    [failure] = report.failures
    assert failure.expectation == "unique_column_names"
    assert "'age'" in failure.detail


def test_the_training_table_refuses_duplicate_columns(tmp_path: Path) -> None:
    from adapters.tables import ClinicalTable

    path = with_repeated_age(RAW_CSV, tmp_path / "dup.csv")
    data = data_config().model_copy(update={"path": str(path)})
    ClinicalTable.clear_cache()
    with pytest.raises(DataError, match="duplicate column name.*'age'"):
        ClinicalTable.get(data, tmp_path).table  # noqa: B018 - reading is the point


def test_stage_validate_exits_3_naming_the_columns(project: Path, capsys) -> None:
    from flows.cli import main

    csv_path = project / "data" / "raw" / RAW_CSV.name
    with_repeated_age(RAW_CSV, csv_path)
    assert main(["stage", "validate", "--root", str(project)]) == 3
    err = capsys.readouterr().err
    assert "duplicate column name(s) 'age'" in err and "Traceback" not in err
    assert not (project / "reports" / "validation.json").exists() or \
        '"success": true' not in (project / "reports" / "validation.json").read_text()


def test_schema_infer_exits_3_naming_the_columns(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    path = with_repeated_age(RAW_CSV, tmp_path / "dup.csv")
    out = tmp_path / "draft.yaml"
    code = main(["schema", "infer", str(path), "--patient-id", "id", "--site", "dataset",
                 "--label", "num", "--out", str(out), "--root", str(tmp_path)])
    assert code == 3
    assert "duplicate column name(s) 'age'" in capsys.readouterr().err
    assert not out.exists()
