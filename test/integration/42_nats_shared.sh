#!/usr/bin/env bash
# JetStream shared mode (eventbus.consumer_mode = shared): two PostgreSQL
# clusters (the stack's, "A", and a second one this test starts, "B": the
# lease identity is per running instance, and one cluster runs eventbus in
# one database only) share one durable through a lease.
#  1. A holds the subject's lease and handles a burst; B stands by and
#     handles nothing.
#  2. A stops (fast) mid-burst: B takes the lease over and finishes the
#     burst; no event is lost, none is handled in both databases, and each
#     database handled every aggregate in order.
#  3. B's dispatcher is killed (kill -9 of that process only): B's restarted
#     dispatcher takes its own lease back at once (A, standing by again,
#     does not get it), and handles what comes next.
#  4. B unsubscribes (a release while running): A takes the lease over and
#     handles what comes next; none handled in both.
#  5. A stops (immediate) mid-burst with B standing by again: B takes over
#     once the lease went stale; none lost, each database in order; events
#     handled in both (what A had in flight) are counted and printed.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TOPIC="t42.orders.$run"
GROUP="t42g$run"
NAGGS=40

PGBIN=$(dirname "$(readlink -f "/proc/$(head -1 "$EVENTBUS_PGDATA/postmaster.pid")/exe")")
[ -x "$PGBIN/initdb" ] || bail "no initdb next to the running postgres ($PGBIN)"
B_DIR="$EVENTBUS_STATE/pg42"
B_DATA="$B_DIR/data"
B_SOCK="$B_DIR/sock"
B_LOG="$B_DIR/postgresql.log"
as_pg() { if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else (cd / && "$@"); fi; }
free_port() {
	local p
	for p in $(shuf -i 20000-60000 -n 50); do
		ss -ltnH "sport = :$p" 2>/dev/null | grep -q . || { echo "$p"; return 0; }
	done
	return 1
}
qb() { psql -X -A -t -q -v ON_ERROR_STOP=1 -h "$B_SOCK" -p "$B_PORT" -U postgres -d eventbus "$@" 2>&1; }
b_ctl() { as_pg "$PGBIN/pg_ctl" -D "$B_DATA" -l "$B_LOG" -w -t 60 "$@" >/dev/null 2>&1; }

old_group=$(q -c "SHOW eventbus.consumer_group")
old_mode=$(q -c "SHOW eventbus.consumer_mode")
cleanup() {
	qb -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic LIKE 't42.%' AND eventbus_unsubscribe(topic, handler, transport)" >/dev/null 2>&1
	b_ctl stop -m fast
	"$STACK" pg-start >/dev/null 2>&1
	q -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic = '$TOPIC' AND eventbus_unsubscribe(topic, handler, transport)" >/dev/null 2>&1
	q -c "ALTER SYSTEM RESET eventbus.consumer_group" -c "ALTER SYSTEM RESET eventbus.consumer_mode" -c "SELECT pg_reload_conf()" >/dev/null 2>&1
}
trap cleanup EXIT

# --- the second cluster ---------------------------------------------------
mkdir -p "$B_DIR" && chown postgres: "$B_DIR" 2>/dev/null
if [ ! -f "$B_DATA/PG_VERSION" ]; then
	as_pg "$PGBIN/initdb" -D "$B_DATA" --auth=trust -U postgres --encoding=UTF8 --locale=C >/dev/null 2>&1 ||
		bail "initdb of the second cluster failed"
fi
as_pg mkdir -p "$B_SOCK"
B_PORT=$(free_port) || bail "no free port"
as_pg tee "$B_DATA/postgresql.auto.conf" >/dev/null <<EOF
port = $B_PORT
listen_addresses = ''
unix_socket_directories = '$B_SOCK'
shared_preload_libraries = 'eventbus'
max_worker_processes = 16
log_line_prefix = '%m [%p] %b '
eventbus.database = 'eventbus'
eventbus.nats_url = '$EVENTBUS_NATS_URL'
eventbus.workers = 2
eventbus.consumer_group = '$GROUP'
eventbus.consumer_mode = 'shared'
EOF
b_ctl start || bail "the second cluster did not start (see $B_LOG)"
psql -X -q -h "$B_SOCK" -p "$B_PORT" -U postgres -d postgres -c "CREATE DATABASE eventbus" >/dev/null 2>&1
qb -c "CREATE EXTENSION IF NOT EXISTS eventbus" >/dev/null || bail "CREATE EXTENSION in B failed"
qb -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic LIKE 't42.%' AND eventbus_unsubscribe(topic, handler, transport)" >/dev/null

