"""The round log nobody can rewrite (issue 23, build item 5): hash-chained records signed by
the coordinator, each reply signed by its site; ``verify`` and ``fedpriv log verify`` name the
record that was edited, deleted, swapped, inserted or whose signature is forged, and any
single-byte edit of the file is caught."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import pki
from adapters.round_log import (
    append_decision,
    append_round,
    load_signing_key,
    read_log,
    verify_file,
)
from adapters.stages import LOG_TAMPERED_EXIT
from fl_core.federation import round_log as rl
from fl_core.federation.round_log import (
    AliasMove,
    DecisionEntry,
    LogIntegrityError,
    LogRecord,
    RoundEntry,
    SignedReply,
)
from flows.cli import main

SITES = ("cleveland", "hungary", "swiss", "va-long-beach")
RUN = "run-7f3a"
TIME = "2030-06-01T12:00:00.000+00:00"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


COORDINATOR = _key()
SITE_KEYS = {s: _key() for s in SITES}
SITE_PUBLIC = {s: k.public_key() for s, k in SITE_KEYS.items()}


def entry(round_number: int, *, run: str = RUN, signer: dict[str, ec.EllipticCurvePrivateKey]
          | None = None) -> RoundEntry:
    """A round: three sites reply (each signs its reply), one drops out, one is flagged."""
    keys = signer or SITE_KEYS
    replies = []
    for site in SITES[:3]:
        digest, signature = rl.sign_reply(keys[site], run_id=run, round_number=round_number,
                                          site=site, reply=f"{site}-{round_number}".encode())
        replies.append(SignedReply(site, digest, signature))
    return RoundEntry(round=round_number, participants=SITES, replies=tuple(replies),
                      aggregate_sha256=rl.sha256_hex(b"aggregate %d" % round_number),
                      dropouts={"va-long-beach": "deadline (5 s) passed"},
                      flags={"swiss": "norm z-score 4.1"},
                      exclusions={"swiss": "multi_krum: not selected"})


DECISION = DecisionEntry(model="heart", version="3", verdict="passed",
                         alias_moves=(AliasMove("champion", "3", "2"),))


def build_log(rounds: int = 3, key: ec.EllipticCurvePrivateKey = COORDINATOR,
              run: str = RUN) -> list[LogRecord]:
    records: list[LogRecord] = []
    for r in range(1, rounds + 1):
        records.append(rl.round_record(records[-1] if records else None, entry(r, run=run),
                                       run_id=run, time=TIME, coordinator_key=key))
    records.append(rl.decision_record(records[-1], DECISION, run_id=run, time=TIME,
                                      coordinator_key=key))
    return records


LOG = build_log()


def check(records: list[LogRecord], **kwargs: object) -> rl.Verification:
    options: dict[str, object] = {"coordinator_public_key": COORDINATOR.public_key(),
                                  "site_public_keys": SITE_PUBLIC, **kwargs}
    return rl.verify(records, **options)  # type: ignore[arg-type]


def failure(records: list[LogRecord], **kwargs: object) -> LogIntegrityError:
    with pytest.raises(LogIntegrityError) as caught:
        check(records, **kwargs)
    return caught.value


# ---- the pure log -------------------------------------------------------------------------

def test_an_untouched_log_verifies() -> None:
    result = check(LOG, head=LOG[-1].hash)
    assert (result.records, result.head, result.site_signatures) == (4, LOG[-1].hash, 9)
    assert result.unchecked_sites == ()
    assert [r.index for r in LOG] == [0, 1, 2, 3]
    assert LOG[0].prev_hash == rl.GENESIS and LOG[2].prev_hash == LOG[1].hash
    assert LOG[0].body["dropouts"] == {"va-long-beach": "deadline (5 s) passed"}
    assert LOG[-1].body["alias_moves"] == [{"alias": "champion", "version": "3",
                                            "previous": "2"}]
    assert rl.parse_lines([r.line() for r in LOG]) == LOG


@pytest.mark.parametrize("position", range(4))
def test_an_edited_record_is_named(position: int) -> None:
    edited = list(LOG)
    edited[position] = dataclasses.replace(LOG[position], time="2030-06-02T00:00:00.000+00:00")
    err = failure(edited)
    assert err.position == position and "edited" in str(err)
    assert str(err).startswith(f"record {position} (line {position + 1}):")


def test_an_edited_record_rehashed_fails_the_coordinators_signature() -> None:
    forged = dataclasses.replace(LOG[1], body={**LOG[1].body, "exclusions": {}})
    forged = dataclasses.replace(forged, hash=rl.sha256_hex(rl.canonical(forged.content())))
    err = failure([LOG[0], forged, *LOG[2:]])
    assert err.position == 1 and "coordinator's signature" in err.reason


@pytest.mark.parametrize("position", range(3))
def test_a_deleted_record_is_named(position: int) -> None:
    err = failure(LOG[:position] + LOG[position + 1:])
    assert err.position == position and "deleted" in err.reason


def test_records_deleted_at_the_end_are_caught_against_the_head() -> None:
    assert check(LOG[:-1]).records == 3  # a shorter chain is still a chain ...
    err = failure(LOG[:-1], head=LOG[-1].hash)  # ... but not the one the model's tag names
    assert err.position == 2 and "head" in err.reason


@pytest.mark.parametrize("position", range(3))
def test_two_swapped_records_are_named(position: int) -> None:
    swapped = list(LOG)
    swapped[position], swapped[position + 1] = swapped[position + 1], swapped[position]
    err = failure(swapped)
    assert err.position == position and "swapped" in err.reason


def test_an_inserted_record_is_named() -> None:
    # a validly signed record of another log of the same coordinator, at its own index
    other = build_log(rounds=2, run="run-other")
    err = failure([LOG[0], other[1], *LOG[1:]])
    assert err.position == 1 and "chain broken" in err.reason
    # a copy of the record before it
    err = failure([LOG[0], LOG[1], LOG[1], *LOG[2:]])
    assert err.position == 2 and "inserted" in err.reason


def test_a_site_signature_from_the_wrong_key_is_named() -> None:
    thief = {**SITE_KEYS, "hungary": _key()}  # the coordinator invents hungary's reply
    records = LOG[:1]
    records.append(rl.round_record(records[0], entry(2, signer=thief), run_id=RUN, time=TIME,
                                   coordinator_key=COORDINATOR))
    err = failure(records)
    assert err.position == 1 and "'hungary'" in err.reason and "forged" in err.reason
    # without hungary's key the record is not checked, and says so
    result = check(records, site_public_keys={s: k for s, k in SITE_PUBLIC.items()
                                              if s != "hungary"})
    assert result.unchecked_sites == ("hungary",)


def test_a_site_signature_is_bound_to_its_run_round_and_site() -> None:
    genuine = entry(1)
    for moved in (dataclasses.replace(genuine, round=2),):  # replayed in a later round
        record = rl.round_record(None, moved, run_id=RUN, time=TIME, coordinator_key=COORDINATOR)
        assert "forged" in failure([record]).reason
    record = rl.round_record(None, genuine, run_id="run-later", time=TIME,
                             coordinator_key=COORDINATOR)  # replayed in a later run
    assert "forged" in failure([record]).reason
    claimed = dataclasses.replace(genuine.replies[0], site="hungary")  # claimed for another
    record = rl.round_record(None, dataclasses.replace(genuine, replies=(claimed,)), run_id=RUN,
                             time=TIME, coordinator_key=COORDINATOR)
    assert "'hungary'" in failure([record]).reason


def test_a_coordinator_signature_from_the_wrong_key_is_named() -> None:
    err = failure(build_log(key=_key()))
    assert err.position == 0 and "coordinator's signature" in err.reason
    # a renewed key: both keys verify their own records
    renewed = _key()
    mixed = LOG[:2]
    mixed.append(rl.round_record(mixed[-1], entry(3), run_id=RUN, time=TIME,
                                 coordinator_key=renewed))
    assert failure(mixed).position == 2
    assert check(mixed, coordinator_public_key=[COORDINATOR.public_key(),
                                                renewed.public_key()]).records == 3


def test_ed25519_keys_sign_and_verify_too() -> None:
    coordinator, site = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    digest, signature = rl.sign_reply(site, run_id=RUN, round_number=1, site="hungary",
                                      reply=b"x")
    record = rl.round_record(None, RoundEntry(1, ("hungary",), (SignedReply("hungary", digest,
                                                                            signature),), "0" * 64),
                             run_id=RUN, time=TIME, coordinator_key=coordinator)
    assert rl.verify([record], coordinator_public_key=coordinator.public_key(),
                     site_public_keys={"hungary": site.public_key()}).site_signatures == 1


def test_floats_are_refused_and_lines_must_be_canonical() -> None:
    with pytest.raises(TypeError, match="no floats"):
        rl.canonical({"loss": 0.5})
    line = LOG[0].line()
    assert b" " not in line.split(b'"dropouts"')[0]  # no spaces between tokens
    spaced = line.replace(b'"index":0', b'"index": 0')
    with pytest.raises(LogIntegrityError, match="canonical"):
        rl.parse_line(spaced, 0)
    upper = line.replace(LOG[0].signature.encode(), LOG[0].signature.upper().encode())
    with pytest.raises(LogIntegrityError, match="signature"):
        rl.parse_line(upper, 0)


# ---- the file ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the endpoint's certificate (its key signs the log) and two sites' certificates."""
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root / "ca", name="log test CA", days=30)
    pki.issue_server_certificate(root / "ca", host="127.0.0.1", days=30, out_dir=root / "server")
    for site in ("hungary", "swiss"):
        req = pki.request_certificate(site, root / "sites")
        pki.sign_request(req.csr, root / "ca", days=30, out=root / "sites" / f"{site}.crt")
    return root


