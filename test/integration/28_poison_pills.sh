#!/usr/bin/env bash
# Poison pills: on each transport, one topic (Kafka: one partition, so the
# order of what is sent is the order consumed) receives 40+ kinds of
# malformed or hostile messages — not JSON, empty, invalid UTF-8, NUL bytes,
# JSON that is not an object, 60,000 nested '[', deep nesting inside the
# payload, every kind of bad envelope field, numbers numeric cannot hold,
# bad escapes, duplicate fields, an oversized body, 20,000 headers, a huge
# header value — each followed by a good event of one of 5 aggregates (some
# good events carry escapes, 1e999, or take their aggregate id from the
# header or the Kafka key).  All is produced before subscribing, so many of
# them arrive in one poll.  Asserted from the database: every good event
# handled exactly once and in version order per aggregate, every bad one
# quarantined exactly once (matched by its raw bytes) with a non-empty
# reason, nothing dead-lettered, and the dispatcher pid, the pool worker
# pids and pg_postmaster_start_time() unchanged.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t28.kafka.$run"; TN="t28.nats.$run"
TS='2026-01-02T03:04:05.123456Z'
NAGG=5
W=$(mktemp -d)

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't28.%.$run'; rm -rf '$W'"

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t28_good, t28_bad, t28_handled;
CREATE TABLE t28_good (transport text, event_id uuid, aggregate_id text, version bigint, label text);
CREATE TABLE t28_bad (transport text, kind text, md5 text, len bigint);
CREATE TABLE t28_handled (n bigserial, transport text, topic text, aggregate_id text, event_id uuid,
                          version bigint, payload jsonb);
CREATE OR REPLACE FUNCTION t28_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t28_handled (transport, topic, aggregate_id, event_id, version, payload)
  VALUES (e.transport, e.topic, e.aggregate_id, e.event_id, e.event_version, e.payload);
END $$;
SQL

uuid() { cat /proc/sys/kernel/random/uuid; }
rep() { head -c "$2" /dev/zero | tr '\0' "$1"; }   # rep CHAR N
# envs FIELDS... — an envelope from raw "name":value pieces, as written;
# envb: the same, with printf %b escapes (\xff, \0, \\u0000 → \u0000) expanded.
envs() { local IFS=,; printf '{%s}' "$*"; }
envb() { local IFS=,; printf '{%b}' "$*"; }
EID() { printf '"event_id":"%s"' "$(uuid)"; }
AGG() { printf '"aggregate_id":"%s"' "$1"; }
TYP='"event_type":"T28Bad"'
VER='"event_version":1'
TSF="\"timestamp\":\"$TS\""
PAY='"payload":{"ok":true}'

