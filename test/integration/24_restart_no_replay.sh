#!/usr/bin/env bash
# A clean restart resumes where consumption stopped: N events handled on each
# transport, then pg_ctl stop -m fast and start; afterwards the handler has
# run exactly once for every old event (no replay), new events are handled,
# and the JetStream durable consumer survived (never deleted on shutdown).
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t24.kafka.$run"; TN="t24.nats.$run"; SN="T24_$run"
NAGGS=50; NVERS=10; OLD=$((NAGGS * NVERS)); NEW=60

consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't24.%.$run'"

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t24_sent, t24_handled;
CREATE TABLE t24_sent (batch text, transport text, aggregate_id text, version bigint, event_id uuid);
CREATE TABLE t24_handled (n bigserial, transport text, aggregate_id text, version bigint, event_id uuid);
CREATE OR REPLACE FUNCTION t24_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t24_handled (transport, aggregate_id, version, event_id)
  VALUES (e.transport, e.aggregate_id, e.event_version, e.event_id);
END $$;
SQL
for tr in kafka nats; do
	q -c "INSERT INTO t24_sent SELECT 'old', '$tr', 'cust-' || a, v, gen_random_uuid()
	        FROM generate_series(1, $NAGGS) a, generate_series(1, $NVERS) v" >/dev/null
	# new: v11 of the first 30 aggregates, v1 of 30 new ones
	q -c "INSERT INTO t24_sent SELECT 'new', '$tr', 'cust-' || a, $((NVERS + 1)), gen_random_uuid() FROM generate_series(1, 30) a
	      UNION ALL SELECT 'new', '$tr', 'newcust-' || a, 1, gen_random_uuid() FROM generate_series(1, $((NEW - 30))) a" >/dev/null
done
send() {   # send BATCH
	local tr rc=0
	for tr in kafka nats; do
		produce_sql $tr "t24.$tr.$run" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T24Happened', version, '{}')
		                                  FROM t24_sent WHERE batch = '$1' AND transport = '$tr' ORDER BY version, aggregate_id" || rc=1
	done
	return $rc
}
counts() {  # counts BATCH TRANSPORT — calls/distinct events/expected
	q -c "SELECT count(h.event_id) || '/' || count(DISTINCT h.event_id) || '/' || (SELECT count(*) FROM t24_sent WHERE batch = '$1' AND transport = '$2')
	        FROM t24_sent s LEFT JOIN t24_handled h USING (event_id) WHERE s.batch = '$1' AND s.transport = '$2'"
}

nats_stream "$SN" "$TN" || bail "could not create the NATS stream"
send old
ok $? "produced $OLD events per transport"
subs=$(q -c "SELECT eventbus_subscribe('$TK', 't24_handler(eventbus.envelope)', 'kafka'), eventbus_subscribe('$TN', 't24_handler(eventbus.envelope)', 'nats')")
ok "$([[ $subs =~ ^[0-9]+\|[0-9]+$ ]]; echo $?)" "subscribed on both transports ($subs)"
wait_count 90 $((2 * OLD)) "SELECT count(*) FROM t24_handled"
ok $? "all $((2 * OLD)) old events handled ($COUNT)"
# Let the consumers commit / ack (lag 0) so that the restart tests resuming,
# not the inbox skipping redeliveries; the exactly-once count below holds
# either way.
lag_zero() {
	[ "$(q -c "SELECT count(*) FROM eventbus_status() st JOIN eventbus.subscriptions s ON st.component = 'subscription ' || s.id
	            WHERE s.topic IN ('$TK', '$TN') AND st.backlog = 0")" = 2 ]
}
wait_until 30 lag_zero
ok $? "lag 0 on both subscriptions before the restart"
before=$(nats_consumers "$SN" | tr '\n' ' ')
ok "$([ -n "$before" ]; echo $?)" "JetStream durable consumer(s) of $SN before the restart: ${before:-none}"
handled_before=$(q -c "SELECT coalesce(max(n), 0) FROM t24_handled")

"$STACK" pg-stop fast >/dev/null
ok $? "pg_ctl stop -m fast"
is "$(nats_consumers "$SN" | tr '\n' ' ')" "$before" "durable consumer kept while PostgreSQL is down"
"$STACK" pg-start >/dev/null
ok $? "PostgreSQL started again"
wait_until 60 both_connected && wait_until 60 dispatcher_running
ok $? "dispatcher running after the restart"
wait_until 30 '[ "$(consumer_state kafka)" = connected ] && [ "$(consumer_state nats)" = connected ]'
ok $? "both consumers connected after the restart"
is "$(nats_consumers "$SN" | tr '\n' ' ')" "$before" "same JetStream durable consumer(s) after the restart"

send new
ok $? "produced $NEW new events per transport"
wait_count 90 $((2 * (OLD + NEW))) "SELECT count(DISTINCT event_id) FROM t24_handled"
ok $? "new events handled after the restart ($COUNT distinct of $((2 * (OLD + NEW))))"
sleep 3
for tr in kafka nats; do
	is "$(counts old $tr)" "$OLD/$OLD/$OLD" "$tr: handler ran exactly once for each of the $OLD old events (calls/distinct/sent)"
	is "$(q -c "SELECT count(*) FROM t24_handled h JOIN t24_sent s USING (event_id) WHERE s.batch = 'old' AND s.transport = '$tr' AND h.n > $handled_before")" \
		"0" "$tr: no old event handled again after the restart"
	is "$(counts new $tr)" "$NEW/$NEW/$NEW" "$tr: each of the $NEW new events handled once"
	is "$(q -c "SELECT count(*) FROM (SELECT aggregate_id, array_agg(version ORDER BY n) vs FROM t24_handled WHERE transport = '$tr' GROUP BY 1) x
	             WHERE vs <> ARRAY(SELECT generate_series(1, array_length(vs, 1))::bigint)")" "0" "$tr: per aggregate versions 1..k in order across the restart"
	is "$(q -c "SELECT count(*) FROM eventbus.inbox i JOIN eventbus.subscriptions s ON s.id = i.subscription_id WHERE s.topic = 't24.$tr.$run'")" \
		"$((OLD + NEW))" "$tr: inbox has one row per event"
done

done_testing
