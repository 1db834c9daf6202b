#!/usr/bin/env bash
# A failing handler, on each transport: 100 aggregates x 5 events on one
# topic; the handler raises for agg-13 version 2.  Two subscriptions on the
# topic:
#   A (max_attempts 3) fails it always: after 3 attempts the event is
#     dead-lettered with the error, and agg-13 moves on (v3..v5 in order);
#     eventbus_replay_dead_letter() fails while the cause persists and
#     succeeds once it is fixed.
#   B (max_attempts 1,000,000: effectively retried forever) fails it until a
#     flag is flipped: all 99 other aggregates complete while agg-13 waits at
#     v2 (retried in place, v3..v5 held back, nothing dead-lettered); after
#     the fix agg-13 completes 1..5 in order.  This proves "other aggregates
#     never blocked" without any timing assumption.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
NAGGS=100; NVERS=5; PER=$((NAGGS * NVERS))
ERRTEXT="t21 deliberate failure"
TMPDIR_21=$(mktemp -d)

consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't21.%.$run'; rm -rf '$TMPDIR_21'"

q >/dev/null <<SQL
DROP TABLE IF EXISTS t21_sent, t21_handled, t21_flags;
CREATE TABLE t21_sent (transport text, topic text, aggregate_id text, version bigint, event_id uuid);
CREATE TABLE t21_handled (n bigserial, sub text, transport text, aggregate_id text, version bigint, event_id uuid,
                          who text DEFAULT current_user);
CREATE TABLE t21_flags (name text PRIMARY KEY, fail boolean NOT NULL);
INSERT INTO t21_flags VALUES ('a', true), ('b', true);

