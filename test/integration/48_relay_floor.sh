#!/usr/bin/env bash
# The relay reads the outbox from above the rows it has relayed (its read
# floor), not from the start: a deleted row stays in the outbox's indexes
# until no snapshot can see it, so while a session holds an old snapshot
# every read from the start walks every row deleted since.  The index
# entries the relay's reads and deletes went through are counted from
# pg_stat_all_indexes (idx_tup_read, dead entries included); events are
# read back from the brokers with kcat / natstool:
#  - with a read-only REPEATABLE READ transaction open all along, 40
#    transactions of 50 events each (10 aggregates, 5 events each), each
#    relayed before the next commits, on each transport: every event on the
#    broker once, in order, and the outbox's index entries walked stay
#    within 5 per event (2 to 3 in the runs seen; walking the deleted rows at
#    every read: 71 on Kafka, 105 on NATS);
#  - the floor never passes a row a running transaction may still commit:
#    an event published (its outbox id taken) before 10 others committed
#    and were relayed, and committed only after them, is relayed;
#  - after the outbox's sequence is restarted, and after it is set back,
#    events with ids below the floor are relayed;
#  - one transport's backlog is not walked by the other's reads: NATS down
#    with 20,000 events waiting, 40 transactions of 50 Kafka events, each
#    relayed before the next: at most 5 index entries walked per Kafka
#    event.  After a VACUUM of the emptied outbox the relay's reads are
#    planned on the primary key with a filter on the transport, so without
#    the floor every Kafka read walked the NATS backlog until autoanalyze
#    changed the plan (222 entries per event in the run seen); then NATS
#    back, the backlog relayed, every event once and in order.
#  - with the outbox's statistics taken while it held only Kafka rows (the
#    reads then planned on the primary key, filtered on the transport), 40
#    transactions of 50 events per transport, each relayed before the next:
#    at most 4 index entries walked per event (the idle transport's floor
#    follows what was relayed; two rounds behind, each deleted row of the
#    other was walked twice: 5 per event).
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t48.kafka.$run"
TN="t48.nats.$run"

