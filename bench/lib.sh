# shellcheck shell=bash
# bench/lib.sh — the benchmark harness (sourced): one measured run of the
# bench.sql workload, its figures as JSON, and the pgbench references.  Used
# by bench/run.sh (`make bench`) and by test/integration/30_bench_smoke.sh
# (its smallest sizes, in `make test`), so the smoke test exercises exactly
# the code that produces the published figures.
#
# Needs the stack's environment (PGHOST, PGPORT, ..., EVENTBUS_PGDATA,
# EVENTBUS_STATE, EVENTBUS_KAFKA_BROKERS, EVENTBUS_NATS_URL) and:
#   BENCH_SCHEMA   schema holding the workload (bench_setup creates it)
#   BENCH_PREFIX   first part of every topic name (e.g. bench, t30)
#   BENCH_RUN      run id, last part of every topic name
# Switches read by bench_run (empty = off):
#   BENCH_KAFKA_PARTITIONS  create the run's Kafka topics with this many
#                           partitions first (else the dev broker auto-creates 4)
#   BENCH_BROKER_TIMES      1 = read every event's broker time back after the
#                           run (kcat / natstool), for the latency stages
#   BENCH_MEM_EVERY         seconds between memory samples (2)
#
# Nothing in here sleeps inside a measured window: a run's window is
# read from database timestamps after the run (min(orders.created_at) or
# the first handler start → max(handler commit timestamp)); the shell only
# polls to learn that it is over.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_PREV_TOPICS=()    # topics subscribed by the previous run (dropped at the next subscribe)
BENCH_EB_PIDS=""        # every eventbus pid seen (for the leftover count after stop)

# bq SQL... — psql in the stack's database, unaligned, tuples only.  The
# server's own psql binary: Debian's /usr/bin/psql is a Perl wrapper whose
# start costs ~40 ms of CPU, paid inside a measured window by each
# publishing connection and the sampler.
BENCH_PSQL=$("${PG_CONFIG:-pg_config}" --bindir 2>/dev/null)/psql
[ -x "$BENCH_PSQL" ] || BENCH_PSQL=psql
bq() { "$BENCH_PSQL" -X -A -t -q -v ON_ERROR_STOP=1 "$@"; }

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
# /proc: CPU time and memory of the stack's processes
# ---------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# bench_eventbus_pids — "pid role" lines from pg_stat_activity.
bench_eventbus_pids() {
	bq -F ' ' -c "SELECT pid, replace(backend_type, 'eventbus ', '') FROM pg_stat_activity
	               WHERE backend_type IN ('eventbus launcher', 'eventbus dispatcher', 'eventbus worker') ORDER BY 2, 1"
}

# bench_eventbus_procs — "name pid" lines: launcher, dispatcher, worker_0..N
# (names from eventbus_status(), so a pool worker keeps its number).
bench_eventbus_procs() {
	bq -F ' ' -c "SELECT DISTINCT replace(component, ' ', '_'), pid FROM eventbus_status()
	               WHERE transport IS NULL AND pid IS NOT NULL
	                 AND (component IN ('launcher', 'dispatcher') OR component LIKE 'worker %') ORDER BY 1"
}

# bench_relay_rounds — relay rounds that sent events, both transports, since
# server start (eventbus.metrics).
bench_relay_rounds() {
	bq -c "SELECT coalesce(sum(value), 0)::bigint FROM eventbus.metrics WHERE name = 'relay_rounds_total'"
}

bench_postmaster_pid() { head -1 "$EVENTBUS_PGDATA/postmaster.pid" 2>/dev/null; }

# stat_fields PID — the fields of /proc/PID/stat after "(comm)" into the
# array STAT (STAT[0] = state, STAT[1] = ppid, STAT[11] = utime, STAT[12] =
# stime, STAT[13] = cutime, STAT[14] = cstime); status 1 if gone.  utime and
# stime of a process include all its threads, live and exited.
stat_fields() {
	local s
	[ -n "$1" ] && read -r s 2>/dev/null < "/proc/$1/stat" || return 1
	read -ra STAT <<< "${s##*) }"
}

