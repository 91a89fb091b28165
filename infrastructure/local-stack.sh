#!/usr/bin/env bash
# Local platform stack on loopback, authentication on: S3-compatible store, MLflow server
# (basic-auth app; SQLite registry, artifacts in the bucket), Prefect server (API auth string)
# and a process worker.
#
#   infrastructure/local-stack.sh start    start what is not running, wait until healthy
#                                          (safe to run again: never starts a second copy)
#   infrastructure/local-stack.sh stop     stop every service and its children, wait until gone
#   infrastructure/local-stack.sh status   what runs, and where the logs are
#   infrastructure/local-stack.sh env      the exports a shell needs: eval "$(… env)"
#
# Environment (all optional): S3_PORT 9000, MLFLOW_PORT 5000, PREFECT_PORT 4200, BUCKET,
# POOL, VENV (default .venv), STACK_STATE (default infrastructure/.state), STACK_TIMEOUT
# (seconds to wait for each service's health, default 300; a busy 2-core machine needs ~100 s
# for MLflow), STOP_TIMEOUT (default 30). Secrets: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# PREFECT_AUTH_STRING (user:password), MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (the
# MLflow admin), MLFLOW_FLASK_SERVER_SECRET_KEY; any not given is generated on the first start
# and kept in $STACK_STATE/secrets.env (mode 600), never printed by start.
#
# The object store is MinIO when a `minio` binary is on PATH, else moto's S3 server through
# infrastructure/s3_server.py, which enforces the stack's keys and keeps the objects on disk
# ($STACK_STATE/s3), so that the store survives stop/start together with the registry.
set -euo pipefail
umask 077  # state, databases and logs: the operator's only
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$(cd "$root" && realpath -m "${VENV:-.venv}")"
state="$(realpath -m "${STACK_STATE:-$here/.state}")"
S3_PORT="${S3_PORT:-9000}" MLFLOW_PORT="${MLFLOW_PORT:-5000}" PREFECT_PORT="${PREFECT_PORT:-4200}"
BUCKET="${BUCKET:-specdeepmap}" POOL="${POOL:-specdeepmap-process}"
STACK_TIMEOUT="${STACK_TIMEOUT:-300}" STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
SERVICES="s3 mlflow prefect worker"

secrets() {  # generate what the environment does not give, once; load it
  mkdir -p "$state"
  chmod 700 "$state"
  local file="$state/secrets.env"
  if [ ! -f "$file" ]; then
    (umask 077; : > "$file")
    rand() { "$venv/bin/python" -c "import secrets; print(secrets.token_urlsafe($1))"; }
    {
      echo "AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-AKIA$(rand 12 | tr -dc 'A-Z0-9' | head -c 16)}"
      echo "AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-$(rand 30)}"
      echo "PREFECT_AUTH_STRING=${PREFECT_AUTH_STRING:-admin:$(rand 24)}"
      echo "MLFLOW_TRACKING_USERNAME=${MLFLOW_TRACKING_USERNAME:-admin}"
      echo "MLFLOW_TRACKING_PASSWORD=${MLFLOW_TRACKING_PASSWORD:-$(rand 24)}"
      echo "MLFLOW_FLASK_SERVER_SECRET_KEY=${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(rand 32)}"
    } >> "$file"
  fi
  # shellcheck disable=SC1090
  . "$file"
  # never in the environment of every process: each service is handed the secrets it needs
  # (see start), so that no process holds a secret it does not use
  export -n AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY PREFECT_AUTH_STRING \
    MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY \
    PREFECT_API_AUTH_STRING MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD \
    PREFECT_SERVER_API_AUTH_STRING 2>/dev/null || true
}

s3_keys() {  # command...: run it with the object store's keys
  AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" "$@"
}

prefect_client() {  # command...: run it with the Prefect API's credentials
  PREFECT_API_AUTH_STRING="$PREFECT_AUTH_STRING" "$@"
}

exports() {
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
  export MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL"
  export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
  export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
  export PREFECT_HOME="$state/prefect"
  PREFECT_API_AUTH_STRING="$PREFECT_AUTH_STRING"  # for `env`; handed to clients by hand
}

