#!/usr/bin/env bash
# A commit after which an event may leave, or after which a broker message
# is acknowledged, is durable whatever synchronous_commit says (a role's,
# a database's or a session's setting):
#  - a transaction that called eventbus_publish, in a session with
#    synchronous_commit = off: its WAL is flushed when COMMIT returns, so
#    the relay never sends an event that a crash could still take back;
#  - the pool's handler transaction commits without waiting for the flush,
#    and the dispatcher acknowledges the message only once the WAL is
#    flushed past it, flushing it itself when nothing else does: with
#    nothing else flushing, the WAL is flushed past the handler's commit
#    within seconds, and a crash (pg_ctl stop -m immediate) right after
#    that loses nothing and repeats nothing;
#  - with the database's default at synchronous_commit = off (the
#    dispatcher starts with it): the dispatcher's write to
#    eventbus.quarantine is flushed before the message is acknowledged (its
#    row is visible only then);
#  - with synchronous replication configured (synchronous_standby_names,
#    synchronous_commit on), the pool's commit waits for the standby like
#    any other: with no standby connected it waits (wait event SyncRep) and
#    its rows stay invisible until synchronous_standby_names is emptied;
#  - meanwhile the dispatcher logged no refused flush ("xlog flush request
#    ... is not satisfied"), which a position past the end of WAL causes.
# The WAL writer is slowed for the test (wal_writer_delay 10 s,
# wal_writer_flush_after 1 GB), so that nothing but the commit itself
# flushes in the seconds the test looks; the control, an ordinary
# transaction with synchronous_commit = off, shows that: it is not flushed.
# What is compared: pg_current_wal_flush_lsn() against the WAL insert
# position read inside the transaction (by the session itself, by the
# handler, by a trigger on eventbus.quarantine), i.e. before its commit
# record.
# shellcheck source=test/integration/lib.sh
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
db=$(q -c "SELECT current_database()")

cleanup() {
	unsubscribe_like "t43.%.$run" >/dev/null
	q -c "DROP TRIGGER IF EXISTS t43_lsn ON eventbus.quarantine" >/dev/null
	q -c "ALTER DATABASE \"$db\" RESET synchronous_commit" >/dev/null
	q -c "ALTER SYSTEM RESET wal_writer_delay" -c "ALTER SYSTEM RESET wal_writer_flush_after" \
		-c "ALTER SYSTEM RESET synchronous_standby_names" -c "SELECT pg_reload_conf()" >/dev/null
	restart_workers
}
CONSUMER_CLEANUP=cleanup
consumer_setup
LOG_FROM=$(stat -c %s "$EVENTBUS_PG_LOG")

q -c "ALTER SYSTEM SET wal_writer_delay = '10s'" -c "ALTER SYSTEM SET wal_writer_flush_after = '1GB'" -c "SELECT pg_reload_conf()" >/dev/null
wait_until 10 "[ \"\$(q -c 'SHOW wal_writer_delay')\" = 10s ]" || bail "wal_writer_delay not reloaded"

# flushed_after SQL — in one session with synchronous_commit = off: BEGIN,
# SQL, read the WAL insert position, COMMIT; then whether the WAL is flushed
# past that position (t / f).
flushed_after() {
	q <<SQL
SET synchronous_commit = off;
BEGIN;
$1 \g /dev/null
SELECT pg_current_wal_insert_lsn() AS l \gset
COMMIT;
SELECT pg_current_wal_flush_lsn() >= :'l'::pg_lsn;
SQL
}

q -c "CREATE TABLE IF NOT EXISTS t43_plain (n int)" >/dev/null
is "$(flushed_after "INSERT INTO t43_plain VALUES (1)")" f \
	"control: an ordinary transaction with synchronous_commit = off is not flushed at COMMIT (the WAL writer waits)"
for tr in kafka nats; do
	is "$(flushed_after "SELECT eventbus_publish('t43.pub.$tr.$run', 'a1', 'Created', '{}', '$tr')")" t \
		"$tr: a publishing transaction with synchronous_commit = off is flushed when COMMIT returns"
done
wait_outbox_empty 30 || diag "outbox not empty after 30 s"

# The database's default: synchronous_commit = off, for the dispatcher and
# the pool too once they restart.
q -c "ALTER DATABASE \"$db\" SET synchronous_commit = off" >/dev/null
restart_workers || bail "eventbus workers not restarted"