# bad KIND TRANSPORT — write the malformed body of KIND to $W/TRANSPORT.KIND.bin
# (HDRS[TRANSPORT.KIND]: a file of header lines, if any).
declare -A HDRS
bad() {
	local k=$1 f="$W/$2.$1.bin" a="\"aggregate_id\":\"b-$1\""
	case $k in
	not_json)            printf 'hello, world' ;;
	empty)               : ;;
	invalid_utf8)        envb "$(EID)" "$a" '"event_type":"Bad\xff\xfeType"' "$VER" "$TSF" "$PAY" ;;
	overlong_utf8)       envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"s":"\xc0\xaf"}' ;;
	utf8_surrogate)      envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"s":"\xed\xa0\x80"}' ;;
	nul_byte)            envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"s":"a\0b"}' ;;
	bom)                 printf '\xef\xbb\xbf'; envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "$PAY" ;;
	top_array)           printf '[{"event_id":"%s"}]' "$(uuid)" ;;
	top_number)          printf '42' ;;
	top_string)          printf '"an event"' ;;
	top_null)            printf 'null' ;;
	deep_60000)          rep '[' 60000 ;;
	deep_payload)        envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "\"payload\":$(rep '[' 100000)$(rep ']' 100000)" ;;
	deep_object)         envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "\"payload\":$(for _ in $(seq 1 1000); do printf '{"a":'; done)1$(rep '}' 1000)" ;;
	missing_event_id)    envb "$a" "$TYP" "$VER" "$TSF" "$PAY" ;;
	empty_event_id)      envb '"event_id":""' "$a" "$TYP" "$VER" "$TSF" "$PAY" ;;
	event_id_not_uuid)   envb '"event_id":"not-a-uuid"' "$a" "$TYP" "$VER" "$TSF" "$PAY" ;;
	event_id_number)     envb '"event_id":12345' "$a" "$TYP" "$VER" "$TSF" "$PAY" ;;
	missing_event_type)  envb "$(EID)" "$a" "$VER" "$TSF" "$PAY" ;;
	version_zero)        envb "$(EID)" "$a" "$TYP" '"event_version":0' "$TSF" "$PAY" ;;
	version_negative)    envb "$(EID)" "$a" "$TYP" '"event_version":-1' "$TSF" "$PAY" ;;
	version_1e400)       envb "$(EID)" "$a" "$TYP" '"event_version":1e400' "$TSF" "$PAY" ;;
	version_abc)         envb "$(EID)" "$a" "$TYP" '"event_version":"abc"' "$TSF" "$PAY" ;;
	version_2pow63)      envb "$(EID)" "$a" "$TYP" '"event_version":9223372036854775808' "$TSF" "$PAY" ;;
	version_fraction)    envb "$(EID)" "$a" "$TYP" '"event_version":1.5' "$TSF" "$PAY" ;;
	version_1e999999)    envb "$(EID)" "$a" "$TYP" '"event_version":1e999999' "$TSF" "$PAY" ;;
	ts_garbage)          envb "$(EID)" "$a" "$TYP" "$VER" '"timestamp":"yesterday"' "$PAY" ;;
	ts_month_13)         envb "$(EID)" "$a" "$TYP" "$VER" '"timestamp":"2026-13-01T00:00:00Z"' "$PAY" ;;
	ts_feb_30)           envb "$(EID)" "$a" "$TYP" "$VER" '"timestamp":"2026-02-30T00:00:00Z"' "$PAY" ;;
	ts_no_zone)          envb "$(EID)" "$a" "$TYP" "$VER" '"timestamp":"2026-01-02T03:04:05"' "$PAY" ;;
	ts_year_huge)        envb "$(EID)" "$a" "$TYP" "$VER" '"timestamp":"99999999-01-01T00:00:00Z"' "$PAY" ;;
	ts_number)           envb "$(EID)" "$a" "$TYP" "$VER" '"timestamp":1700000000' "$PAY" ;;
	tenant_string)       envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"tenant_id":"abc"' "$PAY" ;;
	tenant_overflow)     envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"tenant_id":2147483648' "$PAY" ;;
	aggregate_too_long)  envb "$(EID)" "\"aggregate_id\":\"$(rep a 257)\"" "$TYP" "$VER" "$TSF" "$PAY" ;;
	aggregate_bad_chars) envb "$(EID)" '"aggregate_id":"bad agg*!"' "$TYP" "$VER" "$TSF" "$PAY" ;;
	aggregate_number)    envb "$(EID)" '"aggregate_id":42' "$TYP" "$VER" "$TSF" "$PAY" ;;
	no_aggregate)        envb "$(EID)" "$TYP" "$VER" "$TSF" "$PAY" ;;
	missing_payload)     envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" ;;
	oversized)           envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "\"payload\":{\"blob\":\"$(rep x 1200000)\"}" ;;
	many_headers)        envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "$PAY"   # JetStream: at most 64 kB of headers
	                     HDRS[$2.$k]="$W/$2.$k.hdr"; seq 1 "$([ "$2" = kafka ] && echo 20000 || echo 3000)" | sed 's/.*/X-H&: v/' >"${HDRS[$2.$k]}" ;;
	huge_header)         envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "$PAY"
	                     HDRS[$2.$k]="$W/$2.$k.hdr"; echo "X-Huge: $(rep h "$([ "$2" = kafka ] && echo 100000 || echo 40000)")" >"${HDRS[$2.$k]}" ;;
	nul_escape)          envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"s":"a\\u0000b"}' ;;
	lone_surrogate)      envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"s":"\\ud800"}' ;;
	bad_escape)          envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"s":"\\x41"}' ;;
	raw_control)         envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"s":"a\x01b"}' ;;
	duplicate_event_id)  envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "$PAY" "$(EID)" ;;
	number_overflow)     envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"n":1e1000000}' ;;
	number_underflow)    envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" '"payload":{"n":1e-20000}' ;;
	number_digits)       envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "\"payload\":{\"n\":1$(rep 0 140000)}" ;;
	truncated)           envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "$PAY" | head -c 60 ;;
	trailing_garbage)    envb "$(EID)" "$a" "$TYP" "$VER" "$TSF" "$PAY"; printf ' x' ;;
	*) bail "unknown kind $k" ;;
	esac >"$f"
}
KINDS=(not_json empty invalid_utf8 overlong_utf8 utf8_surrogate nul_byte bom top_array top_number
       top_string top_null deep_60000 deep_payload deep_object missing_event_id empty_event_id
       event_id_not_uuid event_id_number missing_event_type version_zero version_negative
       version_1e400 version_abc version_2pow63 version_fraction version_1e999999 ts_garbage
       ts_month_13 ts_feb_30 ts_no_zone ts_year_huge ts_number tenant_string tenant_overflow
       aggregate_too_long aggregate_bad_chars aggregate_number no_aggregate missing_payload oversized
       many_headers huge_header nul_escape lone_surrogate bad_escape raw_control duplicate_event_id
       number_overflow number_underflow number_digits truncated trailing_garbage)