def write_log(path: Path, pki_dir: Path, rounds: int = 3, run: str = RUN,
              forge: str | None = None) -> list[LogRecord]:
    """A log file signed with the endpoint's key; the sites sign with their keys (``forge``:
    that site's replies signed by another key)."""
    coordinator = load_signing_key(pki_dir / "server" / "server.key")
    keys = {s: load_signing_key(pki_dir / "sites" / f"{s}.key") for s in ("hungary", "swiss")}
    if forge:
        keys[forge] = _key()
    now = datetime.datetime(2030, 6, 1, tzinfo=datetime.UTC)
    for r in range(1, rounds + 1):
        replies = []
        for site, key in keys.items():
            digest, sig = rl.sign_reply(key, run_id=run, round_number=r, site=site,
                                        reply=b"update %d" % r)
            replies.append(SignedReply(site, digest, sig))
        append_round(path, RoundEntry(r, tuple(keys), tuple(replies), "ab" * 32), run_id=run,
                     coordinator_key=coordinator, now=now)
    append_decision(path, DECISION, run_id=run, coordinator_key=coordinator, now=now)
    return read_log(path)


def verify_args(pki_dir: Path) -> dict[str, object]:
    return {"coordinator_certs": [pki_dir / "server" / "server.crt"],
            "site_certs": [pki_dir / "sites" / f"{s}.crt" for s in ("hungary", "swiss")]}


