#!/usr/bin/env bash
# A Kafka broker that does not answer stops nothing else: the dispatcher's
# and the launcher's main threads never wait for a Kafka metadata answer
# (partition look-ups of subscribed topics, the probe while disconnected),
# which would hold up NATS consumption and the NATS relay meanwhile.
#  - The dev broker frozen (SIGSTOP: connections stay open, nothing is
#    answered) and a Kafka topic subscribed, whose partitions the dispatcher
#    then looks up again every second: over 4 s, sampled every 20 ms, the
#    dispatcher's main thread is found waiting in a futex (inside a library
#    call) in at most 5 % of the samples (waiting for the metadata answer,
#    500 ms of every 1.5 s: about a third), while 40 NATS events published
#    meanwhile are all handled; thawed, the topic's partitions are found and
#    a Kafka event published to it is handled.
#  - The dev brokers down (connections refused): the dispatcher and the
#    launcher probe the cluster (backoff 0.5 s to 5 s); over 4 s each main
#    thread is in a futex in at most 5 % of the samples, and after the
#    brokers are up both connect again and events flow on both transports.
# Counted from /proc/PID/wchan (the kernel function a sleeping thread waits
# in) and the database; the NATS events' latency is printed, not judged.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TN="t50.nats.$run"; TK="t50.kafka.$run"
DEVBROKER_PID=$(cat "$EVENTBUS_STATE/kafka/devbroker.pid")

consumer_setup
CONSUMER_CLEANUP="kill -CONT $DEVBROKER_PID; \"$STACK\" kafka-up; unsubscribe_like 't50.%.$run'"

q >/dev/null <<'SQL'
CREATE TABLE IF NOT EXISTS t50_handled (topic text, event_id uuid, occurred_at timestamptz, handled_at timestamptz);
CREATE OR REPLACE FUNCTION t50_handle(e eventbus.envelope) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.t50_handled VALUES (e.topic, e.event_id, e.occurred_at, clock_timestamp())
$$;
SQL
handled() { q -c "SELECT count(DISTINCT event_id) FROM t50_handled WHERE topic = '$1'"; }
publish() { q -c "SELECT eventbus_publish('$1', 'agg-' || $2, 'T50', '{}'::jsonb, transport => '$3')" >/dev/null; }

q -c "SELECT eventbus_subscribe('$TN', 't50_handle(eventbus.envelope)', 'nats')" >/dev/null
publish "$TN" 0 nats
wait_count 60 1 "SELECT count(*) FROM t50_handled WHERE topic = '$TN'" 30 || bail "the NATS subscription does not deliver"

# --- 1. the broker frozen: partition look-ups of a subscribed topic ---
disp=$(dispatcher_pid)
kill -STOP "$DEVBROKER_PID"
q -c "SELECT eventbus_subscribe('$TK', 't50_handle(eventbus.envelope)', 'kafka')" >/dev/null
sleep 1
publish_nats() { publish "$TN" "$1" nats; }
read -r f n < <(main_waits_during "$disp" 4 40 publish_nats)
diag "Kafka frozen, a Kafka topic subscribed: the dispatcher's main thread in a futex in $f of $n samples"
ok "$([ "$f" -le $((n / 20)) ]; echo $?)" "the dispatcher's main thread does not wait for the frozen Kafka broker (at most 5 % of the samples in a futex)"
wait_count 60 41 "SELECT count(*) FROM t50_handled WHERE topic = '$TN'" 30
is "$COUNT" 41 "the NATS events published meanwhile are all handled"
diag "their latency (publish to handler), ms: $(q -c "SELECT format('p50 %s, max %s', round(extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY handled_at - occurred_at)) * 1000),
                                              round(extract(epoch FROM max(handled_at - occurred_at)) * 1000))
                                     FROM t50_handled WHERE topic = '$TN'")"
is "$(dispatcher_pid)" "$disp" "the dispatcher ran throughout"

kill -CONT "$DEVBROKER_PID"
publish "$TK" 1 kafka
wait_count 60 1 "SELECT count(*) FROM t50_handled WHERE topic = '$TK'" 60
is "$COUNT" 1 "thawed: the Kafka topic's partitions are found, and an event published to it is handled"

# --- 2. the brokers down: the probes ---
"$STACK" kafka-down >/dev/null
wait_until 30 "[ \"\$(broker_state kafka)\" = down ] && [ \"\$(consumer_state kafka)\" = down ]" ||
	diag "eventbus_status() did not show Kafka down (launcher: $(broker_state kafka), dispatcher: $(consumer_state kafka))"
launcher=$(launcher_pid)
main_waits "$disp" 4 > "$EVENTBUS_STATE/t50.disp" &
sampler=$!
read -r lf ln < <(main_waits "$launcher" 4)
wait "$sampler"
read -r df dn < "$EVENTBUS_STATE/t50.disp"
rm -f "$EVENTBUS_STATE/t50.disp"
diag "Kafka down, probing: main thread in a futex in $df of $dn samples (dispatcher), $lf of $ln (launcher)"
ok "$([ "$df" -le $((dn / 20)) ]; echo $?)" "the dispatcher's main thread does not wait for the probe of the unreachable cluster (at most 5 % in a futex)"
ok "$([ "$lf" -le $((ln / 20)) ]; echo $?)" "the launcher's main thread does not wait for the probe of the unreachable cluster (at most 5 % in a futex)"

"$STACK" kafka-up >/dev/null
wait_until 60 "both_connected && [ \"\$(consumer_state kafka)\" = connected ]"
ok $? "after the brokers are up, the launcher and the dispatcher connect again (their probes answered)"
publish "$TK" 2 kafka
publish "$TN" 41 nats
wait_count 60 2 "SELECT count(*) FROM t50_handled WHERE topic = '$TK'" 60
is "$COUNT" 2 "a Kafka event published after that is handled"
wait_count 60 42 "SELECT count(*) FROM t50_handled WHERE topic = '$TN'" 30
is "$COUNT" 42 "and a NATS event"
is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t50_handled WHERE topic IN ('$TN', '$TK')")" 0 "each once"

done_testing
