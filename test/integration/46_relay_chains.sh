#!/usr/bin/env bash
# An aggregate's events in one relay round.  On NATS (each message
# acknowledged on its own) the relay keeps at most one event per aggregate
# in flight and sends the next once the previous one is acknowledged, in the
# same round; on Kafka they go together.  Rounds are counted by
# relay_rounds_total (eventbus.metrics), events read back from the brokers
# with kcat / natstool:
#  - one aggregate's 300 events, interleaved with 300 of 30 other
#    aggregates, committed in one transaction, go in one round on each
#    transport, all on the broker once and in order;
#  - a long chain does not hold back other aggregates' new events: on NATS,
#    with relay_batch_size 10,000, an event committed right after one
#    aggregate's 5,000 (read in one round) reaches the broker before the
#    last of them: the round stops sending further events once commits
#    arrived, and the rest follows in the next rounds, in order;
#  - a long chain does not hold back the rows after a full batch: on NATS,
#    with the default relay_batch_size (1,000), 20 events of 20 other
#    aggregates committed one by one after one aggregate's 5,000 reach the
#    broker before the chain's 2,500th (rows after a batch are otherwise
#    read only once the chain is shorter than a batch: after its 4,000th);
#  - a failure in the middle of a chain stops it: on NATS, the third of an
#    aggregate's five events is larger than its stream's max_msg_size; the
#    first two are delivered, the third is undeliverable, the fourth and
#    fifth wait behind it (never sent, no attempt recorded), 20 other
#    aggregates in the same transaction are all delivered in order; after
#    the fix, a retry delivers 3, 4, 5 in order.
source "$(dirname "$0")/lib.sh"
trap 'q -c "ALTER SYSTEM RESET eventbus.relay_batch_size" -c "SELECT pg_reload_conf()" >/dev/null' EXIT

run=$(date +%s)$RANDOM
TK="t46.kafka.$run"
TN="t46.nats.$run"
TL="t46.long.$run"
TF="t46.fail.$run"
TH="t46.hot.$run"
STREAM="T46_$run"

rounds() { q -c "SELECT value::bigint FROM eventbus.metrics WHERE name = 'relay_rounds_total' AND transport = '$1'"; }
relayed() { [ "$(q -c "SELECT count(*) FROM eventbus.outbox WHERE topic = '$1'")" = 0 ]; }
und() { q -c "SELECT count(*) FROM eventbus.undeliverable WHERE topic = '$1' ${2:-}"; }
# ok_before WHAT SEQ THAN SEQ2 MESSAGE — stream sequence SEQ is before SEQ2
ok_before() {
	diag "nats: stream sequence of $1 $2, of $3 $4"
	ok "$([ -n "$2" ] && [ -n "$4" ] && [ "$2" -lt "$4" ]; echo $?)" "$5"
}
# chain_on_wire TABLE AGGREGATE — "events/distinct event ids/versions out of
# place" of AGGREGATE on the broker (versions expected 1, 2, ... in order)
chain_on_wire() {
	q -c "SELECT count(*) || '/' || count(DISTINCT env->>'event_id') || '/' || count(*) FILTER (WHERE d <> 0)
	        FROM (SELECT env, (env->>'event_version')::int - row_number() OVER (ORDER BY pos) AS d
	                FROM $1 WHERE key = '$2') s"
}
# on_wire TABLE AGGREGATE — versions of AGGREGATE in broker order
on_wire() { q -c "SELECT coalesce(string_agg(env->>'event_version', ',' ORDER BY part, pos), '') FROM $1 WHERE key = '$2'"; }

publish_log_setup t46_pub
load_wire_functions
wait_until 30 both_connected || bail "brokers not connected"
logged_publish_setup t46_publish t46_pub T46

