#!/usr/bin/env bash
# Events that can never be delivered.  Refused at publish: an invalid NATS
# subject, an envelope over the transport's message size (control
# characters escaped as \u0001 make a small jsonb a large envelope).  Failing
# for good at the real broker (a JetStream stream's max_msg_size; Kafka's
# message.max.bytes lowered after the event was written): the row moves to
# eventbus.undeliverable, the events of 100 other aggregates published before
# and after it are all delivered, the later events of its aggregate wait
# behind it, a retry after fixing the cause delivers them all in order, and
# discard removes them.  Read back from the brokers with kcat / natstool.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TN="t17n.$run"; TK="t17k.$run"; STREAM="T17_$run"
OLD_KAFKA_PROPS=$(q -c "SHOW eventbus.kafka_properties")
restore_kafka_props() {
	q -c "ALTER SYSTEM SET eventbus.kafka_properties = '${OLD_KAFKA_PROPS//\'/\'\'}'" >/dev/null 2>&1
	q -c "SELECT pg_reload_conf()" >/dev/null 2>&1
}
trap restore_kafka_props EXIT

load_wire_functions; publish_log_setup t17_pub
wait_until 30 both_connected || bail "brokers not connected"
logged_publish_setup t17_publish t17_pub T17
und() { q -c "SELECT count(*) FROM eventbus.undeliverable WHERE topic = '$1' ${2:-}"; }
on_wire() {   # on_wire TR TOPIC AGGREGATE — events of AGGREGATE the broker holds, versions in order
	if [ "$1" = kafka ]; then wire_kafka "$2" t17_w; else wire_nats "$2" t17_w; fi
	q -c "SELECT coalesce(string_agg(env->>'event_version', ',' ORDER BY part, pos), '') FROM t17_w WHERE key = '$3'"
}
# others_check TR TOPIC — the other aggregates' events: all there, once, in order.
others_check() {
	q -c "DROP TABLE IF EXISTS t17o_pub; CREATE TABLE t17o_pub AS SELECT * FROM t17_pub WHERE topic = '$2' AND aggregate_id LIKE 'other-%'" >/dev/null
	if [ "$1" = kafka ]; then wire_kafka "$2" t17o_wire_kafka; nparts=$(kafka_partitions "$2")
	else wire_nats "$2" t17o_wire_nats; nparts=0; fi
	q -c "DELETE FROM t17o_wire_$1 WHERE key NOT LIKE 'other-%'" >/dev/null
	check "t17o_wire_$1" t17o_pub "$nparts"
}
# the coprocess's transaction has published and waits
open_publish() {
	[ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE '%t17_publish(''kafka''%'")" = 1 ]
}
# kafka_reconnected_since TS — the relay's Kafka producer was recreated after TS
kafka_reconnected_since() {
	[ "$(q -c "SELECT state = 'connected' AND since > '$1' FROM eventbus_status() WHERE component = 'launcher' AND transport = 'kafka'")" = t ]
}
publish_others() {   # publish_others TR TOPIC PHASE — one event for each of 100 aggregates
	q -c "SELECT count(t17_publish('$1', '$2', 'other-' || g, jsonb_build_object('g', g, 'phase', '$3'))) FROM generate_series(1, 100) g" >/dev/null
}

# --- 1. refused at publish (each of these was accepted before, then stuck) ---
outbox0=$(q -c "SELECT count(*) FROM eventbus.outbox")
is "$(sqlstate_of "SELECT eventbus_publish('hz..bad', 'a-1', 'T', '{}', 'nats')")" 22023 "NATS subject with an empty token (hz..bad) refused: 22023"
is "$(sqlstate_of "SELECT eventbus_publish('.hz', 'a-1', 'T', '{}', 'nats')")" 22023 "NATS subject starting with '.' refused: 22023"
is "$(sqlstate_of "SELECT eventbus_publish('hz.', 'a-1', 'T', '{}', 'nats')")" 22023 "NATS subject ending with '.' refused: 22023"
is "$(sqlstate_of "SELECT eventbus_publish('..', 'a-1', 'T', '{}', 'kafka')")" 22023 "Kafka topic '..' refused: 22023"
for tr in kafka nats; do
	is "$(sqlstate_of "SELECT eventbus_publish('t17.big', 'a-1', 'T', to_jsonb(repeat(chr(1), 300000)), '$tr')")" 54000 \
		"$tr: 300,000 x chr(1) (small as jsonb, 1.8 MB as envelope) refused: 54000"
