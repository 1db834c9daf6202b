#!/usr/bin/env bash
# The wire format is UTF-8 whatever the database encoding: with
# eventbus.database a LATIN1 database, events with non-ASCII text (payload,
# event type, trace and correlation ids, header values) go out as UTF-8
# (read back raw from Kafka with kcat), come back in through both transports
# without being quarantined, and reach the handler as the same text.
source "$(dirname "$0")/lib.sh"

LDB=eb_latin1_wire
run=$(date +%s)$RANDOM
TK="t34.kafka.$run"; TN="t34.nats.$run"
ORIG_DB=$(q -c "SHOW eventbus.database")

restart_pg() {
	"$STACK" pg-stop fast >/dev/null
	"$STACK" pg-start >/dev/null
}
cleanup() {
	q -c "ALTER SYSTEM RESET eventbus.database" >/dev/null
	restart_pg
	qdb postgres -c "DROP DATABASE IF EXISTS $LDB WITH (FORCE)" >/dev/null
	wait_until 60 both_connected || diag "brokers not connected again after the test"
}

qdb postgres -c "DROP DATABASE IF EXISTS $LDB WITH (FORCE)" >/dev/null
qdb postgres -c "CREATE DATABASE $LDB ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'" >/dev/null ||
	bail "could not create a LATIN1 database"
q -c "ALTER SYSTEM SET eventbus.database = '$LDB'" >/dev/null
restart_pg
trap cleanup EXIT
[ -n "${T34_KEEP:-}" ] && trap - EXIT
l() { PGCLIENTENCODING=UTF8 qdb "$LDB" "$@"; }
l -c "CREATE EXTENSION eventbus" >/dev/null || bail "CREATE EXTENSION in $LDB"
wait_until 60 '[ "$(l -c "SELECT count(*) FROM eventbus_status() WHERE component = '"'launcher'"' AND state = '"'connected'"'")" = 2 ]'
ok $? "the launcher runs in the LATIN1 database, both brokers connected"

# The handler stores what it receives; text compared in the database encoding.
l >/dev/null <<'SQL'
CREATE TABLE got (transport text, event_type text, trace_id text, correlation_id text, note text, header text);
CREATE FUNCTION keep(e eventbus.envelope) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.got VALUES (e.transport, e.event_type, e.trace_id, e.correlation_id,
                                 e.payload ->> 'note',
                                 (SELECT h.value FROM jsonb_each_text(e.headers) h WHERE lower(h.key) = 'x-note'))
$$;
SQL
for tr in kafka nats; do
	t=$TK; [ $tr = nats ] && t=$TN
	l -c "SELECT eventbus_subscribe('$t', 'keep(eventbus.envelope)'::regprocedure, transport => '$tr')" >/dev/null ||
		bail "subscribe $tr"
	l -c "SELECT eventbus_publish('$t', 'agg-1', 'Créé', '{\"note\": \"café déjà vu\"}'::jsonb,
	                              trace_id => 'tr-é', correlation_id => 'co-ü',
	                              headers => '{\"x-note\": \"naïve\"}'::jsonb, transport => '$tr')" >/dev/null ||
		bail "publish $tr"
done

wait_until 60 '[ "$(l -c "SELECT count(*) FROM got")" = 2 ]'
ok $? "both events handled (none quarantined)"
is "$(l -c "SELECT count(*) FROM eventbus.quarantine")" 0 "nothing quarantined"
for tr in kafka nats; do
	is "$(l -c "SELECT event_type || '|' || trace_id || '|' || correlation_id || '|' || note || '|' || header FROM got WHERE transport = '$tr'")" \
		"Créé|tr-é|co-ü|café déjà vu|naïve" "$tr: the handler got the same text back"
done

# Kafka, read raw: the value and the header are UTF-8 bytes.
raw=$(kcat -b "$EVENTBUS_KAFKA_BROKERS" -C -t "$TK" -o beginning -e -q -f '%s\n' 2>/dev/null | od -An -tx1 | tr -d ' \n')
case "$raw" in *636166c3a920*) r=0 ;; *) r=1 ;; esac   # "caf" c3 a9 " "
ok $r "Kafka: the payload's é is sent as UTF-8 (c3 a9)"
case "$raw" in *4372c3a9c3a9*) r=0 ;; *) r=1 ;; esac   # "Cré" "é"
ok $r "Kafka: the event type Créé is sent as UTF-8"
hdr=$(kcat -b "$EVENTBUS_KAFKA_BROKERS" -C -t "$TK" -o beginning -e -q -f '%h\n' 2>/dev/null | od -An -tx1 | tr -d ' \n')
case "$hdr" in *6e61c3af7665*) r=0 ;; *) r=1 ;; esac   # "na" c3 af "ve"
ok $r "Kafka: the header value naïve is sent as UTF-8"

done_testing
