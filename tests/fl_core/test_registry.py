"""Pluggable parts are chosen by name from one registry each, and the configuration accepts
exactly the registries' keys; server-side DP-FedAvg is a wrapper around an aggregation rule."""

from __future__ import annotations

import re
import struct
import typing
import zlib
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import AfterValidator, BaseModel

from adapters.config_files import load_config
from fl_core.codec.framing import PayloadError, read_header
from fl_core.codec.payload import _DECODERS, CODECS, decode_payload
from fl_core.config.model import REGISTRIES, ConfigError, PipelineConfig
from fl_core.data.tables import ClientData
from fl_core.federation.coordinator import Defense
from fl_core.federation.wiring import simulation_setup
from fl_core.model.networks import MODELS, build_model, get_flat_params
from fl_core.privacy.accountants import ACCOUNTANTS, PrivacyError, _accountant
from fl_core.privacy.dp_fedavg import DPFedAvg
from fl_core.privacy.dpsgd import (
    GRAD_SAMPLE_MODES,
    DPSGDConfig,
    PatientDPTrainer,
    group_records,
)
from fl_core.privacy.randomness import RANDOMNESS, RandomSource, SeededRandom, make_random
from fl_core.registry import lookup
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
from fl_core.robust.attacks import ATTACKS, Attack

ROOT = Path(__file__).resolve().parents[2]


def listed_names(message: str, key: str) -> list[str]:
    """The names an unknown-name error lists on ``key``'s line, in the order it lists them
    (parsed from the message, so that a name missing, extra or out of order shows)."""
    line = next(line for line in message.splitlines() if key in line)
    found = re.search(r"accepted: ((?:'[^']*'(?:, )?)+)", line)
    assert found, line
    return re.findall(r"'([^']*)'", found.group(1))


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
        if section is PipelineConfig:  # the whole configuration needs its dataset schema
            built = load_config(ROOT / "params.yaml", [f"{key}={value}"])
        else:
            built = section.model_validate({name: value})
        assert getattr(built, name) == value


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_config_refuses_an_unknown_name_listing_the_registry(key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", [f"{key}=no_such_part"])
    msg = str(err.value)
    assert f"{key}:" in msg and "(got 'no_such_part')" in msg
    # exactly the registry's keys, quoted, in registry order
    assert listed_names(msg, f"{key}:") == list(REGISTRIES[key])


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
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["model=cnn"])
    quoted = ", ".join(f"'{name}'" for name in MODELS)
    assert f"  model: unknown name; accepted: {quoted} (got 'cnn')" in str(err.value)


# Each builder that looks a name up: the registry, the call with an unknown name, its config key
BUILDERS = {
    "aggregation.method": (AGGREGATORS, lambda: make_aggregator("mean", f=1), "mean"),
    "aggregation.pre_aggregation": (
        PRE_AGGREGATIONS, lambda: make_pre_aggregation("mix", f=1, bucket_size=2, seed=0), "mix"),
    "attack.kind": (ATTACKS, lambda: Attack(kind="flood", malicious=frozenset(), scale=4.0,
                                            noise_std=1.0, ipm_epsilon=0.5), "flood"),
    "model": (MODELS, lambda: build_model("cnn", 3, hidden_units=3), "cnn"),
    "privacy.randomness": (RANDOMNESS, lambda: make_random("urandom", 0), "urandom"),
    "privacy.accountant": (ACCOUNTANTS, lambda: _accountant("gdp"), "gdp"),
}


@pytest.mark.parametrize("key", sorted(BUILDERS))
def test_lookup_names_the_key_and_exactly_the_accepted_names(key: str) -> None:
    registry, build, bad = BUILDERS[key]
    with pytest.raises(ValueError) as err:
        build()
    message = str(err.value)
    assert message.startswith(f"{key}={bad!r}: unknown name; accepted: ")
    assert listed_names(message, key) == list(registry)
    if key == "privacy.accountant":  # a privacy setting: the privacy error, exit 2 like config
        assert isinstance(err.value, PrivacyError)


