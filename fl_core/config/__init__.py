"""The one configuration: :mod:`~fl_core.config.model` (every section of ``params.yaml`` as a
frozen pydantic model, every default once, values checked against the registries) and
:mod:`~fl_core.config.overrides` (``key=value`` overrides, errors that name the key). Reading
the files is :mod:`adapters.config_files`."""
