"""``params.yaml`` read from disk, overrides applied, the dataset schema file attached,
validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from adapters.schema_files import read_schema_tree, resolve_schema_path
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.config.overrides import SCHEMA_PREFIX, apply_overrides, validate_config
from fl_core.data.schema import (
    DEFAULT_SCHEMA,
    SchemaError,
    parse_schema,
)


def attach_schema(tree: dict[str, Any], root: str | Path | None = None,
                  schema_overrides: list[str] | None = None) -> dict[str, Any]:
    """``tree`` with ``data.spec`` set to the schema ``data.schema`` names, its
    ``schema_overrides`` (``key=value``, keys of the schema file) applied and validated.

    A tree that already carries ``data.spec`` (a dumped configuration) keeps it. Raises
    :class:`ConfigError` naming the schema key for a missing or invalid schema.
    """
    data = tree.get("data", {})
    if not isinstance(data, dict) or (data.get("spec") is not None and not schema_overrides):
        return tree  # not a section: the model check names it
    path = data.get("schema", data.get("schema_path", DEFAULT_SCHEMA))
    if not isinstance(path, str) or not path:
        raise ConfigError(f"data.schema: expected the path of a dataset schema file "
                          f"(got {path!r})")
    try:
        schema_tree = read_schema_tree(resolve_schema_path(path, root))
        schema_tree = apply_overrides(schema_tree, schema_overrides or [])
        spec = parse_schema(schema_tree, path)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    return {**tree, "data": {**data, "spec": spec}}


def build_config(tree: dict[str, Any], source: str = "params.yaml",
                 root: str | Path | None = None,
                 schema_overrides: list[str] | None = None) -> PipelineConfig:
    """Validate ``tree`` (a parsed ``params.yaml``) with its dataset schema loaded from
    ``root`` (the project root; default the working directory); ``build_config({})`` is the
    default configuration."""
    return validate_config(attach_schema(tree, root, schema_overrides), source)


def load_config(
    path: str | Path = "params.yaml", overrides: list[str] | None = None
) -> PipelineConfig:
    """Read ``path``, apply ``overrides`` and validate.

    The dataset schema (``data.schema``) is read relative to the folder of ``path`` (the
    project root); an override ``schema.<key>=<value>`` sets a key of that schema file. A
    missing file gives the defaults (so the package works outside a checkout); a file that is
    not a YAML mapping is an error.
    """
    path = Path(path)
    tree: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        tree = loaded or {}
    elif str(path) != "params.yaml":
        raise ConfigError(f"config file {path} does not exist")
    overrides = overrides or []
    schema_overrides = [o.strip().removeprefix(SCHEMA_PREFIX) for o in overrides
                        if o.strip().startswith(SCHEMA_PREFIX)]
    tree = apply_overrides(tree, [o for o in overrides
                                  if not o.strip().startswith(SCHEMA_PREFIX)])
    source = str(path) + (" with --set overrides" if overrides else "")
    return build_config(tree, source, path.parent, schema_overrides)


