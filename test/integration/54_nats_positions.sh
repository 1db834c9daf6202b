#!/usr/bin/env bash
# Single mode's JetStream durables are AckNone and eventbus keeps their
# positions in the KeyValue bucket eventbus_positions; no message is lost or
# handled twice through that:
#  - the durable is AckNone, and its kept position reaches the last message
#    once everything is handled;
#  - a clean restart brings nothing again (the position is written at stop):
#    the dispatcher receives only the new messages;
#  - kill -9 of the dispatcher mid-burst (slow handler, hundreds of messages
#    delivered but not finished): every event is handled exactly once, in
#    order per aggregate (the position never covers a message whose
#    handlers' commit was not flushed);
#  - switching eventbus.consumer_mode to shared turns the durable into an
#    explicitly acked one at the kept position, and back to single into an
#    AckNone one at its ack floor: nothing comes again either way;
#  - with the kept position deleted by hand, the durable starts again from
#    the stream's first message (a WARNING says so): the inbox skips it all;
#  - with the bucket unusable (sealed, so no position can be written; a
#    stream of its name capturing other subjects), a new
#    subscription's durable is explicitly acked instead, with a WARNING
#    naming the cause (each new cause said again), and its events are
#    handled.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TN="t54.nats.$run"; SN="T54_$run"
BUCKET=eventbus_positions

consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't54.%.$run'; q -c 'ALTER SYSTEM RESET eventbus.consumer_mode' -c 'SELECT pg_reload_conf()'"

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t54_sent, t54_handled;
CREATE TABLE t54_sent (batch text, aggregate_id text, version bigint, event_id uuid);
CREATE TABLE t54_handled (n bigserial, aggregate_id text, version bigint, event_id uuid);
CREATE OR REPLACE FUNCTION t54_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  IF (e.payload ->> 'slow')::boolean THEN PERFORM pg_sleep(0.02); END IF;
  INSERT INTO public.t54_handled (aggregate_id, version, event_id) VALUES (e.aggregate_id, e.event_version, e.event_id);
END $$;
SQL

