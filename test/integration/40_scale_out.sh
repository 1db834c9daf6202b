#!/usr/bin/env bash
# Scale-out and fail-over across PostgreSQL instances (issue 12): two clusters
# of the same stack (the stack's, "c1", and a second one, "c2", from
# cluster2.sh), same brokers and eventbus.consumer_group, both with
# eventbus.consumer_mode = 'shared', each subscribed with the same handler,
# which records (aggregate, version, start time) in its own database.
#
# Events: one Kafka topic of 8 partitions (aggregates k-1..k-1000) and one
# JetStream subject (n-1..n-1000), versions 1..10 per aggregate: 20,000 events
# over 2,000 aggregates.  They are produced by independent clients (kcat,
# natstool) from pre-built files, a version level at a time in chunks of 100
# aggregates, paced: a "third place", so publishing goes on unchanged while
# either cluster stops (a cluster's outbox would stop relaying with it, and
# which cluster publishes would decide what can be stopped).
#
# Phases (a version range each):
#   a  v1-4   both running: both handle a share of the Kafka topic; the
#             JetStream subject is consumed by one instance at a time (by
#             design), shares printed.
#   b  v5-7   c2 stopped (fast) before; once c1 alone consumes all 8
#             partitions, c2 starts (joins) mid-burst, taking partitions from
#             c1 while c1 runs their events; once c2 handles events, c1 stops
#             (fast, leaves) mid-burst; v7 is only produced after c1 has
#             stopped, and c2 handles all of it.
#   c  v8-10  once c2 alone consumes all 8 partitions (and the subject), c1
#             starts (joins) mid-burst; once both handle events, c2 is stopped
#             IMMEDIATELY; v10 produced after that; c1 handles all of it.
# Then c2 is started without the library (to read its table, not to consume)
# and its records are copied next to c1's.  Counted from the two databases'
# own records, separately: lost (in neither), handled twice in one database,
# handled in both databases (must be 0 for a and b, and in c before the
# immediate stop; printed for c, bounded by what c2 had fetched and not
# committed/acknowledged when it was stopped), order within each database (per aggregate, versions
# increase in handler start order), and order across the databases: for each
# aggregate, no version handled in one database started before a lower
# version handled in the other database had committed (commit times from
# track_commit_timestamp, start times from clock_timestamp() in the handler:
# one machine, one clock).  Durations (join, hand-over, take-over after the
# immediate stop) are printed, never asserted.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/cluster2.sh"

run=$(date +%s)$RANDOM
KT="t40.k.$run"          # Kafka topic, 8 partitions
NT="t40.n.$run"          # JetStream subject
NAGGS=1000; NVERS=10; CHUNK=100
PER_VERSION=$((2 * NAGGS))
TOTAL=$((PER_VERSION * NVERS))
W=$(mktemp -d "${TMPDIR:-/tmp}/t40.XXXXXX")
BURST_PID=
CTS_SET=0; CTS_BEFORE=

# ---------------------------------------------------------------------------
# c1 (the stack's cluster) control; c2 is cluster2.sh's
# ---------------------------------------------------------------------------
c1_ready() { both_connected && dispatcher_running; }
c1_stop() { "$STACK" pg-stop "$1" >/dev/null 2>&1; }
c1_start() { "$STACK" pg-start >/dev/null 2>&1 && wait_until 60 c1_ready; }
c1_running() { psql -X -A -t -q -c "SELECT 1" >/dev/null 2>&1; }

t40_cleanup() {
	if [ -n "$BURST_PID" ]; then
		pkill -P "$BURST_PID" 2>/dev/null; kill "$BURST_PID" 2>/dev/null; wait "$BURST_PID" 2>/dev/null
	fi
	c1_running || "$STACK" pg-start >/dev/null 2>&1
	wait_until 60 c1_running
	unsubscribe_like 't40.%'
	q -c "ALTER SYSTEM RESET eventbus.consumer_mode"
	q -c "ALTER SYSTEM RESET eventbus.consumer_group"
	# track_commit_timestamp in auto.conf as it was (effective at the next restart).
	if [ "$CTS_SET" = 1 ]; then
		if [ -z "$CTS_BEFORE" ]; then q -c "ALTER SYSTEM RESET track_commit_timestamp"
		else q -c "ALTER SYSTEM SET track_commit_timestamp = '$CTS_BEFORE'"; fi
	fi
	q -c "SELECT pg_reload_conf()"
	rm -rf -- "$W"
}

