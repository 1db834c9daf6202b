#!/usr/bin/env bash
# Brokers down when the launcher starts: it keeps retrying with backoff,
# logs once per state change (not once per attempt), and connects when the
# brokers appear.
source "$(dirname "$0")/lib.sh"

"$STACK" nats-stop >/dev/null
"$STACK" kafka-down >/dev/null
# log_lines TRANSPORT — state-change lines of the (new) launcher about it.
log_lines() { grep -cE "\[$new\] eventbus launcher LOG:  $1 (is unreachable|connected|connecting)" "$EVENTBUS_PG_LOG" || true; }

# Restart the launcher so it starts with both brokers down.
old=$(launcher_pid)
q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'eventbus launcher'" >/dev/null
wait_until 30 '[ -n "$(launcher_pid)" ] && [ "$(launcher_pid)" != "$old" ]'
ok $? "launcher restarted with both brokers down"
new=$(launcher_pid)
before_k=0; before_n=0
wait_until 20 '[ "$(broker_state kafka)" = down ]'
ok $? "Kafka reported down while its brokers are down"
wait_until 20 '[ "$(broker_state nats)" = down ]'
ok $? "NATS reported down while the server is stopped"

# Long enough for several retries at the 5 s backoff ceiling.
sleep 12
ok "$(q -c "SELECT detail <> '' FROM eventbus_status() WHERE component = 'launcher' AND transport = 'nats'" | grep -q t; echo $?)" \
	"status shows why NATS is down"
attempts() { q -c "SELECT coalesce(substring(detail from 'attempt ([0-9]+)'), '0') FROM eventbus_status() WHERE component = 'launcher' AND transport = '$1'"; }
ka=$(attempts kafka); na=$(attempts nats)
# Retrying continues, but with backoff: a fixed 0.5 s retry would make ~24 attempts in 12 s.
ok "$([ "$ka" -ge 3 ] && [ "$ka" -le 15 ]; echo $?)" "Kafka: still retrying, with backoff ($ka attempts so far)"
ok "$([ "$na" -ge 3 ] && [ "$na" -le 15 ]; echo $?)" "NATS: still retrying, with backoff ($na attempts so far)"
k=$(( $(log_lines kafka) - before_k )); n=$(( $(log_lines nats) - before_n ))
ok "$([ "$k" -le 2 ]; echo $?)" "Kafka outage logged once per state change, not per attempt ($k lines in 12+ s)"
ok "$([ "$n" -le 2 ]; echo $?)" "NATS outage logged once per state change, not per attempt ($n lines in 12+ s)"

"$STACK" kafka-up >/dev/null
"$STACK" nats-start >/dev/null
wait_until 30 both_connected
ok $? "launcher connects to both brokers once they are up"
# The line follows the state change it reports (written after the status
# is updated): wait for it.
wait_until 10 "[ \"\$(log_lines kafka)\" -gt $((before_k + k)) ] && [ \"\$(log_lines nats)\" -gt $((before_n + n)) ]"
ok $? "reconnection logged (one line each)"

done_testing
