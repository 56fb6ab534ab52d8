"""No function above cyclomatic complexity 15, counted the way radon counts.

Ruff's C901 (McCabe) is on in pyproject.toml too, but it counts differently (it does not
count boolean operators or comprehensions), and the limit was stated in radon's numbers, so
`make lint` runs this as well. Nested functions are checked on their own: radon's CLI leaves
closures out of its list, which would let one grow unseen inside a small function.

Usage: python .ci/complexity.py [--max N] [PATH ...]   (defaults: 15; the project's packages)
Prints file:line name complexity for each offender and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from radon.complexity import cc_visit
from radon.visitors import Function

DEFAULT_PATHS = ("fl_core", "adapters", "tasks", "flows", "benchmarks")
DEFAULT_MAX = 15


def _python_files(paths: Iterable[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if ".venv" not in p.parts)
        elif path.suffix == ".py":
            yield path
        else:
            raise SystemExit(f"complexity: no such Python file or folder: {name}")


def _functions(blocks: Iterable[object], prefix: str = "") -> Iterator[tuple[str, Function]]:
    """Every function, method and nested function, with its dotted name."""
    for block in blocks:
        if not isinstance(block, Function):
            continue  # a Class block: its methods are listed separately by cc_visit
        name = prefix + block.fullname
        yield name, block
        yield from _functions(block.closures, prefix=name + ".")


def offenders(paths: Iterable[str], limit: int) -> list[str]:
    found = []
    for path in _python_files(paths):
        blocks = cc_visit(path.read_text(encoding="utf-8"))
        for name, block in _functions(blocks):
            if block.complexity > limit:
                found.append(f"{path}:{block.lineno} {name} {block.complexity}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=DEFAULT_MAX, help="highest allowed complexity")
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS))
    args = parser.parse_args(argv)
    found = offenders(args.paths, args.max)
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} function(s) above cyclomatic complexity {args.max} (radon); "
              "split them along their seams", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