pid_of() { cat "$state/$1.pid" 2>/dev/null || true; }

running() {  # name: its process group has a live process
  local pid; pid="$(pid_of "$1")"
  [ -n "$pid" ] && kill -0 -- "-$pid" 2>/dev/null
}

any_running() {
  local name
  for name in $SERVICES; do running "$name" && return 0; done
  return 1
}

ports() {  # a running stack's ports (start writes them) win over the environment's
  local file="$state/ports.env"
  if [ -f "$file" ] && any_running; then
    # shellcheck disable=SC1090
    . "$file"
  fi
}

save_ports() {
  printf 'S3_PORT=%s\nMLFLOW_PORT=%s\nPREFECT_PORT=%s\n' "$S3_PORT" "$MLFLOW_PORT" \
    "$PREFECT_PORT" > "$state/ports.env"
}

start_bg() {  # name command...: in a session of its own, so stop reaches its children
  local name=$1; shift
  setsid "$@" >> "$state/$name.log" 2>&1 < /dev/null &
  echo $! > "$state/$name.pid"
  for _ in $(seq 50); do running "$name" && return 0; sleep 0.1; done  # setsid has run
}

wait_healthy() {  # name url [any]: until the URL answers 200 (with "any": answers at all)
  local deadline=$((SECONDS + STACK_TIMEOUT)) code
  while [ $SECONDS -lt $deadline ]; do
    if ! running "$1"; then
      echo "  $1 exited; the end of $state/$1.log:" >&2; tail -n 20 "$state/$1.log" >&2
      return 1
    fi
    code="$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$2" || true)"
    if [ "$code" = 200 ] || { [ "${3:-}" = any ] && [ "$code" != 000 ]; }; then
      echo "  $1 healthy: $2"; return 0
    fi
    sleep 1
  done
  echo "  $1 not healthy after $STACK_TIMEOUT s (STACK_TIMEOUT), see $state/$1.log" >&2
  return 1
}

start() {
  secrets; ports; exports
  save_ports
  mkdir -p "$state/prefect"
  if running s3; then echo "  s3 already running"
  elif command -v minio > /dev/null; then
    MINIO_ROOT_USER="$AWS_ACCESS_KEY_ID" MINIO_ROOT_PASSWORD="$AWS_SECRET_ACCESS_KEY" \
      start_bg s3 minio server "$state/minio" --address "127.0.0.1:$S3_PORT"
  else
    s3_keys start_bg s3 "$venv/bin/python" "$here/s3_server.py" --port "$S3_PORT" \
      --data "$state/s3"
  fi
  # MinIO answers its health URL; the moto launcher opens its port once restored (any answer)
  if command -v minio > /dev/null; then wait_healthy s3 "$AWS_ENDPOINT_URL/minio/health/live"
  else wait_healthy s3 "$AWS_ENDPOINT_URL" any; fi
  s3_keys "$venv/bin/python" - <<PY
import boto3, botocore
s3 = boto3.client("s3")
try:
    s3.create_bucket(Bucket="$BUCKET")
except botocore.exceptions.ClientError as e:
    if "BucketAlready" not in str(e):
        raise
PY
  if running mlflow; then echo "  mlflow already running"; else
    cat > "$state/mlflow-auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$state/mlflow-auth.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    # the admin account is created from these on the first start (not on a command line)
    MLFLOW_AUTH_CONFIG_PATH="$state/mlflow-auth.ini" \
      AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
      MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_FLASK_SERVER_SECRET_KEY" \
      MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME" \
      MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD" \
      MLFLOW_BACKEND_STORE_URI="sqlite:///$state/mlflow.db" \
      start_bg mlflow "$venv/bin/mlflow" server --app-name basic-auth --host 127.0.0.1 \
      --port "$MLFLOW_PORT" --artifacts-destination "s3://$BUCKET/mlflow" --workers 1
  fi
  if running prefect; then echo "  prefect already running"; else
    PREFECT_SERVER_API_AUTH_STRING="$PREFECT_AUTH_STRING" PREFECT_SERVER_ANALYTICS_ENABLED=false \
      start_bg prefect "$venv/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  fi
  wait_healthy mlflow "$MLFLOW_TRACKING_URI/health"
  wait_healthy prefect "$PREFECT_API_URL/health"
  if prefect_client "$venv/bin/prefect" work-pool inspect "$POOL" > /dev/null 2>&1; then
    echo "  work pool $POOL exists"
  else
    prefect_client "$venv/bin/prefect" work-pool create "$POOL" --type process > /dev/null
    echo "  work pool $POOL created"
  fi
  if running worker; then echo "  worker already running"; else
    # flow runs read and write the store and the registry: the worker passes these on
    (cd "$root" && AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
      AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
      PREFECT_API_AUTH_STRING="$PREFECT_AUTH_STRING" \
      MLFLOW_TRACKING_USERNAME="$MLFLOW_TRACKING_USERNAME" \
      MLFLOW_TRACKING_PASSWORD="$MLFLOW_TRACKING_PASSWORD" \
      start_bg worker "$venv/bin/prefect" worker start --pool "$POOL")
    echo "  worker started (log $state/worker.log)"
  fi
  echo "Stack is up. In your shell: eval \"\$($0 env)\""
}

