#!/usr/bin/env bash
# Installs what Wardgate's demo, tests and benchmarks need from the system: the PostgreSQL server
# and client tools (psql, pgbench), and Node.js for the tests' OpenID provider. Does nothing when
# they are already there; and a C compiler with the Python headers for the relay's C part.
# `system-deps.sh test` also installs Chromium, for the web console's browser tests, and a Java
# runtime with the PostgreSQL JDBC driver (Debian's build of pgjdbc), a client the tests drive, and
# strace, by which the power-loss test learns what the journal had flushed to disk;
# `system-deps.sh bench` also installs PgBouncer, the benchmark's reference proxy.
set -euo pipefail
want_browser=false
want_pgbouncer=false
[ "${1:-}" = "test" ] && want_browser=true
[ "${1:-}" = "bench" ] && want_pgbouncer=true

have_server() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_clients() { command -v psql >/dev/null 2>&1 && command -v pgbench >/dev/null 2>&1; }
have_node() { command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; }
have_cc() { command -v gcc >/dev/null 2>&1; }
have_headers() { test -f "$(${PYTHON:-python3} -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h"; }
have_browser() { ! $want_browser || command -v chromium >/dev/null 2>&1; }
have_java() { ! $want_browser || { command -v java >/dev/null 2>&1 && test -f /usr/share/java/postgresql.jar; }; }
have_strace() { ! $want_browser || command -v strace >/dev/null 2>&1; }
have_pgbouncer() { ! $want_pgbouncer || command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer; }

if have_server && have_clients && have_node && have_cc && have_headers && have_browser && have_java && have_strace && have_pgbouncer && id postgres >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
  echo "PostgreSQL server binaries are missing; install the 'postgresql' package (needs root)." >&2
  exit 1
fi

echo "installing what is missing of: PostgreSQL server and client tools, a C compiler, Node.js for the tests' identity provider, Chromium, Java and the JDBC driver, PgBouncer (apt-get)..." >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
packages="postgresql postgresql-contrib postgresql-client"
have_node || packages="$packages nodejs npm"
have_cc || packages="$packages gcc libc6-dev"
have_headers || packages="$packages python3-dev"
have_browser || packages="$packages chromium"
have_strace || packages="$packages strace"
have_pgbouncer || packages="$packages pgbouncer"
if ! have_java; then
  command -v java >/dev/null 2>&1 || packages="$packages default-jre-headless"
  packages="$packages libpostgresql-jdbc-java"
fi
$SUDO apt-get install -y -qq --no-install-recommends $packages >/dev/null
# The Debian package starts a cluster of its own on 5432; Wardgate starts its own servers instead.
$SUDO systemctl disable --now postgresql >/dev/null 2>&1 || $SUDO service postgresql stop >/dev/null 2>&1 || true
# Likewise PgBouncer's own service: the benchmark starts its own.
if $want_pgbouncer; then
  $SUDO systemctl disable --now pgbouncer >/dev/null 2>&1 || $SUDO service pgbouncer stop >/dev/null 2>&1 || true
fi
