#!/usr/bin/env bash
# The pool records what it handled in eventbus.inbox: written to the table
# and its indexes directly while the table is as the extension created it,
# through an INSERT statement when it is not (here: a row trigger a
# superuser added, which the statement fires and a direct write would not).
# Per transport, three phases of 8 aggregates x 5 versions, published in
# one transaction each:
#  - direct: every event handled once, in order; one inbox row per event
#    with outcome 'handled' and handled_at between the publish and now; the
#    inbox's two indexes find every row (primary key, handled_at);
#  - with an AFTER INSERT row trigger on eventbus.inbox: the same, and the
#    trigger fired once per new inbox row (the statement ran);
#  - trigger dropped: the same, and the trigger's count did not move.
# Then a redelivery is still skipped: the phase-1 Kafka events produced
# again with their ids, each aggregate's followed by a new event, are not
# handled a second time and add no inbox row; the new events are handled.
# shellcheck source=test/integration/lib.sh
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
cleanup() {
	unsubscribe_like "t55.%.$run" >/dev/null
	q -c "DROP TRIGGER IF EXISTS t55_count ON eventbus.inbox" >/dev/null
}
CONSUMER_CLEANUP=cleanup
consumer_setup
consumer_sql_setup

q >/dev/null <<'SQL'
CREATE TABLE IF NOT EXISTS t55_calls (topic text, agg text, version bigint, event_id uuid, at timestamptz DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION t55_handle(e eventbus.envelope) RETURNS void LANGUAGE sql AS
$$ INSERT INTO public.t55_calls (topic, agg, version, event_id) VALUES (e.topic, e.aggregate_id, e.event_version, e.event_id) $$;
CREATE TABLE IF NOT EXISTS t55_fired (subscription_id bigint, event_id uuid);
CREATE OR REPLACE FUNCTION t55_count() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN INSERT INTO public.t55_fired VALUES (NEW.subscription_id, NEW.event_id); RETURN NULL; END $$;
SQL

declare -A SUB
for tr in kafka nats; do
	SUB[$tr]=$(q -c "SELECT eventbus_subscribe('t55.$tr.$run', 't55_handle(eventbus.envelope)'::regprocedure, '$tr')")
done

# publish_phase TRANSPORT PHASE — 8 aggregates x 5 versions, one transaction
publish_phase() {
	q -c "SELECT count(eventbus_publish('t55.$1.$run', 'p$2-a' || a, 'Changed', jsonb_build_object('v', v), '$1'))
	        FROM generate_series(1, 8) a, generate_series(1, 5) v" >/dev/null
}
calls() { q -c "SELECT count(*) FROM t55_calls WHERE topic = 't55.$1.$run' ${2:-}"; }
inbox() { q -c "SELECT count(*) FROM eventbus.inbox WHERE subscription_id = ${SUB[$1]} ${2:-}"; }
fired() { q -c "SELECT count(*) FROM t55_fired WHERE subscription_id = ${SUB[$1]}"; }

# check_phase TRANSPORT PHASE EXPECTED_TOTAL SINCE — handled once, in order, recorded
check_phase() {
	local tr=$1 ph=$2 want=$3 since=$4
	wait_count 60 "$want" "SELECT count(*) FROM t55_calls WHERE topic = 't55.$tr.$run'" 30 ||
		diag "$tr phase $ph: $COUNT of $want handler calls"
	is "$(calls "$tr" "AND agg LIKE 'p$ph-%'")/$(q -c "SELECT count(DISTINCT event_id) FROM t55_calls WHERE topic = 't55.$tr.$run' AND agg LIKE 'p$ph-%'")" \
		40/40 "$tr phase $ph: 40 events handled, each once"
	is "$(q -c "SELECT count(*) FROM (SELECT version - row_number() OVER (PARTITION BY agg ORDER BY at) d
	              FROM t55_calls WHERE topic = 't55.$tr.$run' AND agg LIKE 'p$ph-%') s WHERE d <> 0")" 0 \
		"$tr phase $ph: each aggregate's versions handled in order"
	is "$(q -c "SELECT count(*) FROM t55_calls c JOIN eventbus.inbox i ON i.event_id = c.event_id AND i.subscription_id = ${SUB[$tr]}
	              WHERE c.topic = 't55.$tr.$run' AND c.agg LIKE 'p$ph-%' AND i.outcome = 'handled'
	                AND i.handled_at >= '$since' AND i.handled_at <= clock_timestamp()")" 40 \
		"$tr phase $ph: an inbox row per handled event ('handled', handled_at since the publish)"
	is "$(inbox "$tr")" "$want" "$tr phase $ph: the inbox holds $want rows for the subscription, no more"
}

# indexed TRANSPORT — the subscription's rows found through the primary key,
# then through the handled_at index ("subscription_id + 0" keeps the planner
# off the primary key there: with it, both counts came from the same index)
indexed() {
	q <<SQL
SET enable_seqscan = off; SET enable_bitmapscan = off;
SELECT (SELECT count(*) FROM eventbus.inbox WHERE subscription_id = ${SUB[$1]})
    || '/' || (SELECT count(*) FROM eventbus.inbox WHERE handled_at > '-infinity' AND subscription_id + 0 = ${SUB[$1]});
SQL
}

# run_phase PHASE EXPECTED_TOTAL — publish and check the phase on both transports
run_phase() {
	local tr since
	for tr in kafka nats; do
		since=$(q -c "SELECT clock_timestamp()")
		publish_phase "$tr" "$1"
		check_phase "$tr" "$1" "$2" "$since"
	done
}

# Phase 1: direct.
run_phase 1 40
for tr in kafka nats; do
	is "$(indexed "$tr")" 40/40 "$tr: both inbox indexes find the 40 rows written directly"
done

# Phase 2: a row trigger on the inbox: the statement runs, and fires it.
q -c "CREATE TRIGGER t55_count AFTER INSERT ON eventbus.inbox FOR EACH ROW EXECUTE FUNCTION t55_count()" >/dev/null
run_phase 2 80
for tr in kafka nats; do
	is "$(fired "$tr")" 40 "$tr: with a trigger on the inbox, it fired once per new row (the INSERT statement ran)"
done

# Phase 3: trigger dropped: direct again.
q -c "DROP TRIGGER t55_count ON eventbus.inbox" >/dev/null
run_phase 3 120
for tr in kafka nats; do
	is "$(fired "$tr")" 40 "$tr: trigger dropped: its count did not move"
	is "$(indexed "$tr")" 120/120 "$tr: both inbox indexes find all 120 rows"
done

# A redelivery of phase-1 events (same ids, produced again to the broker,
# each aggregate's followed by a new version 6) is skipped: once the eight
# new events are handled, the forty copies before them were seen.
wait_until 30 outbox_empty || diag "outbox not empty"
produce_sql kafka "t55.kafka.$run" "SELECT k, v FROM (
    SELECT 1 AS o, c.at, c.agg AS k, t_env(c.event_id, c.agg, 'Changed', c.version, '{}') AS v
      FROM t55_calls c WHERE c.topic = 't55.kafka.$run' AND c.agg LIKE 'p1-%'
    UNION ALL
    SELECT 2, clock_timestamp(), 'p1-a' || a, t_env(gen_random_uuid(), 'p1-a' || a, 'Changed', 6, '{}')
      FROM generate_series(1, 8) a) s ORDER BY o, at"
wait_count 60 128 "SELECT count(*) FROM t55_calls WHERE topic = 't55.kafka.$run'" 30 || diag "$COUNT of 128 handler calls"
is "$(calls kafka "AND version = 6")/$(calls kafka)/$(inbox kafka)" 8/128/128 \
	"kafka: the 40 redelivered events were skipped (no handler call, no inbox row); the 8 new ones after them handled"

done_testing