# now — seconds since the epoch with microseconds (compared with database
# timestamps: same machine, same clock).
now() { date +%s.%6N; }
# since T — seconds from T to now, 2 decimals.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# ---------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------
consumer_sql_setup
load_wire_functions   # t_fnv1a_partition
consumer_setup
# shellcheck disable=SC2034  # read by lib.sh's consumer_teardown
CONSUMER_CLEANUP="t40_cleanup"
c2_init 'track_commit_timestamp = on'

# The cross-database order check needs commit times in c1 too.  Its
# postgresql.auto.conf must say on (c1 restarts in phase b), and the running
# server too (a restart if not).  What auto.conf said before is restored at
# exit (effective at c1's next restart).
CTS_BEFORE=$(q -c "SELECT setting FROM pg_file_settings WHERE name = 'track_commit_timestamp' AND sourcefile LIKE '%/postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1")
if [ "$CTS_BEFORE" != on ]; then
	q -c "ALTER SYSTEM SET track_commit_timestamp = on" >/dev/null
	CTS_SET=1
fi
if [ "$(q -c "SHOW track_commit_timestamp")" != on ]; then
	c1_stop fast; c1_start || bail "c1 did not come back after the restart for track_commit_timestamp"
fi
# A consumer group of its own: once a group was joined on the dev broker,
# the broker refuses single-mode commits to it (later tests use 'eventbus').
q -c "ALTER SYSTEM SET eventbus.consumer_mode = 'shared'" -c "ALTER SYSTEM SET eventbus.consumer_group = 't40g_$run'" \
	-c "SELECT pg_reload_conf()" >/dev/null
c2_start || bail "cluster 2 did not start (log: $C2_LOG)"
q2 -c "ALTER SYSTEM SET eventbus.consumer_mode = 'shared'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1   # the dispatchers restart for the changed mode
wait_until 60 c1_ready || bail "c1: brokers not connected or dispatcher not running"
c2_wait_ready 60 || bail "c2: brokers not connected or dispatcher not running (log: $C2_LOG)"
is "$(q -c "SHOW eventbus.consumer_mode")/$(q2 -c "SHOW eventbus.consumer_mode")" "shared/shared" \
	"both clusters in consumer_mode shared"
is "$(q -c "SHOW eventbus.consumer_group") $(q -c "SHOW eventbus.kafka_brokers") $(q -c "SHOW eventbus.nats_url")" \
	"$(q2 -c "SHOW eventbus.consumer_group") $(q2 -c "SHOW eventbus.kafka_brokers") $(q2 -c "SHOW eventbus.nats_url")" \
	"same consumer group, Kafka brokers and NATS URL"
is "$(q -c "SHOW track_commit_timestamp")/$(q2 -c "SHOW track_commit_timestamp")" "on/on" "commit timestamps on in both"

"$STACK" kafka-topics "$KT:8" >/dev/null
is "$(kafka_partitions "$KT")" 8 "Kafka topic $KT has 8 partitions"
nats_stream "T40_$run" "$NT"
ok $? "JetStream stream for $NT"

