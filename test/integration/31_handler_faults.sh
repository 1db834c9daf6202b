#!/usr/bin/env bash
# Handler faults stay with the event at fault (issue: fault isolation).
#  1. A LANGUAGE sql handler (returns NULL for void) handles every event.
#  2. A handler whose insert violates a DEFERRABLE INITIALLY DEFERRED foreign
#     key fails at the batch's COMMIT: that event is retried and
#     dead-lettered (23503) while the 50 other aggregates of its batches are
#     all handled; no pool worker restarts.
#  3. A real serialization failure at commit (the pool's transactions
#     SERIALIZABLE, a write skew with a concurrent session): the batch's
#     commit fails, its events run again one transaction each, and each is
#     handled exactly once; no pool worker restarts.
#  4. eventbus.handler_timeout cancels a handler that runs longer: 57014,
#     dead-lettered, the others handled.
#  5. Head of line, with 2 pool workers: one aggregate's handler sleeps 20 s;
#     1,000 events of 200 other aggregates published after it started are
#     all handled before it wakes; its own later events wait and keep order.
#  -. Inbox pruning deletes 100,000 expired rows within seconds and keeps
#     the rest (the rate is printed).
#  6. eventbus.dispatcher_memory bounds the dispatcher's memory in bytes:
#     ~1 MB messages behind a slow handler; the dispatcher's memory contexts
#     (pg_log_backend_memory_contexts) stay within a few times the limit, and
#     every message is handled.
# Counted from the database; durations are printed, never asserted.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't31.%.$run.%'; restore_settings"
WORKER_ROLE=
RESTART_NEEDED=0

restore_settings() {
	[ -n "$WORKER_ROLE" ] && q -c "ALTER ROLE $WORKER_ROLE IN DATABASE $PGDATABASE RESET default_transaction_isolation" >/dev/null 2>&1
	q -c "ALTER SYSTEM RESET eventbus.handler_timeout" -c "ALTER SYSTEM RESET eventbus.dispatcher_memory" \
	  -c "SELECT pg_reload_conf()" >/dev/null 2>&1
	if [ "$RESTART_NEEDED" = 1 ]; then
		q -c "ALTER SYSTEM RESET eventbus.workers" >/dev/null 2>&1
		"$STACK" pg-stop fast >/dev/null 2>&1; "$STACK" pg-start >/dev/null 2>&1
	fi
}

worker_pids() { q -c "SELECT string_agg(pid::text, ',' ORDER BY component) FROM eventbus_status() WHERE component LIKE 'worker %'"; }
PIDS_BEFORE=$(worker_pids)
DISP_BEFORE=$(dispatcher_pid)

q >/dev/null <<SQL
DROP TABLE IF EXISTS t31_handled, t31_parent, t31_child, t31_flags, t31_ssi_a, t31_ssi_b CASCADE;
CREATE TABLE t31_handled (n bigserial, sub text, aggregate_id text, version bigint, event_id uuid,
                          at timestamptz DEFAULT clock_timestamp());
CREATE TABLE t31_parent (id text PRIMARY KEY);
CREATE TABLE t31_child (id text, parent text REFERENCES t31_parent DEFERRABLE INITIALLY DEFERRED);
CREATE TABLE t31_flags (name text PRIMARY KEY);

-- 1: the most ordinary handler there is.
CREATE OR REPLACE FUNCTION t31_sql(e eventbus.envelope) RETURNS void LANGUAGE sql AS \$\$
  INSERT INTO public.t31_handled (sub, aggregate_id, version, event_id)
  VALUES ('sql', e.aggregate_id, e.event_version, e.event_id)
