"""Dataset schema files: found relative to the project root (or the checkout), read as YAML
and parsed into :class:`fl_core.data.schema.DatasetSchema`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fl_core.data.schema import DatasetSchema, SchemaError, parse_schema

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""The fedpriv checkout: where a relative schema path is looked up when the project lacks it."""


def resolve_schema_path(path: str | Path, root: str | Path | None = None) -> Path:
    """Where ``data.schema`` points: absolute as given; relative to ``root`` (the project root,
    default the working directory), else to the fedpriv checkout (:data:`PACKAGE_ROOT`)."""
    path = Path(path)
    if path.is_absolute():
        return path
    here = Path(root if root is not None else ".") / path
    if here.exists():
        return here
    shipped = PACKAGE_ROOT / path
    return shipped if shipped.exists() else here


def read_schema_tree(path: Path) -> dict[str, Any]:
    """The schema file at ``path`` as a YAML mapping (raises :class:`SchemaError`)."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"data.schema: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SchemaError(f"data.schema: {path} cannot be read as YAML ({exc})") from None
    if not isinstance(loaded, dict):
        raise SchemaError(f"data.schema: {path}: the top level must be a mapping of keys "
                          f"(got {type(loaded).__name__})")
    return loaded


def load_schema(path: str | Path, root: str | Path | None = None) -> DatasetSchema:
    """Read and validate the schema ``data.schema`` names (see :func:`resolve_schema_path`)."""
    resolved = resolve_schema_path(path, root)
    return parse_schema(read_schema_tree(resolved), str(path))