# The same handler and subscriptions in both databases.  The handler records
# the event, its Kafka partition (the payload says which: the test computes
# it, and the producer is told to use it) and its start time; for one aggregate in 100 it then sleeps
# SLOW_S, so that hand-overs find events running (a hand-over that does not
# wait for them shows as events handled in both databases, or as order
# violations across them).
SLOW_S=0.4
setup_sql=$(cat <<SQL
DROP TABLE IF EXISTS t40_handled;
-- No unique constraint: duplicates must be countable.
CREATE TABLE t40_handled (n bigserial, transport text, aggregate_id text, version bigint, event_id uuid,
                          part int, started timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION t40_handler(e eventbus.envelope) RETURNS void LANGUAGE sql AS \$\$
  INSERT INTO public.t40_handled (transport, aggregate_id, version, event_id, part)
  VALUES (e.transport, e.aggregate_id, e.event_version, e.event_id, (e.payload ->> 'part')::int);
  SELECT pg_sleep(CASE WHEN e.payload ->> 'slow' = 'true' THEN $SLOW_S ELSE 0 END);
\$\$;
SQL
)
q -c "$setup_sql" >/dev/null && q2 -c "$setup_sql" >/dev/null
ok $? "handler table and function in both databases"
sub_sql="SELECT eventbus_subscribe('$KT', 't40_handler(eventbus.envelope)'::regprocedure, 'kafka'),
                eventbus_subscribe('$NT', 't40_handler(eventbus.envelope)'::regprocedure, 'nats')"
q -c "$sub_sql" >/dev/null && q2 -c "$sub_sql" >/dev/null
is "$(q -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic IN ('$KT', '$NT')")/$(q2 -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic IN ('$KT', '$NT')")" \
	"2/2" "both databases subscribed to the topic and the subject"

# What is sent, and the chunk files: $W/v<V>.<kafka|nats>.<CHUNK>.
q >/dev/null <<SQL
DROP TABLE IF EXISTS t40_sent;
CREATE TABLE t40_sent AS
  SELECT tr AS transport, left(tr, 1) || '-' || a AS aggregate_id, v::bigint AS version, gen_random_uuid() AS event_id,
         CASE tr WHEN 'kafka' THEN t_fnv1a_partition(left(tr, 1) || '-' || a, 8) END AS part, a % 100 = 0 AS slow
    FROM unnest(ARRAY['kafka', 'nats']) tr, generate_series(1, $NAGGS) a, generate_series(1, $NVERS) v;
SQL
is "$(q -c "SELECT count(*) || ' ' || count(DISTINCT aggregate_id) FROM t40_sent")" "$TOTAL $((2 * NAGGS))" \
	"test data: $TOTAL events over $((2 * NAGGS)) aggregates, versions 1..$NVERS each"
for v in $(seq 1 $NVERS); do
	psql -X -A -t -q -v ON_ERROR_STOP=1 -F $'\t' -c "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T40Happened', version, jsonb_build_object('slow', slow, 'part', part))
	      FROM t40_sent WHERE transport = 'kafka' AND version = $v ORDER BY aggregate_id" |
		split -l $CHUNK -d -a 2 - "$W/v$(printf %02d "$v").kafka."
	psql -X -A -t -q -v ON_ERROR_STOP=1 -c "SELECT t_env(event_id, aggregate_id, 'T40Happened', version, jsonb_build_object('slow', slow, 'part', part))
	      FROM t40_sent WHERE transport = 'nats' AND version = $v ORDER BY aggregate_id" |
		split -l $CHUNK -d -a 2 - "$W/v$(printf %02d "$v").nats."
done
is "$(cat "$W"/v* | wc -l)" "$TOTAL" "chunk files hold the $TOTAL envelopes"

# burst VFROM VTO GATED_FROM SLOW FAST — produce versions VFROM..VTO, chunk
# by chunk (each chunk on both transports), SLOW s apart until the file
# $W/fast exists (the awaited join has happened: no need to stretch the
# burst any more), FAST s apart after; versions from GATED_FROM on wait
# until the file $W/gate exists (at most 120 s).
burst() {
	local vfrom=$1 vto=$2 gated=$3 slow=$4 fast=$5 v f
	rm -f "$W/gate" "$W/fast"
	for v in $(seq "$vfrom" "$vto"); do
		if [ "$v" -ge "$gated" ]; then
			local i=0
			while [ ! -e "$W/gate" ]; do
				i=$((i + 1)); [ $i -gt 1200 ] && { echo "gate never opened"; return 1; }
				sleep 0.1
			done
		fi
		for f in "$W/v$(printf %02d "$v").kafka."*; do
			kafka_produce "$KT" -X partitioner=fnv1a -X message.timeout.ms=30000 < "$f" || return 1
			nats_produce "$NT" --msg-id-from-event-id < "${f/.kafka./.nats.}" || return 1
			if [ -e "$W/fast" ]; then sleep "$fast"; else sleep "$slow"; fi
		done
	done
	echo "burst $vfrom-$vto produced"
}
burst_start() { burst "$@" > "$W/burst.log" 2>&1 & BURST_PID=$!; }
burst_wait() {
	local rc
	wait "$BURST_PID"; rc=$?; BURST_PID=
	[ $rc -eq 0 ] || diag "producer: $(cat "$W/burst.log")"
	return $rc
}

# Counts in one database: cnt1/cnt2 'WHERE ...' on t40_handled.
cnt1() { q -c "SELECT count(*) FROM t40_handled ${1:-}" 2>/dev/null; }
cnt2() { q2 -c "SELECT count(*) FROM t40_handled ${1:-}" 2>/dev/null; }
shares() {   # shares VFROM VTO — per database and transport
	local w="WHERE version BETWEEN $1 AND $2"
	echo "c1 kafka $(cnt1 "$w AND transport = 'kafka'") nats $(cnt1 "$w AND transport = 'nats'")," \
	     "c2 kafka $(cnt2 "$w AND transport = 'kafka'") nats $(cnt2 "$w AND transport = 'nats'")"
}

# ---------------------------------------------------------------------------
# Phase a: both running
# ---------------------------------------------------------------------------
# Versions 3-4 wait until both clusters handle Kafka events (the group's
# first assignments take seconds on the dev broker), so that both running
# really means both consuming.
t0=$(now)
burst_start 1 4 3 1 0.2
both_kafka() { [ "$(cnt1 "WHERE transport = 'kafka'")" -gt 0 ] && [ "$(cnt2 "WHERE transport = 'kafka'")" -gt 0 ]; }
wait_until 45 both_kafka
ok $? "phase a: both clusters handle Kafka events within 45 s ($(shares 1 4) so far)"
diag "phase a: both consuming Kafka $(since "$t0") s after the first produce"
touch "$W/fast" "$W/gate"
burst_wait
ok $? "phase a: versions 1-4 produced ($((4 * PER_VERSION)) events)"
# Complete when every aggregate's version 4 was handled somewhere (per
# aggregate order; the final counts find anything missing).
a_done() { [ $(( $(cnt1 "WHERE version = 4") + $(cnt2 "WHERE version = 4") )) -ge $PER_VERSION ]; }
wait_until 60 a_done
ok $? "phase a: the last version of every aggregate handled within 60 s ($(shares 4 4) of version 4)"
diag "phase a: shares of versions 1-4: $(shares 1 4); $(since "$t0") s from the first produce"

# ---------------------------------------------------------------------------
# Phase b: c2 leaves (idle); once c1 consumes all 8 partitions, c2 joins
# mid-burst (partitions move from c1, with events running there); once c2
# handles events, c1 leaves mid-burst
# ---------------------------------------------------------------------------
# parts DB VMIN — Kafka partitions whose events of versions >= VMIN DB handled.
parts() {
	if [ "$1" = c1 ]; then cnt1 "WHERE transport = 'kafka' AND version >= $2 HAVING count(DISTINCT part) = 8"
	else cnt2 "WHERE transport = 'kafka' AND version >= $2 HAVING count(DISTINCT part) = 8"; fi
}
all_parts() { [[ $(parts "$1" "$2") =~ ^[0-9]+$ ]]; }
c2_stop fast
ok $? "phase b: c2 stopped (fast) between bursts"
burst_start 5 7 7 1.2 0.2
wait_until 45 all_parts c1 5
ok $? "phase b: c1 alone consumes all 8 partitions"
tj=$(now)
c2_start
ok $? "phase b: c2 started mid-burst (joins)"
c2_handles() { [ "$(cnt2 "WHERE version BETWEEN 5 AND 7")" -gt 0 ]; }
wait_until 45 c2_handles; rc=$?
touch "$W/fast"
ok $rc "phase b: c2 handles events of the burst within 45 s of its start (joined the group / took a share)"
diag "phase b: c2's first event $(q2 -c "SELECT round((extract(epoch FROM min(started)) - $tj)::numeric, 2) FROM t40_handled WHERE version BETWEEN 5 AND 7") s after its start; shares so far: $(shares 5 7)"
tl=$(now)
c1_stop fast
ok $? "phase b: c1 stopped (fast) mid-burst (leaves)"
diag "phase b: c1's fast stop took $(since "$tl") s"
touch "$W/gate"   # version 7 only now: all of it after c1 left
burst_wait
ok $? "phase b: versions 5-7 produced, version 7 after c1 had stopped"
b_done() { [ "$(cnt2 "WHERE version = 7")" -ge $PER_VERSION ]; }
wait_until 60 b_done
ok $? "phase b: c2 alone handled all of version 7 within 60 s (got $(cnt2 "WHERE version = 7") of $PER_VERSION)"
diag "phase b: c2 handled version 7 completely $(q2 -c "SELECT round((extract(epoch FROM max(started)) - $tl)::numeric, 2) FROM t40_handled WHERE version = 7") s after c1's stop began"

# ---------------------------------------------------------------------------
# Phase c: c2 consumes all 8 partitions and the subject; c1 joins mid-burst;
# once both handle events, c2 stops IMMEDIATELY mid-burst
# ---------------------------------------------------------------------------
burst_start 8 10 10 1.2 0.2
wait_until 45 all_parts c2 8
ok $? "phase c: c2 alone consumes all 8 partitions"
c1_start
ok $? "phase c: c1 started mid-burst (joins)"
both_handle() { [ "$(cnt1 "WHERE version >= 8")" -gt 0 ] && [ "$(cnt2 "WHERE version >= 8")" -gt 0 ]; }
wait_until 45 both_handle; rc=$?
touch "$W/fast"
ok $rc "phase c: both clusters handle events of the burst (c1 rejoined)"
sleep 2   # both consuming for a while: c2's share at the stop is what it handled last
diag "phase c: shares before the immediate stop: $(shares 8 10)"
ts=$(now)
c2_stop immediate
ok $? "phase c: c2 stopped IMMEDIATELY mid-burst"
touch "$W/gate"
burst_wait
ok $? "phase c: versions 8-10 produced, version 10 after c2 had stopped"
c_done() { [ "$(cnt1 "WHERE version = 10")" -ge $PER_VERSION ]; }
wait_until 90 c_done
ok $? "phase c: c1 alone handled all of version 10 within 90 s (got $(cnt1 "WHERE version = 10") of $PER_VERSION)"
sleep 2   # late redeliveries, if any, show up as duplicates

# ---------------------------------------------------------------------------
# Collect: c2 without the library (reads, does not consume)
# ---------------------------------------------------------------------------
c2_start -c shared_preload_libraries=
ok $? "c2 started without eventbus to read its records"
q -c "DROP TABLE IF EXISTS t40_all" -c "CREATE TABLE t40_all (db text, n bigint, transport text, aggregate_id text, version bigint,
                                                               event_id uuid, started timestamptz, finished timestamptz)" >/dev/null