\$\$;
-- 2: the child row of 'orphan' has no parent: fails only at COMMIT.
CREATE OR REPLACE FUNCTION t31_fk(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
  IF e.aggregate_id <> 'orphan' THEN
    INSERT INTO public.t31_parent VALUES (e.aggregate_id || ':' || e.event_version) ON CONFLICT DO NOTHING;
  END IF;
  INSERT INTO public.t31_child VALUES (e.event_id::text, e.aggregate_id || ':' || e.event_version);
  INSERT INTO public.t31_handled (sub, aggregate_id, version, event_id)
  VALUES ('fk', e.aggregate_id, e.event_version, e.event_id);
END \$\$;
-- 3: a write skew with a concurrent session when the pool runs SERIALIZABLE.
-- v1 sleeps 2 s, so v2 and v3 queue behind it and run together in the next
-- batch: v2 reads t31_ssi_a and writes t31_ssi_b, v3 sleeps, during which a
-- session reads t31_ssi_b, writes t31_ssi_a and commits first.
CREATE TABLE t31_ssi_a (x int);
CREATE TABLE t31_ssi_b (x int);
CREATE OR REPLACE FUNCTION t31_ser(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
  IF e.event_version = 1 THEN
    PERFORM pg_sleep(2);
  END IF;
  IF e.event_version = 2 THEN
    PERFORM count(*) FROM public.t31_ssi_a;
    INSERT INTO public.t31_ssi_b VALUES (1);
  END IF;
  INSERT INTO public.t31_handled (sub, aggregate_id, version, event_id)
  VALUES ('ser', e.aggregate_id, e.event_version, e.event_id);
  IF e.event_version = 3 THEN
    PERFORM pg_sleep(3);
  END IF;
END \$\$;
-- 4 and 5: a handler that sleeps for one aggregate.
CREATE OR REPLACE FUNCTION t31_slow(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
  IF e.aggregate_id = 'sleeper' THEN
    PERFORM pg_sleep((e.payload->>'sleep')::float8);
  END IF;
  INSERT INTO public.t31_handled (sub, aggregate_id, version, event_id)
  VALUES (e.payload->>'sub', e.aggregate_id, e.event_version, e.event_id);
END \$\$;
-- 6: slow enough that messages pile up behind the pool.
CREATE OR REPLACE FUNCTION t31_big(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
  PERFORM pg_sleep(0.05);
  INSERT INTO public.t31_handled (sub, aggregate_id, version, event_id)
  VALUES ('big', e.aggregate_id, e.event_version, e.event_id);
END \$\$;
SQL

# in_order SUB — aggregates whose handled versions are not 1..n in order.
in_order() {
	q -c "SELECT count(*) FROM (SELECT aggregate_id, array_agg(version ORDER BY n) v,
	        array_agg(version ORDER BY version) s FROM t31_handled WHERE sub = '$1' GROUP BY 1) x WHERE v <> s"
}
# produce TRANSPORT TOPIC SQL — envelopes from SELECT aggregate_id, version, payload.
produce() {
	produce_sql "$1" "$2" "SELECT a, t_env(gen_random_uuid(), a, 'T31', v, p) FROM ($3) s (a, v, p)"
}

# --- 1, 2, 3: SQL handler, commit-time failures ------------------------------
nats_stream "T31_$run" "t31.nats.$run.*" || bail "could not create the NATS stream"
T="t31.nats.$run"; TK="t31.kafka.$run"
q -c "SELECT eventbus_subscribe('$TK.sql', 't31_sql(eventbus.envelope)', 'kafka'),
             eventbus_subscribe('$T.sql', 't31_sql(eventbus.envelope)', 'nats'),
             eventbus_subscribe('$T.fk', 't31_fk(eventbus.envelope)', 'nats', 2),
             eventbus_subscribe('$T.slow', 't31_slow(eventbus.envelope)', 'nats', 2)" >/dev/null
sleep 2
rc=0
produce kafka "$TK.sql" "SELECT 'agg-' || a, v, '{}'::jsonb FROM generate_series(1, 20) a, generate_series(1, 5) v ORDER BY v, a" || rc=1
produce nats "$T.sql" "SELECT 'agg-' || a, v, '{}'::jsonb FROM generate_series(1, 20) a, generate_series(1, 5) v ORDER BY v, a" || rc=1
# 50 aggregates x 3 versions; 'orphan' v2 is the one at fault, in the middle of the burst.
produce nats "$T.fk" "SELECT a, v, '{}'::jsonb FROM (SELECT 'agg-' || a a, v FROM generate_series(1, 50) a, generate_series(1, 3) v
                                                  UNION ALL SELECT 'orphan', 2) s ORDER BY v, a" || rc=1
ok $rc "produced the events for the SQL handler (both transports) and the commit-failure handlers"

wait_count 90 200 "SELECT count(*) FROM t31_handled WHERE sub = 'sql'" 30
is "$COUNT" 200 "LANGUAGE sql handler: all 100 events per transport handled"
is "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id WHERE s.topic LIKE 't31.%.$run.sql'")" 0 \
	"LANGUAGE sql handler: no dead letter (no 'function returned NULL')"

wait_count 90 150 "SELECT count(*) FROM t31_handled WHERE sub = 'fk'" 30
is "$COUNT" 150 "deferred FK: the 150 events of the 50 other aggregates are all handled"
wait_count 60 1 "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
                  WHERE s.topic = '$T.fk'" 30
is "$(q -c "SELECT string_agg((envelope).aggregate_id || ' ' || error_sqlstate || ' ' || attempts, ',')
             FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id WHERE s.topic = '$T.fk'")" \
	"orphan 23503 2" "deferred FK: the event at fault is dead-lettered with 23503 after max_attempts"
is "$(q -c "SELECT count(*) FROM t31_child c WHERE c.parent LIKE 'orphan%'")" 0 "deferred FK: no orphan row committed"
is "$(in_order fk)" 0 "deferred FK: every aggregate handled in version order"

# 3: the pool's transactions SERIALIZABLE (its role's setting; workers restart).
WORKER_ROLE=$(q -c "SELECT rolname FROM pg_roles WHERE oid = 10")
restart_dispatcher() {
	local old; old=$(dispatcher_pid)
	q -c "SELECT pg_terminate_backend($old)" >/dev/null
	wait_until 60 "[ -n \"\$(dispatcher_pid)\" ] && [ \"\$(dispatcher_pid)\" != $old ]" && wait_until 60 dispatcher_running &&
		wait_until 30 "[ \"\$(q -c \"SELECT count(*) FROM eventbus_status() WHERE component LIKE 'worker %' AND pid IS NOT NULL\")\" = 4 ]"
}
q -c "ALTER ROLE $WORKER_ROLE IN DATABASE $PGDATABASE SET default_transaction_isolation = 'serializable'" >/dev/null
restart_dispatcher || bail "dispatcher did not restart"
# Let the new dispatcher's redeliveries (skipped as duplicates) pass first:
# the two events must make a batch of their own.
sleep 5
SER_LOG_FROM=$(stat -c %s "$EVENTBUS_PG_LOG")
q -c "SELECT eventbus_subscribe('$T.ser', 't31_ser(eventbus.envelope)', 'nats', 2)" >/dev/null
sleep 2	# the JetStream durable for the new subject
pg_sleeping() { [ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'eventbus worker' AND wait_event = 'PgSleep'")" = 1 ]; }
produce nats "$T.ser" "SELECT 'conflict', 1, '{}'::jsonb"
wait_until 30 pg_sleeping
ok $? "serialization: v1 runs (sleeping 2 s) while v2 and v3 are published and queue behind it"
produce nats "$T.ser" "SELECT 'conflict', v, '{}'::jsonb FROM generate_series(2, 3) v"
wait_until 30 "[ \"\$(q -c \"SELECT count(*) FROM t31_handled WHERE sub = 'ser'\")\" = 1 ] && pg_sleeping"
ok $? "serialization: v2 read t31_ssi_a and wrote t31_ssi_b, v3 sleeps, in one SERIALIZABLE batch"
q -c "BEGIN ISOLATION LEVEL SERIALIZABLE" -c "SELECT count(*) FROM t31_ssi_b" -c "INSERT INTO t31_ssi_a VALUES (1)" -c "COMMIT" >/dev/null
ok $? "serialization: a concurrent SERIALIZABLE session read t31_ssi_b, wrote t31_ssi_a and committed first (write skew)"
wait_count 60 3 "SELECT count(*) FROM t31_handled WHERE sub = 'ser'" 30
is "$(q -c "SELECT string_agg(version::text, ',' ORDER BY n) || ' ' || count(DISTINCT event_id) FROM t31_handled WHERE sub = 'ser'")" "1,2,3 3" \
	"serialization: the three events handled, each exactly once, in order"
ok "$(grep -qE 'commit of a batch of 2 events failed, running them one by one' < <(tail -c +$((SER_LOG_FROM + 1)) "$EVENTBUS_PG_LOG"); echo $?)" \
	"serialization: the batch's commit failed (serialization failure) and its 2 events ran again one transaction each"
is "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id WHERE s.topic = '$T.ser'")" 0 \
	"serialization: nothing dead-lettered (alone, each event commits)"
