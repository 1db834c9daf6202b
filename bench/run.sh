#!/usr/bin/env bash
# bench/run.sh — `make bench` (not part of `make test`; its smallest level is,
# as test/integration/30_bench_smoke.sh).
#
# On a fresh stack of its own (default state /tmp/eventbus-bench; destroyed
# and recreated at the start, stopped at the end), with
# track_commit_timestamp = on:
#
#  1. Pressure levels (BENCH_LEVELS, default 500 2000 5000 10000 events) for
#     each transport (BENCH_TRANSPORTS): events/10 aggregates with versions
#     1..10, over 5 topics, published by an AFTER INSERT trigger on a
#     business table from BENCH_CONNECTIONS (4) connections, 1–5 rows per
#     transaction, as fast as they go; handled by a plpgsql handler
#     (eventbus_subscribe) that writes a projection row and a handled record
#     and checks the order.  Subscriptions are made and warmed up (one event
#     per topic handled) before the measured window.  Each level runs
#     BENCH_REPEATS (3) times, interleaved; the table shows the repeat with
#     the median events/s, the range, and loss / duplicates / order summed
#     over all repeats.
#  2. A steady-rate run: BENCH_RATE events/s (1000) for BENCH_DURATION s (30),
#     both transports mixed, 2 connections, 5 rows per transaction.
#  3. Idle CPU for 5 s with the steady run's subscriptions active.
#  4. The reference limit: pgbench doing the same writes without eventbus
#     (BENCH_REF_SECONDS, 15 s; BENCH_REF_CLIENTS, 8 clients).
#  5. Shutdown and recovery (test/integration/33_shutdown.sh on this stack,
#     BENCH_LIFECYCLE_REPEATS times, default 3): how long pg_ctl stop -m fast
#     takes right after a subscription change, with the Kafka broker
#     unreachable, with nats-server stopped and with a handler in
#     pg_sleep(60); and how long after an immediate stop (from the start) and
#     a kill -9 of a pool worker (from the kill) each transport handles new
#     events again.  BENCH_LIFECYCLE_REPEATS=0 skips it.
#  6. Stop: PostgreSQL first, then count what is left of the eventbus
#     processes (and their threads); then the brokers, and count again.
#
# Figures (all from the database: bench/bench.sql level_stats):
#  delivered %  business rows whose event reached the handler
#  dup          handler calls minus distinct events
#  order        first deliveries whose version was not last seen + 1
#  events/s     delivered / (first publish → last handler commit), where first
#               publish = min(orders.created_at) and last handler commit =
#               max(pg_xact_commit_timestamp(xmin)) of the handled rows
#  latency      per event: handler commit timestamp − envelope occurred_at
#               (clock_timestamp() in eventbus_publish)
#  RSS          VmHWM of launcher / dispatcher / largest worker during the run
#               (counter reset before each run; the table: largest over repeats)
#
# BENCH_KAFKA_PROPERTIES appends librdkafka properties for an experiment;
# BENCH_STATE, BENCH_OUT move the stack and the JSON.
# Output: tables on stdout, bench/results/latest.json (BENCH_OUT).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STACK=$REPO/scripts/stack.sh
export EVENTBUS_STATE=${BENCH_STATE:-${TMPDIR:-/tmp}/eventbus-bench}
LEVELS=${BENCH_LEVELS:-500 2000 5000 10000}
TRANSPORTS=${BENCH_TRANSPORTS:-kafka nats}
CONNS=${BENCH_CONNECTIONS:-4}
REPEATS=${BENCH_REPEATS:-3}
RATE=${BENCH_RATE:-1000}
DURATION=${BENCH_DURATION:-30}
REF_SECONDS=${BENCH_REF_SECONDS:-15}
REF_CLIENTS=${BENCH_REF_CLIENTS:-8}
LIFECYCLE_REPEATS=${BENCH_LIFECYCLE_REPEATS:-3}
OUT=${BENCH_OUT:-$REPO/bench/results/latest.json}
export PGBENCH=${PGBENCH:-$("${PG_CONFIG:-pg_config}" --bindir)/pgbench}

