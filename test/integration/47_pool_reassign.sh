#!/usr/bin/env bash
# The pool's reassignment of keys a busy worker has not started (issue:
# fault isolation; batches are filled with several keys for performance).
#  1. All four pool workers busy: blockers sleep 3 s on one worker and 6 s
#     on the three others.  Meanwhile a sleeper (10 s) and 30 other
#     aggregates (2 events each) queue; the first worker to be ready is the
#     only one, so it gets them all in one batch, the sleeper first.
#  2. Once the other workers are ready, the 30 keys packed behind the
#     sleeper are given back and run there: their 60 events are handled
#     while the sleeper still sleeps, and given_back_total (eventbus.metrics)
#     grew by exactly those 60.
#  3. Each event handled once, every aggregate in version order, the
#     sleeper's own later events after it.
# Counted from the database; durations are printed, never asserted.  Before
# reassignment, the 60 events waited the sleeper's 10 s (measured: this test
# failed at 2).
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
T="t47.nats.$run"
consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't47.%.$run'"

q >/dev/null <<SQL
DROP TABLE IF EXISTS t47_handled CASCADE;
CREATE TABLE t47_handled (n bigserial, aggregate_id text, version bigint, event_id uuid,
                          worker int DEFAULT pg_backend_pid(), at timestamptz DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION t47_h(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
  PERFORM pg_sleep(coalesce((e.payload->>'sleep')::float8, 0));
  INSERT INTO public.t47_handled (aggregate_id, version, event_id)
  VALUES (e.aggregate_id, e.event_version, e.event_id);
END \$\$;
SQL
# produce SQL — envelopes from SELECT aggregate_id, version, payload.
produce() {
	produce_sql nats "$T" "SELECT a, t_env(gen_random_uuid(), a, 'T47', v, p) FROM ($1) s (a, v, p)"
}
given_back() { q -c "SELECT coalesce(sum(value), 0)::bigint FROM eventbus.metrics WHERE name = 'given_back_total'"; }
sleeping() { q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'eventbus worker' AND wait_event = 'PgSleep'"; }

plan 9
nats_stream "T47_$run" "$T" || bail "could not create the NATS stream"
is "$(q -c "SHOW eventbus.workers")" 4 "the pool runs 4 workers"
q -c "SELECT eventbus_subscribe('$T', 't47_h(eventbus.envelope)', 'nats')" >/dev/null
produce "SELECT 'warm', 1, '{}'::jsonb" || bail "could not produce"
wait_count 60 1 "SELECT count(*) FROM t47_handled WHERE aggregate_id = 'warm'" 60 || bail "the subscription is not active"

# 1: every worker busy, then the sleeper and the 30 others queue.
produce "SELECT 'block-' || b, 1, jsonb_build_object('sleep', CASE WHEN b = 1 THEN 3 ELSE 6 END) FROM generate_series(1, 4) b" ||
	bail "could not produce the blockers"
wait_until 30 '[ "$(sleeping)" = 4 ]'
ok $? "the four workers each sleep in a blocker's handler"
gb0=$(given_back)
produce "SELECT a, v, p FROM (SELECT 'sleeper' a, v, jsonb_build_object('sleep', CASE WHEN v = 1 THEN 10 ELSE 0 END) p, 0 o
                              FROM generate_series(1, 3) v
                              UNION ALL SELECT 'other-' || a, v, '{}'::jsonb, a FROM generate_series(1, 30) a, generate_series(1, 2) v) s
         ORDER BY v, o" || bail "could not produce the sleeper and the others"
start=$SECONDS

# 2: the others run on the workers that become ready, not behind the sleeper.
wait_count 30 60 "SELECT count(*) FROM t47_handled WHERE aggregate_id LIKE 'other-%'" 30
is "$COUNT" 60 "the 60 events of the 30 other aggregates are handled"
diag "60 other events handled $((SECONDS - start)) s after they were produced (the sleeper sleeps 10 s)"
is "$(q -c "SELECT count(*) FROM t47_handled WHERE aggregate_id = 'sleeper'")" 0 \
	"... while the sleeper still sleeps (none of its events handled yet)"
is "$(( $(given_back) - gb0 ))" 60 "given_back_total grew by the 60 events packed behind the sleeper"

# 3: once, in order.
wait_count 60 3 "SELECT count(*) FROM t47_handled WHERE aggregate_id = 'sleeper'" 60
is "$(q -c "SELECT string_agg(version::text, ',' ORDER BY n) FROM t47_handled WHERE aggregate_id = 'sleeper'")" "1,2,3" \
	"the sleeper's later events waited for it, in order"
is "$(q -c "SELECT count(*) || ' ' || count(DISTINCT event_id) FROM t47_handled")" "68 68" \
	"every event handled once (warm-up, 4 blockers, sleeper 3, others 60)"
is "$(q -c "SELECT count(*) FROM (SELECT aggregate_id, array_agg(version ORDER BY n) v, array_agg(version ORDER BY version) s
                                  FROM t47_handled GROUP BY 1) x WHERE v <> s")" 0 "every aggregate handled in version order"
is "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
             WHERE s.topic = '$T'")" 0 "nothing dead-lettered"