is "$(q -c "INSERT INTO t40_all SELECT 'c1', n, transport, aggregate_id, version, event_id, started, pg_xact_commit_timestamp(xmin)
             FROM t40_handled" -c "SELECT count(*) FROM t40_all")" "$(cnt1)" "c1's records collected"
q2 -c "\\copy (SELECT 'c2', n, transport, aggregate_id, version, event_id, started, pg_xact_commit_timestamp(xmin) FROM t40_handled) TO STDOUT" |
	q -c "\\copy t40_all FROM STDIN" >/dev/null
is "$(q -c "SELECT count(*) FROM t40_all WHERE db = 'c2'")" "$(q2 -c "SELECT count(*) FROM t40_handled")" "c2's records copied"
c2_stop fast
is "$(q -c "SELECT count(*) FROM t40_all WHERE finished IS NULL")" 0 "every record has its commit time"
q -c "CREATE INDEX ON t40_all (aggregate_id, version)" -c "CREATE INDEX ON t40_all (event_id)" >/dev/null
# The partition of each Kafka message as the test computes it (fnv1a, as
# kcat was told to partition): read back from the broker.
q -c "DROP TABLE IF EXISTS t40_wire; CREATE TABLE t40_wire (key text, part int)" >/dev/null
kcat -C -b "$EVENTBUS_KAFKA_BROKERS" -t "$KT" -o beginning -e -q -f '%k\t%p\n' 2>/dev/null | q -c "\\copy t40_wire FROM STDIN" >/dev/null
is "$(q -c "SELECT count(*) || ' ' || count(*) FILTER (WHERE part = t_fnv1a_partition(key, 8)) FROM t40_wire")" "$((NAGGS * NVERS)) $((NAGGS * NVERS))" \
	"the Kafka topic holds the $((NAGGS * NVERS)) events, each in the partition the test computes"

