"""The registered model as MLflow serves it: raw CSV rows in, P(disease) out, bad rows refused.

One pipeline run (validate → partition → train → audit → publish, 2 rounds) registers
``fedpriv-heart@challenger`` in a temporary project; the tests load it through ``models:/``
(in-process, and behind ``mlflow models serve``) and compare with the torch network applied
to the declared transform directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from tests.conftest import RAW_CSV, ROOT
from tests.servers import BIN, free_port

URI = "models:/fedpriv-heart@challenger"
# a 2-round model is served here, not judged: the gate's evaluation rules off
OVERRIDES = ["rounds=2", "audit.shadow_models=2", "gate.min_accuracy=0",
             "gate.min_auc_lower=0", "gate.min_balanced_accuracy_lower=0"]
NUMERIC = ["age", "trestbps", "chol", "thalch", "oldpeak"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A temp project with one registered run; its store URI, config and model file."""
    from adapters.artifacts import Paths
    from adapters.audit import audit_model
    from adapters.config_files import load_config
    from adapters.partition import partition_data
    from adapters.publish import publish_results
    from adapters.train import train_model
    from adapters.validate import validate_data

    project = tmp_path_factory.mktemp("serving-project")
    (project / "data" / "raw").mkdir(parents=True)
    shutil.copy(RAW_CSV, project / "data" / "raw" / RAW_CSV.name)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    cfg = load_config(project / "params.yaml", OVERRIDES)
    for stage in (validate_data, partition_data, train_model, audit_model):
        stage(cfg, project)
    out = publish_results(cfg, project)
    assert "challenger" in out.registration.aliases
    uri = f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}"
    return {"project": project, "cfg": cfg, "uri": uri,
            "model_file": Paths.of(cfg, project).model,
            "aliases": out.registration.aliases}


@contextmanager
def store(uri: str) -> Iterator[None]:
    """``models:/`` resolves through MLflow's global URIs: set them, then put them back."""
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def raw_rows(n: int, start: int = 0) -> pd.DataFrame:
    """``n`` complete rows of the CSV, the feature columns as the file has them."""
    from adapters.config_files import load_config

    features = load_config(ROOT / "params.yaml", []).data.features
    frame = pd.read_csv(RAW_CSV)[list(features)].dropna()
    return frame.iloc[start:start + n].reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 500])
def test_the_champion_scores_raw_rows_like_the_network(registered: dict[str, Any],
                                                        n: int) -> None:
    """``models:/…@champion`` on 1, 2 and 500 rows straight from the CSV: the probabilities
    the pipeline's own network gives them through the declared transform."""
    import mlflow.pyfunc

    from adapters.serving import as_model_input
    from adapters.train import load_model
    from fl_core.data.transform import TabularTransform

    assert "champion" in registered["aliases"]
    with store(registered["uri"]):
        loaded = mlflow.pyfunc.load_model("models:/fedpriv-heart@champion")
    rows = raw_rows(n)
    assert len(rows) == n
    model_input = as_model_input(rows, loaded.unwrap_python_model().transform)
    assert model_input["sex"].tolist() == rows["sex"].tolist()  # raw strings, not encodings
    probabilities = loaded.predict(model_input)
    assert len(probabilities) == n
    assert all(0.0 <= p <= 1.0 for p in probabilities)

    network, _ = load_model(registered["model_file"])
    transform = TabularTransform.from_config(registered["cfg"].data)
    with torch.no_grad():
        expected = torch.sigmoid(network.eval()(transform.transform(rows))).double().numpy()
    assert list(probabilities) == pytest.approx(list(expected), abs=1e-5)
    assert loaded.metadata.get_input_schema().input_names() == list(transform.features)


@pytest.mark.slow
def test_chol_zero_is_the_declared_not_measured(registered: dict[str, Any]) -> None:
    import mlflow.pyfunc

    from adapters.serving import as_model_input

    with store(registered["uri"]):
        loaded = mlflow.pyfunc.load_model(URI)
    transform = loaded.unwrap_python_model().transform
    rows = as_model_input(raw_rows(2), transform)
    zero, empty = rows.copy(), rows.copy().astype({"chol": object})
    zero["chol"] = 0.0
    empty["chol"] = None
    missing_sex = rows.copy()
    missing_sex["sex"] = None
    female = rows.copy()
    female["sex"] = "Female"  # data.missing_category.sex
    assert list(loaded.predict(zero)) == pytest.approx(list(loaded.predict(empty)), abs=1e-12)
    assert list(loaded.predict(missing_sex)) == pytest.approx(list(loaded.predict(female)))