q >/dev/null <<SQL
CREATE TABLE IF NOT EXISTS t43_seen (topic text, lsn pg_lsn, sc text);
CREATE OR REPLACE FUNCTION t43_handler(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
  INSERT INTO public.t43_seen VALUES (e.topic, pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.current_setting('synchronous_commit'));
END \$\$;
CREATE OR REPLACE FUNCTION t43_quarantine_lsn() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
  INSERT INTO public.t43_seen VALUES (NEW.topic, pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.current_setting('synchronous_commit'));
  RETURN NULL;
END \$\$;
DROP TRIGGER IF EXISTS t43_lsn ON eventbus.quarantine;
CREATE TRIGGER t43_lsn AFTER INSERT ON eventbus.quarantine FOR EACH ROW EXECUTE FUNCTION t43_quarantine_lsn();
SQL

for tr in kafka nats; do
	topic="t43.h.$tr.$run"
	q -c "SELECT eventbus_subscribe('$topic', 't43_handler(eventbus.envelope)', '$tr')" >/dev/null
	q -c "SELECT eventbus_publish('$topic', 'a1', 'Created', '{}', '$tr')" >/dev/null
	wait_count 60 1 "SELECT count(*) FROM t43_seen WHERE topic = '$topic'" || diag "$tr: handler not run within 60 s"
	wait_until 5 "[ \"\$(q -c \"SELECT pg_current_wal_flush_lsn() >= lsn FROM t43_seen WHERE topic = '$topic'\")\" = t ]"
	ok $? "$tr: the WAL is flushed past the pool's handler transaction within 5 s, with nothing else flushing it (the dispatcher does, before it acknowledges)"

	topic="t43.q.$tr.$run"
	[ "$tr" = nats ] && nats_stream "T43Q$run" "$topic"
	q -c "SELECT eventbus_subscribe('$topic', 't43_handler(eventbus.envelope)', '$tr')" >/dev/null
	if [ "$tr" = kafka ]; then
		printf 'k1\tnot an envelope\n' | kafka_produce "$topic"
	else
		echo 'not an envelope' | nats_produce "$topic"
	fi
	wait_count 60 1 "SELECT count(*) FROM eventbus.quarantine WHERE topic = '$topic'" || diag "$tr: not quarantined within 60 s"
	is "$(q -c "SELECT pg_current_wal_flush_lsn() >= lsn, sc FROM t43_seen WHERE topic = '$topic'")" "t|off" \
		"$tr: the dispatcher's quarantine write (synchronous_commit off by the database) is flushed before it is visible"
done

# A crash right after the handlers ran (and Kafka's auto-commit interval,
# 1 s, passed): each event handled exactly once after the restart.
for tr in kafka nats; do
	q -c "SELECT eventbus_subscribe('t43.c.$tr.$run', 't43_handler(eventbus.envelope)', '$tr')" >/dev/null
	q -c "SELECT eventbus_publish('t43.c.$tr.$run', 'a1', 'Created', '{}', '$tr')" >/dev/null
done
wait_count 60 2 "SELECT count(*) FROM t43_seen WHERE topic LIKE 't43.c.%.$run'" || diag "crash events not handled within 60 s"
sleep 1.5
"$STACK" pg-stop immediate >/dev/null
ok $? "pg_ctl stop -m immediate right after the handlers ran"
"$STACK" pg-start >/dev/null
ok $? "PostgreSQL started again"
wait_until 60 both_connected && wait_until 60 dispatcher_running
ok $? "eventbus back after the restart"
for tr in kafka nats; do
	wait_count 30 1 "SELECT count(*) FROM t43_seen WHERE topic = 't43.c.$tr.$run'"
	sleep 3
	is "$(q -c "SELECT count(*) FROM t43_seen WHERE topic = 't43.c.$tr.$run'")" 1 \
		"$tr: after the crash, the event was handled exactly once (acknowledged only once durable)"
done

# Synchronous replication configured, no standby: the pool's commit waits.
# This session commits with synchronous_commit = local, so it does not.
q -c "ALTER DATABASE \"$db\" RESET synchronous_commit" >/dev/null
restart_workers || bail "eventbus workers not restarted"
export PGOPTIONS="${PGOPTIONS:-} -c synchronous_commit=local"
q -c "SELECT eventbus_subscribe('t43.s.nats.$run', 't43_handler(eventbus.envelope)', 'nats')" >/dev/null
q -c "ALTER SYSTEM SET synchronous_standby_names = 't43_nobody'" -c "SELECT pg_reload_conf()" >/dev/null
wait_until 10 "[ \"\$(q -c 'SHOW synchronous_standby_names')\" = t43_nobody ]" || bail "synchronous_standby_names not reloaded"
q -c "SELECT eventbus_publish('t43.s.nats.$run', 'a1', 'Created', '{}', 'nats')" >/dev/null
wait_until 30 "[ \"\$(q -c \"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'eventbus worker' AND wait_event = 'SyncRep'\")\" = 1 ]"
ok $? "synchronous replication configured: the pool's commit waits for the standby (wait event SyncRep)"
is "$(q -c "SELECT count(*) FROM t43_seen WHERE topic = 't43.s.nats.$run'")" 0 \
	"its handler's rows are not visible while it waits"
q -c "ALTER SYSTEM RESET synchronous_standby_names" -c "SELECT pg_reload_conf()" >/dev/null
wait_count 30 1 "SELECT count(*) FROM t43_seen WHERE topic = 't43.s.nats.$run'"
ok $? "synchronous_standby_names emptied: the commit completes, the event is handled once"

# The dispatcher's own flushes asked for no position past the end of WAL
# (a completion's position taken exactly at a page boundary once did).
is "$(tail -c +$((LOG_FROM + 1)) "$EVENTBUS_PG_LOG" | grep -c 'eventbus dispatcher ERROR:  xlog flush request')" 0 \
	"no 'xlog flush request ... is not satisfied' error from the dispatcher"

q -c "DROP TABLE t43_plain, t43_seen" >/dev/null
done_testing
