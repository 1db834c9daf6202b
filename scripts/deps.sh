#!/usr/bin/env bash
# scripts/deps.sh — make sure everything eventbus needs to build, run and test
# is installed (Debian 12). Idempotent: when everything is present it only
# checks; otherwise, as root, it runs apt-get update once and installs the
# package set, then checks again. Not root: prints the command and exits 1.
#
# PG_CONFIG may name the pg_config to use (default: pg_config in PATH); it
# must report PostgreSQL 15.
#
# --package (make package, make test-ops): also the Debian packaging tools
# (dpkg-buildpackage, debhelper, pg_buildext) and python3; kept out of the
# default check so that make test does not depend on them.
set -euo pipefail

PROG=deps.sh
PGMAJOR=15
PGBIN=/usr/lib/postgresql/$PGMAJOR/bin
PACKAGES=(
    "postgresql-$PGMAJOR" "postgresql-server-dev-$PGMAJOR" "postgresql-$PGMAJOR-pgtap"
    libtap-parser-sourcehandler-pgtap-perl librdkafka-dev libnats-dev nats-server
    kcat pkg-config gcc make libc6-dev python3-yaml
)
PACKAGING=0
if [[ ${1:-} == --package ]]; then
    PACKAGING=1
    PACKAGES+=(dpkg-dev debhelper postgresql-server-dev-all python3)
elif [[ $# -gt 0 ]]; then
    echo "usage: $PROG [--package]" >&2
    exit 2
fi

MISSING=()
miss() { MISSING+=("$1"); }

have() { command -v "$1" > /dev/null 2>&1; }

# Fill MISSING with a description of every missing piece. PostgreSQL pieces
# are looked up through PostgreSQL 15's own pg_config; which pg_config the
# build will use is checked separately (check_pg_config_version).
check() {
    MISSING=()
    local inc share

    [[ -x $PGBIN/postgres ]] || miss "PostgreSQL $PGMAJOR server ($PGBIN/postgres)"
    [[ -x $PGBIN/initdb ]]   || miss "initdb ($PGBIN/initdb)"
    have psql || miss "psql"
    if [[ -x $PGBIN/pg_config ]]; then
        inc=$("$PGBIN/pg_config" --includedir-server)
        [[ -f $inc/postgres.h ]] || miss "server headers ($inc/postgres.h)"
        share=$("$PGBIN/pg_config" --sharedir)
        [[ -f $share/extension/pgtap.control ]] || miss "pgTAP extension ($share/extension/pgtap.control)"
    else
        miss "pg_config for $PGMAJOR ($PGBIN/pg_config, postgresql-server-dev-$PGMAJOR)"
    fi
    have "${PG_CONFIG:-pg_config}" || miss "pg_config in PATH"
    have gcc        || miss "gcc"
    have make       || miss "make"
    [[ -f /usr/include/stdio.h ]] || miss "C library headers (libc6-dev)"
    if have pkg-config; then
        pkg-config --exists rdkafka || miss "pkg-config module rdkafka (librdkafka-dev)"
        pkg-config --exists libnats || miss "pkg-config module libnats (libnats-dev)"
    else
        miss "pkg-config"
    fi
    [[ -f /usr/include/librdkafka/rdkafka_mock.h ]] || miss "/usr/include/librdkafka/rdkafka_mock.h"
    have nats-server || miss "nats-server"
    have kcat        || miss "kcat"
    have pg_prove    || miss "pg_prove"
    have runuser     || miss "runuser (util-linux)"
    /usr/bin/python3 -c 'import yaml' 2>/dev/null || miss "Python's yaml module (python3-yaml)"
    if (( PACKAGING )); then
        have dpkg-buildpackage || miss "dpkg-buildpackage (dpkg-dev)"
        have dh                || miss "dh (debhelper)"
        have pg_buildext       || miss "pg_buildext (postgresql-server-dev-all)"
        [[ -f /usr/share/perl5/Debian/Debhelper/Sequence/pgxs_loop.pm ]] ||
            miss "dh --with pgxs_loop (postgresql-server-dev-all)"
        have python3           || miss "python3"
    fi
    return 0
}

# pg_config must be PostgreSQL 15: /usr/bin/pg_config on Debian runs the
# newest installed postgresql-server-dev-NN, so a newer one shadows 15.
check_pg_config_version() {
    local pgc=${PG_CONFIG:-pg_config} ver where
    where=$(command -v "$pgc" || echo "$pgc")
    ver=$("$pgc" --version)
    if [[ $ver != "PostgreSQL $PGMAJOR."* ]]; then
        cat >&2 <<EOF
$PROG: error: $where reports "$ver", but eventbus targets PostgreSQL $PGMAJOR.
  (On Debian /usr/bin/pg_config runs the newest postgresql-server-dev-NN.)
  Use PostgreSQL $PGMAJOR's pg_config explicitly, e.g.:
    export PG_CONFIG=$PGBIN/pg_config      # honoured by make and scripts/stack.sh
  or put $PGBIN first in PATH.
EOF
        exit 1
    fi
}

versions() {
    local pgc=${PG_CONFIG:-pg_config}
    printf '%s, librdkafka %s, libnats %s, nats-server %s' \
        "$("$pgc" --version)" \
        "$(pkg-config --modversion rdkafka)" \
        "$(pkg-config --modversion libnats)" \
        "$(nats-server --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}//p')"
}

main() {
    check
    if (( ${#MISSING[@]} == 0 )); then
        check_pg_config_version
        echo "deps: all present, nothing to do ($(versions))"
        return 0
    fi

    local before
    before=$(IFS=';'; echo "${MISSING[*]}")
    if [[ $(id -u) -ne 0 ]]; then
        echo "$PROG: missing: ${before//;/, }" >&2
        echo "$PROG: run as root:" >&2
        echo "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${PACKAGES[*]}" >&2
        exit 1
    fi

    local log
    log=$(mktemp "${TMPDIR:-/tmp}/eventbus-deps.XXXXXX.log")
    if ! apt-get update > "$log" 2>&1 ||
       ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}" >> "$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "$PROG: error: apt-get failed (full log: $log)" >&2
        exit 1
    fi
    check
    if (( ${#MISSING[@]} )); then
        echo "$PROG: error: still missing after apt-get install: ${MISSING[*]} (log: $log)" >&2
        exit 1
    fi
    check_pg_config_version
    rm -f "$log"
    echo "deps: installed missing pieces (${before//;/, }) with apt-get ($(versions))"
}

main "$@"