q -c "ALTER ROLE $WORKER_ROLE IN DATABASE $PGDATABASE RESET default_transaction_isolation" >/dev/null
restart_dispatcher || bail "dispatcher did not restart"
PIDS_BEFORE=$(worker_pids)
DISP_BEFORE=$(dispatcher_pid)

# --- 4: handler timeout ------------------------------------------------------
q -c "ALTER SYSTEM SET eventbus.handler_timeout = '1s'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1
produce nats "$T.slow" "SELECT a, 1, jsonb_build_object('sub', 'timeout', 'sleep', 30)
                         FROM (VALUES ('sleeper')) s (a) UNION ALL
                        SELECT 'agg-' || a, 1, jsonb_build_object('sub', 'timeout', 'sleep', 0) FROM generate_series(1, 20) a"
started=$SECONDS
wait_count 60 1 "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
                  WHERE s.topic = '$T.slow'" 60
is "$(q -c "SELECT string_agg(error_sqlstate || ' ' || (error_message LIKE '%eventbus.handler_timeout%'), ',')
             FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id WHERE s.topic = '$T.slow'")" \
	"57014 true" "handler_timeout: the 30 s handler is cancelled (57014, message names the setting) and dead-lettered"
diag "timed-out event dead-lettered after $((SECONDS - started)) s (2 attempts of 1 s plus backoff)"
is "$(q -c "SELECT count(*) FROM t31_handled WHERE sub = 'timeout'")" 20 "handler_timeout: the 20 other events handled"
q -c "ALTER SYSTEM RESET eventbus.handler_timeout" -c "SELECT pg_reload_conf()" >/dev/null

