"""``fedpriv``: run the pipeline, one stage of it, or show the resolved configuration.

    fedpriv run                              # the whole flow under Prefect
    fedpriv run --set rounds=5 --set model=mlp
    fedpriv stage train                      # one stage, no orchestration (what dvc repro calls)
    fedpriv config --set data.partition=by_patient
    fedpriv budget                           # the privacy-budget ledger: ε spent per site
    fedpriv audit-sweep --seeds 3            # membership-attack AUC against ε
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

STAGES = ("validate", "partition", "train", "audit", "register")

EPILOG = """\
configuration:
  params.yaml is the only configuration; --set KEY=VALUE overrides any key (dotted for
  sections, value read as YAML), e.g. --set rounds=5 --set data.partition=by_patient
  --set data.dirichlet_alpha=0.5. `fedpriv config` prints every key and its value.

outputs:
  reports/metrics.json, reports/rounds.csv, reports/*.png, data/models/model.pt;
  MLflow store in .fedpriv/ (mlflow ui --backend-store-uri sqlite:///.fedpriv/mlflow.db);
  Prefect history in .fedpriv/prefect (prefect server start).

privacy:
  every run is (privacy.epsilon, privacy.delta)-DP per patient (DP-SGD, Opacus), neighbouring
  datasets differing by adding or removing one patient; it covers every model update and the
  released model, not the audit's statistics or test metrics. DP noise and sampling come from
  the OS CSPRNG (privacy.randomness=secure); `reproducible` is for tests and is never
  promoted. The ledger (.fedpriv/privacy_ledger.sqlite) refuses a run that would take a site
  past privacy.lifetime_epsilon. `fedpriv budget` shows what each site has spent.

audit and gate:
  the audit attacks every model (loss threshold, Shokri shadow models, LiRA) and bounds ε
  from below; champion needs accuracy, attack AUC / TPR@0.1%FPR within audit.*, ε within
  privacy.epsilon, and ε_lb <= ε. `fedpriv audit-sweep` plots attack AUC against ε.

exit codes: 0 ok, 2 bad configuration, 3 data failed validation, 4 training failed,
  5 privacy budget exhausted, 1 other.
"""


def _environment(root: Path) -> None:
    """Defaults that must be set before Prefect or MLflow is imported."""
    os.environ.setdefault("PREFECT_HOME", str(root / ".fedpriv" / "prefect"))
    # Prefect's temporary server cannot create its SQLite file in a missing directory
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the first start migrates a fresh SQLite database: slower than Prefect's 20 s on 2 cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml",
                        help="config file (default: %(default)s)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; repeatable (e.g. --set rounds=5)")
    common.add_argument("--root", default=".", help="project root holding data/ and reports/")

    parser = argparse.ArgumentParser(
        prog="fedpriv",
        description="Privacy-preserving federated learning for clinical data: validate, "
                    "partition by patient, train across hospitals, audit membership "
                    "inference, register in MLflow.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the whole pipeline as the Prefect flow",
                   description="Run validate → partition → train → audit → register as the "
                               "Prefect flow 'fl-pipeline' (a temporary local Prefect API unless "
                               "PREFECT_API_URL is set) and print a summary.")
    stage = sub.add_parser("stage", parents=[common], help="run one stage without Prefect (DVC)",
                           description="Run one stage as a plain process; dvc.yaml calls this.")
    stage.add_argument("name", choices=STAGES, help="the stage to run")
    sub.add_parser("config", parents=[common], help="print the resolved configuration",
                   description="Print params.yaml with overrides applied and validated.")
    budget = sub.add_parser(
        "budget", parents=[common], help="show the privacy-budget ledger",
        description="Show ε (and δ) spent per dataset and site, by basic composition over "
                    "every registered run, against privacy.lifetime_epsilon; --entries lists "
                    "the runs.")
    budget.add_argument("--entries", action="store_true", help="list every ledger entry too")
    sweep = sub.add_parser(
        "audit-sweep", parents=[common], help="train and audit at several ε; AUC vs ε",
        description="For each ε (and without DP) and each seed, train the configured model and "
                    "run the membership audit (same shadows and attacks as the pipeline). "
                    "Prints attack AUC and TPR at 0.1 % FPR against ε with their Spearman rank "
                    "correlation; writes reports/audit_sweep.{json,csv,png}. Registers nothing "
                    "and spends no ledger budget (the sweep's models are never released).")
    sweep.add_argument("--epsilons", nargs="+", type=float, metavar="EPS",
                       help="ε values (default: 0.5 1 2 4 8 32; no DP is always added)")
    sweep.add_argument("--seeds", type=int, default=3, help="seeds per ε (default: %(default)s)")
    return parser


def print_budget(cfg: Any, root: Path, entries: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from fl_core.data import file_fingerprint
    from tasks.train import privacy_ledger

    ledger = privacy_ledger(cfg, root)
    cap = cfg.privacy.lifetime_epsilon
    current = file_fingerprint(root / cfg.data.path) if (root / cfg.data.path).is_file() else ""
    console = Console(width=max(Console().width, 120))  # the ledger table is wide
    table = Table(title=f"privacy budget ({ledger.path}), lifetime cap ε={cap:g} per site")
    for column in ("dataset", "site", "runs", "ε spent", "δ spent", "ε left"):
        table.add_column(column, justify="left" if column in ("dataset", "site") else "right")
    balances = ledger.balances()
    for b in balances:
        label = b.fingerprint[:12] + (" (data.path)" if b.fingerprint == current else "")
        table.add_row(label, b.site, str(b.runs), f"{b.epsilon:.4f}", f"{b.delta:.2g}",
                      f"{max(cap - b.epsilon, 0.0):.4f}")
    console.print(table if balances else f"privacy ledger {ledger.path}: no runs recorded")
    if entries:
        import datetime

        runs = Table(title="ledger entries")
        for column in ("time (UTC)", "dataset", "site", "run", "ε", "δ", "accountant"):
            runs.add_column(column)
        for e in ledger.entries():
            when = datetime.datetime.fromtimestamp(e.created_at, datetime.UTC)
            runs.add_row(when.strftime("%Y-%m-%d %H:%M:%S"), e.fingerprint[:12], e.site,
                         e.run_id, f"{e.epsilon:.4f}", f"{e.delta:g}", e.accountant)
        console.print(runs)


def print_summary(metrics: dict[str, Any], registration: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedpriv run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            shown = f"{value:,.4f}"
        elif isinstance(value, int):
            shown = f"{value:,}"
        else:
            shown = "—" if value is None else str(value)
        table.add_row(key, shown)
    console = Console()
    console.print(table)
    reasons = "; ".join(registration.get("gate_reasons", []))
    verdict = ("[green]passed: alias champion set[/green]" if registration.get("gate_passed")
               else f"[yellow]refused: {reasons}[/yellow]")
    console.print(f"model {registration.get('model_name')} v{registration.get('model_version')} "
                  f"(challenger); promotion gate {verdict}")
    budget = registration.get("budget_spent") or {}
    if metrics.get("epsilon") is not None:
        cap = registration.get("lifetime_epsilon")
        console.print(f"privacy: {registration.get('privacy')}, (ε={metrics['epsilon']:.3f}, "
                      f"δ={metrics['delta']:g}) per patient, add/remove one patient "
                      f"(replace-one ε={metrics.get('epsilon_replace_one') or 0:.3f}); noise "
                      f"{metrics.get('randomness')}; budget spent of ε={cap:g}: "
                      + ", ".join(f"{site} {eps:.2f}" for site, eps in budget.items()))
        if metrics.get("randomness") != "secure":
            console.print("[red]reproducible DP noise: anyone with params.yaml can regenerate "
                          "it; this model can never be champion[/red]")
    else:
        console.print("[red]privacy: this model is NOT differentially private per patient "
                      "(privacy.enabled=false)[/red]")
    console.print("reports: reports/metrics.json, reports/rounds.csv, reports/*.png; "
                  "MLflow: .fedpriv/mlflow.db")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.root).resolve()
    _environment(root)

    from fl_core.config import ConfigError, load_config
    from fl_core.data import DataError
    from fl_core.engine import RoundFailedError
    from fl_core.ledger import BudgetExceededError
    from fl_core.validation import DataValidationError

    try:
        cfg = load_config(root / args.params, args.overrides)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        if args.command == "audit-sweep":
            from tasks.sweep import DEFAULT_EPSILONS, run_audit_sweep, sweep_markdown

            result = run_audit_sweep(root / args.params, args.overrides, root,
                                     list(args.epsilons or DEFAULT_EPSILONS), args.seeds)
            print(sweep_markdown(result))
            return 0
        if args.command == "budget":
            print_budget(cfg, root, args.entries)
            return 0
        if args.command == "stage":
            return run_stage(args.name, cfg, root)
        from flows.pipeline import fl_pipeline

        outcome = fl_pipeline(overrides=args.overrides, params_path=args.params, root=str(root))
        print_summary(outcome["metrics"], outcome["registration"])
        return 0
    except BudgetExceededError as exc:
        print(f"fedpriv: privacy refusal: {exc}", file=sys.stderr)
        return 5
    except ConfigError as exc:
        print(f"fedpriv: configuration error: {exc}", file=sys.stderr)
        return 2
    except (DataValidationError, DataError) as exc:
        print(f"fedpriv: data error: {exc}", file=sys.stderr)
        return 3
    except RoundFailedError as exc:
        print(f"fedpriv: training failed: {exc}", file=sys.stderr)
        return 4
    except FileNotFoundError as exc:
        print(f"fedpriv: {exc}", file=sys.stderr)
        return 1


def run_stage(name: str, cfg: Any, root: Path) -> int:
    if name == "validate":
        from tasks.validate import validate_data

        validate_data(cfg, root)
    elif name == "partition":
        from tasks.partition import partition_data

        partition_data(cfg, root)
    elif name == "train":
        from tasks.train import train_model

        train_model(cfg, root)
    elif name == "audit":
        from tasks.audit import audit_model

        audit_model(cfg, root)
    else:
        from tasks.publish import publish_results

        outcome = publish_results(cfg, root)
        print_summary(outcome["metrics"], outcome["registration"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
