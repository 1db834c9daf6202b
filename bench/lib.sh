# shellcheck shell=bash
# bench/lib.sh — the benchmark harness (sourced): one measured run of the
# bench.sql workload, its figures as JSON.  Used by bench/run.sh (`make
# bench`) and by test/integration/30_bench_smoke.sh (its smallest level, in
# `make test`), so the smoke test exercises exactly the code that produces
# the published figures.
#
# Needs the stack's environment (PGHOST, PGPORT, ..., EVENTBUS_PGDATA,
# EVENTBUS_STATE) and:
#   BENCH_SCHEMA   schema holding the workload (bench_setup creates it)
#   BENCH_PREFIX   first part of every topic name (e.g. bench, t30)
#   BENCH_RUN      run id, last part of every topic name
#
# Nothing in here sleeps inside a measured window: a run's window is
# min(orders.created_at) → max(handler commit timestamp), both read from the
# database after the run; the shell only polls to learn that it is over.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_PREV_TOPICS=()    # topics subscribed by the previous run (dropped at the next subscribe)
BENCH_EB_PIDS=""        # every eventbus pid seen (for the leftover count after stop)

# bq SQL... — psql in the stack's database, unaligned, tuples only.
bq() { psql -X -A -t -q -v ON_ERROR_STOP=1 "$@"; }

bench_log() { echo "bench: $*" >&2; }

# bench_setup — create the workload schema (bench.sql with @S@ replaced).
bench_setup() {
	sed "s/@S@/$BENCH_SCHEMA/g" "$BENCH_DIR/bench.sql" |
		PGOPTIONS="-c client_min_messages=warning" bq >/dev/null
}

# bench_teardown — unsubscribe every topic of this run, drop the schema.
bench_teardown() {
	bq -c "SELECT count(*) FILTER (WHERE eventbus_unsubscribe(topic, handler, transport))
	         FROM eventbus.subscriptions WHERE topic LIKE '$BENCH_PREFIX.%.$BENCH_RUN'" >/dev/null
	PGOPTIONS="-c client_min_messages=warning" bq -c "DROP SCHEMA IF EXISTS $BENCH_SCHEMA CASCADE" >/dev/null
}

# bench_wait SECONDS SQL — poll (0.1 s) until SQL returns t.
bench_wait() {
	local deadline=$((SECONDS + $1))
	until [ "$(bq -c "$2" 2>/dev/null)" = t ]; do
		[ $SECONDS -ge $deadline ] && return 1
		sleep 0.1
	done
}

# ---------------------------------------------------------------------------
# /proc: CPU time and peak RSS of the stack's processes
# ---------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# bench_eventbus_pids — "pid role" lines from pg_stat_activity.
bench_eventbus_pids() {
	bq -F ' ' -c "SELECT pid, replace(backend_type, 'eventbus ', '') FROM pg_stat_activity
	               WHERE backend_type IN ('eventbus launcher', 'eventbus dispatcher', 'eventbus worker') ORDER BY 2, 1"
}

bench_postmaster_pid() { head -1 "$EVENTBUS_PGDATA/postmaster.pid" 2>/dev/null; }

# stat_fields PID — the fields of /proc/PID/stat after "(comm)" into the
# array STAT (STAT[0] = state, STAT[1] = ppid, STAT[11] = utime, STAT[12] =
# stime, STAT[13] = cutime, STAT[14] = cstime); status 1 if gone.
stat_fields() {
	local s
	[ -n "$1" ] && read -r s 2>/dev/null < "/proc/$1/stat" || return 1
	read -ra STAT <<< "${s##*) }"
}

# cpu_ticks PID [children] — utime+stime (+ cutime+cstime of reaped children).
cpu_ticks() {
	if ! stat_fields "$1"; then echo 0; return; fi
	if [ "${2:-}" = children ]; then
		echo $((STAT[11] + STAT[12] + STAT[13] + STAT[14]))
	else
		echo $((STAT[11] + STAT[12]))
	fi
}