@pytest.mark.slow
def test_the_registry_holds_source_not_a_pickle(registered: dict[str, Any]) -> None:
    """The version is a model from code: its files are the model code, the fedpriv sources,
    the weights (loaded with ``weights_only``) and JSON; no pickled Python object."""
    import mlflow
    import yaml

    with store(registered["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(URI))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("pyfunc_model.py")
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert {"artifacts/model.pt", "artifacts/transform.json"} <= files, files


@pytest.mark.parametrize(("column", "value", "says"), [
    ("age", 300.0, "outside the declared range [18, 100]"),
    ("cp", "banana", "unknown value 'banana'"),
    ("thalch", None, "missing value (required)"),
    ("exang", "maybe", "unknown value 'maybe'"),
])
@pytest.mark.slow
def test_bad_rows_are_refused_naming_row_and_column(
    registered: dict[str, Any], column: str, value: Any, says: str
) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from adapters.serving import as_model_input

    with store(registered["uri"]):
        loaded = mlflow.pyfunc.load_model(URI)
    rows = as_model_input(raw_rows(3), loaded.unwrap_python_model().transform).astype(
        {column: object})
    rows.loc[1, column] = value
    with pytest.raises(MlflowException) as caught:
        loaded.predict(rows)
    message = str(caught.value)
    assert f"row 1, column '{column}'" in message and says in message
    assert "row 0" not in message and "row 2" not in message


def _heart_transform() -> Any:
    from adapters.config_files import load_config
    from fl_core.data.transform import TabularTransform

    return TabularTransform.from_config(load_config(ROOT / "params.yaml", []).data)


def _as_zero_one(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the boolean columns written as 0/1, as many exports do."""
    out = frame.copy()
    for col in ("fbs", "exang"):
        out[col] = out[col].map(lambda v: int(str(v).upper() == "TRUE"))
    return out


def test_validation_takes_booleans_as_zero_one_bool_or_text() -> None:
    """0/1 as numbers or text, bools and the tokens in any case are the same cell; a category
    a CSV reader typed as a number is its text."""
    from adapters.serving import validated_rows

    transform = _heart_transform()
    rows = raw_rows(4)
    expected = validated_rows(rows.astype({"fbs": str, "exang": str}), transform)
    zero_one = _as_zero_one(rows)
    variants = [zero_one, zero_one.astype({"fbs": str, "exang": str}),
                zero_one.astype({"fbs": bool, "exang": bool}),
                zero_one.astype({"fbs": float, "exang": float}),
                rows.assign(fbs=rows["fbs"].astype(str).str.lower())]
    for variant in variants:
        pd.testing.assert_frame_equal(validated_rows(variant, transform), expected)


def test_a_refusal_names_the_bad_cell_and_no_other_row() -> None:
    """Row 3's bad value: the message names row 3 and its column; no other row's values, and
    MLflow cannot put the frame back in front of it (its scoring server rewrites
    ``message``)."""
    from adapters.serving import InvalidRowsError, validated_rows

    rows = _as_zero_one(raw_rows(6))
    rows.loc[3, "cp"] = "no such category"
    with pytest.raises(InvalidRowsError) as caught:
        validated_rows(rows, _heart_transform())
    error = caught.value
    error.message = f"Failed to predict data '{rows}'. \nError: {error.message}"
    body = json.dumps(error.serialize_as_json()) + str(error)
    assert "row 3, column 'cp'" in body and "Failed to predict" not in body
    _assert_no_other_row(body, rows, bad_row=3)


def _assert_no_other_row(body: str, rows: pd.DataFrame, bad_row: int) -> None:
    """None of the other rows' (all rows' for ``bad_row`` -1) distinctive values (age, blood
    pressure, cholesterol, max heart rate, ST depression) is a number in ``body``."""
    numbers = {float(n) for n in re.findall(r"\d+(?:\.\d+)?", body)}
    others = rows.drop(index=bad_row, errors="ignore")  # bad_row -1: every row
    distinctive = {float(v) for col in ("age", "trestbps", "chol", "thalch", "oldpeak")
                   for v in others[col] if float(v) > 5 or not float(v).is_integer()}
    assert len(distinctive) >= 10
    assert not numbers & distinctive, (sorted(numbers & distinctive), body)


@pytest.mark.slow
def test_predict_takes_a_frame_straight_from_read_csv(registered: dict[str, Any],
                                                       tmp_path: Path) -> None:
    """The consumer's call: ``predict(pd.read_csv(...))`` on a CSV written with integers and
    0/1 booleans, extra columns and another column order, and on the raw heart file itself;
    no project import. The probabilities are the network's on the same rows."""
    import mlflow.pyfunc

    from adapters.train import load_model

    with store(registered["uri"]):
        loaded = mlflow.pyfunc.load_model(URI)
    rows = raw_rows(20)
    written = _as_zero_one(rows).assign(id=range(20), note="x")
    written[list(reversed(written.columns))].to_csv(tmp_path / "rows.csv", index=False)
    frame = pd.read_csv(tmp_path / "rows.csv")
    assert frame["age"].dtype.kind == "i" and frame["fbs"].dtype.kind == "i"

    network, _ = load_model(registered["model_file"])
    transform = _heart_transform()
    with torch.no_grad():
        expected = torch.sigmoid(network.eval()(transform.transform(rows))).double().numpy()
    assert list(loaded.predict(frame)) == pytest.approx(list(expected), abs=1e-5)

    raw = pd.read_csv(RAW_CSV).dropna(subset=list(transform.features)).head(20)
    assert len(loaded.predict(raw)) == 20


# --- the scoring server ---------------------------------------------------------------------


def _post(url: str, records: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    return _post_body(url, json.dumps({"dataframe_records": records}).encode(),
                      "application/json")


def _post_body(url: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_ping(base: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}:\n"
                               + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{base}/ping not answering after {timeout}s")


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_models_serve_answers_raw_rows(registered: dict[str, Any], tmp_path: Path) -> None:
    assert "champion" in registered["aliases"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"],
           "MLFLOW_REGISTRY_URI": registered["uri"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("PYTHONPATH", None)  # the model carries its own code (code_paths)
    # the server runs `uvicorn` by name: the venv's bin/ must be on PATH (an activated venv)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/fedpriv-heart@champion",
         "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = _wait_ping(base, proc, log_path)
        print(f"mlflow models serve answered /ping after {started:.1f} s")
        records = json.loads(raw_rows(2).to_json(orient="records"))  # ints, "Male", true ...
        records[1]["fbs"] = "TRUE"  # strings as in the CSV
        status, answer = _post(f"{base}/invocations", records)
        assert status == 200, answer
        predictions = answer["predictions"]
        assert len(predictions) == 2 and all(0.0 <= p <= 1.0 for p in predictions)

        bad = [records[0], {**records[1], "cp": "banana"}]
        status, answer = _post(f"{base}/invocations", bad)
        assert status == 400, answer  # INVALID_PARAMETER_VALUE: the client's rows
        assert "row 1, column 'cp'" in answer["message"] and "banana" in answer["message"]
        status, answer = _post(f"{base}/invocations", [{**records[0], "thalch": None}])
        assert status == 400 and "row 0, column 'thalch': missing value" in answer["message"]
        status, answer = _post(f"{base}/invocations", [{**records[0], "age": 300}])
        assert status == 400 and "row 0, column 'age': 300 is outside" in answer["message"]

        rows = _as_zero_one(raw_rows(6))  # fbs/exang as JSON numbers 0/1
        zero_one = json.loads(rows.to_json(orient="records"))
        assert {r["fbs"] for r in zero_one} <= {0, 1}
        status, answer = _post(f"{base}/invocations", zero_one)
        assert status == 200, answer
        assert answer["predictions"] == pytest.approx(_post(f"{base}/invocations", json.loads(
            raw_rows(6).to_json(orient="records")))[1]["predictions"])

        split = json.dumps({"dataframe_split": json.loads(rows.to_json(orient="split",
                                                                        index=False))})
        status, answer = _post_body(f"{base}/invocations", split.encode(), "application/json")
        assert status == 200 and len(answer["predictions"]) == 6, answer
        # text/csv needs a typed signature in MLflow's parser (docs/serving.md): refused
        status, answer = _post_body(f"{base}/invocations", rows.to_csv(index=False).encode(),
                                    "text/csv")
        assert status == 400 and "Failed to get pandas types" in answer["message"], answer
        _assert_no_other_row(json.dumps(answer), rows, bad_row=-1)

        zero_one[3]["cp"] = "no such category"
        status, answer = _post(f"{base}/invocations", zero_one)
        assert status == 400, answer
        body = json.dumps(answer)
        assert "row 3, column 'cp'" in answer["message"], answer
        assert "Failed to predict data" not in body
        _assert_no_other_row(body, rows, bad_row=3)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
