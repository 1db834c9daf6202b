#!/usr/bin/env bash
# publish.sh — publish throughput: events/s from eventbus_publish to broker
# acknowledgement, per transport.  N events over N/10 aggregates from C
# concurrent connections in transactions of 1–40 events; the clock runs from
# the first publish to the moment the outbox is empty (every event
# acknowledged by the broker), sampled every 10 ms.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
N=${BENCH_EVENTS:-20000}
C=${BENCH_CONNECTIONS:-4}
# shellcheck disable=SC1090
source "${EVENTBUS_ENV:-$("$REPO/scripts/stack.sh" env)}"
mkdir -p "$REPO/bench/results"

PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION IF NOT EXISTS eventbus;
CREATE OR REPLACE PROCEDURE bench_publish(tr text, topic text, n int, naggs int)
LANGUAGE plpgsql AS $$
DECLARE done int := 0; sz int; agg text;
BEGIN
  WHILE done < n LOOP
    sz := least(1 + floor(random() * 40)::int, n - done);
    FOR agg IN SELECT 'acct-' || floor(random() * naggs)::int FROM generate_series(1, sz) ORDER BY 1 LOOP
      PERFORM eventbus_publish(topic, agg, 'Deposited', jsonb_build_object('amount', 10, 'currency', 'EUR'), tr);
    END LOOP;
    COMMIT;
    done := done + sz;
  END LOOP;
END $$;
SQL

now_ms() { date +%s%3N; }
printf '%-8s %10s %12s %14s %16s\n' transport events connections publish_ms "events/s (acked)"
json="["
for tr in kafka nats; do
	topic="bench.publish.$tr.$(date +%s)"
	until [ "$(psql -X -A -t -c "SELECT state FROM eventbus_status() WHERE component = 'launcher' AND transport = '$tr'")" = connected ]; do sleep 0.2; done
	t0=$(now_ms)
	pids=()
	for _ in $(seq 1 "$C"); do
		psql -X -q -c "CALL bench_publish('$tr', '$topic', $((N / C)), $((N / 10)))" & pids+=($!)
	done
	for p in "${pids[@]}"; do wait "$p"; done
	t_pub=$(now_ms)
	while [ "$(psql -X -A -t -c "SELECT count(*) FROM eventbus.outbox WHERE transport = '$tr'")" != 0 ]; do sleep 0.01; done
	t1=$(now_ms)
	rate=$(( N * 1000 / (t1 - t0) ))
	printf '%-8s %10d %12d %14d %16d\n' "$tr" "$N" "$C" $((t_pub - t0)) "$rate"
	json="$json{\"transport\":\"$tr\",\"events\":$N,\"connections\":$C,\"publish_ms\":$((t_pub - t0)),\"acked_ms\":$((t1 - t0)),\"events_per_s\":$rate},"
done
echo "${json%,}]" > "$REPO/bench/results/publish.json"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(date -u +%Y-%m-%d); results in bench/results/publish.json"