# --- 1. one aggregate's events, interleaved with others', in one round ---
for tr in kafka nats; do
	topic=$TK; [ $tr = nats ] && topic=$TN
	# The topic (and NATS stream) exists and the relay is idle before the count.
	q -c "SELECT t46_publish('$tr', '$topic', 'warm', '{}')" >/dev/null
	wait_until 30 relayed "$topic" || bail "$tr: the first event was not relayed"
	r0=$(rounds $tr)
	q -c "SELECT count(t46_publish('$tr', '$topic', CASE WHEN g % 2 = 0 THEN 'hot' ELSE 'other-' || (g % 30) END, jsonb_build_object('g', g)))
	        FROM generate_series(1, 600) g" >/dev/null
	wait_until 60 relayed "$topic"
	ok $? "$tr: 600 events in one transaction relayed (300 of one aggregate, 300 of 30 others)"
	is "$(( $(rounds $tr) - r0 ))" 1 "$tr: they went in one round"
	r=$(check_transport t46 $tr "$TK" "$TN")
	diag "$tr: $r"
	is "$(field "$r" published)/$(field "$r" missing)/$(field "$r" duplicates)/$(field "$r" order_violations)" "601/0/0/0" \
		"$tr: every event on the broker once, in order per aggregate (published/missing/dup/order)"
done

# --- 2. a long chain does not hold back another aggregate's new event ---
# relay_batch_size 10,000: the chain fits in one round, so only the stop
# between its events (not the batch's end) lets the later commit through.
q -c "ALTER SYSTEM SET eventbus.relay_batch_size = 10000" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1
q -c "SELECT t46_publish('nats', '$TL', 'warm', '{}')" >/dev/null
wait_until 30 relayed "$TL" || bail "nats: the first event on $TL was not relayed"
r0=$(rounds nats)
q -c "SELECT count(t46_publish('nats', '$TL', 'long', jsonb_build_object('g', g))) FROM generate_series(1, 5000) g" >/dev/null
q -c "SELECT t46_publish('nats', '$TL', 'late', '{}')" >/dev/null
wait_until 120 relayed "$TL"
ok $? "nats: 5,000 events of one aggregate and one of another, committed after them, relayed"
diag "nats: in $(( $(rounds nats) - r0 )) rounds"
q -c "ALTER SYSTEM RESET eventbus.relay_batch_size" -c "SELECT pg_reload_conf()" >/dev/null
wire_nats "$TL" t46_long
late=$(q -c "SELECT min(pos) FROM t46_long WHERE key = 'late'")
last=$(q -c "SELECT max(pos) FROM t46_long WHERE key = 'long'")
ok_before "the later commit's event" "$late" "the chain's last event" "$last" \
	"nats: the event committed after the 5,000 reached the broker before the last of them"
r=$(chain_on_wire t46_long long)
is "${r%/*}" "5000/5000" "nats: the chain's 5,000 events on the broker once each"
is "${r##*/}" "0" "nats: the chain's events on the broker in version order 1..5000"

# --- 2b. a long chain does not hold back the rows after a full batch ---
# The default relay_batch_size (1,000): the chain fills every batch until
# its last 1,000, so the 20 later commits are found only by reading past it.
q -c "SELECT t46_publish('nats', '$TH', 'warm', '{}')" >/dev/null
wait_until 30 relayed "$TH" || bail "nats: the first event on $TH was not relayed"
q -c "SELECT count(t46_publish('nats', '$TH', 'hot', jsonb_build_object('g', g))) FROM generate_series(1, 5000) g" >/dev/null
q -c "DO \$\$ BEGIN FOR g IN 1..20 LOOP PERFORM t46_publish('nats', '$TH', 'other-' || g, '{}'); COMMIT; PERFORM pg_sleep(0.01); END LOOP; END \$\$" >/dev/null
wait_until 120 relayed "$TH"
ok $? "nats: 5,000 events of one aggregate and 20 of others, committed one by one after them, relayed"
wire_nats "$TH" t46_hot
others=$(q -c "SELECT max(pos) FROM t46_hot WHERE key LIKE 'other-%'")
mid=$(q -c "SELECT pos FROM t46_hot WHERE key = 'hot' AND env->>'event_version' = '2500'")
ok_before "the last of the 20 later events" "$others" "the chain's 2,500th event" "$mid" \
	"nats: the 20 events committed after the chain reached the broker before its 2,500th event"
