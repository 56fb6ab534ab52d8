"""``params.yaml`` read from disk, overrides applied, the dataset schema file attached,
validated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from adapters.schema_files import read_schema_tree, resolve_schema_path
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.config.overrides import SCHEMA_PREFIX, apply_overrides, validate_config
from fl_core.config.site import SiteConfig
from fl_core.data.schema import (
    DEFAULT_SCHEMA,
    SchemaError,
    parse_schema,
)
from fl_core.federation.channel import SiteCredentials


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




@dataclass(frozen=True)
class SiteFiles:
    """A site's configuration with every path resolved against its file's folder."""

    config: SiteConfig
    source: Path
    data: Path
    state: Path
    key: Path
    cert: Path
    ca: Path

    def credentials(self) -> SiteCredentials:
        """The site's TLS material (read now: a renewed certificate counts at once)."""
        return SiteCredentials(self.key.read_bytes(), self.cert.read_bytes(),
                               self.ca.read_bytes())

    def prefect_environment(self) -> dict[str, str]:
        """The worker's Prefect client settings from the site's file: the API, its
        credentials (read from a 0600 file) and the CA that signed the API's certificate."""
        from adapters.prefect_api import client_environment, read_auth_string

        prefect = self.config.prefect
        if not prefect.api_url:
            return {}
        if not prefect.auth_string_file:
            return {"PREFECT_API_URL": prefect.api_url}
        auth = read_auth_string(self._path(prefect.auth_string_file))
        return client_environment(api_url=prefect.api_url, auth_string=auth,
                                  ca_file=self._path(prefect.ca) if prefect.ca else self.ca)

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else (self.source.parent / path).resolve()


def load_site_config(path: str | Path) -> SiteFiles:
    """Read and validate a site's ``site.yaml``; :class:`ConfigError` names what is wrong
    (a missing file among those it names included)."""
    path = Path(path).resolve()
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"site configuration {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        config = SiteConfig.model_validate(tree if isinstance(tree, dict) else {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None

    def resolve(value: str) -> Path:
        return value_path if (value_path := Path(value)).is_absolute() else \
            (path.parent / value_path).resolve()

    files = SiteFiles(config, path, resolve(config.data), resolve(config.state),
                      resolve(config.tls.key), resolve(config.tls.cert), resolve(config.tls.ca))
    missing = [f"{name} {p}" for name, p in (("data", files.data), ("tls.key", files.key),
                                             ("tls.cert", files.cert), ("tls.ca", files.ca))
               if not p.is_file()]
    if missing:
        raise ConfigError(f"{path}: no such file: {', '.join(missing)}")
    return files
