#!/usr/bin/env bash
# A NATS server that hangs stops nothing else: JetStream API requests
# (creating a stream, binding a durable consumer) run on helper threads, so
# the dispatcher's and the launcher's main threads never wait for their
# answers, which would hold up Kafka consumption and the Kafka relay
# meanwhile.  A server that hangs (or a network that drops packets) keeps
# the connection up for minutes, and each request waits its 5 s timeout.
#  - nats-server frozen (SIGSTOP: connections stay open, nothing is
#    answered), then a NATS subscription to a new subject (the dispatcher
#    binds its durable) and 50 events (50 aggregates) published to another
#    new subject (the relay creates its stream, and tries each event again
#    as its aggregate's backoff ends): over 4 s, sampled every 20 ms, each main
#    thread is found waiting in a futex (inside a library call) in at most
#    5 % of the samples (the binds and stream creations on it: most of
#    them), while 40 Kafka events published meanwhile are all handled;
#  - thawed: the subscription binds and the NATS events are handled, every
#    event once.
# Counted from /proc/PID/wchan and the database; the Kafka events' latency
# is printed, not judged.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t51.kafka.$run"; TN="t51.nats.$run"; TN2="t51.nats2.$run"
NATS_PID=$(cat "$EVENTBUS_STATE/nats/nats.pid")

consumer_setup
CONSUMER_CLEANUP="kill -CONT $NATS_PID; unsubscribe_like 't51.%.$run'"

q >/dev/null <<'SQL'
CREATE TABLE IF NOT EXISTS t51_handled (topic text, event_id uuid, occurred_at timestamptz, handled_at timestamptz);
CREATE OR REPLACE FUNCTION t51_handle(e eventbus.envelope) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.t51_handled VALUES (e.topic, e.event_id, e.occurred_at, clock_timestamp())
$$;
SQL
publish() { q -c "SELECT eventbus_publish('$1', 'agg-' || $2, 'T51', '{}'::jsonb, transport => '$3')" >/dev/null; }
handled() { q -c "SELECT count(*) FROM t51_handled WHERE topic = '$1'"; }

q -c "SELECT eventbus_subscribe('$TK', 't51_handle(eventbus.envelope)', 'kafka')" >/dev/null
publish "$TK" 0 kafka
wait_count 60 1 "SELECT count(*) FROM t51_handled WHERE topic = '$TK'" 60 || bail "the Kafka subscription does not deliver"

disp=$(dispatcher_pid); launcher=$(launcher_pid)
kill -STOP "$NATS_PID"
q -c "SELECT eventbus_subscribe('$TN', 't51_handle(eventbus.envelope)', 'nats')" >/dev/null
q -c "SELECT count(eventbus_publish('$TN2', 'agg-' || g, 'T51', '{}'::jsonb, transport => 'nats')) FROM generate_series(1, 50) g" >/dev/null
q -c "SELECT eventbus_subscribe('$TN2', 't51_handle(eventbus.envelope)', 'nats')" >/dev/null
sleep 1
main_waits "$launcher" 4 > "$EVENTBUS_STATE/t51.launcher" &
sampler=$!
publish_kafka() { publish "$TK" "$1" kafka; }
read -r df dn < <(main_waits_during "$disp" 4 40 publish_kafka)
wait "$sampler"
read -r lf ln < "$EVENTBUS_STATE/t51.launcher"
rm -f "$EVENTBUS_STATE/t51.launcher"
diag "NATS frozen: main thread in a futex in $df of $dn samples (dispatcher), $lf of $ln (launcher)"
ok "$([ "$df" -le $((dn / 20)) ]; echo $?)" "the dispatcher's main thread does not wait for the frozen NATS server (at most 5 % of the samples in a futex)"
ok "$([ "$lf" -le $((ln / 20)) ]; echo $?)" "the launcher's main thread does not wait for the frozen NATS server (at most 5 % of the samples in a futex)"
wait_count 60 41 "SELECT count(*) FROM t51_handled WHERE topic = '$TK'" 30
is "$COUNT" 41 "the Kafka events published meanwhile are all handled"
diag "their latency (publish to handler), ms: $(q -c "SELECT format('p50 %s, max %s', round(extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY handled_at - occurred_at)) * 1000),
                                              round(extract(epoch FROM max(handled_at - occurred_at)) * 1000))
                                     FROM t51_handled WHERE topic = '$TK' AND occurred_at > now() - interval '1 minute'")"
is "$(dispatcher_pid)/$(launcher_pid)" "$disp/$launcher" "the dispatcher and the launcher ran throughout"

kill -CONT "$NATS_PID"
publish "$TN" 2 nats
wait_count 90 1 "SELECT count(*) FROM t51_handled WHERE topic = '$TN'" 90
is "$COUNT" 1 "thawed: the NATS subscription binds, and an event published to it is handled"
wait_count 90 50 "SELECT count(*) FROM t51_handled WHERE topic = '$TN2'" 90
is "$COUNT" 50 "the 50 NATS events published while the server was frozen (their stream created since) are handled"
is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t51_handled WHERE topic IN ('$TK', '$TN', '$TN2')")" 0 "each once"

done_testing
