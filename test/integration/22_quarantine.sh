#!/usr/bin/env bash
# Malformed inbound messages are quarantined with their raw bytes and a
# reason, and consumption continues past them.  On each transport, one topic
# receives (Kafka: all on partition 0, so each message's offset is known)
# 15 kinds of malformed message, each followed by two valid envelopes
# ('after-KIND' v1 and 'chain' vK: one aggregate whose versions run across
# all the bad messages), then valid envelopes that exercise the inbound
# aggregate-id rules (field, else X-Aggregate-ID header, else Kafka key) and
# the optional envelope fields.  Asserted: exactly one quarantine row per
# malformed message at its offset / stream sequence, raw bytes identical,
# non-empty reason, the Kafka key kept; every valid envelope handled once, the
# chain in order; nothing dead-lettered.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t22.kafka.$run"; TN="t22.nats.$run"
TS='2026-01-02T03:04:05.123456Z'
T0=$(q -c "SELECT now()")
W=$(mktemp -d)

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't22.%.$run'; rm -rf '$W'"

q >/dev/null <<'SQL'
DROP TABLE IF EXISTS t22_expect, t22_valid, t22_handled;
CREATE TABLE t22_expect (transport text, kind text, pos bigint, md5 text, len bigint, key text);
CREATE TABLE t22_valid (transport text, event_id uuid, aggregate_id text, version bigint, label text);
CREATE TABLE t22_handled (n bigserial, transport text, topic text, aggregate_id text, event_id uuid, version bigint, env jsonb);
CREATE OR REPLACE FUNCTION t22_handler(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t22_handled (transport, topic, aggregate_id, event_id, version, env)
  VALUES (e.transport, e.topic, e.aggregate_id, e.event_id, e.event_version, to_jsonb(e));
END $$;
SQL

uuid() { cat /proc/sys/kernel/random/uuid; }
# env_ok AGG VERSION UUID — a valid envelope (AGG "" = no aggregate_id field).
env_ok() {
	local agg=""
	[ -n "$1" ] && agg="\"aggregate_id\":\"$1\","
	printf '{"event_id":"%s",%s"event_type":"T22Ok","event_version":%s,"timestamp":"%s","payload":{"ok":true}}' "$3" "$agg" "$2" "$TS"
}

# The malformed kinds: name and body (written to $W/NAME.bin); kinds whose
# key is '-' are sent without a Kafka key (and without any X-Aggregate-ID).
KINDS=(not_json json_array json_string empty_body invalid_utf8 missing_event_id event_id_not_uuid
       missing_event_type event_version_zero event_version_string missing_payload
       aggregate_bad_chars aggregate_too_long no_aggregate_anywhere oversized)
declare -A KEY
mkbody() {   # mkbody KIND — write the body file
	local k=$1 f="$W/$1.bin" u
	u=$(uuid)
	KEY[$k]="q-$k"
	case $k in
	not_json)             printf 'this is not json {"event_id":' >"$f" ;;
	json_array)           printf '[{"event_id":"%s","aggregate_id":"q-json_array"}]' "$u" >"$f" ;;
	json_string)          printf '"just a string"' >"$f" ;;
	empty_body)           : >"$f" ;;
	invalid_utf8)         printf '{"event_id":"%s","aggregate_id":"q-invalid_utf8","event_type":"Bad\xff\xfeType","event_version":1,"timestamp":"%s","payload":{"s":"\xc3\x28"}}' "$u" "$TS" >"$f" ;;
	missing_event_id)     printf '{"aggregate_id":"q-missing_event_id","event_type":"T22Bad","event_version":1,"timestamp":"%s","payload":{}}' "$TS" >"$f" ;;
	event_id_not_uuid)    printf '{"event_id":"not-a-uuid","aggregate_id":"q-event_id_not_uuid","event_type":"T22Bad","event_version":1,"timestamp":"%s","payload":{}}' "$TS" >"$f" ;;
	missing_event_type)   printf '{"event_id":"%s","aggregate_id":"q-missing_event_type","event_version":1,"timestamp":"%s","payload":{}}' "$u" "$TS" >"$f" ;;
	event_version_zero)   printf '{"event_id":"%s","aggregate_id":"q-event_version_zero","event_type":"T22Bad","event_version":0,"timestamp":"%s","payload":{}}' "$u" "$TS" >"$f" ;;
	event_version_string) printf '{"event_id":"%s","aggregate_id":"q-event_version_string","event_type":"T22Bad","event_version":"1","timestamp":"%s","payload":{}}' "$u" "$TS" >"$f" ;;
	missing_payload)      printf '{"event_id":"%s","aggregate_id":"q-missing_payload","event_type":"T22Bad","event_version":1,"timestamp":"%s"}' "$u" "$TS" >"$f" ;;
	aggregate_bad_chars)  KEY[$k]=-
	                      printf '{"event_id":"%s","aggregate_id":"bad agg*!","event_type":"T22Bad","event_version":1,"timestamp":"%s","payload":{}}' "$u" "$TS" >"$f" ;;
	aggregate_too_long)   KEY[$k]=-
	                      printf '{"event_id":"%s","aggregate_id":"%s","event_type":"T22Bad","event_version":1,"timestamp":"%s","payload":{}}' "$u" "$(printf 'a%.0s' $(seq 1 257))" "$TS" >"$f" ;;
	no_aggregate_anywhere) KEY[$k]=-
	                      printf '{"event_id":"%s","event_type":"T22Bad","event_version":1,"timestamp":"%s","payload":{}}' "$u" "$TS" >"$f" ;;
	oversized)            { printf '{"event_id":"%s","aggregate_id":"q-oversized","event_type":"T22Big","event_version":1,"timestamp":"%s","payload":{"blob":"' "$u" "$TS"
	                        head -c 1200000 /dev/zero | tr '\0' 'x'; printf '"}}'; } >"$f" ;;
	esac
}
for k in "${KINDS[@]}"; do mkbody "$k"; done

