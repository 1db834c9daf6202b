#!/usr/bin/env bash
# Subscribing and unsubscribing while the system runs, on both transports.
#  1. 200 events are produced to a new topic BEFORE anyone subscribes; then
#     handler 'main' (and a control handler) subscribe: all 200, and 50
#     produced afterwards, are handled once each, in order, with no restart.
#  2. 'main' unsubscribes; 20 more events: the control subscription on the
#     same topic handles them (so they were consumed), 'main' does not.
#  3. A subscription to a topic that does not exist yet (no Kafka topic, no
#     JetStream stream): events published later with eventbus_publish reach it.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
NAGGS=20

consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't27.%.$run'"
launcher0=$(launcher_pid)

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t27_sent, t27_handled;
CREATE TABLE t27_sent (batch text, transport text, aggregate_id text, version bigint, event_id uuid);
CREATE TABLE t27_handled (n bigserial, sub text, transport text, topic text, aggregate_id text, version bigint, event_id uuid);
CREATE OR REPLACE FUNCTION t27_record(sub text, e eventbus.envelope) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.t27_handled (sub, transport, topic, aggregate_id, version, event_id)
  VALUES (sub, e.transport, e.topic, e.aggregate_id, e.event_version, e.event_id)
$$;
CREATE OR REPLACE FUNCTION t27_main(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM public.t27_record('main', e); END $$;
CREATE OR REPLACE FUNCTION t27_control(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM public.t27_record('control', e); END $$;
CREATE OR REPLACE FUNCTION t27_fresh(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM public.t27_record('fresh', e); END $$;
SQL
for tr in kafka nats; do
	q >/dev/null <<SQL
INSERT INTO t27_sent SELECT 'before', '$tr', 'item-' || a, v, gen_random_uuid() FROM generate_series(1, $NAGGS) a, generate_series(1, 10) v;
INSERT INTO t27_sent SELECT 'after', '$tr', 'item-' || a, 11, gen_random_uuid() FROM generate_series(1, $NAGGS) a;
INSERT INTO t27_sent SELECT 'after', '$tr', 'late-' || a, v, gen_random_uuid() FROM generate_series(1, 15) a, generate_series(1, 2) v;
INSERT INTO t27_sent SELECT 'unsubscribed', '$tr', 'item-' || a, 12, gen_random_uuid() FROM generate_series(1, $NAGGS) a;
SQL
done
send() {   # send BATCH
	local tr rc=0
	for tr in kafka nats; do
		produce_sql $tr "t27.$tr.$run" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T27Happened', version, '{}')
		                                  FROM t27_sent WHERE batch = '$1' AND transport = '$tr' ORDER BY version, aggregate_id" || rc=1
	done
	return $rc
}
# handled SUB BATCH [TRANSPORT] — calls of SUB for events of BATCH
handled() {
	q -c "SELECT count(*) FROM t27_handled h JOIN t27_sent s USING (event_id) WHERE h.sub = '$1' AND s.batch = '$2' ${3:+AND s.transport = '$3'}"
}
once() {   # once SUB BATCH TRANSPORT — "calls/distinct/sent"
	q -c "SELECT count(h.event_id) || '/' || count(DISTINCT h.event_id) || '/' || count(DISTINCT s.event_id)
	        FROM t27_sent s LEFT JOIN t27_handled h ON h.event_id = s.event_id AND h.sub = '$1'
	       WHERE s.batch = '$2' AND s.transport = '$3'"
}
in_order() {   # in_order SUB TRANSPORT — aggregates whose versions are not 1..k in handler order
	q -c "SELECT count(*) FROM (SELECT aggregate_id, array_agg(version ORDER BY n) vs FROM t27_handled
	                            WHERE sub = '$1' AND transport = '$2' AND topic = 't27.$2.$run' GROUP BY 1) x
	       WHERE vs <> ARRAY(SELECT generate_series(1, array_length(vs, 1))::bigint)"
}

# --- 1. produced before subscribing, then live ------------------------------
nats_stream "T27_$run" "t27.nats.$run" || bail "could not create the NATS stream"
send before
ok $? "200 events per transport produced before any subscription"
t0=$SECONDS
ids=$(q -c "SELECT eventbus_subscribe('t27.kafka.$run', 't27_main(eventbus.envelope)', 'kafka'),
                   eventbus_subscribe('t27.kafka.$run', 't27_control(eventbus.envelope)', 'kafka'),
                   eventbus_subscribe('t27.nats.$run', 't27_main(eventbus.envelope)', 'nats'),
                   eventbus_subscribe('t27.nats.$run', 't27_control(eventbus.envelope)', 'nats')")
IFS="|" read -r MAIN_kafka _ MAIN_nats _ <<<"$ids"
ok "$([[ $ids =~ ^[0-9]+\|[0-9]+\|[0-9]+\|[0-9]+$ ]]; echo $?)" "subscribed main and control on both transports ($ids)"
wait_until 60 '[ "$(handled main before)" -ge 400 ]'
ok $? "the 200 earlier events per transport were handled after subscribing"
diag "subscribe to all 400 handled: $((SECONDS - t0)) s"
send after
ok $? "50 more events per transport produced"
wait_until 60 '[ "$(handled main after)" -ge 100 ] && [ "$(handled control after)" -ge 100 ]'
ok $? "the 50 later events per transport were handled"
sleep 2
for tr in kafka nats; do
	is "$(once main before $tr)" "200/200/200" "$tr main: the 200 events produced before subscribing, each handled once"
	is "$(once main after $tr)" "50/50/50" "$tr main: the 50 produced afterwards, each handled once"
	is "$(once control before $tr)|$(once control after $tr)" "200/200/200|50/50/50" "$tr control: the same 250, each once"
	is "$(in_order main $tr)|$(in_order control $tr)" "0|0" "$tr: per aggregate versions in order for both subscriptions"
done
is "$(launcher_pid)" "$launcher0" "no restart: same launcher process"

# --- 2. unsubscribe ---------------------------------------------------------
for tr in kafka nats; do
	is "$(q -c "SELECT eventbus_unsubscribe('t27.$tr.$run', 't27_main(eventbus.envelope)', '$tr')")" "t" "$tr: unsubscribe main returns true"
	is "$(q -c "SELECT eventbus_unsubscribe('t27.$tr.$run', 't27_main(eventbus.envelope)', '$tr')")" "f" "$tr: a second unsubscribe returns false"
done
is "$(q -c "SELECT count(*) FROM eventbus.subscriptions WHERE id IN ($MAIN_kafka, $MAIN_nats)")|$(q -c "SELECT count(*) FROM eventbus.inbox WHERE subscription_id IN ($MAIN_kafka, $MAIN_nats)")" \
	"0|0" "main's subscription rows and inbox rows are gone"
wait_until 10 '[ "$(q -c "SELECT count(*) FROM eventbus_status() WHERE component IN ('"'subscription $MAIN_kafka', 'subscription $MAIN_nats'"')")" = 0 ]'
ok $? "eventbus_status() no longer lists main's subscriptions"
send unsubscribed
ok $? "20 more events per transport produced after unsubscribing"
wait_until 60 '[ "$(handled control unsubscribed)" -ge 40 ]'
ok $? "the control subscription handled them (the topic is still consumed)"
sleep 2
for tr in kafka nats; do
	is "$(handled main unsubscribed $tr)" "0" "$tr: the unsubscribed handler did not run for them"
	is "$(once control unsubscribed $tr)" "20/20/20" "$tr control: each handled once"
	is "$(in_order control $tr)" "0" "$tr control: still in order"
done

# --- 3. subscribed before the topic exists ---------------------------------
ids=$(q -c "SELECT eventbus_subscribe('t27.fresh.kafka.$run', 't27_fresh(eventbus.envelope)', 'kafka'),
                   eventbus_subscribe('t27.fresh.nats.$run', 't27_fresh(eventbus.envelope)', 'nats')")
ok "$([[ $ids =~ ^[0-9]+\|[0-9]+$ ]]; echo $?)" "subscribed to topics that do not exist yet ($ids)"
sleep 2
q -c "SELECT eventbus_publish('t27.fresh.' || tr || '.$run', 'fresh-' || a, 'T27Fresh', jsonb_build_object('a', a), tr)
        FROM generate_series(1, 10) a, generate_series(1, 3) v, unnest(ARRAY['kafka', 'nats']) tr ORDER BY v, a" >/dev/null
ok $? "30 events per transport published with eventbus_publish"
wait_until 90 '[ "$(q -c "SELECT count(*) FROM t27_handled WHERE sub = '"'fresh'"'")" -ge 60 ]'
ok $? "events on the new topics reached the handler"
sleep 2
for tr in kafka nats; do
	is "$(q -c "SELECT count(*) || '/' || count(DISTINCT event_id) FROM t27_handled WHERE sub = 'fresh' AND transport = '$tr'")" "30/30" \
		"$tr fresh: 30 handled, each once"
	is "$(q -c "SELECT count(*) FROM (SELECT aggregate_id, array_agg(version ORDER BY n) vs FROM t27_handled WHERE sub = 'fresh' AND transport = '$tr' GROUP BY 1) x
	             WHERE vs <> '{1,2,3}'")" "0" "$tr fresh: versions 1..3 in order per aggregate"
done
is "$(launcher_pid)" "$launcher0" "no restart at any point: same launcher process"

done_testing