def test_lookup_refuses_an_unhashable_name() -> None:
    with pytest.raises(ValueError, match="accepted"):
        lookup({"a": 1}, ["unhashable"], "k")  # type: ignore[arg-type]


# --- each registry builds what its names say -------------------------------------------------


def test_every_registered_aggregator_runs_and_keeps_its_name() -> None:
    u = torch.randn(9, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for method in AGGREGATORS:
        agg = make_aggregator(method, f=2)
        assert agg.method == method and agg.f == 2
        assert agg(u, None, None).aggregate.shape == (4,)
    assert torch.equal(make_aggregator("fedavg", f=0)(u, None, None).aggregate,
                       fedavg(u).aggregate)


def test_pre_aggregations_are_the_mixing_functions() -> None:
    u = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert make_pre_aggregation("none", f=2, bucket_size=2, seed=0) is None
    nnm = make_pre_aggregation("nnm", f=2, bucket_size=2, seed=0)
    assert nnm is not None and torch.equal(nnm(u), nearest_neighbour_mixing(u, 2))
    # f is capped below n in a round that lost clients: with 2 rows and f=5 one neighbour left
    assert torch.equal(nnm(u[:2]), nearest_neighbour_mixing(u[:2], 1))
    bucket = make_pre_aggregation("bucketing", f=2, bucket_size=3, seed=7)
    generator = torch.Generator().manual_seed(7)
    assert bucket is not None
    for _ in range(2):  # one generator for the run: successive rounds shuffle differently
        assert torch.equal(bucket(u), bucketing(u, 3, generator))


def test_attack_registry_crafts_only_malicious_rows() -> None:
    u = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    for kind, spec in ATTACKS.items():
        out = _attack(kind, scale=3.0).craft(u, [1, 4], torch.Generator().manual_seed(0))
        honest = [0, 2, 3, 5]
        assert torch.equal(out[honest], u[honest]), kind
        assert torch.equal(out, u) == (spec.craft is None), kind
    out = _attack("sign_flip", scale=3.0).craft(u, [1, 4], torch.Generator())
    assert torch.equal(out[[1, 4]], -3.0 * u[[1, 4]])
    assert _attack("scaling").flips_labels and not _attack("alie").flips_labels


def _attack(kind: str, scale: float = 4.0) -> Attack:
    """An attack of ``kind`` on no client in particular, crafting as ``attack.*`` does by
    default (``scale`` aside)."""
    return Attack(kind=kind, malicious=frozenset(), scale=scale, noise_std=1.0, ipm_epsilon=0.5)


def _client(i: int, generator: torch.Generator) -> ClientData:
    def labels(n: int) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < 0.5).float()

    return ClientData(f"c{i}", torch.randn(20, 4, generator=generator), labels(20),
                      torch.randn(5, 4, generator=generator), labels(5),
                      tuple(range(100 * i, 100 * i + 20)), tuple(range(100 * i + 20, 100 * i + 25)))


@pytest.mark.parametrize("kind", list(ATTACKS))
def test_every_attack_kind_poisons_the_labels_exactly_when_it_says_so(kind: str) -> None:
    """The run's wiring flips the training labels of the malicious clients, and only theirs,
    for the kinds registered as data poisoning; the others train on the true labels."""
    generator = torch.Generator().manual_seed(0)
    data = [_client(i, generator) for i in range(4)]
    cfg = load_config(ROOT / "params.yaml", [f"attack.kind={kind}", "attack.fraction=0.5",
                                             "privacy.enabled=false"])
    setup = simulation_setup(cfg, data, dp=None)  # privacy.enabled=false: no recipe
    malicious = setup.attack.malicious if setup.attack is not None else frozenset()
    assert len(malicious) == (0 if kind == "none" else 2)
    flipped = {site.client_id for site, d in zip(setup.sites, data, strict=True)
               if torch.equal(site._data.y_train, 1.0 - d.y_train)}
    assert flipped == (set(malicious) if ATTACKS[kind].flips_labels else set())


