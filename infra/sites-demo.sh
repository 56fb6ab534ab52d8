#!/usr/bin/env bash
# Sites mode on one machine, in one command, for any schema and data: the arguments are
# `fedpriv run`'s (--set key=value ...) and go to split-sites too. It splits the data by site,
# makes a demo CA with the endpoint's and the Prefect API's certificate for 127.0.0.1 and one
# certificate per site (each key made in its site's folder), serves the Prefect API behind
# basic auth and TLS (a random secret, in the environment only), starts one
# `fedpriv site worker` per site, and runs the pipeline in federation.mode=sites with the
# federation.sites that split-sites printed. Everything lives in .fedpriv/sites-demo/ (replaced
# at each start); everything it started is stopped on exit; it exits with the run's code.
# Usage: bash infra/sites-demo.sh [--set key=value ...]   (project root, fedpriv on PATH)
set -euo pipefail
PORT=${FEDPRIV_DEMO_PORT:-4300}
DEMO=$PWD/.fedpriv/sites-demo
PKI=$DEMO/pki SITES=$DEMO/sites LOGS=$DEMO/logs
API=https://127.0.0.1:$PORT/api
pids=() run=
cleanup() {  # the run (interrupted: it closes its sessions), the workers with their flow
  # runs while the API they report to is up, then the API
  if [[ -n $run ]]; then python -m adapters.sites_demo stop --signal INT --grace 30 "$run"; fi
  if ((${#pids[@]} > 1)); then python -m adapters.sites_demo stop "${pids[@]:1}"; fi
  if ((${#pids[@]})); then python -m adapters.sites_demo stop "${pids[0]}"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
rm -rf "$DEMO"
mkdir -p "$PKI" "$LOGS"
unset PREFECT_API_URL PREFECT_API_AUTH_STRING PREFECT_API_SSL_CERT_FILE
export PREFECT_HOME=$DEMO/prefect PREFECT_WORKER_QUERY_SECONDS=1 PREFECT_WORKER_PREFETCH_SECONDS=1

# 1. each site's folder: its own rows and a site.yaml; the federation.sites for them
fedpriv split-sites --out "$SITES" "$@" | tee "$LOGS/split-sites.log"
SITES_SET=$(sed -n "s/^federation.sites for these files: --set '\(.*\)'\$/\1/p" \
  "$LOGS/split-sites.log")
[[ -n $SITES_SET ]] || { echo "sites-demo: split-sites named no sites" >&2; exit 2; }

# 2. the demo CA, the certificate of 127.0.0.1 (endpoint and Prefect API), one per site
AUTH="demo:$(python -c 'import secrets; print(secrets.token_hex(16))')"
fedpriv pki init --ca-dir "$PKI/ca" --name "fedpriv sites-demo CA" --days 7 >/dev/null
fedpriv pki server --host 127.0.0.1 --ca-dir "$PKI/ca" --out-dir "$PKI/server" --days 7 >/dev/null
for dir in "$SITES"/*/; do
  dir=${dir%/} slug=$(basename "$dir")
  fedpriv pki request --site "$slug" --dir "$dir" >/dev/null
  fedpriv pki sign "$dir/$slug.csr" --ca-dir "$PKI/ca" --days 7 >/dev/null
  rm "$dir/$slug.csr"
  cp "$PKI/ca/ca.crt" "$dir/ca.crt"
  (umask 077 && printf '%s\n' "$AUTH" >"$dir/prefect-auth")
  python -m adapters.sites_demo site "$dir/site.yaml" --api-url "$API" --auth-file prefect-auth
  fedpriv site check --config "$dir/site.yaml" >/dev/null
done

# 3. the Prefect API, then one worker per site: each in a process group of its own
FEDPRIV_DEMO_AUTH=$AUTH python -m adapters.sites_demo serve --port "$PORT" --pki "$PKI" \
  --home "$DEMO/prefect" >"$LOGS/prefect-api.log" 2>&1 &
pids+=($!)
python -m adapters.sites_demo wait "$API" --ca "$PKI/ca/ca.crt" --pid "${pids[0]}" || {
  tail -n 20 "$LOGS/prefect-api.log" >&2
  echo "sites-demo: the Prefect API did not start (port $PORT taken? FEDPRIV_DEMO_PORT=...)" >&2
  exit 1
}
for dir in "$SITES"/*/; do
  python -m adapters.sites_demo detach fedpriv site worker --config "${dir}site.yaml" \
    >"$LOGS/worker-$(basename "$dir").log" 2>&1 &
  pids+=($!)
done
echo "Prefect UI: https://127.0.0.1:$PORT (CA $PKI/ca/ca.crt, secret in a site's prefect-auth);" \
  "logs in $LOGS/"

# 4. the run. Before the user's arguments, so that theirs win: the sites split-sites found,
# and room for every session to start at once on one machine (imports, validation: minutes
# on two busy cores). In the background (and SIGINT restored), so that a signal to this
# script is handled at once: the run is then interrupted, and everything else stopped.
PREFECT_API_URL=$API PREFECT_API_AUTH_STRING=$AUTH PREFECT_API_SSL_CERT_FILE=$PKI/ca/ca.crt \
  PREFECT_API_TLS_INSECURE_SKIP_VERIFY=false python -m adapters.sites_demo detach \
  fedpriv run --set federation.mode=sites --set "federation.endpoint.pki=$PKI" \
  --set "$SITES_SET" --set federation.site_start_timeout_s=400 "$@" &
run=$!
rc=0
wait "$run" || rc=$?
run=
exit "$rc"
