import dataclasses
import math
import threading

import pytest
import torch

from fl_core.codec.dense import DenseCodec, dense_size
from fl_core.codec.error_feedback import UpdateCompressor
from fl_core.codec.framing import FRAME_BYTES
from fl_core.codec.topk import TopKQuantizer
from fl_core.data.tables import ClientData
from fl_core.federation import (
    EvaluateInstruction,
    FitInstruction,
    FitReply,
    decode_message,
    encode_message,
)
from fl_core.federation.coordinator import (
    FederationSettings,
    RoundFailedError,
    RoundRecord,
    TrainingResult,
)
from fl_core.federation.simulation import simulate
from fl_core.federation.site_client import LocalTrainingConfig, SiteClient
from fl_core.model.networks import build_model, get_flat_params, set_flat_params
from fl_core.privacy.randomness import SeededRandom
from fl_core.privacy.release import EvaluationRelease

# these runs are not private: their sites release an exact (noise 0), fine histogram, so that
# the engine's figures can be checked against the models' predictions
EXACT = EvaluationRelease(bins=4096, noise=0.0)


def run(sites: list[SiteClient], init: torch.Tensor, rounds: int, min_clients: int = 1,
        timeout: float = 60.0, **options: object) -> TrainingResult:
    """The engine over in-process sites, local epochs as the sites were built with."""
    settings = FederationSettings(rounds=rounds, min_clients=min_clients,
                                  local_epochs=sites[0]._training.local_epochs,
                                  round_timeout_s=timeout, client_fraction=1.0)
    return simulate(sites, initial_params=init, settings=settings, **options)  # type: ignore


def make_client(cid: str, n: int, seed: int) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([2.0, -1.0, 0.5])
    x = torch.randn(n, 3, generator=g)
    y = ((x @ w) > 0).float()
    k = n * 4 // 5
    return ClientData(cid, x[:k], y[:k], x[k:], y[k:], tuple(range(k)), tuple(range(k, n)))


def clients(n_clients: int = 3, cls=SiteClient, **kw):
    def factory():
        return build_model("logreg", 3, hidden_units=32, seed=0)

    cfg = LocalTrainingConfig(local_epochs=2, batch_size=16, learning_rate=0.5, seed=1)
    make = kw.pop("compressor_factory", None)
    kw.setdefault("evaluation", EXACT)
    return [cls(data=make_client(f"c{i}", 100 + 20 * i, i), model_factory=factory,
                training=cfg, compressor=make() if make else None, **kw)
            for i in range(n_clients)], factory


def test_federated_training_learns_and_counts_bytes() -> None:
    cs, factory = clients()
    init = get_flat_params(factory())
    result = run(cs, init, 5, 2)
    assert result.history[-1].accuracy > 0.9
    assert result.history[-1].accuracy > result.history[0].accuracy - 0.05
    size = len(DenseCodec().encode(init))
    rec = result.history[0]
    assert rec.bytes_uploaded == 3 * size          # lengths of the bytes actually sent
    assert rec.bytes_downloaded == 3 * size
    assert rec.bytes_uploaded_uncompressed == 3 * dense_size(init.numel())
    assert not torch.equal(result.params, init)


def test_pooled_balanced_accuracy_is_that_of_every_test_row_at_probability_half() -> None:
    from sklearn.metrics import balanced_accuracy_score

    cs, factory = clients()
    result = run(cs, get_flat_params(factory()), 2, 2)
    model = factory()
    set_flat_params(model, result.params)
    data = [make_client(f"c{i}", 100 + 20 * i, i) for i in range(3)]  # as clients() built
    with torch.no_grad():
        predicted = torch.cat([model(d.x_test) > 0 for d in data])
    actual = torch.cat([d.y_test for d in data]) > 0.5
    expected = balanced_accuracy_score(actual.numpy(), predicted.numpy())
    assert result.history[-1].balanced_accuracy == pytest.approx(expected, abs=1e-12)
    assert 0.5 < expected < result.history[-1].accuracy + 0.1


def test_same_seed_same_result() -> None:
    a, factory = clients()
    b, _ = clients()
    init = get_flat_params(factory())
    ra = run(a, init, 3)
    rb = run(b, init, 3)
    assert torch.equal(ra.params, rb.params)
    assert [r.accuracy for r in ra.history] == [r.accuracy for r in rb.history]


