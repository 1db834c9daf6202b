#!/usr/bin/env bash
# Lifecycle: connected to both brokers soon after CREATE EXTENSION; after
# DROP EXTENSION the dispatcher and pool workers stop and the launcher's
# broker connections and client threads are gone; after CREATE EXTENSION
# again they all return.
source "$(dirname "$0")/lib.sh"

workers() { q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type IN ('eventbus dispatcher', 'eventbus worker')"; }

q -c "DROP EXTENSION IF EXISTS eventbus CASCADE" >/dev/null
wait_until 20 '[ "$(workers)" = 0 ]'
ok $? "no dispatcher or pool worker while the extension is absent"
pid=$(launcher_pid)
ok "$([ -n "$pid" ]; echo $?)" "launcher runs in the configured database while the extension is absent (pid ${pid:-none})"
wait_until 10 '[ "$(tcp_conns "$pid" $(kafka_ports) "$(nats_port)")" = 0 ]'
ok $? "no broker connection while the extension is absent"
idle_threads=$(threads "$pid")

t0=$(date +%s%N)
q -c "CREATE EXTENSION eventbus" >/dev/null
wait_until 10 both_connected
ok $? "eventbus_status() reports the launcher connected to Kafka and NATS after CREATE EXTENSION"
diag "connected $(( ($(date +%s%N) - t0) / 1000000 )) ms after CREATE EXTENSION"
is "$(q -c "SELECT pid FROM eventbus_status() WHERE component = 'launcher' AND transport IS NULL")" "$pid" \
	"eventbus_status() shows the launcher pid"
ok "$([ "$(tcp_conns "$pid" $(kafka_ports) "$(nats_port)")" -gt 0 ]; echo $?)" "launcher holds broker connections"
busy_threads=$(threads "$pid")
ok "$([ "$busy_threads" -gt "$idle_threads" ]; echo $?)" "client threads started ($idle_threads -> $busy_threads)"
wait_until 20 '[ "$(workers)" = 5 ]'
ok $? "dispatcher and 4 pool workers running ($(workers) processes)"

q -c "DROP EXTENSION eventbus CASCADE" >/dev/null
wait_until 20 '[ "$(workers)" = 0 ]'
ok $? "DROP EXTENSION stops the dispatcher and the pool"
wait_until 10 '[ "$(tcp_conns "$pid" $(kafka_ports) "$(nats_port)")" = 0 ]'
ok $? "DROP EXTENSION closes every broker connection"
wait_until 10 '[ "$(threads "$pid")" -le "$idle_threads" ]'
ok $? "DROP EXTENSION stops the client threads (now $(threads "$pid"), idle $idle_threads)"
is "$(launcher_pid)" "$pid" "launcher stays, waiting for CREATE EXTENSION"

q -c "CREATE EXTENSION eventbus" >/dev/null
wait_until 10 both_connected
ok $? "after CREATE EXTENSION again the launcher reconnects to both brokers"
wait_until 20 '[ "$(workers)" = 5 ]'
ok $? "after CREATE EXTENSION again the dispatcher and pool return"
is "$(threads "$pid")" "$busy_threads" "same thread count as before the DROP/CREATE cycle"

done_testing