# send BATCH AGGREGATES VERSIONS FIRST_VERSION SLOW — AGGREGATES x VERSIONS events
send() {
	q -c "INSERT INTO t54_sent SELECT '$1', '$1-' || a, v, gen_random_uuid()
	        FROM generate_series(1, $2) a, generate_series($4, $4 + $3 - 1) v" >/dev/null &&
	produce_sql nats "$TN" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T54', version, '{\"slow\": $5}')
	                        FROM t54_sent WHERE batch = '$1' ORDER BY version, aggregate_id"
}
sent() { q -c "SELECT count(*) FROM t54_sent"; }
handled_distinct() { q -c "SELECT count(DISTINCT event_id) FROM t54_handled"; }
consumed() { q -c "SELECT coalesce(sum(value), 0)::bigint FROM eventbus.metrics WHERE name = 'consumed_total' AND transport = 'nats'"; }
durable() { nats_consumers "$SN" | head -1; }
ack_policy() { "$NATSTOOL" --url "$EVENTBUS_NATS_URL" consumer "$SN" "$(durable)" 2>/dev/null | sed -n 's/^ack=\([a-z]*\) .*/\1/p'; }
kept() { "$NATSTOOL" --url "$EVENTBUS_NATS_URL" kv-get "$BUCKET" "$(durable)" 2>/dev/null; }
last_seq() { "$NATSTOOL" --url "$EVENTBUS_NATS_URL" stream-info "$TN" | sed -n 's/.*"last_seq":\([0-9]*\).*/\1/p'; }
once_in_order() {   # calls/distinct/sent, then aggregates out of order
	q -c "SELECT count(h.event_id) || '/' || count(DISTINCT h.event_id) || '/' || (SELECT count(*) FROM t54_sent)
	        FROM t54_sent s LEFT JOIN t54_handled h USING (event_id)"
	q -c "SELECT count(*) FROM (SELECT aggregate_id, array_agg(version ORDER BY n) vs FROM t54_handled GROUP BY 1) x
	       WHERE vs <> ARRAY(SELECT generate_series(1, array_length(vs, 1))::bigint)"
}
wait_handled() { wait_count "$1" "$(sent)" "SELECT count(DISTINCT event_id) FROM t54_handled" 30; }

# --- single mode: AckNone, position kept ----------------------------------
nats_stream "$SN" "$TN" || bail "could not create the NATS stream"
send a 30 10 1 false
ok $? "produced 300 events"
sub=$(q -c "SELECT eventbus_subscribe('$TN', 't54_handler(eventbus.envelope)', 'nats')")
ok "$([[ $sub =~ ^[0-9]+$ ]]; echo $?)" "subscribed ($sub)"
wait_handled 90
ok $? "all 300 handled ($COUNT)"
is "$(ack_policy)" "none" "the durable $(durable) is AckNone"
wait_until 10 '[ "$(kept)" = "$(last_seq)" ]'
ok $? "its kept position reached the stream's last message ($(kept) of $(last_seq))"

# --- clean restart: nothing comes again -----------------------------------
"$STACK" pg-stop fast >/dev/null && "$STACK" pg-start >/dev/null
ok $? "PostgreSQL restarted (pg_ctl stop -m fast)"
wait_until 60 both_connected && wait_until 60 dispatcher_running &&
	wait_until 30 '[ "$(consumer_state nats)" = connected ]'
ok $? "dispatcher running, NATS consumer connected"
c0=$(consumed)
send b 5 1 1 false
wait_handled 60
ok $? "5 new events handled after the restart"
is "$(( $(consumed) - c0 ))" "5" "the dispatcher received only the 5 new messages (nothing came again)"
is "$(ack_policy)" "none" "the durable is still AckNone"

# --- kill -9 of the dispatcher mid-burst ----------------------------------
base=$(handled_distinct)
send c 60 10 1 true
ok $? "produced 600 more events (slow handler)"
wait_count 60 $((base + 100)) "SELECT count(DISTINCT event_id) FROM t54_handled"
victim=$(dispatcher_pid)
at_kill=$(( $(handled_distinct) - base ))
ok "$([ -n "$victim" ] && [ "$at_kill" -lt 600 ] && kill -9 "$victim"; echo $?)" \
	"kill -9 of the dispatcher (pid ${victim:-none}) after $at_kill of 600"
wait_until 60 both_connected && wait_until 60 dispatcher_running
ok $? "dispatcher running again after the crash"
wait_handled 120
ok $? "every event handled after the crash ($COUNT of $(sent))"
sleep 2
res=$(once_in_order)
is "$(echo "$res" | sed -n 1p)" "$(sent)/$(sent)/$(sent)" "each event handled exactly once (calls/distinct/sent)"
is "$(echo "$res" | sed -n 2p)" "0" "every aggregate's versions in order"
wait_until 10 '[ "$(kept)" = "$(last_seq)" ]'
ok $? "the kept position reached the stream's last message again ($(kept) of $(last_seq))"

# --- consumer_mode shared and back: the durable is converted in place ------
# switch_mode SETTING POLICY BATCH WHAT — set eventbus.consumer_mode (SQL),
# wait for the durable's ack policy, then 50 new events: only they arrive.
switch_mode() {
	q -c "ALTER SYSTEM $1" -c "SELECT pg_reload_conf()" >/dev/null
	wait_until 60 '[ "$(ack_policy)" = '"$2"' ]'
	ok $? "$4: the durable's ack policy is $2 ($(ack_policy))"
	c0=$(consumed)
	send "$3" 10 5 1 false
	wait_handled 60
	ok $? "$4: 50 new events handled"
	is "$(( $(consumed) - c0 ))" "50" "$4: only the 50 new messages received (nothing came again)"
}
switch_mode "SET eventbus.consumer_mode = 'shared'" explicit d "shared mode, from the kept position"
switch_mode "RESET eventbus.consumer_mode" none e "single mode again, from the ack floor"
# --- the kept position deleted by hand: everything comes again, none lost ---
# (once written up to the end: a position still moving is written again at
# the stop, which would bring the key back)
wait_until 10 '[ "$(kept)" = "$(last_seq)" ]' &&
	"$NATSTOOL" --url "$EVENTBUS_NATS_URL" kv-del "$BUCKET" "$(durable)" >/dev/null
ok $? "the durable's kept position, at the last message, deleted from the bucket"
log_from=$(stat -c %s "$EVENTBUS_PG_LOG")
"$STACK" pg-stop fast >/dev/null && "$STACK" pg-start >/dev/null
wait_until 60 both_connected && wait_until 60 dispatcher_running
ok $? "PostgreSQL restarted"
total=$(last_seq)
wait_until 60 '[ "$(consumed)" -ge '"$total"' ]'
ok $? "the whole stream came again from its first message ($(consumed) of $total received)"
tail -c +$((log_from + 1)) "$EVENTBUS_PG_LOG" | grep -q "has no kept position in bucket \"$BUCKET\""
ok $? "a WARNING said so"
wait_until 10 '[ "$(kept)" = "$(last_seq)" ]'
ok $? "the kept position is back at the stream's last message ($(kept) of $(last_seq))"
# --- the bucket unusable: a new subscription falls back to explicit acks ----
# unusable SETUP BATCH NAME WHAT — replace the bucket (SETUP, shell), then a
# new subject with 20 events: its durable is explicitly acked, every event
# handled.  The bucket is deleted again afterwards (the next bind creates it).
KVS=KV_$BUCKET
cleanup_before=$CONSUMER_CLEANUP
CONSUMER_CLEANUP="$CONSUMER_CLEANUP; \"\$NATSTOOL\" --url \"\$EVENTBUS_NATS_URL\" stream-delete $KVS"
unusable() {
	local topic="t54.$3.$run" stream="T54$3_$run" d
	"$NATSTOOL" --url "$EVENTBUS_NATS_URL" stream-delete "$KVS" >/dev/null && eval "$1"
	ok $? "$4: the bucket replaced"
	nats_stream "$stream" "$topic" || bail "could not create the NATS stream of $topic"
	q -c "INSERT INTO t54_sent SELECT '$2', '$2-' || a, v, gen_random_uuid() FROM generate_series(1, 5) a, generate_series(1, 4) v" >/dev/null
	produce_sql nats "$topic" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T54', version, '{\"slow\": false}')
	                           FROM t54_sent WHERE batch = '$2' ORDER BY version, aggregate_id"
	log_from=$(stat -c %s "$EVENTBUS_PG_LOG")
	q -c "SELECT eventbus_subscribe('$topic', 't54_handler(eventbus.envelope)', 'nats')" >/dev/null
	wait_handled 60
	ok $? "$4: a new subject's 20 events handled"
	d=$(nats_consumers "$stream" | head -1)
	wait_until 10 '"$NATSTOOL" --url "$EVENTBUS_NATS_URL" consumer "$stream" "$d" | grep -q "^ack=explicit .* ack_pending=0 "'
	ok $? "$4: its durable is explicitly acked, every message of it acked"
}
unusable "\"\$NATSTOOL\" --url \"\$EVENTBUS_NATS_URL\" kv-add-sealed $BUCKET >/dev/null" f sealed \
	"a bucket that takes no write (sealed)"
tail -c +$((log_from + 1)) "$EVENTBUS_PG_LOG" | grep -A1 "could not use the JetStream KeyValue bucket \"$BUCKET\"" | grep -q "writing key"
ok $? "a WARNING said why (writing the position failed)"
unusable "nats_stream $KVS 't54decoy.$run.>'" g decoy "a stream of the bucket's name capturing other subjects"
# Another cause than the last one said is said again, by the same process.
tail -c +$((log_from + 1)) "$EVENTBUS_PG_LOG" | grep -A1 "could not use the JetStream KeyValue bucket \"$BUCKET\"" | grep -q "opening it"
ok $? "a WARNING said the new cause (the bucket could not be opened)"
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" stream-delete "$KVS" >/dev/null
ok $? "the replacement deleted (the next bind creates the bucket again)"
CONSUMER_CLEANUP=$cleanup_before

sleep 1
res=$(once_in_order)
is "$(echo "$res" | sed -n 1p)" "$(sent)/$(sent)/$(sent)" "in all, each event handled exactly once"
is "$(echo "$res" | sed -n 2p)" "0" "in all, every aggregate's versions in order"

done_testing
