#!/usr/bin/env bash
# 10,000 events over 1,000 aggregates per transport, published from 4
# concurrent connections in transactions of varying size, read back by kcat
# and natstool: zero missing, no duplicates, versions 1..k per aggregate in
# order, Kafka partition = fnv1a(key), envelope and headers as docs/wire-format.md.
# Rolled-back transactions and savepoints publish nothing of theirs.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t10.kafka.$run"; TN="t10.nats.$run"
load_wire_functions; burst_proc_setup; publish_log_setup t10_pub
wait_until 20 both_connected || bail "brokers not connected"

t0=$(date +%s%N)
pids=()
for w in 1 2 3 4; do
	psql -X -q -c "CALL t_burst($w, 2500, '$TK', '$TN', 1000, 'order-', 't10_pub')" &
	pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
ok $rc "4 connections published 2,500 events each per transport"

# Rolled back: a whole transaction, and a savepoint inside a committed one.
q >/dev/null <<SQL
BEGIN;
SELECT eventbus_publish('$TK', 'rolledback-1', 'X', '{}', 'kafka'), eventbus_publish('$TN', 'rolledback-1', 'X', '{}', 'nats');
ROLLBACK;
BEGIN;
INSERT INTO t10_pub SELECT eventbus_publish('$TK', 'kept-1', 'X', '{"kept":true}', 'kafka'), 'kafka', '$TK', 'kept-1', '{"kept":true}';
SAVEPOINT s;
SELECT eventbus_publish('$TK', 'dropped-1', 'X', '{}', 'kafka'), eventbus_publish('$TN', 'dropped-1', 'X', '{}', 'nats');
ROLLBACK TO SAVEPOINT s;
INSERT INTO t10_pub SELECT eventbus_publish('$TN', 'kept-1', 'X', '{"kept":true}', 'nats'), 'nats', '$TN', 'kept-1', '{"kept":true}';
COMMIT;
-- Optional envelope fields and user headers on the wire.
INSERT INTO t10_pub SELECT eventbus_publish('$TK', 'full-1', 'Full', '{"a":[1,2,{"b":null}]}', 'kafka', NULL, 'trace-1', 'corr-1', 7, '{"source":"test"}'), 'kafka', '$TK', 'full-1', '{"a":[1,2,{"b":null}]}';
INSERT INTO t10_pub SELECT eventbus_publish('$TN', 'full-1', 'Full', '{"a":[1,2,{"b":null}]}', 'nats', NULL, 'trace-1', 'corr-1', 7, '{"source":"test"}'), 'nats', '$TN', 'full-1', '{"a":[1,2,{"b":null}]}';
-- User headers go out in byte order of their names (jsonb keeps them shortest first).
INSERT INTO t10_pub SELECT eventbus_publish('$TK', 'hdrsort-1', 'X', '{}', 'kafka', headers => '{"b":"1","aa":"2","B":"3"}'), 'kafka', '$TK', 'hdrsort-1', '{}';
INSERT INTO t10_pub SELECT eventbus_publish('$TN', 'hdrsort-1', 'X', '{}', 'nats', headers => '{"b":"1","aa":"2","B":"3"}'), 'nats', '$TN', 'hdrsort-1', '{}';
SQL

wait_outbox_empty 180
ok $? "relay drained the outbox"
t1=$(date +%s%N)
n_pub=$(q -c "SELECT count(*) FROM t10_pub")
diag "published and acknowledged $n_pub events in $(( (t1 - t0) / 1000000 )) ms"

for tr in kafka nats; do
	r=$(check_transport t10 $tr "$TK" "$TN")
	[ $tr = kafka ] && diag "Kafka topic $TK has $(kafka_partitions "$TK") partitions"
	diag "$tr: $r"
	is "$(field "$r" published)" "10003" "$tr: 10,003 events committed (10,000 + kept + full + order; rolled-back ones excluded)"
	is "$(field "$r" missing)" "0" "$tr: zero missing on the broker"
	is "$(field "$r" duplicates)" "0" "$tr: zero duplicates"
	is "$(field "$r" unexpected)" "0" "$tr: nothing on the broker that did not commit (rollback, savepoint)"
	is "$(field "$r" order_violations)" "0" "$tr: versions in order per aggregate"
	is "$(field "$r" version_gaps)" "0" "$tr: versions are exactly 1..k per aggregate"
	ok "$([ "$(field "$r" aggregates)" -ge 990 ]; echo $?)" "$tr: events spread over $(field "$r" aggregates) aggregates"
	is "$(field "$r" envelope_violations)" "0" "$tr: envelope fields and types as docs/wire-format.md"
	is "$(field "$r" payload_mismatches)" "0" "$tr: payload is the committed JSON value"
	is "$(field "$r" header_violations)" "0" "$tr: headers as docs/wire-format.md"
	if [ $tr = kafka ]; then
		is "$(field "$r" partition_violations)" "0" "kafka: every message on the partition fnv1a(key) picks"
		is "$(field "$r" split_aggregates)" "0" "kafka: each aggregate on one partition"
	fi
	is "$(q -c "SELECT count(*) FROM t10_wire_$tr WHERE key IN ('rolledback-1', 'dropped-1')")" "0" \
		"$tr: rolled-back transaction and savepoint published nothing"
	is "$(q -c "SELECT count(*) FROM t10_wire_$tr WHERE key = 'kept-1'")" "1" "$tr: work outside the savepoint was published"
	is "$(q -c "SELECT (env->>'trace_id') || ',' || (env->>'correlation_id') || ',' || (env->'tenant_id') || ',' || (hdrs->>'source') FROM t10_wire_$tr WHERE key = 'full-1'")" \
		"trace-1,corr-1,7,test" "$tr: trace_id, correlation_id, tenant_id and user headers on the wire"
	is "$(q -c "SELECT (hdrs->>'B') || (hdrs->>'aa') || (hdrs->>'b') FROM t10_wire_$tr WHERE key = 'hdrsort-1'")" "321" "$tr: every user header on the wire"
done
# kcat keeps the headers' order (natstool's dump is an object).
is "$(q -c "SELECT string_agg(h, ',' ORDER BY i) FROM t10_wire_kafka_raw r,
              jsonb_array_elements_text(r.line->'headers') WITH ORDINALITY x (h, i)
             WHERE r.line->>'key' = 'hdrsort-1' AND i % 2 = 1 AND h NOT LIKE 'X-%'")" "B,aa,b" \
	"kafka: user headers in byte order of their names"

# The stream eventbus created never discards unconsumed events silently.
info=$("$NATSTOOL" --url "$EVENTBUS_NATS_URL" stream-info "$TN")
diag "stream created by eventbus: $info"
js() { echo "$info" | sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" | tr -d '"'; }
is "$(js retention),$(js discard),$(js max_msgs),$(js max_bytes),$(js max_age),$(js max_msgs_per_subject),$(js storage)" \
	"limits,new,-1,-1,0,-1,file" "NATS stream: limits retention without limits, discard new, file storage"

# A stream that already captures the subject is used as is.
TU="t10.user.$run"
"$NATSTOOL" --url "$EVENTBUS_NATS_URL" ensure-stream "USER_$run" "$TU" >/dev/null
q -c "SELECT eventbus_publish('$TU', 'u-1', 'Created', '{}', 'nats')" >/dev/null
wait_outbox_empty 30
is "$(nats_dump "$TU" | sed -n 's/.*"stream":"\([^"]*\)".*/\1/p' | sort -u)" "USER_$run" \
	"an existing stream capturing the subject is used (no eventbus stream created)"

done_testing
