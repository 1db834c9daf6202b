#!/usr/bin/env bash
# run.sh — what `make fuzz` runs: the decoder fuzz harness (fuzz.sql) at
# length, through test/integration/29_decoder_fuzz.sh: FUZZ_INPUTS inputs
# (default 100000) in the eventbus database and FUZZ_LATIN1_INPUTS (default
# 25000) in a LATIN1 database, seed FUZZ_SEED (default random; printed).
# Runs on a fresh stack of its own (as make test does), stopped at the end.
# Exits non-zero on any failure.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
STACK="$REPO/scripts/stack.sh"
EVENTBUS_STATE="${EVENTBUS_FUZZ_STATE:-${TMPDIR:-/tmp}/eventbus-fuzz-$(printf '%s' "$REPO" | md5sum | cut -c1-8)}"
export EVENTBUS_STATE
export EVENTBUS_ENV="$EVENTBUS_STATE/env"

"$STACK" destroy >/dev/null 2>&1 || true
trap '"$STACK" stop >/dev/null 2>&1 || true' EXIT
"$STACK" start >/dev/null || { echo "could not start the fuzz stack"; exit 1; }
# shellcheck disable=SC1090
source "$EVENTBUS_ENV"
psql -X -q -c "CREATE EXTENSION IF NOT EXISTS eventbus" >/dev/null || { echo "could not create the extension"; exit 1; }

export EB_FUZZ_INPUTS=${FUZZ_INPUTS:-100000}
export EB_FUZZ_LATIN1_INPUTS=${FUZZ_LATIN1_INPUTS:-25000}
[ -n "${FUZZ_SEED:-}" ] && export EB_FUZZ_SEED=$FUZZ_SEED
prove -v "$REPO/test/integration/29_decoder_fuzz.sh"