nats_stream "T22_$run" "$TN" || bail "could not create the NATS stream"
declare -A POS=([kafka]=0 [nats]=1)   # next Kafka offset (partition 0) / stream sequence

expect() {   # expect TRANSPORT KIND — record the message just sent
	local f="$W/$2.bin" key=${KEY[$2]}
	[ "$1" = nats ] && key=-
	printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "${POS[$1]}" "$(md5sum <"$f" | cut -d' ' -f1)" "$(stat -c %s "$f")" \
		"$([ "$key" = - ] && echo '\N' || echo "$key")" >>"$W/expect.tsv"
	POS[$1]=$((POS[$1] + 1))
}
send_bad() {   # send_bad TRANSPORT KIND
	local tr=$1 k=$2 f="$W/$2.bin" key=${KEY[$2]}
	if [ $tr = kafka ]; then
		if [ "$k" = empty_body ]; then
			printf '%s\t\n' "$key" | kafka_produce "$TK" -p 0 2>"$W/err"
		elif [ "$key" = - ]; then
			kafka_produce_file "$TK" "$f" -p 0 2>"$W/err"
		else
			kafka_produce_file "$TK" "$f" -p 0 -k "$key" 2>"$W/err"
		fi
	else
		{ od -An -v -tx1 "$f" | tr -d ' \n'; echo; } | nats_produce "$TN" --hex 2>"$W/err"
	fi
}
# send_ok TRANSPORT LABEL AGG_FIELD VERSION [KAFKA_KEY [HEADER_NAME HEADER_VALUE [EXTRA_JSON]]] —
# one valid envelope; the handler must see aggregate EXPECTED (set by caller).
send_ok() {
	local tr=$1 label=$2 agg=$3 ver=$4 key=${5:-} hn=${6:-} hv=${7:-} extra=${8:-} u body
	u=$(uuid)
	body=$(env_ok "$agg" "$ver" "$u")
	[ -n "$extra" ] && body="${body%\}},$extra}"
	printf '%s|%s|%s|%s|%s\n' "$tr" "$u" "$EXPECT_AGG" "$ver" "$label" >>"$W/valid.psv"
	if [ $tr = kafka ]; then
		local args=(-p 0)
		[ -n "$hn" ] && args+=(-H "$hn=$hv")
		if [ -n "$key" ]; then printf '%s\t%s\n' "$key" "$body"; else printf '%s\n' "$body"; fi | kafka_produce "$TK" "${args[@]}"
	else
		local args=(--msg-id-from-event-id)
		[ -n "$hn" ] && args+=(--header "$hn: $hv")
		printf '%s\n' "$body" | nats_produce "$TN" "${args[@]}"
	fi || bail "could not produce a valid envelope on $tr"
	POS[$tr]=$((POS[$tr] + 1))
}

