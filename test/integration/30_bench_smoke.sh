#!/usr/bin/env bash
# The benchmark's smallest level, through the benchmark's own harness
# (bench/lib.sh + bench/bench.sql, exactly what `make bench` runs), so the
# harness stays honest: 500 events over 50 aggregates (versions 1..10) and 5
# topics, published by an AFTER INSERT trigger from 4 connections, handled by
# the subscribed plpgsql handler, on each transport.  Asserted, counted from
# the database: every event delivered, no duplicate, no order violation, no
# stray handler call, every aggregate at version 10; the run's window comes
# from database timestamps.  Then the checker itself: hand-made handler
# calls with a gap, a late event and a repeat must come out as 1 duplicate,
# 2 order violations and 75% delivered.  Never a timing threshold.
# shellcheck source=test/integration/lib.sh
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
export BENCH_SCHEMA="t30_$run" BENCH_PREFIX=t30 BENCH_RUN=$run
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

# The stack as it is (no setting changed): brokers connected, dispatcher up.
wait_until 30 both_connected || bail "brokers not connected"
wait_until 30 dispatcher_running || bail "dispatcher not running (eventbus_status())"
trap 'bench_teardown >/dev/null 2>&1' EXIT

bench_setup
ok $? "bench schema $BENCH_SCHEMA created from bench/bench.sql"

f() { bench_field "$BENCH_DOC" "$@"; }

for tr in kafka nats; do
	bench_run "$tr.500" 500 500 4 "$tr" load 1 5
	ok $? "$tr: level 500 ran (subscribed, warmed up, published, handled)"
	is "$(f published)" 500 "$tr: 500 events published by the trigger"
	is "$(f delivered_pct)" 100.00 "$tr: delivered 100% (every business row's event reached the handler)"
	is "$(f duplicates)" 0 "$tr: 0 duplicates (handler calls = distinct events)"
	is "$(f order_violations)" 0 "$tr: 0 order violations (checked in the handler's transaction)"
	is "$(f unexpected)" 0 "$tr: no handler call for an event that was not published"
	is "$(f aggregates_complete)" 50 "$tr: all 50 aggregates reached version 10 in the projection"
	is "$(f time_source)" "$(q -c "SELECT CASE WHEN current_setting('track_commit_timestamp') = 'on' THEN 'commit_timestamp' ELSE 'handler_clock' END")" \
		"$tr: handler times from $(f time_source)"
	ok "$([ -n "$(f first_publish)" ] && [ -n "$(f last_handler_commit)" ] && [ -n "$(f events_per_s)" ] && echo 0 || echo 1)" \
		"$tr: window from database timestamps ($(f first_publish) -> $(f last_handler_commit))"
	diag "$tr: $(f events_per_s) events/s, latency p50 $(f latency_ms p50) ms, p99 $(f latency_ms p99) ms (informational)"
done

# The checker itself: handler calls made by hand for a planned run "check"
# (4 business rows of one aggregate, inserted with the trigger off so nothing
# is published): v1, v3 (gap), v2 (late), v3 again (same event: a
# duplicate, not an order violation); row 4 never delivered.
q >/dev/null <<SQL
INSERT INTO $BENCH_SCHEMA.plan VALUES ('check', 0, 0, 'kafka', 't30.check.kafka.1.$run', 'ord-1');
SET session_replication_role = replica;
INSERT INTO $BENCH_SCHEMA.orders (run_key, transport, topic, aggregate_id, sku, qty, amount)
SELECT 'check', 'kafka', 't30.check.kafka.1.$run', 'ord-1', 'sku-' || i, 1, 1 FROM generate_series(1, 4) i;
RESET session_replication_role;
CREATE TEMP TABLE t30_calls AS
SELECT n, jsonb_populate_record(NULL::eventbus.envelope, jsonb_build_object(
         'event_id', ('00000000-0000-7000-8000-00000000000' || v)::uuid, 'topic', 't30.check.kafka.1.$run',
         'aggregate_id', 'ord-1', 'event_type', 'OrderLineAdded', 'event_version', v, 'occurred_at', clock_timestamp(),
         'payload', jsonb_build_object('id', (SELECT min(id) + v - 1 FROM $BENCH_SCHEMA.orders WHERE run_key = 'check')),
         'transport', 'kafka')) AS e
  FROM (VALUES (1, 1), (2, 3), (3, 2), (4, 3)) c (n, v);
SELECT $BENCH_SCHEMA.handle(e) FROM t30_calls ORDER BY n;
SQL
check=$(q -c "SELECT $BENCH_SCHEMA.level_stats('check')")
is "$(bench_field "$check" published)/$(bench_field "$check" delivered)/$(bench_field "$check" delivered_pct)" "4/3/75.00" \
	"checker: a row whose event never reached the handler is not delivered (3 of 4, 75%)"
is "$(bench_field "$check" duplicates)" 1 "checker: a repeated event counts as 1 duplicate"
is "$(bench_field "$check" order_violations)" 2 "checker: v3 before v2 counts 2 order violations (the repeat of v3 is not one)"

bench_teardown
trap - EXIT
is "$(q -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic LIKE 't30.%.$run'")" 0 "subscriptions removed"
is "$(q -c "SELECT count(*) FROM pg_namespace WHERE nspname = '$BENCH_SCHEMA'")" 0 "bench schema dropped"

done_testing
