#!/usr/bin/env bash
# scripts/stack.sh — the local eventbus stack: PostgreSQL 15, nats-server
# (JetStream, file store) and the Kafka dev broker (test/tools/devbroker, a
# librdkafka mock cluster). Everything listens on 127.0.0.1 only, on free
# random ports (never the default 5432/4222/9092).
#
# Usage: scripts/stack.sh COMMAND
#   start                 start whatever is not running (reuses existing data)
#   stop                  stop all three, keep data, verify nothing is left
#   destroy               stop, then remove the state directory
#   status                what runs, with pids and ports (exit 0 = all three run)
#   env                   print the path of the sourceable env file
#   state-dir             print the state directory
#   free-port             print a free loopback port outside the kernel's
#                         ephemeral range (for a test's own server)
#   kafka-down|kafka-up   all dev brokers down / up (SIGUSR1 / SIGUSR2)
#   kafka-topics NAME[:PARTS]...   create Kafka topics with PARTS partitions
#                         (default 4) in the dev broker (SIGURG); fails if
#                         one exists already or cannot be created
#   nats-stop|nats-start  stop / start nats-server (same port and store)
#   pg-stop [fast|immediate|smart]   stop PostgreSQL (default fast)
#   pg-start              start PostgreSQL (same port; eventbus.conf refreshed)
#
# State directory: $EVENTBUS_STATE if set, else
#   ${TMPDIR:-/tmp}/eventbus-<first 8 hex digits of md5 of the repo root path>
# (md5 of the physical absolute path, without a trailing newline). It must be
# reachable by the postgres OS user, hence /tmp and not the repository.
#
# Environment switches:
#   EVENTBUS_NO_PRELOAD=1  start PostgreSQL without shared_preload_libraries
#                          and without the eventbus.* settings (takes effect
#                          at the next PostgreSQL start, not at a reload).
#   PG_CONFIG              pg_config to use (must be PostgreSQL 15).
#
# Layout of the state directory:
#   env                              sourceable environment (see `env`)
#   kafka/bootstrap                  bootstrap list, written by the devbroker
#   kafka/devbroker.pid, .log, state
#   nats/port, nats.pid, nats.log, nats.out (early stderr), store/
#   pg/data (eventbus.conf inside), pg/sock, pg/log/postgresql.log, pg/port

set -euo pipefail

PROG=stack.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

die()  { echo "$PROG: error: $*" >&2; exit 1; }
warn() { echo "$PROG: warning: $*" >&2; }

# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------

default_state_dir() {
    local hash
    hash=$(printf '%s' "$REPO" | md5sum | cut -c1-8)
    printf '%s/eventbus-%s\n' "${TMPDIR:-/tmp}" "$hash"
}

STATE=${EVENTBUS_STATE:-$(default_state_dir)}
[[ -n $STATE ]] || die "empty state directory"
# Canonical absolute path: process command lines and cwd are matched against it.
STATE=$(realpath -m -- "$STATE")
[[ $STATE != / ]] || die "refusing to use / as the state directory"

KAFKA_DIR=$STATE/kafka
NATS_DIR=$STATE/nats
PG_DIR=$STATE/pg
PGDATA_DIR=$PG_DIR/data
PGSOCK_DIR=$PG_DIR/sock
PGLOG_DIR=$PG_DIR/log
PGLOG=$PGLOG_DIR/postgresql.log
ENV_FILE=$STATE/env
MARKER=$STATE/.eventbus-stack

DEVBROKER=$REPO/test/tools/devbroker
DEVBROKER_PID=$KAFKA_DIR/devbroker.pid
DEVBROKER_LOG=$KAFKA_DIR/devbroker.log
BOOTSTRAP_FILE=$KAFKA_DIR/bootstrap
KAFKA_STATE_FILE=$KAFKA_DIR/state
KAFKA_TOPIC_REQUESTS=$KAFKA_DIR/topic-requests

NATS_PID=$NATS_DIR/nats.pid
NATS_LOG=$NATS_DIR/nats.log
NATS_PORT_FILE=$NATS_DIR/port
NATS_STORE=$NATS_DIR/store

PG_PORT_FILE=$PG_DIR/port
CONF_MARKER='# --- eventbus dev stack (scripts/stack.sh); edit eventbus.conf, not this block ---'

STOP_TIMEOUT=10   # seconds between SIGTERM and SIGKILL
START_TIMEOUT=30  # seconds to wait for a component to come up

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# ---------------------------------------------------------------------------
# PostgreSQL binaries
# ---------------------------------------------------------------------------

