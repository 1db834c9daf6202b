#!/usr/bin/env bash
# Brokers stopped in the middle of a burst and started again: publishing
# keeps succeeding, the backlog shows in eventbus_status(), and once the
# brokers are back every committed event arrives, in order.  The burst's last
# 1,000 events per transport are published once both brokers are down, so
# the outage always has a backlog however fast the relay drains the rest.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t11.kafka.$run"; TN="t11.nats.$run"
load_wire_functions; burst_proc_setup; publish_log_setup t11_pub
wait_until 20 both_connected || bail "brokers not connected"
processed() { q -c "SELECT coalesce(sum(processed), 0) FROM eventbus_status() WHERE component = 'launcher' AND transport = '$1'"; }
k0=$(processed kafka); n0=$(processed nats)

pids=()
for w in 1 2 3 4; do
	psql -X -q -c "CALL t_burst($w, 1250, '$TK', '$TN', 300, 'acct-', 't11_pub', 0.02)" &
	pids+=($!)
done
# Stop both brokers once the relay has delivered part of the burst.
wait_until 60 '[ "$(processed kafka)" -gt $((k0 + 300)) ] && [ "$(processed nats)" -gt $((n0 + 300)) ]'
ok $? "relay delivering part of the burst before the brokers go down"
"$STACK" kafka-down >/dev/null; "$STACK" nats-stop >/dev/null
diag "brokers down after $(( $(processed kafka) - k0 )) Kafka / $(( $(processed nats) - n0 )) NATS events"
for w in 5 6 7 8; do
	psql -X -q -c "CALL t_burst($w, 250, '$TK', '$TN', 300, 'acct-', 't11_pub')" &
	pids+=($!)
done

rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
ok $rc "publishing kept succeeding while the brokers were down"
sleep 2
backlog_k=$(q -c "SELECT backlog FROM eventbus_status() WHERE component = 'launcher' AND transport = 'kafka'")
backlog_n=$(q -c "SELECT backlog FROM eventbus_status() WHERE component = 'launcher' AND transport = 'nats'")
ok "$([ "$backlog_k" -gt 0 ] && [ "$backlog_n" -gt 0 ]; echo $?)" "backlog visible in eventbus_status() (kafka $backlog_k, nats $backlog_n)"
is "$(broker_state nats)" "down" "NATS reported down"
wait_until 30 '[ "$(broker_state kafka)" = down ]'
ok $? "Kafka reported down"

"$STACK" kafka-up >/dev/null; "$STACK" nats-start >/dev/null
wait_outbox_empty 180
ok $? "backlog delivered after the brokers came back"

for tr in kafka nats; do
	r=$(check_transport t11 $tr "$TK" "$TN")
	diag "$tr: $r"
	is "$(field "$r" published)" "6000" "$tr: 6,000 events committed"
	is "$(field "$r" missing)" "0" "$tr: zero missing after the outage"
	is "$(field "$r" order_violations)" "0" "$tr: per-aggregate order intact (first deliveries)"
	is "$(field "$r" version_gaps)" "0" "$tr: versions 1..k per aggregate"
	is "$(field "$r" duplicate_mismatches)" "0" "$tr: every duplicate is an identical re-send of its first delivery"
	is "$(field "$r" unexpected)" "0" "$tr: nothing unexpected"
	diag "$tr: $(field "$r" duplicates) duplicate deliveries (at-least-once across the outage)"
done

done_testing
