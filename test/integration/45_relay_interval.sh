#!/usr/bin/env bash
# eventbus.relay_interval: commits that arrive while a relay round is in
# flight, or soon after it, go together in the next round, which waits until
# the interval has passed since the last one started; a commit that finds the
# relay idle goes at once; one busy aggregate's events are not held to a
# round per interval.  Rounds are counted by relay_rounds_total
# (eventbus.metrics); on both transports every committed event reaches the
# broker once, in order.  The setting's range is enforced (22023) and a
# reload applies it.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
N=20
TK="t45.kafka.$run"
TN="t45.nats.$run"
# broker_pid TR — the broker process of TR on this stack.
broker_pid() {
	if [ "$1" = kafka ]; then cat "$EVENTBUS_STATE/kafka/devbroker.pid"; else cat "$EVENTBUS_STATE/nats/nats.pid"; fi
}
trap 'kill -CONT "$(broker_pid kafka)" "$(broker_pid nats)" 2>/dev/null
      q -c "ALTER SYSTEM RESET eventbus.relay_interval" -c "SELECT pg_reload_conf()" >/dev/null' EXIT

rounds() { q -c "SELECT value::bigint FROM eventbus.metrics WHERE name = 'relay_rounds_total' AND transport = '$1'"; }
topic_of() { if [ "$1" = kafka ]; then echo "$TK"; else echo "$TN"; fi; }
relayed() { [ "$(q -c "SELECT count(*) FROM eventbus.outbox WHERE topic = '$1'")" = 0 ]; }

# set_interval VALUE — ALTER SYSTEM, reload, and give the launcher time to
# take the SIGHUP (it reloads at the top of its loop).
set_interval() {
	q -c "ALTER SYSTEM SET eventbus.relay_interval = '$1'" -c "SELECT pg_reload_conf()" >/dev/null
	sleep 1
}

# publish TR FIRST LAST PAUSE — events FIRST..LAST on TR's topic, one
# transaction each, aggregate a<i> (so NATS may send them all in one round),
# logged in t45_pub in the same transaction; PAUSE seconds between commits.
publish() {
	local topic
	topic=$(topic_of "$1")
	q >/dev/null <<SQL
DO \$\$
DECLARE id uuid;
BEGIN
  FOR i IN $2..$3 LOOP
    id := eventbus_publish('$topic', 'a' || i, 'Counted', jsonb_build_object('i', i), '$1');
    INSERT INTO t45_pub VALUES (id, '$1', '$topic', 'a' || i, jsonb_build_object('i', i));
    COMMIT;
    PERFORM pg_sleep($4);
  END LOOP;
END \$\$;
SQL
}

publish_log_setup t45_pub
load_wire_functions

is "$(q -c "SELECT boot_val || ' ' || unit || ' ' || min_val || '..' || max_val || ' ' || context FROM pg_settings WHERE name = 'eventbus.relay_interval'")" \
	"5 ms 0..1000 sighup" "eventbus.relay_interval: default 5 ms, 0 to 1000 ms, reloadable"
is "$(psql -X -q -v VERBOSITY=verbose -c "ALTER SYSTEM SET eventbus.relay_interval = 1001" 2>&1 | sed -n 's/^ERROR:  \([0-9A-Z]\{5\}\):.*/\1/p')" \
	"22023" "a value over 1000 ms is refused (22023)"

for tr in kafka nats; do
	topic=$(topic_of $tr)
	bpid=$(broker_pid $tr)
	set_interval 1000

	# Commits that outpace the relay wait: round 1 is held in flight (its
	# broker paused) while one event commits; the broker resumes, round 1
	# ends, and N-1 more commit right after.  Round 2 waits out the rest
	# of the second and carries all N.  Without the wait, round 2 would
	# start as soon as round 1 ended, with the one event, and the N-1
	# would need a round 3.  A first event is relayed before the broker
	# is paused: on a fresh stack, with nothing relayed yet, round 1 did
	# not start while the Kafka broker was paused.  The steps up to round
	# 2 must fit in its second: polled every 20 ms.
	q >/dev/null <<SQL
INSERT INTO t45_pub SELECT eventbus_publish('$topic', 'warm', 'Counted', '{}', '$tr'), '$tr', '$topic', 'warm', '{}';
SQL
	wait_until 30 relayed "$topic" || bail "$tr: the first event was not relayed"
	r0=$(rounds $tr)
	kill -STOP "$bpid"
	publish $tr 0 0 0
	WAIT_STEP=0.02 wait_until 10 "[ \"\$(rounds $tr)\" -gt $r0 ]"
	ok $? "$tr: round 1 started, its broker paused"
	publish $tr 1 1 0
	kill -CONT "$bpid"
	WAIT_STEP=0.02 wait_until 10 "[ \"\$(q -c \"SELECT count(*) FROM eventbus.outbox WHERE topic = '$topic' AND aggregate_id = 'a0'\")\" = 0 ]"
	ok $? "$tr: round 1 ended once its broker resumed"
	publish $tr 2 $N 0
	wait_until 30 relayed "$topic"
	ok $? "$tr: the $((N + 1)) events were relayed"
	r1=$(rounds $tr)
	is "$((r1 - r0))" 2 "$tr: relay_interval = 1s: the $N events committed during and right after round 1 went together in round 2"

	# One aggregate's N events in one transaction are not held to a round
	# per interval (if they were, the N would take at least N-1 s): NATS
	# sends each once the previous one is acknowledged, in the same round
	# (46_relay_chains.sh counts the rounds).
	r0=$(rounds $tr)
	q >/dev/null <<SQL
BEGIN;
INSERT INTO t45_pub SELECT eventbus_publish('$topic', 'hot', 'Counted', jsonb_build_object('i', i), '$tr'), '$tr', '$topic', 'hot', jsonb_build_object('i', i)
  FROM generate_series(1, $N) i;
COMMIT;
SQL
	wait_until 10 relayed "$topic"
	ok $? "$tr: $N events of one aggregate relayed within 10 s with relay_interval = 1s"
	diag "$tr: they took $(( $(rounds $tr) - r0 )) round(s)"

	# A commit that finds the relay idle goes at once: N commits 0.1 s
	# apart get a round each although the interval is 1 s.
	r0=$(rounds $tr)
	publish $tr $((N + 1)) $((2 * N)) 0.1
	wait_until 30 relayed "$topic"
	ok $? "$tr: $N events committed 0.1 s apart were relayed"
	r1=$(rounds $tr)
	ok "$([ $((r1 - r0)) -ge $((N / 2)) ]; echo $?)" \
		"$tr: relay_interval = 1s, relay idle: $N commits 0.1 s apart went in $((r1 - r0)) rounds (at least $((N / 2)) expected)"

	r=$(check_transport t45 $tr "$TK" "$TN")
	diag "$tr: $r"
	is "$(field "$r" published)" "$((3 * N + 2))" "$tr: $((3 * N + 2)) events committed"
	is "$(field "$r" missing)" "0" "$tr: none missing on the broker"
	is "$(field "$r" duplicates)" "0" "$tr: no duplicates"
	is "$(field "$r" order_violations)" "0" "$tr: in order per aggregate"
done

done_testing
