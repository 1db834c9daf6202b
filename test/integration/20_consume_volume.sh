#!/usr/bin/env bash
# Consuming at volume: 10,000 envelopes for 1,000 aggregates over 5 topics on
# EACH transport (20,000 in all), produced by independent clients (kcat,
# natstool) as a Go service would, half before the subscriptions exist (start
# policy: earliest retained message) and half while they run.  One plpgsql
# handler per topic per transport records every call and checks the order
# inside its own transaction.  Counted from the database, separately: each
# event handled exactly once (no loss, no duplicate), versions 1..10 in order
# per aggregate, the inbox holds one row per event, nothing quarantined.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
NTOPICS=5; NAGGS=1000; NVERS=10
PER_TR=$((NAGGS * NVERS)); TOTAL=$((2 * PER_TR))
topic() { echo "t20.$1.$run.$2"; }     # topic kafka|nats N

consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't20.%.$run.%'"

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t20_sent, t20_handled, t20_last, t20_violations;
CREATE TABLE t20_sent (transport text, topic text, aggregate_id text, version bigint, event_id uuid, payload jsonb);
-- No unique constraint: duplicates must be countable.
CREATE TABLE t20_handled (n bigserial, subscription bigint, transport text, topic text, aggregate_id text,
                          event_id uuid, version bigint, event_type text, payload jsonb,
                          at timestamptz DEFAULT clock_timestamp());
CREATE TABLE t20_last (transport text, topic text, aggregate_id text, version bigint NOT NULL,
                       PRIMARY KEY (transport, topic, aggregate_id));
CREATE TABLE t20_violations (transport text, topic text, aggregate_id text, got bigint, expected bigint, event_id uuid);

-- The handler: record the call; check the version against the last one seen
-- for (transport, topic, aggregate) in the SAME transaction (so a retried or
-- rolled-back call leaves no trace); never raise.
CREATE OR REPLACE FUNCTION t20_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE prev bigint; sub bigint;
BEGIN
  SELECT s.id INTO sub FROM eventbus.subscriptions s
   WHERE s.topic = e.topic AND s.transport = e.transport AND s.handler = 'public.t20_handler(eventbus.envelope)'::regprocedure;
  INSERT INTO public.t20_handled (subscription, transport, topic, aggregate_id, event_id, version, event_type, payload)
  VALUES (sub, e.transport, e.topic, e.aggregate_id, e.event_id, e.event_version, e.event_type, e.payload);
  SELECT l.version INTO prev FROM public.t20_last l
   WHERE l.transport = e.transport AND l.topic = e.topic AND l.aggregate_id = e.aggregate_id FOR UPDATE;
  IF e.event_version IS DISTINCT FROM coalesce(prev, 0) + 1 THEN
    INSERT INTO public.t20_violations VALUES (e.transport, e.topic, e.aggregate_id, e.event_version, coalesce(prev, 0) + 1, e.event_id);
  END IF;
  INSERT INTO public.t20_last VALUES (e.transport, e.topic, e.aggregate_id, e.event_version)
  ON CONFLICT (transport, topic, aggregate_id) DO UPDATE SET version = EXCLUDED.version;
END $$;
SQL

# What the test sends: aggregate acc-N lives on topic (N mod 5) + 1, versions
# 1..10, on each transport.
for tr in kafka nats; do
	q -c "INSERT INTO t20_sent
	      SELECT '$tr', 't20.$tr.$run.' || (a % $NTOPICS + 1), 'acc-' || a, v, gen_random_uuid(),
	             jsonb_build_object('acc', a, 'v', v, 'note', 'ünïcødé \"quoted\" \\ back')
	        FROM generate_series(1, $NAGGS) a, generate_series(1, $NVERS) v" >/dev/null
done
is "$(q -c "SELECT count(*) FROM t20_sent")" "$TOTAL" "test data: $TOTAL envelopes, $NAGGS aggregates x $NVERS versions per transport"

