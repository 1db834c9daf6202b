#!/usr/bin/env bash
# Kafka topics subscribed together are found together: the dispatcher learns
# their partitions with one metadata request, not one request per topic one
# after another.  Each request may wait behind a fetch the broker holds (up
# to fetch.wait.max.ms, 500 ms by librdkafka's default), so 20 topics looked
# up in turn took seconds before the last one was consumed.
#  - 20 Kafka topics, each with one event already in the broker (relayed
#    before anyone subscribed), then subscribed in one statement: every
#    event is handled once, and eventbus.metrics' topic_lookups_total grew
#    by at most 3 meanwhile (one for the 20, and room for the periodic
#    recheck of topics other tests left subscribed; one request per topic
#    is 20).
# Counted from eventbus.metrics and the database.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
N=20

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't52.%.$run'"

q >/dev/null <<'SQL'
CREATE TABLE IF NOT EXISTS t52_handled (topic text, event_id uuid);
CREATE OR REPLACE FUNCTION t52_handle(e eventbus.envelope) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.t52_handled VALUES (e.topic, e.event_id)
$$;
SQL
lookups() { q -c "SELECT value::bigint FROM eventbus.metrics WHERE name = 'topic_lookups_total' AND transport = 'kafka'"; }

# The topics exist, each with its event, before the subscriptions.
q -c "SELECT count(eventbus_publish('t52.' || g || '.$run', 'agg-' || g, 'T52', '{}'::jsonb, transport => 'kafka'))
        FROM generate_series(1, $N) g" >/dev/null
wait_until 60 "[ \"\$(q -c \"SELECT count(*) FROM eventbus.outbox WHERE topic LIKE 't52.%.$run'\")\" = 0 ]" ||
	bail "the relay did not send the events"

before=$(lookups)
is "$(q -c "SELECT count(eventbus_subscribe('t52.' || g || '.$run', 't52_handle(eventbus.envelope)', 'kafka'))
              FROM generate_series(1, $N) g")" "$N" "$N Kafka topics subscribed in one statement"
wait_count 60 "$N" "SELECT count(*) FROM t52_handled WHERE topic LIKE 't52.%.$run'" 30
is "$COUNT" "$N" "the event of each of the $N topics is handled"
is "$(q -c "SELECT count(DISTINCT event_id) FROM t52_handled WHERE topic LIKE 't52.%.$run'")" "$N" "each once"
after=$(lookups)
diag "topic_lookups_total: $before before the subscriptions, $after after"
ok "$([ -n "$before" ] && [ -n "$after" ] && [ $((after - before)) -ge 1 ] && [ $((after - before)) -le 3 ]; echo $?)" \
	"the $N topics' partitions were looked up together ($((after - before)) metadata requests; one per topic would be $N)"

done_testing