: >"$W/expect.tsv"; : >"$W/valid.psv"
for tr in kafka nats; do
	i=0
	for k in "${KINDS[@]}"; do
		if send_bad $tr "$k"; then
			expect $tr "$k"
		else
			diag "$tr: the broker/client refused kind $k, skipped: $(head -c 300 "$W/err")"
			continue
		fi
		i=$((i + 1))
		EXPECT_AGG="after-$k"; send_ok $tr "after" "after-$k" 1 "after-$k"
		EXPECT_AGG="chain";    send_ok $tr "chain" chain $i chain
	done
	echo "$i" >"$W/nbad.$tr"
	# Inbound aggregate id: the field wins over header and key; else the
	# X-Aggregate-ID header wins over the key; else the Kafka key.
	EXPECT_AGG="field-agg"; send_ok $tr "field" field-agg 1 other-key X-Aggregate-ID other-hdr
	EXPECT_AGG="hdr-agg";   send_ok $tr "header" "" 1 other-key X-Aggregate-ID hdr-agg
	if [ $tr = kafka ]; then
		EXPECT_AGG="key-agg"; send_ok $tr "key" "" 1 key-agg
	fi
	# Optional envelope fields and a custom header reach the handler.
	EXPECT_AGG="full-agg"; send_ok $tr "full" full-agg 1 full-agg X-Custom yes \
		'"trace_id":"trace-22","correlation_id":"corr-22","tenant_id":42'
done
diag "malformed kinds sent: kafka $(cat "$W/nbad.kafka"), nats $(cat "$W/nbad.nats")"

q -c "\\copy t22_expect FROM '$W/expect.tsv'" >/dev/null
q -c "\\copy t22_valid FROM '$W/valid.psv' WITH (FORMAT csv, DELIMITER '|')" >/dev/null
nvalid=$(q -c "SELECT count(*) FROM t22_valid")
nbad=$(q -c "SELECT count(*) FROM t22_expect")

# The test's bookkeeping matches what the brokers hold.
is "$(kcat -C -b "$EVENTBUS_KAFKA_BROKERS" -t "$TK" -p 0 -o beginning -e -q -f '%o\n' | wc -l)" "${POS[kafka]}" \
	"kafka: partition 0 holds the ${POS[kafka]} messages sent"
is "$(kcat -C -b "$EVENTBUS_KAFKA_BROKERS" -t "$TK" -o beginning -e -q -f '%p\n' | sort -u | tr '\n' ' ')" "0 " \
	"kafka: every message on partition 0 (offsets known)"
is "$(nats_dump "$TN" | wc -l)" "$((POS[nats] - 1))" "nats: the stream holds the $((POS[nats] - 1)) messages sent"

subs=$(q -c "SELECT eventbus_subscribe('$TK', 't22_handler(eventbus.envelope)', 'kafka'), eventbus_subscribe('$TN', 't22_handler(eventbus.envelope)', 'nats')")
ok "$([[ $subs =~ ^[0-9]+\|[0-9]+$ ]]; echo $?)" "subscribed on both transports ($subs)"