def test_fedavg_weights_by_training_size() -> None:
    # one round with one local step each: aggregate = size-weighted mean of client deltas
    cs, factory = clients()
    init = get_flat_params(factory())
    result = run(cs, init, 1)
    deltas, sizes = [], []
    for c in clients()[0]:
        reply = c.fit(FitInstruction("r", 1, DenseCodec().encode(init), 2))
        deltas.append(DenseCodec().decode(reply.update))
        sizes.append(reply.num_patients)
    w = torch.tensor(sizes, dtype=torch.float32)
    expected = init + (torch.stack(deltas) * (w / w.sum())[:, None]).sum(0)
    assert torch.allclose(result.params, expected, atol=1e-6)


class Vanishing(SiteClient):
    def fit(self, instruction: FitInstruction) -> FitReply:
        if self.client_id == "c1" and instruction.round == 2:
            raise ConnectionError("hospital c1 went offline")
        return super().fit(instruction)


class Corrupting(SiteClient):
    def fit(self, instruction: FitInstruction) -> FitReply:
        reply = super().fit(instruction)
        if self.client_id == "c2":
            payload = bytearray(reply.update)
            payload[20] ^= 0xFF
            return dataclasses.replace(reply, update=bytes(payload))
        return reply


class NaNClient(SiteClient):
    def fit(self, instruction: FitInstruction) -> FitReply:
        reply = super().fit(instruction)
        if self.client_id == "c0":
            set_flat_params(self._model, torch.full((4,), float("nan")))
            return dataclasses.replace(
                reply, update=DenseCodec().encode(get_flat_params(self._model)))
        return reply


def test_vanished_client_fails_only_its_round() -> None:
    cs, factory = clients(cls=Vanishing)
    result = run(cs, get_flat_params(factory()), 3, 2)
    assert [r.failed_clients for r in result.history] == [[], ["c1"], []]
    assert result.history[1].clients_ok == 2
    assert "c1" in str(result.failures[0]) and "offline" in str(result.failures[0])


def test_corrupted_payload_names_client_and_round_goes_on() -> None:
    cs, factory = clients(cls=Corrupting)
    result = run(cs, get_flat_params(factory()), 2, 2)
    assert all(r.failed_clients == ["c2"] for r in result.history)
    assert "client 'c2'" in str(result.failures[0]) and "checksum" in str(result.failures[0])


def test_nan_update_refused_at_client() -> None:
    cs, factory = clients(cls=NaNClient)
    result = run(cs, get_flat_params(factory()), 1, 2)
    assert result.history[0].failed_clients == ["c0"]
    assert "non-finite" in str(result.failures[0])
    assert torch.isfinite(result.params).all()


def test_too_few_clients_fails_the_round() -> None:
    cs, factory = clients(cls=Corrupting, n_clients=3)
    with pytest.raises(RoundFailedError, match="min_clients=3"):
        run(cs, get_flat_params(factory()), 1, 3)
    with pytest.raises(ValueError, match="only 3 clients"):
        run(cs, get_flat_params(factory()), 1, 4)