# machine_ticks — "busy total" jiffies of all CPUs from /proc/stat.
machine_ticks() {
	awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# bench_proc_snapshot — sets SNAP_* (CPU ticks per component, wall ns).
# Components: launcher, dispatcher, workers (sum), other postgres processes
# (backends: the publishing connections, the sampler, autovacuum; checkpointer,
# walwriter... — live ones plus the reaped ones through the postmaster's
# cutime), nats-server, devbroker, the whole machine.
bench_proc_snapshot() {
	local pid role pm p eb=" "
	SNAP_WALL=$(date +%s%N)
	SNAP_LAUNCHER=0 SNAP_DISPATCHER=0 SNAP_WORKERS=0 SNAP_PG=0
	while read -r pid role; do
		[ -n "$pid" ] || continue
		eb="$eb$pid "
		stat_fields "$pid" || continue
		case $role in
			launcher) SNAP_LAUNCHER=$((SNAP_LAUNCHER + STAT[11] + STAT[12])) ;;
			dispatcher) SNAP_DISPATCHER=$((SNAP_DISPATCHER + STAT[11] + STAT[12])) ;;
			worker) SNAP_WORKERS=$((SNAP_WORKERS + STAT[11] + STAT[12])) ;;
		esac
	done < <(bench_eventbus_pids)
	pm=$(bench_postmaster_pid)
	if [ -n "$pm" ] && stat_fields "$pm"; then
		SNAP_PG=$((STAT[11] + STAT[12] + STAT[13] + STAT[14]))
		for p in /proc/[0-9]*; do
			p=${p#/proc/}
			[[ $eb == *" $p "* ]] && continue
			stat_fields "$p" || continue
			[ "${STAT[1]}" = "$pm" ] && SNAP_PG=$((SNAP_PG + STAT[11] + STAT[12]))
		done
	fi
	read -r p 2>/dev/null < "$EVENTBUS_STATE/nats/nats.pid" || true   # no newline in that file
	SNAP_NATS=$(cpu_ticks "${p//[^0-9]/}")
	p=
	read -r p 2>/dev/null < "$EVENTBUS_STATE/kafka/devbroker.pid" || true
	SNAP_KAFKA=$(cpu_ticks "${p//[^0-9]/}")
	read -r SNAP_BUSY SNAP_TOTAL < <(machine_ticks)
}

# bench_snap_save PREFIX — copy SNAP_* to PREFIX_*.
bench_snap_save() {
	local v
	for v in WALL LAUNCHER DISPATCHER WORKERS PG NATS KAFKA BUSY TOTAL; do
		printf -v "${1}_$v" '%s' "$(eval echo "\$SNAP_$v")"
	done
}

# bench_cpu_json — CPU seconds per component between BEFORE_* and SNAP_*
# (the shell's window around a run, a little wider than the measured one).
# unattributed = the machine's busy time minus the stack's processes: the
# harness's psql clients, and whatever else runs on the machine.
bench_cpu_json() {
	local wall ncpu
	wall=$(( (SNAP_WALL - BEFORE_WALL) / 1000000 ))
	ncpu=$(nproc)
	awk -v hz="$CLK_TCK" -v wall="$wall" -v ncpu="$ncpu" \
	    -v l=$((SNAP_LAUNCHER - BEFORE_LAUNCHER)) -v d=$((SNAP_DISPATCHER - BEFORE_DISPATCHER)) \
	    -v w=$((SNAP_WORKERS - BEFORE_WORKERS)) -v pg=$((SNAP_PG - BEFORE_PG)) \
	    -v n=$((SNAP_NATS - BEFORE_NATS)) -v k=$((SNAP_KAFKA - BEFORE_KAFKA)) \
	    -v busy=$((SNAP_BUSY - BEFORE_BUSY)) -v tot=$((SNAP_TOTAL - BEFORE_TOTAL)) 'BEGIN {
		printf "{\"window_s\": %.2f, \"launcher\": %.2f, \"dispatcher\": %.2f, \"workers\": %.2f, \"other_postgres\": %.2f, \"nats_server\": %.2f, \"devbroker\": %.2f, \"machine_busy\": %.2f, \"machine_capacity\": %.2f, \"unattributed\": %.2f}",
		       wall / 1000, l / hz, d / hz, w / hz, pg / hz, n / hz, k / hz, busy / hz, tot / hz, (busy - l - d - w - pg - n - k) / hz }'
}

# bench_reset_hwm — restart the peak-RSS counters (VmHWM) of the eventbus
# processes (writing 5 to clear_refs; needs root or the postgres user).
bench_reset_hwm() {
	local pid role
	while read -r pid role; do
		[ -n "$pid" ] && { echo 5 > "/proc/$pid/clear_refs"; } 2>/dev/null
	done < <(bench_eventbus_pids)
	return 0
}