say() { echo "== $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Machine and a fresh stack
# ---------------------------------------------------------------------------
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# How busy the machine is before we start (other jobs share it): 3 s of /proc/stat.
read -r b1 t1 < <(awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
sleep 3
read -r b2 t2 < <(awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
busy_before="$(( 100 * (b2 - b1) / (t2 - t1 > 0 ? t2 - t1 : 1) ))%"
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem_gib=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
os=$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}")
[ -r /etc/debian_version ] && os="$os ($(cat /etc/debian_version))"
say "machine: $(nproc) cores ($cpu_model), $mem_gib GiB, $os; load average before: $load_before; CPU busy before: $busy_before"

say "fresh stack in $EVENTBUS_STATE"
"$STACK" destroy >/dev/null 2>&1 || true
"$STACK" start >/dev/null || die "could not start the stack in $EVENTBUS_STATE"
trap '"$STACK" stop >/dev/null 2>&1' EXIT   # also when a step fails (stop is idempotent)
# shellcheck disable=SC1091
source "$EVENTBUS_STATE/env"
BENCH_RUN=r$(date +%s)
export BENCH_SCHEMA=bench BENCH_PREFIX=bench BENCH_RUN
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

bq -c "CREATE EXTENSION IF NOT EXISTS eventbus" >/dev/null || die "CREATE EXTENSION failed"
# Handler commit times come from commit timestamps (a postmaster setting:
# restart).  BENCH_KAFKA_PROPERTIES appends librdkafka properties (e.g.
# fetch.wait.max.ms=50) for experiments; the default runs the stack as it is.
bq -c "ALTER SYSTEM SET track_commit_timestamp = on" >/dev/null
if [ -n "${BENCH_KAFKA_PROPERTIES:-}" ]; then
	props="$(bq -c "SHOW eventbus.kafka_properties");$BENCH_KAFKA_PROPERTIES"
	bq -c "ALTER SYSTEM SET eventbus.kafka_properties = '${props//\'/\'\'}'" >/dev/null
fi
{ "$STACK" pg-stop >/dev/null && "$STACK" pg-start >/dev/null; } || die "PostgreSQL restart failed"
bench_wait 60 "SELECT count(*) = 4 FROM eventbus_status() WHERE transport IS NOT NULL AND state = 'connected'" ||
	{ bq -c "SELECT * FROM eventbus_status()" >&2; die "brokers not connected"; }
bench_wait 30 "SELECT count(*) = 1 FROM eventbus_status() WHERE component = 'dispatcher' AND transport IS NULL AND state = 'running'" ||
	die "dispatcher not running"
bench_setup || die "could not create the bench schema"
pg_version=$(bq -c "SELECT current_setting('server_version')")
versions="PostgreSQL $pg_version, librdkafka $(pkg-config --modversion rdkafka 2>/dev/null || echo '?'), cnats $(pkg-config --modversion libnats 2>/dev/null || echo '?'), $(nats-server --version 2>/dev/null || echo 'nats-server ?')"
engine="eventbus $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
if git -C "$REPO" diff --quiet HEAD -- src sql 2>/dev/null; then engine="$engine (src/, sql/ as committed)"; else engine="$engine + uncommitted src/ or sql/ changes"; fi
engine="$engine, installed eventbus.so md5 $(md5sum "$("${PG_CONFIG:-pg_config}" --pkglibdir)/eventbus.so" 2>/dev/null | cut -c1-12)"
say "$engine"
say "$versions; eventbus.workers = $(bq -c "SHOW eventbus.workers"), kafka properties '$(bq -c "SHOW eventbus.kafka_properties")'"

# store KIND JSON — keep a result in the database.
store() { bq -c "INSERT INTO $BENCH_SCHEMA.results (kind, doc) VALUES ('$1', '${2//\'/\'\'}'::jsonb)" >/dev/null; }

# brief JSON — one progress line.
brief() {
	bq -c "SELECT format('%s: %s/%s delivered, %s duplicates, %s order violations, %s events/s, p50 %s ms, p99 %s ms',
	                     d->>'run_key', d->>'delivered', d->>'published', d->>'duplicates', d->>'order_violations',
	                     d->>'events_per_s', d#>>'{latency_ms,p50}', d#>>'{latency_ms,p99}')
	         FROM (SELECT '${1//\'/\'\'}'::jsonb AS d) s" >&2
}

# ---------------------------------------------------------------------------
# 1. Pressure levels
# ---------------------------------------------------------------------------
# Each level REPEATS times, the levels interleaved (so slow drift on the
# machine spreads over all of them); the table shows the median repeat.
for tr in $TRANSPORTS; do
	for ((rep = 1; rep <= REPEATS; rep++)); do
		for level in $LEVELS; do
			say "[$((SECONDS))s] level $level, $tr, repeat $rep/$REPEATS: subscribe, warm up, publish $level events from $CONNS connections"
			bench_run "$tr.$level.$rep" "$level-$rep" "$level" "$CONNS" "$tr" load 1 5 || die "$tr $level failed"
			doc=$(bq -c "SELECT '${BENCH_DOC//\'/\'\'}'::jsonb || jsonb_build_object('label', '$level', 'level', $level, 'repeat', $rep)")
			store level "$doc"
			brief "$doc"
		done
	done
done

# ---------------------------------------------------------------------------
# 2. Steady rate, 3. idle
# ---------------------------------------------------------------------------
steady_events=$((RATE * DURATION / 10 * 10))
interval=$(awk -v r="$RATE" 'BEGIN { printf "%.6f", 5 * 2 / r }')
say "[$((SECONDS))s] steady: $RATE events/s for $DURATION s, kafka + nats mixed, 2 connections, 5 rows per transaction every $interval s each"
bench_run steady steady "$steady_events" 2 kafka,nats steady 5 "$interval" || die "steady run failed"
doc=$BENCH_DOC
store steady "$doc"
brief "$doc"
say "idle: 5 s with the steady run's $(bq -c "SELECT count(*) FROM eventbus.subscriptions") subscriptions active"
store idle "$(bench_idle 5)"

# ---------------------------------------------------------------------------
# 4. Reference
# ---------------------------------------------------------------------------
bq -c "SELECT count(*) FILTER (WHERE eventbus_unsubscribe(topic, handler, transport)) FROM eventbus.subscriptions" >/dev/null
say "[$((SECONDS))s] reference: pgbench, the same writes without eventbus, $REF_CLIENTS clients, $REF_SECONDS s"
ref=$(bench_reference "$REF_SECONDS" "$REF_CLIENTS")
store reference "$ref"
bq -c "SELECT format('reference: %s events/s (publish %s/s, consume %s/s)', d->>'events_per_s', d->>'published_events_per_s', d->>'consumed_events_per_s')
         FROM (SELECT '$ref'::jsonb AS d) s" >&2

# ---------------------------------------------------------------------------
# 5. Shutdown and recovery
# ---------------------------------------------------------------------------
# The test prints "# figure NAME MS" lines; each repeat is stored with its
# TAP verdict (a figure from a failed repeat is reported, and marked).
for ((rep = 1; rep <= LIFECYCLE_REPEATS; rep++)); do
	say "[$((SECONDS))s] shutdown and recovery, repeat $rep/$LIFECYCLE_REPEATS (test/integration/33_shutdown.sh)"
	lc_log=$(mktemp)
	if EVENTBUS_ENV="$EVENTBUS_STATE/env" prove -v "$REPO/test/integration/33_shutdown.sh" >"$lc_log" 2>&1; then lc_pass=true; else lc_pass=false; fi
	lc_fig=$(awk '/^# figure [a-zA-Z0-9_]+ -?[0-9]+$/ { printf "%s\"%s\": %s", sep, $3, $4; sep = ", " }' "$lc_log")
	store lifecycle "{$lc_fig${lc_fig:+, }\"repeat\": $rep, \"test_passed\": $lc_pass}"
	$lc_pass || { echo "bench: 33_shutdown.sh failed in repeat $rep:" >&2; grep -E '^not ok|^#' "$lc_log" >&2; }
	rm -f "$lc_log"
done
# The test ends with a crash restart: let every eventbus process come back,
# so that the stop below counts a complete set.
if [ "$LIFECYCLE_REPEATS" -gt 0 ]; then
	bench_wait 60 "SELECT count(*) = current_setting('eventbus.workers')::int + 1 FROM eventbus_status()
	               WHERE (component = 'dispatcher' OR component LIKE 'worker %') AND transport IS NULL AND state = 'running'" ||
		say "not every eventbus process is back after the shutdown test"
fi

# ---------------------------------------------------------------------------
# Report (before the stop: the database formats it)
# ---------------------------------------------------------------------------
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
machine=$(printf '{"cores": %s, "cpu": "%s", "memory_gib": %s, "os": "%s", "kernel": "%s", "versions": "%s", "engine": "%s", "cpu_busy_before": "%s", "load_average_before": "%s", "load_average_after": "%s"}' \
	"$(nproc)" "$cpu_model" "$mem_gib" "$os" "$(uname -r)" "$versions" "$engine" "$busy_before" "$load_before" "$load_after")
config=$(printf '{"levels": "%s", "repeats": %s, "transports": "%s", "connections": %s, "rows_per_transaction": "1-5", "aggregates": "events / 10, versions 1..10", "topics_per_transport": 5, "steady_rate": %s, "steady_duration_s": %s, "pool_workers": %s, "kafka_properties": "%s", "reference_seconds": %s, "reference_clients": %s, "kafka_broker": "dev broker (librdkafka mock cluster, in memory)", "nats_server": "file store"}' \
	"$LEVELS" "$REPEATS" "$TRANSPORTS" "$CONNS" "$RATE" "$DURATION" "$(bq -c "SHOW eventbus.workers")" "$(bq -c "SHOW eventbus.kafka_properties")" "$REF_SECONDS" "$REF_CLIENTS")

report_sql="
WITH ref AS (SELECT (doc->>'events_per_s')::numeric AS eps FROM $BENCH_SCHEMA.results WHERE kind = 'reference'),
     r AS (SELECT n, kind, doc || jsonb_build_object('ratio_to_reference',
                   round((doc->>'events_per_s')::numeric / nullif((SELECT eps FROM ref), 0), 2)) AS doc
             FROM $BENCH_SCHEMA.level_summary())
SELECT jsonb_pretty(jsonb_build_object(
  'started_at', '$started',
  'machine', '$machine'::jsonb,
  'config', '$config'::jsonb,
  'method', jsonb_build_object(
     'window', 'first publish = min(created_at) of the business rows (taken just before the trigger calls eventbus_publish); last handler commit = max commit timestamp of the handled rows; events/s = delivered / window',
     'latency', 'per event: commit timestamp of the handler transaction (track_commit_timestamp) minus envelope occurred_at (clock_timestamp() in eventbus_publish)',
     'duplicates', 'handler calls minus distinct events',
     'order_violations', 'first deliveries whose version is not the last seen version + 1, checked in the handler transaction (a repeated delivery counts as a duplicate only)',
     'levels', 'each level runs BENCH_REPEATS times (interleaved); levels[] holds, per transport and level, the repeat with the median events/s plus every repeat''s events/s and the loss / duplicate / order counts summed over all repeats (all_repeats); runs[] holds every repeat',
     'rss', 'VmHWM (MiB) since the start of the run, includes touched shared memory',
     'cpu_s', 'CPU seconds per process group over the shell window around the run (slightly wider than the measured window); machine_busy includes everything on the machine'),
  'levels', (SELECT jsonb_agg(doc ORDER BY n) FROM r WHERE kind = 'level'),
  'runs', (SELECT jsonb_agg(doc ORDER BY n) FROM $BENCH_SCHEMA.results WHERE kind = 'level'),
  'steady', (SELECT doc FROM r WHERE kind = 'steady'),
  'idle_cpu_s', (SELECT doc FROM $BENCH_SCHEMA.results WHERE kind = 'idle'),
  'reference', (SELECT doc FROM $BENCH_SCHEMA.results WHERE kind = 'reference'),
  'lifecycle_ms', (SELECT jsonb_build_object(
       'method', 'test/integration/33_shutdown.sh on this stack, librdkafka default group timings: shutdown_* = wall time of pg_ctl stop -m fast (scripts/stack.sh pg-stop) in that state; recovery_immediate_* = from pg-start returning after pg_ctl stop -m immediate to the last of 10 new events of that transport handled (handler clock_timestamp()); recovery_kill9_* = the same from a kill -9 of pool worker 0 (the postmaster restarts everything)',
       'median', (SELECT jsonb_object_agg(k, v) FROM (
           SELECT e.key AS k, percentile_disc(0.5) WITHIN GROUP (ORDER BY e.value::numeric) AS v
             FROM $BENCH_SCHEMA.results r, jsonb_each_text(r.doc) e
            WHERE r.kind = 'lifecycle' AND e.key LIKE '%\_ms' GROUP BY e.key) m),
       'max', (SELECT jsonb_object_agg(k, v) FROM (
           SELECT e.key AS k, max(e.value::numeric) AS v
             FROM $BENCH_SCHEMA.results r, jsonb_each_text(r.doc) e
            WHERE r.kind = 'lifecycle' AND e.key LIKE '%\_ms' GROUP BY e.key) m),
       'repeats', (SELECT jsonb_agg(doc ORDER BY n) FROM $BENCH_SCHEMA.results WHERE kind = 'lifecycle'))
     WHERE EXISTS (SELECT 1 FROM $BENCH_SCHEMA.results WHERE kind = 'lifecycle'))))"
json=$(bq -c "$report_sql") || die "could not build the JSON report"

table_sql="
WITH ref AS (SELECT (doc->>'events_per_s')::numeric AS eps FROM $BENCH_SCHEMA.results WHERE kind = 'reference'),
     r AS (SELECT n, doc AS d, coalesce(doc->'all_repeats', doc) AS a,
                  coalesce(doc->'rss_peak_mib_max_over_repeats', doc->'rss_peak_mib') AS m
             FROM $BENCH_SCHEMA.level_summary())
SELECT line FROM (
  SELECT 0 AS n, format('%-6s %-10s %10s %9s %4s %5s %9s %11s %6s %9s %7s %7s %7s %7s  %s',
         'level', 'transport', 'events', 'delivered', 'dup', 'order', 'events/s', '(min-max)', 'of ref',
         'publish/s', 'p50 ms', 'p95 ms', 'p99 ms', 'max ms', 'peak RSS MiB L/D/W') AS line
  UNION ALL
  SELECT n, format('%-6s %-10s %10s %8s%% %4s %5s %9s %11s %5s%% %9s %7s %7s %7s %7s  %s',
         d->>'label', replace(d->>'transports', ',', '+'),
         CASE WHEN d ? 'repeats' THEN (d->>'repeats') || 'x' || (d->>'published') ELSE d->>'published' END,
         a->>'delivered_pct', a->>'duplicates', a->>'order_violations', d->>'events_per_s',
         CASE WHEN d ? 'repeats' THEN '(' || (d->>'events_per_s_min') || '-' || (d->>'events_per_s_max') || ')' ELSE '' END,
         CASE WHEN d->>'mode' = 'steady' THEN '-' ELSE round(100 * (d->>'events_per_s')::numeric / nullif((SELECT eps FROM ref), 0))::text END,
         d->>'publish_events_per_s', d#>>'{latency_ms,p50}', d#>>'{latency_ms,p95}', d#>>'{latency_ms,p99}',
         d#>>'{latency_ms,max}',
         concat_ws('/', round((m->>'launcher')::numeric), round((m->>'dispatcher')::numeric), round((m->>'worker_max')::numeric)))
    FROM r) x ORDER BY n"

cpu_sql="
SELECT line FROM (
  SELECT 0 AS n, format('%-6s %-10s %6s | %8s %10s %7s %8s %8s %7s %6s | %9s | %7s %6s %7s',
         'level', 'transport', 'wall s', 'launcher', 'dispatcher', 'workers', 'other pg', 'brokers', 'others', 'busy',
         'eb us/evt', 'outbox', 'pool q', 'lag') AS line
  UNION ALL
  SELECT n, format('%-6s %-10s %6s | %8s %10s %7s %8s %8s %7s %6s | %9s | %7s %6s %7s',
         d->>'label', replace(d->>'transports', ',', '+'), d#>>'{cpu_s,window_s}', d#>>'{cpu_s,launcher}',
         d#>>'{cpu_s,dispatcher}', d#>>'{cpu_s,workers}', d#>>'{cpu_s,other_postgres}',
         round((d#>>'{cpu_s,nats_server}')::numeric + (d#>>'{cpu_s,devbroker}')::numeric, 2),
         d#>>'{cpu_s,unattributed}',
         round(100 * (d#>>'{cpu_s,machine_busy}')::numeric / nullif((d#>>'{cpu_s,machine_capacity}')::numeric, 0)) || '%',
         round(1e6 * ((d#>>'{cpu_s,launcher}')::numeric + (d#>>'{cpu_s,dispatcher}')::numeric + (d#>>'{cpu_s,workers}')::numeric)
               / nullif((d->>'delivered')::numeric, 0)),
         d->>'max_outbox_backlog', d->>'max_pool_queued', d->>'max_subscription_lag')
    FROM $BENCH_SCHEMA.level_summary() r (n, kind, d)
  UNION ALL
  SELECT 1000, format('%-6s %-10s %6s | %8s %10s %7s %8s %8s %7s %6s |',
         'idle', '', d->>'window_s', d->>'launcher', d->>'dispatcher', d->>'workers', d->>'other_postgres',
         round((d->>'nats_server')::numeric + (d->>'devbroker')::numeric, 2), d->>'unattributed',
         round(100 * (d->>'machine_busy')::numeric / nullif((d->>'machine_capacity')::numeric, 0)) || '%')
    FROM (SELECT doc AS d FROM $BENCH_SCHEMA.results WHERE kind = 'idle') i) x ORDER BY n"
split_sql="
SELECT line FROM (
  SELECT 0 AS n, format('%-6s %-10s | %9s %9s %9s | %9s %9s %9s | %s',
         'level', 'transport', 'pub tx', 'relay..', 'batch', 'pub tx', 'relay..', 'batch', 'p50 / p95 / p99 ms per transport') AS line
  UNION ALL
  SELECT n, format('%-6s %-10s | %9s %9s %9s | %9s %9s %9s | %s',
         d->>'label', replace(d->>'transports', ',', '+'),
         d#>>'{latency_split_ms,publish_tx_p50}', d#>>'{latency_split_ms,relay_broker_dispatch_handler_p50}',
         d#>>'{latency_split_ms,pool_batch_commit_p50}',
         d#>>'{latency_split_ms,publish_tx_p95}', d#>>'{latency_split_ms,relay_broker_dispatch_handler_p95}',
         d#>>'{latency_split_ms,pool_batch_commit_p95}',
         (SELECT string_agg(format('%s %s / %s / %s', k, v->>'p50', v->>'p95', v->>'p99'), ', ' ORDER BY k)
            FROM jsonb_each(d->'latency_by_transport_ms') e (k, v)))
    FROM $BENCH_SCHEMA.level_summary() r (n, kind, d)) x ORDER BY n"
lifecycle_sql="
WITH r AS (SELECT doc FROM $BENCH_SCHEMA.results WHERE kind = 'lifecycle'),
     f AS (SELECT e.key AS k, percentile_disc(0.5) WITHIN GROUP (ORDER BY e.value::numeric) AS med, max(e.value::numeric) AS mx, count(*) AS n
             FROM r, jsonb_each_text(r.doc) e WHERE e.key LIKE '%\_ms' GROUP BY e.key)
SELECT format('%-46s %9s %9s', 'state (ms, median / max of ' || (SELECT count(*) FROM r) || ')', 'median', 'max')
UNION ALL
SELECT * FROM (SELECT format('%-46s %9s %9s', k, med, mx) FROM f ORDER BY k) x
UNION ALL
SELECT 'failed repeats: ' || count(*) FROM r WHERE NOT (doc->>'test_passed')::boolean HAVING count(*) > 0"
table=$(bq -c "$table_sql")
lifecycletable=$(bq -c "$lifecycle_sql")
splittable=$(bq -c "$split_sql")
cputable=$(bq -c "$cpu_sql")
refline=$(bq -c "SELECT format('reference (pgbench, same writes without eventbus, %s clients, %s s): %s events/s (publish side %s/s, consume side %s/s)',
                                 doc->>'clients', doc->>'seconds', doc->>'events_per_s', doc->>'published_events_per_s', doc->>'consumed_events_per_s')
                  FROM $BENCH_SCHEMA.results WHERE kind = 'reference'")

# ---------------------------------------------------------------------------
# 6. Stop, and count what is left
# ---------------------------------------------------------------------------
# Every eventbus process seen, with its start time (so a recycled pid is not
# counted), and the threads the launcher / dispatcher had before the stop.
eb_now=$(bench_eventbus_pids | awk '{print $1}' | tr '\n' ' ')
declare -A start_of=()
for pid in $BENCH_EB_PIDS $eb_now; do
	stat_fields "$pid" && start_of[$pid]=${STAT[19]}
done
threads_before=0
for pid in $eb_now; do
	t=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
	threads_before=$((threads_before + ${t:-0}))
done

# stack_left — pids of postgres / nats-server / devbroker processes of this
# state directory (command line names it, or cwd is the data directory).
stack_left() {
	local d pid comm cmd cwd
	for d in /proc/[0-9]*; do
		pid=${d#/proc/}
		read -r comm 2>/dev/null < "$d/comm" || continue
		case $comm in postgres|nats-server|devbroker) ;; *) continue ;; esac
		cmd=$(tr '\0' ' ' 2>/dev/null < "$d/cmdline") || continue
		cwd=$(readlink "$d/cwd" 2>/dev/null) || cwd=
		if [[ $cmd == *"$EVENTBUS_STATE/"* || $cwd == "$EVENTBUS_PGDATA" ]]; then echo "$pid"; fi
	done
	return 0
}

say "stop: PostgreSQL (fast), then count eventbus processes and threads left"
"$STACK" pg-stop fast >/dev/null
eb_left=0 eb_threads_left=0
for pid in "${!start_of[@]}"; do
	if stat_fields "$pid" && [ "${STAT[19]}" = "${start_of[$pid]}" ] && [ "${STAT[0]}" != Z ]; then
		eb_left=$((eb_left + 1))
		t=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
		eb_threads_left=$((eb_threads_left + ${t:-0}))
	fi
done
pg_left=0
for p in $(stack_left); do
	if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = postgres ]; then pg_left=$((pg_left + 1)); fi
done
say "stop: brokers, then count every process of the stack"
"$STACK" stop >/dev/null
all_left=$(stack_left | wc -l)
after_stop=$(printf '{"eventbus_processes_seen": %s, "eventbus_threads_before_stop": %s, "eventbus_processes_left": %s, "eventbus_threads_left": %s, "postgres_processes_left": %s, "stack_processes_left_after_full_stop": %s}' \
	"${#start_of[@]}" "$threads_before" "$eb_left" "$eb_threads_left" "$pg_left" "$all_left")

mkdir -p "$(dirname "$OUT")"
json=${json%\}}                 # jsonb_pretty: the object's closing brace is alone on the last line
json=${json%$'\n'}
printf '%s,\n    "after_stop": %s\n}\n' "$json" "$after_stop" > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"

# ---------------------------------------------------------------------------
# Print
# ---------------------------------------------------------------------------
cat <<EOF

eventbus bench — $started, $(nproc) cores ($cpu_model), $mem_gib GiB, $os
$versions; $engine
CPU busy before the run $busy_before (3 s), load average before $load_before, after $load_after; Kafka = dev broker (librdkafka mock cluster), NATS = nats-server file store
levels: events/10 aggregates x versions 1..10, 5 topics, $CONNS connections, 1-5 rows per transaction, AFTER INSERT trigger -> eventbus_publish;
        plpgsql handler writes projection + handled record and checks order; window = first publish -> last handler commit (commit timestamps)

$table

$refline

Latency split (ms; p50 then p95): pub tx = occurred_at -> publishing transaction's commit; relay.. = that commit ->
end of the handler call (relay, broker, consumer, dispatcher, pool queue, handler); batch = end of the handler call ->
commit of the pool worker's batch transaction:
$splittable

Shutdown (pg_ctl stop -m fast in each state) and recovery after a crash (new events handled again), ms:
$lifecycletable

CPU seconds per process group during each run (from /proc; brokers = nats-server + devbroker; others = the rest of
the machine: the harness (psql clients, the shell reading /proc) and any other job; busy = whole machine; eb us/evt = launcher+dispatcher+workers CPU per delivered event; outbox / pool q / lag = largest sampled backlog):
$cputable

after stop: $eb_left of ${#start_of[@]} eventbus processes left ($eb_threads_left threads; $threads_before before the stop), $pg_left postgres processes; after the full stack stop: $all_left processes
results: $OUT
EOF