# cpu_ns PID — into CPU_NS, the CPU time of PID's live threads in ns (0 if
# gone): the first field of /proc/PID/task/*/schedstat, the scheduler's own
# nanosecond account.  utime and stime in /proc/PID/stat come in clock
# ticks (10 ms), a sixth of a 500-event burst's window.  A thread that exits
# takes its time with it; the processes measured this way (postgres
# processes, librdkafka's and cnats's threads, nats-server, the dev broker)
# keep theirs for the whole run.  A variable, not output: no subshell per
# process.
cpu_ns() {
	local f n
	CPU_NS=0
	[ -n "$1" ] || return 0
	for f in /proc/"$1"/task/*/schedstat; do
		read -r n _ 2>/dev/null < "$f" && CPU_NS=$((CPU_NS + n))
	done
	return 0
}

# machine_ticks — "busy total steal" jiffies of all CPUs from /proc/stat:
# total = user + nice + system + idle + iowait + irq + softirq + steal (guest
# time is inside user and nice already); busy = what this machine ran, total
# minus idle, iowait and steal; steal = time the hypervisor gave this
# machine's virtual CPUs to someone else (CPU time the runs did not get).
machine_ticks() {
	awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6 - $9, t, $9 }' /proc/stat
}

# bench_proc_snapshot — sets SNAP_* (CPU ns per component, wall ns).
# Components: launcher (the relay), dispatcher, workers (the pool, sum),
# other postgres processes (backends: the publishing connections, the
# sampler, autovacuum; checkpointer, walwriter... — live ones plus the
# reaped ones through the postmaster's cutime + cstime, which come in clock
# ticks), nats-server, devbroker, the whole machine (/proc/stat: ticks).
bench_proc_snapshot() {
	local pid role pm p eb=" " tick_ns=$((1000000000 / CLK_TCK))
	SNAP_WALL=$(date +%s%N)
	SNAP_LAUNCHER=0 SNAP_DISPATCHER=0 SNAP_WORKERS=0 SNAP_PG=0
	while read -r pid role; do
		[ -n "$pid" ] || continue
		eb="$eb$pid "
		cpu_ns "$pid"
		case $role in
			launcher) SNAP_LAUNCHER=$((SNAP_LAUNCHER + CPU_NS)) ;;
			dispatcher) SNAP_DISPATCHER=$((SNAP_DISPATCHER + CPU_NS)) ;;
			worker) SNAP_WORKERS=$((SNAP_WORKERS + CPU_NS)) ;;
		esac
	done < <(bench_eventbus_pids)
	pm=$(bench_postmaster_pid)
	if [ -n "$pm" ] && stat_fields "$pm"; then
		cpu_ns "$pm"
		SNAP_PG=$((CPU_NS + (STAT[13] + STAT[14]) * tick_ns))
		for p in /proc/[0-9]*; do
			p=${p#/proc/}
			[[ $eb == *" $p "* ]] && continue
			stat_fields "$p" || continue
			[ "${STAT[1]}" = "$pm" ] || continue
			cpu_ns "$p"
			SNAP_PG=$((SNAP_PG + CPU_NS))
		done
	fi
	read -r p 2>/dev/null < "$EVENTBUS_STATE/nats/nats.pid" || true   # no newline in that file
	cpu_ns "${p//[^0-9]/}"
	SNAP_NATS=$CPU_NS
	p=
	read -r p 2>/dev/null < "$EVENTBUS_STATE/kafka/devbroker.pid" || true
	cpu_ns "${p//[^0-9]/}"
	SNAP_KAFKA=$CPU_NS
	read -r SNAP_BUSY SNAP_TOTAL SNAP_STEAL < <(machine_ticks)
}

# bench_snap_save PREFIX — copy SNAP_* to PREFIX_*.
bench_snap_save() {
	local v
	for v in WALL LAUNCHER DISPATCHER WORKERS PG NATS KAFKA BUSY TOTAL STEAL; do
		printf -v "${1}_$v" '%s' "$(eval echo "\$SNAP_$v")"
	done
}

# bench_cpu_json [PUBLISHER_NS] — CPU seconds per component between
# BEFORE_* and SNAP_* (the shell's window around a run, a little wider than
# the measured one).  publishers = the publishing connections' backends
# (measured by themselves, bench.sql self_cpu_ns; absent when not given),
# other_postgres = the rest of the postgres processes; unattributed = the
# machine's busy time minus the stack's processes: the harness's psql
# clients, and whatever else runs on the machine; steal = CPU time the
# hypervisor took (steal_pct: of the machine's capacity in the window).
# The processes' figures are in ns (4 decimals kept: 0.1 ms), the
# machine's in clock ticks (2 decimals).
bench_cpu_json() {
	local wall pub=${1:-}
	wall=$(( (SNAP_WALL - BEFORE_WALL) / 1000000 ))
	awk -v hz="$CLK_TCK" -v wall="$wall" -v pub="$pub" \
	    -v l=$((SNAP_LAUNCHER - BEFORE_LAUNCHER)) -v d=$((SNAP_DISPATCHER - BEFORE_DISPATCHER)) \
	    -v w=$((SNAP_WORKERS - BEFORE_WORKERS)) -v pg=$((SNAP_PG - BEFORE_PG)) \
	    -v n=$((SNAP_NATS - BEFORE_NATS)) -v k=$((SNAP_KAFKA - BEFORE_KAFKA)) \
	    -v busy=$((SNAP_BUSY - BEFORE_BUSY)) -v tot=$((SNAP_TOTAL - BEFORE_TOTAL)) \
	    -v st=$((SNAP_STEAL - BEFORE_STEAL)) 'BEGIN {
		ns = 1e9
		printf "{\"window_s\": %.2f, \"launcher\": %.4f, \"dispatcher\": %.4f, \"workers\": %.4f, ", wall / 1000, l / ns, d / ns, w / ns
		if (pub != "")
			printf "\"publishers\": %.4f, \"other_postgres\": %.4f, ", pub / ns, (pg - pub) / ns
		else
			printf "\"other_postgres\": %.4f, ", pg / ns
		printf "\"nats_server\": %.4f, \"devbroker\": %.4f, \"machine_busy\": %.2f, \"machine_capacity\": %.2f, \"unattributed\": %.2f, ",
		       n / ns, k / ns, busy / hz, tot / hz, busy / hz - (l + d + w + pg + n + k) / ns
		printf "\"steal\": %.2f, \"steal_pct\": %.1f}", st / hz, (tot > 0 ? 100 * st / tot : 0) }'
}

# bench_mem_sample FILE NAME PID [NAME PID]... — append one line per live
# process: "NAME PID RSS PSS USS SHM" (kB) from /proc/PID/smaps (the per-
# mapping form of smaps_rollup: the same sums, one read), where USS =
# Private_Clean + Private_Dirty (memory no other process maps), PSS shares
# each shared page among the processes mapping it, and SHM is the part of
# USS in PostgreSQL's main shared memory segment (shared buffers and the
# like: pages of it no other live process maps right now — e.g. outbox
# pages last touched by publishing sessions that have since disconnected).
# One awk for all processes: a bash read loop cost 10 ms of CPU per process
# and sample, taken from the run it measures.
bench_mem_sample() {
	local out=$1 files=() names=()
	shift
	while [ $# -ge 2 ]; do
		[ -r "/proc/$2/smaps" ] && { files+=("/proc/$2/smaps"); names+=("$1:$2"); }
		shift 2
	done
	[ ${#files[@]} -gt 0 ] || return 0
	awk -v names="${names[*]}" '
		BEGIN { n = split(names, nm, " "); for (i = 1; i <= n; i++) { split(nm[i], a, ":"); who["/proc/" a[2] "/smaps"] = a[1] " " a[2] } }
		/^[0-9a-f]+-[0-9a-f]+ / { shm = ($2 ~ /s$/ && ($6 == "/dev/zero" || $6 == "/anon_hugepage" || $6 ~ /^SYSV/)) }
		$1 == "Rss:" { rss[FILENAME] += $2 } $1 == "Pss:" { pss[FILENAME] += $2 }
		$1 == "Private_Clean:" || $1 == "Private_Dirty:" { uss[FILENAME] += $2; if (shm) sh[FILENAME] += $2 }
		END { for (f in uss) printf "%s %d %d %d %d\n", who[f], rss[f], pss[f], uss[f], sh[f] }
	' "${files[@]}" 2>/dev/null >> "$out"
}

# bench_mem_start — sample the eventbus processes every BENCH_MEM_EVERY s
# (2) in the background until bench_mem_stop.  One sample of all of them
# costs ~50 ms of CPU (the kernel walks their page tables, awk reads ~50,000
# lines): every 0.5 s that was 5 % of this machine, taken from the run it
# measures.  Every run has a sample just before its window and one after.
bench_mem_start() {
	local procs every=${BENCH_MEM_EVERY:-2}
	BENCH_MEM_FILE=$(mktemp "${TMPDIR:-/tmp}/eventbus-bench-mem.XXXXXX")
	procs=$(bench_eventbus_procs | tr '\n' ' ')
	BENCH_MEM_PROCS=$procs
	# shellcheck disable=SC2086  # "name pid" pairs
	( while :; do bench_mem_sample "$BENCH_MEM_FILE" $procs; sleep "$every"; done ) &
	BENCH_MEM_PID=$!
}

# bench_mem_stop — stop the sampler, take a last sample, print JSON: per
# process the largest USS / PSS / RSS (MiB) seen and the sample count.
bench_mem_stop() {
	[ -n "${BENCH_MEM_PID:-}" ] && { kill "$BENCH_MEM_PID" 2>/dev/null; wait "$BENCH_MEM_PID" 2>/dev/null; }
	BENCH_MEM_PID=
	# shellcheck disable=SC2086
	bench_mem_sample "$BENCH_MEM_FILE" $BENCH_MEM_PROCS
	awk '{ n[$1]++; pid[$1] = $2
	       if ($3 > rss[$1]) rss[$1] = $3; if ($4 > pss[$1]) pss[$1] = $4; if ($5 > uss[$1]) uss[$1] = $5
	       if ($5 - $6 > own[$1]) own[$1] = $5 - $6; if ($6 > shm[$1]) shm[$1] = $6 }
	     END { printf "{"; sep = ""
	           for (p in n) { printf "%s\"%s\": {\"uss_mib\": %.1f, \"own_mib\": %.1f, \"shm_private_mib\": %.1f, \"pss_mib\": %.1f, \"rss_mib\": %.1f, \"pid\": %d, \"samples\": %d}",
	                                 sep, p, uss[p] / 1024, own[p] / 1024, shm[p] / 1024, pss[p] / 1024, rss[p] / 1024, pid[p], n[p]; sep = ", " }
	           printf "}" }' "$BENCH_MEM_FILE"
	rm -f "$BENCH_MEM_FILE"
}

# ---------------------------------------------------------------------------
# Broker times (for the latency stages)
# ---------------------------------------------------------------------------

# bench_broker_times KEY TRANSPORT TOPIC... — read every message of the
# topics back with an independent client and store (event id, broker time)
# in broker_times: Kafka = message timestamp (kcat %T, ms; the dev broker
# keeps the producer's CreateTime), NATS = stream time (natstool dump).
bench_broker_times() {
	local key=$1 tr=$2 t
	shift 2
	for t in "$@"; do
		if [ "$tr" = kafka ]; then
			kcat -C -b "$EVENTBUS_KAFKA_BROKERS" -t "$t" -o beginning -e -q -f '%T %h\n' 2>/dev/null |
				sed -n "s/^\([0-9]*\) .*X-Event-ID=\([0-9a-f-]*\).*/$key\t\2\t\t\1/p"
		else
			"$BENCH_DIR/../test/tools/natstool" --url "$EVENTBUS_NATS_URL" dump "$t" 2>/dev/null |
				sed -n "s/.*\"time\":\"\([^\"]*\)\".*\"X-Event-ID\":\"\([0-9a-f-]*\)\".*/$key\t\2\t\1\t/p"
		fi
	done | bq -c "\\copy $BENCH_SCHEMA.broker_times (run_key, event_id, broker_at, broker_ms) FROM STDIN WITH (NULL '')"
}