PGBIN=
pg_setup() {
    [[ -n $PGBIN ]] && return 0
    local pgc=${PG_CONFIG:-pg_config} ver
    command -v "$pgc" >/dev/null 2>&1 || die "$pgc not found (run scripts/deps.sh)"
    ver=$("$pgc" --version)
    [[ $ver == "PostgreSQL 15."* ]] ||
        die "$pgc reports '$ver', need PostgreSQL 15 (set PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config)"
    PGBIN=$("$pgc" --bindir)
    [[ -x $PGBIN/postgres ]] || die "$PGBIN/postgres missing (run scripts/deps.sh)"
    PGPKGLIB=$("$pgc" --pkglibdir)
}

# Run a PostgreSQL server-side program: as the postgres OS user when we are
# root (initdb/pg_ctl/postgres refuse to run as root). fd 9 (the state lock)
# is closed so that no server process inherits it.
as_pg() {
    if (( IS_ROOT )); then
        (cd / && runuser -u postgres -- "$@") 9>&-
    else
        (cd / && "$@") 9>&-
    fi
}

pg_chown() {
    if (( IS_ROOT )); then chown postgres:postgres -- "$@"; fi
}

# ---------------------------------------------------------------------------
# Processes and ports
# ---------------------------------------------------------------------------

# alive PID: the process exists and is not a zombie.
alive() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    read -r stat 2>/dev/null < "/proc/$pid/stat" || return 1
    # Field 3 (state) follows "(comm)"; comm may contain spaces.
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# pid_from_file FILE COMM: print the pid in FILE if it is alive and named COMM.
pid_from_file() {
    local file=$1 comm=$2 pid name
    [[ -r $file ]] || return 1
    pid=$(cat -- "$file" 2>/dev/null) || return 1   # nats-server writes no newline
    pid=${pid//[[:space:]]/}
    alive "$pid" || return 1
    read -r name 2>/dev/null < "/proc/$pid/comm" || return 1
    [[ $name == "$comm" ]] || return 1
    echo "$pid"
}

# Every postgres / nats-server / devbroker process belonging to this state
# directory: its command line names a path inside it, or (postgres children,
# whose titles are rewritten) its working directory is the data directory.
stack_processes() {
    local d pid comm cmd cwd
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        read -r comm 2>/dev/null < "$d/comm" || continue
        case $comm in postgres|nats-server|devbroker) ;; *) continue ;; esac
        alive "$pid" || continue
        cmd=$(tr '\0' ' ' 2>/dev/null < "$d/cmdline") || continue
        cwd=$(readlink "$d/cwd" 2>/dev/null) || cwd=
        if [[ $cmd == *"$STATE/"* || $cwd == "$PGDATA_DIR" ]]; then
            printf '%s %s %s\n' "$pid" "$comm" "${cmd% }"
        fi
    done
}

# terminate NAME PID: SIGTERM, wait up to STOP_TIMEOUT s, then SIGKILL.
terminate() {
    local name=$1 pid=$2 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for (( i = 0; i < STOP_TIMEOUT * 10; i++ )); do
        alive "$pid" || return 0
        sleep 0.1
    done
    warn "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for (( i = 0; i < 50; i++ )); do
        alive "$pid" || return 0
        sleep 0.1
    done
    die "$name (pid $pid) survived SIGKILL"
}

