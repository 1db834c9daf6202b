#!/usr/bin/env bash
# Crashes in the middle of an inbound burst, on both transports at once:
#   phase 1: kill -9 of pool worker 1 (the postmaster then resets the whole
#            cluster: every backend and worker dies, crash recovery);
#   phase 2: pg_ctl stop -m immediate, then start.
# Each burst is 2,000 envelopes per transport (200 aggregates x 10 versions),
# produced in 10 chunks by kcat/natstool from prepared files while the crash
# happens.  The handler inserts into a table WITHOUT a unique constraint and
# checks the order in its own transaction, so afterwards loss, duplicates and
# order violations are counted separately: all must be zero.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t23.kafka.$run"; TN="t23.nats.$run"
NAGGS=200; NVERS=10; PER=$((NAGGS * NVERS))
W=$(mktemp -d)

consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't23.%.$run'; rm -rf '$W'"

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t23_sent, t23_handled, t23_last, t23_violations;
CREATE TABLE t23_sent (phase int, transport text, aggregate_id text, version bigint, event_id uuid);
CREATE TABLE t23_handled (n bigserial, transport text, aggregate_id text, version bigint, event_id uuid);
CREATE TABLE t23_last (transport text, aggregate_id text, version bigint NOT NULL, PRIMARY KEY (transport, aggregate_id));
CREATE TABLE t23_violations (transport text, aggregate_id text, got bigint, expected bigint);
CREATE OR REPLACE FUNCTION t23_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE prev bigint;
BEGIN
  PERFORM pg_sleep(0.002);   -- keep work in flight when the crash comes
  INSERT INTO public.t23_handled (transport, aggregate_id, version, event_id)
  VALUES (e.transport, e.aggregate_id, e.event_version, e.event_id);
  SELECT l.version INTO prev FROM public.t23_last l WHERE l.transport = e.transport AND l.aggregate_id = e.aggregate_id FOR UPDATE;
  IF e.event_version IS DISTINCT FROM coalesce(prev, 0) + 1 THEN
    INSERT INTO public.t23_violations VALUES (e.transport, e.aggregate_id, e.event_version, coalesce(prev, 0) + 1);
  END IF;
  INSERT INTO public.t23_last VALUES (e.transport, e.aggregate_id, e.event_version)
  ON CONFLICT (transport, aggregate_id) DO UPDATE SET version = EXCLUDED.version;
END $$;
SQL

# Test data; phase 0 = one warm-up event per transport.  Files per chunk
# (chunk c = version c of every aggregate of the phase) are written now, so
# producing needs no database while it is crashing.
for tr in kafka nats; do
	q -c "INSERT INTO t23_sent VALUES (0, '$tr', 'warmup', 1, gen_random_uuid())" >/dev/null
	for ph in 1 2; do
		q -c "INSERT INTO t23_sent SELECT $ph, '$tr', 'p$ph-agg-' || a, v, gen_random_uuid()
		        FROM generate_series(1, $NAGGS) a, generate_series(1, $NVERS) v" >/dev/null
	done
	for c in $(seq 0 $NVERS); do
		for ph in 1 2; do
			[ "$c" = 0 ] && [ $ph = 2 ] && continue
			where="phase = $ph AND version = $c"; [ "$c" = 0 ] && where="phase = 0"
			psql -X -A -t -q -v ON_ERROR_STOP=1 -F $'\t' -c "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T23Happened', version, '{}')
			      FROM t23_sent WHERE transport = '$tr' AND $where ORDER BY aggregate_id" >"$W/$tr.$ph.$c.kv"
			cut -f2- "$W/$tr.$ph.$c.kv" >"$W/$tr.$ph.$c.v"
		done
	done
done
send_chunk() {   # send_chunk PHASE CHUNK — both transports
	kafka_produce "$TK" <"$W/kafka.$1.$2.kv" && nats_produce "$TN" --msg-id-from-event-id <"$W/nats.$1.$2.v"
}
burst() {        # burst PHASE — all chunks, in order
	local c rc=0
	for c in $(seq 1 $NVERS); do send_chunk "$1" "$c" || rc=1; sleep 0.1; done
	return $rc
}
handled() { q -c "SELECT count(*) FROM t23_handled h JOIN t23_sent s USING (event_id) WHERE s.phase = $1" 2>/dev/null | grep -E '^[0-9]+$'; }

nats_stream "T23_$run" "$TN" || bail "could not create the NATS stream"
send_chunk 1 0 || bail "could not produce the warm-up events"
subs=$(q -c "SELECT eventbus_subscribe('$TK', 't23_handler(eventbus.envelope)', 'kafka'), eventbus_subscribe('$TN', 't23_handler(eventbus.envelope)', 'nats')")
ok "$([[ $subs =~ ^[0-9]+\|[0-9]+$ ]]; echo $?)" "subscribed on both transports ($subs)"
wait_until 60 '[ "$(handled 0)" = 2 ]'
ok $? "warm-up event handled on both transports"