def test_codec_registry_derives_the_decoder_table() -> None:
    ids = [cls.codec_id for cls in CODECS.values()]
    assert len(set(ids)) == len(ids)  # one header byte per codec
    assert {i: type(d) for i, d in _DECODERS.items()} == {cls.codec_id: cls
                                                          for cls in CODECS.values()}
    x = torch.linspace(-1, 1, 40)
    for name, cls in CODECS.items():
        payload = cls().encode(x)
        assert read_header(payload)[0] == cls.codec_id, name
        assert torch.equal(decode_payload(payload, 40), cls().decode(payload, 40)), name
    # a codec id nobody registered is refused by name, not decoded by a neighbour
    unknown = max(ids) + 1
    body = bytearray(next(iter(CODECS.values()))().encode(x)[:-4])
    body[5] = unknown
    forged = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(PayloadError, match=f"unknown codec {unknown}"):
        decode_payload(forged, 40)


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_builds_and_scores_each_row(kind: str) -> None:
    assert build_model(kind, 4, hidden_units=3, seed=0)(torch.zeros(2, 4)).shape == (2,)


@pytest.mark.parametrize("name", list(ACCOUNTANTS))
def test_every_accountant_is_the_mechanism_it_is_named_for(name: str) -> None:
    assert _accountant(name).mechanism() == name


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_grad_sample_mode_takes_the_same_clipped_step(kind: str) -> None:
    """Each mode computes the per-patient gradients; on the same data, model and noise every
    registered mode takes the same DP-SGD step (the first mode is the reference)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=generator)
    y = (torch.rand(12, generator=generator) < 0.5).float()
    patients = group_records(x, y, torch.arange(12) // 2)
    steps = {}
    for mode in GRAD_SAMPLE_MODES:
        model = build_model(kind, 4, hidden_units=3, seed=0)
        before = get_flat_params(model)
        cfg = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0,
                          learning_rate=1.0, delta=1e-5, accountant="rdp", grad_sample_mode=mode)
        trainer = PatientDPTrainer(model=model, data=patients, cfg=cfg)
        trainer.train(epochs=1, random=SeededRandom(0))
        assert trainer.steps == 1, mode
        steps[mode] = get_flat_params(model) - before
        assert 0 < float(steps[mode].norm()) <= 0.5 + 1e-6, mode  # moved, by at most C
    reference = next(iter(steps.values()))
    for mode, step in steps.items():
        torch.testing.assert_close(step, reference, msg=mode)


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
    inner = make_aggregator("fedavg", f=2)
    defense = Defense(aggregator=DPFedAvg(clip_norm=2.0, noise_multiplier=0.7,
                                          expected_clients=7.0, random=SeededRandom(1),
                                          inner=inner))
    got = defense.aggregate(u, torch.ones(7, dtype=torch.float64), None).aggregate
    want = dp_fedavg(u, 2.0, 0.7, 7.0, SeededRandom(1)).aggregate
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("method", [m for m in AGGREGATORS if m != "fedavg"])
def test_dp_fedavg_refuses_to_wrap_a_rule_that_is_not_the_plain_mean(method: str) -> None:
    with pytest.raises(PrivacyError, match=rf"aggregation.method={method!r}.*clipped sum.*"
                                           r"aggregation.method=fedavg"):
        DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, expected_clients=4.0,
                 random=SeededRandom(0), inner=make_aggregator(method, f=1))


def test_dp_fedavg_refuses_an_opaque_callable_and_bad_parameters() -> None:
    with pytest.raises(PrivacyError, match="cannot wrap"):
        DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, expected_clients=4.0,
                 random=SeededRandom(0), inner=lambda u, w, p: fedavg(u, w))
    with pytest.raises(PrivacyError, match="clip_norm > 0"):
        DPFedAvg(clip_norm=0.0, noise_multiplier=1.0, expected_clients=4.0,
                 random=SeededRandom(0))
    with pytest.raises(PrivacyError, match="expected_clients > 0"):
        DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, expected_clients=0.0,
                 random=SeededRandom(0))