all_seen() {
	[ "$(q -c "SELECT count(*) FROM t22_handled WHERE topic IN ('$TK', '$TN')")" -ge "$nvalid" ] &&
	[ "$(q -c "SELECT count(*) FROM eventbus.quarantine WHERE topic IN ('$TK', '$TN')")" -ge "$nbad" ]
}
wait_until 90 all_seen
ok $? "all $nvalid valid envelopes handled and $nbad malformed messages quarantined"
sleep 2

for tr in kafka nats; do
	T="t22.$tr.$run"
	if [ $tr = kafka ]; then at="q.kafka_partition = 0 AND q.kafka_offset = e.pos"; else at="q.stream_sequence = e.pos"; fi
	is "$(q -c "SELECT count(*) FROM eventbus.quarantine WHERE topic = '$T'")" "$(q -c "SELECT count(*) FROM t22_expect WHERE transport = '$tr'")" \
		"$tr: one quarantine row per malformed message, no more"
	for k in $(q -c "SELECT kind FROM t22_expect WHERE transport = '$tr' ORDER BY pos"); do
		is "$(q -c "SELECT count(q.id) || '|' || coalesce(bool_and(md5(q.raw) = e.md5 AND octet_length(q.raw) = e.len), false)
		                    || '|' || coalesce(bool_and(length(btrim(q.reason)) > 0), false) || '|' || coalesce(bool_and(q.transport = '$tr'), false)
		             FROM t22_expect e LEFT JOIN eventbus.quarantine q ON q.topic = '$T' AND $at
		            WHERE e.transport = '$tr' AND e.kind = '$k' GROUP BY e.kind")" "1|true|true|true" \
			"$tr $k: quarantined once at its $([ $tr = kafka ] && echo offset || echo sequence), raw bytes identical, reason given"
		diag "   reason: $(q -c "SELECT left(q.reason, 150) FROM t22_expect e JOIN eventbus.quarantine q ON q.topic = '$T' AND $at WHERE e.transport = '$tr' AND e.kind = '$k'")"
	done
	if [ $tr = kafka ]; then
		is "$(q -c "SELECT count(*) FROM t22_expect e JOIN eventbus.quarantine q ON q.topic = '$T' AND $at
		             WHERE e.transport = 'kafka' AND q.message_key IS DISTINCT FROM convert_to(e.key, 'UTF8')")" "0" \
			"kafka: message_key is the Kafka key as sent (NULL when none)"
	fi
	is "$(q -c "SELECT count(*) FROM t22_handled WHERE topic = '$T'")" "$(q -c "SELECT count(*) FROM t22_valid WHERE transport = '$tr'")" \
		"$tr: every valid envelope handled, no extra call"
	is "$(q -c "SELECT count(*) FROM t22_valid v WHERE transport = '$tr' AND (SELECT count(*) FROM t22_handled h WHERE h.event_id = v.event_id) <> 1")" "0" \
		"$tr: each valid envelope handled exactly once (none lost behind a malformed one)"
	is "$(q -c "SELECT count(*) FROM t22_valid v JOIN t22_handled h USING (event_id) WHERE v.transport = '$tr' AND h.aggregate_id IS DISTINCT FROM v.aggregate_id")" "0" \
		"$tr: aggregate ids as expected (field, else X-Aggregate-ID header, else key)"
	is "$(q -c "SELECT vs = ARRAY(SELECT generate_series(1, $(cat "$W/nbad.$tr"))::bigint) FROM (SELECT array_agg(version ORDER BY n) vs FROM t22_handled WHERE topic = '$T' AND aggregate_id = 'chain') x")" "t" \
		"$tr: the 'chain' aggregate, interleaved with the malformed messages, handled 1..$(cat "$W/nbad.$tr") in order"
	for lbl in field header key; do
		[ $tr = nats ] && [ $lbl = key ] && continue
		is "$(q -c "SELECT h.aggregate_id FROM t22_valid v JOIN t22_handled h USING (event_id) WHERE v.transport = '$tr' AND v.label = '$lbl'")" \
			"$(q -c "SELECT aggregate_id FROM t22_valid WHERE transport = '$tr' AND label = '$lbl'")" "$tr: aggregate id from the $lbl"
	done
	is "$(q -c "SELECT concat_ws(',', env->>'event_type', env->>'event_version', env->>'trace_id', env->>'correlation_id', env->>'tenant_id',
	                           env->>'transport', env->>'topic', (env->>'occurred_at')::timestamptz = '$TS'::timestamptz, env->'payload')
	             FROM t22_valid v JOIN t22_handled h USING (event_id) WHERE v.transport = '$tr' AND v.label = 'full'")" \
		"T22Ok,1,trace-22,corr-22,42,$tr,$T,t,{\"ok\": true}" "$tr: optional envelope fields, topic, transport and occurred_at reach the handler"
	is "$(q -c "SELECT env->'headers'->>'X-Custom' FROM t22_valid v JOIN t22_handled h USING (event_id) WHERE v.transport = '$tr' AND v.label = 'full'")" \
		"yes" "$tr: message headers reach the handler in envelope.headers"
	is "$(q -c "SELECT count(*) FROM t22_handled WHERE topic = '$T' AND ((env->>'received_at')::timestamptz IS NULL
	                    OR (env->>'received_at')::timestamptz NOT BETWEEN '$T0'::timestamptz AND now())")" "0" \
		"$tr: envelope.received_at is when the dispatcher took each message (after the test started, before now)"
	is "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id WHERE s.topic = '$T'")" "0" \
		"$tr: nothing dead-lettered"
