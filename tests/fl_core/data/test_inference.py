"""`fedpriv schema infer` drafts a schema that loads and validates; expected data errors are
one short line and exit 3, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.config_files import load_config
from adapters.schema_files import infer_schema_file, load_schema
from fl_core.data.inference import InferenceError, SchemaDraft, infer_schema, widened_range
from tests.conftest import data_config

ROOT = Path(__file__).resolve().parents[3]
HEART_ARGS = ["--patient-id", "id", "--site", "dataset", "--label", "num"]


def cli(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def heart_draft(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The draft of the embedded heart CSV, written by the CLI, and what it printed."""
    out = tmp_path_factory.mktemp("draft") / "heart-draft.yaml"
    done = cli("schema", "infer", str(ROOT / "data/raw/heart_disease_uci.csv"), *HEART_ARGS,
               "--positive-if", "> 0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done.stdout


@pytest.mark.slow
def test_heart_draft_guesses(heart_draft: tuple[Path, str]) -> None:
    path, printed = heart_draft
    spec = load_schema(path)
    assert (spec.patient_id, spec.site, spec.label.column) == ("id", "dataset", "num")
    assert spec.label.positive_if == "> 0" and spec.label.values == ["0", "1", "2", "3", "4"]
    assert spec.sites == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    age = spec.feature("age")
    assert age.type in ("integer", "numeric") and age.low <= 28 and age.high >= 77
    assert age.low >= 18 and age.high <= 90  # widened by a margin, not unbounded
    sex = spec.feature("sex")
    assert sex.type == "categorical" and sex.categories == ["Female", "Male"]
    fbs = spec.feature("fbs")
    assert fbs.type == "boolean" and fbs.tokens == ("FALSE", "TRUE")
    assert spec.missing_limit("fbs") >= 0.61  # Switzerland: 61 % empty
    chol = spec.feature("chol")
    assert chol.numeric and chol.low == 0 and chol.high >= 603
    assert "chol has 172 zeros" in printed and "missing_values: [0]" in printed
    text = path.read_text()
    assert "# age: guessed: integer, observed 28..77, margin 10%" in text
    assert "CHECK: chol has 172 zeros" in text
    assert spec.ignore == ["ca", "thal"]  # recorded for 34 % and 47 % of patients
    assert "# ca: near-empty: not recorded in 66% of rows; suggested ignore" in text


def test_heart_draft_round_trips(heart_draft: tuple[Path, str], raw_csv: Path) -> None:
    from adapters.gx_validation import validate_file

    path, _ = heart_draft
    cfg = load_config(ROOT / "params.yaml", [f"data.schema={path}", f"data.path={raw_csv}"])
    assert cfg.data.spec.id == "heart_disease_uci"
    report = validate_file(raw_csv, cfg.data)
    assert report.success, report.message()
    # ... and trains: partition and two federated DP rounds on the drafted schema (reviewed:
    # the draft ignores the near-empty ca/thal but keeps slope and fbs, empty for most of a
    # site, so incomplete patients are filled by the declared fill instead of dropped)
    from adapters.tables import ClinicalTable
    from fl_core.federation.wiring import federate, make_dpsgd

    cfg = load_config(ROOT / "params.yaml", [f"data.schema={path}", f"data.path={raw_csv}",
                                             "data.drop_incomplete=false", "rounds=2",
                                             "privacy.randomness=reproducible"])
    data = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, cfg.seed)[0]
    assert len(data) == 4 and data[0].x_train.shape[1] >= 10
    run = federate(cfg, data, dp=make_dpsgd(cfg=cfg, data=data))
    assert run.result.history[-1].accuracy > 0.6 and run.dp is not None