relayed() { [ "$(q -c "SELECT count(*) FROM eventbus.outbox WHERE topic IN ('$TK', '$TN')")" = 0 ]; }
# Index entries returned by scans of the outbox's indexes, as flushed so far.
walked() { q -c "SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_all_indexes WHERE relid = 'eventbus.outbox'::regclass"; }
# walked_settled — the figure once the launcher has flushed its statistics
# (at most every second or two): the same twice, 2.5 s apart.
walked_settled() {
	local a b
	b=$(walked)
	for _ in $(seq 20); do
		sleep 2.5
		a=$b
		b=$(walked)
		[ "$a" = "$b" ] && break
	done
	echo "$b"
}
topic_of() { if [ "$1" = kafka ]; then echo "$TK"; else echo "$TN"; fi; }
holding() { [ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)' AND backend_xmin IS NOT NULL")" = 1 ]; }
# early_open — the 'early' transaction has published and waits to commit
early_open() { [ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' AND backend_xid IS NOT NULL")" = 1 ]; }
# others_relayed TOPIC — nothing of TOPIC but the 'early' event in the outbox
topic_relayed() { [ "$(q -c "SELECT count(*) FROM eventbus.outbox WHERE topic = '$1'")" = 0 ]; }
# forty_transactions TR TOPIC TX0 — 40 transactions of 50 events (10
# aggregates) on TOPIC, each relayed before the next commits; prints the
# index entries the relay walked meanwhile, or "failed".
forty_transactions() {
	local before i
	before=$(walked_settled)
	for i in $(seq 40); do
		q -c "SELECT count(t48_publish('$1', '$2', 'agg-' || (g % 10), jsonb_build_object('tx', $3 + $i, 'g', g)))
		        FROM generate_series(1, 50) g" >/dev/null
		wait_until 30 topic_relayed "$2" || { echo failed; return; }
	done
	echo $(( $(walked_settled) - before ))
}
others_relayed() { [ "$(q -c "SELECT count(*) FROM eventbus.outbox WHERE topic = '$1' AND aggregate_id <> 'early'")" = 0 ]; }

publish_log_setup t48_pub
load_wire_functions
wait_until 30 both_connected || bail "brokers not connected"
logged_publish_setup t48_publish t48_pub T48

for tr in kafka nats; do
	q -c "SELECT t48_publish('$tr', '$(topic_of $tr)', 'warm', '{}')" >/dev/null
done
wait_until 30 relayed || bail "the first events were not relayed"

# --- 1. an old snapshot held while 2,000 events per transport are relayed ---
q -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "SELECT count(*) FROM eventbus.outbox" \
  -c "SELECT pg_sleep(600)" -c "COMMIT" >/dev/null 2>&1 &
holder=$!
trap 'kill $holder 2>/dev/null; q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = '"'"'SELECT pg_sleep(600)'"'"'" >/dev/null' EXIT
wait_until 10 holding
ok $? "a session holds a snapshot (REPEATABLE READ, read only)"

for tr in kafka nats; do
	n=$(forty_transactions $tr "$(topic_of $tr)" 0)
	ok "$([ "$n" != failed ]; echo $?)" "$tr: 40 transactions of 50 events, each relayed before the next committed"
	diag "$tr: index entries walked by the relay for 2,000 events: $n"
	ok "$([ "$n" != failed ] && [ "$n" -le 10000 ]; echo $?)" "$tr: at most 5 index entries walked per event (the rows deleted before are not walked again)"
	r=$(check_transport t48 $tr "$TK" "$TN")
	diag "$tr: $r"
	is "$(field "$r" published)/$(field "$r" missing)/$(field "$r" duplicates)/$(field "$r" order_violations)" "2001/0/0/0" \
		"$tr: every event on the broker once, in order per aggregate (published/missing/dup/order)"
done

# --- 2. a row a running transaction took an id for is not passed ---
for tr in kafka nats; do
	topic=$(topic_of $tr)
	q -c "BEGIN" -c "SELECT t48_publish('$tr', '$topic', 'early', '{}')" -c "SELECT pg_sleep(5)" -c "COMMIT" >/dev/null &
	early=$!
	wait_until 10 early_open || bail "$tr: the early transaction did not publish"
	for i in $(seq 10); do
		q -c "SELECT t48_publish('$tr', '$topic', 'later-$i', '{}')" >/dev/null
		wait_until 10 others_relayed "$topic"
	done
	wait "$early"
	wait_until 30 relayed
	ok $? "$tr: the event of a transaction that took its id before 10 others were relayed, committed after them, relayed"
	r=$(check_transport t48 $tr "$TK" "$TN")
	is "$(field "$r" published)/$(field "$r" missing)/$(field "$r" duplicates)" "2012/0/0" "$tr: ... on the broker once (published/missing/dup)"
done

# --- 3. the sequence restarted, then set back ---
# Below the floor, onto ids of this test's own events, all relayed (and so
# gone): nothing collides.  The sequence is put past them again at the end.
last=$(q -c "SELECT last_value FROM eventbus.outbox_id_seq")
q -c "ALTER SEQUENCE eventbus.outbox_id_seq RESTART WITH $((last - 40))" >/dev/null
for tr in kafka nats; do q -c "SELECT t48_publish('$tr', '$(topic_of $tr)', 'after-restart', '{}')" >/dev/null; done
wait_until 30 relayed
ok $? "after ALTER SEQUENCE ... RESTART below the floor, events relayed"
for tr in kafka nats; do
	for i in $(seq 5); do q -c "SELECT t48_publish('$tr', '$(topic_of $tr)', 'climb', '{}')" >/dev/null; done
done
wait_until 30 relayed || bail "events after the restart not relayed"
q -c "SELECT setval('eventbus.outbox_id_seq', $((last - 38)))" >/dev/null
for tr in kafka nats; do q -c "SELECT t48_publish('$tr', '$(topic_of $tr)', 'after-setval', '{}')" >/dev/null; done
wait_until 30 relayed
ok $? "after setval() back below the floor, events relayed"
q -c "SELECT setval('eventbus.outbox_id_seq', $((last + 1000)))" >/dev/null

# --- 4. a NATS backlog is not walked by the Kafka relay's reads ---
# The relay's periodic reads plan anew on the vacuumed, empty outbox.
q -c "VACUUM (ANALYZE) eventbus.outbox" >/dev/null
sleep 2
"$STACK" nats-stop >/dev/null
trap 'kill $holder 2>/dev/null; "$STACK" nats-start >/dev/null 2>&1; q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = '"'"'SELECT pg_sleep(600)'"'"'" >/dev/null' EXIT
q -c "SELECT count(t48_publish('nats', '$TN', 'backlog-' || (g % 100), jsonb_build_object('g', g))) FROM generate_series(1, 20000) g" >/dev/null
n=$(forty_transactions kafka "$TK" 100)
ok "$([ "$n" != failed ]; echo $?)" "kafka: 40 transactions of 50 events relayed, each before the next, while 20,000 NATS events wait (NATS down)"
diag "kafka: index entries walked by the relay for 2,000 events beside the NATS backlog: $n"
ok "$([ "$n" != failed ] && [ "$n" -le 10000 ]; echo $?)" "kafka: at most 5 index entries walked per event (the NATS backlog is not walked)"
"$STACK" nats-start >/dev/null
wait_until 120 relayed
ok $? "nats: the 20,000 events relayed once NATS is back"

# --- 5. reads planned on the primary key: an idle transport's floor keeps up ---
# Statistics taken while the outbox held only Kafka rows (Kafka down, its
# backlog waiting; autoanalyze off for the outbox, so that they stay) plan
# the relay's reads on the primary key with a filter on the transport.  A
# transport's read then walks every entry above its floor that the other
# transport deleted.  With nothing else writing, each floor follows the
# rows relayed: each entry is walked at most once by the idle transport's
# reads.  A floor two rounds behind walked each twice: 5 per event.
q -c "ALTER TABLE eventbus.outbox SET (autovacuum_enabled = off)" >/dev/null
trap 'kill $holder 2>/dev/null; "$STACK" kafka-up >/dev/null 2>&1; "$STACK" nats-start >/dev/null 2>&1; q -c "ALTER TABLE eventbus.outbox RESET (autovacuum_enabled)" >/dev/null; q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = '"'"'SELECT pg_sleep(600)'"'"'" >/dev/null' EXIT
"$STACK" kafka-down >/dev/null
q -c "SELECT count(t48_publish('kafka', '$TK', 'stats-' || (g % 100), jsonb_build_object('g', g))) FROM generate_series(1, 3000) g" >/dev/null
q -c "ANALYZE eventbus.outbox" >/dev/null
"$STACK" kafka-up >/dev/null
wait_until 120 relayed || bail "the Kafka backlog was not relayed once Kafka was back"
for tr in kafka nats; do
	n=$(forty_transactions $tr "$(topic_of $tr)" $([ $tr = kafka ] && echo 200 || echo 300))
	ok "$([ "$n" != failed ]; echo $?)" "$tr: 40 transactions of 50 events relayed, each before the next, on statistics of a one-transport outbox"
	diag "$tr: index entries walked by the relay for 2,000 events, reads planned on those statistics: $n"
	ok "$([ "$n" != failed ] && [ "$n" -le 8000 ]; echo $?)" "$tr: at most 4 index entries walked per event (the other transport's floor follows its rows)"
done
q -c "ALTER TABLE eventbus.outbox RESET (autovacuum_enabled)" >/dev/null

for tr in kafka nats; do
	r=$(check_transport t48 $tr "$TK" "$TN")
	diag "$tr: $r"
	expected=9019; [ $tr = nats ] && expected=24019
	is "$(field "$r" published)/$(field "$r" missing)/$(field "$r" duplicates)/$(field "$r" order_violations)" "$expected/0/0/0" \
		"$tr: every event on the broker once, in order per aggregate (published/missing/dup/order)"
done

done_testing
