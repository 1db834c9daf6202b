#!/usr/bin/env bash
# Decoder fuzz, short run (`make fuzz` runs the long one): thousands of
# hostile inbound messages (test/fuzz/fuzz.sql: mutated and generated
# envelopes, junk, deep nesting, huge values, odd keys and headers) go
# through eventbus_check_message() — the consumer's decoder, work item round
# trip and envelope building — in one backend.  Asserted: no call raised an
# ERROR and the backend (and PostgreSQL) survived, the decoder's safety net
# never fired (every failure was a checked reason), and every accepted
# message decodes to what PostgreSQL itself reads in its JSON; and fixed
# cases for the parse that builds the jsonb.  Then the same
# in a LATIN1 database, with \u00e9 / \u20ac escapes and raw characters:
# a correct value or a reason, never an error.
source "$(dirname "$0")/lib.sh"

N=${EB_FUZZ_INPUTS:-8000}
NL=${EB_FUZZ_LATIN1_INPUTS:-2000}
SEED=${EB_FUZZ_SEED:-0.$RANDOM}
FUZZ="$REPO/test/fuzz/fuzz.sql"
LDB="eb_fuzz_latin1_$$"
export PGCLIENTENCODING=UTF8

cleanup() {
	q -c "DROP SCHEMA IF EXISTS eb_fuzz CASCADE" >/dev/null 2>&1
	qdb postgres -c "DROP DATABASE IF EXISTS $LDB" >/dev/null 2>&1
}
trap cleanup EXIT

pm_before=$(q -c "SELECT pg_postmaster_start_time()")

# fuzz DB INPUTS — run the harness in DB; sets RES (inputs|accepted|rejected|errors|internal|mismatches|seconds).
fuzz() {
	local db=$1 n=$2 out
	qdb "$db" -f "$FUZZ" >/dev/null || bail "could not load $FUZZ into $db"
	out=$(qdb "$db" -c "SELECT eb_fuzz.run($n, $SEED)")
	[ $? -eq 0 ] || diag "the fuzz run in $db failed: $(echo "$out" | head -5)"
	RES=$(qdb "$db" -c "SELECT concat_ws('|', inputs, accepted, rejected, errors, internal, mismatches, seconds) FROM eb_fuzz.results")
}
# report DB LABEL — the assertions on RES.
report() {
	local db=$1 label=$2 inputs acc rej err int mis secs
	IFS='|' read -r inputs acc rej err int mis secs <<<"$RES"
	is "$inputs" "$3" "$label: $3 inputs through the decoder in one backend (seed $SEED)"
	diag "$label: $acc accepted, $rej quarantined, in $secs s"
	ok "$([ "${acc:-0}" -gt 0 ] && [ "${rej:-0}" -gt 0 ]; echo $?)" "$label: some inputs accepted ($acc), some quarantined ($rej)"
	is "$err" 0 "$label: no call raised an ERROR"
	is "$int" 0 "$label: every failure caught by a check (the safety net never fired)"
	is "$mis" 0 "$label: every accepted message decodes to what PostgreSQL reads in its JSON"
	while IFS='|' read -r kind detail; do
		diag "  $kind: $detail"
	done < <(qdb "$db" -c "SELECT kind, left(detail, 150) || ' <- ' || left(encode(value, 'escape'), 150) FROM eb_fuzz.failures ORDER BY n LIMIT 5")
}

fuzz "$PGDATABASE" "$N"
report "$PGDATABASE" "UTF8 database" "$N"

# The parser builds the jsonb in its one pass, so it sees number tokens of
# text that is not JSON: 1e999999-5 is the number 1e999999 (beyond numeric)
# before the parser fails on -5.  A reason, not the safety net.
E='{"event_id":"0190a0a0-0000-7000-8000-000000000001","aggregate_id":"a-1","event_type":"T","event_version":1,"payload":'
check() { q -c "SELECT eventbus_check_message(convert_to('$E$1}', 'UTF8'))"; }
is "$(check '{"n":1e999999-5}' | cut -c1-27)" "message is not valid JSON: " \
	"a number beyond numeric followed by more number characters: quarantined as not JSON"