# ---------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------
ph() { case $1 in a) echo "1 AND 4" ;; b) echo "5 AND 7" ;; c) echo "8 AND 10" ;; esac; }
for p in a b c; do
	r=$(ph $p)
	is "$(q -c "SELECT count(*) FROM t40_sent s WHERE version BETWEEN $r
	             AND NOT EXISTS (SELECT 1 FROM t40_all h WHERE h.event_id = s.event_id)")" 0 \
		"phase $p: 0 lost (every event handled in at least one database)"
	is "$(q -c "SELECT count(*) FROM t40_all h WHERE version BETWEEN $r AND NOT EXISTS
	             (SELECT 1 FROM t40_sent s WHERE s.event_id = h.event_id AND s.aggregate_id = h.aggregate_id
	                 AND s.version = h.version AND s.transport = h.transport)")" 0 \
		"phase $p: nothing handled that was not sent"
	is "$(q -c "SELECT count(*) - count(DISTINCT (db, event_id)) FROM t40_all WHERE version BETWEEN $r")" 0 \
		"phase $p: 0 handled twice within one database"
	both=$(q -c "SELECT count(*) FROM (SELECT event_id FROM t40_all WHERE version BETWEEN $r
	                                    GROUP BY event_id HAVING count(DISTINCT db) > 1) x")
	if [ $p = c ]; then
		# c1's clean join in phase c must not cause any: only c2's work in
		# flight at its immediate stop may be handled again (by c1, after it).
		is "$(q -c "SELECT count(*) FROM (SELECT event_id FROM t40_all WHERE version BETWEEN $r
		                                    GROUP BY event_id HAVING count(DISTINCT db) > 1 AND max(started) < to_timestamp($ts)) x")" 0 \
			"phase c: 0 handled in both databases before the immediate stop (c1's join)"
		diag "phase c: $both events handled in BOTH databases (c2's work in flight at its immediate stop)"
		diag "phase c: of them per transport: $(q -c "SELECT coalesce(string_agg(transport || ' ' || c, ', '), 'none') FROM (SELECT transport, count(*) c FROM
		        (SELECT transport, event_id FROM t40_all WHERE version BETWEEN $r GROUP BY 1, 2 HAVING count(DISTINCT db) > 1) x GROUP BY 1) y")"
	else
		is "$both" 0 "phase $p: 0 handled in both databases"
	fi
	is "$(q -c "SELECT count(*) FROM (SELECT version < lag(version) OVER w AS bad FROM t40_all
	             WHERE version BETWEEN $r
	             WINDOW w AS (PARTITION BY db, aggregate_id ORDER BY started, n)) x WHERE bad")" 0 \
		"phase $p: 0 order violations within each database"
	# Across: y (other database, higher version) started before x committed.
	is "$(q -c "SELECT count(*) FROM t40_all y JOIN t40_all x
	              ON x.aggregate_id = y.aggregate_id AND x.db <> y.db AND x.version < y.version
	             WHERE y.version BETWEEN $r AND y.started < x.finished")" 0 \
		"phase $p: 0 order violations across the databases (no event started before a lower version committed in the other)"