done
is "$(q -c "SELECT count(*) FROM eventbus.outbox")" "$outbox0" "nothing written by the refused publishes"

# --- 2. NATS: the stream refuses a message larger than its max_msg_size ---
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" ensure-stream "$STREAM" "$TN" >/dev/null &&
	"$NATSTOOL" --url "$EVENTBUS_NATS_URL" set-max-msg-size "$STREAM" 4096 >/dev/null
ok $? "stream $STREAM for $TN with max_msg_size 4096"
t0=$SECONDS
publish_others nats "$TN" before
q -c "SELECT t17_publish('nats', '$TN', 'stuck', jsonb_build_object('blob', repeat('n', 6000)))" >/dev/null
q -c "SELECT t17_publish('nats', '$TN', 'stuck', '{\"n\": 2}')" >/dev/null
publish_others nats "$TN" after
wait_outbox_empty 60
ok $? "outbox drained: delivered or moved aside"
diag "nats: drained in $((SECONDS - t0)) s"
is "$(und "$TN" "AND held_behind IS NULL AND error LIKE '%10054%'")" 1 "nats: the oversized event is undeliverable (JetStream 10054, message size exceeds maximum)"
is "$(und "$TN" "AND held_behind IS NOT NULL")" 1 "nats: its aggregate's later event waits behind it"
r=$(others_check nats "$TN"); diag "nats others: $r"
is "$(field "$r" published)/$(field "$r" missing)/$(field "$r" duplicates)/$(field "$r" order_violations)" "200/0/0/0" \
	"nats: all 200 events of the 100 other aggregates delivered once, in order (published/missing/dup/order)"
is "$(on_wire nats "$TN" stuck)" "" "nats: nothing of the stuck aggregate reached the broker"
st=$(q -c "SELECT state || ' ' || backlog || ' ' || failed FROM eventbus_status() WHERE component = 'undeliverable' AND transport = 'nats'")
is "$st" "holding 2 1" "eventbus_status(): undeliverable nats row (state, events, failed ones)"

q -c "SELECT t17_publish('nats', '$TN', 'stuck', '{\"n\": 3}')" >/dev/null
publish_others nats "$TN" later
wait_outbox_empty 30
is "$(und "$TN" "AND held_behind IS NOT NULL")" 2 "nats: an event of the stuck aggregate published later waits too"
is "$(on_wire nats "$TN" stuck)" "" "nats: still nothing of the stuck aggregate on the broker"

"$NATSTOOL" --url "$EVENTBUS_NATS_URL" set-max-msg-size "$STREAM" -1 >/dev/null
held=$(q -c "SELECT min(id) FROM eventbus.undeliverable WHERE topic = '$TN' AND held_behind IS NOT NULL")
is "$(q -c "SELECT eventbus_retry_undeliverable($held)")" 3 "nats: retry (of a waiting event) moves its whole aggregate back: 3 events"
wait_outbox_empty 30
is "$(on_wire nats "$TN" stuck)" "1,2,3" "nats: after the fix, the stuck aggregate's events delivered once, in order"
is "$(und "$TN")" 0 "nats: nothing left undeliverable"

# --- 3. discard ---
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" set-max-msg-size "$STREAM" 4096 >/dev/null
for a in drop-all drop-one; do
	q -c "SELECT t17_publish('nats', '$TN', '$a', jsonb_build_object('blob', repeat('d', 6000)))" >/dev/null
	q -c "SELECT t17_publish('nats', '$TN', '$a', '{\"n\": 2}')" >/dev/null
done
wait_outbox_empty 30
is "$(und "$TN")" 4 "two more aggregates stuck (a failed event and one waiting each)"
head_all=$(q -c "SELECT id FROM eventbus.undeliverable WHERE aggregate_id = 'drop-all' AND held_behind IS NULL AND topic = '$TN'")
head_one=$(q -c "SELECT id FROM eventbus.undeliverable WHERE aggregate_id = 'drop-one' AND held_behind IS NULL AND topic = '$TN'")
is "$(q -c "SELECT eventbus_discard_undeliverable($head_all, include_later => true)")" 2 "discard with include_later removes the event and the one behind it"
is "$(q -c "SELECT eventbus_discard_undeliverable($head_one)")" 1 "discard of the failed event alone"
wait_outbox_empty 30
is "$(und "$TN")" 0 "nothing left undeliverable after the discards"
is "$(on_wire nats "$TN" drop-all)" "" "discarded aggregate: nothing delivered"
is "$(on_wire nats "$TN" drop-one)" "2" "the event that waited behind the discarded one is delivered"
is "$(sqlstate_of "SELECT eventbus_retry_undeliverable($head_one)")" 42704 "retry of an id no longer there: 42704"
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" set-max-msg-size "$STREAM" -1 >/dev/null

