"""The wiring's choices that depend on the model: compression by model size."""

from pathlib import Path

import pytest

from adapters.config_files import load_config
from adapters.tables import ClinicalTable
from fl_core.config.model import CompressionConfig
from fl_core.federation.wiring import (
    compression_for,
    describe_compression,
    federate,
    parameter_count,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("enabled", "minimum", "n_params", "compressed"), [
    (True, 4096, 18, False),       # a logistic regression: dense
    (True, 4096, 4095, False),
    (True, 4096, 4096, True),      # at the threshold: compressed
    (True, 0, 18, True),           # 0: every model compressed
    (False, 0, 10**6, False),      # off stays off
])
def test_compression_applies_from_min_parameters(enabled: bool, minimum: int, n_params: int,
                                                 compressed: bool) -> None:
    configured = CompressionConfig(enabled=enabled, min_parameters=minimum, ratio=0.05)
    applied = compression_for(configured, n_params)
    assert applied.enabled is compressed
    assert applied.ratio == 0.05  # nothing else changes
    said = describe_compression(configured, n_params)
    assert said.startswith("uplink top-0.05") is compressed
    assert ("under compression.min_parameters" in said) is (enabled and not compressed)


@pytest.mark.slow
def test_a_small_model_sends_dense_updates_unless_told_otherwise() -> None:
    def run(*overrides: str) -> tuple[int, int]:
        cfg = load_config(ROOT / "params.yaml", ["rounds=2", "privacy.enabled=false",
                                                 *overrides])
        data, _, _ = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, cfg.seed)
        assert (parameter_count(cfg, int(data[0].x_train.shape[1])) < 4096) is (cfg.model
                                                                                 == "logreg")
        history = federate(cfg, data, dp=None).result.history
        return (sum(r.bytes_uploaded for r in history),
                sum(r.bytes_uploaded_uncompressed for r in history))

    sent, dense = run()
    assert sent == dense
    sent, dense = run("compression.min_parameters=0")
    assert sent < dense / 2
    sent, dense = run("model=mlp", "hidden_units=256", "compression.min_parameters=4096")
    assert sent < dense / 2  # 17 x 256 + 256 + 257 parameters: over the threshold
