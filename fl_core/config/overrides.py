"""``key=value`` overrides of a configuration tree, and the tree validated into
:class:`fl_core.config.model.PipelineConfig` with errors that name the key.

Reading ``params.yaml`` and the dataset schema file is :mod:`adapters.config_files`."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from fl_core.config.model import ConfigError, PipelineConfig


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"data.partition=by_patient"`` → (["data", "partition"], "by_patient").

    The value is read as YAML, so ``5`` is an int, ``null`` is None and ``[1, 2]`` a list.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``key=value`` override applied."""
    result = copy.deepcopy(tree)  # keeps key order: a schema's features are ordered
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(path[: i + 1])} is not a section"
                )
            node = child
        node[path[-1]] = value
    return result


MOVED_TO_SCHEMA = {
    "data.reference": "a numeric feature's low/high/center/scale/fill",
    "data.missing_category": "a categorical or boolean feature's fill",
    "data.zero_as_missing": "a feature's missing_values",
    "validation": "each feature's valid range and max_missing_rate",
}
"""Keys of earlier ``params.yaml`` versions → what of the dataset schema replaced them."""


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
    if error["type"] == "extra_forbidden":
        section: type[BaseModel] = model
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part))
            if field is None or not isinstance(field.annotation, type):
                break
            section = field.annotation
        known = ", ".join(sorted(f.alias or name for name, f in section.model_fields.items()))
        if loc in MOVED_TO_SCHEMA:
            return (f"{loc}: unknown key; {MOVED_TO_SCHEMA[loc]} is declared in the dataset "
                    f"schema (data.schema) now: set it there or with --set schema.<key>=<value>"
                    f" (`fedpriv schema show`)")
        return f"{loc}: unknown key; accepted keys here: {known}"
    given = error.get("input")
    msg = error["msg"].removeprefix("Value error, ")
    if not loc:  # a rule across sections: its message names the keys itself
        return msg
    if isinstance(given, dict):  # a rule across a section's keys: not the whole section
        return f"{loc}.{msg}" if re.match(r"^\w+: ", msg) else f"{loc}: {msg}"
    return f"{loc}: {msg} (got {given!r})"


SCHEMA_PREFIX = "schema."
"""An override ``schema.<key>=<value>`` sets a key of the dataset schema file instead."""


def validate_config(tree: dict[str, Any], source: str = "params.yaml") -> PipelineConfig:
    """Validate ``tree`` (a parsed ``params.yaml`` whose ``data.spec`` is the loaded dataset
    schema); every error names its dotted key, what was given and what is accepted."""
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(e, PipelineConfig) for e in exc.errors()]
        raise ConfigError(f"invalid configuration in {source}:\n  " + "\n  ".join(lines)) from None
