#!/usr/bin/env bash
# The eventbus processes report their table statistics while they run.
# Autovacuum decides from pg_stat's counts when to vacuum and analyze a
# table: the rows the pool's handlers write, the inbox records it adds and
# the inbox rows the dispatcher prunes must be counted while the processes
# live, not only when they exit.  A background worker flushes its counts
# only if it calls pgstat_report_stat itself (a backend does so when idle).
#
# Handled: 20 events on each transport, the handler writes a row each.
# Pruned: 100 inbox records past eventbus.inbox_retention.  Then, with no
# eventbus process restarted, pg_stat_user_tables must show the handler
# table's 40 inserts, the inbox's 40 records and its 100 deletions.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
N=20
topic() { echo "t57.$1.$run"; }
# pg_stat counts of a table (its OID): inserts and deletes, "INS DEL".
counts() { q -c "SELECT n_tup_ins || ' ' || n_tup_del FROM pg_catalog.pg_stat_user_tables WHERE relid = '$1'::regclass"; }
pids() { q -c "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE backend_type LIKE 'eventbus%'"; }

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't57.%.$run'"

q -v ON_ERROR_STOP=1 >/dev/null <<SQL || bail "could not create the handler"
DROP TABLE IF EXISTS t57_handled;
CREATE TABLE t57_handled (event_id uuid, topic text);
CREATE OR REPLACE FUNCTION t57_handle(e eventbus.envelope) RETURNS void LANGUAGE sql AS \$\$
  INSERT INTO public.t57_handled VALUES (e.event_id, e.topic)
\$\$;
SQL
before=$(pids)
read -r inbox_ins0 inbox_del0 <<< "$(counts eventbus.inbox)"

for tr in kafka nats; do
	q -c "SELECT eventbus_subscribe('$(topic $tr)', 't57_handle(eventbus.envelope)', '$tr')" >/dev/null
	q -c "SELECT count(eventbus_publish('$(topic $tr)', 'agg-' || i, 'T57', '{}'::jsonb, transport => '$tr'))
	        FROM generate_series(1, $N) i" >/dev/null
done
wait_count 120 $((2 * N)) "SELECT count(*) FROM t57_handled" 60
is "$COUNT" $((2 * N)) "every event handled ($N per transport)"

# Records of a subscription of this run, handled 8 days ago: past the
# default retention (7 days), so the dispatcher prunes them.
sub=$(q -c "SELECT id FROM eventbus.subscriptions WHERE topic = '$(topic nats)'")
q -c "INSERT INTO eventbus.inbox (subscription_id, event_id, outcome, handled_at)
      SELECT $sub, gen_random_uuid(), 'handled', now() - interval '8 days' FROM generate_series(1, 100)" >/dev/null
wait_until 60 "[ \"\$(q -c \"SELECT count(*) FROM eventbus.inbox WHERE subscription_id = $sub AND handled_at < now() - interval '7 days'\")\" = 0 ]"
ok $? "the 100 expired inbox records are pruned"

wait_until 30 "[ \"\$(counts t57_handled)\" = '$((2 * N)) 0' ]"
ok $? "pg_stat counts the handler's $((2 * N)) inserts into its table while the pool runs (now: $(counts t57_handled))"
wait_until 30 "[ \$(counts eventbus.inbox | cut -d' ' -f1) -ge $((inbox_ins0 + 100 + 2 * N)) ]"
ok $? "pg_stat counts the pool's $((2 * N)) inbox records (and this test's 100): inserts $inbox_ins0 -> $(counts eventbus.inbox | cut -d' ' -f1)"
wait_until 30 "[ \$(counts eventbus.inbox | cut -d' ' -f2) -ge $((inbox_del0 + 100)) ]"
ok $? "pg_stat counts the dispatcher's 100 prunings: deletes $inbox_del0 -> $(counts eventbus.inbox | cut -d' ' -f2)"
is "$(pids)" "$before" "no eventbus process restarted (the counts were not flushed by an exit)"

q -c "DROP TABLE t57_handled" >/dev/null
done_testing
