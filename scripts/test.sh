#!/usr/bin/env bash
# test.sh — what `make test` runs: a fresh test stack, then every suite
# (pg_regress, pgTAP, integration), a summary, and a stop of everything it
# started.  Exits non-zero on any failure.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STACK="$REPO/scripts/stack.sh"
EVENTBUS_STATE="${EVENTBUS_TEST_STATE:-${TMPDIR:-/tmp}/eventbus-test-$(printf '%s' "$REPO" | md5sum | cut -c1-8)}"
export EVENTBUS_STATE
export EVENTBUS_ENV="$EVENTBUS_STATE/env"
LOGDIR="$EVENTBUS_STATE/test-logs"

# The integration tests run in two lanes, each against a stack of its own
# (most of their time is bounded waiting: rebalances, restarts, timeouts), so
# the suite takes about half as long.  Lane 1 is the stack pg_regress and
# pgTAP use too.
LANE2_STATE="$EVENTBUS_STATE-lane2"
LANE2_ENV="$LANE2_STATE/env"
stop_all() {
	"$STACK" stop >/dev/null 2>&1 || true
	EVENTBUS_STATE="$LANE2_STATE" "$STACK" stop >/dev/null 2>&1 || true
	echo "test stacks stopped (state kept in $EVENTBUS_STATE and $LANE2_STATE)"
}
"$STACK" destroy >/dev/null 2>&1 || true
EVENTBUS_STATE="$LANE2_STATE" "$STACK" destroy >/dev/null 2>&1 || true
trap stop_all EXIT

# prepare_stack STATE — start the stack in STATE, tune it for the tests and
# wait until the launcher reports both brokers connected.
prepare_stack() (
	export EVENTBUS_STATE=$1
	"$STACK" start || { echo "could not start the test stack in $1"; exit 1; }
	# shellcheck disable=SC1090
	source "$1/env"
	# Test tuning: a short ack timeout so outage tests retry within seconds.
	psql -X -q -c "ALTER SYSTEM SET eventbus.ack_timeout = '5s'" -c "SELECT pg_reload_conf()" >/dev/null
	psql -X -q -c "CREATE EXTENSION IF NOT EXISTS eventbus" -c "CREATE EXTENSION IF NOT EXISTS pgtap" >/dev/null
	# The launcher may be in its restart delay (the stack creates its database
	# after PostgreSQL starts): wait until it reports both brokers connected.
	for _ in $(seq 1 150); do
		[ "$(psql -X -A -t -c "SELECT count(*) FROM eventbus_status() WHERE component = 'launcher' AND transport IS NOT NULL AND state = 'connected'" 2>/dev/null)" = 2 ] && break
		sleep 0.2
	done
	psql -X -c "SELECT component, pid, transport, state FROM eventbus_status()"
)
prepare_stack "$EVENTBUS_STATE" || exit 1
prepare_stack "$LANE2_STATE" || exit 1
# shellcheck disable=SC1090
source "$EVENTBUS_ENV"
mkdir -p "$LOGDIR"

passed=0; failed=0; suites_failed=()

# count_tap FILE — add a TAP runner's totals (prove / pg_prove summary) to the counts.
count_tap() {
	local total fails
	total=$(sed -n 's/.*Tests=\([0-9]*\),.*/\1/p' "$1" | awk '{s += $1} END {print s + 0}')
	fails=$(grep -o 'Failed [0-9]*/[0-9]* subtests' "$1" | awk '{split($2, a, "/"); s += a[1]} END {print s + 0}')
	total=${total:-0}
	passed=$((passed + total - fails)); failed=$((failed + fails))
}

echo "== pg_regress (test/regress, make installcheck)"
if make -C "$REPO" --no-print-directory installcheck >"$LOGDIR/regress.log" 2>&1; then rc=0; else rc=1; fi
cat "$LOGDIR/regress.log" | grep -E '^(test | |ok|not ok|=|All|[0-9]+ of)' || true
n_ok=$(grep -cE '^(ok|test ).* ok' "$LOGDIR/regress.log" || true)
n_bad=$(grep -cE 'FAILED|failed \(' "$LOGDIR/regress.log" || true)
passed=$((passed + n_ok)); failed=$((failed + n_bad))
if [ $rc -ne 0 ]; then
	suites_failed+=(pg_regress)
	[ -f "$REPO/test/regress/regression.diffs" ] && head -100 "$REPO/test/regress/regression.diffs"
	[ "$n_bad" -eq 0 ] && failed=$((failed + 1))
