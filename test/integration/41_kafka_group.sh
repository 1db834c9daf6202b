#!/usr/bin/env bash
# Kafka consumer-group hand-over (eventbus.consumer_mode = shared) between two
# PostgreSQL clusters on one topic of 8 partitions, with slow handlers running
# at the moment partitions move.  Cluster 1 consumes alone; then slow events
# (3 s, in 4 of the partitions, two in each half) run on cluster 1, cluster 2
# joins while they run (a rebalance: cluster 1's revoke must wait for them),
# and the next versions of the same aggregates arrive during the hand-over.
# Later cluster 2 leaves with a fast stop while one of its handlers runs a
# slow event and later events of that partition were already handled; then a
# pool worker of cluster 1 is killed (PostgreSQL restarts; its dispatcher
# joins the group again as a new member).  From the two databases' own
# records:
#   - nothing lost (every event handled in one database or the other);
#   - no event handled twice in one database, none handled in both (the
#     fast stop drains: the running handler finishes and commits first);
#   - per aggregate (first handling of each event), versions in order across
#     both databases, and when an aggregate moved, the new owner started its
#     next event only after the old owner's handler of the previous one
#     finished;
#   - both clusters handled a share, and each logged its rebalances.
# It can fail: without the drain, or without re-sending the commits the dev
# broker refuses mid-rebalance, events of the join are handled in both
# databases and out of order.  Its own consumer group: once a group was
# joined on the dev broker, the broker refuses the commits of single-mode
# consumers of it.
# T41_ASSIGNOR names partition.assignment.strategy for both clusters (in
# eventbus.kafka_properties); unset: librdkafka's default, range,roundrobin
# (eager rebalances: every member gives up all its partitions).  Test 44 runs
# this test with cooperative-sticky (incremental rebalances), and then also
# asserts that cluster 1 gave up only the partitions that moved.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/cluster2.sh"

run=$(date +%s)$RANDOM
TOPIC="t41.$run"
GROUP="eventbus-t41-$run"
NPARTS=8
SLOW=3                         # seconds a slow handler runs at the join
# At the fast stop: a handler shorter than the stop's drain (3 s), so that it
# finishes there however late before the stop it started.  A 3 s one started
# just before the stop is cut at the drain deadline: the product's bound, not
# what this asserts (the docs say such work is handled again elsewhere).
STOP_SLOW=2
T0=$SECONDS

# Every Kafka subscription of the database joins the group: another test's
# left behind would share it (and, with cooperative-sticky, the balance).
others=$(q -c "SELECT string_agg(topic, ', ') FROM eventbus.subscriptions WHERE transport = 'kafka'")
[ -z "$others" ] || bail "Kafka subscriptions left behind by another test: $others"
"$STACK" kafka-topics "$TOPIC:$NPARTS" >/dev/null || bail "could not create $TOPIC"
consumer_sql_setup
consumer_setup
OLD_MODE=$(q -c "SHOW eventbus.consumer_mode")
OLD_GROUP=$(q -c "SHOW eventbus.consumer_group")
ASSIGNOR=${T41_ASSIGNOR:-}
PROPS_CLEANUP=
if [ -n "$ASSIGNOR" ]; then
	OLD_PROPS=$(q -c "SHOW eventbus.kafka_properties")
	[ -n "$(q -c "SELECT 1 FROM pg_file_settings WHERE name = 'eventbus.kafka_properties' AND sourcefile LIKE '%/postgresql.auto.conf'")" ] &&
		bail "eventbus.kafka_properties is set with ALTER SYSTEM already (a test left it behind?)"
	PROPS_CLEANUP="q -c 'ALTER SYSTEM RESET eventbus.kafka_properties';"
fi
CONSUMER_CLEANUP="q -c \"SELECT eventbus_unsubscribe('$TOPIC', 't41_handler(eventbus.envelope)', 'kafka')\";
 q -c \"ALTER SYSTEM SET eventbus.consumer_mode = '$OLD_MODE'\"; q -c \"ALTER SYSTEM SET eventbus.consumer_group = '$OLD_GROUP'\";
 $PROPS_CLEANUP q -c 'SELECT pg_reload_conf()'"