# good TRANSPORT N — the good event following the N-th bad message: aggregate
# g-(N mod 5), its next version; variants put escapes, 1e999 and duplicate
# payload keys in the payload, or take the aggregate id from the
# X-Aggregate-ID header or (Kafka) the key only.  Writes $W/good.N.TRANSPORT.bin
# and sets GKEY/GHDR.
declare -A NEXTV
GKEY=-; GHDR=
good() {
	local tr=$1 n=$2 agg="g-$(($2 % NAGG))" u v label=plain pay='{"n":'$2'}' aggf f="$W/good.$2.$1.bin"
	u=$(uuid); v=$(( ${NEXTV[$tr.$agg]:-0} + 1 )); NEXTV[$tr.$agg]=$v
	aggf="\"aggregate_id\":\"$agg\""
	GKEY=-; GHDR=
	case $((n % 6)) in
	1) label=escapes; pay='{"s":"\u00e9\u20ac\ud83d\ude00","q":"\"\\\/"}' ;;
	2) label=big_number; pay='{"big":1e999,"neg":-1.5e-300}' ;;
	3) label=header_agg; aggf=""; GHDR="$W/good.$n.$tr.hdr"; echo "X-Aggregate-ID: $agg" >"$GHDR" ;;
	4) if [ "$tr" = kafka ]; then label=key_agg; aggf=""; GKEY=$agg; fi ;;
	5) label=dup_payload_key; pay='{"d":1,"d":2}' ;;
	esac
	if [ -n "$aggf" ]; then
		envs "\"event_id\":\"$u\"" "$aggf" '"event_type":"T28Good"' "\"event_version\":$v" "$TSF" "\"payload\":$pay"
	else
		envs "\"event_id\":\"$u\"" '"event_type":"T28Good"' "\"event_version\":$v" "$TSF" "\"payload\":$pay"
	fi >"$f"
	printf '%s|%s|%s|%s|%s\n' "$tr" "$u" "$agg" "$v" "$label" >>"$W/good.psv"
}

# The send plan per transport: lines FILE|KEY|HEADERFILE|CLASS|KIND.
: >"$W/good.psv"; : >"$W/bad.tsv"
for tr in kafka nats; do
	: >"$W/plan.$tr"
	i=0
	for k in "${KINDS[@]}"; do
		i=$((i + 1))
		bad "$k" $tr
		printf '%s|-|%s|bad|%s\n' "$W/$tr.$k.bin" "${HDRS[$tr.$k]:-}" "$k" >>"$W/plan.$tr"
		good $tr $i
		printf '%s|%s|%s|good|-\n' "$W/good.$i.$tr.bin" "$GKEY" "$GHDR" >>"$W/plan.$tr"
	done
done

nats_stream "T28_$run" "$TN" || bail "could not create the NATS stream"

