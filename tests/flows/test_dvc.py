"""`dvc repro` runs the same stages in a fresh checkout, and a second repro does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_dvc_repro_twice(tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    files = [f for f in listed.stdout.splitlines() if f] if listed.returncode == 0 else []
    if not files:  # not a git checkout: copy what the pipeline needs
        folders = ("fl_core", "tasks", "flows", "data/raw", "data/schemas", ".dvc")
        files = [str(p.relative_to(ROOT)) for d in folders
                 for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        files += ["params.yaml", "dvc.yaml", ".dvcignore"]
    for rel in files:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    # a smaller recipe than the shipped one (20 rounds, 8 shadows): what is tested is DVC's
    # stages, caching and experiments, not the recipe
    params = (repo / "params.yaml").read_text()
    assert "\nrounds: 20" in params and "shadow_models: 8 " in params
    (repo / "params.yaml").write_text(params.replace("\nrounds: 20", "\nrounds: 5")
                                      .replace("shadow_models: 8 ", "shadow_models: 2 "))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DO_NOT_TRACK": "1",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "fresh"], cwd=repo, check=True, env=env)

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=600)

    first = dvc("repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("validate", "partition", "train", "audit", "publish"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["rounds"] == 5 and metrics["accuracy"] > 0.5

    second = dvc("repro")
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout

    shown = dvc("metrics", "show", "--json")
    assert shown.returncode == 0 and "mia_auc" in shown.stdout
    # the DVC pipeline does not register unless mlflow.register_from_dvc (it still charges)
    registration = json.loads((repo / "reports" / "registration.json").read_text())
    assert registration["registered"] is False and registration["model_version"] is None
    assert not (repo / ".fedpriv" / "mlflow.db").exists()

    # an experiment compares: its metrics show in `dvc exp show`
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True, env=env)
    exp = dvc("exp", "run", "-S", "rounds=3", "-S", "audit.shadow_models=2")
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-2000:]
    table = dvc("exp", "show", "--json")
    assert table.returncode == 0, table.stderr[-2000:]
    rounds = [m["rounds"] for m in _metrics_of(json.loads(table.stdout))]
    assert 3 in rounds and 5 in rounds, table.stdout[:3000]


def _metrics_of(node: object) -> list[dict]:
    """Every metrics.json payload anywhere in `dvc exp show --json` (its layout differs
    between DVC versions): dicts that carry a "rounds" figure."""
    found: list[dict] = []
    if isinstance(node, dict):
        if "rounds" in node and "accuracy" in node:
            found.append(node)
        for value in node.values():
            found += _metrics_of(value)
    elif isinstance(node, list):
        for value in node:
            found += _metrics_of(value)
    return found
