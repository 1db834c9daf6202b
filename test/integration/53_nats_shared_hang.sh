#!/usr/bin/env bash
# JetStream shared mode (eventbus.consumer_mode = shared): a NATS server
# that hangs stops nothing else.  The lease requests (refreshing the leases
# held, reading and taking a stand-by's, opening the lease bucket, releasing)
# run on helper threads, so the dispatcher's main thread never waits for
# their answers, which would hold up Kafka consumption, the hand-over to the
# pool and the acknowledgements for as long as NATS hung (each request waits
# its 1 s timeout, and every held lease is refreshed every few seconds).
#  - three NATS subjects held here and a Kafka topic, all delivering; then
#    nats-server frozen (SIGSTOP: connections stay open, nothing is
#    answered) and a fourth NATS subject subscribed (a stand-by that tries
#    to take its lease): over 8 s (longer than the fence, after which the
#    held leases are given up and tried again), sampled every 20 ms, the
#    dispatcher's main thread is found waiting in a futex (inside a library
#    call) in at most 5 % of the samples, while 60 Kafka events published
#    meanwhile are all handled;
#  - thawed: the leases are taken again (they are this instance's), and an
#    event published to each of the four subjects is handled, every event
#    once.
# Counted from /proc/PID/wchan and the database.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t53.kafka.$run"
GROUP="t53g$run"
NATS_PID=$(cat "$EVENTBUS_STATE/nats/nats.pid")

consumer_setup
# Back to single mode; the next test starts once the dispatcher restarted in it.
SHARED_DISP=
t53_cleanup() {
	kill -CONT "$NATS_PID"
	unsubscribe_like "t53.%.$run"
	q -c 'ALTER SYSTEM RESET eventbus.consumer_group' -c 'ALTER SYSTEM RESET eventbus.consumer_mode' -c 'SELECT pg_reload_conf()'
	[ -z "$SHARED_DISP" ] || wait_until 60 "[ -n \"\$(dispatcher_pid)\" ] && [ \"\$(dispatcher_pid)\" != '$SHARED_DISP' ]"
}
CONSUMER_CLEANUP=t53_cleanup

q >/dev/null <<'SQL'
CREATE TABLE IF NOT EXISTS t53_handled (topic text, event_id uuid);
CREATE OR REPLACE FUNCTION t53_handle(e eventbus.envelope) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.t53_handled VALUES (e.topic, e.event_id)
$$;
SQL
publish() { q -c "SELECT eventbus_publish('$1', 'agg-' || $2, 'T53', '{}'::jsonb, transport => '$3')" >/dev/null; }
subscribe() { q -c "SELECT eventbus_subscribe('$1', 't53_handle(eventbus.envelope)', '$2')" >/dev/null; }

old=$(dispatcher_pid)
q -c "ALTER SYSTEM SET eventbus.consumer_group = '$GROUP'" -c "ALTER SYSTEM SET eventbus.consumer_mode = 'shared'" \
	-c "SELECT pg_reload_conf()" >/dev/null
wait_until 60 "[ -n \"\$(dispatcher_pid)\" ] && [ \"\$(dispatcher_pid)\" != '$old' ]" || bail "the dispatcher did not restart in shared mode"
SHARED_DISP=$(dispatcher_pid)
wait_until 30 both_connected || bail "brokers not connected"

subscribe "$TK" kafka
for s in 1 2 3; do subscribe "t53.nats$s.$run" nats; done
publish "$TK" 0 kafka
for s in 1 2 3; do publish "t53.nats$s.$run" 0 nats; done
wait_count 90 4 "SELECT count(*) FROM t53_handled WHERE topic LIKE 't53.%.$run'" 90 ||
	bail "the subscriptions do not deliver (handled: $COUNT of 4)"

disp=$(dispatcher_pid)
kill -STOP "$NATS_PID"
subscribe "t53.nats4.$run" nats
publish_kafka() { publish "$TK" "$1" kafka; }
read -r df dn < <(main_waits_during "$disp" 8 60 publish_kafka)
diag "NATS frozen: the dispatcher's main thread in a futex in $df of $dn samples"
ok "$([ "$df" -le $((dn / 20)) ]; echo $?)" "the dispatcher's main thread does not wait for the frozen NATS server's lease answers (at most 5 % of the samples in a futex)"
wait_count 60 61 "SELECT count(*) FROM t53_handled WHERE topic = '$TK'" 30
is "$COUNT" 61 "the Kafka events published meanwhile are all handled"
is "$(dispatcher_pid)" "$disp" "the dispatcher ran throughout"

kill -CONT "$NATS_PID"
for s in 1 2 3 4; do publish "t53.nats$s.$run" 1 nats; done
wait_count 120 7 "SELECT count(*) FROM t53_handled WHERE topic LIKE 't53.nats%.$run'" 120
is "$COUNT" 7 "thawed: the leases are taken again, and an event published to each of the four NATS subjects is handled"
is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t53_handled WHERE topic LIKE 't53.%.$run'")" 0 "each once"

done_testing
