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

"$STACK" destroy >/dev/null 2>&1 || true
trap '"$STACK" stop >/dev/null 2>&1 || true; echo "test stack stopped (state kept in $EVENTBUS_STATE)"' EXIT

"$STACK" start || { echo "could not start the test stack"; exit 1; }
# shellcheck disable=SC1090
source "$EVENTBUS_ENV"
mkdir -p "$LOGDIR"

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

passed=0; failed=0; suites_failed=()

# count_tap FILE — add a TAP runner's totals (prove / pg_prove summary) to the counts.
count_tap() {
	local total fails
	total=$(sed -n 's/.*Tests=\([0-9]*\),.*/\1/p' "$1" | tail -1)
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

echo "== integration (test/integration, real PostgreSQL, Kafka dev broker, nats-server)"
if prove -v "$REPO"/test/integration/[0-9]*.sh 2>&1 | tee "$LOGDIR/integration.log"; then :; else suites_failed+=(integration); fi
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
