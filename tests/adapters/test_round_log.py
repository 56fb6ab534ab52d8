"""A sites-mode run's round log (issue 23, item 5): the round sink appends one record per
round, signed with the endpoint's key, holding every reply's site signature; the file
verifies with the coordinator's and the sites' certificates, a site named by its
configuration id (``VA Long Beach``) found by its certificate's slug. The decision records:
tests/adapters/test_mlflow_registration.py; a whole run over the endpoint:
tests/adapters/test_site_session.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.artifacts import Paths
from adapters.config_files import build_config
from adapters.pki import endpoint_files
from adapters.publish import _run_log
from adapters.round_log import (
    EXCLUDED,
    FLAGGED,
    REJECTED,
    RunLog,
    load_signing_key,
    read_log,
    round_log_sink,
    verify_file,
)
from fl_core.config.model import site_slug
from fl_core.federation import round_log as rl
from fl_core.federation.coordinator import RoundRecord, params_sha256
from fl_core.federation.round_log import LogIntegrityError, SignedReply
from tests.federation import ProjectPki, make_pki

SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
RUN = "run7f3a"


@pytest.fixture(scope="module")
def project_pki(tmp_path_factory: pytest.TempPathFactory) -> ProjectPki:
    made = make_pki(tmp_path_factory.mktemp("pki"))
    for site in SITES:
        made.issued(site_slug(site))
    return made


def _site_key(made: ProjectPki, site: str) -> rl.PrivateKey:
    slug = site_slug(site)
    return load_signing_key(made.site_folder(slug) / f"{slug}.key")


def _site_certs(made: ProjectPki) -> list[Path]:
    return [made.site_folder(site_slug(s)) / f"{site_slug(s)}.crt" for s in SITES]


def _record(round_number: int, params: torch.Tensor) -> RoundRecord:
    """Round 2: VA Long Beach misses the deadline, Switzerland is flagged and excluded,
    Hungary's update rejected; the others are aggregated."""
    record = RoundRecord(round=round_number, train_loss=0.5, test_loss=0.6, accuracy=0.7,
                         auc=0.8, balanced_accuracy=0.7, bytes_uploaded=10,
                         bytes_downloaded=10, bytes_uploaded_uncompressed=10,
                         bytes_downloaded_uncompressed=10, clients_ok=len(SITES),
                         aggregated_clients=list(SITES), aggregate_sha256=params_sha256(params))
    if round_number == 2:
        record.failed_clients = ["VA Long Beach"]
        record.failure_reasons = {"VA Long Beach": "no update (missed the round deadline of "
                                                   "5 s)"}
        record.flagged_clients = ["Switzerland"]
        record.excluded_clients = ["Switzerland"]
        record.rejected_clients = ["Hungary"]
        record.aggregated_clients = ["Cleveland"]
        record.clients_ok = 1
    return record


def _receipts(made: ProjectPki, *, run: str = RUN,
              forge: str | None = None) -> dict[int, list[SignedReply]]:
    """Each site's training and evaluation replies of rounds 1-3, signed as the sites'
    channels sign them (``forge``: that site's signed by a key that is not its own)."""
    out: dict[int, list[SignedReply]] = {}
    for r in (1, 2, 3):
        for kind in ("fit", "evaluate"):
            for site in SITES:
                if r == 2 and site == "VA Long Beach":
                    continue  # its reply never came
                key = rl.ec.generate_private_key(rl.ec.SECP256R1()) if site == forge \
                    else _site_key(made, site)
                digest, signature = rl.sign_reply(key, run_id=run, round_number=r, site=site,
                                                  reply=f"{kind} {site} {r}".encode())
                out.setdefault(r, []).append(SignedReply(site, digest, signature))
    return out


def _write(path: Path, made: ProjectPki, receipts: dict[int, list[SignedReply]]) -> None:
    sink = round_log_sink(path, run_id=RUN, coordinator_key=load_signing_key(made.tls.server_key),
                          receipts=lambda r: receipts.get(r, []))
    for r in (1, 2, 3):
        sink(_record(r, torch.full((5,), float(r))))