is "$(q -c "SELECT count(*) FROM t46_hot WHERE key LIKE 'other-%'")/$(q -c "SELECT count(DISTINCT key) FROM t46_hot WHERE key LIKE 'other-%'")" \
	"20/20" "nats: the 20 later events on the broker once each"
is "$(chain_on_wire t46_hot hot)" "5000/5000/0" "nats: the chain's 5,000 events on the broker once each, in version order"

# --- 3. a failure in the middle of a chain stops it ---
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" ensure-stream "$STREAM" "$TF" >/dev/null &&
	"$NATSTOOL" --url "$EVENTBUS_NATS_URL" set-max-msg-size "$STREAM" 4096 >/dev/null
ok $? "stream $STREAM for $TF with max_msg_size 4096"
q >/dev/null <<SQL
BEGIN;
SELECT t46_publish('nats', '$TF', 'other-' || g, jsonb_build_object('g', g)) FROM generate_series(1, 10) g;
SELECT t46_publish('nats', '$TF', 'chain', CASE WHEN v = 3 THEN jsonb_build_object('blob', repeat('x', 6000)) ELSE jsonb_build_object('v', v) END)
  FROM generate_series(1, 5) v;
SELECT t46_publish('nats', '$TF', 'other-' || g, jsonb_build_object('g', g)) FROM generate_series(1, 10) g;
COMMIT;
SQL
wait_until 60 relayed "$TF"
ok $? "nats: the transaction's events delivered or moved aside"
wire_nats "$TF" t46_fail
is "$(on_wire t46_fail chain)" "1,2" "nats: the chain's first two events delivered, nothing after the failed one"
is "$(und "$TF" "AND held_behind IS NULL AND aggregate_id = 'chain' AND event_version = 3 AND error LIKE '%10054%'")" 1 \
	"nats: the third is undeliverable (JetStream 10054, message size exceeds maximum)"
is "$(und "$TF" "AND held_behind IS NOT NULL AND aggregate_id = 'chain'")" 2 "nats: the fourth and fifth wait behind it"
is "$(und "$TF" "AND held_behind IS NOT NULL AND aggregate_id = 'chain' AND attempts = 0 AND last_error IS NULL")" 2 \
	"nats: ... never attempted (no attempt or error recorded for them)"
is "$(q -c "SELECT count(*) FROM t46_fail WHERE key LIKE 'other-%'")/$(q -c "SELECT count(DISTINCT key) FROM t46_fail WHERE key LIKE 'other-%' AND env->>'event_version' IN ('1', '2')")" \
	"20/10" "nats: the 20 events of the 10 other aggregates in the same transaction delivered"
is "$(q -c "SELECT count(*) FROM (SELECT key, (env->>'event_version')::int - row_number() OVER (PARTITION BY key ORDER BY pos) AS d FROM t46_fail WHERE key LIKE 'other-%') s WHERE d <> 0")" \
	"0" "nats: ... in order"
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" set-max-msg-size "$STREAM" -1 >/dev/null
failed=$(q -c "SELECT id FROM eventbus.undeliverable WHERE topic = '$TF' AND held_behind IS NULL")
is "$(q -c "SELECT eventbus_retry_undeliverable($failed)")" 3 "nats: after the fix, retry moves the three back"
wait_until 60 relayed "$TF"
wire_nats "$TF" t46_fail
is "$(on_wire t46_fail chain)" "1,2,3,4,5" "nats: the chain's five events on the broker once, in order"
is "$(und "$TF")" 0 "nats: nothing left undeliverable"

done_testing
