# shellcheck shell=bash
# cluster2.sh — a second PostgreSQL cluster on the test stack, for tests of
# several instances sharing one consumer group (scale-out, fail-over).
# Source it AFTER lib.sh (it needs $EVENTBUS_STATE, $EVENTBUS_PGDATA, $REPO):
#
#   source "$(dirname "$0")/lib.sh"
#   source "$(dirname "$0")/cluster2.sh"
#   consumer_setup                  # (if used) installs its own EXIT trap ...
#   c2_init                         # ... which c2_init chains onto: call it after
#   c2_start && c2_wait_ready 60
#   q2 -c "SELECT ..."              # like q, in database eventbus of cluster 2
#   c2_stop fast|immediate|smart; c2_start ...
#
# What it is: a cluster of the same PostgreSQL binaries ($PG_CONFIG, else the
# bindir of the server the stack runs) in $EVENTBUS_STATE/c2 (data/, sock/,
# log/postgresql.log, port), initdb'd as the postgres OS user (when run as
# root), listening on 127.0.0.1 and its own socket, on a free random port in
# 20000-60000 (never 5432/4222/9092).  It preloads eventbus and gets the same
# eventbus settings as the stack's cluster: at every c2_start its eventbus.conf
# is rewritten from the stack's (same brokers, NATS URL, consumer group,
# kafka_properties, database, workers), followed by the eventbus.* settings the
# stack's cluster has from ALTER SYSTEM (its postgresql.auto.conf, e.g.
# eventbus.ack_timeout); ALTER SYSTEM on cluster 2 still overrides both.
#
# Functions:
#   c2_init [CONF_LINE...]   fresh cluster (a previous one of this state dir is
#                            stopped and removed first); extra postgresql.conf
#                            lines, e.g. 'track_commit_timestamp = on'.  Chains
#                            c2_cleanup onto the current EXIT trap.
#   c2_start [PGOPT...]      start (waits until it accepts connections); PGOPT are
#                            postgres options, e.g. -c shared_preload_libraries=
#                            to read its tables without consuming.  Creates the
#                            database eventbus and, if preloaded, the extension.
#   c2_wait_ready SECONDS    the launcher reports Kafka and NATS connected and the
#                            dispatcher runs (status 1 after SECONDS)
#   c2_stop [fast|immediate|smart]   stop (default fast); falls back to
#                            immediate if a fast/smart stop does not finish in 60 s
#   c2_running               status 0 if its postmaster runs
#   c2_psql ARGS...          psql into it (PGHOST/PGPORT of cluster 2, database
#                            eventbus unless -d is given)
#   q2 ARGS...               as lib.sh's q, on cluster 2
#   c2_cleanup               stop it immediately, kill any process left in its
#                            directory, remove its data directory (its server
#                            log stays, for post-mortems: $C2_LOG).  Runs at exit.
#
# Nothing is left behind: the EXIT trap runs c2_cleanup (INT and TERM exit the
# script, so the trap runs too); and `scripts/stack.sh stop` terminates any
# process whose command line names a path in the state directory, which
# includes a cluster-2 postmaster that lost its trap (kill -9 of the test).

C2_DIR="${EVENTBUS_STATE:-$("$STACK" state-dir)}/c2"
C2_DATA="$C2_DIR/data"
C2_SOCK="$C2_DIR/sock"
C2_LOG="$C2_DIR/log/postgresql.log"
C2_PORT=
C2_PGBIN=

# _c2_as_pg CMD... — server programs refuse to run as root.
_c2_as_pg() {
	if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else (cd / && "$@"); fi
}

_c2_bindir() {
	[ -n "$C2_PGBIN" ] && return 0
	if [ -n "${PG_CONFIG:-}" ]; then
		C2_PGBIN=$("$PG_CONFIG" --bindir)
	else
		# The bindir of the running stack server: same binaries, same library.
		C2_PGBIN=$(dirname "$(readlink "/proc/$(head -1 "$EVENTBUS_PGDATA/postmaster.pid")/exe")")
	fi
	[ -x "$C2_PGBIN/postgres" ] || bail "cluster2: no postgres binary in '$C2_PGBIN'"
}

