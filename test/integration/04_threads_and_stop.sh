#!/usr/bin/env bash
# No thread or connection leak across 20 SIGHUP reloads; after pg_ctl stop
# no process of the cluster remains.
source "$(dirname "$0")/lib.sh"

wait_until 20 both_connected || bail "brokers not connected at start"
dispatcher_pid() { psql -X -A -t -q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbus dispatcher'" 2>/dev/null | grep -E '^[0-9]+$'; }
wait_until 30 '[ -n "$(dispatcher_pid)" ]' || bail "no dispatcher"
sleep 2
pid=$(launcher_pid); dpid=$(dispatcher_pid)
t0=$(threads "$pid"); c0=$(tcp_conns "$pid" $(kafka_ports) "$(nats_port)")
fd0=$(ls "/proc/$pid/fd" | wc -l)
dt0=$(threads "$dpid"); dc0=$(tcp_conns "$dpid" $(kafka_ports) "$(nats_port)")
for i in $(seq 1 20); do
	q -c "SELECT pg_reload_conf()" >/dev/null
	sleep 0.3
done
sleep 1
is "$(launcher_pid)" "$pid" "launcher survived 20 SIGHUPs"
is "$(threads "$pid")" "$t0" "thread count stable across 20 SIGHUP reloads"
is "$(tcp_conns "$pid" $(kafka_ports) "$(nats_port)")" "$c0" "broker connection count stable across reloads"
is "$(ls "/proc/$pid/fd" | wc -l)" "$fd0" "open file count stable across reloads"
is "$(dispatcher_pid)" "$dpid" "dispatcher survived 20 SIGHUPs"
is "$(threads "$dpid")" "$dt0" "dispatcher thread count stable across reloads ($dt0)"
is "$(tcp_conns "$dpid" $(kafka_ports) "$(nats_port)")" "$dc0" "dispatcher broker connection count stable across reloads ($dc0)"
ok "$(both_connected; echo $?)" "still connected to both brokers"

pm=$(head -1 "$EVENTBUS_PGDATA/postmaster.pid")
children=$(ps -o pid= --ppid "$pm" | xargs)
ok "$([ -n "$children" ]; echo $?)" "cluster processes before stop: $pm $children"
"$STACK" pg-stop fast >/dev/null
# alive PID... — those still running (a zombie awaiting reaping by init has exited).
alive() { for p in "$@"; do grep -qs '^State:[[:space:]]*[^Z]' "/proc/$p/status" && printf ' %s' "$p"; done; }
wait_until 10 '[ -z "$(alive $pm $children)" ]'
is "$(alive $pm $children)" "" "no process of the cluster remains after pg_ctl stop"
"$STACK" pg-start >/dev/null
wait_until 30 both_connected
ok $? "cluster restarted and reconnected"

done_testing
