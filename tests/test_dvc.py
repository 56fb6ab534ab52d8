"""`dvc repro` runs the same stages in a fresh checkout, and a second repro does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


def test_dvc_repro_twice(tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    files = [f for f in listed.stdout.splitlines() if f] if listed.returncode == 0 else []
    if not files:  # not a git checkout: copy what the pipeline needs
        files = [str(p.relative_to(ROOT)) for d in ("fl_core", "tasks", "flows", "data/raw", ".dvc")
                 for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        files += ["params.yaml", "dvc.yaml", ".dvcignore"]
    for rel in files:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
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
    for stage in ("validate", "partition", "train", "audit", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["rounds"] == 20 and metrics["accuracy"] > 0.5

    second = dvc("repro")
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout

    shown = dvc("metrics", "show", "--json")
    assert shown.returncode == 0 and "mia_auc" in shown.stdout
