#!/usr/bin/env bash
# A transport that is not configured: publishing to it is an ERROR (55000,
# with a HINT) and the transaction's other work is unaffected.
source "$(dirname "$0")/lib.sh"

wait_until 20 both_connected || bail "brokers not connected"
q -c "ALTER SYSTEM SET eventbus.nats_url = ''" -c "SELECT pg_reload_conf()" >/dev/null
wait_until 20 '[ "$(broker_state nats)" = off ]'
ok $? "NATS off once eventbus.nats_url is empty"
consumer_nats() { q -c "SELECT state FROM eventbus_status() WHERE component = 'dispatcher' AND transport = 'nats'"; }
wait_until 30 '[ "$(consumer_nats)" = off ]'
ok $? "the dispatcher follows the reload too (its NATS consumer is off)"
out=$(psql -X -A -t -q 2>&1 <<'SQL'
\set VERBOSITY verbose
SELECT eventbus_publish('t13.orders', 'o-1', 'Created', '{}', 'nats');
SQL
)
echo "$out" | sed 's/^/#   /'
ok "$(grep -q 'ERROR:  55000: transport "nats" is not configured' <<< "$out"; echo $?)" "publish to an unconfigured transport: 55000"
ok "$(grep -q 'HINT:  Set eventbus.nats_url' <<< "$out"; echo $?)" "with a HINT naming the setting"

q -c "DROP TABLE IF EXISTS t13_work; CREATE TABLE t13_work (v int)" >/dev/null
res=$(q <<'SQL'
BEGIN;
INSERT INTO t13_work VALUES (1);
DO $$ BEGIN
  PERFORM eventbus_publish('t13.orders', 'o-1', 'Created', '{}', 'nats');
EXCEPTION WHEN object_not_in_prerequisite_state THEN RAISE NOTICE 'caught %', SQLSTATE;
END $$;
SELECT eventbus_publish('t13.orders', 'o-1', 'Created', '{}', 'kafka') IS NOT NULL;
INSERT INTO t13_work VALUES (2);
COMMIT;
SELECT count(*) FROM t13_work;
SQL
)
is "$(echo "$res" | tail -1)" "2" "the transaction's other work committed after the caught error"

q -c "ALTER SYSTEM RESET eventbus.nats_url" -c "SELECT pg_reload_conf()" >/dev/null
wait_until 20 both_connected
ok $? "NATS reconnects when the setting comes back (SIGHUP)"
wait_until 30 '[ "$(consumer_nats)" = connected ]'
ok $? "the dispatcher's NATS consumer reconnects too"
wait_outbox_empty 60
ok $? "the Kafka event of that transaction was relayed"

done_testing