is "$(worker_pids)" "$PIDS_BEFORE" "no pool worker restarted through the timeouts"
is "$(dispatcher_pid)" "$DISP_BEFORE" "the dispatcher did not restart"

# --- inbox pruning keeps up: 100,000 expired rows go within seconds -----------
SUB_SQL=$(q -c "SELECT id FROM eventbus.subscriptions WHERE topic = '$T.sql'")
q -c "INSERT INTO eventbus.inbox (subscription_id, event_id, outcome, handled_at)
      SELECT $SUB_SQL, gen_random_uuid(), 'handled', now() - interval '8 days' FROM generate_series(1, 100000)" >/dev/null
prune_start=$SECONDS
wait_until 120 "[ \"\$(q -c \"SELECT count(*) FROM eventbus.inbox WHERE handled_at < now() - interval '7 days'\")\" = 0 ]"
ok $? "inbox pruning: 100,000 expired inbox rows (past eventbus.inbox_retention) are deleted"
diag "100,000 expired inbox rows pruned within $((SECONDS - prune_start)) s (one 10,000-row chunk per transaction, up to 200 ms a second)"
is "$(q -c "SELECT count(*) FROM eventbus.inbox WHERE subscription_id = $SUB_SQL")" 100 "inbox pruning: the rows inside the retention are kept"

# --- 5: head of line, 2 workers ---------------------------------------------
RESTART_NEEDED=1
q -c "ALTER SYSTEM SET eventbus.workers = 2" >/dev/null
"$STACK" pg-stop fast >/dev/null && "$STACK" pg-start >/dev/null || bail "restart with 2 workers failed"
wait_until 60 both_connected || bail "brokers not connected after restart"
wait_until 60 dispatcher_running || bail "dispatcher not running after restart"
is "$(q -c "SELECT count(*) FROM eventbus_status() WHERE component LIKE 'worker %'")" 2 "the pool runs 2 workers"
wait_until 30 "[ \"\$(q -c \"SELECT count(*) FROM eventbus_status() WHERE component LIKE 'worker %' AND pid IS NOT NULL\")\" = 2 ]"

produce nats "$T.slow" "SELECT 'sleeper', 2, jsonb_build_object('sub', 'hol', 'sleep', 20)"
wait_until 30 "[ \"\$(q -c \"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'eventbus worker' AND wait_event = 'PgSleep'\")\" = 1 ]"
ok $? "the sleeper's handler is running (pg_sleep in a pool worker)"
hol_start=$SECONDS
produce nats "$T.slow" "SELECT a, v, jsonb_build_object('sub', 'hol', 'sleep', 0) FROM (
                          SELECT 'other-' || a a, v FROM generate_series(1, 200) a, generate_series(1, 5) v
                          UNION ALL SELECT 'sleeper', v FROM generate_series(3, 5) v) s ORDER BY v, a"