check_phase() {  # check_phase PHASE WHAT
	local ph=$1 what=$2 tr
	for tr in kafka nats; do
		is "$(q -c "SELECT count(*) FROM t23_sent s WHERE phase = $ph AND transport = '$tr' AND NOT EXISTS (SELECT 1 FROM t23_handled h WHERE h.event_id = s.event_id)")" \
			"0" "$what, $tr: zero lost"
		is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t23_handled h JOIN t23_sent s USING (event_id) WHERE s.phase = $ph AND s.transport = '$tr'")" \
			"0" "$what, $tr: zero handled twice"
		is "$(q -c "SELECT count(*) FROM t23_violations WHERE transport = '$tr' AND aggregate_id LIKE 'p$ph-%'")" \
			"0" "$what, $tr: zero order violations (checked in the handler's transaction)"
		is "$(q -c "SELECT count(*) FROM t23_last WHERE transport = '$tr' AND aggregate_id LIKE 'p$ph-%' AND version = $NVERS")" \
			"$NAGGS" "$what, $tr: all $NAGGS aggregates at version $NVERS"
	done
	is "$(q -c "SELECT count(*) FROM eventbus.inbox i JOIN t23_sent s USING (event_id) WHERE s.phase = $ph AND i.outcome = 'handled'
	             AND i.subscription_id IN (SELECT id FROM eventbus.subscriptions WHERE topic IN ('$TK', '$TN'))")" \
		"$((2 * PER))" "$what: inbox has exactly one row per event"
}

# --- phase 1: kill -9 of pool worker 1 mid-burst ---------------------------
t0=$SECONDS
burst 1 >"$W/burst1.log" 2>&1 &
bp=$!
wait_until 60 '[ "$(handled 1)" -ge 300 ]'
ok $? "burst 1 is being handled"
victim=$(worker_pid 1)
at_kill=$(handled 1)
ok "$([ -n "$victim" ] && kill -9 "$victim"; echo $?)" "kill -9 of 'worker 1' (pid ${victim:-none}) after $at_kill of $((2 * PER)) events"
wait "$bp"
ok $? "burst 1 fully produced (brokers unaffected by the crash)"
wait_until 60 dispatcher_running
ok $? "eventbus back after the crash (dispatcher running)"
ok "$([ -n "$victim" ] && [ ! -d "/proc/$victim" ] && [ "$(worker_pid 1)" != "$victim" ]; echo $?)" "worker 1 is a new process ($(worker_pid 1))"
wait_count 180 $((2 * PER)) "SELECT count(DISTINCT event_id) FROM t23_handled h JOIN t23_sent s USING (event_id) WHERE s.phase = 1"
ok $? "burst 1: all $((2 * PER)) events handled after the crash ($COUNT)"
diag "phase 1 took $((SECONDS - t0)) s"
ok "$([ "$at_kill" -lt $((2 * PER)) ]; echo $?)" "the crash interrupted the burst ($at_kill of $((2 * PER)) handled at the kill)"
sleep 3
check_phase 1 "kill -9 worker"

# --- phase 2: immediate stop mid-burst -------------------------------------
t0=$SECONDS
burst 2 >"$W/burst2.log" 2>&1 &
bp=$!
wait_until 60 '[ "$(handled 2)" -ge 300 ]'
ok $? "burst 2 is being handled"
at_stop=$(handled 2)
"$STACK" pg-stop immediate >/dev/null
ok $? "pg_ctl stop -m immediate after $at_stop of $((2 * PER)) events"
sleep 1
"$STACK" pg-start >/dev/null
ok $? "PostgreSQL started again"
wait "$bp"
ok $? "burst 2 fully produced"
wait_until 60 both_connected && wait_until 60 dispatcher_running
ok $? "eventbus back after the restart (dispatcher running)"
wait_count 180 $((2 * PER)) "SELECT count(DISTINCT event_id) FROM t23_handled h JOIN t23_sent s USING (event_id) WHERE s.phase = 2"
ok $? "burst 2: all $((2 * PER)) events handled after the restart ($COUNT)"
diag "phase 2 took $((SECONDS - t0)) s"
ok "$([ "$at_stop" -lt $((2 * PER)) ]; echo $?)" "the stop interrupted the burst ($at_stop of $((2 * PER)) handled at the stop)"
sleep 3
check_phase 2 "immediate stop"
check_phase 1 "kill -9 worker (rechecked after the restart)"
is "$(q -c "SELECT count(*) FROM eventbus.quarantine WHERE topic IN ('$TK', '$TN')")" "0" "nothing quarantined"

done_testing