CREATE OR REPLACE FUNCTION t21_record(sub text, e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS \$\$
BEGIN
  -- Written before the failure: a failed attempt must leave no row.
  INSERT INTO public.t21_handled (sub, transport, aggregate_id, version, event_id)
  VALUES (sub, e.transport, e.aggregate_id, e.event_version, e.event_id);
  IF e.aggregate_id = 'agg-13' AND e.event_version = 2
     AND (SELECT fail FROM public.t21_flags WHERE name = sub) THEN
    RAISE EXCEPTION '$ERRTEXT (subscription %, % v%)', sub, e.aggregate_id, e.event_version
      USING ERRCODE = 'EB021';
  END IF;
END \$\$;
CREATE OR REPLACE FUNCTION t21_handler_a(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS \$\$ BEGIN PERFORM public.t21_record('a', e); END \$\$;
CREATE OR REPLACE FUNCTION t21_handler_b(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS \$\$ BEGIN PERFORM public.t21_record('b', e); END \$\$;
SQL

for tr in kafka nats; do
	q -c "INSERT INTO t21_sent SELECT '$tr', 't21.$tr.$run', 'agg-' || a, v, gen_random_uuid()
	        FROM generate_series(0, $((NAGGS - 1))) a, generate_series(1, $NVERS) v" >/dev/null
done
nats_stream "T21_$run" "t21.nats.$run"
ok $? "NATS stream for the inbound topic"
rc=0
for tr in kafka nats; do
	produce_sql $tr "t21.$tr.$run" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T21Happened', version, '{}')
	                                  FROM t21_sent WHERE transport = '$tr' ORDER BY version, aggregate_id" || rc=1
done
ok $rc "produced $PER envelopes per transport (agg-0..agg-99, versions 1..5)"

ids=$(q -c "SELECT eventbus_subscribe('t21.kafka.$run', 't21_handler_a(eventbus.envelope)', 'kafka', 3),
                   eventbus_subscribe('t21.kafka.$run', 't21_handler_b(eventbus.envelope)', 'kafka', 1000000),
                   eventbus_subscribe('t21.nats.$run', 't21_handler_a(eventbus.envelope)', 'nats', 3),
                   eventbus_subscribe('t21.nats.$run', 't21_handler_b(eventbus.envelope)', 'nats', 1000000)")
IFS='|' read -r SA_kafka SB_kafka SA_nats SB_nats <<<"$ids"
ok "$([[ $SA_kafka =~ ^[0-9]+$ && $SB_kafka =~ ^[0-9]+$ && $SA_nats =~ ^[0-9]+$ && $SB_nats =~ ^[0-9]+$ ]]; echo $?)" \
	"two subscriptions per topic (A max_attempts 3, B retried indefinitely): $ids"
is "$(q -c "SELECT string_agg(max_attempts::text, ',' ORDER BY id) FROM eventbus.subscriptions WHERE topic LIKE 't21.%.$run'")" \
	"3,1000000,3,1000000" "max_attempts stored per subscription"
sa() { local v="SA_$1"; echo "${!v}"; }
sb() { local v="SB_$1"; echo "${!v}"; }

# --- B: everything but agg-13 completes while agg-13 waits at v2 -----------
others_done_b() {
	[ "$(q -c "SELECT count(DISTINCT (transport, event_id)) FROM t21_handled WHERE sub = 'b' AND aggregate_id <> 'agg-13'")" = $((2 * (PER - NVERS))) ]
}
wait_until 90 others_done_b
ok $? "B: the 99 other aggregates completed all 5 events on both transports while agg-13 v2 keeps failing"
for tr in kafka nats; do
	is "$(q -c "SELECT string_agg(version::text, ',' ORDER BY n) FROM t21_handled WHERE sub = 'b' AND transport = '$tr' AND aggregate_id = 'agg-13'")" \
		"1" "$tr B: agg-13 handled only v1 so far (v2 retried in place, v3..v5 held back)"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE subscription_id = $(sb $tr)")" "0" \
		"$tr B: not dead-lettered while attempts remain"
	is "$(q -c "SELECT count(*) FROM eventbus.inbox WHERE subscription_id = $(sb $tr) AND outcome = 'handled'")" "$((PER - NVERS + 1))" \
		"$tr B: inbox has the $((PER - NVERS + 1)) handled events, none of agg-13 after v1"
done

# --- A: dead letter after 3 attempts, agg-13 moves on ----------------------
a_done() {
	[ "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE subscription_id IN ($SA_kafka, $SA_nats)")" -ge 2 ] &&
	[ "$(q -c "SELECT count(DISTINCT (transport, event_id)) FROM t21_handled WHERE sub = 'a'")" -ge $((2 * (PER - 1))) ]
}
wait_until 90 a_done
ok $? "A: the failing event was dead-lettered and everything else handled, on both transports"
for tr in kafka nats; do
	A=$(sa $tr)
	eid=$(q -c "SELECT event_id FROM t21_sent WHERE transport = '$tr' AND aggregate_id = 'agg-13' AND version = 2")
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE subscription_id = $A")" "1" "$tr A: exactly one dead letter"
	is "$(q -c "SELECT (envelope).event_id || ' ' || (envelope).aggregate_id || ' v' || (envelope).event_version || ' ' || (envelope).topic || ' ' || (envelope).transport
	             FROM eventbus.dead_letters WHERE subscription_id = $A")" "$eid agg-13 v2 t21.$tr.$run $tr" \
		"$tr A: the dead letter is agg-13 v2 (event_id, topic, transport in its envelope)"
	is "$(q -c "SELECT attempts FROM eventbus.dead_letters WHERE subscription_id = $A")" "3" "$tr A: attempts = max_attempts = 3"
	is "$(q -c "SELECT error_sqlstate FROM eventbus.dead_letters WHERE subscription_id = $A")" "EB021" "$tr A: error_sqlstate is the handler's"
	ok "$(q -c "SELECT error_message LIKE '%$ERRTEXT (subscription a, agg-13 v2)%' FROM eventbus.dead_letters WHERE subscription_id = $A" | grep -qx t; echo $?)" \
		"$tr A: error_message has the handler's error text"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE subscription_id = $A AND replayed_at IS NULL AND failed_at IS NOT NULL")" "1" \
		"$tr A: failed_at set, replayed_at not yet"
	is "$(q -c "SELECT count(*) FROM t21_handled WHERE sub = 'a' AND transport = '$tr' AND aggregate_id = 'agg-13' AND version = 2")" "0" \
		"$tr A: the failed attempts left no effects (rolled back)"
	is "$(q -c "SELECT string_agg(version::text, ',' ORDER BY n) FROM t21_handled WHERE sub = 'a' AND transport = '$tr' AND aggregate_id = 'agg-13'")" \
		"1,3,4,5" "$tr A: agg-13 moved on after the dead letter: v1, v3, v4, v5 in order"
	is "$(q -c "SELECT count(*) FROM (SELECT aggregate_id, array_agg(version ORDER BY n) vs FROM t21_handled
	                                  WHERE sub = 'a' AND transport = '$tr' AND aggregate_id <> 'agg-13' GROUP BY 1) x
	             WHERE vs <> '{1,2,3,4,5}'")" "0" "$tr A: every other aggregate handled 1..5 in order"
	is "$(q -c "SELECT count(*) || '/' || count(DISTINCT event_id) FROM t21_handled WHERE sub = 'a' AND transport = '$tr'")" \
		"$((PER - 1))/$((PER - 1))" "$tr A: $((PER - 1)) handled, each exactly once"
	is "$(q -c "SELECT count(*) FILTER (WHERE outcome = 'handled') || '/' || count(*) FILTER (WHERE outcome = 'dead_lettered')
	             FROM eventbus.inbox WHERE subscription_id = $A")" "$((PER - 1))/1" \
		"$tr A: inbox: $((PER - 1)) handled, 1 dead_lettered"
	is "$(q -c "SELECT event_id FROM eventbus.inbox WHERE subscription_id = $A AND outcome = 'dead_lettered'")" "$eid" \
		"$tr A: the dead_lettered inbox row is agg-13 v2"
	is "$(q -c "SELECT coalesce(processed, -1) || '/' || coalesce(failed, -1) FROM eventbus_status() WHERE component = 'subscription $A'")" \
		"$((PER - 1))/1" "$tr A: eventbus_status(): processed $((PER - 1)), failed 1"
done

# --- replay ------------------------------------------------------------------
for tr in kafka nats; do
	A=$(sa $tr)
	dl=$(q -c "SELECT id FROM eventbus.dead_letters WHERE subscription_id = $A")
	out=$(psql -X -A -t -q -c "SELECT eventbus_replay_dead_letter($dl)" 2>"$TMPDIR_21/err")
	is "$out" "f" "$tr: replay while the handler still fails returns false"
	ok "$(grep -q WARNING "$TMPDIR_21/err"; echo $?)" "$tr: ... with a WARNING"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE id = $dl AND replayed_at IS NULL")" "1" "$tr: replayed_at still NULL"
	is "$(q -c "SELECT count(*) FROM t21_handled WHERE sub = 'a' AND transport = '$tr' AND aggregate_id = 'agg-13' AND version = 2")" "0" \
		"$tr: the failed replay left no effects"
	is "$(psql -X -A -t -q -c "BEGIN" -c "SELECT eventbus_replay_dead_letter($dl)" -c "SELECT 'usable'" -c "ROLLBACK" 2>/dev/null | tr '\n' ' ')" \
		"f usable " "$tr: the caller's transaction stays usable after a failed replay"
done
q -c "UPDATE t21_flags SET fail = false WHERE name = 'a'" >/dev/null
for tr in kafka nats; do
	A=$(sa $tr)
	dl=$(q -c "SELECT id FROM eventbus.dead_letters WHERE subscription_id = $A")
	# In the caller's transaction: rolled back with it, nothing remains.
	is "$(psql -X -A -t -q -c "BEGIN" -c "SELECT eventbus_replay_dead_letter($dl)" -c "ROLLBACK" 2>/dev/null)" "t" \
		"$tr: replay after the fix returns true (inside a transaction that then rolls back)"
	is "$(q -c "SELECT count(*) FROM t21_handled WHERE sub = 'a' AND transport = '$tr' AND aggregate_id = 'agg-13' AND version = 2")|$(q -c "SELECT replayed_at IS NULL FROM eventbus.dead_letters WHERE id = $dl")" \
		"0|t" "$tr: ... and the rollback undid both the handler's effects and replayed_at"
	is "$(q -c "SELECT eventbus_replay_dead_letter($dl)")" "t" "$tr: replay after the fix returns true"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE id = $dl AND replayed_at IS NOT NULL")" "1" "$tr: replayed_at is set"
	is "$(q -c "SELECT count(*) FROM t21_handled WHERE sub = 'a' AND transport = '$tr' AND aggregate_id = 'agg-13' AND version = 2 AND who = current_user")" "1" \
		"$tr: the replayed handler's effects committed, run as the subscribing role"
done

# --- B after the fix: agg-13 completes in order ----------------------------
q -c "UPDATE t21_flags SET fail = false WHERE name = 'b'" >/dev/null
b_done() { [ "$(q -c "SELECT count(DISTINCT (transport, event_id)) FROM t21_handled WHERE sub = 'b'")" = $((2 * PER)) ]; }
wait_until 120 b_done
ok $? "B: after the fix agg-13's v2..v5 were handled (retries continued in place)"
sleep 2
for tr in kafka nats; do
	is "$(q -c "SELECT string_agg(version::text, ',' ORDER BY n) FROM t21_handled WHERE sub = 'b' AND transport = '$tr' AND aggregate_id = 'agg-13'")" \
		"1,2,3,4,5" "$tr B: agg-13 handled 1..5 in order"
	is "$(q -c "SELECT count(*) || '/' || count(DISTINCT event_id) FROM t21_handled WHERE sub = 'b' AND transport = '$tr'")" \
		"$PER/$PER" "$tr B: all $PER handled, each exactly once"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE subscription_id = $(sb $tr)")" "0" "$tr B: no dead letter"
	is "$(q -c "SELECT count(*) FROM eventbus.quarantine WHERE topic = 't21.$tr.$run'")" "0" "$tr: nothing quarantined"
done

done_testing
