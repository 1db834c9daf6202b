# lib.sh — shared helpers for the integration tests (sourced, emits TAP).
#
# Each test runs against the stack the runner started (scripts/stack.sh, its
# env file is named by $EVENTBUS_ENV) and prints TAP, so `prove` runs them.
# Assertions compare numbers counted from the database or read back from the
# brokers by independent clients (kcat, test/tools/natstool).

set -uo pipefail

: "${EVENTBUS_ENV:?run through scripts/test.sh (EVENTBUS_ENV names the stack env file)}"
# shellcheck disable=SC1090
source "$EVENTBUS_ENV"

REPO="$EVENTBUS_REPO"
STACK="$REPO/scripts/stack.sh"
NATSTOOL="$REPO/test/tools/natstool"
KAFKARAW="$REPO/test/tools/kafkaraw"
TAP_N=0
TAP_FAILED=0

# q SQL... — run SQL in the eventbus database, unaligned, tuples only.
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 "$@" 2>&1; }

# qdb DB SQL — run SQL in another database.
qdb() { local db=$1; shift; psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$db" "$@" 2>&1; }

plan() { echo "1..$1"; }

ok() {   # ok CONDITION_EXIT_STATUS DESCRIPTION
	TAP_N=$((TAP_N + 1))
	if [ "$1" -eq 0 ]; then echo "ok $TAP_N - $2"; else echo "not ok $TAP_N - $2"; TAP_FAILED=$((TAP_FAILED + 1)); fi
}

is() {   # is GOT EXPECTED DESCRIPTION
	TAP_N=$((TAP_N + 1))
	if [ "$1" == "$2" ]; then
		echo "ok $TAP_N - $3"
	else
		echo "not ok $TAP_N - $3"
		echo "#   got:      '$1'"
		echo "#   expected: '$2'"
		TAP_FAILED=$((TAP_FAILED + 1))
	fi
}

diag() { echo "# $*"; }

# bail MESSAGE — abort the whole test file.
bail() { echo "Bail out! $*"; exit 255; }

# wait_until TIMEOUT_S 'SHELL CONDITION' — poll (every WAIT_STEP s, 0.2 by
# default) until the condition, re-evaluated each time (so $(...) inside it
# runs afresh), holds.
wait_until() {
	local deadline=$((SECONDS + $1)); shift
	while ! eval "$*" >/dev/null 2>&1; do
		[ $SECONDS -ge $deadline ] && return 1
		sleep "${WAIT_STEP:-0.2}"
	done
	return 0
}

# broker_state TRANSPORT — state of the launcher's connection to it.
broker_state() {
	q -c "SELECT state FROM eventbus_status() WHERE component = 'launcher' AND transport = '$1'"
}
both_connected() {
	[ "$(broker_state kafka)" = connected ] && [ "$(broker_state nats)" = connected ]
}

# launcher_pid — the launcher's pid, empty if none (or the server is down).
launcher_pid() {
	psql -X -A -t -q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbus launcher'" 2>/dev/null | grep -E '^[0-9]+$'
}

# outbox_empty — the relay has had every committed event acknowledged.
outbox_empty() { [ "$(q -c 'SELECT count(*) FROM eventbus.outbox')" = 0 ]; }

# threads PID — thread count from /proc.
threads() { awk '/^Threads:/ {print $2}' "/proc/$1/status"; }

# tcp_conns PID PORT... — established TCP connections of PID to those ports.
tcp_conns() {
	local pid=$1; shift
	local inodes ports hex
	inodes=$(find "/proc/$pid/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | sed 's/socket:\[\(.*\)\]/\1/' | sort -u)
	ports=""
	for p in "$@"; do hex=$(printf '%04X' "$p"); ports="$ports $hex"; done
	cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v inodes="$inodes" -v ports="$ports" '
		BEGIN { n = split(inodes, a, "\n"); for (i = 1; i <= n; i++) ino[a[i]] = 1
		        m = split(ports, b, " "); for (i = 1; i <= m; i++) want[b[i]] = 1 }
		NR > 1 && $4 == "01" { split($3, r, ":"); if ((r[2] in want) && ($10 in ino)) c++ }
		END { print c + 0 }'
}

kafka_ports() { echo "$EVENTBUS_KAFKA_BROKERS" | tr ',' '\n' | sed 's/.*://'; }
nats_port() { echo "$EVENTBUS_NATS_URL" | sed 's/.*://'; }

# kafka_dump TOPIC — every message of TOPIC as kcat JSON lines (all partitions).
kafka_dump() {
	kcat -b "$EVENTBUS_KAFKA_BROKERS" -C -t "$1" -o beginning -e -q -J 2>/dev/null
}

# nats_dump SUBJECT — every stored message of SUBJECT as JSON lines.
nats_dump() { "$NATSTOOL" --url "$EVENTBUS_NATS_URL" dump "$1"; }

# load_lines TABLE — read JSON lines from stdin into TABLE(line jsonb).
# The CSV quote/delimiter are control characters that never occur in JSON.
load_lines() {
	q -c "CREATE TABLE IF NOT EXISTS $1 (n bigserial, line jsonb)" >/dev/null
	q -c "\\copy $1 (line) FROM STDIN WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
}

# done_testing — final line and exit status.
done_testing() {
	echo "1..$TAP_N"
	[ "$TAP_FAILED" -eq 0 ]
	exit $?
}

# load_wire_functions — install the test-side checkers (wire.sql).
load_wire_functions() { q -f "$REPO/test/integration/wire.sql" >/dev/null; }

# kafka_partitions TOPIC — partition count from broker metadata.
kafka_partitions() {
	kcat -b "$EVENTBUS_KAFKA_BROKERS" -L -t "$1" 2>/dev/null | sed -n 's/.* with \([0-9]*\) partitions.*/\1/p' | head -1
}

# wire_kafka TOPIC TABLE / wire_nats SUBJECT TABLE — read back with the
# independent clients into a normalized table (part, pos, key, env, hdrs).
wire_kafka() {
	q -c "DROP TABLE IF EXISTS ${2}_raw" >/dev/null
	kafka_dump "$1" | load_lines "${2}_raw" >/dev/null
	q -c "SELECT t_wire_kafka('${2}_raw', '$2')" >/dev/null
}
wire_nats() {
	q -c "DROP TABLE IF EXISTS ${2}_raw" >/dev/null
	nats_dump "$1" | load_lines "${2}_raw" >/dev/null
	q -c "SELECT t_wire_nats('${2}_raw', '$2')" >/dev/null
}

# check_transport PREFIX TR KAFKA_TOPIC NATS_SUBJECT — split the commit log
# PREFIX_pub by transport, read that transport's topic back with the
# independent client into PREFIX_wire_TR, and print t_check's figures.
check_transport() {
	local p=$1 tr=$2 nparts=0
	q -c "DROP TABLE IF EXISTS ${p}_pub_$tr; CREATE TABLE ${p}_pub_$tr AS SELECT * FROM ${p}_pub WHERE transport = '$tr'" >/dev/null
	if [ "$tr" = kafka ]; then nparts=$(kafka_partitions "$3"); wire_kafka "$3" "${p}_wire_$tr"
	else wire_nats "$4" "${p}_wire_$tr"; fi
	check "${p}_wire_$tr" "${p}_pub_$tr" "$nparts"
}

# check WIRE PUB NPARTS — JSON figures from t_check (wire.sql).
check() { q -c "SELECT t_check('$1', '$2', $3)"; }
# field JSON NAME
field() { echo "$1" | sed -n "s/.*\"$2\": \([0-9]*\).*/\1/p"; }

# publish_log_setup TABLE — a committed-events log written in the same
# transaction as each publish, so it holds exactly what committed.
publish_log_setup() {
	q -c "DROP TABLE IF EXISTS $1; CREATE TABLE $1 (event_id uuid PRIMARY KEY, transport text, topic text, aggregate_id text, payload jsonb)" >/dev/null
}

# logged_publish_setup FUNC LOG TYPE — FUNC(tr, topic, agg, payload)
# publishes an event of type TYPE and records it in the commit log LOG
# (publish_log_setup) in the same transaction; returns its id.
logged_publish_setup() {
	q >/dev/null <<SQL
CREATE OR REPLACE FUNCTION $1(tr text, topic text, agg text, p jsonb) RETURNS uuid
LANGUAGE plpgsql AS \$\$
DECLARE id uuid;
BEGIN
  id := eventbus_publish(topic, agg, '$3', p, tr);
  INSERT INTO $2 VALUES (id, tr, topic, agg, p);
  RETURN id;
END \$\$;
SQL
}

# burst_proc_setup — CALL t_burst(worker, n, topic_kafka, topic_nats, naggs,
# prefix, log [, pause]) publishes n events on each transport from one
# connection (pausing `pause` seconds after each commit, to stretch a burst), in
# transactions touching 1–40 aggregates (locked in sorted order, as the
# README advises for multi-aggregate transactions).
burst_proc_setup() {
	q >/dev/null <<'SQL'
DROP PROCEDURE IF EXISTS t_burst(int, int, text, text, int, text, text);
CREATE OR REPLACE PROCEDURE t_burst(w int, n int, tk text, tn text, naggs int, prefix text, log text,
                                    pause float8 DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
  done int := 0; sz int; agg text; id uuid; p jsonb;
BEGIN
  WHILE done < n LOOP
    sz := least(1 + floor(random() * 40)::int, n - done);
    FOR agg IN SELECT prefix || floor(random() * naggs)::int AS a FROM generate_series(1, sz) ORDER BY 1 LOOP
      p := jsonb_build_object('worker', w, 'n', done, 'note', 'ünïcødé "quoted" \ back');
      id := eventbus_publish(tk, agg, 'ItemAdded', p, 'kafka');
      EXECUTE format('INSERT INTO %I VALUES ($1, $2, $3, $4, $5)', log) USING id, 'kafka', tk, agg, p;
      id := eventbus_publish(tn, agg, 'ItemAdded', p, 'nats');
      EXECUTE format('INSERT INTO %I VALUES ($1, $2, $3, $4, $5)', log) USING id, 'nats', tn, agg, p;
      done := done + 1;
    END LOOP;
    COMMIT;
    IF pause > 0 THEN PERFORM pg_sleep(pause); END IF;
  END LOOP;
END $$;
SQL
}

# wait_outbox_empty SECONDS — wait for the relay to drain the outbox.
wait_outbox_empty() { wait_until "$1" outbox_empty; }

# ---------------------------------------------------------------------------
# consumer helpers (tests 2x: eventbus_subscribe, the dispatcher and the pool)
# ---------------------------------------------------------------------------

# Short Kafka group timings: the dev broker's rebalances take about
# session.timeout.ms, and a subscription change is a rebalance.
CONSUMER_FAST_KAFKA='session.timeout.ms=6000;heartbeat.interval.ms=500;fetch.wait.max.ms=10'   # as scripts/stack.sh sets it
CONSUMER_OLD_KAFKA_PROPS=''
CONSUMER_CHANGED_KAFKA_PROPS=0
CONSUMER_CLEANUP=''
COUNT=0

# dispatcher_running — the dispatcher reports itself running.
dispatcher_running() {
	[ "$(q -c "SELECT count(*) FROM eventbus_status() WHERE component = 'dispatcher' AND transport IS NULL AND state = 'running'" 2>/dev/null)" = 1 ]
}
# dispatcher_pid / worker_pid N — pids from eventbus_status() (empty if none).
dispatcher_pid() {
	q -c "SELECT pid FROM eventbus_status() WHERE component = 'dispatcher' AND transport IS NULL" 2>/dev/null | grep -E '^[0-9]+$'
}
worker_pid() {
	q -c "SELECT pid FROM eventbus_status() WHERE component = 'worker $1'" 2>/dev/null | grep -E '^[0-9]+$'
}
# restart_workers — terminate every eventbus background worker (the launcher
# is restarted by the postmaster and starts a new dispatcher and pool); wait
# until all of them are new processes (with the database's and roles'
# settings as they are now), brokers connected, both consumers connected.
restart_workers() {
	local old
	old=$(q -c "SELECT coalesce(string_agg(pid::text, ','), '0') FROM pg_stat_activity WHERE backend_type LIKE 'eventbus%'")
	q -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type LIKE 'eventbus%'" >/dev/null
	wait_until 90 "workers_replaced '$old'"
}
workers_replaced() {
	local old=$1 nw
	nw=$(q -c "SHOW eventbus.workers")
	[ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'eventbus%' AND pid IN ($old)")" = 0 ] &&
	[ "$(q -c "SELECT count(*) FROM eventbus_status() WHERE pid IS NOT NULL AND pid NOT IN ($old) AND state = 'running'
	             AND (component IN ('launcher', 'dispatcher') AND transport IS NULL OR component LIKE 'worker %')")" = $((nw + 2)) ] &&
	both_connected && [ "$(consumer_state kafka)" = connected ] && [ "$(consumer_state nats)" = connected ]
}

# main_waits PID SECONDS — "FUTEX ALL": samples (every 20 ms) in which
# PID's main thread sleeps in a futex (inside a library call: a broker
# request, say; an idle worker sleeps in epoll), and all samples.  From
# /proc/PID/wchan, the kernel function the thread waits in.
main_waits() {
	local pid=$1 n=$(($2 * 50)) f=0 w
	for ((i = 0; i < n; i++)); do
		w=
		read -r w < "/proc/$pid/wchan" 2>/dev/null
		[[ $w == *futex* ]] && f=$((f + 1))
		sleep 0.02
	done
	echo "$f $n"
}

# main_waits_during PID SECONDS COUNT COMMAND... — main_waits PID SECONDS
# while COMMAND I runs for I = 1..COUNT, every 0.1 s, in the background
# (the other transport's traffic meanwhile); prints "futex samples".
main_waits_during() {
	local pid=$1 secs=$2 n=$3 bg r
	shift 3
	( for i in $(seq 1 "$n"); do "$@" "$i"; sleep 0.1; done ) &
	bg=$!
	r=$(main_waits "$pid" "$secs")
	wait "$bg"
	echo "$r"
}

# consumer_state TRANSPORT — state of the dispatcher's consumer for it.
consumer_state() {
	q -c "SELECT state FROM eventbus_status() WHERE component = 'dispatcher' AND transport = '$1'" 2>/dev/null
}

# consumer_setup — fast Kafka rebalances for this test (restored at exit),
# brokers connected, dispatcher running.  Set CONSUMER_CLEANUP to shell code
# (e.g. unsubscribe_like 't2x.%') to run at exit as well.
consumer_setup() {
	CONSUMER_OLD_KAFKA_PROPS=$(q -c "SHOW eventbus.kafka_properties")
	if [ "$CONSUMER_OLD_KAFKA_PROPS" != "$CONSUMER_FAST_KAFKA" ]; then
		q -c "ALTER SYSTEM SET eventbus.kafka_properties = '$CONSUMER_FAST_KAFKA'" >/dev/null
		q -c "SELECT pg_reload_conf()" >/dev/null
		CONSUMER_CHANGED_KAFKA_PROPS=1
		sleep 1
	fi
	trap consumer_teardown EXIT
	wait_until 30 both_connected || bail "brokers not connected"
	wait_until 30 dispatcher_running || bail "dispatcher not running (eventbus_status())"
}

# consumer_teardown — EXIT trap: test cleanup, then the Kafka properties as
# they were before the test (if consumer_setup changed them).  Prints
# nothing (TAP is finished by then).
consumer_teardown() {
	if [ -n "$CONSUMER_CLEANUP" ]; then eval "$CONSUMER_CLEANUP" >/dev/null 2>&1; fi
	[ "$CONSUMER_CHANGED_KAFKA_PROPS" = 1 ] || return 0
	if [ -z "$CONSUMER_OLD_KAFKA_PROPS" ]; then
		q -c "ALTER SYSTEM RESET eventbus.kafka_properties" >/dev/null 2>&1
	else
		q -c "ALTER SYSTEM SET eventbus.kafka_properties = '${CONSUMER_OLD_KAFKA_PROPS//\'/\'\'}'" >/dev/null 2>&1
	fi
	q -c "SELECT pg_reload_conf()" >/dev/null 2>&1
}

# unsubscribe_like PATTERN — drop every subscription whose topic is LIKE
# PATTERN (with its inbox and dead letters); prints how many.
unsubscribe_like() {
	q -c "SELECT count(*) FILTER (WHERE eventbus_unsubscribe(topic, handler, transport)) FROM eventbus.subscriptions WHERE topic LIKE '$1'"
}

# kafka_produce TOPIC [kcat options] — one message per stdin line KEY<TAB>VALUE
# (a line without a tab: no key; "KEY<TAB>" alone: empty value).  Idempotent
# producer, so each partition keeps the input order.
kafka_produce() {
	local t=$1; shift
	kcat -P -b "$EVENTBUS_KAFKA_BROKERS" -t "$t" -K '\t' -X enable.idempotence=true "$@"
}
# kafka_produce_file TOPIC FILE [kcat options: -p N, -k KEY, -H NAME=VALUE] —
# the file's exact bytes as one message (kcat skips empty files: use
# kafka_produce with "KEY<TAB>" for an empty value).
kafka_produce_file() {
	local t=$1 f=$2; shift 2
	kcat -P -b "$EVENTBUS_KAFKA_BROKERS" -t "$t" -X enable.idempotence=true -X message.max.bytes=4000000 "$@" "$f"
}
# nats_stream NAME SUBJECT... — make sure a stream captures the subjects.
nats_stream() { "$NATSTOOL" --url "$EVENTBUS_NATS_URL" ensure-stream "$@" >/dev/null; }
# nats_produce SUBJECT [natstool pub options] — one message per stdin line.
nats_produce() { "$NATSTOOL" --url "$EVENTBUS_NATS_URL" pub "$@" >/dev/null; }
# nats_stream_of SUBJECT — name of the stream capturing SUBJECT.
nats_stream_of() {
	"$NATSTOOL" --url "$EVENTBUS_NATS_URL" stream-info "$1" 2>/dev/null | sed -n 's/^{"name":"\([^"]*\)".*/\1/p'
}
# nats_consumers STREAM — durable consumer names, one per line.
nats_consumers() { "$NATSTOOL" --url "$EVENTBUS_NATS_URL" consumers "$1"; }

# produce_sql TRANSPORT TOPIC 'SELECT key, value ...' — one message per row,
# in row order: Kafka key = key; NATS subject = TOPIC, Nats-Msg-Id = the
# value's event_id.
produce_sql() {
	local tr=$1 topic=$2 sql=$3
	if [ "$tr" = kafka ]; then
		psql -X -A -t -q -v ON_ERROR_STOP=1 -F $'\t' -c "$sql" | kafka_produce "$topic"
	else
		psql -X -A -t -q -v ON_ERROR_STOP=1 -c "SELECT v FROM ($sql) s (k, v)" | nats_produce "$topic" --msg-id-from-event-id
	fi
}

# consumer_sql_setup — test-side SQL: t_env(...) builds a JSON envelope as
# docs/wire-format.md (what a Go producer sends).
consumer_sql_setup() {
	q >/dev/null <<'SQL'
CREATE OR REPLACE FUNCTION t_env(eid uuid, agg text, typ text, ver bigint, payload jsonb, extra jsonb DEFAULT '{}')
RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT (jsonb_build_object('event_id', eid, 'aggregate_id', agg, 'event_type', typ, 'event_version', ver,
            'timestamp', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'payload', payload) || extra)::text
$$;
SQL
}

# wait_count TIMEOUT EXPECTED 'SQL count' [STALL] — poll (0.5 s) until the
# count reaches EXPECTED (status 0); status 1 when it has not grown for STALL
# seconds (default: TIMEOUT) or TIMEOUT passed.  The last count is in $COUNT.
wait_count() {
	local deadline=$((SECONDS + $1)) want=$2 sql=$3 stall=${4:-$1} last=-2 since=$SECONDS c
	while :; do
		c=$(q -c "$sql" 2>/dev/null)
		[[ $c =~ ^[0-9]+$ ]] || c=-1
		COUNT=$c
		[ "$c" -ge "$want" ] && return 0
		if [ "$c" != "$last" ]; then last=$c; since=$SECONDS; fi
		[ $((SECONDS - since)) -ge "$stall" ] && return 1
		[ $SECONDS -ge $deadline ] && return 1
		sleep 0.5
	done
}

# sqlstate_of SQL... — run the statements in one session (psql -c each);
# print the SQLSTATE of the first error, or "ok".
sqlstate_of() {
	local args=() s err
	for s in "$@"; do args+=(-c "$s"); done
	err=$(psql -X -A -t -q -v ON_ERROR_STOP=1 -v VERBOSITY=sqlstate "${args[@]}" 2>&1 >/dev/null)
	if [[ $err =~ ERROR:\ +([0-9A-Z]{5}) ]]; then echo "${BASH_REMATCH[1]}"; else echo ok; fi
}