# _c2_free_port — a random free port outside the kernel's ephemeral range
# (an outgoing connection's local port there made cluster 2 fail to bind),
# no socket file of cluster 2 on it.
_c2_free_port() {
	local p i
	for i in 1 2 3 4 5; do
		p=$("$STACK" free-port) || return 1
		[ -e "$C2_SOCK/.s.PGSQL.$p" ] && continue
		echo "$p"; return 0
	done
	return 1
}

# _c2_pids — every live process of cluster 2: its command line names the
# cluster directory, or (backends rename themselves) its cwd is the data dir.
_c2_pids() {
	local d pid comm cmd cwd
	for d in /proc/[0-9]*; do
		pid=${d#/proc/}
		read -r comm 2>/dev/null < "$d/comm" || continue
		[ "$comm" = postgres ] || continue
		grep -q '^State:.*Z' "$d/status" 2>/dev/null && continue
		cmd=$(tr '\0' ' ' 2>/dev/null < "$d/cmdline") || continue
		cwd=$(readlink "$d/cwd" 2>/dev/null) || cwd=
		if [[ $cmd == *"$C2_DIR/"* || $cwd == "$C2_DATA" ]]; then echo "$pid"; fi
	done
}

c2_running() {
	local pid
	[ -r "$C2_DATA/postmaster.pid" ] || return 1
	pid=$(head -1 "$C2_DATA/postmaster.pid" 2>/dev/null)
	[[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
		[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$C2_DATA" ] &&
		! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

c2_psql() {
	local has_db=0 a
	for a in "$@"; do case $a in -d|--dbname=*) has_db=1 ;; esac; done
	if [ $has_db = 1 ]; then PGHOST="$C2_SOCK" PGPORT="$C2_PORT" PGUSER=postgres psql -X "$@"
	else PGHOST="$C2_SOCK" PGPORT="$C2_PORT" PGUSER=postgres PGDATABASE=eventbus psql -X "$@"; fi
}

q2() { c2_psql -A -t -q -v ON_ERROR_STOP=1 "$@" 2>&1; }

# _c2_write_eventbus_conf — the stack's eventbus settings, refreshed per start.
_c2_write_eventbus_conf() {
	local tmp="$C2_DATA/.eventbus.conf.new"
	{
		echo "# Written by test/integration/cluster2.sh at every c2_start: the stack's"
		echo "# eventbus.conf, then the eventbus.* ALTER SYSTEM settings of the stack's cluster."
		grep -v '^[[:space:]]*#' "$EVENTBUS_PGDATA/eventbus.conf"
		grep '^eventbus\.' "$EVENTBUS_PGDATA/postgresql.auto.conf" 2>/dev/null || true
	} > "$tmp"
	chmod 0600 "$tmp"
	[ "$(id -u)" = 0 ] && chown postgres:postgres "$tmp"
	mv -f "$tmp" "$C2_DATA/eventbus.conf"
}

# _c2_trap — run c2_cleanup at exit, before whatever EXIT trap was set.
_c2_trap() {
	local prev
	prev=$(trap -p EXIT)
	if [[ $prev == *c2_cleanup* ]]; then return 0; fi
	if [ -n "$prev" ]; then
		local -a w
		eval "w=($prev)"   # trap -- 'CMD' EXIT
		# shellcheck disable=SC2064  # expand the previous command now
		trap "c2_cleanup; ${w[2]}" EXIT
	else
		trap c2_cleanup EXIT
	fi
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

c2_init() {
	_c2_bindir
	c2_cleanup
	rm -rf -- "$C2_DIR"
	mkdir -p "$C2_DIR" "$C2_SOCK" "$(dirname "$C2_LOG")" || bail "cluster2: cannot create $C2_DIR"
	chmod 0755 "$C2_DIR" "$C2_SOCK"
	[ "$(id -u)" = 0 ] && chown postgres:postgres "$C2_DIR" "$C2_SOCK" "$(dirname "$C2_LOG")"
	_c2_trap
	C2_PORT=$(_c2_free_port) || bail "cluster2: no free port"
	echo "$C2_PORT" > "$C2_DIR/port"
	if ! _c2_as_pg "$C2_PGBIN/initdb" -D "$C2_DATA" --auth=trust -U postgres --encoding=UTF8 --locale=C \
			--no-sync > "$C2_DIR/log/initdb.log" 2>&1; then
		tail -20 "$C2_DIR/log/initdb.log" | sed 's/^/# /'
		bail "cluster2: initdb failed"
	fi
	{
		echo
		echo "# --- second cluster (test/integration/cluster2.sh) ---"
		echo "port = $C2_PORT"
		echo "listen_addresses = '127.0.0.1'"
		echo "unix_socket_directories = '$C2_SOCK'"
		echo "shared_preload_libraries = 'eventbus'"
		echo "max_worker_processes = 32"
		echo "log_line_prefix = '%m [%p] %b c2 '"
		echo "fsync = off"
		local l
		for l in "$@"; do echo "$l"; done
		echo "include_if_exists = 'eventbus.conf'"
	} >> "$C2_DATA/postgresql.conf"
}

c2_start() {
	local opts="" a
	_c2_bindir
	[ -f "$C2_DATA/PG_VERSION" ] || bail "cluster2: c2_init first"
	C2_PORT=$(cat "$C2_DIR/port")
	c2_running && return 0
	_c2_write_eventbus_conf
	for a in "$@"; do opts="$opts $(printf '%q' "$a")"; done
	if ! _c2_as_pg "$C2_PGBIN/pg_ctl" -D "$C2_DATA" -w -t 60 -l "$C2_LOG" ${opts:+-o "$opts"} start \
			> "$C2_DIR/log/pg_ctl.out" 2>&1; then
		sed 's/^/# /' "$C2_DIR/log/pg_ctl.out"; tail -20 "$C2_LOG" | sed 's/^/# /'
		return 1
	fi
	if [ "$(q2 -d postgres -c "SELECT count(*) FROM pg_database WHERE datname = 'eventbus'")" != 1 ]; then
		q2 -d postgres -c "CREATE DATABASE eventbus" >/dev/null || return 1
	fi
	if [[ $(q2 -c "SHOW shared_preload_libraries") == *eventbus* ]]; then
		q2 -c "CREATE EXTENSION IF NOT EXISTS eventbus" >/dev/null || return 1
	fi
	return 0
}

c2_wait_ready() {
	local deadline=$((SECONDS + $1))
	while [ $SECONDS -lt $deadline ]; do
		[ "$(q2 -c "SELECT count(*) FILTER (WHERE component = 'launcher' AND transport IS NOT NULL AND state = 'connected')
		                 + count(*) FILTER (WHERE component = 'dispatcher' AND transport IS NULL AND state = 'running')
		              FROM eventbus_status()" 2>/dev/null)" = 3 ] && return 0
		sleep 0.2
	done
	return 1
}

c2_stop() {
	local mode=${1:-fast}
	c2_running || return 0
	if ! _c2_as_pg "$C2_PGBIN/pg_ctl" -D "$C2_DATA" -m "$mode" -w -t 60 stop > "$C2_DIR/log/pg_ctl.out" 2>&1; then
		c2_running || return 0
		[ "$mode" = immediate ] && return 1
		echo "# cluster2: pg_ctl stop -m $mode failed; stopping immediately"
		_c2_as_pg "$C2_PGBIN/pg_ctl" -D "$C2_DATA" -m immediate -w -t 30 stop >/dev/null 2>&1 || return 1
	fi
	return 0
}

c2_cleanup() {
	local pids i
	[ -d "$C2_DIR" ] || return 0
	if c2_running; then c2_stop immediate >/dev/null 2>&1; fi
	# Anything left (orphaned backends, a postmaster whose pid file is gone).
	for i in $(seq 1 50); do
		pids=$(_c2_pids)
		[ -z "$pids" ] && break
		# shellcheck disable=SC2086
		if [ "$i" -lt 30 ]; then kill -QUIT $pids 2>/dev/null; else kill -KILL $pids 2>/dev/null; fi
		sleep 0.1
	done
	[ -n "$(_c2_pids)" ] && echo "# cluster2: processes left: $(_c2_pids)"
	rm -rf -- "$C2_DATA"
	return 0
}
