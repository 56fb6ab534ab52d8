"""Pluggable parts are chosen by name from one registry each, and the configuration accepts
exactly the registries' keys; server-side DP-FedAvg is a wrapper around an aggregation rule."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import AfterValidator, BaseModel

from adapters.config_files import load_config
from fl_core.codec.dense import DenseCodec
from fl_core.codec.framing import CODEC_DENSE, CODEC_TOPK
from fl_core.codec.payload import _DECODERS, CODECS, decode_payload
from fl_core.codec.topk import TopKQuantizer
from fl_core.config.model import REGISTRIES, ConfigError, PipelineConfig
from fl_core.federation.coordinator import Defense
from fl_core.model.networks import MODELS, build_model
from fl_core.privacy.accountants import ACCOUNTANTS, PrivacyError, _accountant
from fl_core.privacy.dp_fedavg import DPFedAvg
from fl_core.privacy.dpsgd import GRAD_SAMPLE_MODES
from fl_core.privacy.randomness import RANDOMNESS, RandomSource, SeededRandom, make_random
from fl_core.registry import accepted, lookup
from fl_core.robust.aggregators import (
    AGGREGATORS,
    PRE_AGGREGATIONS,
    AggregationResult,
    bucketing,
    fedavg,
    make_aggregator,
    make_pre_aggregation,
    nearest_neighbour_mixing,
)
from fl_core.robust.attacks import ATTACKS, DATA_POISONING, Attack

ROOT = Path(__file__).resolve().parents[1]


# --- registry ↔ config ---------------------------------------------------------------------


def _field(dotted: str) -> tuple[type[BaseModel], str, Any]:
    """The section class, field name and FieldInfo behind a dotted config key."""
    section: type[BaseModel] = PipelineConfig
    *parents, name = dotted.split(".")
    for part in parents:
        section = section.model_fields[part].annotation  # type: ignore[assignment]
    return section, name, section.model_fields[name]


def _sections(model: type[BaseModel] = PipelineConfig) -> list[type[BaseModel]]:
    out = [model]
    for info in model.model_fields.values():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out.extend(_sections(info.annotation))
    return out


def test_every_registry_of_the_architecture_is_checked_by_config() -> None:
    expected = {"model": MODELS, "aggregation.method": AGGREGATORS,
                "aggregation.pre_aggregation": PRE_AGGREGATIONS, "attack.kind": ATTACKS,
                "privacy.accountant": ACCOUNTANTS, "privacy.grad_sample_mode": GRAD_SAMPLE_MODES,
                "privacy.randomness": RANDOMNESS}
    assert REGISTRIES.keys() == expected.keys()
    assert all(REGISTRIES[k] is v for k, v in expected.items())  # the same object, not a copy


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_config_accepts_every_registry_key(key: str) -> None:
    section, name, _ = _field(key)
    for value in REGISTRIES[key]:
        assert getattr(section.model_validate({name: value}), name) == value


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_config_refuses_an_unknown_name_listing_the_registry(key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", [f"{key}=no_such_part"])
    msg = str(err.value)
    assert f"{key}:" in msg and "no_such_part" in msg
    assert accepted(REGISTRIES[key]) in msg  # every accepted name, quoted, in registry order


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_a_registry_field_is_a_checked_str_not_a_literal(key: str) -> None:
    _, _, info = _field(key)
    # field_validator (privacy.randomness) or an AfterValidator in the annotation
    assert info.annotation is str, f"{key} is typed {info.annotation}, not str"
    assert key == "privacy.randomness" or any(
        isinstance(m, AfterValidator) for m in info.metadata)


def test_no_literal_in_config_duplicates_a_registry() -> None:
    names = [set(r) for r in (*REGISTRIES.values(), CODECS)]
    for section in _sections():
        for field, info in section.model_fields.items():
            if typing.get_origin(info.annotation) is not Literal:
                continue
            values = set(typing.get_args(info.annotation))
            assert not any(values <= keys for keys in names), \
                f"{section.__name__}.{field} repeats a registry's names as a Literal"


def test_the_model_error_keeps_its_quoted_names() -> None:
    with pytest.raises(ConfigError, match=r"model: .*'logreg', 'mlp'.*\(got 'cnn'\)"):
        load_config(ROOT / "params.yaml", ["model=cnn"])


def test_lookup_names_the_key_and_the_accepted_names() -> None:
    with pytest.raises(ValueError, match=r"aggregation.method='mean': .*'fedavg', 'multi_krum'"):
        make_aggregator("mean", 1)
    with pytest.raises(ValueError, match=r"aggregation.pre_aggregation='mix'.*'nnm'"):
        make_pre_aggregation("mix", 1)
    with pytest.raises(ValueError, match=r"attack.kind='flood'.*'sign_flip'"):
        Attack("flood")
    with pytest.raises(ValueError, match=r"model='cnn'.*'logreg', 'mlp'"):
        build_model("cnn", 3)
    with pytest.raises(ValueError, match=r"privacy.randomness='urandom'.*'secure'"):
        make_random("urandom", 0)
    with pytest.raises(PrivacyError, match=r"privacy.accountant='gdp'.*'prv', 'rdp'"):
        _accountant("gdp")
    with pytest.raises(ValueError, match="accepted"):
        lookup({"a": 1}, ["unhashable"], "k")  # type: ignore[arg-type]


# --- each registry builds what its names say -------------------------------------------------


def test_every_registered_aggregator_runs_and_keeps_its_name() -> None:
    u = torch.randn(9, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for method in AGGREGATORS:
        agg = make_aggregator(method, 2)
        assert agg.method == method and agg.f == 2
        assert agg(u, None, None).aggregate.shape == (4,)
    assert torch.equal(make_aggregator("fedavg", 0)(u, None, None).aggregate, fedavg(u).aggregate)


def test_pre_aggregations_are_the_mixing_functions() -> None:
    u = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert make_pre_aggregation("none", 2) is None
    nnm = make_pre_aggregation("nnm", 2)
    assert nnm is not None and torch.equal(nnm(u), nearest_neighbour_mixing(u, 2))
    # f is capped below n in a round that lost clients: with 2 rows and f=5 one neighbour left
    assert torch.equal(nnm(u[:2]), nearest_neighbour_mixing(u[:2], 1))
    bucket = make_pre_aggregation("bucketing", 2, bucket_size=3, seed=7)
    generator = torch.Generator().manual_seed(7)
    assert bucket is not None
    for _ in range(2):  # one generator for the run: successive rounds shuffle differently
        assert torch.equal(bucket(u), bucketing(u, 3, generator))


def test_attack_registry_crafts_only_malicious_rows() -> None:
    u = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    for kind, spec in ATTACKS.items():
        out = Attack(kind, scale=3.0).craft(u, [1, 4], torch.Generator().manual_seed(0))
        honest = [0, 2, 3, 5]
        assert torch.equal(out[honest], u[honest]), kind
        assert torch.equal(out, u) == (spec.craft is None), kind
    out = Attack("sign_flip", scale=3.0).craft(u, [1, 4], torch.Generator())
    assert torch.equal(out[[1, 4]], -3.0 * u[[1, 4]])
    assert set(DATA_POISONING) == {"label_flip", "scaling"}
    assert Attack("scaling").flips_labels and not Attack("alie").flips_labels


def test_codec_registry_derives_the_decoder_table() -> None:
    assert {"dense": DenseCodec, "topk": TopKQuantizer} == CODECS
    assert {i: type(d) for i, d in _DECODERS.items()} == {CODEC_DENSE: DenseCodec,
                                                          CODEC_TOPK: TopKQuantizer}
    x = torch.linspace(-1, 1, 40)
    for cls in CODECS.values():
        payload = cls().encode(x)
        assert payload[5] == cls.codec_id  # the header's codec byte
        assert decode_payload(payload, 40).shape == (40,)


def test_every_model_and_accountant_and_grad_sample_mode_is_usable() -> None:
    for kind in MODELS:
        assert build_model(kind, 4, 3, seed=0)(torch.zeros(2, 4)).shape == (2,)
    for name in ACCOUNTANTS:
        assert _accountant(name).mechanism() == name
    assert set(GRAD_SAMPLE_MODES) == {"hooks", "functorch"}


# --- server-side DP-FedAvg as a wrapper ------------------------------------------------------


def _round(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, 11, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 7)[:, None]


def dp_fedavg(updates: torch.Tensor, clip_norm: float, noise_multiplier: float,
              expected_clients: float, random: RandomSource) -> AggregationResult:
    """DP-FedAvg written out as the formula, the reference the wrapper is checked against:
    ``(Σ_k u_k · min(1, S/‖u_k‖) + N(0, σ²S² I)) / E[clients]``."""
    norms = updates.norm(dim=1, keepdim=True).clamp(min=1e-12)
    total = (updates * (clip_norm / norms).clamp(max=1.0)).sum(0)
    noise = random.normal(tuple(total.shape), noise_multiplier * clip_norm, total.dtype)
    return AggregationResult((total + noise) / expected_clients, list(range(updates.shape[0])))


@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_dp_fedavg_wrapper_equals_the_function_on_the_same_noise(sigma: float) -> None:
    u = _round()
    wrapper = DPFedAvg(clip_norm=1.5, noise_multiplier=sigma, expected_clients=8.0,
                       random=SeededRandom(5).stream("server-dp"))
    weights = torch.arange(1.0, 8.0, dtype=torch.float64)  # ignored: every client counts once
    got = wrapper(u, weights, None)
    want = dp_fedavg(u, 1.5, sigma, 8.0, SeededRandom(5).stream("server-dp"))
    assert torch.allclose(got.aggregate, want.aggregate, atol=1e-12)
    assert got.selected == want.selected == list(range(7))
    # the second round draws fresh noise from the same stream, like the function would
    if sigma:
        assert not torch.allclose(wrapper(u, None, None).aggregate, got.aggregate)


def test_dp_fedavg_wrapper_serves_as_the_defense_aggregator() -> None:
    u = _round(4)
    inner = make_aggregator("fedavg", 2)
    defense = Defense(aggregator=DPFedAvg(2.0, 0.7, 7.0, SeededRandom(1), inner=inner))
    got = defense.aggregate(u, torch.ones(7, dtype=torch.float64), None).aggregate
    want = dp_fedavg(u, 2.0, 0.7, 7.0, SeededRandom(1)).aggregate
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("method", [m for m in AGGREGATORS if m != "fedavg"])
def test_dp_fedavg_refuses_to_wrap_a_rule_that_is_not_the_plain_mean(method: str) -> None:
    with pytest.raises(PrivacyError, match=rf"aggregation.method={method!r}.*clipped sum.*"
                                           r"aggregation.method=fedavg"):
        DPFedAvg(1.0, 1.0, 4.0, SeededRandom(0), inner=make_aggregator(method, 1))


def test_dp_fedavg_refuses_an_opaque_callable_and_bad_parameters() -> None:
    with pytest.raises(PrivacyError, match="cannot wrap"):
        DPFedAvg(1.0, 1.0, 4.0, SeededRandom(0), inner=lambda u, w, p: fedavg(u, w))
    with pytest.raises(PrivacyError, match="clip_norm > 0"):
        DPFedAvg(0.0, 1.0, 4.0, SeededRandom(0))
    with pytest.raises(PrivacyError, match="expected_clients > 0"):
        DPFedAvg(1.0, 1.0, 0.0, SeededRandom(0))
