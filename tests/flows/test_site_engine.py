"""The site's engine runs ``fl_site`` on the flow run it reads, and refuses parameters that
changed after the worker's check without running anything."""

from __future__ import annotations

import logging
from typing import Any
from uuid import uuid4

import pytest

from flows import site_engine
from flows.site_guard import REFUSED

GOOD = {"site": "a", "session": "abc", "index": 0, "charge_key": "k", "config": {},
        "endpoint": "127.0.0.1:9"}


class _Client:
    def __init__(self, states: list) -> None:
        self.states = states

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set_flow_run_state(self, flow_run_id: Any, state: Any) -> None:
        self.states.append((flow_run_id, state))


def _engine(monkeypatch: pytest.MonkeyPatch, parameters: dict) -> tuple[list, list, str]:
    import prefect._internal.control_listener as control
    import prefect.client.orchestration as orchestration
    import prefect.flow_engine as flow_engine
    from prefect.client.schemas.objects import FlowRun

    run = FlowRun(id=uuid4(), flow_id=uuid4(), name="r", parameters=parameters)
    ran: list = []
    states: list = []
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(run.id))
    monkeypatch.setattr(control, "configure_from_env", lambda: None)
    monkeypatch.setattr(flow_engine, "load_flow_run", lambda flow_run_id: run)
    monkeypatch.setattr(flow_engine, "run_flow", lambda flow, **kw: ran.append((flow, kw)))
    monkeypatch.setattr(flow_engine, "flow_run_logger",  # not the API's log handler
                        lambda flow_run: logging.getLogger("site-engine-test"))
    monkeypatch.setattr(orchestration, "get_client", lambda **kw: _Client(states))
    return ran, states, str(run.id)


def test_a_run_whose_parameters_changed_after_the_check_is_failed_not_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ran, states, run_id = _engine(monkeypatch, {**GOOD, "extra": "x"})
    assert site_engine.main() == 0
    assert ran == []
    ((flow_run_id, state),) = states
    assert str(flow_run_id) == run_id and state.is_failed()
    assert state.message.startswith(REFUSED) and "unknown parameter(s) extra" in state.message


def test_an_accepted_run_is_fl_site_imported_here(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.site_flow import fl_site

    ran, states, _ = _engine(monkeypatch, GOOD)
    assert site_engine.main() == 0
    assert states == [] and len(ran) == 1 and ran[0][0] is fl_site


def test_no_flow_run_id_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert site_engine.main() == 1
