#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests of `advisor tune --storage postgresql://...`.
#
#   eval "$(scripts/ci_postgres.sh)"        # start (or reuse) it; sets ADVISOR_TEST_POSTGRES_URL
#   scripts/ci_postgres.sh stop             # stop it (its data stays in the state folder)
#   scripts/ci_postgres.sh destroy          # stop it and delete the state folder
#
# stdout is exactly one line, `export ADVISOR_TEST_POSTGRES_URL=postgresql+psycopg2://...`, so the
# caller can eval it; the same line is written to $STATE/env (source it later). Everything else goes
# to stderr.
#
# - Installs Debian's postgresql (apt-get) only when no initdb is found.
# - The cluster lives in $ADVISOR_PG_DIR (default /tmp/advisor-ci-postgres); running the script again
#   reuses it (restarting it if it was stopped), so it is idempotent and takes about a second after
#   the first time.
# - It listens on 127.0.0.1 only, on a free port, with no Unix socket; password authentication
#   (a random password kept in $STATE, mode 600).
# - Postgres refuses to run as root: as root, the server and the client tools run as the `postgres`
#   OS user (created by the Debian package); as any other user, as that user.
# - Durability is off (fsync, synchronous_commit, full_page_writes): it only holds test studies.
# The Python side needs the psycopg2 driver: pip install psycopg2-binary.
set -euo pipefail

STATE="${ADVISOR_PG_DIR:-/tmp/advisor-ci-postgres}"
DATA="$STATE/data"
DB="${ADVISOR_PG_DB:-advisor_test}"
SUPERUSER=postgres

log() { echo "ci_postgres: $*" >&2; }
die() { log "error: $*"; exit 1; }

find_bindir() {
    local dir
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return 0
    fi
    # Debian keeps the server binaries out of PATH, one folder per major version: take the newest.
    dir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
        return 0
    fi
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return 0
    fi
    return 1
}

install_postgres() {
    log "no initdb found: installing Debian's postgresql"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "not root and no sudo: install postgresql yourself"
        sudo="sudo"
    fi
    # A policy-rc.d that says 101 keeps the package from starting its own cluster on 5432 (we start
    # ours); one that is there already (Docker images have one) is left alone.
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        $sudo sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy"
    fi
    local status=0
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2 ||
        status=$?
    if [ -n "$policy" ]; then
        $sudo rm -f "$policy"
    fi
    [ "$status" -eq 0 ] || die "apt-get install postgresql failed (exit $status)"
}

# Run a command as the OS user that owns the cluster.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$SUPERUSER" -- "$@"
    else
        "$@"
    fi
}

free_port() {
    local port
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return 0
    fi
    for port in $(seq 54330 54429); do
        if ! port_in_use "$port"; then
            echo "$port"
            return 0
        fi
    done
    die "no free port in 54330-54429"
}

running() {
    as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

current_port() {
    # The last `port = N` line of postgresql.conf wins, as in postgres itself.
    sed -n 's/^port = \([0-9]*\).*/\1/p' "$DATA/postgresql.conf" | tail -n 1
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
    local attempt port
    for attempt in 1 2 3 4 5; do
        port=$(current_port)
        # First try the port the cluster had (so the URL stays the same), unless something else took it.
        if [ -z "$port" ] || [ "$attempt" -gt 1 ] || port_in_use "$port"; then
            port=$(free_port)
            as_owner sh -c "echo 'port = $port' >>'$DATA/postgresql.conf'"
        fi
        if as_owner "$BIN/pg_ctl" -D "$DATA" -l "$STATE/server.log" -w -t 30 start >/dev/null; then
            return 0
        fi
        log "start on port $port failed (attempt $attempt); see $STATE/server.log"
    done
    die "could not start postgres; last lines of $STATE/server.log: $(tail -n 5 "$STATE/server.log" 2>/dev/null)"
}

psql_owner() {
    as_owner env PGPASSWORD="$(cat "$STATE/password")" "$BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$(current_port)" -U "$SUPERUSER" -d postgres "$@"
}

# --- main -------------------------------------------------------------------------------------------

command="${1:-start}"
BIN=$(find_bindir) || true
case "$command" in
stop | destroy)
    if [ -n "$BIN" ] && [ -f "$DATA/PG_VERSION" ] && running; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2
    fi
    if [ "$command" = destroy ]; then
        rm -rf "$STATE"
        log "removed $STATE"
    fi
    exit 0
    ;;
start) ;;
*) die "unknown command '$command' (use start, stop or destroy)" ;;
esac

if [ -z "$BIN" ]; then
    install_postgres
    BIN=$(find_bindir) || die "postgresql installed but no initdb found"
fi
if [ "$(id -u)" -eq 0 ] && ! id "$SUPERUSER" >/dev/null 2>&1; then
    die "running as root needs a '$SUPERUSER' OS user (the Debian package creates it)"
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
    log "creating a cluster in $DATA ($("$BIN/postgres" --version))"
    rm -rf "$STATE"
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    # A password only the caller and the cluster's owner can read.
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/password")
    if [ "$(id -u)" -eq 0 ]; then
        chown -R "$SUPERUSER:" "$STATE"
    fi
    as_owner "$BIN/initdb" -D "$DATA" -U "$SUPERUSER" --pwfile="$STATE/password" \
        --auth-local=reject --auth-host=scram-sha-256 --no-locale -E UTF8 >"$STATE/initdb.log" 2>&1 ||
        die "initdb failed: $(tail -n 5 "$STATE/initdb.log")"
    as_owner sh -c "cat >>'$DATA/postgresql.conf'" <<'EOF'
# advisor CI: localhost TCP only, no Unix socket, no durability (throwaway test data).
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 100
EOF
fi

if running; then
    log "reusing the cluster in $DATA (port $(current_port))"
else
    start
    log "started postgres on 127.0.0.1:$(current_port) (data in $DATA)"
fi

exists=$(psql_owner -tA -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")
if [ "$exists" != 1 ]; then
    psql_owner -c "CREATE DATABASE \"$DB\"" >&2
    log "created database $DB"
fi

url="postgresql+psycopg2://$SUPERUSER:$(cat "$STATE/password")@127.0.0.1:$(current_port)/$DB"
line="export ADVISOR_TEST_POSTGRES_URL='$url'"
(umask 077 && echo "$line" >"$STATE/env")
log "stop it with: $0 stop   (or delete everything: $0 destroy); the URL is also in $STATE/env"
echo "$line"
