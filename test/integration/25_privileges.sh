#!/usr/bin/env bash
# Handlers run with the privileges of the role that subscribed them, never as
# superuser.  Role t25_app (NOLOGIN) may execute eventbus_subscribe and write
# t25_allowed but not t25_forbidden.  Subscribed by t25_app (SET ROLE), on
# each transport:
#   t25_h_bad  (SECURITY INVOKER, owned by t25_app) writes both tables: every
#              event is dead-lettered with SQLSTATE 42501, t25_forbidden
#              stays empty and its allowed write is rolled back with it;
#   t25_h_good writes only t25_allowed: every event handled, as t25_app.
# Subscribing a handler t25_app may not EXECUTE fails with 42501, as does
# subscribing without EXECUTE on eventbus_subscribe.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t25.kafka.$run"; TN="t25.nats.$run"
N=5

consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't25.%.$run'; unsubscribe_like 't25.%'; q -c 'DROP OWNED BY t25_app' -c 'DROP ROLE t25_app'"

# Leftovers of an earlier run (the role is cluster-wide).
unsubscribe_like 't25.%' >/dev/null
q >/dev/null <<'SQL'
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 't25_app') THEN
    EXECUTE 'DROP OWNED BY t25_app'; EXECUTE 'DROP ROLE t25_app';
  END IF;
END $$;
SQL
q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t25_allowed, t25_forbidden, t25_sent;
CREATE ROLE t25_app NOLOGIN;
CREATE TABLE t25_sent (transport text, aggregate_id text, event_id uuid);
CREATE TABLE t25_allowed (handler text, who text, transport text, event_id uuid);
CREATE TABLE t25_forbidden (handler text, who text, transport text, event_id uuid);
GRANT INSERT ON t25_allowed TO t25_app;