SCHEMA=$(cat <<'SQL'
DROP TABLE IF EXISTS t41_handled;
-- No unique constraint: duplicates must be countable.
CREATE TABLE t41_handled (aggregate_id text, version bigint, event_id uuid,
                          started timestamptz, finished timestamptz);
CREATE OR REPLACE FUNCTION t41_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  IF (e.payload->>'sleep') IS NOT NULL THEN PERFORM pg_sleep((e.payload->>'sleep')::float8); END IF;
  INSERT INTO public.t41_handled VALUES (e.aggregate_id, e.event_version, e.event_id, t0, clock_timestamp());
END $$;
SQL
)
q -c "$SCHEMA" >/dev/null
q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t41_sent, t41_c2;
CREATE TABLE t41_sent (part int, aggregate_id text, version bigint, event_id uuid, sleep float8);
CREATE TABLE t41_c2 (aggregate_id text, version bigint, event_id uuid, started timestamptz, finished timestamptz);
SQL

# Shared mode in its own group on cluster 1 (cluster 2 copies these settings).
q -c "ALTER SYSTEM SET eventbus.consumer_group = '$GROUP'" -c "ALTER SYSTEM SET eventbus.consumer_mode = 'shared'" \
	-c "SELECT pg_reload_conf()" >/dev/null
if [ -n "$ASSIGNOR" ]; then
	q -c "ALTER SYSTEM SET eventbus.kafka_properties = '${OLD_PROPS//\'/\'\'}${OLD_PROPS:+;}partition.assignment.strategy=$ASSIGNOR'" \
		-c "SELECT pg_reload_conf()" >/dev/null || bail "could not set partition.assignment.strategy=$ASSIGNOR"
	diag "partition.assignment.strategy=$ASSIGNOR on both clusters"
fi
LOG_START=$(wc -c < "$EVENTBUS_PG_LOG")
c2_init
c2_start || bail "cluster 2 did not start"
c2_wait_ready 60 || bail "cluster 2 not ready"
wait_until 30 dispatcher_running || bail "dispatcher of cluster 1 not running"
q2 -c "$SCHEMA" >/dev/null

# produce BATCH VMIN VMAX NAGG [slow|each|stop] — versions VMIN..VMAX of NAGG
# aggregates per partition (aggregate b-P-N lives on partition P).  slow:
# version VMIN of the first aggregate of partitions 2..5 sleeps SLOW seconds —
# two in each half of the topic, so whichever half moves, slow handlers of it
# run (one per pool worker, all at once).  each: every event sleeps 10 ms.
# stop: as each, and version VMIN of the first aggregate of partitions 1 and
# 6 (one in each half) sleeps STOP_SLOW seconds.
produce() {
	local batch=$1 vmin=$2 vmax=$3 nagg=$4 slow=${5:-} p
	q -c "INSERT INTO t41_sent
	      SELECT p, '$batch-' || p || '-' || a, v, gen_random_uuid(),
	             CASE WHEN '$slow' = 'slow' AND a = 1 AND v = $vmin AND p BETWEEN 2 AND 5 THEN $SLOW
	                  WHEN '$slow' = 'stop' AND a = 1 AND v = $vmin AND p IN (1, 6) THEN $STOP_SLOW
	                  WHEN '$slow' IN ('each', 'stop') THEN 0.01 END
	        FROM generate_series(0, $NPARTS - 1) p, generate_series(1, $nagg) a, generate_series($vmin, $vmax) v" >/dev/null
	for p in $(seq 0 $((NPARTS - 1))); do
		psql -X -A -t -q -v ON_ERROR_STOP=1 -F $'\t' -c "
			SELECT aggregate_id, t_env(event_id, aggregate_id, 'T41', version,
			                           CASE WHEN sleep IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('sleep', sleep) END)
			  FROM t41_sent WHERE part = $p AND aggregate_id LIKE '$batch-%' AND version BETWEEN $vmin AND $vmax
			 ORDER BY version, aggregate_id" | kafka_produce "$TOPIC" -p "$p" || return 1
	done
}
handled1() { q -c "SELECT count(*) FROM t41_handled"; }
handled2() { q2 -c "SELECT count(*) FROM t41_handled"; }
handled_total() { echo $(( $(handled1) + $(handled2) )); }
# sent events handled on cluster 1 or (records copied from) cluster 2, once each
handled_distinct() {
	q -c "SELECT count(*) FROM t41_sent s WHERE EXISTS (SELECT 1 FROM t41_handled h WHERE h.event_id = s.event_id)
	                                        OR EXISTS (SELECT 1 FROM t41_c2 h WHERE h.event_id = s.event_id)"
}
assigned_log() { tail -c +"$LOG_START" "$EVENTBUS_PG_LOG" | grep -c "rebalanced: $1 partitions assigned"; }

