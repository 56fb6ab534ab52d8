"""Imports run one way: flows → tasks → adapters → fl_core; fl_core never loads orchestration,
a database, GX or metrics export, and never touches a file; adapters never load Prefect,
benchmarks and the CLI's non-flow commands never import tasks.

(ruff's TID251 refuses the same imports in fl_core's source, pyproject.toml; these tests also
catch one made through a third-party module, and the file I/O no import rule can see.)"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("sqlite3", "great_expectations", "prefect", "mlflow", "dvc", "prometheus_client",
             "adapters", "tasks", "flows")


@pytest.mark.slow
def test_fl_core_imports_no_orchestration() -> None:
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "fl_core").rglob("*.py"))
    assert "fl_core.audit.lira" in modules  # packages are walked too
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted({{n.split('.')[0] for n in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"fl_core pulled in: {out.stdout.strip()}"


# File-system calls, by qualified name (after the module's import aliases) or by method name on
# any object (``Path(...).read_text()``, ``frame.to_csv(...)``); a prefix ending in "." or "_"
# covers a family (``shutil.copy``, ``pandas.read_csv``).
IO_FUNCTIONS = (
    "open", "io.open", "os.open", "os.remove", "os.unlink", "os.rename", "os.replace",
    "os.makedirs", "os.mkdir", "os.rmdir", "os.listdir", "os.scandir", "os.walk", "os.stat",
    "os.path.exists", "os.path.isfile", "os.path.isdir", "os.path.getsize", "shutil.",
    "tempfile.", "glob.", "pandas.read_", "numpy.load", "numpy.save", "numpy.loadtxt",
    "numpy.savetxt", "numpy.genfromtxt", "numpy.fromfile", "torch.save", "torch.load",
    "json.load", "json.dump", "pickle.load", "pickle.dump", "sqlite3.connect",
)
IO_METHODS = {
    "open", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "rmdir",
    "touch", "iterdir", "glob", "rglob", "exists", "is_file", "is_dir", "stat", "to_csv",
    "to_parquet", "to_pickle", "to_excel", "savefig",
}
YAML_READERS = {"yaml.safe_load", "yaml.load", "yaml.full_load", "yaml.unsafe_load"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name → qualified name, from the module's imports (``np`` → ``numpy``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def file_io_calls(source: str) -> list[str]:
    """``line: call`` for every call in ``source`` that reads or writes a file."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    handles = {item.optional_vars.id for node in ast.walk(tree)
               if isinstance(node, ast.With | ast.AsyncWith) for item in node.items
               if isinstance(item.optional_vars, ast.Name)}  # `with ... as fh`: a file, likely
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is not None:
            head, _, rest = name.partition(".")
            name = aliases.get(head, head) + (f".{rest}" if rest else "")
        if name is not None and any(name == f or (f[-1] in "._" and name.startswith(f))
                                    for f in IO_FUNCTIONS):
            found.append(f"{node.lineno}: {name}")
        elif name in YAML_READERS and node.args and (
                isinstance(node.args[0], ast.Call)
                or (isinstance(node.args[0], ast.Name) and node.args[0].id in handles)):
            found.append(f"{node.lineno}: {name} on a file")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in IO_METHODS \
                and (name is None or name.split(".")[0] not in aliases):
            found.append(f"{node.lineno}: .{node.func.attr}()")
    return found


def test_fl_core_touches_no_file() -> None:
    offenders = {str(p.relative_to(ROOT)): calls for p in sorted((ROOT / "fl_core").rglob("*.py"))
                 if (calls := file_io_calls(p.read_text(encoding="utf-8")))}
    assert offenders == {}, f"file I/O in fl_core (it belongs in adapters/): {offenders}"


@pytest.mark.parametrize("snippet", [
    "open('x.csv')",
    "import io\nio.open('x')",
    "from pathlib import Path\nPath('x').read_text()",
    "from pathlib import Path\nPath('x').write_bytes(b'')",
    "def f(path):\n    path.mkdir(parents=True)",
    "def f(path):\n    path.unlink()",
    "def f(path):\n    with path.open() as fh:\n        return fh",
    "import pandas as pd\npd.read_csv('x.csv')",
    "def f(frame):\n    frame.to_csv('x.csv')",
    "import yaml\nwith open('p.yaml') as fh:\n    yaml.safe_load(fh)",
    "import yaml\nfrom pathlib import Path\nyaml.safe_load(Path('p.yaml').read_text())",
    "import sqlite3\nsqlite3.connect('ledger.sqlite')",
    "from sqlite3 import connect\nconnect(':memory:')",
    "import numpy as np\nnp.save('x.npy', [1])",
    "import torch\ntorch.load('model.pt')",
    "import shutil\nshutil.copyfile('a', 'b')",
    "import os\nos.replace('a', 'b')",
    "import json\nwith open('x') as fh:\n    json.load(fh)",
])
def test_the_file_io_scan_catches(snippet: str) -> None:
    assert file_io_calls(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import yaml\ndef parse(raw: str):\n    return yaml.safe_load(raw)",  # a --set value
    "import json\njson.loads('{}')",
    "from pathlib import Path\nPath('a') / 'b'",
    "import numpy as np\nnp.unique([1])",
    "def f(frame):\n    return frame.to_dict()",
])
def test_the_file_io_scan_leaves_values_alone(snippet: str) -> None:
    assert file_io_calls(snippet) == [], snippet


def test_tasks_do_not_import_flows() -> None:
    for path in (ROOT / "tasks").glob("*.py"):
        text = path.read_text()
        assert "from flows" not in text and "import flows" not in text, path.name


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