# NATS: streams must exist before publishing inbound.  Topics 1-3 get a stream
# each; topics 4 and 5 share one stream (two subjects), as existing streams are
# used as they are.
nats_stream "T20_${run}_1" "$(topic nats 1)" && nats_stream "T20_${run}_2" "$(topic nats 2)" &&
	nats_stream "T20_${run}_3" "$(topic nats 3)" && nats_stream "T20_${run}_45" "$(topic nats 4)" "$(topic nats 5)"
ok $? "NATS streams for the 5 inbound topics (topics 4 and 5 in one stream)"

# produce VMIN VMAX — versions VMIN..VMAX of every aggregate, each topic in
# version order, from one producer per topic and transport.
produce() {
	local rc=0 i tr t
	for tr in kafka nats; do
		for i in $(seq 1 $NTOPICS); do
			t=$(topic $tr "$i")
			produce_sql $tr "$t" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T20Happened', version, payload)
			                        FROM t20_sent WHERE transport = '$tr' AND topic = '$t' AND version BETWEEN $1 AND $2
			                       ORDER BY version, aggregate_id" || rc=1
		done
	done
	return $rc
}

t0=$(date +%s%N)
produce 1 5
ok $? "first half (versions 1-5, 10,000 envelopes) produced BEFORE subscribing"

