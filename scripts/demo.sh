#!/usr/bin/env bash
# The demo on a fresh Debian machine, in one command:
#
#   bash scripts/demo.sh                 # throwaway PostgreSQL + the demo on http://127.0.0.1:8000/
#   bash scripts/demo.sh restart-db      # from a second terminal: restart that database
#   DATABASE_URL=postgresql://app:pw@db/app bash scripts/demo.sh     # your own server instead
#   bash scripts/demo.sh --help          # every option and environment variable
#
# Installs (as root, when missing and no DATABASE_URL is given): the PostgreSQL server from Debian.
# Creates or updates .venv with the package and its demo extra, then runs `python -m demo "$@"`.
# Ctrl-C stops the demo and the database it started.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "restart-db" ] && [ -x .venv/bin/python ]; then
  exec .venv/bin/python -m demo "$@"   # talks to the running demo; nothing to install
fi

if [ -z "${DATABASE_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing PostgreSQL from Debian (the demo starts a throwaway server of its own)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql postgresql-client >/dev/null
    # Debian's package starts a cluster on 5432; the demo runs its own server on a free port.
    if command -v pg_lsclusters >/dev/null 2>&1; then
      pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
        pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
      done
    fi
  else
    echo "PostgreSQL is not installed: run this as root to install it from Debian," >&2
    echo "install it yourself (apt-get install postgresql), or set DATABASE_URL." >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "== installing the package with its demo extra into .venv"
.venv/bin/python -m pip install -q -e ".[asyncpg,psycopg,demo]" 2>&1 | { grep -v "^WARNING: Location" || true; }

exec .venv/bin/python -m demo "$@"