wait_count 60 1000 "SELECT count(*) FROM t31_handled WHERE sub = 'hol' AND aggregate_id LIKE 'other-%'" 30
is "$COUNT" 1000 "head of line: the 1,000 events of 200 other aggregates are handled"
diag "1,000 other events handled $((SECONDS - hol_start)) s after the sleeper started its 20 s"
is "$(q -c "SELECT count(*) FROM t31_handled WHERE sub = 'hol' AND aggregate_id = 'sleeper'")" 0 \
	"head of line: ... all before the sleeper woke (its own events not handled yet)"
wait_count 60 4 "SELECT count(*) FROM t31_handled WHERE sub = 'hol' AND aggregate_id = 'sleeper'" 40
is "$(q -c "SELECT string_agg(version::text, ',' ORDER BY n) FROM t31_handled WHERE sub = 'hol' AND aggregate_id = 'sleeper'")" \
	"2,3,4,5" "head of line: the sleeper's own later events waited and kept their order"
is "$(in_order hol)" 0 "head of line: every aggregate in version order"

# --- 6: dispatcher memory bounded in bytes ------------------------------------
q -c "ALTER SYSTEM SET eventbus.dispatcher_memory = '8MB'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 2	# a consumer setting: the dispatcher restarts with it
wait_until 60 dispatcher_running
q -c "SELECT eventbus_subscribe('$TK.big', 't31_big(eventbus.envelope)', 'kafka'),
             eventbus_subscribe('$T.big', 't31_big(eventbus.envelope)', 'nats')" >/dev/null
sleep 8	# Kafka rebalance for the new topic
# grand_total — bytes in the dispatcher's memory contexts, as PostgreSQL logs them.
mem_from=$(stat -c %s "$EVENTBUS_PG_LOG")
grand_total() {
	local pid; pid=$(dispatcher_pid)
	q -c "SELECT pg_log_backend_memory_contexts($pid)" >/dev/null
	sleep 0.3
	tail -c +$((mem_from + 1)) "$EVENTBUS_PG_LOG" | grep "\[$pid\].*Grand total:" | tail -1 | sed -n 's/.*Grand total: \([0-9]*\) bytes.*/\1/p'
}
base=$(grand_total)
big_start=$SECONDS
BIG=900000
rc=0
# Kafka: the dev broker keeps about 5 MB per partition, so 10 x 450 kB to each
# of the 4 partitions; NATS: 80 x 900 kB.
for part in 0 1 2 3; do
	psql -X -A -t -q -v ON_ERROR_STOP=1 -F $'\t' -c "SELECT a, t_env(gen_random_uuid(), a, 'T31', v, p) FROM (
	    SELECT 'kbig-$part' a, v, jsonb_build_object('blob', repeat('x', $((BIG / 2)))) p FROM generate_series(1, 10) v ORDER BY v) s" |
		kafka_produce "$TK.big" -p $part -X message.max.bytes=4000000 || rc=1
done
produce nats "$T.big" "SELECT 'nbig-' || (i % 4), (i / 4) + 1, jsonb_build_object('blob', repeat('x', $BIG)) FROM generate_series(0, 79) i ORDER BY i" || rc=1
ok $rc "produced 40 messages of ~$((BIG / 2000)) kB to Kafka and 80 of ~$((BIG / 1000)) kB to NATS"
peak=${base:-0}
while :; do
	g=$(grand_total); [ -n "$g" ] && [ "$g" -gt "$peak" ] && peak=$g
	[ "$(q -c "SELECT count(*) FROM t31_handled WHERE sub = 'big'")" -ge 120 ] && break
	[ $((SECONDS - big_start)) -gt 300 ] && break
done
is "$(q -c "SELECT count(*) || ' ' || count(DISTINCT event_id) FROM t31_handled WHERE sub = 'big'")" "120 120" "dispatcher_memory: all 120 big messages handled, each once"
is "$(in_order big)" 0 "dispatcher_memory: in order"
diag "dispatcher memory contexts: $((${base:-0} / 1048576)) MB before, peak $((peak / 1048576)) MB with eventbus.dispatcher_memory = 8MB and 90 MB of messages"
ok "$([ -n "$base" ] && [ "$peak" -lt $((48 * 1048576)) ]; echo $?)" \
	"dispatcher_memory: the dispatcher's memory stayed under 48 MB (peak $((peak / 1048576)) MB) while 90 MB of messages passed"
done_testing