# bench_rss_json — peak RSS (VmHWM, MiB) of launcher, dispatcher, workers
# (largest and sum) since the last reset; their private (RssAnon) part and
# thread counts at the end of the run.  VmHWM includes the shared memory
# (shared_buffers) pages a process touched.
bench_rss_json() {
	local pid role hwm anon thr l=0 d=0 wmax=0 wsum=0 la=0 da=0 wa=0 lt=0 dt=0
	while read -r pid role; do
		[ -n "$pid" ] || continue
		read -r hwm anon thr < <(awk '/^VmHWM:/ {h = $2} /^RssAnon:/ {a = $2} /^Threads:/ {t = $2}
		                               END {print h + 0, a + 0, t + 0}' "/proc/$pid/status" 2>/dev/null)
		case $role in
			launcher) l=$hwm la=$anon lt=$thr ;;
			dispatcher) d=$hwm da=$anon dt=$thr ;;
			worker) wsum=$((wsum + hwm)); [ "$hwm" -gt "$wmax" ] && wmax=$hwm; [ "$anon" -gt "$wa" ] && wa=$anon ;;
		esac
	done < <(bench_eventbus_pids)
	awk -v l="$l" -v d="$d" -v wm="$wmax" -v ws="$wsum" -v la="$la" -v da="$da" -v wa="$wa" -v lt="$lt" -v dt="$dt" 'BEGIN {
		printf "{\"launcher\": %.1f, \"dispatcher\": %.1f, \"worker_max\": %.1f, \"workers_sum\": %.1f, \"launcher_anon_end\": %.1f, \"dispatcher_anon_end\": %.1f, \"worker_anon_end_max\": %.1f, \"launcher_threads\": %d, \"dispatcher_threads\": %d}",
		       l / 1024, d / 1024, wm / 1024, ws / 1024, la / 1024, da / 1024, wa / 1024, lt, dt }'
}

# ---------------------------------------------------------------------------
# One measured run
# ---------------------------------------------------------------------------

# bench_subscribe TOPIC... — in one transaction: unsubscribe the previous
# run's topics, subscribe the handler to these (one Kafka rebalance).
bench_subscribe() {
	local prev="" t
	for t in "${BENCH_PREV_TOPICS[@]}"; do prev="$prev,'$t'"; done
	bq >/dev/null <<SQL
BEGIN;
SELECT eventbus_unsubscribe(topic, handler, transport) FROM eventbus.subscriptions
 WHERE topic IN (''$prev) AND handler = '$BENCH_SCHEMA.handle(eventbus.envelope)'::regprocedure;
SELECT eventbus_subscribe(topic, '$BENCH_SCHEMA.handle(eventbus.envelope)'::regprocedure, transport)
  FROM (SELECT DISTINCT topic, transport FROM $BENCH_SCHEMA.plan WHERE topic IN ($(printf "'%s'," "$@" | sed 's/,$//'))) s;
COMMIT;
SQL
	BENCH_PREV_TOPICS=("$@")
}

