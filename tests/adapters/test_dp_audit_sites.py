"""The DP audit audits the client a hospital runs (issue 24, item 5): sites mode's session
(:func:`adapters.site_session.serve_site`) and the white-box DP audit
(:func:`fl_core.audit.dp_audit.audit_dp`) build their :class:`SiteClient` with one constructor,
:func:`fl_core.federation.wiring.make_site_client`, and from the same configuration and the
same patients they build the same object graph: model, data, local training, codec and error
feedback, DP-SGD trainer, its recipe, its Poisson sampler, its Opacus optimizer and accountant,
and the kind of randomness."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import adapters.site_session as site_session
import fl_core.federation.wiring as wiring
from adapters.config_files import load_config
from adapters.site_files import split_by_site
from adapters.site_session import SiteSession, serve_site
from adapters.tables import ClinicalTable
from fl_core.audit.canary import CanaryInjection
from fl_core.audit.dp_audit import audit_dp
from fl_core.federation.site_client import SiteClient
from fl_core.privacy.dpsgd import PatientDPTrainer, PoissonSampler
from tests.conftest import data_config
from tests.federation import TEST_POLICY

OVERRIDES = ["rounds=2", "audit_dp.runs=2", "audit_dp.regenerate=false",
             "privacy.lifetime_epsilon=1000"]


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def client_graph(client: SiteClient) -> dict[str, Any]:
    """What a site's client is made of, as comparable values: every object it holds that acts
    on what leaves the site (types, parameters, initial state), nothing that is an identity."""
    d = client._data
    trainer = client.dp_trainer
    assert isinstance(trainer, PatientDPTrainer)
    opt = trainer._optimizer
    comp = client._compressor
    codec, feedback = comp.codec, comp.feedback
    random = client._randomness
    model = client._model
    return {
        "client": type(client).__qualname__, "site": client.client_id,
        "data": _digest(d.x_train, d.y_train, d.patient_ids(), d.x_test, d.y_test),
        "model": (repr(model), _digest(*model.state_dict().values())),
        "training": client._training,
        "codec": (repr(codec), codec.generator_state().tolist()
                  if hasattr(codec, "generator_state") else None),
        "uplink": (comp.warmup_rounds, type(feedback).__qualname__,
                   getattr(feedback, "momentum", None)),
        "randomness": (type(random).__qualname__, random.name, random.secure,
                       getattr(random, "seed", None), getattr(random, "labels", None)),
        "trainer": type(trainer).__qualname__, "recipe": trainer.cfg,
        "sampler": (type(trainer.sampler).__qualname__, trainer.sampler),
        "patients": _digest(trainer.data.x, trainer.data.y, trainer.data.mask),
        "module": type(trainer._module).__qualname__,
        "optimizer": ([c.__qualname__ for c in type(opt).__mro__], opt.noise_multiplier,
                      opt.max_grad_norm, opt.expected_batch_size, opt.loss_reduction,
                      type(opt.original_optimizer).__qualname__,
                      opt.original_optimizer.defaults),
        "accountant": (type(trainer._accountant).__qualname__, list(trainer._accountant.history)),
        "hook": trainer.per_patient_hook,
    }


class _Built(Exception):
    """Raised by the spy once serve_site has built its client: the session stops there."""


@pytest.mark.slow
def test_the_audited_client_is_the_sites_mode_client(project: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the four heart sites: the client serve_site builds from the site's own file
    (validation, policy and ledger passed for real) and the client the DP audit builds for the
    same site have equal object graphs, and both come from ``wiring.make_site_client``; the
    audit then hooks its canaries into that trainer and samples them with its own
    PoissonSampler."""
    cfg = load_config(project / "params.yaml", OVERRIDES)
    real = wiring.make_site_client
    at_sites: dict[str, dict[str, Any]] = {}

    def built_at_site(**kwargs: Any) -> SiteClient:
        client = real(**kwargs)
        at_sites[client.client_id] = client_graph(client)
        raise _Built

    assert site_session.make_site_client is real  # sites mode's one constructor is wiring's
    monkeypatch.setattr(site_session, "make_site_client", built_at_site)
    for index, site_file in enumerate(split_by_site(project / "data" / "raw"
                                                    / "heart_disease_uci.csv",
                                                    data_config().spec)):
        path = tmp_path / site_file.slug / "heart_disease_uci.csv"
        path.parent.mkdir(parents=True)
        path.write_text(site_file.text())
        session = SiteSession(None, site_file.site, tmp_path / "state" / site_file.slug,  # type: ignore[arg-type]
                              "run1")
        with warnings.catch_warnings(), pytest.raises(_Built):
            warnings.simplefilter("ignore")
            serve_site(cfg, csv_path=path, site=site_file.site, index=index, session=session,
                       idle_timeout_s=1, policy=TEST_POLICY)

    audited: dict[str, dict[str, Any]] = {}
    trainers: list[PatientDPTrainer] = []

    def built_for_audit(**kwargs: Any) -> SiteClient:
        client = real(**kwargs)
        audited[client.client_id] = client_graph(client)
        assert client.dp_trainer is not None
        trainers.append(client.dp_trainer)
        return client

    monkeypatch.setattr(wiring, "make_site_client", built_for_audit)
    data = ClinicalTable.get(cfg.data, project).partitioned(cfg.data, cfg.seed)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = audit_dp(cfg, data)
    assert result.runs == 2 and result.rounds == cfg.rounds
    assert sorted(audited) == sorted(at_sites) == sorted(d.client_id for d in data)
    for site, graph in at_sites.items():
        assert audited[site] == graph, site
    assert graph["hook"] is None and graph["randomness"][1] == "secure"
    # the audited trainers then carry the canaries, drawn by their own production sampler
    assert all(isinstance(t.per_patient_hook, CanaryInjection) for t in trainers)
    assert all(type(t.sampler) is PoissonSampler
               and t.sampler.rate == cfg.privacy.sample_rate for t in trainers)