# ---------------------------------------------------------------------------
# One measured run
# ---------------------------------------------------------------------------

# bench_subscribe TOPIC... — in one transaction: unsubscribe the previous
# run's topics, subscribe the handler to
# these (one Kafka rebalance).  BENCH_SUBSCRIBED_AT = the clock right after
# that transaction committed (same session).
bench_subscribe() {
	local prev="" t
	for t in "${BENCH_PREV_TOPICS[@]}"; do prev="$prev,'$t'"; done
	BENCH_SUBSCRIBED_AT=$(bq <<SQL
BEGIN;
SELECT count(eventbus_unsubscribe(topic, handler, transport)) FROM eventbus.subscriptions
 WHERE topic IN (''$prev) AND handler = '$BENCH_SCHEMA.handle(eventbus.envelope)'::regprocedure \g /dev/null
SELECT count(eventbus_subscribe(topic, '$BENCH_SCHEMA.handle(eventbus.envelope)'::regprocedure, transport))
  FROM (SELECT DISTINCT topic, transport FROM $BENCH_SCHEMA.plan WHERE topic IN ($(printf "'%s'," "$@" | sed 's/,$//'))) s \g /dev/null
COMMIT;
SELECT clock_timestamp();
SQL
)
	BENCH_PREV_TOPICS=("$@")
}

