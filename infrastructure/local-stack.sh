#!/usr/bin/env bash
# Local platform stack on loopback: S3-compatible store, MLflow server (SQLite registry,
# artifacts in the bucket), Prefect server and a process worker.
#
#   infrastructure/local-stack.sh start    start everything, wait until healthy, print exports
#   infrastructure/local-stack.sh stop     stop everything
#   infrastructure/local-stack.sh status   what runs, and where the logs are
#
# Ports (override by environment): S3 9000, MLflow 5000, Prefect 4200. State and logs go to
# infrastructure/.state/ (logs: .state/*.log). Uses MinIO when a `minio` binary is on PATH,
# otherwise moto's S3 server (from the project's virtual environment).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="${VENV:-$root/.venv}"
state="$here/.state"
S3_PORT="${S3_PORT:-9000}" MLFLOW_PORT="${MLFLOW_PORT:-5000}" PREFECT_PORT="${PREFECT_PORT:-4200}"
BUCKET="${BUCKET:-specdeepmap}" POOL="${POOL:-specdeepmap-process}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-minioadmin}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-minioadmin}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export PREFECT_HOME="$state/prefect"

wait_for() {  # url name seconds
  for _ in $(seq 1 "$3"); do
    if curl -fs -o /dev/null "$1"; then echo "  $2 healthy: $1"; return 0; fi
    sleep 1
  done
  echo "  $2 did not become healthy, see $state/$2.log" >&2; return 1
}

start_bg() {  # name command...
  local name=$1; shift
  nohup "$@" > "$state/$name.log" 2>&1 &
  echo $! > "$state/$name.pid"
}

start() {
  mkdir -p "$state/prefect"
  if command -v minio > /dev/null; then
    start_bg s3 minio server "$state/minio" --address "127.0.0.1:$S3_PORT"
  else
    start_bg s3 "$venv/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
  fi
  wait_for "$AWS_ENDPOINT_URL/minio/health/live" s3 30 2>/dev/null || wait_for "$AWS_ENDPOINT_URL" s3 30
  "$venv/bin/python" - <<PY
import boto3, botocore
s3 = boto3.client("s3")
try:
    s3.create_bucket(Bucket="$BUCKET")
except botocore.exceptions.ClientError as e:
    if "BucketAlready" not in str(e):
        raise
PY
  start_bg mlflow "$venv/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$state/mlflow.db" --artifacts-destination "s3://$BUCKET/mlflow"
  start_bg prefect "$venv/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_for "$MLFLOW_TRACKING_URI/health" mlflow 90
  wait_for "$PREFECT_API_URL/health" prefect 120
  "$venv/bin/prefect" work-pool create "$POOL" --type process --overwrite > /dev/null
  (cd "$root" && start_bg worker "$venv/bin/prefect" worker start --pool "$POOL")
  echo "Stack is up. In your shell:"
  env_lines
}

env_lines() {
  cat <<ENV
  export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
  export MLFLOW_S3_ENDPOINT_URL=$MLFLOW_S3_ENDPOINT_URL MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI PREFECT_API_URL=$PREFECT_API_URL
ENV
}

stop() {
  for name in worker prefect mlflow s3; do
    if [ -f "$state/$name.pid" ]; then
      kill "$(cat "$state/$name.pid")" 2>/dev/null || true
      rm -f "$state/$name.pid"
      echo "  stopped $name"
    fi
  done
}

status() {
  for name in s3 mlflow prefect worker; do
    if [ -f "$state/$name.pid" ] && kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then
      echo "  $name running (pid $(cat "$state/$name.pid")), log $state/$name.log"
    else
      echo "  $name not running"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