@pytest.mark.slow
def test_the_graph_tells_a_divergent_client_apart() -> None:
    """The comparison above can fail: a client built with another codec seed (site index),
    seeded instead of secure randomness, another σ, or another sampler differs from the
    sites-mode client in exactly that part of its graph."""
    from fl_core.federation.wiring import make_dpsgd
    from fl_core.privacy.randomness import SecureRandom, SeededRandom

    root = Path(__file__).resolve().parents[2]
    # top-k (whose stochastic rounding is seeded by the site's index) for the regression too
    cfg = load_config(root / "params.yaml", ["rounds=2", "compression.min_parameters=0"])
    data = ClinicalTable.get(cfg.data, root).partitioned(cfg.data, cfg.seed)[0][2]
    dp = make_dpsgd(cfg=cfg, data=[data])
    assert dp is not None

    def graph(**changes: Any) -> dict[str, Any]:
        sampler = changes.pop("sampler", None)
        kwargs = {"cfg": cfg, "data": data, "index": 0, "dp": dp, "random": SecureRandom(),
                  **changes}
        client = wiring.make_site_client(**kwargs)
        if sampler is not None:
            assert client.dp_trainer is not None
            client.dp_trainer.sampler = sampler
        return client_graph(client)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = graph()
        assert graph() == base
        for changes, part in (({"index": 1}, {"codec"}),
                              ({"random": SeededRandom(cfg.seed)}, {"randomness"}),
                              ({"dp": make_dpsgd(cfg=cfg.model_copy(update={"rounds": 3}),
                                                 data=[data])}, {"recipe", "optimizer"}),
                              ({"sampler": PoissonSampler(0.5)}, {"sampler"})):
            other = graph(**changes)
            assert {k for k in base if base[k] != other[k]} == part, changes
