#!/usr/bin/env bash
# Sites mode on one machine, in one command: a Prefect server on 127.0.0.1, one process
# worker per hospital (each started in a folder holding only its own CSV), the pipeline in
# federation.mode=sites; everything it started is stopped at the end (by process group).
# Usage: bash infra/sites-demo.sh [--set key=value ...]   (from the project root)
set -euo pipefail
PORT=${FEDPRIV_DEMO_PORT:-4300}
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api" PREFECT_WORKER_QUERY_SECONDS=1
LOGS=.fedpriv/sites-demo
mkdir -p "$LOGS"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

fedpriv split-sites --out sites >/dev/null
setsid prefect server start --host 127.0.0.1 --port "$PORT" >"$LOGS/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  python -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1])" \
    "$PREFECT_API_URL/health" 2>/dev/null && break
  sleep 1
done
for env in sites/*.env; do
  site=$(basename "$env" .env)
  ( set -a; . "$env"; set +a; cd "sites/$site" &&
    exec setsid prefect worker start --pool "site-$site" --type process ) \
    >"$LOGS/worker-$site.log" 2>&1 &
  pids+=($!)
done
echo "Prefect UI: http://127.0.0.1:${PORT} (workers' logs in $LOGS/)"
fedpriv run --set federation.mode=sites "$@"
