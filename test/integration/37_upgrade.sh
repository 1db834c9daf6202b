#!/usr/bin/env bash
# Upgrade in place: the extension installed at 0.1.0 with live data
# (subscriptions, handled events in the inbox, dead letters, quarantined
# messages, and events waiting in the outbox while nats-server is down),
# then ALTER EXTENSION eventbus UPDATE on the running server: every row is
# kept, the waiting events are delivered, new events keep flowing, and the
# upgraded schema is the one a fresh 0.2.0 install creates.  SQL newer than
# the loaded library stops the relay and consumers with one log line.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
FRESH=eb_t37_fresh
EXTDIR=$(q -c "SELECT setting FROM pg_config WHERE name = 'SHAREDIR'")/extension
FAKE="$EXTDIR/eventbus--0.2.0--0.99.0.sql"

cleanup() {
	rm -f "$FAKE"
	"$STACK" nats-start >/dev/null 2>&1
	q -c "DROP EXTENSION IF EXISTS eventbus CASCADE" >/dev/null 2>&1
	q -c "CREATE EXTENSION eventbus" >/dev/null 2>&1
	qdb postgres -c "DROP DATABASE IF EXISTS $FRESH" >/dev/null 2>&1
}
trap cleanup EXIT

q -c "DROP EXTENSION IF EXISTS eventbus CASCADE" >/dev/null
q -c "CREATE EXTENSION eventbus VERSION '0.1.0'" >/dev/null || bail "CREATE EXTENSION eventbus VERSION '0.1.0'"
is "$(q -c "SELECT extversion FROM pg_extension WHERE extname = 'eventbus'")" 0.1.0 "installed at 0.1.0"
wait_until 60 both_connected && wait_until 30 dispatcher_running
ok $? "relay and dispatcher run against the 0.1.0 schema"

