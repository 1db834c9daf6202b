#!/usr/bin/env bash
# The Kafka dev broker answers a fetch when data arrives, as a real broker
# answers a long poll (test/tools/devbroker_proxy.c), instead of holding it
# for the consumer's whole fetch.wait.max.ms as librdkafka's mock cluster
# does.  A consumer whose fetch waits up to 5 minutes (librdkafka's most) gets a message
# produced after that fetch went out: the run's limit (60 s) is far inside
# the wait, so with a broker that holds the fetch it cannot arrive at all.
source "$(dirname "$0")/lib.sh"

T="t49.fetch.$$"
out=$(mktemp)
trap 'rm -f "$out"' EXIT

printf 'k\tfirst\n' | kafka_produce "$T" -p 0
ok $? "first message produced to $T"

# One partition, from the start: the consumer reads "first", and its next
# fetch finds nothing and waits.
timeout 60 kcat -C -b "$EVENTBUS_KAFKA_BROKERS" -t "$T" -p 0 -o beginning -c 2 -q -u -f '%s\n' \
	-X fetch.wait.max.ms=300000 > "$out" 2>/dev/null &
consumer=$!
wait_until 30 'grep -qx first "$out"'
ok $? "the consumer read the first message"

printf 'k\tsecond\n' | kafka_produce "$T" -p 0
ok $? "second message produced while the consumer's fetch waits"

wait "$consumer"
rc=$?
is "$rc" 0 "the consumer got both messages and ended (kcat exit $rc; 124 = still waiting after 60 s)"
is "$(tr '\n' ' ' < "$out")" "first second " "in order, each once"

done_testing
