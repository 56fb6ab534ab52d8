"""Sites mode, the site's side: a hospital's own file gives exactly the simulation's client."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.config_files import load_config
from adapters.gx_validation import validate_site_file
from adapters.site_files import SiteFile, site_client_data, split_by_site
from adapters.tables import ClinicalTable
from fl_core.config.model import ConfigError, PipelineConfig, site_slug
from fl_core.data.tables import DataError, Partition
from tests.conftest import data_config

SPEC = data_config().spec  # data/schemas/heart.yaml
SITES = tuple(SPEC.sites)

ROOT = Path(__file__).resolve().parents[2]
TENSORS = ("x_train", "y_train", "x_test", "y_test", "train_patients")


@pytest.fixture(autouse=True)
def fresh_cache():
    ClinicalTable.clear_cache()
    yield
    ClinicalTable.clear_cache()


def config(raw_csv: Path, *overrides: str) -> PipelineConfig:
    return load_config(ROOT / "params.yaml", [f"data.path={raw_csv}", *overrides])


def site_files(raw_csv: Path) -> dict[str, SiteFile]:
    return {f.site: f for f in split_by_site(raw_csv, SPEC)}


def write(directory: Path, site: SiteFile, rows: list[list[str]] | None = None) -> Path:
    path = directory / site.slug / "heart_disease_uci.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(site.text() if rows is None else replace(site, rows=rows).text())
    return path


@pytest.mark.parametrize("overrides", [
    (), ("seed=7",), ("data.drop_incomplete=false",),
    ("data.one_hot=false", "schema.features.chol.missing_values=[]")])
def test_site_file_gives_the_simulations_client_data(
    raw_csv: Path, tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    cfg = config(raw_csv, *overrides)
    simulated = {c.client_id: c for c in
                 ClinicalTable.get(cfg.data).partitioned(cfg.data, cfg.seed)[0]}
    files = site_files(raw_csv)
    assert sorted(files) == sorted(simulated) == sorted(SITES)
    for site, site_file in files.items():
        own = site_client_data(cfg, write(tmp_path, site_file), site)
        sim = simulated[site]
        assert own.client_id == site
        assert own.train_ids == sim.train_ids and own.test_ids == sim.test_ids, site
        for name in TENSORS:
            assert torch.equal(getattr(own, name), getattr(sim, name)), (site, name)


def _splits(path: Path, cfg: PipelineConfig) -> dict[str, tuple]:
    data_cfg = cfg.data.model_copy(update={"path": str(path)})
    part: Partition = ClinicalTable.get(data_cfg).partition(data_cfg, cfg.seed)
    return {c.client_id: (c.train_ids, c.test_ids) for c in part.clients}


def _with_other_sites_changed(files: dict[str, SiteFile], keep: str, drop: list[str],
                              flip: list[int]) -> list[list[str]]:
    """Every row of ``keep``, and the rows of the other sites minus ``drop``-ped sites, with
    the labels of the rows at indices ``flip`` (of the others) changed."""
    header = files[keep].header
    num = header.index("num")
    others = [list(r) for s, f in files.items() if s != keep and s not in drop for r in f.rows]
    for i in flip:
        if others:
            row = others[i % len(others)]
            row[num] = "0" if row[num] != "0" else "3"
    return [*others[: len(others) // 2], *files[keep].rows, *others[len(others) // 2:]]


@settings(max_examples=15, deadline=None)
@given(keep=st.sampled_from(SITES), drop=st.lists(st.sampled_from(SITES), max_size=3),
       flip=st.lists(st.integers(0, 10_000), max_size=30), seed=st.integers(0, 2**32 - 1))
def test_a_sites_split_ignores_the_other_sites(
    raw_csv: Path, keep: str, drop: list[str], flip: list[int], seed: int
) -> None:
    cfg = config(raw_csv, f"seed={seed}")
    files = site_files(raw_csv)
    expected = _splits(raw_csv, cfg)[keep]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixed.csv"
        path.write_text(replace(files[keep], rows=_with_other_sites_changed(
            files, keep, drop, flip)).text())
        assert _splits(path, cfg)[keep] == expected


def test_the_split_depends_on_the_seed_and_the_site(raw_csv: Path) -> None:
    a = _splits(raw_csv, config(raw_csv, "seed=1"))
    b = _splits(raw_csv, config(raw_csv, "seed=2"))
    assert all(a[s] != b[s] for s in SITES)


def test_another_sites_row_is_refused_naming_site_and_file(raw_csv: Path, tmp_path: Path
                                                           ) -> None:
    files = site_files(raw_csv)
    stray = files["Cleveland"].rows[0]
    path = write(tmp_path, files["Hungary"], [*files["Hungary"].rows, stray])
    with pytest.raises(DataError, match=r"site 'Hungary'.*heart_disease_uci\.csv.*1 of 294 "
                                        r"row\(s\) belong to another site") as err:
        site_client_data(config(raw_csv), path, "Hungary")
    assert "\n" not in str(err.value)
    # the file of Hungary is not Cleveland's either
    with pytest.raises(DataError, match="293 of 293"):
        site_client_data(config(raw_csv), write(tmp_path, files["Hungary"]), "Cleveland")


@pytest.mark.parametrize("content", ["", "HEADER", "MISSING"])
def test_empty_or_missing_file_is_refused_naming_the_site(
    raw_csv: Path, tmp_path: Path, content: str
) -> None:
    path = tmp_path / "site.csv"
    if content == "HEADER":
        path.write_text(site_files(raw_csv)["Switzerland"].text().splitlines()[0] + "\n")
    elif content == "":
        path.write_text("")
    with pytest.raises(DataError, match=r"site 'Switzerland', file .*site\.csv: ") as err:
        site_client_data(config(raw_csv), path, "Switzerland")
    assert "\n" not in str(err.value)


def test_site_data_needs_by_site(raw_csv: Path, tmp_path: Path) -> None:
    path = write(tmp_path, site_files(raw_csv)["Hungary"])
    with pytest.raises(ConfigError, match="by_site"):
        site_client_data(config(raw_csv, "data.partition=by_patient"), path, "Hungary")


def test_slugs() -> None:
    assert [site_slug(s) for s in SITES] == ["cleveland", "hungary", "switzerland",
                                             "va-long-beach"]
    assert site_slug("  St. Mary's / North ") == "st-mary-s-north"


def test_validation_summary_holds_counts_not_values(raw_csv: Path, tmp_path: Path) -> None:
    files = site_files(raw_csv)
    hungary = files["Hungary"]
    rows = [list(r) for r in hungary.rows]
    col = hungary.header.index
    rows[3][col("age")] = "153.25"  # out of range
    rows[4][col("cp")] = "zebra pain"  # not a category
    rows[5][col("chol")] = "qwerty"  # not a number
    rows[6][col("id")] = "987654321"
    rows[7][col("id")] = "987654321"  # a duplicate patient id
    path = write(tmp_path, hungary, [*rows, files["VA Long Beach"].rows[0]])
    report, summary = validate_site_file(config(raw_csv), path, "Hungary")
    assert not report.success and report.site == "Hungary"
    # the full report, which stays at the site, quotes the values
    for value in ("153.25", "zebra pain", "qwerty", "987654321"):
        assert value in report.message()
    text = json.dumps(summary)
    for value in ("153.25", "zebra pain", "qwerty", "987654321", str(path), "VA Long Beach"):
        assert value not in text, value
    assert summary["passed"] is False and summary["site"] == "Hungary"
    assert summary["rows"] == 294 and summary["patients"] == 292  # Hungary's: one id twice
    failed = {(f["expectation"], f["column"]): f for f in summary["failures"]}
    age = failed[("expect_column_values_to_be_between", "age")]
    assert (age["unexpected_count"], age["element_count"]) == (1, 293)
    assert "'age' must lie in [18.0, 100.0] in Hungary" in age["detail"]
    assert failed[("expect_column_values_to_be_in_set", "cp")]["unexpected_count"] == 1
    assert failed[("expect_column_values_to_match_regex", "chol")]["unexpected_count"] == 1
    assert failed[("expect_column_values_to_be_unique", "id")]["unexpected_count"] == 2
    other = failed[("file_rows_of_one_site", "dataset")]
    assert (other["unexpected_count"], other["element_count"]) == (1, 294)
    assert set(summary) == {"passed", "site", "rows", "patients", "failures"}
    assert all(set(f) == {"expectation", "column", "unexpected_count", "element_count",
                          "detail"} for f in summary["failures"])


def test_validation_summary_of_a_good_and_of_a_missing_file(raw_csv: Path, tmp_path: Path
                                                           ) -> None:
    path = write(tmp_path, site_files(raw_csv)["Switzerland"])
    report, summary = validate_site_file(config(raw_csv), path, "Switzerland")
    assert report.success
    assert summary == {"passed": True, "site": "Switzerland", "rows": 123, "patients": 123,
                       "failures": []}
    _, summary = validate_site_file(config(raw_csv), tmp_path / "gone.csv", "Switzerland")
    assert summary["passed"] is False and summary["rows"] is None
    assert summary["failures"] == [{"expectation": "file_exists", "column": None,
                                    "unexpected_count": None, "element_count": None,
                                    "detail": "the data file does not exist"}]


def _rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.slow
def test_split_sites_cli(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "split-sites", "--root", str(project),
         "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    written = sorted(out.glob("*/*.csv"))
    slugs = ("cleveland", "hungary", "switzerland", "va-long-beach")
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*")) == [
        f"{slug}/{name}" for slug in slugs for name in ("heart_disease_uci.csv", "site.yaml")]
    # each folder's site.yaml names its site and its own file, nothing else's
    for slug, site in zip(slugs, ("Cleveland", "Hungary", "Switzerland", "VA Long Beach"),
                          strict=True):
        text = (out / slug / "site.yaml").read_text()
        assert f"site: {site}" in text and "data: heart_disease_uci.csv" in text
        assert f"key: {slug}.key" in text
    assert "federation.sites for these files: --set 'federation.sites=[{id: \"Cleveland\"}" \
        in done.stdout
    original = _rows(project / "data" / "raw" / "heart_disease_uci.csv")
    parts = {p.parent.name: _rows(p) for p in written}
    assert all(rows[0] == original[0] for rows in parts.values())
    site = original[0].index("dataset")
    assert all({r[site] for r in rows[1:]} == {name} for name, rows in zip(
        ("Cleveland", "Hungary", "Switzerland", "VA Long Beach"),
        (parts[s] for s in ("cleveland", "hungary", "switzerland", "va-long-beach")),
        strict=True))
    # in file order: the embedded file lists its sites one after another
    assert [r for s in sorted(parts) for r in parts[s][1:]] == original[1:]
    assert "VA Long Beach: 200 rows, 200 patients ->" in done.stdout
    # exit 3 for a file that cannot be split, exit 2 for a bad configuration
    bad = subprocess.run(
        [sys.executable, "-m", "flows.cli", "split-sites", "--root", str(project),
         "--set", "data.path=data/raw/nope.csv"], capture_output=True, text=True, env=env,
        timeout=120)
    assert bad.returncode == 3 and "nope.csv" in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "flows.cli", "split-sites", "--root", str(project),
         "--set", "seed=-1"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2, bad.stderr