# --- 4. Kafka: message.max.bytes lowered after the event was committed ---
t0=$SECONDS
publish_others kafka "$TK" before
wait_outbox_empty 30
coproc PUB { psql -X -q -A -t -v ON_ERROR_STOP=1 2>&1; }
echo "BEGIN; SELECT t17_publish('kafka', '$TK', 'stuck', jsonb_build_object('blob', repeat('k', 20000)));" >&"${PUB[1]}"
wait_until 10 open_publish
ok $? "the 20 kB event is published in an open transaction"
since=$(q -c "SELECT clock_timestamp()")
q -c "ALTER SYSTEM SET eventbus.kafka_properties = '${OLD_KAFKA_PROPS//\'/\'\'}${OLD_KAFKA_PROPS:+;}message.max.bytes=5000'" >/dev/null
q -c "SELECT pg_reload_conf()" >/dev/null
wait_until 30 "kafka_reconnected_since '$since'"
ok $? "relay reconnected to Kafka with message.max.bytes = 5000"
echo "COMMIT; \\q" >&"${PUB[1]}"
wait "$PUB_PID"
ok $? "the 20 kB event committed (accepted under the limit in force when it was published)"
q -c "SELECT t17_publish('kafka', '$TK', 'stuck', '{\"n\": 2}')" >/dev/null
q -c "SELECT t17_publish('kafka', '$TK', 'stuck', '{\"n\": 3}')" >/dev/null
publish_others kafka "$TK" after
wait_outbox_empty 60
ok $? "outbox drained: delivered or moved aside"
diag "kafka: drained in $((SECONDS - t0)) s"
is "$(und "$TK" "AND held_behind IS NULL AND error LIKE '%MSG_SIZE_TOO_LARGE%'")" 1 "kafka: the 20 kB event is undeliverable (MSG_SIZE_TOO_LARGE)"
is "$(und "$TK" "AND held_behind IS NOT NULL")" 2 "kafka: its aggregate's 2 later events wait behind it"
r=$(others_check kafka "$TK"); diag "kafka others: $r"
is "$(field "$r" published)/$(field "$r" missing)/$(field "$r" duplicates)/$(field "$r" order_violations)" "200/0/0/0" \
	"kafka: all 200 events of the 100 other aggregates delivered once, in order (published/missing/dup/order)"
is "$(on_wire kafka "$TK" stuck)" "" "kafka: no later event of the stuck aggregate overtook it"
is "$(q -c "SELECT backlog || ' ' || failed FROM eventbus_status() WHERE component = 'undeliverable' AND transport = 'kafka'")" "3 1" \
	"eventbus_status(): undeliverable kafka row (events, failed ones)"
is "$(sqlstate_of "SELECT eventbus_publish('$TK', 'stuck', 'T', jsonb_build_object('blob', repeat('k', 20000)), 'kafka')")" 54000 \
	"a new 20 kB event is refused at publish under the lowered limit"

since=$(q -c "SELECT clock_timestamp()")
restore_kafka_props
wait_until 30 "kafka_reconnected_since '$since'"
ok $? "relay reconnected to Kafka with the limit restored"
is "$(q -c "SELECT eventbus_retry_undeliverable(NULL)")" 3 "retry of every undeliverable event: 3"
wait_outbox_empty 30
is "$(on_wire kafka "$TK" stuck)" "1,2,3" "kafka: the stuck aggregate's events delivered once, in order"
is "$(q -c "SELECT count(*) FROM eventbus.undeliverable")" 0 "nothing left undeliverable"