# Ports with a TCP listener on any address (IPv4 or IPv6), in decimal.
listening_ports() {
    local f sl addr rest st
    for f in /proc/net/tcp /proc/net/tcp6; do
        [[ -r $f ]] || continue
        while read -r sl addr rest; do
            [[ $sl == sl ]] && continue
            read -r _ st _ <<< "$rest"
            [[ $st == 0A ]] && echo $(( 16#${addr##*:} ))
        done < "$f"
    done
}

tcp_accepts() {
    # shellcheck disable=SC2016  # $1 expands in the inner shell
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

port_free() {
    local port=$1
    case $port in 5432|4222|9092) return 1 ;; esac
    if listening_ports | grep -qx "$port"; then return 1; fi
    if tcp_accepts "$port"; then return 1; fi
    return 0
}

# Random free port in 20000-60000, avoiding the kernel's ephemeral range
# (outgoing connections use it) when that leaves enough room, and avoiding
# ports already handed out by this invocation.
PICKED=" "
pick_port() {
    local lo=20000 hi=60000 elo ehi port try
    local -a ranges=()
    if read -r elo ehi < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null; then
        (( elo - lo >= 1000 )) && ranges+=("$lo $(( elo - 1 ))")
        (( hi - ehi >= 1000 )) && ranges+=("$(( ehi + 1 )) $hi")
    fi
    (( ${#ranges[@]} )) || ranges=("$lo $hi")
    for (( try = 0; try < 200; try++ )); do
        read -r lo hi <<< "${ranges[RANDOM % ${#ranges[@]}]}"
        port=$(( lo + ((RANDOM << 15) | RANDOM) % (hi - lo + 1) ))
        [[ $PICKED == *" $port "* ]] && continue
        if port_free "$port"; then
            PICKED+="$port "
            echo "$port"
            return 0
        fi
    done
    die "no free loopback port found in 20000-60000"
}

# wait_until SECONDS CMD...: poll CMD every 0.1 s.
wait_until() {
    local secs=$1 i
    shift
    for (( i = 0; i < secs * 10; i++ )); do
        "$@" && return 0
        sleep 0.1
    done
    return 1
}

show_log_tail() {
    local file=$1
    [[ -r $file ]] || return 0
    echo "--- last lines of $file ---" >&2
    tail -n 20 "$file" >&2 || true
}

# ---------------------------------------------------------------------------
# State directory
# ---------------------------------------------------------------------------

conf_quote() {   # postgresql.conf string literal
    printf "'%s'" "${1//\'/\'\'}"
}

ensure_state_dirs() {
    mkdir -p "$STATE" "$KAFKA_DIR" "$NATS_DIR" "$NATS_STORE" "$PG_DIR" "$PGSOCK_DIR" "$PGLOG_DIR"
    chmod 0755 "$STATE" "$PG_DIR" "$PGSOCK_DIR"
    [[ -e $MARKER ]] || echo "eventbus dev stack state for $REPO" > "$MARKER"
    if (( IS_ROOT )); then
        chown postgres:postgres "$PG_DIR" "$PGSOCK_DIR" "$PGLOG_DIR"
        runuser -u postgres -- test -x "$PG_DIR" -a -w "$PGSOCK_DIR" ||
            die "$STATE is not reachable by the postgres OS user; set EVENTBUS_STATE to a path under /tmp"
    fi
    local sock="$PGSOCK_DIR/.s.PGSQL.65535"
    (( ${#sock} <= 107 )) || die "state path too long for a unix socket ($sock); set a shorter EVENTBUS_STATE"
}

# Serialize stack.sh invocations on one state directory. Without "create",
# a missing state directory means there is nothing to lock.
take_lock() {
    if [[ ! -d $STATE ]]; then
        [[ ${1:-} == create ]] || return 0
        mkdir -p "$STATE"
    fi
    exec 9> "$STATE/.lock"
    flock -w 300 9 || die "another stack.sh holds $STATE/.lock"
}

# ---------------------------------------------------------------------------
# Kafka dev broker
# ---------------------------------------------------------------------------

kafka_pid() { pid_from_file "$DEVBROKER_PID" devbroker; }

kafka_ports() {
    local b
    [[ -r $BOOTSTRAP_FILE ]] || return 0
    IFS=, read -ra b < "$BOOTSTRAP_FILE" || true
    printf '%s\n' "${b[@]##*:}"
}

kafka_all_ports() {   # kafka_all_ports accept|refuse
    local want=$1 p
    while read -r p; do
        [[ -n $p ]] || continue
        if tcp_accepts "$p"; then [[ $want == accept ]] || return 1
        else [[ $want == refuse ]] || return 1
        fi
    done < <(kafka_ports)
}

kafka_start() {
    local pid launcher
    if pid=$(kafka_pid); then
        [[ -s $BOOTSTRAP_FILE ]] || die "devbroker (pid $pid) runs but $BOOTSTRAP_FILE is missing; run: $0 stop"
        local st=up
        [[ -r $KAFKA_STATE_FILE ]] && read -r st < "$KAFKA_STATE_FILE"
        if [[ $st == down ]]; then
            echo "kafka:    already running (pid $pid), brokers DOWN ($0 kafka-up)"
        else
            echo "kafka:    already running (pid $pid) at $(cat "$BOOTSTRAP_FILE")"
        fi
        return 0
    fi
    [[ -x $DEVBROKER ]] || die "$DEVBROKER not built (run: make test/tools/devbroker)"
    rm -f "$BOOTSTRAP_FILE" "$DEVBROKER_PID"
    setsid "$DEVBROKER" --bootstrap-file "$BOOTSTRAP_FILE" --pid-file "$DEVBROKER_PID" \
        --topic-requests "$KAFKA_TOPIC_REQUESTS" < /dev/null >> "$DEVBROKER_LOG" 2>&1 9>&- &
    launcher=$!
    if ! wait_until "$START_TIMEOUT" test -s "$BOOTSTRAP_FILE"; then
        alive "$launcher" && kill -TERM "$launcher" 2>/dev/null
        show_log_tail "$DEVBROKER_LOG"
        die "devbroker did not become ready within ${START_TIMEOUT}s"
    fi
    pid=$(kafka_pid) || { show_log_tail "$DEVBROKER_LOG"; die "devbroker wrote no valid pid file"; }
    echo up > "$KAFKA_STATE_FILE"
    echo "kafka:    started devbroker (pid $pid) at $(cat "$BOOTSTRAP_FILE") (in-memory: topics start empty)"
}

kafka_stop() {
    local pid
    if pid=$(kafka_pid); then
        terminate devbroker "$pid"
        echo "kafka:    stopped devbroker (pid $pid)"
    else
        echo "kafka:    not running"
    fi
    rm -f "$DEVBROKER_PID" "$KAFKA_STATE_FILE"
}

kafka_log_count() { grep -c "kafka $1:" "$DEVBROKER_LOG" 2>/dev/null || true; }
kafka_log_count_above() { (( $(kafka_log_count "$1") > $2 )); }

# kafka_signal down|up
kafka_signal() {
    local what=$1 pid sig word before
    pid=$(kafka_pid) || die "kafka dev broker is not running ($0 start)"
    if [[ $what == down ]]; then sig=USR1 word=DOWN; else sig=USR2 word=UP; fi
    before=$(kafka_log_count "$word")
    kill -"$sig" "$pid"
    # The devbroker logs "kafka DOWN:/UP:" once every broker has changed state.
    wait_until 15 kafka_log_count_above "$word" "${before:-0}" ||
        die "devbroker did not confirm kafka $what within 15s (see $DEVBROKER_LOG)"
    if [[ $what == down ]]; then
        wait_until 5 kafka_all_ports refuse || die "some broker port still accepts connections"
    else
        wait_until 5 kafka_all_ports accept || die "some broker port does not accept connections"
    fi
    echo "$what" > "$KAFKA_STATE_FILE"
    echo "kafka:    all brokers $word ($(tr ',' ' ' < "$BOOTSTRAP_FILE"))"
}

topic_requests_done() { grep -c "topic requests done:" "$DEVBROKER_LOG" 2>/dev/null || true; }
topic_requests_done_above() { (( $(topic_requests_done) > $1 )); }

# kafka_topics NAME[:PARTS]... — the dev broker creates them (SIGURG, the
# list in $KAFKA_TOPIC_REQUESTS); its log confirms with one "topic requests
# done: N created, M failed" line per request.
kafka_topics() {
    local pid before tmp t done_line
    (( $# > 0 )) || die "kafka-topics needs at least one NAME[:PARTS]"
    for t in "$@"; do
        [[ $t =~ ^[A-Za-z0-9._-]{1,249}(:[0-9]{1,5})?$ ]] || die "invalid topic spec '$t' (NAME[:PARTS])"
    done
    pid=$(kafka_pid) || die "kafka dev broker is not running ($0 start)"
    before=$(topic_requests_done)
    tmp=$(mktemp "$KAFKA_DIR/.topic-requests.XXXXXX")
    printf '%s\n' "$@" > "$tmp"
    mv -f "$tmp" "$KAFKA_TOPIC_REQUESTS"
    kill -URG "$pid"
    if ! wait_until 15 topic_requests_done_above "${before:-0}"; then
        grep -q "SIGURG ignored" "$DEVBROKER_LOG" 2>/dev/null &&
            die "this devbroker was started without --topic-requests; restart the stack ($0 stop; $0 start)"
        die "devbroker did not confirm the topic requests within 15s (see $DEVBROKER_LOG)"
    fi
    done_line=$(grep "topic requests done:" "$DEVBROKER_LOG" | tail -1)
    [[ $done_line == *" 0 failed" ]] || {
        grep -E "cannot create topic|topic requests:" "$DEVBROKER_LOG" | tail -n "$#" >&2
        die "some topics were not created: ${done_line##*: }"
    }
    echo "kafka:    ${done_line##*: } ($*)"
}

# ---------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------

nats_pid() { pid_from_file "$NATS_PID" nats-server; }

nats_port() {
    local p
    [[ -r $NATS_PORT_FILE ]] && read -r p < "$NATS_PORT_FILE" && [[ $p =~ ^[0-9]+$ ]] && echo "$p"
}

# The server greets every client with an INFO line.
nats_info() {
    # shellcheck disable=SC2016  # $1 expands in the inner shell
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && head -n1 <&3' _ "$1" 2>/dev/null
}

nats_greets() { [[ $(nats_info "$1") == INFO* ]]; }

# nats_start strict|flexible: strict = the remembered port must be reused.
nats_start() {
    local mode=$1 pid port launcher
    if pid=$(nats_pid); then
        echo "nats:     already running (pid $pid) on nats://127.0.0.1:$(nats_port)"
        return 0
    fi
    if port=$(nats_port); then
        if ! port_free "$port"; then
            [[ $mode == strict ]] &&
                die "nats port $port (remembered in $NATS_PORT_FILE) is taken by another process"
            warn "remembered nats port $port is taken; picking a new one"
            port=$(pick_port)
        fi
    else
        port=$(pick_port)
    fi
    echo "$port" > "$NATS_PORT_FILE"
    rm -f "$NATS_PID"
    setsid nats-server -js -sd "$NATS_STORE" -a 127.0.0.1 -p "$port" -P "$NATS_PID" -l "$NATS_LOG" \
        < /dev/null >> "$NATS_DIR/nats.out" 2>&1 9>&- &
    launcher=$!
    if ! wait_until "$START_TIMEOUT" nats_greets "$port"; then
        alive "$launcher" && kill -TERM "$launcher" 2>/dev/null
        show_log_tail "$NATS_DIR/nats.out"
        show_log_tail "$NATS_LOG"
        die "nats-server did not accept connections on port $port within ${START_TIMEOUT}s"
    fi
    wait_until 5 nats_pid >/dev/null || die "nats-server wrote no pid file"
    echo "nats:     started nats-server (pid $(nats_pid)) on nats://127.0.0.1:$port (JetStream store $NATS_STORE)"
}

nats_stop() {
    local pid
    if pid=$(nats_pid); then
        terminate nats-server "$pid"
        echo "nats:     stopped nats-server (pid $pid)"
    else
        echo "nats:     not running"
    fi
    rm -f "$NATS_PID"
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

# The postmaster's pid, if it runs: postmaster.pid names a live (not zombie)
# process called postgres whose working directory is our data directory
# (so a recycled pid after a crash is not mistaken for our server).
pg_pid() {
    local pid comm
    [[ -r $PGDATA_DIR/postmaster.pid ]] || return 1
    read -r pid 2>/dev/null < "$PGDATA_DIR/postmaster.pid" || return 1
    alive "$pid" || return 1
    read -r comm 2>/dev/null < "/proc/$pid/comm" || return 1
    [[ $comm == postgres && $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$PGDATA_DIR" ]] || return 1
    echo "$pid"
}

pg_running() { pg_pid > /dev/null; }

pid_gone() { ! kill -0 "$1" 2>/dev/null; }

# A crashed postmaster stays a zombie until init reaps it (about a second
# here); until then postgres refuses to start over its postmaster.pid.
pg_wait_reaped() {
    local pid
    [[ -r $PGDATA_DIR/postmaster.pid ]] || return 0
    read -r pid 2>/dev/null < "$PGDATA_DIR/postmaster.pid" || return 0
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    alive "$pid" && return 0
    wait_until 10 pid_gone "$pid" ||
        warn "crashed postmaster $pid has not been reaped yet"
}

pg_port() {
    local p
    [[ -r $PG_PORT_FILE ]] && read -r p < "$PG_PORT_FILE" && [[ $p =~ ^[0-9]+$ ]] && echo "$p"
}

psql_admin() {
    psql -X -q -At -v ON_ERROR_STOP=1 -h "$PGSOCK_DIR" -p "$(pg_port)" -U postgres "$@"
}

pg_init() {
    local port
    [[ -f $PGDATA_DIR/PG_VERSION ]] && return 0
    [[ -e $PGDATA_DIR ]] && die "$PGDATA_DIR exists but is not a PostgreSQL data directory; run: $0 destroy"
    port=$(pick_port)
    if ! as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" --auth=trust -U postgres --encoding=UTF8 --locale=C \
            > "$PGLOG_DIR/initdb.log" 2>&1; then
        show_log_tail "$PGLOG_DIR/initdb.log"
        rm -rf "$PGDATA_DIR"
        die "initdb failed"
    fi
    echo "$port" > "$PG_PORT_FILE"
    echo "postgres: initialized $PGDATA_DIR"
}

# Append the stack's settings to postgresql.conf once.
pg_configure() {
    local conf=$PGDATA_DIR/postgresql.conf port
    grep -qxF "$CONF_MARKER" "$conf" && return 0
    port=$(pg_port) || { port=$(pick_port); echo "$port" > "$PG_PORT_FILE"; }
    {
        echo
        echo "$CONF_MARKER"
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = $(conf_quote "$PGSOCK_DIR")"
        echo "shared_preload_libraries = 'eventbus'"
        echo "max_worker_processes = 32"
        echo "log_line_prefix = '%m [%p] %b '"
        echo "include_if_exists = 'eventbus.conf'"
    } >> "$conf"
}

# Before a start: if the configured port has been taken meanwhile, move.
pg_check_port() {
    local port new conf=$PGDATA_DIR/postgresql.conf
    port=$(pg_port) || die "$PG_PORT_FILE missing"
    port_free "$port" && return 0
    [[ $1 == strict ]] && die "postgres port $port is taken by another process"
    new=$(pick_port)
    warn "postgres port $port is taken; moving to $new"
    sed -i "/^$(printf '%s' "$CONF_MARKER" | sed 's/[].[*^$\/]/\\&/g')\$/,\$ s/^port = [0-9]*\$/port = $new/" "$conf"
    grep -qx "port = $new" "$conf" || die "could not update the port in $conf"
    echo "$new" > "$PG_PORT_FILE"
}

# Rewrite eventbus.conf; returns 0 if its content changed.
pg_write_eventbus_conf() {
    local file=$PGDATA_DIR/eventbus.conf tmp brokers natsport
    tmp=$(mktemp "$PGDATA_DIR/.eventbus.conf.XXXXXX")
    brokers=$(cat "$BOOTSTRAP_FILE" 2>/dev/null || true)
    natsport=$(nats_port || true)
    {
        echo "# Written by scripts/stack.sh on every start; local edits are lost."
        if [[ ${EVENTBUS_NO_PRELOAD:-0} == 1 ]]; then
            echo "# EVENTBUS_NO_PRELOAD=1: the eventbus library is not preloaded."
            echo "shared_preload_libraries = ''"
        else
            echo "eventbus.database = 'eventbus'"
            echo "eventbus.kafka_brokers = $(conf_quote "$brokers")"
            echo "eventbus.nats_url = $(conf_quote "${natsport:+nats://127.0.0.1:$natsport}")"
            echo "eventbus.workers = 4"
            echo "eventbus.consumer_group = 'eventbus'"
            # The dev broker rebalances in session.timeout.ms - 1 s: keep it short.  It
            # answers a fetch when data arrives (devbroker_proxy.c); the 10 ms wait dates
            # from before that and costs ~100 empty fetches per second per broker while
            # idle (dev stack only; the tests' consumer settings match it).
            echo "eventbus.kafka_properties = 'session.timeout.ms=6000;heartbeat.interval.ms=500;fetch.wait.max.ms=10'"
        fi
    } > "$tmp"
    chmod 0600 "$tmp"
    pg_chown "$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$file"
    return 0
}

pg_check_library() {
    [[ ${EVENTBUS_NO_PRELOAD:-0} == 1 ]] && return 0
    [[ -f $PGPKGLIB/eventbus.so ]] ||
        die "$PGPKGLIB/eventbus.so is not installed: run 'make install' (or set EVENTBUS_NO_PRELOAD=1)"
}

pg_do_start() {
    if ! as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -w -t 120 -l "$PGLOG" start > "$PGLOG_DIR/pg_ctl.out" 2>&1; then
        cat "$PGLOG_DIR/pg_ctl.out" >&2
        show_log_tail "$PGLOG"
        die "PostgreSQL failed to start"
    fi
}

pg_create_db() {
    if [[ $(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'eventbus'") != 1 ]]; then
        psql_admin -d postgres -c "CREATE DATABASE eventbus"
        echo "postgres: created database eventbus"
    fi
}

pg_warn_pending_restart() {
    local pending
    pending=$(psql_admin -d postgres -c "SELECT string_agg(name, ', ') FROM pg_settings WHERE pending_restart") || return 0
    [[ -z $pending ]] ||
        warn "settings need a PostgreSQL restart to take effect: $pending ($0 pg-stop && $0 pg-start)"
}

# pg_start flexible|strict: rewrite eventbus.conf, then start the server or,
# if it runs and the file changed, reload it. strict (from `pg-start`) insists
# on the configured port; flexible (from `start`) moves if it was taken.
pg_start() {
    local mode=$1 changed=0
    pg_setup
    pg_init
    pg_configure
    pg_write_eventbus_conf && changed=1
    if pg_running; then
        if (( changed )); then
            as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" reload > /dev/null
            sleep 0.5   # let the postmaster process SIGHUP before pending_restart is read
            echo "postgres: already running (pid $(pg_pid)) on port $(pg_port); eventbus.conf changed, reloaded"
            pg_warn_pending_restart
        else
            echo "postgres: already running (pid $(pg_pid)) on port $(pg_port)"
        fi
    else
        pg_check_library
        pg_check_port "$mode"
        pg_wait_reaped
        pg_do_start
        echo "postgres: started (pid $(pg_pid)) on 127.0.0.1:$(pg_port), socket $PGSOCK_DIR"
    fi
    pg_create_db
}

pg_stop() {
    local mode=${1:-fast}
    case $mode in fast|immediate|smart) ;; *) die "pg-stop mode must be fast, immediate or smart" ;; esac
    pg_setup
    if ! pg_running; then
        echo "postgres: not running"
        return 0
    fi
    local pid
    pid=$(pg_pid || true)
    if ! as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m "$mode" -w -t 60 stop > "$PGLOG_DIR/pg_ctl.out" 2>&1; then
        if ! pg_running; then
            echo "postgres: stopped (postmaster ${pid:-?} exited by itself)"
            return 0
        fi
        cat "$PGLOG_DIR/pg_ctl.out" >&2
        if [[ $mode != immediate ]]; then
            warn "pg_ctl stop -m $mode failed; trying -m immediate"
            as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w -t 30 stop > /dev/null 2>&1 ||
                die "PostgreSQL did not stop"
        else
            die "PostgreSQL did not stop"
        fi
    fi
    echo "postgres: stopped ($mode, pid ${pid:-?})"
}

# ---------------------------------------------------------------------------
# Env file, summary, status
# ---------------------------------------------------------------------------

# Single-quoted shell word, so the env file is plain to other parsers too.
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

write_env() {
    local tmp
    tmp=$(mktemp "$STATE/.env.XXXXXX")
    {
        echo "# eventbus dev stack environment; source this file (written by scripts/stack.sh start)"
        printf 'export EVENTBUS_STATE=%s\n' "$(shq "$STATE")"
        printf 'export PGHOST=%s\n' "$(shq "$PGSOCK_DIR")"
        printf 'export PGPORT=%s\n' "$(shq "$(pg_port)")"
        printf 'export PGUSER=postgres\n'
        printf 'export PGDATABASE=eventbus\n'
        printf 'export EVENTBUS_PGDATA=%s\n' "$(shq "$PGDATA_DIR")"
        printf 'export EVENTBUS_PG_LOG=%s\n' "$(shq "$PGLOG")"
        printf 'export EVENTBUS_NATS_URL=%s\n' "$(shq "nats://127.0.0.1:$(nats_port)")"
        printf 'export EVENTBUS_KAFKA_BROKERS=%s\n' "$(shq "$(cat "$BOOTSTRAP_FILE")")"
        printf 'export EVENTBUS_REPO=%s\n' "$(shq "$REPO")"
    } > "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$ENV_FILE"
}

print_summary() {
    local stop="make stop"
    [[ $STATE == "$(realpath -m -- "$(default_state_dir)")" ]] || stop="EVENTBUS_STATE=$STATE make stop"
    cat <<EOF
eventbus stack is up (state $STATE)
  psql:   psql -h $PGSOCK_DIR -p $(pg_port) -U postgres eventbus   (TCP: 127.0.0.1:$(pg_port))
  nats:   nats://127.0.0.1:$(nats_port)
  kafka:  $(cat "$BOOTSTRAP_FILE")
  env:    source $ENV_FILE
  logs:   $PGLOG, $NATS_LOG, $DEVBROKER_LOG
  stop:   $stop   (or $0 stop; '$0 destroy' also removes the data)
EOF
}

cmd_status() {
    local pid rc=0 st=up line
    echo "state:    $STATE$([[ -e $STATE ]] || echo ' (does not exist)')"
    pg_setup
    if pg_running && pid=$(pg_pid); then
        line="running (pid $pid) on 127.0.0.1:$(pg_port), socket $PGSOCK_DIR"
        if psql_admin -d postgres -c 'SELECT 1' > /dev/null 2>&1; then
            line+=", preload: $(psql_admin -d postgres -c 'SHOW shared_preload_libraries' 2>/dev/null || echo '?')"
            [[ $line == *"preload: " ]] && line+="(none)"
        else
            line+=" (not accepting connections)"
        fi
        echo "postgres: $line"
    else
        echo "postgres: stopped"; rc=3
    fi
    if pid=$(nats_pid); then
        local info
        info=$(nats_info "$(nats_port)" || true)
        if [[ $info == INFO* ]]; then
            [[ $info == *'"jetstream":true'* ]] && info=", JetStream on" || info=", JetStream OFF"
            echo "nats:     running (pid $pid) on nats://127.0.0.1:$(nats_port)$info"
        else
            echo "nats:     running (pid $pid) but port $(nats_port) does not answer"; rc=3
        fi
    else
        echo "nats:     stopped$(p=$(nats_port) && echo " (port $p remembered)")"; rc=3
    fi
    if pid=$(kafka_pid); then
        [[ -r $KAFKA_STATE_FILE ]] && read -r st < "$KAFKA_STATE_FILE"
        if [[ $st == down ]]; then
            echo "kafka:    running (pid $pid), brokers DOWN: $(cat "$BOOTSTRAP_FILE" 2>/dev/null)"
        else
            echo "kafka:    running (pid $pid) at $(cat "$BOOTSTRAP_FILE" 2>/dev/null)"
        fi
    else
        echo "kafka:    stopped"; rc=3
    fi
    return "$rc"
}

cmd_start() {
    take_lock create
    ensure_state_dirs
    pg_setup
    kafka_start
    nats_start flexible
    pg_start flexible
    write_env
    print_summary
}

cmd_stop() {
    local left pid comm rest kept=${1-" (data kept)"}
    if [[ ! -d $STATE ]]; then
        echo "stopped: nothing to stop ($STATE does not exist)"
        return 0
    fi
    take_lock
    pg_stop fast
    nats_stop
    kafka_stop
    # Anything still alive that belongs to this state directory (a lost pid
    # file, orphaned backends after a crash) is terminated as well.
    left=$(stack_processes)
    if [[ -n $left ]]; then
        while read -r pid comm rest; do
            warn "leftover $comm (pid $pid): $rest"
            terminate "$comm" "$pid"
        done <<< "$left"
        left=$(stack_processes)
    fi
    if [[ -n $left ]]; then
        echo "$left" >&2
        die "processes of $STATE are still running"
    fi
    echo "stopped: no postgres, nats-server or devbroker process of $STATE remains$kept"
}

cmd_destroy() {
    if [[ ! -e $STATE ]]; then
        echo "destroyed: nothing to remove ($STATE does not exist)"
        return 0
    fi
    [[ -e $MARKER ]] || die "$STATE has no $(basename "$MARKER") marker; not removing it"
    cmd_stop ""
    rm -rf -- "$STATE"
    echo "destroyed: removed $STATE"
}

cmd_env() {
    echo "$ENV_FILE"
    [[ -r $ENV_FILE ]] || { warn "$ENV_FILE does not exist yet (run: $0 start)"; return 1; }
}

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        start)      cmd_start ;;
        stop)       cmd_stop ;;
        destroy)    cmd_destroy ;;
        status)     cmd_status ;;
        env)        cmd_env ;;
        state-dir)  echo "$STATE" ;;
        free-port)  pick_port ;;
        kafka-down) take_lock; kafka_signal down ;;
        kafka-up)   take_lock; kafka_signal up ;;
        kafka-topics) take_lock; kafka_topics "$@" ;;
        nats-stop)  take_lock; nats_stop ;;
        nats-start) take_lock create; ensure_state_dirs; nats_start strict ;;
        pg-stop)    take_lock; pg_stop "${1:-fast}" ;;
        pg-start)   take_lock create; ensure_state_dirs; pg_start strict ;;
        -h|--help|help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
