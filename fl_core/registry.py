"""Choosing pluggable parts by name: one registry (a ``dict`` name → factory) per kind.

Each kind lives in the module that owns the concept — aggregators and pre-aggregations in
:mod:`fl_core.robust.aggregators`, attacks in :mod:`fl_core.robust.attacks`, codecs in
:mod:`fl_core.codec.topk`, accountants and grad-sample modes in :mod:`fl_core.privacy.dpsgd`,
models in :mod:`fl_core.model.networks`, randomness in :mod:`fl_core.privacy.randomness`. The
registry's keys are the one list of accepted names: :mod:`fl_core.config.model` checks
configuration values against them with :func:`registered`, and the code that builds a part
looks it up with :func:`lookup`, so a name is added in exactly one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


def accepted(names: Iterable[str]) -> str:
    """``'a', 'b', 'c'``: the accepted names, quoted, in registration order."""
    return ", ".join(repr(name) for name in names)


def unknown(registry: Mapping[str, object], value: object, key: str = "") -> str:
    """The message for a name that is not registered: the key, the value, the accepted names."""
    prefix = f"{key}={value!r}: " if key else ""
    return f"{prefix}unknown name; accepted: {accepted(registry)}"


def lookup(registry: Mapping[str, T], name: str, key: str) -> T:
    """``registry[name]``, or ``ValueError`` naming ``key`` and every accepted name."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(unknown(registry, name, key)) from None


def registered(registry: Mapping[str, object]) -> Callable[[str], str]:
    """A pydantic after-validator: the value unchanged if it is a key of ``registry``.

    The error lists the accepted names; :func:`fl_core.config.overrides.build_config` prefixes
    the dotted key and appends what was given.
    """

    def check(value: str) -> str:
        if value not in registry:
            raise ValueError(unknown(registry, value))
        return value

    return check
