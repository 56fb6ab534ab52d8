"""The documentation stays true: its runnable commands run, its links resolve, and every
module, file and test it names exists.

A fenced block whose info string is ``bash runnable`` (GitHub highlights it as bash: the
first word of the info string is the language) is run with ``bash -euo pipefail`` in a
throwaway copy of the project (``params.yaml``, ``data/raw``, ``data/schemas`` and a link to
``.venv``), the venv's ``bin`` first on ``PATH``; the blocks of one page run in order in one
copy. Mark only cheap commands that touch nothing outside the project copy.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("fl_core", "adapters", "tasks", "flows")
# files a page may name by path (data/ and reports/ hold files a run or an export creates)
PATH_ROOTS = (*PACKAGES, "tests", "benchmarks", "infra", "docs", ".ci")
# module names of the layout before issue 22: the docs must name the new ones
OLD_NAMES = re.compile(
    r"fl_core[./](compression|engine|aggregation|anomaly|attacks|randomness|ledger|gate|"
    r"accounting|schema_infer|schema|validation|models|metrics|reports)\b"
    r"|fl_core[./]federation[./](build|site)\b|fl_core/(privacy|data|config)\.py"
    r"|FederatedDataLoader|mlflow_registry"
)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # the opening fence's, 1-based
    end: int  # the closing fence's
    info: str
    body: str


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of a page (CommonMark fences: 3+ backticks or tildes)."""
    blocks: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening.group(1), opening.group(2).strip()
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), len(lines))
        blocks.append(Block(page, i + 1, end + 1, info, "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def prose(page: Path) -> str:
    """The page without its fenced blocks (links and inline code live here)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    for block in fenced_blocks(page):
        lines[block.line - 1:block.end] = [""] * (block.end - block.line + 1)
    return "\n".join(lines)


def runnable(page: Path) -> list[Block]:
    return [b for b in fenced_blocks(page) if b.info.split()[:1] == ["bash"]
            and "runnable" in b.info.split()[1:]]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces → hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(page).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            name, n = base, 1
            while name in found:
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def test_pages_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "architecture.md", "results.md", "errors.md"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.slow
def test_runnable_commands_run(page: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    shutil.copytree(ROOT / "data" / "raw", project / "data" / "raw")
    shutil.copytree(ROOT / "data" / "schemas", project / "data" / "schemas")
    (project / ".venv").symlink_to(ROOT / ".venv")  # the docs write .venv/bin/fedpriv
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    for block in runnable(page):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.body], cwd=project,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (
            f"{page.name}:{block.line}: exit {done.returncode}\n{block.body}\n"
            f"--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-3000:]}")


def test_runnable_blocks_are_highlighted_as_bash() -> None:
    """The marker follows the language, so renderers still see ``bash``."""
    marked = [b for p in PAGES for b in fenced_blocks(p) if "runnable" in b.info.split()]
    assert marked, "no block is marked runnable"
    assert all(b.info.split()[0] == "bash" for b in marked), [
        f"{b.page.name}:{b.line} {b.info!r}" for b in marked if b.info.split()[0] != "bash"]


def test_relative_links_resolve() -> None:
    broken: list[str] = []
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no heading with that anchor)")
    assert broken == []


def _defines(module: Path, name: str, attribute: str | None) -> bool:
    """Does ``module`` bind ``name`` at top level (and ``attribute`` in it, if a class)?"""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    for node in tree.body:
        if name in _bound(node):
            if attribute is None:
                return True
            # an attribute of a class: bound in its body (a method, a field)
            return isinstance(node, ast.ClassDef) and any(attribute in _bound(item)
                                                          for item in node.body)
    return False


def _bound(node: ast.stmt) -> set[str]:
    """The names a top-level (or class-level) statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    targets = (node.targets if isinstance(node, ast.Assign)
               else [node.target] if isinstance(node, ast.AnnAssign) else [])
    return {t.id for t in targets if isinstance(t, ast.Name)}


def resolves(dotted: str) -> bool:
    """``fl_core.codec.topk.TopKQuantizer`` → the module file exists and defines the name."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:k])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() \
            else base / "__init__.py"
        if module.is_file():
            rest = parts[k:]
            return not rest or _defines(module, rest[0], rest[1] if len(rest) > 1 else None)
    return False


def test_named_modules_files_and_tests_exist() -> None:
    missing: list[str] = []
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", prose(page)):
            dotted = re.match(rf"^(?:{'|'.join(PACKAGES)})(?:\.\w+)+", span)
            if dotted and not resolves(dotted.group(0)):
                missing.append(f"{page.name}: {span}")
            path = re.fullmatch(rf"((?:{'|'.join(map(re.escape, PATH_ROOTS))})/[\w./-]*)"
                                r"(?:::(\w+))?(?::\w+)?", span)
            if path and not (ROOT / path.group(1)).exists():
                missing.append(f"{page.name}: {span} (no such file)")
            elif path and path.group(2) and f"def {path.group(2)}(" not in \
                    (ROOT / path.group(1)).read_text(encoding="utf-8"):
                missing.append(f"{page.name}: {span} (no such test)")
    assert missing == []


def test_no_module_name_of_the_old_layout() -> None:
    found = [f"{page.name}: {m.group(0)}" for page in PAGES
             for m in OLD_NAMES.finditer(page.read_text(encoding="utf-8"))]
    assert found == []


def test_readme_layout_names_every_package_and_module() -> None:
    """The README's layout block lists every fl_core subpackage and every module of adapters/
    and flows/, and names nothing that is gone."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make run" in text and "make test" in text
    layout = next(b.body for b in fenced_blocks(ROOT / "README.md")
                  if b.body.lstrip().startswith("fl_core/"))
    named = set(re.findall(r"[\w.]+\.py|\w+/", layout))
    expected = {f"{p.name}/" for p in (ROOT / "fl_core").iterdir() if (p / "__init__.py").exists()}
    expected |= {p.name for d in ("adapters", "flows") for p in (ROOT / d).glob("*.py")
                 if p.name != "__init__.py"}
    expected |= {p.name for p in (ROOT / "fl_core").glob("*.py") if p.name != "__init__.py"}
    assert expected - named == set(), "not in the README's layout"
    existing = {p.name for d in (*PACKAGES, ".ci") for p in (ROOT / d).rglob("*.py")}
    gone = {n for n in named if n.endswith(".py") and n not in existing}
    assert gone == set(), "named in the README's layout but not in the tree"