CREATE FUNCTION t25_h_bad(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
  INSERT INTO public.t25_allowed VALUES ('bad', current_user, e.transport, e.event_id);
  INSERT INTO public.t25_forbidden VALUES ('bad', current_user, e.transport, e.event_id);
END $$;
CREATE FUNCTION t25_h_good(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
  INSERT INTO public.t25_allowed VALUES ('good', current_user, e.transport, e.event_id);
END $$;
CREATE FUNCTION t25_h_secret(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
ALTER FUNCTION t25_h_bad(eventbus.envelope) OWNER TO t25_app;
ALTER FUNCTION t25_h_good(eventbus.envelope) OWNER TO t25_app;
REVOKE EXECUTE ON FUNCTION t25_h_secret(eventbus.envelope) FROM PUBLIC;
SQL
# Handlers named by oid: resolving 'name(eventbus.envelope)' as t25_app would
# need USAGE on schema eventbus, which is not what this test is about.
H_BAD=$(q -c "SELECT 't25_h_bad(eventbus.envelope)'::regprocedure::oid")
H_GOOD=$(q -c "SELECT 't25_h_good(eventbus.envelope)'::regprocedure::oid")
H_SECRET=$(q -c "SELECT 't25_h_secret(eventbus.envelope)'::regprocedure::oid")

is "$(sqlstate_of "SET ROLE t25_app" "SELECT eventbus_subscribe('$TK', $H_GOOD::regprocedure, 'kafka')")" "42501" \
	"without EXECUTE on eventbus_subscribe, subscribing fails with 42501"
q -c "GRANT EXECUTE ON FUNCTION eventbus_subscribe(text, regprocedure, text, integer) TO t25_app" >/dev/null
is "$(sqlstate_of "SET ROLE t25_app" "SELECT eventbus_subscribe('$TK', $H_SECRET::regprocedure, 'kafka')")" "42501" \
	"subscribing a handler t25_app may not EXECUTE fails with 42501"
is "$(q -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic LIKE 't25.%.$run'")" "0" "no subscription was created by the failed calls"

for tr in kafka nats; do
	q -c "INSERT INTO t25_sent SELECT '$tr', 'acct-' || a, gen_random_uuid() FROM generate_series(1, $N) a" >/dev/null
done
nats_stream "T25_$run" "$TN" || bail "could not create the NATS stream"
rc=0
for tr in kafka nats; do
	produce_sql $tr "t25.$tr.$run" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T25Happened', 1, '{}')
	                                  FROM t25_sent WHERE transport = '$tr' ORDER BY aggregate_id" || rc=1
done
ok $rc "produced $N events per transport"

out=$(q -c "SET ROLE t25_app" -c "SELECT eventbus_subscribe('$TK', $H_BAD::regprocedure, 'kafka', 2),
                                         eventbus_subscribe('$TK', $H_GOOD::regprocedure, 'kafka', 2),
                                         eventbus_subscribe('$TN', $H_BAD::regprocedure, 'nats', 2),
                                         eventbus_subscribe('$TN', $H_GOOD::regprocedure, 'nats', 2)")
ok "$([[ $out =~ ^[0-9]+\|[0-9]+\|[0-9]+\|[0-9]+$ ]]; echo $?)" "t25_app subscribed both handlers on both transports ($out)"
is "$(q -c "SELECT string_agg(DISTINCT role_id::regrole::text, ',') FROM eventbus.subscriptions WHERE topic LIKE 't25.%.$run'")" \
	"t25_app" "subscriptions record role t25_app"

done_all() {
	[ "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
	            WHERE s.topic LIKE 't25.%.$run' AND s.handler = $H_BAD::regprocedure")" -ge $((2 * N)) ] &&
	[ "$(q -c "SELECT count(*) FROM t25_allowed WHERE handler = 'good'")" -ge $((2 * N)) ]
}
wait_until 90 done_all
ok $? "bad handler's events dead-lettered, good handler's events handled"
sleep 2

is "$(q -c "SELECT count(*) FROM t25_forbidden")" "0" "the forbidden write never happened"
is "$(q -c "SELECT count(*) FROM t25_allowed WHERE handler = 'bad'")" "0" "the bad handler's allowed write was rolled back with its failure"
for tr in kafka nats; do
	is "$(q -c "SELECT count(*) || ' ' || string_agg(DISTINCT error_sqlstate, ',') || ' ' || string_agg(DISTINCT attempts::text, ',')
	             FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
	            WHERE s.topic = 't25.$tr.$run' AND s.handler = $H_BAD::regprocedure")" "$N 42501 2" \
		"$tr: $N dead letters, SQLSTATE 42501, after max_attempts = 2"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
	             WHERE s.topic = 't25.$tr.$run' AND s.handler = $H_BAD::regprocedure AND d.error_message NOT LIKE '%t25_forbidden%'")" "0" \
		"$tr: error_message names the forbidden table"
	is "$(q -c "SELECT count(*) || ' ' || count(DISTINCT event_id) || ' ' || string_agg(DISTINCT who, ',') FROM t25_allowed WHERE handler = 'good' AND transport = '$tr'")" \
		"$N $N t25_app" "$tr: the good handler handled all $N events once each, as t25_app (not as superuser)"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
	             WHERE s.topic = 't25.$tr.$run' AND s.handler = $H_GOOD::regprocedure")" "0" "$tr: the good handler has no dead letter"
done

# Replay runs as the subscribing role, even when a superuser calls it.
dl=$(q -c "SELECT min(d.id) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
            WHERE s.topic = '$TK' AND s.handler = $H_BAD::regprocedure")
is "$(psql -X -A -t -q -c "SELECT eventbus_replay_dead_letter($dl)" 2>/dev/null)" "f" \
	"replay by the superuser still runs as t25_app and fails (false)"
is "$(q -c "SELECT count(*) FROM t25_forbidden")" "0" "still no forbidden write"
is "$(q -c "SELECT error_sqlstate FROM eventbus.dead_letters WHERE id = $dl")|$(q -c "SELECT replayed_at IS NULL FROM eventbus.dead_letters WHERE id = $dl")" \
	"42501|t" "the dead letter keeps its SQLSTATE and is not marked replayed"

done_testing