q -c "ALTER SYSTEM SET eventbus.consumer_group = '$GROUP'" -c "ALTER SYSTEM SET eventbus.consumer_mode = 'shared'" \
	-c "SELECT pg_reload_conf()" >/dev/null
consumer_sql_setup

SETUP="
DROP TABLE IF EXISTS t42_handled;
CREATE TABLE t42_handled (n bigserial, aggregate_id text, version bigint, event_id uuid);
CREATE OR REPLACE FUNCTION t42_record(e eventbus.envelope) RETURNS void LANGUAGE sql AS \$\$
  INSERT INTO public.t42_handled (aggregate_id, version, event_id) VALUES (e.aggregate_id, e.event_version, e.event_id);
  SELECT pg_catalog.pg_sleep(0.01);
\$\$;"
q -c "$SETUP" >/dev/null
qb -c "$SETUP" >/dev/null
q >/dev/null <<SQL
DROP TABLE IF EXISTS t42_sent;
CREATE TABLE t42_sent (batch int, aggregate_id text, version bigint, event_id uuid);
INSERT INTO t42_sent SELECT b, 'agg-' || a, (b - 1) * 10 + v, gen_random_uuid()
  FROM generate_series(1, 5) b, generate_series(1, $NAGGS) a, generate_series(1, 10) v;
SQL
send() {   # send BATCH — 400 events, versions in order per aggregate
	produce_sql nats "$TOPIC" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T42Happened', version, '{}')
	                            FROM t42_sent WHERE batch = $1 ORDER BY version, aggregate_id"
}
# The handled rows of both databases, for counting in A.
gather() {
	q -c "DROP TABLE IF EXISTS t42_all; CREATE TABLE t42_all (db text, n bigint, aggregate_id text, version bigint, event_id uuid)" >/dev/null
	q -c "INSERT INTO t42_all SELECT 'A', n, aggregate_id, version, event_id FROM t42_handled" >/dev/null
	qb -c "COPY (SELECT 'B', n, aggregate_id, version, event_id FROM t42_handled) TO STDOUT" |
		q -c "COPY t42_all FROM STDIN" >/dev/null
}
lost() { q -c "SELECT count(*) FROM t42_sent s WHERE batch <= $1 AND NOT EXISTS (SELECT 1 FROM t42_all a WHERE a.event_id = s.event_id)"; }
in_both() { q -c "SELECT count(*) FROM (SELECT event_id FROM t42_all GROUP BY 1 HAVING count(DISTINCT db) > 1) x"; }
# Aggregates whose versions, in one database's handling order, go down.
disorder() {
	q -c "SELECT count(*) FROM (SELECT db, aggregate_id, version, lag(version) OVER (PARTITION BY db, aggregate_id ORDER BY n) prev
	                            FROM t42_all) x WHERE version <= prev"
}
count_a() { q -c "SELECT count(DISTINCT event_id) FROM t42_handled"; }
count_b() { qb -c "SELECT count(DISTINCT event_id) FROM t42_handled"; }
handled_total() { gather; q -c "SELECT count(DISTINCT event_id) FROM t42_all"; }
log_has() { grep -c "$2" "$1" 2>/dev/null; }
durable="${GROUP}_t42_orders_${run}"

# --- 1. A holds, B stands by ------------------------------------------------
wait_until 30 dispatcher_running || bail "A's dispatcher not running"
a_log0=$(wc -l <"$EVENTBUS_PG_LOG")
q -c "SELECT eventbus_subscribe('$TOPIC', 't42_record(eventbus.envelope)', 'nats')" >/dev/null
wait_until 20 "tail -n +$a_log0 '$EVENTBUS_PG_LOG' | grep -q 'holding the JetStream lease of consumer $durable'"
ok $? "A holds the lease of $durable"
b_log0=$(wc -l <"$B_LOG")
qb -c "SELECT eventbus_subscribe('$TOPIC', 't42_record(eventbus.envelope)', 'nats')" >/dev/null
send 1 || bail "could not publish"
wait_count 30 400 "SELECT count(DISTINCT event_id) FROM t42_handled"
ok $? "A handled the first 400 events ($COUNT)"
is "$(count_b)" 0 "B, standing by, handled none of them"

