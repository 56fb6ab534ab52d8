"""Lineage by data hash: a stage uses a validation or a partition only if it was made from the
very data it is given.

The stage outputs ``validation.json`` and ``partition.json`` record the SHA-256 of the data
they were made from; ``partition`` and ``train`` (and ``audit``, which reads the partition)
recompute it and refuse (:class:`StaleArtifactError`, exit 3, one line naming the stale file
and both hashes) when it differs, and a validation that failed blocks them: its verdict is
read, not only its existence. Otherwise a failed validation of changed data (site names
re-cased, say) would leave the previous ``partition.json`` in place, and training would
run on it.

The hash is of the **raw file bytes** (for one file per site, ``data.site_files``, the
SHA-256 of each site's file hash, :func:`data_digest`): exactly what validation examined,
cheap, and strict. A normalised table's hash would let a partition survive a reformatting
(line endings, a BOM, row order); strict costs only running ``validate`` and ``partition``
again, and the privacy ledger does not depend on it (its accounts are the records' content,
:mod:`fl_core.data.fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapters.tables import file_fingerprint
from fl_core.config.model import DataConfig
from fl_core.data.tables import DataError
from fl_core.results import SitesValidation, ValidationSummary

DATA_HASH_KEY = "data_sha256"
"""The key of ``partition.json`` that holds the hash of the data it was made from."""


class StaleArtifactError(DataError):
    """A stage's input (``validation.json``, ``partition.json``) was made from other data than
    the stage is given, or the validation failed: exit 3, nothing is run."""


def combine(digests: str | None | Mapping[str, str | None]) -> str | None:
    """One hash for the data: a file's SHA-256 itself; for one file per site, the SHA-256 of
    the sorted ``{site: file hash}`` as JSON (None if a file was missing)."""
    if digests is None or isinstance(digests, str):
        return digests
    if any(d is None for d in digests.values()):
        return None
    text = json.dumps(dict(sorted(digests.items())), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def data_digest(data: DataConfig, root: Path) -> str | None:
    """The hash of the data ``data`` names (relative to ``root``), as validation records it."""
    sources = data.sources(root)
    digests = {site: file_fingerprint(path) if path.is_file() else None
               for path, site in sources}
    return combine(digests if data.site_files is not None else digests[None])


def require_validated(validation: ValidationSummary | SitesValidation, where: Path,
                      data: DataConfig, root: Path) -> None:
    """Refuse unless ``validation`` (read from ``where``) passed, on this very data."""
    if not validation.success:
        raise StaleArtifactError(
            f"{where}: the data failed validation; fix {data.source_text} and run the "
            f"'validate' stage again")
    if isinstance(validation, SitesValidation):  # sites mode: each site validated its own
        return
    _require_same(where, combine(validation.sha256), data, root, "validate")


def require_partition_of(raw: Mapping[str, Any], where: Path, data: DataConfig, root: Path
                         ) -> None:
    """Refuse unless the partition ``raw`` (``partition.json`` read from ``where``) was made
    from this very data."""
    _require_same(where, raw.get(DATA_HASH_KEY), data, root, "partition")


def _require_same(where: Path, recorded: str | None, data: DataConfig, root: Path,
                  stage: str) -> None:
    current = data_digest(data, root)
    if recorded is not None and recorded == current:
        return
    rerun = "'validate' stage" if stage == "validate" else "'validate' and 'partition' stages"
    raise StaleArtifactError(
        f"{where} was made from other data than {data.source_text} (sha256 recorded "
        f"{recorded or 'none'}, now {current or 'no file'}): run the {rerun} again")