done

# Kafka header values are bytes: one holding a NUL byte is not text.  It must
# not be cut at the NUL (which would silently turn X-Aggregate-ID "nul\0evil"
# into the valid aggregate "nul"): as X-Aggregate-ID it quarantines the
# message; any other such header is left out of envelope.headers.
T="t22.kafka.$run"
printf '{"event_id":"%s","event_type":"T22Nul","event_version":1,"timestamp":"%s","payload":{}}' "$(uuid)" "$TS" >"$W/nul_agg.bin"
nul_agg_at=${POS[kafka]}
"$KAFKARAW" "$EVENTBUS_KAFKA_BROKERS" "$TK" 0 "$W/nul_agg.bin" "X-Aggregate-ID=6e756c006576696c" || bail "kafkaraw failed"
POS[kafka]=$((POS[kafka] + 1))
nul_ok_id=$(uuid)
printf '{"event_id":"%s","aggregate_id":"nul-ok","event_type":"T22Nul","event_version":1,"timestamp":"%s","payload":{}}' "$nul_ok_id" "$TS" >"$W/nul_ok.bin"
"$KAFKARAW" "$EVENTBUS_KAFKA_BROKERS" "$TK" 0 "$W/nul_ok.bin" "X-Bin=6162006364" "X-Text=746578742d6f6b" || bail "kafkaraw failed"
wait_until 30 "[ \"\$(q -c \"SELECT count(*) FROM t22_handled WHERE event_id = '$nul_ok_id'\")\" = 1 ]"
ok $? "kafka: a message with a NUL byte in a header value is handled (its aggregate id from the envelope)"
is "$(q -c "SELECT count(*) || '|' || coalesce(bool_and(reason LIKE '%aggregate%'), false) FROM eventbus.quarantine WHERE topic = '$T' AND kafka_offset = $nul_agg_at")" "1|true" \
	"kafka: X-Aggregate-ID with a NUL byte quarantines the message (reason: $(q -c "SELECT left(reason, 100) FROM eventbus.quarantine WHERE topic = '$T' AND kafka_offset = $nul_agg_at"))"
is "$(q -c "SELECT count(*) FROM t22_handled WHERE topic = '$T' AND aggregate_id = 'nul'")" 0 \
	"kafka: ... and it was not handled as aggregate 'nul' (the value cut at the NUL)"
is "$(q -c "SELECT coalesce(env->'headers'->>'X-Bin', '(absent)') || '|' || (env->'headers'->>'X-Text') FROM t22_handled WHERE event_id = '$nul_ok_id'")" "(absent)|text-ok" \
	"kafka: a header value with a NUL byte is left out of envelope.headers (not cut), the text one is kept"

done_testing