is "$(check '{"n":[1,1e999999]}')" "message has a number numeric cannot hold (more than 131072 digits before the decimal point)" \
	"a number beyond numeric in valid JSON: quarantined, saying which"
P='{"b":[1,-0,1.5e-300,1e999,"\u00e9\n",true,false,null,{}],"a":{"k":1,"k":{"x":[]}},"":""}'
is "$(q -c "SELECT (eventbus_decode_message(convert_to('$E$P}', 'UTF8'))).payload = '$P'::jsonb")" t \
	"the payload decodes to what PostgreSQL reads (nesting, numbers, escapes, duplicate keys: the last wins)"

# A LATIN1 database.
qdb postgres -c "DROP DATABASE IF EXISTS $LDB" >/dev/null
qdb postgres -c "CREATE DATABASE $LDB ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'" >/dev/null ||
	bail "could not create a LATIN1 database"
qdb "$LDB" -c "CREATE EXTENSION eventbus" >/dev/null || bail "could not create the extension in $LDB"

ENV1='{"event_id":"0190a0a0-0000-7000-8000-000000000001","aggregate_id":"a-1","event_type":"T","event_version":1,"payload":{"s":"'
ENV2='"}}'
# msg 'SQL bytea of the string value' — an envelope whose payload.s is that.
msg() { echo "convert_to('$ENV1', 'UTF8') || $1 || convert_to('$ENV2', 'UTF8')"; }
lat() { qdb "$LDB" -c "$1"; }
is "$(lat "SELECT (eventbus_decode_message($(msg "convert_to('\\u00e9t\\u00C9', 'UTF8')"))).payload->>'s' = chr(233) || 't' || chr(201)")" t \
	"LATIN1: \\u00e9 and \\u00C9 escapes decode to é and É"
is "$(lat "SELECT (eventbus_decode_message($(msg "'\\xc3a9'::bytea"))).payload->>'s' = chr(233)")" t \
	"LATIN1: a raw é (UTF-8 c3 a9) decodes to é"
is "$(lat "SELECT eventbus_check_message($(msg "convert_to('\\u20ac', 'UTF8')")) LIKE '%LATIN1 cannot represent'")" t \
	"LATIN1: a \\u20ac escape (€) is quarantined with a reason"
is "$(lat "SELECT eventbus_check_message($(msg "'\\xe282ac'::bytea")) LIKE '%LATIN1 cannot represent'")" t \
	"LATIN1: a raw € is quarantined with a reason"
is "$(lat "SELECT eventbus_check_message($(msg "convert_to('\\ud83d\\ude00', 'UTF8')")) LIKE '%LATIN1 cannot represent'")" t \
	"LATIN1: a surrogate pair escape outside LATIN1 is quarantined with a reason"
is "$(lat "SELECT e.event_type = chr(233) || 'v' AND e.payload = jsonb_build_object(chr(233), 1)
                  AND e.headers = jsonb_build_object('X-Aggregate-ID', 'h-1', 'n' || chr(233), 'v' || chr(233)) AND e.aggregate_id = 'h-1'
             FROM eventbus_decode_message(convert_to('{\"event_id\":\"0190a0a0-0000-7000-8000-000000000001\",\"event_type\":\"\\u00e9v\",\"event_version\":1,\"payload\":{\"\\u00e9\":1}}', 'UTF8'),
                                          NULL, '{\"X-Aggregate-ID\":\"h-1\",\"n\\u00e9\":\"v\\u00e9\"}') e")" t \
	"LATIN1: escapes in event_type, payload keys and headers decode to LATIN1 text"

fuzz "$LDB" "$NL"
report "$LDB" "LATIN1 database" "$NL"

is "$(q -c "SELECT pg_postmaster_start_time()")" "$pm_before" "PostgreSQL did not restart"

done_testing