# bench_run KEY LABEL EVENTS CONNS TRANSPORTS MODE [MIN MAX | BATCH INTERVAL]
#   KEY         run key (unique in this harness run)
#   LABEL       second part of the topic names (the level, or "steady")
#   EVENTS      events (EVENTS/10 aggregates, versions 1..10, 5 topics per transport)
#   CONNS       concurrent publishing connections
#   TRANSPORTS  "kafka", "nats" or "kafka,nats" (aggregates alternate)
#   MODE        load:   as fast as possible, MIN..MAX rows per transaction
#               steady: BATCH rows per transaction every INTERVAL seconds per connection
# Sets BENCH_DOC to the run's figures, one JSON object (level_stats + cpu +
# rss); returns 1 if the warm-up failed (subscriptions never became active).
# Not to be run in a subshell: it remembers the subscribed topics and the
# eventbus pids for the next run and for the leftover count.
bench_run() {
	local key=$1 label=$2 events=$3 conns=$4 trs=$5 mode=$6 a=$7 b=$8
	local topics=() nt c pids=() sampler cpu rss timeout pid role
	BENCH_DOC=
	mapfile -t topics < <(bq -c "SELECT $BENCH_SCHEMA.make_plan('$key', '$BENCH_PREFIX', '$label', '$BENCH_RUN',
	                                      $events, $conns, string_to_array('$trs', ','))")
	nt=${#topics[@]}
	[ "$nt" -gt 0 ] || { bench_log "$key: no plan"; return 1; }

	# Warm-up: one event per topic (creates the Kafka topic / JetStream
	# stream), relayed, then the subscriptions; wait until the handler has
	# seen every warm-up event, so the measured window starts with active
	# consumers (no group join inside it).
	bq -c "SELECT count(eventbus_publish(topic, 'warmup', 'Warmup', '{}', transport))
	         FROM (SELECT DISTINCT topic, transport FROM $BENCH_SCHEMA.plan WHERE run_key = '$key') s" >/dev/null
	bench_wait 60 "SELECT NOT EXISTS (SELECT 1 FROM eventbus.outbox WHERE topic IN (SELECT topic FROM $BENCH_SCHEMA.plan WHERE run_key = '$key'))" ||
		{ bench_log "$key: warm-up events not relayed within 60 s"; return 1; }
	bench_subscribe "${topics[@]}"
	bench_wait 90 "SELECT count(DISTINCT topic) = $nt FROM $BENCH_SCHEMA.handled
	                WHERE aggregate_id = 'warmup' AND topic IN (SELECT topic FROM $BENCH_SCHEMA.plan WHERE run_key = '$key')" ||
		{ bench_log "$key: subscriptions not active within 90 s (warm-up events not handled)"; return 1; }

	bench_reset_hwm
	bench_proc_snapshot; bench_snap_save BEFORE
	if [ "$mode" = steady ]; then
		timeout=$(awk -v e="$events" -v c="$conns" -v a="$a" -v b="$b" 'BEGIN { printf "%d", e / (c * a) * b + 180 }')
	else
		timeout=300
	fi
	bq -c "CALL $BENCH_SCHEMA.sample('$key', $events, $timeout, 30, ${BENCH_SAMPLE_EVERY:-0.5})" >/dev/null &
	sampler=$!
	for ((c = 0; c < conns; c++)); do
		if [ "$mode" = steady ]; then
			PGAPPNAME=bench_publisher bq -c "CALL $BENCH_SCHEMA.steady('$key', $c, $a, $b)" >/dev/null &
		else
			PGAPPNAME=bench_publisher bq -c "CALL $BENCH_SCHEMA.load('$key', $c, $a, $b)" >/dev/null &
		fi
		pids+=($!)
	done
	for c in "${pids[@]}"; do wait "$c" || bench_log "$key: a publishing connection failed"; done
	wait "$sampler" || bench_log "$key: the sampler failed"
	bench_proc_snapshot
	cpu=$(bench_cpu_json)
	rss=$(bench_rss_json)
	while read -r pid role; do
		[[ -z $pid || " $BENCH_EB_PIDS " == *" $pid "* ]] || BENCH_EB_PIDS="$BENCH_EB_PIDS $pid"
	done < <(bench_eventbus_pids)
	BENCH_DOC=$(bq -c "SELECT $BENCH_SCHEMA.level_stats('$key')
	                      || jsonb_build_object('label', '$label', 'transports', '$trs', 'connections', $conns, 'mode', '$mode',
	                                            'rows_per_tx', '$([ "$mode" = steady ] && echo "$a" || echo "$a-$b")',
	                                            'topics', $nt, 'aggregates', $events / 10,
	                                            'cpu_s', '$cpu'::jsonb, 'rss_peak_mib', '$rss'::jsonb)")
	[ -n "$BENCH_DOC" ]
}

# bench_field JSON PATH... — a value from a JSON document (via the database).
bench_field() {
	local doc=$1; shift
	bq -c "SELECT '${doc//\'/\'\'}'::jsonb #>> '{$(IFS=,; echo "$*")}'"
}

# ---------------------------------------------------------------------------
# The reference limit: pgbench doing the same writes without eventbus
# ---------------------------------------------------------------------------

# bench_reference SECONDS CLIENTS — run pgbench on the ref_* tables and print
# JSON: events/s this database sustains for the same rows, written in
# transactions like eventbus's: publish 3 events per transaction (business
# row, version bump, outbox row each), relay deletes of up to 100 sent rows,
# consume 64 events per transaction (the pool's batch: inbox row, projection
# upsert, handled row each).  Script weights keep published ≈ consumed;
# events/s = min(published, consumed) / duration.  Each client works on its
# own aggregates (as each pool worker owns its keys), so nothing deadlocks.
bench_reference() {
	local secs=$1 clients=$2 dir out s i pub_tps con_tps rel_tps ev
	dir=$(mktemp -d "${TMPDIR:-/tmp}/eventbus-bench-ref.XXXXXX")
	s=$BENCH_SCHEMA
	{
		echo '\set base :client_id * 100000'
		echo 'BEGIN;'
		for ((i = 0; i < 3; i++)); do
			cat <<SQL
\set a :base + random(1, 1000)
WITH o AS (INSERT INTO $s.ref_orders (run_key, transport, topic, aggregate_id, sku, qty, amount) VALUES ('ref', 'kafka', 'ref.1', 'ord-' || :a, 'sku-' || (:a % 97), 1 + :a % 3, 9.99 + :a % 50) RETURNING *), v AS (INSERT INTO $s.ref_versions AS v (topic, aggregate_id, version) VALUES ('ref.1', 'ord-' || :a, 1) ON CONFLICT (topic, aggregate_id) DO UPDATE SET version = v.version + 1 RETURNING version) INSERT INTO $s.ref_outbox (event_id, transport, topic, aggregate_id, event_type, event_version, occurred_at, payload) SELECT gen_random_uuid(), o.transport, o.topic, o.aggregate_id, 'OrderLineAdded', v.version, clock_timestamp(), to_jsonb(o) FROM o, v;
SQL
		done
		echo 'COMMIT;'
	} > "$dir/publish.sql"
	echo "DELETE FROM $s.ref_outbox WHERE id IN (SELECT id FROM $s.ref_outbox ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING *;" > "$dir/relay.sql"
	{
		echo '\set base :client_id * 100000'
		echo 'BEGIN;'
		for ((i = 0; i < 64; i++)); do
			cat <<SQL
\set a :base + random(1, 1000)
WITH i AS (INSERT INTO $s.ref_inbox (subscription_id, event_id, outcome) VALUES (1, gen_random_uuid(), 'handled') RETURNING event_id), p AS (INSERT INTO $s.ref_projection AS p VALUES ('ref.1', 'ord-' || :a, 1, 1, 9.99, clock_timestamp()) ON CONFLICT (topic, aggregate_id) DO UPDATE SET version = p.version + 1, lines = p.lines + 1, total = p.total + EXCLUDED.total, updated_at = EXCLUDED.updated_at RETURNING version) INSERT INTO $s.ref_handled (event_id, transport, topic, aggregate_id, version, order_id, occurred_at) SELECT i.event_id, 'kafka', 'ref.1', 'ord-' || :a, p.version, :a, clock_timestamp() FROM i, p;
SQL
		done
		echo 'COMMIT;'
	} > "$dir/consume.sql"
	out=$("${PGBENCH:-pgbench}" -n -M prepared -c "$clients" -j 2 -T "$secs" \
	      -f "$dir/publish.sql@64" -f "$dir/relay.sql@2" -f "$dir/consume.sql@3" 2>&1)
	rm -rf "$dir"
	read -r pub_tps rel_tps con_tps < <(echo "$out" | awk '
		/^SQL script [0-9]+:/ { split($3, a, ":"); n = a[1] + 0 }
		/ transactions \(.*tps = / { t = $0; sub(/.*tps = /, "", t); sub(/\).*/, "", t); tps[n] = t }
		END { print tps[1] + 0, tps[2] + 0, tps[3] + 0 }')
	ev=$(awk -v p="$pub_tps" -v c="$con_tps" 'BEGIN { a = 3 * p; b = 64 * c; printf "%d", (a < b ? a : b) }')
	if [ "${ev:-0}" -le 0 ]; then
		bench_log "pgbench reference failed:"; echo "$out" >&2
	fi
	printf '{"tool": "pgbench", "seconds": %s, "clients": %s, "publish_tps": %s, "relay_tps": %s, "consume_tps": %s, "published_events_per_s": %s, "consumed_events_per_s": %s, "events_per_s": %s}\n' \
		"$secs" "$clients" "$pub_tps" "$rel_tps" "$con_tps" \
		"$(awk -v p="$pub_tps" 'BEGIN { printf "%d", 3 * p }')" "$(awk -v c="$con_tps" 'BEGIN { printf "%d", 64 * c }')" "${ev:-0}"
}

# bench_idle SECONDS — CPU per component while nothing is published (the
# subscriptions of the last run stay active): the cost of idle polling.
bench_idle() {
	bench_proc_snapshot; bench_snap_save BEFORE
	sleep "$1"
	bench_proc_snapshot
	bench_cpu_json
}