env_lines() {
  secrets; ports; exports
  for name in AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION \
      MLFLOW_S3_ENDPOINT_URL MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME \
      MLFLOW_TRACKING_PASSWORD PREFECT_API_URL PREFECT_API_AUTH_STRING PREFECT_HOME; do
    printf 'export %s=%q\n' "$name" "${!name}"
  done
  # plain rasterio/GDAL reading s3:// (/vsis3/) from this store
  printf 'export AWS_S3_ENDPOINT=%q AWS_HTTPS=NO AWS_VIRTUAL_HOSTING=FALSE\n' "127.0.0.1:$S3_PORT"
  printf 'export PATH=%q:"$PATH"\n' "$venv/bin"
}

wait_gone() {  # name seconds: until no process of its group is left
  local deadline=$((SECONDS + $2))
  while running "$1" && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  ! running "$1"
}

stop_worker() {  # pid: let flow runs finish (up to STOP_TIMEOUT), then stop the worker
  # Prefect's worker takes a first SIGTERM as "stop taking runs, let the running ones end"
  # and even when idle does not exit on it; a second SIGTERM makes it kill itself.
  kill -TERM "$1" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while [ "$(pgrep -g "$1" | wc -l)" -gt 1 ] && [ $SECONDS -lt $deadline ]; do sleep 1; done
  [ "$(pgrep -g "$1" | wc -l)" -gt 1 ] && echo "  flow runs still running after $STOP_TIMEOUT s" \
    "(STOP_TIMEOUT): stopped; the server marks them crashed" >&2
  sleep 1
  kill -TERM "$1" 2>/dev/null || true
}

stop() {
  for name in worker prefect mlflow s3; do  # the worker first: it holds flow runs
    local pid; pid="$(pid_of "$name")"
    [ -n "$pid" ] || continue
    if running "$name"; then
      if [ "$name" = worker ]; then stop_worker "$pid"; fi
      kill -TERM -- "-$pid" 2>/dev/null || true  # the service and its children
      if ! wait_gone "$name" "$STOP_TIMEOUT"; then
        echo "  $name did not stop within $STOP_TIMEOUT s (STOP_TIMEOUT): killed" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait_gone "$name" 10 || { echo "  $name (process group $pid) survives SIGKILL" >&2; exit 1; }
      fi
      echo "  stopped $name"
    fi
    rm -f "$state/$name.pid"
  done
}

status() {
  ports
  local -A port=([s3]="$S3_PORT" [mlflow]="$MLFLOW_PORT" [prefect]="$PREFECT_PORT")
  for name in $SERVICES; do
    if running "$name"; then
      echo "  $name running (process group $(pid_of "$name"))${port[$name]:+ on \
127.0.0.1:${port[$name]}}, log $state/$name.log"
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