class WrongVersion(SiteClient):
    def fit(self, instruction: FitInstruction) -> FitReply:
        reply = super().fit(instruction)
        payload = bytearray(reply.update)
        if self.client_id == "c0":
            payload[4] = 7  # a future format version; CRC recomputed so only the version is wrong
            import zlib

            payload[-4:] = zlib.crc32(bytes(payload[:-4])).to_bytes(4, "little")
        if self.client_id == "c1":
            payload = payload[: len(payload) // 2]
        return dataclasses.replace(reply, update=bytes(payload))


def test_wrong_version_and_truncated_payloads_fail_only_their_clients() -> None:
    cs, factory = clients(cls=WrongVersion, compressor_factory=lambda: UpdateCompressor(
        TopKQuantizer(0.5, 8)))
    result = run(cs, get_flat_params(factory()), 2, 1)
    assert [r.failed_clients for r in result.history] == [["c0", "c1"]] * 2
    messages = [str(f) for f in result.failures[:2]]
    assert "client 'c0'" in messages[0] and "version 7" in messages[0]
    assert "client 'c1'" in messages[1] and ("truncated" in messages[1]
                                             or "checksum" in messages[1])


def wide_clients(compressor_factory=None, n_clients: int = 3):
    """Clients of a 20-feature problem, so that top-k has something to choose from."""
    w = torch.linspace(-2, 2, 20)

    def data(i: int) -> ClientData:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(300, 20, generator=g)
        y = ((x @ w) > 0).float()
        return ClientData(f"c{i}", x[:240], y[:240], x[240:], y[240:], tuple(range(240)),
                          tuple(range(240, 300)))

    def factory():
        return build_model("logreg", 20, hidden_units=32, seed=0)

    cfg = LocalTrainingConfig(local_epochs=1, batch_size=32, learning_rate=0.2, seed=1)
    return [SiteClient(data=data(i), model_factory=factory, training=cfg, evaluation=EXACT,
                       compressor=compressor_factory() if compressor_factory else None)
            for i in range(n_clients)], factory


def test_compressed_training_sends_fewer_bytes_and_still_learns() -> None:
    dense, factory = wide_clients()
    sparse, _ = wide_clients(lambda: UpdateCompressor(TopKQuantizer(0.2, 8)))
    init = get_flat_params(factory())
    a = run(dense, init, 15)
    b = run(sparse, init, 15)
    assert b.history[-1].accuracy > 0.9
    assert b.history[-1].accuracy > a.history[-1].accuracy - 0.05
    up_dense = sum(r.bytes_uploaded for r in a.history)
    up_sparse = sum(r.bytes_uploaded for r in b.history)
    assert up_sparse < up_dense / 2
    assert sum(r.bytes_uploaded_uncompressed for r in b.history) == up_dense


def test_compressed_downlink_counts_deltas_and_keeps_clients_in_step() -> None:
    cs, factory = wide_clients(lambda: UpdateCompressor(TopKQuantizer(0.2, 8)))
    init = get_flat_params(factory())
    result = run(cs, init, 10, downlink=TopKQuantizer(0.2, 8))
    first, later = result.history[0], result.history[1]
    assert first.bytes_downloaded == first.bytes_downloaded_uncompressed  # the full model once
    assert later.bytes_downloaded < later.bytes_downloaded_uncompressed / 2
    replicas = [c._replica.params for c in cs]
    assert all(torch.equal(r, replicas[0]) for r in replicas)  # every client holds the same copy
    assert result.history[-1].accuracy > 0.85
    assert later.bytes_downloaded / len(cs) > FRAME_BYTES


def test_sign_flip_attack_breaks_fedavg_but_not_multi_krum() -> None:
    from fl_core.federation.coordinator import Defense
    from fl_core.robust.aggregators import make_aggregator
    from fl_core.robust.attacks import Attack

    attack = Attack(kind="sign_flip", malicious=frozenset({"c0", "c1"}), scale=4.0,
                    noise_std=1.0, ipm_epsilon=0.5)
    plain, factory = wide_clients(n_clients=7)
    robust, _ = wide_clients(n_clients=7)
    init = get_flat_params(factory())
    broken = run(plain, init, 8, attack=attack)
    defended = run(robust, init, 8, attack=attack,
                             defense=Defense(aggregator=make_aggregator("multi_krum", f=2)))
    assert broken.history[-1].accuracy < 0.7
    assert defended.history[-1].accuracy > 0.9


def test_absurd_update_is_rejected_and_flagged_clients_are_reported() -> None:
    from fl_core.federation.coordinator import Defense
    from fl_core.robust.attacks import Attack

    cs, factory = wide_clients(n_clients=7)
    attack = Attack(kind="scaling", malicious=frozenset({"c3"}), scale=1e6,  # an absurd norm
                    noise_std=1.0, ipm_epsilon=0.5)
    result = run(cs, get_flat_params(factory()), 3, attack=attack,
                           defense=Defense(detect=True))
    assert all(r.rejected_clients == ["c3"] for r in result.history)
    assert all(r.clients_ok == 6 for r in result.history)
    assert result.history[-1].accuracy > 0.85

    cs, factory = wide_clients(n_clients=7)
    attack = Attack(kind="scaling", malicious=frozenset({"c3"}), scale=20.0,  # large, not absurd
                    noise_std=1.0, ipm_epsilon=0.5)
    result = run(cs, get_flat_params(factory()), 4, attack=attack,
                           defense=Defense(detect=True))
    assert all("c3" in r.flagged_clients for r in result.history)
    assert "c3" in result.history[-1].excluded_clients  # the third flag in a row excludes it


# --- one bad site never takes down a round ------------------------------------------------------


def oversized_topk_payload(declared: int = 4_000_000_000) -> bytes:
    """A well-formed, checksummed top-k payload with k = 0 that declares ``declared``
    elements: a few dozen bytes that once made the decoder allocate 16 GB."""
    import struct

    from fl_core.codec.framing import CODEC_TOPK, frame
    from fl_core.codec.topk import INDEX_RICE, TOPK_HEAD

    body = TOPK_HEAD.pack(8, INDEX_RICE, 0, 1, 0, 1024) + struct.pack("<I", declared)
    return frame(CODEC_TOPK, declared, body)


class BadReplies(SiteClient):
    """c0 replies None, c1 a str, c2 an oversized update header; c3 crashes in evaluation, c4
    vanishes in evaluation, c5 replies to evaluation with something that is not bytes."""

    def handle(self, request: bytes) -> object:  # type: ignore[override]
        instruction = decode_message(request)
        if isinstance(instruction, EvaluateInstruction):
            if self.client_id == "c3":
                raise RuntimeError("evaluation crashed")
            if self.client_id == "c4":
                raise ConnectionError("site went away")
            if self.client_id == "c5":
                return None
            return super().handle(request)
        reply = super().handle(request)
        if self.client_id == "c2":
            forged = dataclasses.replace(decode_message(reply), update=oversized_topk_payload())
            return encode_message(forged)
        return {"c0": None, "c1": "update"}.get(self.client_id, reply)


def test_bad_replies_fail_only_their_sites_with_named_reasons() -> None:
    cs, factory = clients(n_clients=7, cls=BadReplies)
    result = run(cs, get_flat_params(factory()), 2, 2)
    assert len(result.history) == 2
    for record in result.history:
        assert sorted(record.failed_clients) == ["c0", "c1", "c2", "c3", "c4", "c5"]
        assert record.clients_ok == 4  # c3..c6 trained; c3, c4, c5 only failed evaluation
        assert set(record.client_accuracy) == {"c0", "c1", "c2", "c6"}
    reasons = {f.client_id: f.reason for f in result.failures[:6]}
    assert "a NoneType, not bytes" in reasons["c0"]
    assert "a str, not bytes" in reasons["c1"]
    assert "declares 4000000000 elements, the model has 4" in reasons["c2"]
    assert "evaluation failed (RuntimeError: evaluation crashed)" in reasons["c3"]
    assert "ConnectionError" in reasons["c4"] and "NoneType" in reasons["c5"]


def test_oversized_header_is_refused_before_allocating() -> None:
    """The decode of the forged payload, in a fresh process, must not grow the peak RSS by
    more than a small multiple of the model (it would by 16 GB if it allocated)."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from tests.fl_core.federation.test_coordinator import oversized_topk_payload\n"
        "from fl_core.codec.framing import PayloadError\n"
        "from fl_core.codec.payload import decode_payload\n"
        "payload = oversized_topk_payload()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_payload(payload, expected_elements=19)\n"
        "except PayloadError as exc:\n"
        "    print('refused:', exc)\n"
        "print('grew_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: payload declares 4000000000 elements, the model has 19" in out.stdout
    assert len(oversized_topk_payload()) < 40
    grew_kib = int(out.stdout.split("grew_kib")[1])
    assert grew_kib < 64 * 1024  # < 64 MiB: nothing near the declared 16 GB


def test_client_refuses_a_broadcast_of_the_wrong_size() -> None:
    from fl_core.codec.framing import PayloadError

    cs, factory = clients(n_clients=1)
    with pytest.raises(PayloadError, match="declares 4000000000 elements, the model has 4"):
        cs[0].fit(FitInstruction("r", 1, oversized_topk_payload(), 1))


# --- deadlines, state that travels ---------------------------------------------------------------


class Straggler(SiteClient):
    """c1 is held in round 2's fit until the test releases it: past the round's deadline for
    as long as the test says, with events instead of sleeps (no assertion on elapsed time)."""

    entered = threading.Event()  # c1 is inside round 2's fit
    release = threading.Event()  # the test lets it finish
    finished = threading.Event()  # its reply is back and it takes requests again

    def fit(self, instruction: FitInstruction) -> FitReply:
        if self.client_id == "c1" and instruction.round == 2:
            self.entered.set()
            self.release.wait(30)  # bounded: a coordinator that waits for it fails, not hangs
        return super().fit(instruction)

    def handle(self, request: bytes) -> bytes:
        try:
            return super().handle(request)
        finally:  # after the site's busy lock is released
            if self.client_id == "c1" and self.release.is_set():
                self.finished.set()


@pytest.mark.slow
def test_a_site_past_the_deadline_fails_only_that_round() -> None:
    for event in (Straggler.entered, Straggler.release, Straggler.finished):
        event.clear()
    cs, factory = clients(cls=Straggler)
    held_when_round_2_closed: list[bool] = []

    def sink(record: RoundRecord) -> None:
        if record.round == 2:  # the round closed without c1: it must still be held in fit
            held_when_round_2_closed.append(Straggler.entered.is_set()
                                            and not Straggler.release.is_set())
            Straggler.release.set()
            Straggler.finished.wait(60)  # c1 is free again before round 3 asks it

    # a deadline the healthy sites meet even on a loaded machine's first (cold) round: only
    # the held straggler misses it (0.5 s failed every site in round 1 when run on its own)
    result = run(cs, get_flat_params(factory()), 4, 2, timeout=3.0, sinks=[sink])
    assert held_when_round_2_closed == [True]  # the round did not wait for the straggler
    assert len(result.history) == 4
    assert [r.failed_clients for r in result.history] == [[], ["c1"], [], []]
    assert result.history[1].clients_ok == 2 and result.history[2].clients_ok == 3
    assert "missed the round deadline of 3 s" in result.history[1].failure_reasons["c1"]
    assert [f.client_id for f in result.failures] == ["c1", "c1"]
    assert "missed the round deadline of 3 s" in str(result.failures[0])
    assert "busy with an earlier request" in str(result.failures[1])  # its evaluation


def test_sites_run_concurrently() -> None:
    """Every site's fit waits at a barrier for all four: sites handled one after another
    would break it (each party waits at most 30 s), so every round needs them concurrent."""
    barrier = threading.Barrier(4, timeout=30)

    class Together(SiteClient):
        def fit(self, instruction: FitInstruction) -> FitReply:
            barrier.wait()
            return super().fit(instruction)

    cs, factory = clients(n_clients=4, cls=Together)
    result = run(cs, get_flat_params(factory()), 2)
    assert result.failures == []
    assert [r.clients_ok for r in result.history] == [4, 4]
    assert not barrier.broken


def _dp_sites(compressor: bool) -> tuple[list[SiteClient], object]:
    from fl_core.privacy.dpsgd import DPSGDConfig
    from fl_core.privacy.randomness import SeededRandom

    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                     learning_rate=0.5, delta=1e-5, accountant="rdp", grad_sample_mode="hooks")
    cs, factory = clients(compressor_factory=(lambda: UpdateCompressor(
        TopKQuantizer(0.5, 8, stochastic=True, seed=3), momentum=0.5)) if compressor else None,
        privacy=dp, randomness=SeededRandom(7))
    return cs, factory


def _rounds_3_to_5(sites: list[SiteClient], params: torch.Tensor) -> TrainingResult:
    """The coordinator resuming a 5-round run at round 3 from the round-2 model."""
    from fl_core.federation.coordinator import run_federated
    from fl_core.federation.transport import InProcessTransport

    transport = InProcessTransport({s.client_id: s.handle for s in sites})
    try:
        return run_federated(
            transport=transport, sites=[s.client_id for s in sites], initial_params=params,
            first_round=3, settings=FederationSettings(rounds=5, local_epochs=2, min_clients=1,
                                                       round_timeout_s=300.0,
                                                       client_fraction=1.0))
    finally:
        transport.close()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_site_stopped_after_round_k_and_restored_is_bit_identical() -> None:
    """DP-SGD (accountant), error feedback with momentum and stochastic rounding (generator):
    sites stopped after round 2, rebuilt from scratch, restored from their state_dict, and the
    coordinator continuing from the round-2 model give the uninterrupted run's parameters."""
    uninterrupted, factory = _dp_sites(compressor=True)
    init = get_flat_params(factory())
    whole = run(uninterrupted, init, 5)

    first, _ = _dp_sites(compressor=True)
    part1 = run(first, init, 2)
    states = [site.state_dict() for site in first]
    assert all(s["accountant_history"] and s["residual"] is not None for s in states)
    resumed, _ = _dp_sites(compressor=True)  # a fresh process: nothing but the saved state
    for site, state in zip(resumed, states, strict=True):
        site.load_state_dict(state)
    rest = _rounds_3_to_5(resumed, part1.params)
    torch.testing.assert_close(rest.params, whole.params, rtol=0, atol=0)
    assert rest.site_epsilon == whole.site_epsilon and rest.site_dp_steps == whole.site_dp_steps

    not_restored, _ = _dp_sites(compressor=True)  # the same without the state: it differs
    cold = _rounds_3_to_5(not_restored, part1.params)
    assert not torch.equal(cold.params, whole.params)


def test_downlink_replica_travels_in_the_state_dict() -> None:
    cs, factory = clients(n_clients=1)
    site, init = cs[0], get_flat_params(factory())
    broadcast_codec = TopKQuantizer(0.5, 8)
    site.fit(FitInstruction("r", 1, DenseCodec().encode(init), 1))
    delta = broadcast_codec.encode(torch.ones_like(init))
    copy, _ = clients(n_clients=1)
    copy[0].load_state_dict(site.state_dict())
    a = site.fit(FitInstruction("r", 2, delta, 1))
    b = copy[0].fit(FitInstruction("r", 2, delta, 1))
    assert a.update == b.update
    with pytest.raises(ValueError, match="state of site 'c0' loaded into site 'c1'"):
        clients(n_clients=2)[0][1].load_state_dict(site.state_dict())


def test_a_busy_site_refuses_a_second_request() -> None:
    cs, factory = clients(n_clients=1)
    site = cs[0]
    request = encode_message(FitInstruction("r", 1, DenseCodec().encode(
        get_flat_params(factory())), 1))
    with site._busy:
        reply = decode_message(site.handle(request))
    assert reply.reason == "busy with an earlier request"  # type: ignore[union-attr]


# --- what the engine reads of the sites' statistics (issue 24: DP or not released) ------------


def test_dp_sites_release_no_train_loss_and_the_round_shows_it_missing() -> None:
    cs, factory = _dp_sites(compressor=False)
    reply = cs[0].fit(FitInstruction("r", 1, DenseCodec().encode(get_flat_params(factory())), 1))
    assert reply.train_loss is None
    decoded = decode_message(encode_message(reply))
    assert isinstance(decoded, FitReply) and decoded.train_loss is None
    result = run(_dp_sites(compressor=False)[0], get_flat_params(factory()), 1)
    assert math.isnan(result.history[0].train_loss)
    plain = run(clients()[0], get_flat_params(factory()), 1)  # not private: released
    assert plain.history[0].train_loss > 0


def test_evaluation_runs_on_the_scheduled_rounds_only() -> None:
    cs, factory = clients()
    settings = FederationSettings(rounds=5, min_clients=1, local_epochs=1, round_timeout_s=60,
                                  client_fraction=1.0, evaluate_every=2)
    result = simulate(cs, initial_params=get_flat_params(factory()), settings=settings)
    evaluated = [r.round for r in result.history if not math.isnan(r.accuracy)]
    assert evaluated == [2, 4, 5]
    last_only = dataclasses.replace(settings, evaluate_every=0)
    result = simulate(clients()[0], initial_params=get_flat_params(factory()),
                      settings=last_only)
    assert [r.round for r in result.history if not math.isnan(r.auc)] == [5]


def test_noisy_evaluation_figures_come_from_the_noisy_histograms() -> None:
    """With noise the engine's figures are post-processing of what the sites released: close
    to the exact ones on a few hundred patients, never the exact ones."""
    noisy = EvaluationRelease(bins=10, noise=1.0)
    cs, factory = clients(evaluation=noisy, randomness=SeededRandom(3))
    init = get_flat_params(factory())
    result = run(cs, init, 3)
    exact = run(clients()[0], init, 3)
    a, b = result.history[-1], exact.history[-1]
    assert a.accuracy != b.accuracy and a.test_loss != b.test_loss  # AUC is clipped at 1 here
    assert a.accuracy == pytest.approx(b.accuracy, abs=0.1)
    assert a.auc == pytest.approx(b.auc, abs=0.1)
    assert 0 <= a.auc <= 1 and a.test_loss > 0
    with pytest.raises(ValueError, match="randomness"):
        clients(evaluation=noisy)
