"""Where a run's files live and how they are written: atomically, never half-done."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_core.config import PipelineConfig
from fl_core.reports import TrainingSummary


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the project root."""

    root: Path
    reports: Path
    state: Path

    @classmethod
    def of(cls, cfg: PipelineConfig, root: str | Path = ".") -> Paths:
        root = Path(root).resolve()
        return cls(root=root, reports=root / cfg.reports_dir, state=root / cfg.state_dir)

    @property
    def validation(self) -> Path:
        return self.reports / "validation.json"

    @property
    def partition(self) -> Path:
        return self.root / "data" / "processed" / "partition.json"

    @property
    def model(self) -> Path:
        return self.root / "data" / "models" / "model.pt"

    @property
    def train_summary(self) -> Path:
        return self.reports / "train.json"

    @property
    def rounds_csv(self) -> Path:
        return self.reports / "rounds.csv"

    @property
    def audit(self) -> Path:
        return self.reports / "audit.json"

    @property
    def roc_plot(self) -> Path:
        return self.reports / "mia_roc.png"

    @property
    def training_plot(self) -> Path:
        return self.reports / "training_curves.png"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def registration(self) -> Path:
        return self.reports / "registration.json"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it into place only if the block succeeds.

    A crash mid-write leaves the previous file (or none), never a half-written one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    write_text_atomic(target, text + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path, stage: str) -> Any:
    """Read a previous stage's output, with an error that says which stage to run first."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the '{stage}' stage first")
    return json.loads(path.read_text())


def read_training(paths: Paths) -> TrainingSummary:
    """The train stage's typed result (``train.json``)."""
    try:
        return TrainingSummary.from_dict(read_json(paths.train_summary, "train"))
    except ValueError as exc:
        raise FileNotFoundError(f"{paths.train_summary}: {exc}") from None