done
# Within-database order over the whole run (a phase's first events follow the last one's).
is "$(q -c "SELECT count(*) FROM (SELECT version < lag(version) OVER w AS bad FROM t40_all
             WINDOW w AS (PARTITION BY db, aggregate_id ORDER BY started, n)) x WHERE bad")" 0 \
	"whole run: 0 order violations within each database"

# Shares.
kshare() { q -c "SELECT count(*) FROM t40_all WHERE db = '$1' AND transport = 'kafka' AND version BETWEEN 1 AND 4"; }
k1=$(kshare c1); k2=$(kshare c2)
ok "$([ "$k1" -gt 0 ] && [ "$k2" -gt 0 ]; echo $?)" "phase a: both clusters handled a share of the Kafka topic (c1 $k1, c2 $k2)"
for p in a b c; do
	diag "phase $p shares: $(q -c "SELECT string_agg(db || ' ' || transport || ' ' || c, ', ' ORDER BY db, transport)
	        FROM (SELECT db, transport, count(*) c FROM t40_all WHERE version BETWEEN $(ph $p) GROUP BY 1, 2) x")"
done

# Which Kafka partitions each cluster consumed in phase a (printed).
for db in c1 c2; do
	diag "phase a: $db consumed Kafka partitions $(q -c "SELECT string_agg(DISTINCT s.part::text, ',') FROM t40_all h JOIN t40_sent s USING (event_id)
	        WHERE h.db = '$db' AND h.transport = 'kafka' AND h.version BETWEEN 1 AND 4")"