def test_identifiers_and_free_text_are_ignored(tmp_path: Path) -> None:
    n = 40
    frame = pd.DataFrame({
        "pid": range(1000, 1000 + n),
        "hospital": ["A", "B"] * (n // 2),
        "name": [f"Patient Name {i}" for i in range(n)],          # unique per row
        "note": [f"free text {i % 25}" for i in range(n)],        # 25 distinct: too many
        "smoker": ["yes", "no", "no", "yes"] * (n // 4),
        "flag01": [0, 1] * (n // 2),
        "grade": ["low", "mid", "high", "mid"] * (n // 4),
        "bmi": [18.5 + 0.37 * i for i in range(n)],
        "outcome": ["sick", "well"] * (n // 2),
    })
    frame.loc[3, "bmi"] = None
    csv = tmp_path / "mine.csv"
    frame.to_csv(csv, index=False)
    draft = infer_schema_file(csv, patient_id="pid", site="hospital", label="outcome",
                         positive_values=["sick"])
    spec = draft.schema
    assert spec.ignore == ["name", "note"]
    reasons = {g.name: g.comment for g in draft.columns if g.spec is None}
    assert "name or identifier" in reasons["name"] and "25 distinct" in reasons["note"]
    assert "name or identifier" in draft.yaml_text()
    assert spec.feature("smoker").tokens == ("no", "yes")
    assert spec.feature("flag01").tokens == ("0", "1")
    assert spec.feature("grade").categories == ["high", "low", "mid"]
    bmi = spec.feature("bmi")
    assert bmi.type == "numeric" and bmi.low <= 18.5 and bmi.high >= 18.5 + 0.37 * 39
    assert spec.missing_limit("bmi") == pytest.approx(0.1)  # 1 of 20 at site A: 5 % -> 10 %
    from adapters.gx_validation import validate_file

    (tmp_path / "mine.yaml").write_text(draft.yaml_text())
    data = data_config(path=str(csv), spec=load_schema(tmp_path / "mine.yaml"))
    report = validate_file(csv, data)
    assert report.success, report.message()


def test_repeated_patient_ids_draft_several_records_per_patient(tmp_path: Path) -> None:
    from adapters.gx_validation import validate_file

    n = 40
    frame = pd.DataFrame({"pid": [1000 + i // 2 for i in range(n)],   # two rows each
                          "hospital": ["A"] * 20 + ["B"] * 20,
                          "bmi": [18.5 + 0.37 * i for i in range(n)],
                          "outcome": ["sick", "well", "well", "well"] * (n // 4)})
    csv = tmp_path / "visits.csv"
    frame.to_csv(csv, index=False)
    draft = infer_schema_file(csv, patient_id="pid", site="hospital", label="outcome",
                         positive_values=["sick"])
    assert draft.schema.records_per_patient == "many"
    assert any("20 row(s) repeat a patient id" in n for n in draft.notes)
    assert "records_per_patient: many" in draft.yaml_text()
    (tmp_path / "visits.yaml").write_text(draft.yaml_text())
    data = data_config(path=str(csv), spec=load_schema(tmp_path / "visits.yaml"))
    assert validate_file(csv, data).success
    frame.drop_duplicates("pid").to_csv(csv, index=False)
    assert infer_schema_file(csv, patient_id="pid", site="hospital", label="outcome",
                        positive_values=["sick"]).schema.records_per_patient == "one"


@pytest.mark.slow
def test_one_class_label_is_refused(tmp_path: Path) -> None:
    done = cli("schema", "infer", str(ROOT / "data/raw/heart_disease_uci.csv"), *HEART_ARGS,
               "--positive-if", "> 4", "--out", str(tmp_path / "x.yaml"))
    assert done.returncode == 2
    assert "gives one class only (0 positive, 920 negative" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "x.yaml").exists()
    done = cli("schema", "infer", str(ROOT / "data/raw/heart_disease_uci.csv"),
               "--patient-id", "pid", "--site", "dataset", "--label", "num",
               "--positive-if", "> 0", "--out", str(tmp_path / "x.yaml"))
    assert done.returncode == 2 and "--patient-id 'pid': no such column" in done.stderr
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InferenceError, match="empty") as caught:
        infer_schema_file(tmp_path / "empty.csv", patient_id="a", site="b", label="c")
    assert caught.value.exit_code == 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=12),
       st.booleans())
def test_drafted_range_contains_every_value(values: list[float], integer: bool) -> None:
    if integer:
        values = [float(round(v)) for v in values]
    low, high = widened_range(min(values), max(values), integer=integer,
                              non_negative=min(values) >= 0)
    assert low < high and all(low <= v <= high for v in values)
    if min(values) >= 0:
        assert low >= 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(-1e4, 1e4, allow_nan=False).map(lambda v: round(v, 3)),
                          st.integers(0, 500)), min_size=2, max_size=15))
@pytest.mark.slow
def test_draft_of_random_numeric_frame_validates(tmp_path: Path,
                                                 rows: list[tuple[float, int]]) -> None:
    from adapters.gx_validation import validate_file

    frame = pd.DataFrame({"pid": range(len(rows)), "site": "S",
                          "x": [r[0] for r in rows], "k": [r[1] for r in rows],
                          "y": [i % 2 for i in range(len(rows))]})
    csv = tmp_path / "r.csv"
    frame.to_csv(csv, index=False)
    draft = infer_schema_file(csv, patient_id="pid", site="site", label="y", positive_if="> 0")
    spec = draft.schema
    for col in ("x", "k"):
        if col in spec.features and spec.feature(col).numeric:
            f = spec.feature(col)
            assert f.low <= frame[col].min() and frame[col].max() <= f.high
    report = validate_file(csv, data_config(path=str(csv), spec=spec))
    assert report.success, report.message()


# ------------------------------------------------------------------------------ short errors
def _bad_project(project: Path) -> dict[str, list[str]]:
    """Each expected data error as --set overrides on ``project``."""
    raw = project / "data" / "raw" / "heart_disease_uci.csv"
    lines = raw.read_text().splitlines(keepends=True)
    (project / "header.csv").write_text(lines[0])
    (project / "empty.csv").write_text("")
    (project / "noid.csv").write_text("".join(",".join(line.split(",")[1:]) for line in lines))
    return {"header-only": ["--set", "data.path=header.csv"],
            "empty": ["--set", "data.path=empty.csv"],
            "no patient id": ["--set", "data.path=noid.csv"],
            "one class": ["--set", 'schema.label.positive_if="> 10"'],
            "range excludes all": ["--set", "schema.features.age.low=200", "--set",
                                   "schema.features.age.high=300", "--set",
                                   "schema.features.age.fill=250"],
            "type parses nothing": ["--set", "schema.features.sex={type: numeric, low: 0, "
                                             "high: 1}"]}


# (exit code, what stderr says): 3 for a file that is not data, 2 for a schema the data
# contradict as a whole (the schema key named)
EXPECTED = {"header-only": (3, "has a header but no data rows"),
            "empty": (3, "is empty (0 bytes)"),
            "no patient id": (2, "(data.schema): patient_id: required column 'id' is missing"),
            "one class": (2, "(data.schema): label.positive_if: the label rule '> 10' makes "
                             "all 920 labelled rows negative: one class"),
            "range excludes all": (2, "(data.schema): features.age.low/high: the declared "
                                      "range [200, 300] excludes all 920 values of 'age' "
                                      "(observed 28 to 77)"),
            "type parses nothing": (2, "(data.schema): features.sex.type: declared numeric, "
                                       "but none of the 920 values of 'sex' is a number"
                                       " (found e.g. ['Male', 'Female'])")}


@pytest.mark.slow
@pytest.mark.parametrize("command", [["stage", "validate"], ["run"]])
def test_data_errors_are_one_short_line(project: Path, command: list[str]) -> None:
    for case, overrides in _bad_project(project).items():
        done = cli(*command, "--root", str(project), *overrides, cwd=project)
        code, text = EXPECTED[case]
        assert done.returncode == code, (case, done.stderr)
        assert "Traceback" not in done.stderr, case
        assert len(done.stderr.splitlines()) <= 5, (case, done.stderr)
        kind = "data error" if code == 3 else "configuration error"
        assert f"fedpriv: {kind}: " in done.stderr and text in done.stderr, case
    assert not (project / ".fedpriv" / "runs").exists() or \
        not any((project / ".fedpriv" / "runs").iterdir())  # refused before the flow started


def test_expected_errors_lose_their_traceback_in_prefect_logs() -> None:
    import logging

    from fl_core.data.tables import DataError
    from flows.pipeline import BriefExpectedErrors

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                                     "Encountered exception during execution: %r", (exc,),
                                     sys.exc_info())

    brief = BriefExpectedErrors()
    expected, other = record(DataError("bad")), record(RuntimeError("bug"))
    assert brief.filter(expected) and expected.exc_info is None
    assert brief.filter(other) and other.exc_info is not None  # a bug keeps its traceback


@pytest.mark.slow
def test_a_failure_inside_the_flow_has_no_traceback(project: Path) -> None:
    """An out-of-range value fails the GX suites inside the Prefect flow: exit 3, and Prefect
    logs the failed run in one line instead of an 80-line traceback."""
    raw = project / "data" / "raw" / "heart_disease_uci.csv"
    lines = raw.read_text().splitlines(keepends=True)
    cells = lines[5].split(",")
    cells[1] = "150"  # age
    lines[5] = ",".join(cells)
    (project / "range.csv").write_text("".join(lines))
    done = cli("run", "--root", str(project), "--set", "data.path=range.csv", cwd=project,
               timeout=400)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert "'age' must lie in [18.0, 100.0] in Cleveland" in done.stderr
    assert len(done.stderr.splitlines()) <= 15, done.stderr  # 81 with the traceback


# ------------------------------------------------------------------------------ reviewer checks
def _draft(frame: pd.DataFrame, **roles: object) -> SchemaDraft:
    """The draft of ``frame`` as ``read_table`` gives it (text columns, empty cells missing)."""
    text = frame.astype(str).where(frame.notna())
    args = {"patient_id": "pid", "site": "hospital", "label": "outcome",
            "positive_values": ["1"], **roles}
    return infer_schema(text, "mine.csv", **args)  # type: ignore[arg-type]


def _frame(n: int = 60, seed: int = 0, positive_share: float = 0.5) -> pd.DataFrame:
    """``n`` patients at two sites, a label with ``positive_share`` positives, and two
    features that do not predict it."""
    rng = np.random.default_rng(seed)
    outcome = ((np.arange(n) // 2) % round(1 / positive_share) == 0).astype(int)  # both sites
    return pd.DataFrame({"pid": rng.permutation(np.arange(5000, 5000 + n)),
                         "hospital": ["A", "B"] * (n // 2),
                         "age": rng.integers(30, 80, n),
                         "bmi": np.round(rng.normal(25, 4, n), 1),
                         "outcome": outcome})


def _comments(draft: SchemaDraft) -> dict[str, str]:
    return {g.name: g.comment for g in draft.columns}


def test_row_number_and_index_columns_are_ignored_with_why() -> None:
    frame = _frame()
    frame.insert(0, "Unnamed: 0", range(1, len(frame) + 1))  # R's write.csv row names
    frame["rowid"] = range(len(frame))                       # 0..n-1
    frame["visit"] = np.arange(len(frame)) // 2 + 1          # repeats: not a row number
    draft = _draft(frame)
    assert draft.schema.ignore == ["Unnamed: 0", "rowid"]
    assert "a row number or index" in _comments(draft)["rowid"]
    assert "# rowid: consecutive whole numbers 0..59 in file order" in draft.yaml_text()
    assert "visit" in draft.schema.features


def test_near_empty_column_is_suggested_for_ignore() -> None:
    frame = _frame()
    frame["lactate"] = np.where(np.arange(len(frame)) % 10 < 7, np.nan, 1.5)  # 70 % empty
    frame["crp"] = np.where(np.arange(len(frame)) % 10 < 3, np.nan, 4.0 + np.arange(60))
    draft = _draft(frame)
    assert "lactate" in draft.schema.ignore and "crp" in draft.schema.features
    assert _comments(draft)["lactate"].startswith("near-empty: not recorded in 70% of rows")
    assert any(n.startswith("lactate: near-empty") for n in draft.notes)
    assert draft.schema.feature("crp").max_missing_rate < 1


def test_a_feature_that_alone_separates_the_labels_is_flagged_not_dropped() -> None:
    frame = _frame()
    frame["marker"] = np.where(frame["outcome"] == 1, 8.0, 2.0) + np.arange(60) / 100
    frame["ward"] = np.where(frame["outcome"] == 1, "icu", "general")
    draft = _draft(frame)
    assert {"marker", "ward"} <= set(draft.schema.features)  # flagged, kept
    for name in ("marker", "ward"):
        assert _comments(draft)[name].endswith("CHECK leak")
        assert any(n.startswith(f"possible leak: {name} alone separates the label (AUC 1.000")
                   for n in draft.notes)
    assert not any("age" in n or "bmi" in n for n in draft.notes)
    assert "#   CHECK: possible leak: marker alone separates" in draft.yaml_text()


def test_time_columns_are_flagged_as_possibly_after_the_outcome() -> None:
    frame = _frame()
    rng = np.random.default_rng(1)
    for name in ("futime", "tstop", "days_to_event", "end_date", "gender"):
        frame[name] = rng.integers(1, 3000, len(frame))
    draft = _draft(frame)
    flagged = {g.name for g in draft.columns if "looks like a time" in " ".join(g.notes)}
    assert flagged == {"futime", "tstop", "days_to_event", "end_date"}  # not 'gender'
    assert set(flagged) <= set(draft.schema.features)


def test_tiny_and_one_class_sites_are_flagged() -> None:
    frame = _frame()
    tiny = pd.DataFrame({"pid": [1, 2, 3], "hospital": "C", "age": [40, 50, 60],
                         "bmi": [22.0, 30.1, 27.3], "outcome": 0})
    draft = _draft(pd.concat([frame, tiny], ignore_index=True))
    assert draft.site_checks == (
        "site C: 3 patients, 0 positive and 3 negative rows: too small or one class to train "
        "and evaluate on; merge it into another site (site_groups) or leave its rows out",)
    text = draft.yaml_text()
    assert text.index("sites: [A, B, C]") < text.index("#   CHECK: site C: 3 patients")
    assert draft.schema.sites == ["A", "B", "C"]
    assert _draft(frame).site_checks == ()


def test_missing_tokens_become_missing_values(tmp_path: Path) -> None:
    from adapters.gx_validation import validate_file

    frame = _frame().astype(object)
    frame["asa"] = ["I", "II", "III"] * 20
    frame.loc[[3, 8], "asa"] = "NA_NA"
    frame.loc[[4], "age"] = "."
    frame.loc[[5], "bmi"] = "-"
    draft = _draft(frame)
    spec = draft.schema
    assert spec.feature("asa").missing_values == ["NA_NA"]
    assert spec.feature("asa").categories == ["I", "II", "III"]
    assert spec.feature("age").type == "integer" and spec.feature("age").missing_values == ["."]
    assert spec.feature("bmi").type == "numeric" and spec.feature("bmi").missing_values == ["-"]
    assert "['NA_NA'] mean not recorded -> missing_values" in _comments(draft)["asa"]
    # tokens pandas does not already read as empty are kept as written ("NA", "null" too,
    # for a frame that did not come through read_csv)
    frame.loc[[6], "asa"], frame.loc[[7], "asa"] = "NA", "null"
    assert _draft(frame).schema.feature("asa").missing_values == ["NA", "NA_NA", "null"]
    # the draft validates the file it came from: the tokens are recorded values
    csv = tmp_path / "tokens.csv"
    frame.loc[[6, 7], "asa"] = "I"
    frame.to_csv(csv, index=False)
    (tmp_path / "tokens.yaml").write_text(infer_schema_file(
        csv, patient_id="pid", site="hospital", label="outcome",
        positive_values=["1"]).yaml_text())
    report = validate_file(csv, data_config(path=str(csv),
                                            spec=load_schema(tmp_path / "tokens.yaml")))
    assert report.success, report.message()


def test_zero_one_columns_are_drafted_as_booleans() -> None:
    frame = _frame()
    frame["diabetes"] = [0, 1, 1] * 20
    draft = _draft(frame)
    assert draft.schema.feature("diabetes").tokens == ("0", "1")
    assert _comments(draft)["diabetes"].startswith("guessed: boolean (1 = true)")


def test_zero_one_columns_with_blanks_are_booleans_not_zero_tokens() -> None:
    """pandas and R write a 0/1 column with empty cells as 0.0/1.0: still a boolean, and its
    zeros are not proposed as a "not measured" token (opt's V3.Antibio)."""
    frame = _frame()
    frame["antibiotics"] = ["0.0", "1.0", "0.0", None] * 15
    draft = _draft(frame)
    assert draft.schema.feature("antibiotics").tokens == ("0.0", "1.0")
    assert "CHECK zeros" not in _comments(draft)["antibiotics"]


def test_class_imbalance_suggests_gate_settings() -> None:
    draft = _draft(_frame(n=100, positive_share=0.1))
    assert draft.label_checks == (
        "imbalanced label: 10 positive of 100 rows (10%); judge the model by AUC / balanced "
        "accuracy, not accuracy (gate.min_auc_lower, gate.min_balanced_accuracy_lower; leave "
        "gate.min_accuracy off) and expect few positives per site "
        "(gate.min_test_positives/negatives)",)
    text = draft.yaml_text()
    assert text.index("label: ") < text.index("#   CHECK: imbalanced label")
    assert _draft(_frame(n=100, positive_share=0.5)).label_checks == ()


@pytest.mark.parametrize(("n", "share", "says"), [
    # 1000 patients, half positive: 200 test patients, 100 of each class
    (1000, 0.5, "meet the gate's minimums"),
    # 200 patients, 1 in 10 positive: 4 positive test patients at 0.2; 0.5 gives 10
    (200, 0.1, "--set data.test_fraction=0.5"),
    # 60 patients, 1 in 10 positive: 6 positive patients in all, no split gives 10
    (60, 0.1, "no model on this table can be promoted"),
])
def test_the_draft_proposes_the_gate_this_table_can_meet(n: int, share: float, says: str) -> None:
    """The test set the default split would give against the gate's minimums: the split that
    meets them, never lower minimums; when met, the AUC a model needs to pass its bound."""
    draft = _draft(_frame(n=n, positive_share=share))
    (line,) = draft.gate_checks
    assert says in line and line in draft.summary() and f"#   {line}" in draft.yaml_text()
    assert "min_test_positives 10" in line  # the minimums named, never proposed lower
    if n == 1000:
        # 100 + 100 test patients: the bound of an AUC near 0.75 is 0.06 below it
        assert "bound about 0.06 lower" in line and "needs AUC 0.66 or more" in line


def test_a_row_number_with_gaps_is_ignored_by_its_name_only() -> None:
    """nwtco's ``rownames`` run 1..4088 over 4,028 rows (rows removed after numbering): a row
    number by its name; the same increasing numbers under a clinical name stay a feature."""
    frame = _frame()
    gaps = np.cumsum(np.where(np.arange(60) % 7 == 3, 2, 1))
    frame["rownames"] = gaps
    frame["dose_mg"] = gaps
    draft = _draft(frame)
    assert "rownames" in draft.schema.ignore and "dose_mg" in draft.schema.features
    assert "named like a row number" in _comments(draft)["rownames"]


def test_a_strong_single_predictor_is_flagged_as_a_possible_leak() -> None:
    """A follow-up time (nwtco's ``edrel``: AUC 0.95 alone) under a name that says nothing of
    time: flagged by how well it separates the labels."""
    frame = _frame(n=200)
    rng = np.random.default_rng(2)
    frame["edrel"] = np.where(frame["outcome"] == 1, rng.integers(100, 1500, 200),
                              rng.integers(1000, 6000, 200))
    draft = _draft(frame)
    assert "edrel" in draft.schema.features and _comments(draft)["edrel"].endswith("CHECK leak")
    assert any(n.startswith("possible leak: edrel alone separates the label (AUC 0.9")
               for n in draft.notes)