# bench_warmup KEY TOPIC... — one event per topic of the run (creates the
# Kafka topic / JetStream stream), relayed, then the subscriptions; wait
# until the handler has seen every warm-up event, so that a measured window
# starts with active consumers (no group join inside it).
bench_warmup() {
	local key=$1
	shift
	bq -c "SELECT count(eventbus_publish(topic, 'warmup', 'Warmup', '{}', transport))
	         FROM (SELECT DISTINCT topic, transport FROM $BENCH_SCHEMA.plan WHERE run_key = '$key') s" >/dev/null
	bench_wait 60 "SELECT NOT EXISTS (SELECT 1 FROM eventbus.outbox WHERE topic IN (SELECT topic FROM $BENCH_SCHEMA.plan WHERE run_key = '$key'))" ||
		{ bench_log "$key: warm-up events not relayed within 60 s"; return 1; }
	bench_subscribe "$@"
	bench_wait 90 "SELECT count(DISTINCT topic) = $# FROM $BENCH_SCHEMA.handled
	                WHERE aggregate_id = 'warmup' AND topic IN (SELECT topic FROM $BENCH_SCHEMA.plan WHERE run_key = '$key')" ||
		{ bench_log "$key: subscriptions not active within 90 s (warm-up events not handled)"; return 1; }
}

# bench_publishers KEY CONNS MODE A B — start CONNS publishing connections
# (background psql, pids in BENCH_PUB_PIDS) and wait until each is connected,
# warm and waiting at the start gate (bench.sql await_gate); bench_go opens
# it.  Returns 1 if they are not ready within 60 s.  Their plans are
# generic: the harness's own look-up of the next rows in its plan table was
# planned anew for every transaction, 14 % of the publishers' CPU (perf),
# which is no write of an event and which the pgbench reference does not do.
# Once done they stay connected until the run's sampler ends (it holds
# bench_hold_sql's lock from before the gate opens to the run's last
# handler commit), as pgbench's clients do until its run is over: a
# backend's exit (the kernel unmapping its memory) fell inside the window,
# about a tenth of the publishing backends' CPU samples in 500-event runs
# (perf), taken from the pipeline being measured.
bench_publishers() {
	local key=$1 conns=$2 mode=$3 a=$4 b=$5 c
	local opts="${PGOPTIONS:-} -c plan_cache_mode=force_generic_plan"
	BENCH_PUB_PIDS=()
	for ((c = 0; c < conns; c++)); do
		if [ "$mode" = steady ]; then
			PGOPTIONS=$opts PGAPPNAME=bench_publisher bq -c "CALL $BENCH_SCHEMA.steady('$key', $c, $a, $b)" \
				-c "$(bench_hold_sql "$key" shared)" >/dev/null &
		else
			PGOPTIONS=$opts PGAPPNAME=bench_publisher bq -c "CALL $BENCH_SCHEMA.load('$key', $c, $a, $b)" \
				-c "$(bench_hold_sql "$key" shared)" >/dev/null &
		fi
		BENCH_PUB_PIDS+=($!)
	done
	bench_wait 60 "SELECT count(*) = $conns FROM $BENCH_SCHEMA.gate_ready WHERE run_key = '$key'" ||
		{ bench_log "$key: publishing connections not ready within 60 s"; bench_go "$key"; return 1; }
}