# --- 1: cluster 1 alone takes all 8 partitions -------------------------------
q -c "SELECT eventbus_subscribe('$TOPIC', 't41_handler(eventbus.envelope)', 'kafka')" >/dev/null
wait_until 30 '[ "$(assigned_log 8)" -ge 1 ]'
ok $? "cluster 1 alone: the group assigned it all $NPARTS partitions (log line)"
produce a 1 2 10 || bail "produce failed"
wait_until 30 '[ "$(handled1)" -ge $((NPARTS * 10 * 2)) ]'
ok $? "cluster 1 handled batch a ($((NPARTS * 10 * 2)) events)"

# --- 2: cluster 2 joins while slow handlers run on cluster 1 ----------------
produce b 1 1 10 slow || bail "produce failed"
wait_until 10 '[ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE wait_event = '"'"'PgSleep'"'"'")" -ge 4 ]'
ok $? "4 slow handlers are running on cluster 1"
t_join=$SECONDS
JOIN_LOG=$(wc -c < "$EVENTBUS_PG_LOG")
q2 -c "SELECT eventbus_subscribe('$TOPIC', 't41_handler(eventbus.envelope)', 'kafka')" >/dev/null
# The next versions of the same aggregates arrive during the hand-over: once
# cluster 1 began its revoke (it takes no new message of those partitions
# then), while its slow handlers still run.  Produced before the revoke,
# cluster 1 may receive them first and handle them in the drain, and no
# aggregate would move right after a slow event.
wait_until 20 '[ "$(tail -c +"$JOIN_LOG" "$EVENTBUS_PG_LOG" | grep -c "rebalancing: [0-9]* partitions revoked")" -ge 1 ]' ||
	diag "cluster 1 logged no revoke within 20 s of the join"
