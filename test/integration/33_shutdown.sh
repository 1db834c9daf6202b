#!/usr/bin/env bash
# Bounded shutdown and fast recovery.
#
# pg_ctl stop -m fast in each faulted state — right after a subscription
# change (a new Kafka topic being assigned), Kafka broker unreachable,
# nats-server stopped, a handler sleeping in pg_sleep(60) — must stop at all
# and leave no process of the old postmaster; the time it took is printed.
# The hang limit is 30 s, three times the 10 s the shutdown is designed to
# take at most (the figure itself is reported by the benchmark, not
# asserted); before the bound, a Kafka broker going away made it take the
# group session timeout, 45 s by default, or forever.  After each start the events
# published before the stop are all handled, once.  Then the recovery time
# after an immediate stop and after a kill -9 of a pool worker (the
# postmaster restarts everything) is printed per transport: publish, crash,
# start, time until the new events are handled.
#
# Kafka runs with librdkafka's default group timings here (session 45 s), as
# a real deployment would: the bound must not depend on the dev stack's
# shortened ones.  Figures are printed as "# figure NAME MS" lines (the
# benchmark collects them); no timing is asserted.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t29.kafka.$run"; TN="t29.nats.$run"; TK2="t29.kafka2.$run"
HANG_LIMIT=30

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't29.%.$run'"
# Production group timings (librdkafka defaults) for this test.
q -c "ALTER SYSTEM SET eventbus.kafka_properties = 'fetch.wait.max.ms=10'" >/dev/null
q -c "SELECT pg_reload_conf()" >/dev/null
CONSUMER_CHANGED_KAFKA_PROPS=1

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t29_pub, t29_handled, t29_sleep;
CREATE TABLE t29_pub (event_id uuid PRIMARY KEY, phase text, transport text, aggregate_id text);
CREATE TABLE t29_handled (n bigserial, event_id uuid, transport text, aggregate_id text, version bigint, at timestamptz DEFAULT clock_timestamp());
CREATE TABLE t29_sleep (started timestamptz);
CREATE OR REPLACE FUNCTION t29_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  -- Sleeps only in the server run the test armed it for.
  IF e.payload ? 'sleep' AND EXISTS (SELECT 1 FROM public.t29_sleep WHERE started = pg_postmaster_start_time()) THEN
    PERFORM pg_sleep((e.payload->>'sleep')::float8);
  END IF;
  INSERT INTO public.t29_handled (event_id, transport, aggregate_id, version)
  VALUES (e.event_id, e.transport, e.aggregate_id, e.event_version);
END $$;
SQL

# publish PHASE N [TRANSPORTS] [PAYLOAD] — N events per transport over 10
# aggregates, logged in t29_pub in the same transaction.
publish() {
	local ph=$1 n=$2 trs=${3:-kafka nats} payload=${4:-'{}'} tr topic
	for tr in $trs; do
		topic=$TN; [ "$tr" = kafka ] && topic=$TK
		q -c "INSERT INTO t29_pub SELECT eventbus_publish('$topic', '$ph-' || (i % 10), 'T29Happened', '$payload'::jsonb, '$tr'), '$ph', '$tr', '$ph-' || (i % 10)
		        FROM generate_series(1, $n) i" >/dev/null || return 1
	done
}
# handled_of PHASE — distinct events of the phase handled (both transports).
handled_of() {
	q -c "SELECT count(DISTINCT h.event_id) FROM t29_handled h JOIN t29_pub p USING (event_id) WHERE p.phase = '$1'" 2>/dev/null | grep -E '^[0-9]+$'
}
now_ms() { date +%s%3N; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; }
alive() { for p in "$@"; do grep -qs '^State:[[:space:]]*[^Z]' "/proc/$p/status" && printf ' %s' "$p"; done; }

