"""The model card of every registered version: the renderer alone (a fake run's facts), and
the pipeline run twice against a real local MLflow store (a card per version, stored with it,
its summary as the version's description, ε/δ/unit as its tags)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from adapters.model_card import (
    CardFacts,
    SiteFacts,
    calibration_bins,
    demote_headings,
    render_markdown,
    summary,
)
from fl_core.audit.confidence import evaluation_bounds
from fl_core.data.schema import parse_schema
from fl_core.results import AuditReport, PrivacyReport

SCHEMA_TEXT = """# a hospital's table
id: ward
patient_id: pid
site: hospital
sites: [North, South]
label: {column: outcome, positive_values: ["yes"], values: ["yes", "no"]}
features:
  age: {type: numeric, unit: years, low: 18, high: 100}
  smoker: {type: boolean, true_value: "1", false_value: "0", fill: "0"}
"""
HISTOGRAM = [[30.4, 20.2, 8.1, -1.3], [2.2, 9.6, 21.0, 9.5]]  # negatives row, positives row
NOISE = 2.0 * 2 ** 0.5  # σ = 2 per site, two sites merged


def _facts(**changes: Any) -> CardFacts:
    import yaml

    spec = parse_schema(yaml.safe_load(SCHEMA_TEXT), "ward.yaml")
    privacy = PrivacyReport(
        enabled=True, randomness="secure", epsilon=0.9931525083615094, delta=1e-5,
        epsilon_replace_one=2.1276489, delta_replace_one=1e-5, statistics_epsilon=2.0032,
        lifetime_epsilon=10.0, accountant="prv", noise_multiplier=7.578125, sample_rate=1.0,
        max_grad_norm=1.0, ledger_run_id="run42")
    audit = AuditReport(enabled=True, seconds=1.0, mia_auc=0.512, mia_tpr_at_0_1pct_fpr=0.004,
                        empirical_epsilon_lower_bound=0.0, mia_strongest_attack="lira",
                        members=120, non_members=118, accountant_epsilon=0.9931525083615094)
    base: dict[str, Any] = dict(
        model_name="fedpriv-ward", version="7", run_id="abc123", registered_at="now",
        model="logreg", mode="sites", rounds=20, aggregation="fedavg", compression="dense",
        dataset_id="ward", dataset_description=None, label=spec.label,
        features=dict(spec.features), schema_path="data/schemas/ward.yaml",
        schema_text=SCHEMA_TEXT, schema_note=None,
        sites=(SiteFacts("North", 200, 50, 0.81), SiteFacts("South", 120, 30, None)),
        histogram=HISTOGRAM, cell_noise=NOISE,
        evaluation=evaluation_bounds(HISTOGRAM, NOISE, 0.95), accuracy=0.78,
        privacy=privacy, guarantee="(ε, δ)-DP per patient", audit=audit,
        audit_limits={"audit.max_auc": 0.6, "audit.max_tpr_at_0_1pct_fpr": 0.05},
        dp_audit={"dp_audit_epsilon": 0.99, "dp_audit_epsilon_lower_bound": 0.31},
        gate_passed=False,
        gate_reasons=("auc lower bound 0.55 (95 %) < gate.min_auc_lower 0.6: ...",),
        aliases=("challenger",), data_sha256=None, code_version="fedpriv 0.1.0",
        ledger_heads={"site.North.ledger_head": "ab" * 32})
    return CardFacts(**{**base, **changes})


def test_the_card_states_every_figure_at_a_precision_that_keeps_it_true() -> None:
    facts = _facts()
    card = render_markdown(facts)
    assert SCHEMA_TEXT.rstrip() in card  # the schema file itself, verbatim
    assert "(ε ≤ 0.994, δ = 1e-05)-DP per patient" in card  # ε rounded up, δ scientific
    assert "0.0000" not in card and "0.993)" not in card
    lower = facts.evaluation.auc_lower  # type: ignore[union-attr]
    text = re.search(r"\| AUC \| [0-9.]+ \| ([0-9.]+) \|", card)
    assert text is not None and float(text.group(1)) <= lower < float(text.group(1)) + 0.001
    assert "**Refused** champion" in card and facts.gate_reasons[0] in card
    assert "| North | 200 | 50 | 0.810 |" in card and "| South | 120 | 30 | — |" in card
    assert "within the gate's limits" in card  # the membership audit's verdict
    assert "ε lower bound 0.31 vs accountant ε 0.99: consistent with the accountant" in card
    assert "held by each site" in card and "ab" * 32 in card and "`abc123`" in card
    assert "![reliability diagram](calibration.png)" in card


def test_the_summary_names_the_model_the_auc_with_its_bound_privacy_and_the_gate() -> None:
    text = summary(_facts())
    assert text.startswith("fedpriv-ward v7: logreg on `ward`, 2 sites; AUC ")
    assert "one-sided 95 % lower bound" in text and "δ = 1e-05" in text
    assert "per patient (add/remove one patient's records at one site)" in text
    assert "gate refused champion (1 reason(s)" in text
    assert "gate passed: champion" in summary(_facts(gate_passed=True, gate_reasons=()))


def test_a_model_without_dp_and_a_broken_dp_audit_say_so() -> None:
    card = render_markdown(_facts(
        privacy=PrivacyReport(enabled=False, randomness="secure"), gate_passed=True,
        gate_reasons=(), dp_audit={"dp_audit_epsilon": 1.0,
                                   "dp_audit_epsilon_lower_bound": 1.7}))
    assert "**not differentially private per patient.**" in card
    assert "**PRIVACY FAILURE**." in card and "**Passed**" in card


def test_calibration_bins_from_the_released_histogram() -> None:
    bins = calibration_bins(HISTOGRAM, NOISE)
    assert [b.mid for b in bins] == [0.125, 0.375, 0.625, 0.875]
    assert bins[0].patients == pytest.approx(32.6) and bins[0].observed == pytest.approx(
        2.2 / 32.6)
    assert bins[3].patients == pytest.approx(9.5)  # a negative noisy count clamps at 0
    assert bins[3].observed == 1.0
    assert [b.noisy for b in bins] == [False, False, False, True]  # 9.5 < 3 × 4, the total's σ
    assert calibration_bins([], NOISE) == []


def test_an_embedded_report_sits_below_the_card_section_fences_untouched() -> None:
    text = "# Data report\n\n## Missing\n\n```\n# not a heading\n```\n"
    assert demote_headings(text, 4).splitlines() == [
        "#### Data report", "", "##### Missing", "", "```", "# not a heading", "```"]
    card = render_markdown(_facts(data_report=text))
    assert "### Before training" in card and "#### Data report" in card


# --- the pipeline, twice: a card per version ------------------------------------------------


def _run(root: Path, *stages: str) -> dict[str, Any]:
    from adapters.config_files import load_config
    from adapters.stages import STAGES

    cfg = load_config(root / "params.yaml", ["rounds=2", "audit.shadow_models=2",
                                             "privacy.randomness=reproducible"])
    for name in stages:
        STAGES[name].function(cfg, root)
    return json.loads((root / "reports" / "registration.json").read_text())


@pytest.mark.slow
def test_every_registered_version_has_its_card_schema_description_and_tags(
        project: Path) -> None:
    from mlflow import MlflowClient

    all_stages = ("validate", "partition", "train", "audit", "register")
    registrations = [_run(project, *all_stages), _run(project, "train", "audit", "register")]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}")
    schema = (project / "data" / "schemas" / "heart.yaml").read_text()
    versions = client.search_model_versions("name='fedpriv-heart'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    for registration in registrations:
        version = client.get_model_version("fedpriv-heart", registration["model_version"])
        run = registration["run_id"]
        card = Path(client.download_artifacts(run, "model_card/model_card.md")).read_text()
        assert card.startswith(f"# Model card: fedpriv-heart version {version.version}\n")
        assert schema.rstrip() in card  # the schema file itself
        assert Path(client.download_artifacts(run, "schema.yaml")).read_text() == schema
        assert "δ = 1e-05" in card and "0.0000" not in card
        assert re.search(r"\(ε ≤ 0\.99\d, δ = 1e-05\)-DP per patient", card)
        assert "**Refused** champion" in card  # reproducible noise is never champion
        assert "privacy.randomness=reproducible: the DP noise" in card
        assert f"| MLflow run | `{run}` |" in card
        data_hash = json.loads((project / "data" / "processed" / "partition.json").read_text())
        assert f"| data SHA-256 | `{data_hash['data_sha256']}` |" in card
        names = {a.path for a in client.list_artifacts(run, "model_card")}
        assert names >= {"model_card/model_card.md", "model_card/calibration.png"}
        assert version.description == card.split("\n\n")[1]  # the card's summary
        assert "AUC" in version.description and "lower bound" in version.description
        assert "δ = 1e-05" in version.description and "gate refused" in version.description
        tags = version.tags
        assert float(tags["privacy.epsilon"]) >= json.loads(
            (project / "reports" / "metrics.json").read_text())["epsilon"]
        assert tags["privacy.delta"] == "1e-05"
        assert tags["privacy.unit"].startswith("patient (add/remove one patient")
    published = (project / "reports" / "model_card.md").read_text()  # the last run's copy
    assert published.startswith("# Model card: fedpriv-heart version 2\n")
    _data_report_only_in_simulation(project)


def _data_report_only_in_simulation(project: Path) -> None:
    """The per-site data report (exact counts) is embedded where the coordinator holds the
    table (simulation), never in sites mode, whose card says the data stay at the sites."""
    from adapters.artifacts import Paths, read_training, write_json_atomic
    from adapters.config_files import load_config
    from adapters.model_card import gather_facts
    from fl_core.audit.gate import GateDecision

    report = "# Data report: heart\n\n| site | positive |\n|---|---|\n| Cleveland | 139 |\n"
    (project / "reports" / "data_report.md").write_text(report)
    cards = {}
    for mode in ("simulation", "sites"):
        cfg = load_config(project / "params.yaml", [f"federation.mode={mode}"])
        paths = Paths.of(cfg, project)
        if mode == "sites":  # the counts the sites declared, no data hash
            write_json_atomic(paths.partition, {"mode": "sites", "sites": {
                "Cleveland": {"train": 243, "test": 61}, "Hungary": {"train": 208, "test": 52}}})
        facts = gather_facts(cfg, paths, read_training(paths), {}, run_id="r", version="9",
                             decision=GateDecision(True, ()), aliases=("champion",))
        cards[mode] = render_markdown(facts)
    assert "#### Data report: heart" in cards["simulation"] and "| Cleveland | 139 |" in \
        cards["simulation"]
    assert "Data report" not in cards["sites"] and "| Cleveland | 139 |" not in cards["sites"]
    assert "| data SHA-256 | held by each site" in cards["sites"]
    assert "| Cleveland | 243 | 61 |" in cards["sites"]


@pytest.mark.slow
def test_a_card_that_cannot_be_stored_undoes_the_registration(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    _run(project, "validate", "partition", "train", "audit", "register")

    def broken(*args: Any) -> None:
        raise OSError("artifact store full")

    monkeypatch.setattr("adapters.model_card.store_card", broken)
    with pytest.raises(OSError, match="artifact store full"):
        _run(project, "register")
    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='fedpriv-heart'")] == ["1"]
    # the published card is still version 1's: none of a version that was rolled back
    card = (project / "reports" / "model_card.md").read_text()
    assert card.startswith("# Model card: fedpriv-heart version 1\n")


def test_site_sizes_are_the_declared_ones_in_either_mode(tmp_path: Path) -> None:
    """Sites mode's partition holds the counts the sites declared; the simulation's the
    patient ids of each split. A site that did not answer the final evaluation has no
    accuracy on the card (its last figure would be from another round)."""
    from types import SimpleNamespace

    from adapters.artifacts import Paths, write_json_atomic
    from adapters.model_card import site_facts

    paths = Paths(root=tmp_path, reports=tmp_path / "reports", state=tmp_path, data=tmp_path)
    trained = SimpleNamespace(evaluated_sites=["A"], client_accuracy={"A": 0.7, "B": 0.9})
    write_json_atomic(paths.partition, {"mode": "sites", "sites": {
        "A": {"train": 80, "test": 20}, "B": {"train": 8, "test": 2}}})
    assert site_facts(paths, trained) == (  # type: ignore[arg-type]
        SiteFacts("A", 80, 20, 0.7), SiteFacts("B", 8, 2, None))
    write_json_atomic(paths.partition, {"scheme": "by_site", "clients": [
        {"client_id": "A", "train": [1, 2, 3], "test": [4]}]})
    assert site_facts(paths, trained) == (SiteFacts("A", 3, 1, 0.7),)  # type: ignore[arg-type]
