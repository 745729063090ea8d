#!/usr/bin/env bash
# MLflow tracking server for kdray sweeps: basic-auth on, artifacts proxied by
# the server (--serve-artifacts) to an object store or a local folder.
#
# On a VM (or on a Ray cluster's head node), listening on loopback only:
#     cluster/mlflow/run-server.sh
#   then, from your laptop, tunnel to it (`ssh -L 5000:127.0.0.1:5000 VM`, or
#   `ray attach cluster/aws.yaml -p 5000` when it runs on the Ray head).
# On Kubernetes, the Deployment in mlflow.yaml runs this same script (see
# kustomization.yaml), with everything below set from a Secret.
#
# Settings (environment; defaults in brackets):
#   MLFLOW_HOST [127.0.0.1]  MLFLOW_PORT [5000]  MLFLOW_WORKERS [2]
#   MLFLOW_HOME [~/.kdray-mlflow]   state: secrets.env, basic_auth.ini, sqlite files
#   MLFLOW_BACKEND_STORE_URI [sqlite:///$MLFLOW_HOME/mlflow.db]
#       a team server: postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow
#       (export it from your secret manager; never write it into a file in git)
#   MLFLOW_AUTH_DATABASE_URI [sqlite:///$MLFLOW_HOME/basic_auth.db]  users + permissions
#   MLFLOW_ARTIFACTS_DESTINATION [$MLFLOW_HOME/artifacts]  e.g. s3://BUCKET/mlflow-artifacts
#   MLFLOW_AUTH_ADMIN_USERNAME [admin]
#   MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY
#       [generated on first start into $MLFLOW_HOME/secrets.env, mode 600]
#   MLFLOW_AUTH_DEFAULT_PERMISSION [READ]  what a signed-in user may do with others' runs
#   MLFLOW_ALLOWED_HOSTS [MLflow's default: localhost and private IPs]  Host headers to accept
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION [false]  MLflow's GenAI job runners (seven
#       background processes); kdray does not use them
set -euo pipefail

MLFLOW_HOME="${MLFLOW_HOME:-$HOME/.kdray-mlflow}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-2}"
mkdir -p "$MLFLOW_HOME"
chmod 700 "$MLFLOW_HOME"

# Secrets come from the environment (a Kubernetes Secret, a secret manager) or,
# on a VM, from $MLFLOW_HOME/secrets.env, created with random values on first start.
if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" || -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
  secrets_file="$MLFLOW_HOME/secrets.env"
  if [[ ! -f "$secrets_file" ]]; then
    (umask 077 && python3 -c '
import secrets
print("MLFLOW_AUTH_ADMIN_PASSWORD=" + secrets.token_urlsafe(24))
print("MLFLOW_FLASK_SERVER_SECRET_KEY=" + secrets.token_urlsafe(32))' > "$secrets_file")
    echo "run-server: generated the admin password and Flask secret key in $secrets_file (mode 600)" >&2
  fi
  # shellcheck disable=SC1090
  set -a && . "$secrets_file" && set +a
fi
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"

# The backend store is read by `mlflow server` from this variable, so the URI
# (and its password) never appears on the command line.
export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_HOME/mlflow.db}"
export MLFLOW_AUTH_DATABASE_URI="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$MLFLOW_HOME/basic_auth.db}"
export MLFLOW_AUTH_DEFAULT_PERMISSION="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_HOME/artifacts}"

# basic-auth reads its settings from an ini file; write it (mode 600) from the
# environment.  The admin user and password are read from MLFLOW_AUTH_ADMIN_*.
export MLFLOW_AUTH_CONFIG_PATH="$MLFLOW_HOME/basic_auth.ini"
python3 - <<'PY'
import configparser
import os

cfg = configparser.ConfigParser()
cfg["mlflow"] = {
    "default_permission": os.environ["MLFLOW_AUTH_DEFAULT_PERMISSION"],
    # configparser interpolates "%": URL-encoded passwords need it doubled.
    "database_uri": os.environ["MLFLOW_AUTH_DATABASE_URI"].replace("%", "%%"),
    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
}
path = os.environ["MLFLOW_AUTH_CONFIG_PATH"]
with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
    cfg.write(f)
PY

args=(server
  --app-name basic-auth
  --host "$HOST" --port "$PORT" --workers "$WORKERS"
  --serve-artifacts --artifacts-destination "$ARTIFACTS")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
case "$HOST" in
  127.0.0.1 | localhost | ::1) ;;
  *) echo "run-server: listening on $HOST:$PORT; keep the port behind a firewall," \
          "a private network or a ClusterIP Service (users still need to sign in)" >&2 ;;
esac
echo "run-server: MLflow on http://$HOST:$PORT (basic-auth), artifacts -> $ARTIFACTS" >&2
exec mlflow "${args[@]}"