# stop_fast STATE — pg_ctl stop -m fast; assert it stopped and nothing of the
# old cluster remains; print the time.
stop_fast() {
	local st=$1 pm children t0 ms out
	pm=$(head -1 "$EVENTBUS_PGDATA/postmaster.pid")
	children=$(ps -o pid= --ppid "$pm" | xargs)
	t0=$(now_ms)
	out=$("$STACK" pg-stop fast 2>&1)
	ms=$(( $(now_ms) - t0 ))
	diag "figure shutdown_${st// /_}_ms $ms"
	diag "$st: pg_ctl stop -m fast took $(secs "$ms") s"
	ok "$([[ $out == *"stopped (fast"* ]] && [ "$ms" -lt $((HANG_LIMIT * 1000)) ]; echo $?)" \
		"$st: pg_ctl stop -m fast finished within the ${HANG_LIMIT} s hang limit"
	[[ $out == *"stopped (fast"* ]] || diag "$out"
	wait_until 10 '[ -z "$(alive $pm $children)" ]'
	is "$(alive $pm $children)" "" "$st: no process of the old postmaster remains"
}

# start_and_check STATE PHASE — start, then every event of PHASE handled.
start_and_check() {
	local st=$1 ph=$2 want
	"$STACK" pg-start >/dev/null || bail "PostgreSQL did not start"
	want=$(q -c "SELECT count(*) FROM t29_pub WHERE phase = '$ph'")
	wait_count 90 "$want" "SELECT count(DISTINCT h.event_id) FROM t29_handled h JOIN t29_pub p USING (event_id) WHERE p.phase = '$ph'"
	ok $? "$st: after the start, all $want events published before the stop are handled ($COUNT)"
}

# Subscribe and warm up (also after the config change restarted the dispatcher).
subs=$(q -c "SELECT eventbus_subscribe('$TK', 't29_handler(eventbus.envelope)', 'kafka'), eventbus_subscribe('$TN', 't29_handler(eventbus.envelope)', 'nats')")
ok "$([[ $subs =~ ^[0-9]+\|[0-9]+$ ]]; echo $?)" "subscribed on both transports ($subs)"
wait_until 30 dispatcher_running || bail "no dispatcher"
publish warm 5
wait_count 120 10 "SELECT count(DISTINCT h.event_id) FROM t29_handled h JOIN t29_pub p USING (event_id) WHERE p.phase = 'warm'"
ok $? "warm-up events handled on both transports ($COUNT of 10)"

# --- 1: right after a subscription change --------------------------------
publish sub 20
wait_until 60 '[ "$(handled_of sub)" = 40 ]'
q -c "SELECT eventbus_subscribe('$TK2', 't29_handler(eventbus.envelope)', 'kafka')" >/dev/null
q -c "INSERT INTO t29_pub SELECT eventbus_publish('$TK2', 'sub2-' || i, 'T29Happened', '{}', 'kafka'), 'sub', 'kafka', 'sub2-' || i FROM generate_series(1, 10) i" >/dev/null
sleep 1
stop_fast "subscription change"
start_and_check "subscription change" sub

# --- 2: Kafka broker unreachable -------------------------------------------
wait_until 60 both_connected && wait_until 60 '[ "$(consumer_state kafka)" = connected ]'
publish kdown 20
wait_until 60 '[ "$(handled_of kdown)" = 40 ]'
publish kdown 20 kafka
"$STACK" kafka-down >/dev/null
wait_until 30 '[ "$(consumer_state kafka)" = down ]'
ok $? "Kafka reported down by the dispatcher"
stop_fast "Kafka unreachable"
"$STACK" kafka-up >/dev/null
start_and_check "Kafka unreachable" kdown

# --- 3: nats-server stopped ------------------------------------------------
wait_until 60 both_connected && wait_until 60 '[ "$(consumer_state nats)" = connected ]'
publish ndown 20
wait_until 60 '[ "$(handled_of ndown)" = 40 ]'
publish ndown 20 nats
"$STACK" nats-stop >/dev/null
wait_until 30 '[ "$(consumer_state nats)" = down ]'
ok $? "NATS reported down by the dispatcher"
stop_fast "NATS stopped"
"$STACK" nats-start >/dev/null
start_and_check "NATS stopped" ndown

# --- 4: a handler sleeping in pg_sleep(60) ---------------------------------
wait_until 60 both_connected
q -c "INSERT INTO t29_sleep VALUES (pg_postmaster_start_time())" >/dev/null
publish sleep 1 kafka '{"sleep": 60}'
publish sleep 1 nats '{"sleep": 60}'
sleeping() { q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'eventbus worker' AND wait_event = 'PgSleep'"; }
wait_until 60 '[ "$(sleeping)" -ge 1 ]'
ok $? "a handler is sleeping in pg_sleep(60) ($(sleeping) workers)"
stop_fast "handler in pg_sleep"
start_and_check "handler in pg_sleep" sleep

# --- recovery after a crash ------------------------------------------------
# recover PHASE HOW — publish, crash, start; time until the new events of each
# transport are handled.
recover() {
	local ph=$1 how=$2 t0 tr ms victim
	wait_until 60 both_connected && wait_until 60 dispatcher_running
	publish "$ph-old" 10
	wait_until 60 '[ "$(handled_of "$ph-old")" = 20 ]'
	# Timed from the start (immediate stop) or from the kill (the postmaster
	# restarts everything by itself).
	if [ "$how" = immediate ]; then
		"$STACK" pg-stop immediate >/dev/null
		"$STACK" pg-start >/dev/null || bail "PostgreSQL did not start"
		t0=$(now_ms)
	else
		victim=$(worker_pid 0)
		t0=$(now_ms)
		kill -9 "$victim"
		sleep 0.5
		wait_until 60 'q -c "SELECT 1" | grep -qx 1'
	fi
	publish "$ph" 10
	for tr in kafka nats; do
		wait_count 120 10 "SELECT count(DISTINCT h.event_id) FROM t29_handled h JOIN t29_pub p USING (event_id) WHERE p.phase = '$ph' AND p.transport = '$tr'"
		ok $? "$how: $tr consumption resumed ($COUNT of 10 new events handled)"
		ms=$(q -c "SELECT (extract(epoch FROM max(h.at)) * 1000)::bigint - $t0 FROM t29_handled h JOIN t29_pub p USING (event_id) WHERE p.phase = '$ph' AND p.transport = '$tr'")
		diag "figure recovery_${how}_${tr}_ms $ms"
		diag "$how: $tr resumed $(secs "$ms") s after the $( [ "$how" = immediate ] && echo start || echo kill)"
	done
}
recover crash1 immediate
recover crash2 kill9

# --- everything once --------------------------------------------------------
is "$(q -c "SELECT count(*) FROM t29_pub p WHERE NOT EXISTS (SELECT 1 FROM t29_handled h WHERE h.event_id = p.event_id)")" "0" \
	"every published event was handled (none lost across the stops)"
is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t29_handled")" "0" "no event was handled twice"

done_testing