q >/dev/null <<SQL
DROP TABLE IF EXISTS t37_handled;
CREATE TABLE t37_handled (n bigserial, transport text, aggregate_id text, version bigint, event_id uuid);
CREATE OR REPLACE FUNCTION t37_handler(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
  IF e.event_type = 'Poison' THEN RAISE EXCEPTION 'poison %', e.event_id; END IF;
  INSERT INTO public.t37_handled (transport, aggregate_id, version, event_id) VALUES (e.transport, e.aggregate_id, e.event_version, e.event_id);
END \$\$;
SQL
for tr in kafka nats; do
	q -c "SELECT eventbus_subscribe('t37.$tr.$run', 't37_handler(eventbus.envelope)', '$tr', 2)" >/dev/null
done
sleep 2
for tr in kafka nats; do
	q -c "SELECT eventbus_publish('t37.$tr.$run', 'a-' || (i % 20), 'Happened', '{}', '$tr') FROM generate_series(1, 200) i" >/dev/null
	q -c "SELECT eventbus_publish('t37.$tr.$run', 'poison', 'Poison', '{}', '$tr')" >/dev/null
done
printf 'k\tnot json\n' | kafka_produce "t37.kafka.$run"
printf 'not json\n' | nats_produce "t37.nats.$run"
wait_until 90 "[ \"\$(q -c 'SELECT count(*) FROM t37_handled')\" = 400 ] && [ \"\$(q -c 'SELECT count(*) FROM eventbus.dead_letters')\" = 2 ] && [ \"\$(q -c 'SELECT count(*) FROM eventbus.quarantine')\" = 2 ]"
ok $? "at 0.1.0: 400 events handled, 2 dead-lettered, 2 quarantined"

# Events that wait in the outbox across the upgrade.
"$STACK" nats-stop >/dev/null
q -c "SELECT eventbus_publish('t37.nats.$run', 'b-' || (i % 10), 'Happened', '{}', 'nats') FROM generate_series(1, 50) i" >/dev/null

counts() {
	q -c "SELECT (SELECT count(*) FROM eventbus.subscriptions) || ' ' || (SELECT count(*) FROM eventbus.inbox) || ' ' ||
	             (SELECT count(*) FROM eventbus.dead_letters) || ' ' || (SELECT count(*) FROM eventbus.quarantine) || ' ' ||
	             (SELECT count(*) FROM eventbus.outbox) || ' ' || (SELECT count(*) FROM eventbus.aggregate_versions)"
}
before=$(counts)
diag "subscriptions inbox dead_letters quarantine outbox versions before: $before"
q -c "ALTER EXTENSION eventbus UPDATE" >/dev/null
ok $? "ALTER EXTENSION eventbus UPDATE on the live database"
is "$(q -c "SELECT extversion FROM pg_extension WHERE extname = 'eventbus'")" 0.2.0 "now at 0.2.0"
is "$(counts)" "$before" "every subscription, inbox row, dead letter, quarantined message, outbox row and version kept"
is "$(q -c "SELECT count(*) > 0 FROM eventbus.metrics")" t "the 0.2.0 metrics view answers"

"$STACK" nats-start >/dev/null
wait_until 60 both_connected
wait_until 90 "[ \"\$(q -c 'SELECT count(*) FROM t37_handled')\" = 450 ] && outbox_empty"
ok $? "the 50 events that waited in the outbox are delivered and handled after the upgrade"
for tr in kafka nats; do
	q -c "SELECT eventbus_publish('t37.$tr.$run', 'c-' || (i % 10), 'Happened', '{}', '$tr') FROM generate_series(1, 100) i" >/dev/null
done
wait_until 90 "[ \"\$(q -c 'SELECT count(*) FROM t37_handled')\" = 650 ]"
ok $? "new events keep flowing on both transports (650 handled)"
is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t37_handled")" 0 "none handled twice"
is "$(q -c "SELECT count(*) FROM (SELECT aggregate_id, version, lag(version) OVER (PARTITION BY transport, aggregate_id ORDER BY n) AS prev FROM t37_handled) s WHERE prev IS NOT NULL AND version <> prev + 1")" 0 \
	"every aggregate handled in version order across the upgrade"

# The upgraded schema is what a fresh 0.2.0 install creates.
schema() {
	qdb "$1" -c "SELECT pg_describe_object(d.classid, d.objid, d.objsubid) || ' | ' ||
	                    coalesce(obj_description(d.objid, (SELECT relname FROM pg_class WHERE oid = d.classid)::name), '') || ' | ' ||
	                    coalesce((SELECT pg_get_functiondef(d.objid) FROM pg_proc p WHERE d.classid = 'pg_proc'::regclass AND p.oid = d.objid AND p.prokind <> 'a'), '') || ' | ' ||
	                    coalesce((SELECT pg_get_viewdef(d.objid) FROM pg_class c WHERE d.classid = 'pg_class'::regclass AND c.oid = d.objid AND c.relkind = 'v'), '')
	               FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'eventbus'
	              WHERE d.deptype = 'e' ORDER BY 1"
	qdb "$1" -c "SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
	               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
	              WHERE n.nspname = 'eventbus' AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1"
	qdb "$1" -c "SELECT grantee || ' ' || privilege_type || ' ' || table_name FROM information_schema.role_table_grants WHERE table_schema = 'eventbus' ORDER BY 1"
	qdb "$1" -c "SELECT p.proname || ' ' || coalesce(array_to_string(p.proacl, ','), '') FROM pg_proc p WHERE p.proname LIKE 'eventbus\_%' OR p.pronamespace = 'eventbus'::regnamespace ORDER BY 1"
	qdb "$1" -c "SELECT conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace = 'eventbus'::regnamespace ORDER BY 1"
	qdb "$1" -c "SELECT indexrelid::regclass || ' ' || pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'eventbus'::regnamespace) ORDER BY 1"
	qdb "$1" -c "SELECT relname || ' ' || coalesce(array_to_string(reloptions, ','), '') FROM pg_class WHERE relnamespace = 'eventbus'::regnamespace ORDER BY 1"
	qdb "$1" -c "SELECT tgname || ' ' || pg_get_triggerdef(oid) || ' ' || coalesce(obj_description(oid, 'pg_trigger'), '') FROM pg_trigger
	              WHERE NOT tgisinternal AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'eventbus'::regnamespace) ORDER BY 1"
}
qdb postgres -c "DROP DATABASE IF EXISTS $FRESH" >/dev/null
qdb postgres -c "CREATE DATABASE $FRESH" >/dev/null
qdb "$FRESH" -c "CREATE EXTENSION eventbus" >/dev/null
diff <(schema "$PGDATABASE") <(schema "$FRESH") >"$EVENTBUS_STATE/t37.schema.diff"
ok $? "the upgraded schema equals a fresh 0.2.0 install (objects, comments, functions, view, columns, grants, constraints, indexes, storage parameters, triggers)"
[ -s "$EVENTBUS_STATE/t37.schema.diff" ] && diag "$(head -20 "$EVENTBUS_STATE/t37.schema.diff")"

# SQL newer than the loaded library: relay and consumers stop, with one log line.
printf -- "-- test only\n" >"$FAKE"
log_from=$(stat -c %s "$EVENTBUS_PG_LOG")
q -c "ALTER EXTENSION eventbus UPDATE TO '0.99.0'" >/dev/null
wait_until 20 "tail -c +$((log_from + 1)) \"$EVENTBUS_PG_LOG\" | grep -q 'extension eventbus is at version 0.99.0, which this eventbus library (0.2.0) does not run'"
ok $? "SQL newer than the library: the launcher says so, and how to fix it (restart)"
wait_until 20 '! dispatcher_running'
ok $? "the dispatcher and its pool stop"
sleep 2
is "$(tail -c +$((log_from + 1)) "$EVENTBUS_PG_LOG" | grep -c 'extension eventbus is at version 0.99.0')" 1 "said once, not in a loop"

done_testing
