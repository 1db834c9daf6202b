#!/usr/bin/env bash
# Broker faults under load: 10 nats-server restarts and 10 Kafka broker
# outages while 20,000 events (10,000 per transport, 400 aggregates each)
# are published through eventbus_publish from 4 connections and consumed
# by a subscribed handler.  Afterwards, counted from the database: zero
# lost, zero handled twice (the handler's effect table has no unique
# constraint), zero order violations per aggregate (checked inside the
# handler's transaction), and PostgreSQL never crash-restarted (same
# pg_postmaster_start_time(), no backend terminated by a signal in the
# server log since the test started).
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t31.kafka.$run"; TN="t31.nats.$run"
PER_CONN=2500; CONNS=4; NAGGS=400; FAULTS=10
TOTAL=$((2 * CONNS * PER_CONN))

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't31.%.$run'; \"$STACK\" kafka-up; \"$STACK\" nats-start"
burst_proc_setup
publish_log_setup t31_pub

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t31_handled, t31_last, t31_violations;
CREATE TABLE t31_handled (transport text, aggregate_id text, version bigint, event_id uuid);
CREATE TABLE t31_last (transport text, aggregate_id text, version bigint NOT NULL, PRIMARY KEY (transport, aggregate_id));
CREATE TABLE t31_violations (transport text, aggregate_id text, got bigint, expected bigint);
CREATE OR REPLACE FUNCTION t31_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE prev bigint;
BEGIN
  INSERT INTO public.t31_handled VALUES (e.transport, e.aggregate_id, e.event_version, e.event_id);
  SELECT l.version INTO prev FROM public.t31_last l WHERE l.transport = e.transport AND l.aggregate_id = e.aggregate_id FOR UPDATE;
  IF e.event_version IS DISTINCT FROM coalesce(prev, 0) + 1 THEN
    INSERT INTO public.t31_violations VALUES (e.transport, e.aggregate_id, e.event_version, coalesce(prev, 0) + 1);
  END IF;
  INSERT INTO public.t31_last VALUES (e.transport, e.aggregate_id, e.event_version)
  ON CONFLICT (transport, aggregate_id) DO UPDATE SET version = EXCLUDED.version;
END $$;
SQL

subs=$(q -c "SELECT eventbus_subscribe('$TK', 't31_handler(eventbus.envelope)', 'kafka'), eventbus_subscribe('$TN', 't31_handler(eventbus.envelope)', 'nats')")
ok "$([[ $subs =~ ^[0-9]+\|[0-9]+$ ]]; echo $?)" "subscribed on both transports ($subs)"
handled() { q -c "SELECT count(DISTINCT event_id) FROM t31_handled" 2>/dev/null | grep -E '^[0-9]+$'; }

started=$(q -c "SELECT pg_postmaster_start_time()")
log_from=$(stat -c %s "$EVENTBUS_PG_LOG")
t0=$SECONDS

# The burst: 4 connections, stretched (a pause after each commit) so that
# it lasts about as long as the faults.
pids=()
for w in $(seq 1 $CONNS); do
	psql -X -q -c "CALL t_burst($w, $PER_CONN, '$TK', '$TN', $NAGGS, 'f31-', 't31_pub', 0.6)" &
	pids+=($!)
done
wait_until 60 '[ "$(handled)" -ge 200 ]'
ok $? "the burst is being handled before the first fault"

# The faults, one after the other: a Kafka outage (all brokers down for
# 1.5 s), then a nats-server restart.
kafka_out=0; nats_restarts=0
for i in $(seq 1 $FAULTS); do
	"$STACK" kafka-down >/dev/null && sleep 1.5 && "$STACK" kafka-up >/dev/null && kafka_out=$((kafka_out + 1))
	sleep 1
	"$STACK" nats-stop >/dev/null && sleep 0.5 && "$STACK" nats-start >/dev/null && nats_restarts=$((nats_restarts + 1))
	sleep 1
done
faults_s=$((SECONDS - t0))
is "$kafka_out/$nats_restarts" "$FAULTS/$FAULTS" "$FAULTS Kafka outages and $FAULTS nats-server restarts done"
still=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && still=$((still + 1)); done
ok "$([ "$still" -gt 0 ]; echo $?)" "the faults happened during the burst ($still of $CONNS publishers still running after the last fault, ${faults_s} s)"

rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
ok $rc "publishing kept succeeding through the faults"
burst_s=$((SECONDS - t0))
is "$(q -c "SELECT count(*) FROM t31_pub")" "$TOTAL" "$TOTAL events committed"

wait_count 240 "$TOTAL" "SELECT count(DISTINCT event_id) FROM t31_handled" 90
ok $? "all $TOTAL events handled ($COUNT)"
diag "burst published in ${burst_s} s, all handled after $((SECONDS - t0)) s"

for tr in kafka nats; do
	is "$(q -c "SELECT count(*) FROM t31_pub p WHERE p.transport = '$tr' AND NOT EXISTS (SELECT 1 FROM t31_handled h WHERE h.event_id = p.event_id)")" \
		"0" "$tr: zero lost"
	is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t31_handled WHERE transport = '$tr'")" \
		"0" "$tr: zero handled twice"
	is "$(q -c "SELECT count(*) FROM t31_violations WHERE transport = '$tr'")" \
		"0" "$tr: zero order violations (checked in the handler's transaction)"
	is "$(q -c "SELECT count(*) FROM t31_last l WHERE transport = '$tr' AND version <> (SELECT count(*) FROM t31_pub p WHERE p.transport = '$tr' AND p.aggregate_id = l.aggregate_id)")" \
		"0" "$tr: every aggregate at its last version"
done
wait_outbox_empty 30
ok $? "outbox empty"
is "$(q -c "SELECT pg_postmaster_start_time()")" "$started" "no crash restart: pg_postmaster_start_time() unchanged"
crashes=$(tail -c +"$((log_from + 1))" "$EVENTBUS_PG_LOG" | grep -cE 'terminated by signal|was terminated by|all server processes terminated; reinitializing')
is "$crashes" "0" "no process terminated by a signal since the test started (server log)"
diag "dispatcher restarts during the test: $(tail -c +"$((log_from + 1))" "$EVENTBUS_PG_LOG" | grep -c 'eventbus dispatcher started')"

done_testing
