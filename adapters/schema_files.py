"""Dataset schema files: found relative to the project root (or the checkout), read as YAML
and parsed into :class:`fl_core.data.schema.DatasetSchema`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fl_core.data.inference import InferenceError, SchemaDraft, infer_schema
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


def read_table(path: str | Path) -> pd.DataFrame:
    """The CSV as text columns (empty cells and NA tokens are missing, as validation reads)."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: no such file", 3)
    if path.stat().st_size == 0:
        raise InferenceError(f"{path}: the file is empty (0 bytes)", 3)
    from adapters.csv_header import duplicate_columns, duplicate_columns_text

    duplicated = duplicate_columns(path)
    if duplicated:
        raise InferenceError(f"{path}: {duplicate_columns_text(duplicated)}", 3)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise InferenceError(f"{path}: no header and no rows", 3) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InferenceError(f"{path}: cannot be read as CSV ({first})", 3) from None
    if frame.empty:
        raise InferenceError(f"{path}: a header but no data rows: nothing to infer from", 3)
    frame.columns = [str(c) for c in frame.columns]
    return frame


def infer_schema_file(path: str | Path, **roles: Any) -> SchemaDraft:
    """:func:`fl_core.data.inference.infer_schema` of the CSV at ``path``; an unreadable or
    empty file is an :class:`InferenceError` with exit code 3."""
    return infer_schema(read_table(path), path, **roles)
