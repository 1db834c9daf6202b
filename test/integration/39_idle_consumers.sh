#!/usr/bin/env bash
# Idle JetStream consumers do not poll (issue: performance, idle cost).
# With 3 NATS subscriptions bound and nothing published, an independent
# client listening on $JS.API.CONSUMER.MSG.NEXT.> counts the pull requests
# the dispatcher sends for them over 11 s: a consumer keeps one request open
# that the server answers when messages arrive, renewed when it expires, so
# a few requests in all (fetching every 50 ms would send ~660).  Events
# published after that window, once the requests expired and were renewed,
# are all handled.  Counted, not timed; the dispatcher's CPU and context
# switches over the window are printed.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
NSUBS=3
WINDOW=11
topic() { echo "t34.nats.$run.$1"; }

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't34.nats.$run.%'"

q >/dev/null <<SQL
CREATE TABLE IF NOT EXISTS t34_handled (topic text, event_id uuid);
CREATE OR REPLACE FUNCTION t34_handle(e eventbus.envelope) RETURNS void LANGUAGE sql AS \$\$
  INSERT INTO public.t34_handled VALUES (e.topic, e.event_id)
\$\$;
SQL
for i in $(seq 1 $NSUBS); do
	q -c "SELECT eventbus_subscribe('$(topic "$i")', 't34_handle(eventbus.envelope)', 'nats')" >/dev/null
done
handled() { q -c "SELECT count(DISTINCT event_id) FROM t34_handled WHERE topic LIKE 't34.nats.$run.%'"; }
publish_each() {
	for i in $(seq 1 $NSUBS); do
		q -c "SELECT eventbus_publish('$(topic "$i")', 'agg-$i', 'T34', '{}'::jsonb, transport => 'nats')" >/dev/null
	done
}

# One event per subject: the consumers are bound and deliver.
publish_each
wait_count 60 $NSUBS "SELECT count(DISTINCT event_id) FROM t34_handled WHERE topic LIKE 't34.nats.$run.%'" 30
is "$COUNT" $NSUBS "each of the $NSUBS subscribed subjects delivers (consumers bound)"
sleep 1

# The idle window: pull requests of this test's durables (eventbus_t34_nats_<run>_N_<hash>).
disp=$(dispatcher_pid)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null; }
switches() { awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$1/status" 2>/dev/null; }
t0=$(ticks "$disp"); s0=$(switches "$disp")
requests=$("$NATSTOOL" --url "$EVENTBUS_NATS_URL" listen '$JS.API.CONSUMER.MSG.NEXT.>' $WINDOW | grep -c "_t34_nats_${run}_")
t1=$(ticks "$disp"); s1=$(switches "$disp")
diag "idle ${WINDOW} s, $NSUBS NATS subscriptions: $requests pull requests; dispatcher $((t1 - t0)) CPU ticks ($(getconf CLK_TCK)/s), $((s1 - s0)) voluntary context switches"
ok "$([ "$requests" -le $((NSUBS * 3)) ]; echo $?)" \
	"idle: at most 3 pull requests per subject in ${WINDOW} s ($requests for $NSUBS subjects; polling every 50 ms sends about 220 each)"
is "$(dispatcher_pid)" "$disp" "the dispatcher ran throughout"

# After the idle window (requests expired and renewed meanwhile): delivered again.
publish_each
wait_count 60 $((2 * NSUBS)) "SELECT count(DISTINCT event_id) FROM t34_handled WHERE topic LIKE 't34.nats.$run.%'" 30
is "$COUNT" $((2 * NSUBS)) "events published after the idle window are all handled"
is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t34_handled WHERE topic LIKE 't34.nats.$run.%'")" 0 "each once"

done_testing
