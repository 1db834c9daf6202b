#!/usr/bin/env bash
# eventbus.metrics: readable by pg_monitor (and not by PUBLIC), with its
# counters matching the database's own records after a burst on both
# transports: published (a rolled-back savepoint and a rolled-back
# transaction not counted), relayed, consumed, quarantined, handled; and the
# pool activity visible in pg_stat_activity while a handler runs.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
N=300
consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't36.%.$run'; q -c 'DROP ROLE IF EXISTS t36_monitor, t36_plain'"

q >/dev/null <<SQL
DROP TABLE IF EXISTS t36_handled;
CREATE TABLE t36_handled (transport text, event_id uuid);
CREATE OR REPLACE FUNCTION t36_handler(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
  IF e.event_type = 'Slow' THEN PERFORM pg_sleep(3); END IF;
  INSERT INTO public.t36_handled VALUES (e.transport, e.event_id);
END \$\$;
DROP ROLE IF EXISTS t36_monitor, t36_plain;
CREATE ROLE t36_monitor LOGIN IN ROLE pg_monitor;
CREATE ROLE t36_plain LOGIN;
SQL

# metric NAME TRANSPORT — a transport's value; metric NAME — the sum over workers.
metric() {
	if [ -n "${2:-}" ]; then
		q -c "SELECT value::bigint FROM eventbus.metrics WHERE name = '$1' AND transport = '$2'"
	else
		q -c "SELECT coalesce(sum(value), 0)::bigint FROM eventbus.metrics WHERE name = '$1'"
	fi
}

is "$(psql -X -A -t -q -U t36_monitor -c "SELECT count(*) > 0 FROM eventbus.metrics" 2>&1)" t \
	"a pg_monitor member reads eventbus.metrics"
is "$(psql -X -A -t -q -U t36_plain -c "SELECT count(*) FROM eventbus.metrics" 2>&1 | grep -o 'permission denied for view metrics')" \
	"permission denied for view metrics" "a role without pg_monitor cannot read it (42501)"

# Messages of earlier tests' durables may still arrive (a restart rebinds
# them and redelivers what was not acknowledged): take the baseline once
# consumed_total stopped moving for 2 s.
consumed_now() { q -c "SELECT coalesce(sum(value), 0)::bigint FROM eventbus.metrics WHERE name = 'consumed_total'"; }
settled() {
	local a b
	a=$(consumed_now); sleep 2; b=$(consumed_now)
	[ "$a" = "$b" ]
}
wait_until 30 settled || diag "consumed_total still moving before the burst: the counts below may include other tests' messages"

declare -A pub0 rel0 con0 qua0
for tr in kafka nats; do
	pub0[$tr]=$(metric published_total $tr); rel0[$tr]=$(metric relayed_total $tr)
	con0[$tr]=$(metric consumed_total $tr); qua0[$tr]=$(metric quarantined_total $tr)
done
hand0=$(metric handled_total)

for tr in kafka nats; do
	q -c "SELECT eventbus_subscribe('t36.$tr.$run', 't36_handler(eventbus.envelope)', '$tr')" >/dev/null
done
sleep 2   # the consumers subscribe (JetStream durables, Kafka partitions)

for tr in kafka nats; do
	# N committed events, from 3 connections (each its own aggregates: no
	# lock waits between them); a savepoint rolled back and a transaction
	# rolled back publish nothing.
	for c in 0 1 2; do
		q -c "SELECT eventbus_publish('t36.$tr.$run', 'agg-$c-' || (i % 10), 'Happened', jsonb_build_object('i', i), '$tr')
		        FROM generate_series($((c * N / 3 + 1)), $(((c + 1) * N / 3))) i" >"$EVENTBUS_STATE/t36.$c.out" &
	done
	wait
	grep -h ERROR "$EVENTBUS_STATE"/t36.?.out && bail "a publishing connection failed"
	q -c "BEGIN" -c "SAVEPOINT s" \
	  -c "SELECT eventbus_publish('t36.$tr.$run', 'gone', 'RolledBack', '{}', '$tr') FROM generate_series(1, 7)" \
	  -c "ROLLBACK TO SAVEPOINT s" -c "COMMIT" >/dev/null
	q -c "BEGIN" -c "SELECT eventbus_publish('t36.$tr.$run', 'gone', 'RolledBack', '{}', '$tr') FROM generate_series(1, 5)" \
	  -c "ROLLBACK" >/dev/null
done
# Three malformed messages per transport.
printf 'k1\tnot json\nk2\t{"event_id": 1}\nk3\t[]\n' | kafka_produce "t36.kafka.$run"
printf 'not json\n{"event_id": 1}\n[]\n' | nats_produce "t36.nats.$run"

wait_until 120 "[ \"\$(q -c 'SELECT count(*) FROM t36_handled')\" = $((2 * N)) ] && outbox_empty && [ \"\$(q -c \"SELECT count(*) FROM eventbus.quarantine WHERE topic LIKE 't36.%.$run'\")\" = 6 ]"
ok $? "all $((2 * N)) events handled, the outbox empty, 6 messages quarantined"
sleep 2   # the last completions reach the counters

for tr in kafka nats; do
	is "$(( $(metric published_total $tr) - pub0[$tr] ))" "$N" "$tr: published_total grew by the $N committed events (rolled-back ones not counted)"
	is "$(( $(metric relayed_total $tr) - rel0[$tr] ))" "$N" "$tr: relayed_total grew by $N"
	is "$(( $(metric consumed_total $tr) - con0[$tr] ))" "$((N + 3))" "$tr: consumed_total grew by the $N events and 3 malformed messages"
	is "$(( $(metric quarantined_total $tr) - qua0[$tr] ))" \
		"$(q -c "SELECT count(*) FROM eventbus.quarantine WHERE topic = 't36.$tr.$run'")" "$tr: quarantined_total grew by the rows in eventbus.quarantine"
	is "$(metric outbox_backlog $tr)" "$(q -c "SELECT count(*) FROM eventbus.outbox WHERE transport = '$tr'")" "$tr: outbox_backlog is the outbox's row count"
done
is "$(( $(metric handled_total) - hand0 ))" \
	"$(q -c "SELECT count(*) FROM eventbus.inbox i JOIN eventbus.subscriptions s ON s.id = i.subscription_id WHERE s.topic LIKE 't36.%.$run' AND i.outcome = 'handled'")" \
	"handled_total grew by the inbox rows of the two subscriptions ($((2 * N)))"
is "$(q -c "SELECT count(*) FROM eventbus.metrics WHERE name = 'subscription_lag' AND subscription_id IN (SELECT id FROM eventbus.subscriptions WHERE topic LIKE 't36.%.$run')")" 2 \
	"a subscription_lag gauge per subscription"

# The postgres_exporter queries file: valid YAML, and each query runs as a
# pg_monitor member with the columns its metrics name.
/usr/bin/python3 - "$REPO/docs/postgres_exporter.yml" >"$EVENTBUS_STATE/t36.queries" <<'PY'
import sys, yaml
for key, q in yaml.safe_load(open(sys.argv[1])).items():
    cols = ",".join(list(m)[0] for m in q["metrics"])
    print(key + "\t" + cols + "\t" + q["query"])
PY
ok $? "docs/postgres_exporter.yml is valid YAML ($(wc -l <"$EVENTBUS_STATE/t36.queries") queries)"
bad=0
while IFS=$'\t' read -r key cols query; do
	got=$(psql -X -q -U t36_monitor -F , -A -c "$query" 2>&1 | head -1)
	n=$(psql -X -q -U t36_monitor -A -t -c "SELECT count(*) FROM ($query) s" 2>&1)
	if [ "$got" != "$cols" ] || ! [ "$n" -gt 0 ] 2>/dev/null; then bad=$((bad + 1)); diag "$key: columns '$got' (want '$cols'), rows '$n'"; fi
done <"$EVENTBUS_STATE/t36.queries"
is "$bad" 0 "every exporter query runs as pg_monitor and returns rows with its metric columns"

# A running handler shows in pg_stat_activity: which subscription and event.
eid=$(q -c "SELECT eventbus_publish('t36.kafka.$run', 'slow-1', 'Slow', '{}', 'kafka')")
sid=$(q -c "SELECT id FROM eventbus.subscriptions WHERE topic = 't36.kafka.$run'")
wait_until 30 "q -c \"SELECT query FROM pg_stat_activity WHERE backend_type = 'eventbus worker'\" | grep -q 'subscription $sid, event $eid'"
ok $? "pg_stat_activity shows the pool worker running subscription $sid, event $eid"
diag "$(q -c "SELECT query FROM pg_stat_activity WHERE backend_type = 'eventbus worker' AND query LIKE '%$eid%'")"

done_testing