def test_appended_records_are_one_canonical_line_each_and_verify(tmp_path: Path,
                                                                 pki_dir: Path) -> None:
    log = tmp_path / "round_log.jsonl"
    records = write_log(log, pki_dir)
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[:-1] == [r.line() for r in records]
    result = verify_file(log, head=records[-1].hash, **verify_args(pki_dir))  # type: ignore[arg-type]
    assert (result.records, result.site_signatures) == (4, 6)
    # appending continues the chain of what is in the file
    more = write_log(log, pki_dir, rounds=1)
    assert [r.index for r in more] == list(range(6)) and more[4].prev_hash == records[3].hash


def test_a_torn_last_line_is_reported_and_not_built_upon(tmp_path: Path, pki_dir: Path) -> None:
    log = tmp_path / "round_log.jsonl"
    write_log(log, pki_dir, rounds=1)
    log.write_bytes(log.read_bytes()[:-20])
    with pytest.raises(LogIntegrityError, match="incomplete"):
        verify_file(log, **verify_args(pki_dir))  # type: ignore[arg-type]
    with pytest.raises(LogIntegrityError):
        write_log(log, pki_dir, rounds=1)


@pytest.fixture(scope="module")
def intact(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    log = tmp_path_factory.mktemp("log") / "round_log.jsonl"
    write_log(log, pki_dir, rounds=2)
    return log.read_bytes()


@given(data=st.data())
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_single_byte_edit_of_the_file_is_detected(data: st.DataObject, intact: bytes,
                                                      pki_dir: Path, tmp_path: Path) -> None:
    position = data.draw(st.integers(0, len(intact) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != intact[position]), label="byte")
    edited = bytearray(intact)
    edited[position] = value
    log = tmp_path / "edited.jsonl"
    log.write_bytes(bytes(edited))
    line = intact[:position].count(b"\n")
    with pytest.raises(LogIntegrityError) as caught:
        verify_file(log, **verify_args(pki_dir))  # type: ignore[arg-type]
    # the record named is the edited line's (or the next one, if its newline was hit)
    assert caught.value.position in (line, line + 1)


# ---- fedpriv log verify ------------------------------------------------------------------

def _tamper(how: str, lines: list[bytes], other: list[bytes]) -> tuple[list[bytes], int]:
    """The log's lines after one tampering, and the record that must be named."""
    if how == "edited":
        return [lines[0], lines[1].replace(b'"round":2', b'"round":5'), *lines[2:]], 1
    if how == "deleted":
        return [lines[0], *lines[2:]], 1
    if how == "swapped":
        return [lines[0], lines[2], lines[1], *lines[3:]], 1
    assert how == "inserted"
    return [lines[0], other[1], *lines[1:]], 1


@pytest.mark.parametrize("how", ["edited", "deleted", "swapped", "inserted", "forged"])
def test_log_verify_names_the_record(how: str, tmp_path: Path, pki_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.jsonl"
    write_log(log, pki_dir)
    certs = ["--coordinator-cert", str(pki_dir / "server" / "server.crt"),
             "--site-cert", str(pki_dir / "sites" / "hungary.crt"),
             "--site-cert", str(pki_dir / "sites" / "swiss.crt")]
    assert main(["log", "verify", str(log), *certs]) == 0
    assert "intact, 4 records" in capsys.readouterr().out
    if how == "forged":
        log.unlink()
        write_log(log, pki_dir, forge="swiss")
        named = 0
    else:
        write_log(tmp_path / "other.jsonl", pki_dir, run="run-other")
        lines, named = _tamper(how, log.read_bytes().splitlines(),
                               (tmp_path / "other.jsonl").read_bytes().splitlines())
        log.write_bytes(b"".join(line + b"\n" for line in lines))
    assert main(["log", "verify", str(log), *certs]) == LOG_TAMPERED_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"record {named} (line {named + 1})" in err
    assert {"edited": "edited", "deleted": "deleted", "swapped": "swapped",
            "inserted": "chain broken", "forged": "'swiss'"}[how] in err


def test_log_verify_with_the_wrong_coordinator_or_an_unreadable_file(
        tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.jsonl"
    write_log(log, pki_dir, rounds=1)
    hungary = str(pki_dir / "sites" / "hungary.crt")
    assert main(["log", "verify", str(log), "--coordinator-cert", hungary]) == LOG_TAMPERED_EXIT
    assert "record 0 (line 1): the coordinator's signature" in capsys.readouterr().err
    assert main(["log", "verify", str(tmp_path / "none.jsonl"),
                 "--coordinator-cert", hungary]) == 2
    assert main(["log", "verify", str(log), "--coordinator-cert", str(log)]) == 2
    err = capsys.readouterr().err
    assert "cannot read round log" in err and "not a PEM certificate" in err
    assert main(["log", "verify", str(log), "--coordinator-cert",
                 str(pki_dir / "server" / "server.crt")]) == 0
    assert "not checked (no certificate given): hungary, swiss" in capsys.readouterr().out


def test_log_verify_with_the_head_catches_records_cut_off_the_end(
        tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.jsonl"
    records = write_log(log, pki_dir, rounds=2)
    coordinator = ["--coordinator-cert", str(pki_dir / "server" / "server.crt")]
    assert main(["log", "verify", str(log), *coordinator, "--head", records[-1].hash]) == 0
    capsys.readouterr()
    log.write_bytes(b"".join(r.line() + b"\n" for r in records[:-1]))  # the decision removed
    assert main(["log", "verify", str(log), *coordinator]) == 0  # still a chain ...
    capsys.readouterr()
    assert main(["log", "verify", str(log), *coordinator, "--head", records[-1].hash]) \
        == LOG_TAMPERED_EXIT  # ... but not the one the model version's tag names
    err = capsys.readouterr().err
    assert "record 1 (line 2)" in err and "records removed or added at the end" in err