fi

echo "== pgTAP (test/pgtap)"
if pg_prove -d "$PGDATABASE" "$REPO"/test/pgtap/*.sql 2>&1 | tee "$LOGDIR/pgtap.log"; then :; else suites_failed+=(pgTAP); fi
count_tap "$LOGDIR/pgtap.log"

echo "== integration (test/integration, real PostgreSQL, Kafka dev broker, nats-server; two lanes)"
# A shared queue, the longest tests first (48: ~120 s; 32, 40: ~84 s; 31,
# 38: ~73 s; 41, 44: ~52 s; 16, 42: 32-45 s; 20, 30: 26-40 s, measured in
# two-lane runs), then the rest in order; each lane takes the next test
# when it is free.
QUEUE="$LOGDIR/integration.queue"
SLOW="48 32 40 31 38 41 44 16 42 20 30"
{
	for n in $SLOW; do ls "$REPO"/test/integration/"$n"_*.sh; done
	for f in "$REPO"/test/integration/[0-9]*.sh; do
		case " $SLOW " in *" $(basename "$f" | cut -d_ -f1) "*) ;; *) echo "$f" ;; esac
	done
} >"$QUEUE"
# next_test — print and remove the queue's first test (fails when empty).
next_test() {
	flock "$QUEUE.lock" sh -c 't=$(head -n 1 "$1") && [ -n "$t" ] && sed -i 1d "$1" && echo "$t"' - "$QUEUE"
}
# run_lane ENV LOG LANE — run queued tests against the stack of ENV until
# none is left, a line per test on stdout, their TAP in LOG.  A test that
# runs longer than EVENTBUS_TEST_TIMEOUT seconds (600; the longest takes ~90)
# is stopped and fails, instead of holding up the suite.
TEST_TIMEOUT=${EVENTBUS_TEST_TIMEOUT:-600}
run_lane() {
	local t rc start
	: >"$2"
	while t=$(next_test); do
		start=$SECONDS
		EVENTBUS_ENV="$1" timeout -k 30 "$TEST_TIMEOUT" prove -v --timer "$t" >>"$2" 2>&1
		rc=$?
		[ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "# $t: stopped after ${TEST_TIMEOUT}s" >>"$2"
		[ $rc -eq 0 ] || echo "$t" >>"$LOGDIR/integration.failed"
		echo "  lane $3: $(basename "$t") $([ $rc -eq 0 ] && echo ok || echo FAILED) ($((SECONDS - start)) s)"
	done
}
rm -f "$LOGDIR/integration.failed"
run_lane "$LANE2_ENV" "$LOGDIR/integration-lane2.log" 2 &
lane2=$!
run_lane "$EVENTBUS_ENV" "$LOGDIR/integration-lane1.log" 1
wait "$lane2"
echo "== integration, each test's TAP (lane 1, then lane 2)"
cat "$LOGDIR/integration-lane1.log" "$LOGDIR/integration-lane2.log" | tee "$LOGDIR/integration.log"
if [ -s "$LOGDIR/integration.failed" ]; then
	suites_failed+=(integration)
	echo "integration tests that failed: $(xargs -n 1 basename <"$LOGDIR/integration.failed" | xargs)"
fi
count_tap "$LOGDIR/integration.log"

# Operations (packaging: builds and installs the Debian package, so the
# build tools are installed first when missing).
echo "== operations (test/ops)"
if "$REPO"/scripts/deps.sh --package >"$LOGDIR/ops-deps.log" 2>&1 &&
	prove -v $(ls "$REPO"/test/ops/*.sh | grep -v '/lib.sh$') 2>&1 | tee "$LOGDIR/ops.log"; then :; else suites_failed+=(operations); fi
[ -f "$LOGDIR/ops.log" ] && count_tap "$LOGDIR/ops.log"

echo
echo "== summary"
if [ ${#suites_failed[@]} -eq 0 ]; then
	echo "all suites passed (logs in $LOGDIR)"
else
	echo "FAILED suites: ${suites_failed[*]} (logs in $LOGDIR, server log $EVENTBUS_PG_LOG)"
	[ "$failed" -eq 0 ] && failed=1
fi
echo "tests: $passed passed, $failed failed"
[ ${#suites_failed[@]} -eq 0 ]
