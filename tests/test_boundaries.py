"""Imports run one way: flows → tasks → adapters → fl_core; fl_core never loads orchestration,
adapters never load Prefect, benchmarks and the CLI's non-flow commands never import tasks."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("prefect", "mlflow", "dvc", "tasks", "flows")


def test_fl_core_imports_no_orchestration() -> None:
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "fl_core").rglob("*.py"))
    assert "fl_core.audit.lira" in modules  # packages are walked too
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"fl_core pulled in: {out.stdout.strip()}"


def test_tasks_do_not_import_flows() -> None:
    for path in (ROOT / "tasks").glob("*.py"):
        text = path.read_text()
        assert "from flows" not in text and "import flows" not in text, path.name


def test_cli_budget_does_not_import_tasks(project: Path) -> None:
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        f"assert main(['budget', '--root', {str(project)!r}]) == 0\n"
        "print('tasks:' + ','.join(sorted(n for n in sys.modules if n.split('.')[0] == 'tasks')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.splitlines()[-1] == "tasks:", f"budget imported: {out.stdout}"


def _modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py"))


def test_adapters_never_load_prefect_tasks_or_flows() -> None:
    modules = _modules("adapters")
    assert {"adapters.train", "adapters.mlflow_registration", "adapters.plots"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(','.join(sorted(n for n in sys.modules\n"
        "                      if n.split('.')[0] in ('prefect', 'tasks', 'flows'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"adapters pulled in: {out.stdout.strip()[:300]}"


def test_benchmarks_do_not_import_tasks() -> None:
    import re

    pattern = re.compile(r"^\s*(from|import)\s+tasks\b", re.MULTILINE)
    offenders = [p.name for p in (ROOT / "benchmarks").glob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_tasks_are_thin_glue() -> None:
    for path in (ROOT / "tasks").glob("*.py"):
        code = [line for line in path.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
        assert len(code) <= 80, f"{path.name}: {len(code)} code lines"


def test_cli_stage_commands_do_not_import_tasks(project: Path) -> None:
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        f"assert main(['stage', 'validate', '--root', {str(project)!r}]) == 0\n"
        f"assert main(['stage', 'partition', '--root', {str(project)!r}]) == 0\n"
        "print('tasks:' + ','.join(sorted(n for n in sys.modules if n.split('.')[0] == 'tasks')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.splitlines()[-1] == "tasks:", f"stage imported: {out.stdout[-300:]}"