# --- 5. Kafka: a batch refused by the broker (MSG_SIZE_TOO_LARGE on a Produce request) ---
# The dev broker answers its next Produce request with MSG_SIZE_TOO_LARGE for
# every partition in it; the idempotent producer's gap-less guarantee keeps
# the later batches of those partitions from being appended after it.
TB="t17b.$run"
q -c "DELETE FROM t17_pub" >/dev/null
publish_round() {   # publish_round N — event N of each of 100 aggregates, one transaction
	q -c "SELECT count(t17_publish('kafka', '$TB', 'other-' || g, jsonb_build_object('g', g, 'n', $1))) FROM generate_series(1, 100) g" >/dev/null
}
publish_round 1; wait_outbox_empty 30
kill -WINCH "$(cat "$("$STACK" state-dir)/kafka/devbroker.pid")"
ok $? "dev broker: the next Produce request will be refused"
t0=$SECONDS
for n in 2 3 4; do publish_round "$n"; done
wait_outbox_empty 60
ok $? "outbox drained: delivered or moved aside"
diag "kafka batch: drained in $((SECONDS - t0)) s; $(und "$TB") undeliverable, $(und "$TB" "AND held_behind IS NULL") of them refused"
ok "$([ "$(und "$TB" "AND held_behind IS NULL")" -gt 0 ]; echo $?)" "the refused batch's events are undeliverable"
is "$(und "$TB" "AND held_behind IS NULL AND error NOT LIKE '%MSG_SIZE_TOO_LARGE%'")" 0 "each with the broker's error"
stuck_aggs=$(q -c "SELECT count(DISTINCT aggregate_id) FROM eventbus.undeliverable WHERE topic = '$TB'")
wire_kafka "$TB" t17b_w
is "$(q -c "SELECT count(*) FROM t17b_w w JOIN eventbus.undeliverable u ON u.topic = '$TB' AND u.aggregate_id = w.key
             WHERE (w.env->>'event_version')::bigint > (SELECT min(event_version) FROM eventbus.undeliverable v
                                                          WHERE v.topic = '$TB' AND v.aggregate_id = w.key)")" 0 \
	"no event of a stuck aggregate after its refused one reached the broker"
is "$(q -c "SELECT count(DISTINCT key) FROM t17b_w")" 100 "every aggregate got its events up to the refused batch"
publish_round 5; wait_outbox_empty 30
is "$(q -c "SELECT count(*) FROM eventbus.undeliverable WHERE topic = '$TB' AND event_version = 5")" "$stuck_aggs" \
	"a later event of each of the $stuck_aggs stuck aggregates waits; the others' were delivered"
q -c "SELECT eventbus_retry_undeliverable(NULL)" >/dev/null
wait_outbox_empty 30
q -c "DROP TABLE IF EXISTS t17b_pub; CREATE TABLE t17b_pub AS SELECT * FROM t17_pub" >/dev/null
r=$(check_transport t17b kafka "$TB" "")
diag "kafka batch after retry: $r"
is "$(field "$r" published)/$(field "$r" missing)/$(field "$r" order_violations)/$(field "$r" version_gaps)/$(field "$r" duplicate_mismatches)" "500/0/0/0/0" \
	"after the retry: 500 events, none missing, order and versions intact (published/missing/order/gaps/dup mismatches)"
is "$(q -c "SELECT count(*) FROM eventbus.undeliverable")" 0 "nothing left undeliverable"

# --- 6. NATS: a transient failure (stream full) backs off its aggregates only ---
TF="t17f.$run"; TO="t17o.$run"
q -c "SELECT t17_publish('nats', '$TF', 'full-0', '{}')" >/dev/null
wait_outbox_empty 30
full_stream=$(nats_stream_of "$TF")
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" set-max-msgs "$full_stream" 1 >/dev/null
ok $? "eventbus's stream $full_stream (discard new) limited to the 1 message it has"
q -c "SELECT count(t17_publish('nats', '$TF', 'full-' || (1 + g % 5), jsonb_build_object('g', g))) FROM generate_series(0, 9) g" >/dev/null
t0=$SECONDS
publish_others nats "$TO" before
publish_others nats "$TO" after
wait_until 30 "[ \"\$(q -c \"SELECT count(*) FROM eventbus.outbox WHERE topic = '$TO'\")\" = 0 ]"
ok $? "another topic's 200 events delivered while the full stream refuses"
diag "other topic delivered in $((SECONDS - t0)) s"
is "$(q -c "SELECT count(*) FROM eventbus.outbox WHERE topic = '$TF' AND attempts > 0 AND last_error LIKE '%maximum messages%'")" 5 \
	"the full stream's first event per aggregate failed transiently (maximum messages exceeded) and stays in the outbox"
is "$(und "$TF")" 0 "a transient failure is not moved aside"
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" set-max-msgs "$full_stream" -1 >/dev/null
t0=$SECONDS
wait_outbox_empty 30
ok $? "delivered once the stream takes them again"
diag "full stream: drained $((SECONDS - t0)) s after the limit was lifted (per-aggregate backoff)"
is "$(on_wire nats "$TF" full-1),$(on_wire nats "$TF" full-5)" "1,2,1,2" "its aggregates' events in order"

done_testing
