#!/usr/bin/env bash
# What the test suite needs, installed where it is missing, so that the README's second command
# works with or without the first: the virtualenv (as the quick start makes it), kdray with its
# dev, ffcv, lm, s3 and gcs extras, and the system packages that FFCV's build and the PostgreSQL
# tracking-server test use (apt-get, as root or with passwordless sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv && .venv/bin/pip install -q --upgrade pip
fi
packages="pkg-config libopencv-dev libturbojpeg0-dev postgresql"
if ! dpkg -s $packages >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq $packages; }; then
    echo "tests/setup.sh: could not install $packages (needs root or sudo); the FFCV and PostgreSQL tests" \
         "fail under CI and are skipped with the reason elsewhere" >&2
  fi
fi
if ! .venv/bin/pip install -q -e ".[dev,ffcv,lm,s3,gcs]"; then
  echo "tests/setup.sh: the ffcv extra did not build (its system packages are missing); installing the rest" >&2
  .venv/bin/pip install -q -e ".[dev,lm,s3,gcs]"
fi