# --- 2. A stops (fast) mid-burst: B takes over ------------------------------
send 2 &
sender=$!
wait_until 30 '[ "$(count_a)" -ge 450 ]'
t0=$(date +%s.%N)
"$STACK" pg-stop fast >/dev/null 2>&1
ok $? "A stopped (fast) mid-burst"
wait $sender
wait_until 30 "tail -n +$b_log0 '$B_LOG' | grep -q 'holding the JetStream lease of consumer $durable'"
ok $? "B took the lease over"
diag "A's fast stop to B holding the lease: $(echo "$(date +%s.%N) - $t0" | bc) s"
grep "lease of consumer $durable" "$B_LOG" | tail -n 1 | sed 's/^/# B: /'
"$STACK" pg-start >/dev/null 2>&1 || bail "A did not start again"
wait_until 30 '[ "$(handled_total)" -ge 800 ]'
ok $? "all 800 events handled across A and B"
gather
is "$(lost 2)" 0 "none lost"
is "$(in_both)" 0 "none handled in both databases"
is "$(disorder)" 0 "each database handled every aggregate in order"
diag "handled in A: $(q -c "SELECT count(*) FROM t42_all WHERE db = 'A'"), in B: $(q -c "SELECT count(*) FROM t42_all WHERE db = 'B'")"

# --- 3. kill -9 of B's dispatcher: B takes its own lease back ----------------
wait_until 30 dispatcher_running || bail "A's dispatcher not running again"
a_log1=$(wc -l <"$EVENTBUS_PG_LOG")
b_log1=$(wc -l <"$B_LOG")
bpid=$(qb -c "SELECT pid FROM eventbus_status() WHERE component = 'dispatcher' AND transport IS NULL" | grep -E '^[0-9]+$')
[ -n "$bpid" ] || bail "no dispatcher in B"
kill -9 "$bpid"
ok $? "B's dispatcher ($bpid) killed"
t0=$(date +%s.%N)
wait_until 40 "tail -n +$b_log1 '$B_LOG' | grep -q 'holding the JetStream lease of consumer ${durable}_.*: taken back'"
ok $? "B's restarted dispatcher took its own lease back"
diag "kill -9 to B holding the lease again: $(echo "$(date +%s.%N) - $t0" | bc) s"
send 3 || bail "could not publish"
wait_until 30 '[ "$(handled_total)" -ge 1200 ]'
ok $? "all 1200 events handled"
is "$(tail -n +"$a_log1" "$EVENTBUS_PG_LOG" | grep -c "holding the JetStream lease of consumer $durable")" 0 \
	"A, standing by, did not get the lease meanwhile"
gather
is "$(lost 3)" 0 "none lost"
is "$(in_both)" 0 "none handled in both databases"
is "$(disorder)" 0 "in order in each database"

# --- 4. B unsubscribes: A takes over -----------------------------------------
a_log2=$(wc -l <"$EVENTBUS_PG_LOG")
qb -c "SELECT eventbus_unsubscribe('$TOPIC', 't42_record(eventbus.envelope)', 'nats')" >/dev/null
wait_until 20 "tail -n +$a_log2 '$EVENTBUS_PG_LOG' | grep -q 'holding the JetStream lease of consumer ${durable}_.*: released cleanly'"
ok $? "B unsubscribed: A took the lease, released cleanly"
send 4 || bail "could not publish"
wait_until 30 '[ "$(handled_total)" -ge 1600 ]'
ok $? "all 1600 events handled"
gather
is "$(lost 4)" 0 "none lost"
is "$(in_both)" 0 "none handled in both databases"

# --- 5. A stops (immediate) mid-burst: B takes over when the lease is stale --
b_log2=$(wc -l <"$B_LOG")
qb -c "SELECT eventbus_subscribe('$TOPIC', 't42_record(eventbus.envelope)', 'nats')" >/dev/null
b_before=$(count_b)
a_before=$(count_a)
send 5 &
sender=$!
wait_until 30 "[ \"\$(count_a)\" -ge $((a_before + 50)) ]"
"$STACK" pg-stop immediate >/dev/null 2>&1
ok $? "A stopped (immediate) mid-burst"
t0=$(date +%s.%N)
wait $sender
wait_until 40 "tail -n +$b_log2 '$B_LOG' | grep -q 'holding the JetStream lease of consumer ${durable}_.*: its holder stopped refreshing it'"
ok $? "B took the stale lease over"
diag "A's immediate stop to B holding the lease: $(echo "$(date +%s.%N) - $t0" | bc) s"
"$STACK" pg-start >/dev/null 2>&1 || bail "A did not start again"
wait_until 40 '[ "$(handled_total)" -ge 2000 ]'
ok $? "all 2000 events handled"
gather
is "$(lost 5)" 0 "none lost"
is "$(disorder)" 0 "in order in each database"
diag "handled in both databases after the immediate stop: $(in_both) (bounded by what A had in flight)"

done_testing