# Kafka: consecutive plain messages (no key, no headers, non-empty) go out in
# one kcat call, one message per file, in order, on partition 0.
kcat_files() { kcat -P -b "$EVENTBUS_KAFKA_BROKERS" -t "$TK" -p 0 -X enable.idempotence=true -X message.max.bytes=4000000 "$@"; }
# send_one TRANSPORT FILE KEY HDRFILE — one message with its own options.
send_one() {
	local tr=$1 f=$2 key=$3 hf=$4 args=()
	if [ "$tr" = kafka ]; then
		[ "$key" != - ] && args+=(-k "$key")
		if [ -n "$hf" ]; then while IFS= read -r h; do args+=(-H "${h%%: *}=${h#*: }"); done <"$hf"; fi
		if [ ! -s "$f" ]; then
			printf '%s\t\n' "$([ "$key" = - ] && echo x || echo "$key")" | kafka_produce "$TK" -p 0
		else
			kcat_files "${args[@]}" "$f"
		fi
	else
		if [ -n "$hf" ]; then while IFS= read -r h; do args+=(--header "$h"); done <"$hf"; fi
		{ od -An -v -tx1 "$f" | tr -d ' \n'; echo; } | nats_produce "$TN" --hex --msg-id-from-event-id "${args[@]}"
	fi
}
send_plan() {   # send_plan TRANSPORT — returns non-zero if the broker refused something
	local tr=$1 batch=() f key hf cls kind rc=0
	flush() {
		[ ${#batch[@]} -eq 0 ] && return 0
		if [ "$tr" = kafka ]; then kcat_files "${batch[@]}"
		else for b in "${batch[@]}"; do od -An -v -tx1 "$b" | tr -d ' \n'; echo; done | nats_produce "$TN" --hex --msg-id-from-event-id; fi
		local r=$?; batch=(); return $r
	}
	while IFS='|' read -r f key hf cls kind; do
		if [ "$key" = - ] && [ -z "$hf" ] && [ -s "$f" ] && { [ "$tr" = kafka ] || [ "$(stat -c %s "$f")" -lt 900000 ]; }; then
			batch+=("$f")
		else
			flush || rc=1
			if ! send_one "$tr" "$f" "$key" "$hf" 2>"$W/err"; then
				diag "$tr: the broker refused $cls message $kind (skipped): $(head -c 200 "$W/err")"
				continue
			fi
		fi
		if [ "$cls" = bad ]; then
			printf '%s\t%s\t%s\t%s\n' "$tr" "$kind" "$(md5sum <"$f" | cut -d' ' -f1)" "$(stat -c %s "$f")" >>"$W/bad.tsv"
		fi
	done <"$W/plan.$tr"
	flush || rc=1
	return $rc
}
t0=$SECONDS
send_plan kafka || bail "kcat failed"
send_plan nats || bail "natstool failed"
diag "produced in $((SECONDS - t0)) s"

q -c "\\copy t28_bad FROM '$W/bad.tsv'" >/dev/null
q -c "\\copy t28_good FROM '$W/good.psv' WITH (FORMAT csv, DELIMITER '|')" >/dev/null
nbad=$(q -c "SELECT count(*) FROM t28_bad")
ngood=$(q -c "SELECT count(*) FROM t28_good")
diag "bad messages: kafka $(q -c "SELECT count(*) FROM t28_bad WHERE transport = 'kafka'"), nats $(q -c "SELECT count(*) FROM t28_bad WHERE transport = 'nats'") ($(echo ${#KINDS[@]}) kinds); good events: $ngood"
ok "$([ "$(q -c "SELECT count(DISTINCT kind) FROM t28_bad WHERE transport = 'kafka'")" -ge 20 ] &&
      [ "$(q -c "SELECT count(DISTINCT kind) FROM t28_bad WHERE transport = 'nats'")" -ge 20 ]; echo $?)" \
	"20+ kinds of bad message produced on each transport"
is "$(q -c "SELECT count(*) FROM (SELECT transport, md5 FROM t28_bad GROUP BY 1, 2 HAVING count(*) > 1) d")" 0 \
	"every bad message of a transport is distinct (each is matched by its bytes)"

pids() {
	q -c "SELECT string_agg(component || '=' || pid, ',' ORDER BY component) FROM eventbus_status()
	       WHERE (component = 'dispatcher' AND transport IS NULL) OR component LIKE 'worker %'"
}
pids_before=$(pids)
pm_before=$(q -c "SELECT pg_postmaster_start_time()")
diag "before: $pids_before"

t0=$SECONDS
subs=$(q -c "SELECT eventbus_subscribe('$TK', 't28_handler(eventbus.envelope)', 'kafka'), eventbus_subscribe('$TN', 't28_handler(eventbus.envelope)', 'nats')")
ok "$([[ $subs =~ ^[0-9]+\|[0-9]+$ ]]; echo $?)" "subscribed on both transports ($subs)"

wait_count 180 "$((nbad + ngood))" "SELECT (SELECT count(*) FROM t28_handled WHERE topic IN ('$TK', '$TN'))
                                         + (SELECT count(*) FROM eventbus.quarantine WHERE topic IN ('$TK', '$TN'))" 40
ok $? "every message handled or quarantined ($COUNT of $((nbad + ngood)))"
diag "consumed in $((SECONDS - t0)) s"
sleep 2

is "$(pids)" "$pids_before" "the dispatcher and every pool worker kept their pid"
is "$(q -c "SELECT pg_postmaster_start_time()")" "$pm_before" "PostgreSQL did not restart"

for tr in kafka nats; do
	T="t28.$tr.$run"
	is "$(q -c "SELECT count(*) FROM eventbus.quarantine WHERE topic = '$T'")" "$(q -c "SELECT count(*) FROM t28_bad WHERE transport = '$tr'")" \
		"$tr: one quarantine row per bad message, no more"
	is "$(q -c "SELECT string_agg(b.kind, ' ') FROM t28_bad b WHERE b.transport = '$tr'
	             AND (SELECT count(*) FROM eventbus.quarantine q WHERE q.topic = '$T' AND md5(q.raw) = b.md5
	                   AND octet_length(q.raw) = b.len AND length(btrim(q.reason)) > 0) <> 1")" "" \
		"$tr: each bad message quarantined exactly once with its raw bytes and a reason"
	is "$(q -c "SELECT count(*) FROM t28_good g WHERE transport = '$tr' AND (SELECT count(*) FROM t28_handled h WHERE h.event_id = g.event_id) <> 1")" 0 \
		"$tr: each good event handled exactly once"
	is "$(q -c "SELECT count(*) FROM t28_handled WHERE topic = '$T'")" "$(q -c "SELECT count(*) FROM t28_good WHERE transport = '$tr'")" \
		"$tr: no other event handled"
	is "$(q -c "SELECT count(*) FROM t28_good g JOIN t28_handled h USING (event_id) WHERE g.transport = '$tr' AND h.aggregate_id IS DISTINCT FROM g.aggregate_id")" 0 \
		"$tr: aggregate ids as sent (field, X-Aggregate-ID header or key)"
	is "$(q -c "SELECT count(*) FROM (SELECT version, row_number() OVER (PARTITION BY aggregate_id ORDER BY n) AS pos
	                                   FROM t28_handled WHERE topic = '$T') x WHERE version <> pos")" 0 \
		"$tr: each aggregate's events handled in version order 1..k"
	is "$(q -c "SELECT count(*) FILTER (WHERE h.payload->>'s' = 'é€😀' AND h.payload->>'q' = '\"\\/')
	                 || ',' || count(*) FILTER (WHERE (h.payload->>'big')::numeric = 1e999 AND (h.payload->>'neg')::numeric = -1.5e-300)
	                 || ',' || count(*) FILTER (WHERE h.payload = '{\"d\":2}')
	             FROM t28_good g JOIN t28_handled h USING (event_id) WHERE g.transport = '$tr'")" \
		"$(q -c "SELECT count(*) FILTER (WHERE label = 'escapes') || ',' || count(*) FILTER (WHERE label = 'big_number')
		                 || ',' || count(*) FILTER (WHERE label = 'dup_payload_key') FROM t28_good WHERE transport = '$tr'")" \
		"$tr: escapes, 1e999 and duplicate payload keys reach the handler as sent (last key wins)"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id WHERE s.topic = '$T'")" 0 \
		"$tr: nothing dead-lettered"
	while IFS='|' read -r kind reason; do
		diag "  $tr $kind: $reason"
	done < <(q -c "SELECT b.kind, left(q.reason, 110) FROM t28_bad b JOIN eventbus.quarantine q ON q.topic = '$T' AND md5(q.raw) = b.md5
	                WHERE b.transport = '$tr' ORDER BY q.id")
done

done_testing