def test_the_sink_appends_one_record_per_round_that_verifies(tmp_path: Path,
                                                            project_pki: ProjectPki) -> None:
    log = tmp_path / "round_log.jsonl"
    _write(log, project_pki, _receipts(project_pki))
    records = read_log(log)
    assert [(r.index, r.kind, r.run_id) for r in records] == [(i, "round", RUN) for i in range(3)]
    result = verify_file(log, coordinator_certs=[project_pki.tls.server_cert],
                         site_certs=_site_certs(project_pki), head=records[-1].hash)
    # every reply of every round checked against its site's certificate (found by its slug)
    assert (result.records, result.site_signatures, result.unchecked_sites) == (3, 22, ())
    body = records[1].body
    assert body["round"] == 2 and body["participants"] == ["Cleveland"]
    assert [r["site"] for r in body["replies"]] == ["Cleveland"] * 2 + ["Hungary"] * 2 + \
        ["Switzerland"] * 2
    assert body["aggregate_sha256"] == params_sha256(torch.full((5,), 2.0))
    assert body["dropouts"] == {"VA Long Beach": "no update (missed the round deadline of 5 s)"}
    assert body["flags"] == {"Switzerland": FLAGGED}
    assert body["exclusions"] == {"Hungary": REJECTED, "Switzerland": EXCLUDED}
    assert records[0].body["participants"] == sorted(SITES)
    assert records[0].body["dropouts"] == records[0].body["flags"] == {}


def test_a_reply_signed_by_another_key_or_for_another_run_is_named(
        tmp_path: Path, project_pki: ProjectPki) -> None:
    certs = {"coordinator_certs": [project_pki.tls.server_cert],
             "site_certs": _site_certs(project_pki)}
    forged = tmp_path / "forged.jsonl"
    _write(forged, project_pki, _receipts(project_pki, forge="Hungary"))
    with pytest.raises(LogIntegrityError, match="'Hungary'.*forged") as caught:
        verify_file(forged, **certs)  # type: ignore[arg-type]
    assert caught.value.position == 0
    replayed = tmp_path / "replayed.jsonl"  # replies of another run, recorded as this one's
    _write(replayed, project_pki, _receipts(project_pki, run="run0other"))
    with pytest.raises(LogIntegrityError, match="forged"):
        verify_file(replayed, **certs)  # type: ignore[arg-type]


def test_the_aggregate_hash_is_the_saved_parameters_bytes() -> None:
    params = torch.arange(6, dtype=torch.float32)
    assert params_sha256(params) == rl.sha256_hex(params.numpy().tobytes())
    assert params_sha256(params[::2]) == rl.sha256_hex(params[::2].contiguous().numpy().tobytes())
    assert params_sha256(params + 1) != params_sha256(params)


def test_only_a_sites_mode_flow_run_with_a_log_gets_the_decision(
        tmp_path: Path, project_pki: ProjectPki) -> None:
    sites = build_config({"state_dir": str(tmp_path / "state"),
                          "federation": {"mode": "sites", "sites": [{"id": s} for s in SITES],
                                         "endpoint": {"pki": str(project_pki.root)}}})
    simulation = build_config({"state_dir": str(tmp_path / "state")})
    paths = Paths.of(sites, tmp_path, RUN)
    assert endpoint_files(sites, tmp_path).server_key == project_pki.tls.server_key
    assert _run_log(sites, paths, RUN) is None  # no round was logged
    paths.round_log.parent.mkdir(parents=True)
    paths.round_log.write_bytes(b"")
    run_log = _run_log(sites, paths, RUN)
    assert isinstance(run_log, RunLog) and run_log.path == paths.round_log
    assert run_log.run_id == RUN
    assert _run_log(simulation, paths, RUN) is None  # nobody signs a simulation's replies
    assert _run_log(sites, Paths.of(sites, tmp_path), None) is None  # a stage run