done

# Take-over after the immediate stop (printed).  c2's share at the stop: the
# Kafka partitions, and the JetStream subject, whose last event handled
# before the stop was handled by c2; the take-over time is from the stop to
# c1's first event of that share.
q >/dev/null <<SQL
DROP TABLE IF EXISTS t40_unit;
CREATE TABLE t40_unit AS   -- unit: a Kafka partition, or the JetStream subject
  SELECT h.*, coalesce('partition ' || s.part, 'subject') AS unit FROM t40_all h JOIN t40_sent s USING (event_id);
DROP TABLE IF EXISTS t40_c2_share;
CREATE TABLE t40_c2_share AS
  SELECT transport, unit FROM (SELECT DISTINCT ON (unit) transport, unit, db FROM t40_unit
                                WHERE version >= 8 AND started < to_timestamp($ts) ORDER BY unit, started DESC) x
   WHERE db = 'c2';
SQL
for tr in kafka nats; do
	diag "phase c, $tr: c2's share at the immediate stop: $(q -c "SELECT coalesce(string_agg(unit, ', ' ORDER BY unit), 'none') FROM t40_c2_share WHERE transport = '$tr'");" \
	     "c1's first event of it $(q -c "SELECT coalesce(round((extract(epoch FROM min(started)) - $ts)::numeric, 2)::text || ' s after the stop', '-')
	        FROM t40_unit WHERE db = 'c1' AND started > to_timestamp($ts) AND unit IN (SELECT unit FROM t40_c2_share WHERE transport = '$tr')");" \
	     "handled in both: $(q -c "SELECT count(*) FROM (SELECT event_id FROM t40_unit WHERE transport = '$tr' AND version >= 8 GROUP BY 1 HAVING count(DISTINCT db) > 1) x")"
done
diag "phase c: last event handled $(q -c "SELECT round((extract(epoch FROM max(started)) - $ts)::numeric, 2) FROM t40_all WHERE db = 'c1'") s after the immediate stop"

[ "$TAP_FAILED" -eq 0 ] || diag "server logs: c1 $EVENTBUS_PG_LOG, c2 $C2_LOG (kept)"
done_testing
