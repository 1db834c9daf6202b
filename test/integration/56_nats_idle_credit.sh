#!/usr/bin/env bash
# Idle JetStream subscriptions do not starve a busy one (issue: performance).
# Every bound subject keeps a pull request open, and what an open request
# may still bring counts against the dispatcher's budget of messages in
# flight.  With 40 idle subjects their requests held all of it, so a
# subject that then had a backlog got no request until an idle one expired
# (10 s), then requests for a message or a few, renewed as each flushed
# (about 10 ms): its events came one by one, a handler transaction each.
#
# 40 NATS subscriptions, bound (one event each, handled), then idle; 200
# events of 20 aggregates published to a new subject and relayed before it
# is subscribed.  An independent client (natstool listen) records the pull
# requests sent for the new subject's durable while its backlog is
# consumed.  Counted, not timed: every event handled once and in order,
# and the backlog asked for in a few requests, not one per message.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
NIDLE=40
AGGS=20
PER_AGG=10
EVENTS=$((AGGS * PER_AGG))
MAX_REQUESTS=10
topic() { echo "t56.nats.$run.$1"; }
busy=$(topic busy)

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't56.nats.$run.%'"

q -v ON_ERROR_STOP=1 >/dev/null <<SQL || bail "could not create the handler"
CREATE TABLE IF NOT EXISTS t56_handled (
    id bigserial, topic text, aggregate_id text, version bigint, event_id uuid,
    tx xid8 DEFAULT pg_current_xact_id());
CREATE OR REPLACE FUNCTION t56_handle(e eventbus.envelope) RETURNS void LANGUAGE sql AS \$\$
  INSERT INTO public.t56_handled (topic, aggregate_id, version, event_id)
  VALUES (e.topic, e.aggregate_id, e.event_version, e.event_id)
\$\$;
SQL

# The idle subjects: bound (each delivered its event), then nothing more.
q -c "SELECT count(eventbus_subscribe('$(topic idle).' || i, 't56_handle(eventbus.envelope)', 'nats'))
        FROM generate_series(1, $NIDLE) i" >/dev/null
q -c "SELECT count(eventbus_publish('$(topic idle).' || i, 'agg-' || i, 'T56', '{}'::jsonb, transport => 'nats'))
        FROM generate_series(1, $NIDLE) i" >/dev/null
wait_count 120 $NIDLE "SELECT count(DISTINCT topic) FROM t56_handled WHERE topic LIKE '$(topic idle).%'" 60
is "$COUNT" $NIDLE "each of the $NIDLE idle subjects delivered its event (consumers bound)"

# The backlog: in the new subject's stream before anyone consumes it.
q -c "SELECT count(eventbus_publish('$busy', 'agg-' || a, 'T56', '{}'::jsonb, transport => 'nats'))
        FROM generate_series(1, $PER_AGG) v, generate_series(1, $AGGS) a" >/dev/null
wait_until 60 "[ \"\$(q -c \"SELECT count(*) FROM eventbus.outbox WHERE topic = '$busy'\")\" = 0 ]" ||
	bail "the backlog was not relayed"

requests=$(mktemp)
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" listen '$JS.API.CONSUMER.MSG.NEXT.>' 120 data > "$requests" &
listener=$!
sleep 1   # the listener's subscription is in place (it flushes it before reading)
q -c "SELECT eventbus_subscribe('$busy', 't56_handle(eventbus.envelope)', 'nats')" >/dev/null
wait_count 120 $EVENTS "SELECT count(*) FROM t56_handled WHERE topic = '$busy'" 60
kill "$listener" 2>/dev/null; wait "$listener" 2>/dev/null

is "$(q -c "SELECT count(DISTINCT event_id) FROM t56_handled WHERE topic = '$busy'")" $EVENTS \
	"all $EVENTS events of the backlog handled"
is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t56_handled WHERE topic = '$busy'")" 0 "each once"
is "$(q -c "SELECT count(*) FROM (SELECT version - lag(version) OVER (PARTITION BY aggregate_id ORDER BY id) AS step
                                   FROM t56_handled WHERE topic = '$busy') s WHERE step <> 1")" 0 \
	"each aggregate's events in order"

durable=$(echo "$busy" | tr . _)
n=$(grep -cP "_${durable}_[0-9a-f]{8}\t" "$requests")
asked=$(grep -P "_${durable}_[0-9a-f]{8}\t" "$requests" | sed -n 's/.*"batch":\([0-9]*\).*/\1/p' | paste -sd' ')
tx=$(q -c "SELECT count(DISTINCT tx) FROM t56_handled WHERE topic = '$busy'")
diag "pull requests for the busy subject: $n, asking for ($asked) messages; its $EVENTS events ran in $tx handler transactions"
ok "$([ "$n" -ge 1 ] && [ "$n" -le $MAX_REQUESTS ]; echo $?)" \
	"the backlog of $EVENTS was asked for in at most $MAX_REQUESTS pull requests ($n), next to $NIDLE idle subjects"
rm -f "$requests"

done_testing
