#!/usr/bin/env bash
# PostgreSQL immediate stop in the middle of a burst, then restart: every
# committed event arrives (the commit log is written in the same
# transaction as each publish, so it holds exactly what committed).
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t12.kafka.$run"; TN="t12.nats.$run"
load_wire_functions; burst_proc_setup; publish_log_setup t12_pub
wait_until 20 both_connected || bail "brokers not connected"
k0=$(q -c "SELECT min(processed) FROM eventbus_status() WHERE component = 'launcher' AND transport IS NOT NULL")

pids=()
for w in 1 2 3 4; do
	psql -X -q -c "CALL t_burst($w, 1500, '$TK', '$TN', 300, 'cart-', 't12_pub', 0.05)" >/dev/null 2>&1 &
	pids+=($!)
done
# Crash once the relay has delivered some events and an eighth of the burst
# has committed: publishing and relaying are both in flight.
wait_until 60 '[ "$(q -c "SELECT min(processed) FROM eventbus_status() WHERE component = '"'"'launcher'"'"' AND transport IS NOT NULL")" -gt $((k0 + 100)) ] && [ "$(q -c "SELECT count(*) FROM t12_pub")" -ge 1500 ]'
ok $? "burst under way: relay delivering, $(q -c "SELECT count(*) FROM t12_pub") events committed so far"
"$STACK" pg-stop immediate >/dev/null
ok $? "pg_ctl stop -m immediate in the middle of the burst"
for p in "${pids[@]}"; do wait "$p"; done
"$STACK" pg-start >/dev/null
wait_until 60 both_connected
ok $? "cluster restarted, launcher reconnected"
committed=$(q -c "SELECT count(*) FROM t12_pub")
ok "$([ "$committed" -gt 0 ] && [ "$committed" -lt 12000 ]; echo $?)" "the crash interrupted the burst ($committed of 12000 events committed)"
wait_outbox_empty 180
ok $? "relay drained the outbox left from before the crash"

for tr in kafka nats; do
	r=$(check_transport t12 $tr "$TK" "$TN")
	diag "$tr: $r"
	is "$(field "$r" missing)" "0" "$tr: every committed event arrived"
	is "$(field "$r" unexpected)" "0" "$tr: no event that did not commit"
	is "$(field "$r" order_violations)" "0" "$tr: per-aggregate order intact"
	is "$(field "$r" duplicate_mismatches)" "0" "$tr: every duplicate is an identical re-send of its first delivery"
	diag "$tr: $(field "$r" duplicates) duplicate deliveries (in flight at the crash)"
done

done_testing
