"""Imports run one way: flows → tasks → fl_core; fl_core never loads orchestration."""

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