# bench_hold_sql KEY [shared] — the statement taking KEY's hold lock (a
# session advisory lock, released when the session ends): the sampler holds
# it exclusively for the whole run, the publishing connections wait for it.
bench_hold_sql() {
	echo "SELECT pg_advisory_lock${2:+_$2}(hashtext('$BENCH_SCHEMA'), hashtext('$1'))"
}

# bench_go KEY — open the start gate of KEY's publishing connections.
bench_go() {
	bq -c "INSERT INTO $BENCH_SCHEMA.gate_open VALUES ('$1') ON CONFLICT DO NOTHING" >/dev/null
}

# bench_run KEY LABEL EVENTS CONNS TRANSPORTS MODE [MIN MAX | BATCH INTERVAL]
#   KEY         run key (unique in this harness run)
#   LABEL       second part of the topic names (the level, "steady", "consume")
#   EVENTS      events (EVENTS/10 aggregates, versions 1..10, 5 topics per transport)
#   CONNS       concurrent publishing connections
#   TRANSPORTS  "kafka", "nats" or "kafka,nats" (aggregates alternate)
#   MODE        load:    subscribe (warm-up), then publish as fast as possible,
#                        MIN..MAX rows per transaction, measured from the first publish
#               steady:  subscribe (warm-up), then BATCH rows per transaction
#                        every INTERVAL seconds per connection
#               consume: publish everything first (MIN..MAX rows per
#                        transaction) with no subscription, wait until the relay
#                        has sent it all, then subscribe: the events are in the
#                        broker when consumption starts (measured from the
#                        first handler start; subscribe → first handler start
#                        is reported as startup_s)
# Sets BENCH_DOC to the run's figures, one JSON object (level_stats + cpu +
# memory); returns 1 if the run could not be set up.
# Not to be run in a subshell: it remembers the subscribed topics and the
# eventbus pids for the next run and for the leftover count.
bench_run() {
	local key=$1 label=$2 events=$3 conns=$4 trs=$5 mode=$6 a=$7 b=$8
	local topics=() nt c sampler cpu mem timeout pid role t tr parts=() sub_at="" pubns="" extra rounds0 rounds
	BENCH_DOC=
	mapfile -t topics < <(bq -c "SELECT $BENCH_SCHEMA.make_plan('$key', '$BENCH_PREFIX', '$label', '$BENCH_RUN',
	                                      $events, $conns, string_to_array('$trs', ','))")
	nt=${#topics[@]}
	[ "$nt" -gt 0 ] || { bench_log "$key: no plan"; return 1; }

	# Kafka topics with a chosen partition count must exist before the
	# first message (which would auto-create them with 4).
	if [ -n "${BENCH_KAFKA_PARTITIONS:-}" ] && [[ ,$trs, == *,kafka,* ]]; then
		for t in "${topics[@]}"; do [[ $t == *.kafka.* ]] && parts+=("$t:$BENCH_KAFKA_PARTITIONS"); done
		"$BENCH_DIR/../scripts/stack.sh" kafka-topics "${parts[@]}" >/dev/null ||
			{ bench_log "$key: could not create the Kafka topics"; return 1; }
	fi

	if [ "$mode" = consume ]; then
		# Everything into the broker first, nobody subscribed.
		bench_publishers "$key" "$conns" load "$a" "$b" || return 1
		bench_go "$key"
		for c in "${BENCH_PUB_PIDS[@]}"; do wait "$c" || { bench_log "$key: a publishing connection failed"; return 1; }; done
		bench_wait 300 "SELECT NOT EXISTS (SELECT 1 FROM eventbus.outbox WHERE topic IN (SELECT topic FROM $BENCH_SCHEMA.plan WHERE run_key = '$key'))" ||
			{ bench_log "$key: events not relayed within 300 s"; return 1; }
	else
		bench_warmup "$key" "${topics[@]}" || return 1
	fi

	bench_quiesce
	# Publishers connect and warm up before the window (see bench_publishers).
	if [ "$mode" != consume ]; then
		bench_publishers "$key" "$conns" "$mode" "$a" "$b" || return 1
	fi
	if [ "$mode" = steady ]; then
		timeout=$(awk -v e="$events" -v c="$conns" -v a="$a" -v b="$b" 'BEGIN { printf "%d", e / (c * a) * b + 180 }')
	else
		timeout=300
	fi
	# The samplers start, and take their first sample, before the window: a
	# new backend and its first look at the catalogs, and the first read of
	# /proc, cost tens of ms of CPU, taken from the first publishing
	# transactions otherwise (a tenth of a 500-event run).  Its session
	# holds the run's hold lock (bench_publishers) until the run is over.
	bench_mem_start
	bq -c "$(bench_hold_sql "$key")" -c "CALL $BENCH_SCHEMA.sample('$key', $events, $timeout, 30, ${BENCH_SAMPLE_EVERY:-0.5})" >/dev/null &
	sampler=$!
	bench_wait 30 "SELECT EXISTS (SELECT 1 FROM $BENCH_SCHEMA.samples WHERE run_key = '$key')" ||
		bench_log "$key: the sampler took no first sample within 30 s"
	for ((t = 0; t < 100; t++)); do [ -s "$BENCH_MEM_FILE" ] && break; sleep 0.1; done
	bench_proc_snapshot; bench_snap_save BEFORE
	rounds0=$(bench_relay_rounds)
	if [ "$mode" = consume ]; then
		bench_subscribe "${topics[@]}"
		sub_at=$BENCH_SUBSCRIBED_AT
	else
		bench_go "$key"
		for c in "${BENCH_PUB_PIDS[@]}"; do wait "$c" || bench_log "$key: a publishing connection failed"; done
	fi
	wait "$sampler" || bench_log "$key: the sampler failed"
	# Only now (the run's last handler committed): a query in the run's tail
	# would start a backend (psql) while the pipeline still works.
	[ "$mode" != consume ] && pubns=$(bq -c "SELECT sum(cpu_ns) FROM $BENCH_SCHEMA.publisher_cpu WHERE run_key = '$key'")
	# Relay rounds in the window (consume mode relays before it: none).
	rounds=$(( $(bench_relay_rounds) - rounds0 ))
	bench_proc_snapshot
	cpu=$(bench_cpu_json "$pubns")
	mem=$(bench_mem_stop)
	while read -r pid role; do
		[[ -z $pid || " $BENCH_EB_PIDS " == *" $pid "* ]] || BENCH_EB_PIDS="$BENCH_EB_PIDS $pid"
	done < <(bench_eventbus_pids)
	if [ "${BENCH_BROKER_TIMES:-}" = 1 ]; then
		for tr in ${trs//,/ }; do
			parts=()
			for t in "${topics[@]}"; do [[ $t == *.$tr.* ]] && parts+=("$t"); done
			bench_broker_times "$key" "$tr" "${parts[@]}" || bench_log "$key: could not read the $tr broker times"
		done
	fi
	extra=""
	[ -n "$sub_at" ] && extra=", 'subscribed_at', '$sub_at'::timestamptz"
	BENCH_DOC=$(bq -c "WITH s AS (SELECT $BENCH_SCHEMA.level_stats('$key') AS d)
	                   SELECT d || jsonb_build_object('label', '$label', 'transports', '$trs', 'connections', $conns, 'mode', '$mode',
	                                            'rows_per_tx', '$([ "$mode" = steady ] && echo "$a" || echo "$a-$b")',
	                                            'topics', $nt, 'aggregates', $events / 10,
	                                            'kafka_partitions', $( [ -n "${BENCH_KAFKA_PARTITIONS:-}" ] && echo "$BENCH_KAFKA_PARTITIONS" || echo 4),
	                                            'cpu_s', '$cpu'::jsonb, 'memory_max', '$mem'::jsonb,
	                                            'relay_rounds', $rounds,
	                                            'events_per_relay_round', round((d->>'published')::numeric / nullif($rounds, 0), 1) $extra)
	                          || CASE WHEN '$sub_at' <> '' THEN jsonb_build_object('startup_s',
	                                 round(extract(epoch FROM (d->>'first_handler_start')::timestamptz - '${sub_at:-epoch}'::timestamptz)::numeric, 3))
	                             ELSE '{}' END
	                     FROM s")
	[ -n "$BENCH_DOC" ]
}

# bench_quiesce — before each measured run and each reference: vacuum and
# analyze the database and checkpoint, so that no run inherits the
# autovacuum or checkpoint work of the writes before it (as pgbench vacuums
# its own tables before a run).  Without it, which run an autovacuum of the
# previous runs' rows fell into was chance.
bench_quiesce() {
	bq -c "VACUUM (ANALYZE)" -c "CHECKPOINT" >/dev/null || bench_log "could not vacuum and checkpoint before a run"
}

# bench_field JSON PATH... — a value from a JSON document (via the database).
bench_field() {
	local doc=$1; shift
	bq -c "SELECT '${doc//\'/\'\'}'::jsonb #>> '{$(IFS=,; echo "$*")}'"
}

# ---------------------------------------------------------------------------
# The references: pgbench doing the same writes without eventbus
# ---------------------------------------------------------------------------
# Each pgbench client owns its aggregates (as each pool worker owns its
# keys), 1,000 aggregates over 5 topics in all, so nothing waits on another
# client's locks and versions arrive in order.  The consume side calls the
# benchmark's own handler with an envelope built in SQL (one statement per
# event, as a consumer service would send it).

# bench_ref_prepare LABEL CLIENTS — per-client event counters, restarted.
bench_ref_prepare() {
	local c sql=""
	for ((c = 0; c < $2; c++)); do
		sql="$sql CREATE SEQUENCE IF NOT EXISTS $BENCH_SCHEMA.ref_seq_$c; ALTER SEQUENCE $BENCH_SCHEMA.ref_seq_$c RESTART;"
	done
	PGOPTIONS="-c client_min_messages=warning" bq -c "$sql" >/dev/null
}

# bench_ref_event_sql LABEL CLIENTS EVENT_ID_SQL FROM_SQL — one statement:
# the next event of this client (aggregate, version in order) handed to the
# handler.  EVENT_ID_SQL names the event id (FROM_SQL may supply it).
bench_ref_event_sql() {
	local label=$1 clients=$2 idsql=$3 from=$4 per
	per=$(( (1000 + clients - 1) / clients ))
	cat <<SQL
SELECT $BENCH_SCHEMA.handle(ROW($idsql, x.topic, 'ord-' || x.a, 'OrderLineAdded', x.v, clock_timestamp(), NULL, NULL, NULL, jsonb_build_object('id', x.n, 'run_key', 'ref', 'transport', 'kafka', 'topic', x.topic, 'aggregate_id', 'ord-' || x.a, 'sku', 'sku-' || (x.n % 97), 'qty', 1 + x.n % 3, 'amount', 9.99 + x.n % 50, 'created_at', clock_timestamp()), NULL, 'kafka', NULL)::eventbus.envelope) FROM (SELECT n, a, (n - 1) / $per + 1 AS v, 'ref.$label.' || (a % 5 + 1) AS topic FROM (SELECT n, :client_id + $clients * ((n - 1) % $per) AS a FROM (SELECT nextval('$BENCH_SCHEMA.ref_seq_' || :client_id) AS n) s0) s1) x$from;
SQL
}

# bench_pgbench SECONDS CLIENTS SCRIPT EVENTS_PER_SCRIPT — run it, print
# "tps events_per_s steal_pct" (steal: % of the machine's CPU time the
# hypervisor took meanwhile; 0 0 0 and pgbench's output on stderr if it
# failed).
bench_pgbench() {
	local secs=$1 clients=$2 script=$3 per=$4 out rc tps threads=2 t1 t2 s1 s2
	[ "$clients" -lt 2 ] && threads=1
	read -r _ t1 s1 < <(machine_ticks)
	out=$("${PGBENCH:-pgbench}" -n -M prepared -c "$clients" -j "$threads" -T "$secs" -f "$script" 2>&1)
	rc=$?
	read -r _ t2 s2 < <(machine_ticks)
	tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1)
	if [ "$rc" -ne 0 ] || [ -z "$tps" ]; then
		bench_log "pgbench failed:"; echo "$out" >&2
		echo "0 0 0"
		return 1
	fi
	awk -v t="$tps" -v p="$per" -v st=$((s2 - s1)) -v tot=$((t2 - t1)) \
		'BEGIN { printf "%.1f %d %.1f\n", t, t * p, (tot > 0 ? 100 * st / tot : 0) }'
}

# bench_ref_consume SECONDS CLIENTS PER_TX — the handler alone: PER_TX
# events per transaction (1 = each statement its own transaction).  Prints
# JSON.
bench_ref_consume() {
	local secs=$1 clients=$2 per=$3 dir label="c$3" i tps eps steal
	dir=$(mktemp -d "${TMPDIR:-/tmp}/eventbus-bench-ref.XXXXXX")
	bench_ref_prepare "$label" "$clients"
	{
		[ "$per" -gt 1 ] && echo 'BEGIN;'
		for ((i = 0; i < per; i++)); do bench_ref_event_sql "$label" "$clients" "gen_random_uuid()" ""; done
		[ "$per" -gt 1 ] && echo 'COMMIT;'
	} > "$dir/consume.sql"
	bench_quiesce
	read -r tps eps steal < <(bench_pgbench "$secs" "$clients" "$dir/consume.sql" "$per")
	rm -rf "$dir"
	printf '{"what": "handler alone", "tool": "pgbench", "seconds": %s, "clients": %s, "events_per_tx": %s, "tps": %s, "events_per_s": %s, "steal_pct": %s}\n' \
		"$secs" "$clients" "$per" "${tps:-0}" "${eps:-0}" "${steal:-0}"
}

# bench_ref_end_to_end SECONDS CLIENTS PER_TX — every write eventbus and the
# handler make, without eventbus, PER_TX events per transaction: publish
# (business row + version bump + outbox row per event), relay (delete PER_TX
# sent outbox rows), consume (inbox row + handler per event).  Prints JSON.
bench_ref_end_to_end() {
	local secs=$1 clients=$2 per=$3 dir label="e$3" i tps eps steal s=$BENCH_SCHEMA naggs
	naggs=$(( (1000 + clients - 1) / clients ))
	dir=$(mktemp -d "${TMPDIR:-/tmp}/eventbus-bench-ref.XXXXXX")
	bench_ref_prepare "$label" "$clients"
	{
		echo 'BEGIN;'
		for ((i = 0; i < per; i++)); do
			cat <<SQL
\\set a :client_id + $clients * random(0, $((naggs - 1)))
WITH o AS (INSERT INTO $s.ref_orders (run_key, transport, topic, aggregate_id, sku, qty, amount) VALUES ('ref', 'kafka', 'ref.$label.' || (:a % 5 + 1), 'ord-' || :a, 'sku-' || (:a % 97), 1 + :a % 3, 9.99 + :a % 50) RETURNING *), v AS (INSERT INTO $s.ref_versions AS v (topic, aggregate_id, version) VALUES ('ref.$label.' || (:a % 5 + 1), 'ord-' || :a, 1) ON CONFLICT (topic, aggregate_id) DO UPDATE SET version = v.version + 1 RETURNING version) INSERT INTO $s.ref_outbox (event_id, transport, topic, aggregate_id, event_type, event_version, occurred_at, payload) SELECT gen_random_uuid(), o.transport, o.topic, o.aggregate_id, 'OrderLineAdded', v.version, clock_timestamp(), to_jsonb(o) FROM o, v;
SQL
		done
		echo 'COMMIT;'
		echo "DELETE FROM $s.ref_outbox WHERE id IN (SELECT id FROM $s.ref_outbox ORDER BY id LIMIT $per FOR UPDATE SKIP LOCKED);"
		echo 'BEGIN;'
		for ((i = 0; i < per; i++)); do
			echo -n "WITH i AS (INSERT INTO $s.ref_inbox (subscription_id, event_id, outcome) VALUES (1, gen_random_uuid(), 'handled') ON CONFLICT DO NOTHING RETURNING event_id) "
			bench_ref_event_sql "$label" "$clients" "i.event_id" ", i"
		done
		echo 'COMMIT;'
	} > "$dir/e2e.sql"
	bench_quiesce
	read -r tps eps steal < <(bench_pgbench "$secs" "$clients" "$dir/e2e.sql" "$per")
	rm -rf "$dir"
	printf '{"what": "all writes: business row, version, outbox row and its deletion, inbox row, handler", "tool": "pgbench", "seconds": %s, "clients": %s, "events_per_tx": %s, "scripts_per_s": %s, "events_per_s": %s, "steal_pct": %s}\n' \
		"$secs" "$clients" "$per" "${tps:-0}" "${eps:-0}" "${steal:-0}"
}

# ---------------------------------------------------------------------------
# Idle
# ---------------------------------------------------------------------------

# bench_idle_prepare KEY TRANSPORTS — fresh topics (5 per transport)
# subscribed and warmed up, nothing else published: the idle state.
bench_idle_prepare() {
	local topics=()
	mapfile -t topics < <(bq -c "SELECT $BENCH_SCHEMA.make_plan('$1', '$BENCH_PREFIX', 'idle', '$BENCH_RUN',
	                                      100, 1, string_to_array('$2', ','))")
	[ "${#topics[@]}" -gt 0 ] || { bench_log "$1: no plan"; return 1; }
	bench_warmup "$1" "${topics[@]}"
}

# bench_rewarm KEY AGGREGATE — one more event per topic of KEY's plan
# (aggregate AGGREGATE), wait until each is handled: the consumers of those
# topics are active again (after a dispatcher restart).
bench_rewarm() {
	local n
	n=$(bq -c "SELECT count(eventbus_publish(topic, '$2', 'Warmup', '{}', transport))
	             FROM (SELECT DISTINCT topic, transport FROM $BENCH_SCHEMA.plan WHERE run_key = '$1') s")
	bench_wait 90 "SELECT count(DISTINCT topic) = $n FROM $BENCH_SCHEMA.handled
	                WHERE aggregate_id = '$2' AND topic IN (SELECT topic FROM $BENCH_SCHEMA.plan WHERE run_key = '$1')"
}

# bench_idle SECONDS — CPU per component while nothing is published (the
# subscriptions stay active): the cost of idle polling; eventbus_pct_core =
# launcher + dispatcher + workers as % of one core.
bench_idle() {
	local cpu subs
	subs=$(bq -c "SELECT jsonb_object_agg(transport, n) FROM (SELECT transport, count(*) AS n FROM eventbus.subscriptions GROUP BY 1) s")
	bench_proc_snapshot; bench_snap_save BEFORE
	sleep "$1"
	bench_proc_snapshot
	cpu=$(bench_cpu_json)
	bq -c "SELECT d || jsonb_build_object(
	                 'subscriptions', coalesce('${subs:-null}'::jsonb, '{}'),
	                 'eventbus_pct_core', round(100 * ((d->>'launcher')::numeric + (d->>'dispatcher')::numeric + (d->>'workers')::numeric)
	                                            / nullif((d->>'window_s')::numeric, 0), 2),
	                 'nats_server_pct_core', round(100 * (d->>'nats_server')::numeric / nullif((d->>'window_s')::numeric, 0), 2),
	                 'devbroker_pct_core', round(100 * (d->>'devbroker')::numeric / nullif((d->>'window_s')::numeric, 0), 2))
	         FROM (SELECT '$cpu'::jsonb AS d) s"
}
