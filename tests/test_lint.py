"""`make lint` enforces the stated rules: it fails on a function of complexity 16 (ruff's C901,
and radon's count through .ci/complexity.py where ruff counts lower) and on `import sqlite3`
in fl_core (ruff's TID251, fl_core only), with the project's own Makefile and configuration;
and the real tree passes it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv the tests run in: ruff and radon are there
PACKAGES = ("fl_core", "adapters", "tasks", "flows", "tests", "benchmarks")

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or not (BIN / "ruff").exists(),
    reason="needs make and the dev extra's ruff next to the test interpreter")


def _if_chain(name: str, complexity: int) -> str:
    """A function of that complexity for ruff and radon alike: one `if` per extra path."""
    body = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(complexity - 1))
    return f"def {name}(x: int) -> int:\n{body}    return -1\n"


# radon counts each `and` (16 here); ruff's McCabe counts only the `if` (2)
BOOLEAN_CHAIN = '''def many_conditions(x: int) -> int:
    if (x != 0 and x != 1 and x != 2 and x != 3 and x != 4 and x != 5 and x != 6 and x != 7
            and x != 8 and x != 9 and x != 10 and x != 11 and x != 12 and x != 13 and x != 14):
        return 1
    return 0
'''


def _project(tmp_path: Path, files: dict[str, str]) -> Path:
    """A project folder with the real pyproject.toml and .ci/complexity.py, the packages
    `make lint` checks, and ``files`` in them."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "complexity.py", tmp_path / ".ci" / "complexity.py")
    (tmp_path / ".ci" / "constraints.txt").write_text("")
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # `lint` depends on the install stamp: an existing one newer than pyproject.toml and the
    # constraints, so make runs the recipe and installs nothing
    for name in ("pyproject.toml", ".ci/constraints.txt"):
        os.utime(tmp_path / name, (0, 0))
    (tmp_path / ".stamp").write_text("")
    return tmp_path


def _make_lint(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "lint",
         f"BIN={BIN}", f"STAMP={project / '.stamp'}"],
        cwd=project, capture_output=True, text=True, timeout=300,
        env={**os.environ, "RUFF_OUTPUT_FORMAT": "concise", "RUFF_NO_CACHE": "true"})


def test_make_lint_fails_on_complexity_16_and_sqlite3_in_fl_core(tmp_path: Path) -> None:
    project = _project(tmp_path, {
        "fl_core/store.py": "import sqlite3\n\nCONNECT = sqlite3.connect\n",
        "adapters/store.py": "import sqlite3\n\nCONNECT = sqlite3.connect\n",  # allowed there
        "adapters/branchy.py": _if_chain("too_branchy", 16) + "\n\n" + _if_chain("fine", 15),
    })
    out = _make_lint(project)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "fl_core/store.py:1:8: TID251 `sqlite3` is banned" in text, text
    assert "adapters/branchy.py:1:5: C901 `too_branchy` is too complex (16 > 15)" in text, text
    assert "adapters/store.py" not in text and "`fine`" not in text, text  # only the two


def test_make_lint_fails_on_radon_complexity_16_that_ruff_counts_lower(tmp_path: Path) -> None:
    project = _project(tmp_path, {"benchmarks/conditions.py": BOOLEAN_CHAIN})
    out = _make_lint(project)
    text = out.stdout + out.stderr
    assert "All checks passed!" in text, text  # ruff: complexity 2
    assert out.returncode != 0, text
    assert "benchmarks/conditions.py:1 many_conditions 16" in out.stdout, text


def test_the_tree_passes_lint() -> None:
    ruff = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "--output-format=concise",
                           *PACKAGES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    radon = subprocess.run([sys.executable, ".ci/complexity.py", "fl_core", "adapters", "tasks",
                            "flows", "benchmarks"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert radon.returncode == 0, radon.stdout + radon.stderr
