#!/usr/bin/env bash
# The demo on a fresh Debian machine, in one command:
#
#   bash scripts/demo.sh                 # throwaway PostgreSQL + the demo on http://127.0.0.1:8000/
#   bash scripts/demo.sh restart-db      # from a second terminal: restart that database
#   bash scripts/demo.sh --patroni       # on a throwaway Patroni cluster (etcd, 2 nodes, HAProxy)
#   DATABASE_URL=postgresql://app:pw@db/app bash scripts/demo.sh     # your own server instead
#   bash scripts/demo.sh --help          # every option and environment variable
#
# Installs (as root, when missing and no DATABASE_URL is given): the PostgreSQL server from Debian;
# with --patroni (or DEMO_PATRONI=on) also Patroni, etcd and HAProxy.
# Creates or updates .venv with the package and its demo extra, then runs `python -m demo "$@"`
# (every option, --patroni included, goes to it). Ctrl-C stops the demo and what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "restart-db" ] && [ -x .venv/bin/python ]; then
  exec .venv/bin/python -m demo "$@"   # talks to the running demo; nothing to install
fi

patroni=false
case "${DEMO_PATRONI:-}" in [Oo][Nn]|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]|1) patroni=true ;; esac
for arg in "$@"; do
  if [ "$arg" = "--patroni" ]; then patroni=true; fi
done

need_apt=()
if [ -z "${DATABASE_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && ! command -v initdb >/dev/null 2>&1; then
  need_apt+=(postgresql postgresql-client)
fi
if [ "$patroni" = true ]; then  # the stack of PatroniCluster: Patroni, etcd, HAProxy
  if ! command -v patroni >/dev/null 2>&1; then need_apt+=(patroni); fi
  if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then need_apt+=(etcd-server); fi
  if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    need_apt+=(haproxy)
  fi
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing ${need_apt[*]} from Debian (the demo starts throwaway servers of its own)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian's package starts a cluster on 5432; the demo runs its own server on a free port.
    if command -v pg_lsclusters >/dev/null 2>&1; then
      pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
        pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
      done
    fi
    # nor does it use the services the Patroni stack's packages may start: it runs its own
    if [ "$patroni" = true ]; then
      for service in patroni etcd haproxy; do
        service "$service" stop >/dev/null 2>&1 || true
      done
    fi
  else
    echo "missing system packages: ${need_apt[*]}: run this as root to install them from" >&2
    echo "Debian, install them yourself (apt-get install ${need_apt[*]}), or set DATABASE_URL." >&2
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
