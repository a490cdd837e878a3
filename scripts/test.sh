#!/usr/bin/env bash
# Set up everything on a fresh Debian machine and run the whole suite, twice:
# against the newest SQLAlchemy 2.1 and the newest 2.0.
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k outage  # extra arguments go to pytest
#
# Installs (as root, when missing): PostgreSQL server, PgBouncer, Patroni, etcd and HAProxy (the
# HA cluster tests), and chromium with chromedriver (for the demo page's browser test) from Debian.
# Creates .venv (SQLAlchemy 2.1) and .venv-sa20 (SQLAlchemy 2.0) with the package and its extras
# (.venv also with the docs extra: the docs site is built strictly, into site/, before the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS="asyncpg,psycopg,test,demo"

need_apt=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  need_apt+=(postgresql postgresql-client)
fi
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  need_apt+=(pgbouncer)
fi
# the Patroni cluster of the HA tests: etcd, Patroni and HAProxy
if ! command -v patroni >/dev/null 2>&1; then
  need_apt+=(patroni)
fi
if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
  need_apt+=(etcd-server)
fi
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  need_apt+=(haproxy)
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  need_apt+=(chromium chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing ${need_apt[*]} from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian's package starts a cluster on 5432; the suite runs its own servers.
    if command -v pg_lsclusters >/dev/null 2>&1; then
      pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
        pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
      done
    fi
    # nor does it use the services these packages may start: the suite runs its own
    for service in pgbouncer patroni etcd haproxy; do
      service "$service" stop >/dev/null 2>&1 || true
    done
  else
    echo "missing system packages: ${need_apt[*]} (run as root, or install them)" >&2
    exit 1
  fi
fi

quiet() {  # run a command, showing its output only when it fails
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

setup_venv() {  # $1 = venv dir, $2 = SQLAlchemy requirement, $3 = extras
  local venv=$1 sqla=$2 extras=$3
  if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    "$PYTHON" -m venv "$venv"
  fi
  quiet "$venv/bin/python" -m pip install -q --upgrade pip
  quiet "$venv/bin/python" -m pip install -q -e ".[$extras]" "$sqla"
  "$venv/bin/python" -c "import sqlalchemy, fault_tolerant_pool; print('   SQLAlchemy', sqlalchemy.__version__)"
}

# the docs site is built once, with .venv
setup_venv .venv "SQLAlchemy[asyncio]>=2.1,<2.2" "$EXTRAS,docs"
setup_venv .venv-sa20 "SQLAlchemy[asyncio]>=2.0,<2.1" "$EXTRAS"

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== mkdocs build --strict"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
echo "== package: sdist and wheel, twine check, the wheel in a fresh venv"
.venv/bin/python scripts/check_package.py

# The two runs go side by side: the suite mostly waits (on servers starting, outages, timeouts),
# so on 2 cores both together take little longer than one (measured: docs/development.md).
# FTP_SERIAL=1 runs them one after the other.
# The Patroni tests (marker "patroni": a whole HA cluster and 20 writers each) run afterwards, one
# version at a time: beside the other run they starved its timing bars.
patroni_tests() {  # $1 = venv; no test selected (exit 5) is fine
  local rc=0
  "$1/bin/python" -m pytest -m patroni "${@:2}" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 5 ]
}
if [ "${FTP_SERIAL:-}" = 1 ]; then
  echo "== pytest, SQLAlchemy 2.1"
  .venv/bin/python -m pytest -m "not patroni" "$@"
  echo "== pytest, SQLAlchemy 2.0"
  .venv-sa20/bin/python -m pytest -m "not patroni" "$@"
  echo "== pytest, the Patroni tests, SQLAlchemy 2.1 then 2.0"
  patroni_tests .venv "$@"
  patroni_tests .venv-sa20 "$@"
  exit 0
fi
echo "== pytest, SQLAlchemy 2.1 and 2.0 side by side (2.0's output follows 2.1's)"
log20=$(mktemp)
started=$SECONDS
.venv-sa20/bin/python -m pytest -m "not patroni" "$@" >"$log20" 2>&1 &
pid20=$!
trap 'kill "$pid20" 2>/dev/null || true' EXIT INT TERM
rc21=0
.venv/bin/python -m pytest -m "not patroni" "$@" || rc21=$?
rc20=0
wait "$pid20" || rc20=$?
trap - EXIT INT TERM
echo "== pytest, SQLAlchemy 2.0 (ran beside 2.1)"
cat "$log20"
rm -f "$log20"
echo "== both runs: $((SECONDS - started)) s; SQLAlchemy 2.1 exit $rc21, 2.0 exit $rc20"
echo "== pytest, the Patroni tests, SQLAlchemy 2.1 then 2.0"
started=$SECONDS
rcp21=0
patroni_tests .venv "$@" || rcp21=$?
rcp20=0
patroni_tests .venv-sa20 "$@" || rcp20=$?
echo "== Patroni runs: $((SECONDS - started)) s; SQLAlchemy 2.1 exit $rcp21, 2.0 exit $rcp20"
[ "$rc21" = 0 ] && [ "$rc20" = 0 ] && [ "$rcp21" = 0 ] && [ "$rcp20" = 0 ]
