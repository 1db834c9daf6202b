#!/usr/bin/env bash
# run.sh — `make bench`: start the local stack if needed and run the
# benchmarks, printing their figures.  Not part of `make test`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
"$REPO/scripts/stack.sh" start >/dev/null
# shellcheck disable=SC1090
source "$("$REPO/scripts/stack.sh" env)"
psql -X -q -c "CREATE EXTENSION IF NOT EXISTS eventbus" 2>/dev/null
echo "== publish throughput (eventbus_publish -> broker acknowledgement)"
EVENTBUS_ENV="$("$REPO/scripts/stack.sh" env)" "$REPO/bench/publish.sh"