produce b 2 4 10 || bail "produce failed"
wait_until 60 '[ "$(grep -c "rebalanced: [1-9][0-9]* partitions assigned" "$C2_LOG")" -ge 1 ]'
ok $? "cluster 2 joined the group and was assigned partitions ($((SECONDS - t_join)) s after it subscribed)"
SENT_B=$(q -c "SELECT count(*) FROM t41_sent")
wait_until 60 '[ "$(handled_total)" -ge '"$SENT_B"' ]'
ok $? "all $SENT_B events of batches a and b handled"
diag "after the join: cluster 1 handled $(handled1), cluster 2 $(handled2)"
# What operators see: each cluster's partitions of the topic (gauge
# subscription_share), together all of them, each some.
share_of() { "$1" -c "SELECT coalesce(max(m.value)::int, -1) FROM eventbus.metrics m JOIN eventbus.subscriptions s ON s.id = m.subscription_id
                      WHERE m.name = 'subscription_share' AND s.topic = '$TOPIC'"; }
wait_until 10 '[ $(( $(share_of q) + $(share_of q2) )) -eq '"$NPARTS"' ] && [ "$(share_of q)" -gt 0 ] && [ "$(share_of q2)" -gt 0 ]'
ok $? "subscription_share: cluster 1 has $(share_of q) partitions, cluster 2 $(share_of q2), together all $NPARTS"

# --- 3: cluster 2 leaves (fast stop) while events flow and one of its
# handlers runs a slow event, later events of its partition already handled
before2=$(handled2)
produce c 1 10 20 stop || bail "produce failed"
# Cluster 2 has partition 1 or 6 (or both): the stop comes while a slow
# event (STOP_SLOW s, the first of the partition's batch) runs there
# (pg_stat_activity names the aggregate) and 10 later events of that
# partition were handled.
slow_running2() {
	q2 -c "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'
	          AND (query LIKE '%aggregate c-1-1)' OR query LIKE '%aggregate c-6-1)')"
}
wait_until 30 '[ "$(q2 -c "SELECT count(*) FROM t41_handled WHERE aggregate_id ~ '"'"'^c-[16]-'"'"' AND aggregate_id NOT IN ('"'"'c-1-1'"'"', '"'"'c-6-1'"'"')")" -ge 10 ] &&
               [ "$(slow_running2)" -ge 1 ]'
ok $? "cluster 2 runs its slow event of batch c, later events of that partition handled"
diag "cluster 2 at its stop: slow event handled $(q2 -c "SELECT count(*) FROM t41_handled WHERE aggregate_id IN ('c-1-1', 'c-6-1') AND version = 1") times, running $(slow_running2), handlers sleeping $(q2 -c "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")"
t_stop=$SECONDS
c2_stop fast
ok $? "cluster 2 stopped (fast) mid-stream"
SENT=$(q -c "SELECT count(*) FROM t41_sent")
# Cluster 2's records, read with eventbus not loaded (it consumes nothing).
c2_start -c shared_preload_libraries= || bail "cluster 2 did not restart"
q2 -c "COPY t41_handled TO STDOUT" | q -c "COPY t41_c2 FROM STDIN" >/dev/null
c2_stop fast
wait_until 60 '[ "$(handled_distinct)" -ge '"$SENT"' ]'
ok $? "all $SENT events handled after cluster 2 left ($((SECONDS - t_stop)) s after the stop)"

# --- 4: a pool worker of cluster 1 is killed: PostgreSQL restarts, and the
# new dispatcher joins the group as a new member (the dead one's session
# must time out first) ----------------------------------------------------
produce d 1 4 10 each || bail "produce failed"
SENT=$(q -c "SELECT count(*) FROM t41_sent")
wait_until 10 '[ "$(handled1)" -gt 0 ]'
wpid=$(worker_pid 0)
t_kill=$SECONDS
kill -9 "$wpid" 2>/dev/null
ok $? "pool worker 0 of cluster 1 killed mid-stream (pid $wpid)"
sleep 1
wait_until 60 dispatcher_running
ok $? "cluster 1 restarted its dispatcher ($((SECONDS - t_kill)) s after the kill)"
wait_until 60 '[ "$(handled_distinct)" -ge '"$SENT"' ]'
ok $? "all $SENT events handled after the crash restart ($((SECONDS - t_kill)) s after the kill)"

# --- the databases' own records ----------------------------------------------
q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t41_all;
CREATE TABLE t41_all AS
  SELECT 1 AS cluster, * FROM t41_handled UNION ALL SELECT 2, * FROM t41_c2;
SQL
lost=$(q -c "SELECT count(*) FROM t41_sent s WHERE NOT EXISTS (SELECT 1 FROM t41_all h WHERE h.event_id = s.event_id)")
both=$(q -c "SELECT count(*) FROM (SELECT event_id FROM t41_all WHERE aggregate_id NOT LIKE 'c-%' GROUP BY event_id HAVING count(DISTINCT cluster) > 1) d")
both_c=$(q -c "SELECT count(*) FROM (SELECT event_id FROM t41_all WHERE aggregate_id LIKE 'c-%' GROUP BY event_id HAVING count(DISTINCT cluster) > 1) d")
twice=$(q -c "SELECT count(*) FROM (SELECT event_id FROM t41_all GROUP BY cluster, event_id HAVING count(*) > 1) d")
# Order over each event's first handling (a second one, counted above, is
# not an order question).
q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t41_first;
CREATE TABLE t41_first AS SELECT DISTINCT ON (event_id) * FROM t41_all ORDER BY event_id, started;
SQL
order=$(q -c "SELECT count(*) FROM (SELECT version, lag(version) OVER w AS prev FROM t41_first WINDOW w AS (PARTITION BY aggregate_id ORDER BY started)) o WHERE prev IS NOT NULL AND version <> prev + 1")
early=$(q -c "SELECT count(*) FROM (SELECT cluster, started, lag(cluster) OVER w AS pc, lag(finished) OVER w AS pf
                                      FROM t41_first WINDOW w AS (PARTITION BY aggregate_id ORDER BY version)) o
              WHERE pc IS NOT NULL AND pc <> cluster AND started < pf")
moved=$(q -c "SELECT count(DISTINCT aggregate_id) FROM (SELECT aggregate_id, cluster, lag(cluster) OVER w AS pc
                                      FROM t41_all WINDOW w AS (PARTITION BY aggregate_id ORDER BY version)) o WHERE pc <> cluster")
slow_moved=$(q -c "SELECT count(*) FROM t41_all a JOIN t41_all b ON b.aggregate_id = a.aggregate_id AND b.version = a.version + 1
                    JOIN t41_sent s ON s.event_id = a.event_id WHERE s.sleep >= 1 AND a.aggregate_id LIKE 'b-%' AND a.cluster <> b.cluster")
diag "handled: cluster 1 $(q -c "SELECT count(*) FROM t41_all WHERE cluster = 1"), cluster 2 $(q -c "SELECT count(*) FROM t41_all WHERE cluster = 2");" \
	"aggregates that moved: $moved (right after a slow event: $slow_moved)"
is "$lost" 0 "no event lost"
is "$both" 0 "no event handled in both databases (join during slow handlers, crash restart)"
# A fast stop drains in shared mode: the handler running then finishes and
# commits here (a rolled-back one would leave its partition's completion
# point behind it, and the next owner would handle again every event of that
# partition handled after it).
is "$both_c" 0 "no event handled in both databases (fast stop while a handler ran)"
is "$twice" 0 "no event handled twice in one database"
is "$order" 0 "per aggregate, versions in order across both databases"
is "$early" 0 "a moved aggregate's next event started on the new owner only after the old owner's handler finished"
ok $([ "$slow_moved" -gt 0 ] && echo 0 || echo 1) "some aggregate moved right after a slow event ran (the drain was exercised)"
ok $([ "$(tail -c +"$LOG_START" "$EVENTBUS_PG_LOG" | grep -c 'partitions revoked from this instance')" -ge 1 ] && echo 0 || echo 1) \
	"cluster 1 logged its revokes"
ok $([ "$(grep -c 'rebalanced: [0-9]* partitions assigned' "$C2_LOG")" -ge 1 ] && echo 0 || echo 1) \
	"cluster 2 logged its assignment"
if [ "$ASSIGNOR" = cooperative-sticky ]; then
	# Incremental: at the join, cluster 1 gave up only what moved to cluster 2
	# (eager: all 8 partitions, then some came back).
	first_revoke=$(tail -c +"$JOIN_LOG" "$EVENTBUS_PG_LOG" | sed -n 's/.*rebalancing: \([0-9]*\) partitions revoked.*/\1/p' | head -1)
	ok $([ -n "$first_revoke" ] && [ "$first_revoke" -gt 0 ] && [ "$first_revoke" -lt "$NPARTS" ] && echo 0 || echo 1) \
		"cooperative-sticky: at the join, cluster 1 gave up only the partitions that moved (${first_revoke:-none} of $NPARTS)"
fi
diag "cluster 1 rebalance log lines:"
tail -c +"$LOG_START" "$EVENTBUS_PG_LOG" | grep -E "consumer group" | sed 's/^/#   /' | tail -12
diag "test time: $((SECONDS - T0)) s"
done_testing