# One subscription per topic per transport, all in one transaction (one
# change of the subscription set).
subs=$(q -c "SELECT string_agg(eventbus_subscribe(t, 't20_handler(eventbus.envelope)'::regprocedure, tr)::text, ',')
               FROM (SELECT DISTINCT transport tr, topic t FROM t20_sent) s")
nsubs=$(q -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic LIKE 't20.%.$run.%' AND handler = 't20_handler(eventbus.envelope)'::regprocedure")
is "$nsubs" "$((2 * NTOPICS))" "subscribed one handler per topic per transport (ids $subs)"

produce 6 10
ok $? "second half (versions 6-10) produced while consuming"

wait_count 120 $TOTAL "SELECT count(*) FROM t20_handled WHERE topic LIKE 't20.%.$run.%'" 30
ok $? "handled count reached $TOTAL (last count $COUNT)"
t1=$(q -c "SELECT (extract(epoch FROM max(at)) * 1e9)::bigint FROM t20_handled")
diag "first produce to last handled: $(( (t1 - t0) / 1000000 )) ms for $COUNT handler calls"
sleep 3   # let late redeliveries, if any, show up as duplicates

for tr in kafka nats; do
	is "$(q -c "SELECT count(*) FROM t20_handled WHERE transport = '$tr' AND topic LIKE 't20.$tr.$run.%'")" "$PER_TR" \
		"$tr: handler called $PER_TR times"
	is "$(q -c "SELECT count(DISTINCT event_id) FROM t20_handled WHERE transport = '$tr' AND topic LIKE 't20.$tr.$run.%'")" "$PER_TR" \
		"$tr: $PER_TR distinct events handled"
	is "$(q -c "SELECT count(*) - count(DISTINCT (subscription, event_id)) FROM t20_handled WHERE transport = '$tr' AND topic LIKE 't20.$tr.$run.%'")" "0" \
		"$tr: zero duplicates (handler ran once per event)"
	is "$(q -c "SELECT count(*) FROM t20_sent s WHERE transport = '$tr' AND NOT EXISTS (SELECT 1 FROM t20_handled h WHERE h.event_id = s.event_id)")" "0" \
		"$tr: zero missing"
	is "$(q -c "SELECT count(*) FROM t20_handled h WHERE transport = '$tr' AND topic LIKE 't20.$tr.$run.%' AND NOT EXISTS (SELECT 1 FROM t20_sent s WHERE s.event_id = h.event_id)")" "0" \
		"$tr: nothing handled that was not sent"
	is "$(q -c "SELECT count(*) FROM t20_violations WHERE transport = '$tr' AND topic LIKE 't20.$tr.$run.%'")" "0" \
		"$tr: zero order violations (checked inside the handler's transaction)"
	is "$(q -c "SELECT count(*) FROM t20_last WHERE transport = '$tr' AND topic LIKE 't20.$tr.$run.%' AND version = $NVERS")" "$NAGGS" \
		"$tr: every aggregate reached version $NVERS"
	is "$(q -c "SELECT count(*) FROM (SELECT topic, aggregate_id, array_agg(version ORDER BY n) vs FROM t20_handled
	                                  WHERE transport = '$tr' AND topic LIKE 't20.$tr.$run.%' GROUP BY 1, 2) x
	             WHERE vs <> ARRAY(SELECT generate_series(1, $NVERS)::bigint)")" "0" \
		"$tr: per aggregate the handler saw exactly 1..$NVERS, in that order"
	is "$(q -c "SELECT count(*) FROM t20_handled h JOIN t20_sent s USING (event_id)
	             WHERE h.transport = '$tr' AND (h.payload IS DISTINCT FROM s.payload OR h.aggregate_id <> s.aggregate_id
	                   OR h.topic <> s.topic OR h.version <> s.version OR h.event_type <> 'T20Happened')")" "0" \
		"$tr: envelope fields (topic, aggregate, version, type, payload) as sent"
	is "$(q -c "SELECT count(*) FROM t20_handled h WHERE transport = '$tr' AND topic LIKE 't20.$tr.$run.%'
	             AND subscription IS DISTINCT FROM (SELECT id FROM eventbus.subscriptions s WHERE s.topic = h.topic AND s.transport = '$tr'
	                                                AND s.handler = 't20_handler(eventbus.envelope)'::regprocedure)")" "0" \
		"$tr: envelope.transport and envelope.topic identify the subscription"
	is "$(q -c "SELECT count(*) FROM eventbus.inbox i JOIN eventbus.subscriptions s ON s.id = i.subscription_id
	             WHERE s.transport = '$tr' AND s.topic LIKE 't20.$tr.$run.%' AND i.outcome = 'handled'")" "$PER_TR" \
		"$tr: inbox has $PER_TR 'handled' rows"
	is "$(q -c "SELECT count(*) FROM eventbus.inbox i JOIN eventbus.subscriptions s ON s.id = i.subscription_id
	             WHERE s.transport = '$tr' AND s.topic LIKE 't20.$tr.$run.%' AND NOT EXISTS
	                   (SELECT 1 FROM t20_handled h WHERE h.event_id = i.event_id AND h.subscription = s.id)")" "0" \
		"$tr: every inbox row matches a handler call of its subscription"
	is "$(q -c "SELECT count(*) FROM eventbus.quarantine WHERE topic LIKE 't20.$tr.$run.%'")" "0" "$tr: nothing quarantined"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
	             WHERE s.topic LIKE 't20.$tr.$run.%'")" "0" "$tr: no dead letters"
done

# eventbus_status(): one row per subscription, counters from this run.
is "$(q -c "SELECT count(*) FROM eventbus_status() st JOIN eventbus.subscriptions s ON st.component = 'subscription ' || s.id
             WHERE s.topic LIKE 't20.%.$run.%'")" "$((2 * NTOPICS))" "eventbus_status() has a row per subscription"
is "$(q -c "SELECT count(*) FROM eventbus_status() st JOIN eventbus.subscriptions s ON st.component = 'subscription ' || s.id
             WHERE s.topic LIKE 't20.%.$run.%' AND st.transport = s.transport AND st.processed = $((PER_TR / NTOPICS)) AND st.failed = 0")" \
	"$((2 * NTOPICS))" "each subscription row: its transport, processed = $((PER_TR / NTOPICS)), failed = 0"
lag_zero() {
	[ "$(q -c "SELECT count(*) FROM eventbus_status() st JOIN eventbus.subscriptions s ON st.component = 'subscription ' || s.id
	            WHERE s.topic LIKE 't20.%.$run.%' AND st.backlog = 0")" = $((2 * NTOPICS)) ]
}
wait_until 30 lag_zero
ok $? "every subscription's lag drops to 0 (offsets committed / messages acked)"
nworkers=$(q -c "SELECT count(*) FROM eventbus_status() WHERE component LIKE 'worker %' AND pid IS NOT NULL")
is "$nworkers" "$(q -c "SHOW eventbus.workers")" "eventbus_status() shows every pool worker"
diag "$(q -c "SELECT string_agg(component || ' processed ' || coalesce(processed::text, '?'), ', ' ORDER BY component) FROM eventbus_status() WHERE component LIKE 'worker %'")"

done_testing
