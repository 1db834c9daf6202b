#!/usr/bin/env bash
# A SIGKILLed eventbus worker: the postmaster restarts it (crash recovery)
# and it reconnects to both brokers.
source "$(dirname "$0")/lib.sh"

wait_until 20 both_connected || bail "brokers not connected at start"
old=$(launcher_pid)
kill -9 "$old"
ok $? "SIGKILL sent to launcher $old"
wait_until 60 '[ -n "$(launcher_pid)" ] && [ "$(launcher_pid)" != "$old" ]'
ok $? "postmaster restarted the launcher"
new=$(launcher_pid)
ok "$([ -n "$new" ] && [ "$new" != "$old" ]; echo $?)" "new launcher pid ($old -> ${new:-none})"
ok "$([ ! -d "/proc/$old" ]; echo $?)" "killed process is gone"
wait_until 30 both_connected
ok $? "restarted launcher reconnected to Kafka and NATS"

done_testing
