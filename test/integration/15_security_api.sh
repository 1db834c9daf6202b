#!/usr/bin/env bash
# Attacks on the SQL API, the configuration and the catalog; each must fail
# (right SQLSTATE) and leave nothing changed, counted from the database.
#
#  1 shadow     t15_atk (NOLOGIN, EXECUTE on every API function, its own
#               schema) defines =(text,text), =(bigint,bigint), =(oid,oid),
#               =(regprocedure,regprocedure) and a few more operators, now(),
#               clock_timestamp(), count(*), pg_has_role(), ... whose bodies
#               write current_user into a canary table and try ALTER ROLE
#               t15_atk SUPERUSER; then calls every API function with
#               search_path = t15_atk, pg_catalog (and, as its role default,
#               for its own handlers in the pool).  No shadowing object may
#               run, under any role; t15_atk stays a plain role.
#  2 takeover   B subscribes A's (topic, transport, handler): 42501, owner A.
#  3 unsubscribe B unsubscribes A's subscription: 42501; a member of A and a
#               superuser can.
#  4 resubscribe by the owner / a member / a superuser: max_attempts updated,
#               owner kept.
#  5 read       B reads A's dead letters (eventbus_dead_letters, tables): 42501.
#  6 replay     B replays A's dead letter: 42501, dead letter and handler
#               untouched.
#  7 status     not executable by a plain role; a pg_monitor member sees only
#               the subscriptions of roles it is a member of.
#  8 settings   nats_url, kafka_properties, nats_token, nats_credentials_file
#               hidden from a plain role (SHOW, current_setting, pg_settings).
#  9 nats creds URL credentials never shown in eventbus_status() or the log.
# 10 kafka props property values never echoed (status, log at debug1); '\;'
#               is a literal semicolon.
# 11 mandatory  properties eventbus sets itself are refused (22023).
# 12 drop role  DROP ROLE of a subscription owner: 2BP01; REASSIGN OWNED /
#               DROP OWNED move / remove its subscriptions.
# 13 drop fn    DROP FUNCTION of a subscribed handler: 2BP01; CASCADE (and
#               DROP SCHEMA ... CASCADE) removes the subscription.
# 14 orphan     a role dropped from another database: its subscription is
#               not run any more, shown as 'owner dropped', a superuser can
#               unsubscribe it (or the drop is refused with 2BP01).
#
# Roles are cluster-wide: every t15_* role is dropped at start and at exit.
# Settings changed with ALTER SYSTEM are put back as they were in
# postgresql.auto.conf (RESET if they were not there) at exit.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
ROLES="t15_atk t15_a t15_b t15_c t15_mon t15_plain t15_d t15_d2 t15_e"
TMP15=$(mktemp -d)
API_FUNCS="eventbus_publish eventbus_subscribe eventbus_unsubscribe eventbus_replay_dead_letter eventbus_status eventbus_dead_letters"
SECRET_GUCS="eventbus.nats_url eventbus.kafka_properties eventbus.nats_token eventbus.nats_credentials_file"

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# as_role ROLE SQL... — run SQL as ROLE (SET ROLE) in one session.
as_role() {
	local r=$1 s args=(); shift
	args=(-c "SET ROLE $r")
	for s in "$@"; do args+=(-c "$s"); done
	psql -X -A -t -q -v ON_ERROR_STOP=1 "${args[@]}" 2>&1
}
# as_role1 ROLE SQL — first line only (a value, or the first line of an error).
as_role1() { as_role "$@" | head -1; }
# err_of SQL... — like sqlstate_of, but prints "SQLSTATE<TAB>whole error text" (one line).
err_of() {
	local args=() s err
	for s in "$@"; do args+=(-c "$s"); done
	err=$(psql -X -A -t -q -v ON_ERROR_STOP=1 -v VERBOSITY=verbose "${args[@]}" 2>&1 >/dev/null | tr '\n' ' ')
	if [[ $err =~ ERROR:\ +([0-9A-Z]{5}) ]]; then printf '%s\t%s\n' "${BASH_REMATCH[1]}" "$err"; else printf 'ok\t%s\n' "$err"; fi
}
# grant_api ROLE FUNC... — EXECUTE on every overload of the named functions that exists.
grant_api() {
	local r=$1; shift
	q -c "DO \$\$ DECLARE f regprocedure; BEGIN
	        FOR f IN SELECT p.oid::regprocedure FROM pg_proc p WHERE p.proname = ANY ('{$(echo "$*" | tr ' ' ',')}'::text[]) LOOP
	          EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO $r', f);
	        END LOOP; END \$\$" >/dev/null
}
revoke_api() {
	local r=$1; shift
	q -c "DO \$\$ DECLARE f regprocedure; BEGIN
	        FOR f IN SELECT p.oid::regprocedure FROM pg_proc p WHERE p.proname = ANY ('{$(echo "$*" | tr ' ' ',')}'::text[]) LOOP
	          EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM $r', f);
	        END LOOP; END \$\$" >/dev/null
}
canary_count() { q -c "SELECT count(*) FROM public.t15_canary"; }
sub_row() {   # sub_row ID — "role|max_attempts" of a subscription, empty if none
	q -c "SELECT role_id::regrole || '|' || max_attempts FROM eventbus.subscriptions WHERE id = $1"
}
sub_count() { q -c "SELECT count(*) FROM eventbus.subscriptions WHERE id = $1"; }
sub_id() {   # sub_id TOPIC HANDLER_OID
	q -c "SELECT id FROM eventbus.subscriptions WHERE topic = '$1' AND transport = 'nats' AND handler = $2::regprocedure"
}
role_oid() { q -c "SELECT oid FROM pg_roles WHERE rolname = '$1'"; }
fail_calls() { q -c "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.t15_calls"; }
log_size() { stat -c %s "$EVENTBUS_PG_LOG" 2>/dev/null || echo 0; }
log_since() { tail -c +$(($1 + 1)) "$EVENTBUS_PG_LOG" 2>/dev/null; }
# shadow_is SQL EXPECTED DESCRIPTION — SQL as t15_atk under the shadowing
# search_path; got = "SQLSTATE or ok|trap warnings seen by the caller|canary rows added".
shadow_is() {
	local before after out st traps
	before=$(canary_count)
	out=$(psql -X -A -t -q -v ON_ERROR_STOP=1 -v VERBOSITY=verbose \
		-c "SET ROLE t15_atk" -c "SET search_path = t15_atk, pg_catalog" -c "$1" 2>&1)
	after=$(canary_count)
	if [[ $out =~ ERROR:\ +([0-9A-Z]{5}) ]]; then st=${BASH_REMATCH[1]}; else st=ok; fi
	traps=$(grep -c 't15-trap' <<<"$out")
	is "$st|$traps|$((after - before))" "$2" "$3"
	if [ "$st|$traps|$((after - before))" != "$2" ]; then
		grep -E 'ERROR|t15-trap' <<<"$out" | sort | uniq -c | head -5 | sed 's/^/#     /'
	fi
}

# Settings: remember how postgresql.auto.conf had them, put them back at exit.
declare -A SAVED=()
save_setting() {   # save_setting NAME — once
	local n=$1 c
	[ -n "${SAVED[$n]+x}" ] && return 0
	c=$(q -c "SELECT count(*) FROM pg_file_settings WHERE name = '$n' AND sourcefile LIKE '%/postgresql.auto.conf'")
	if [ "$c" = 0 ]; then SAVED[$n]="unset"
	else SAVED[$n]="set:$(q -c "SELECT setting FROM pg_file_settings WHERE name = '$n' AND sourcefile LIKE '%/postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1")"; fi
}
restore_setting() {   # restore_setting NAME — back to the saved state (no reload)
	local n=$1 v
	[ -n "${SAVED[$n]+x}" ] || return 0
	if [ "${SAVED[$n]}" = unset ]; then q -c "ALTER SYSTEM RESET $n" >/dev/null
	else v=${SAVED[$n]#set:}; q -c "ALTER SYSTEM SET $n = '${v//\'/\'\'}'" >/dev/null; fi
}
reload() { q -c "SELECT pg_reload_conf()" >/dev/null; sleep 1; }

drop_roles() {
	local r
	for r in $ROLES; do
		q -c "DO \$\$ BEGIN
		        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$r') THEN
		          EXECUTE 'DROP OWNED BY $r CASCADE'; EXECUTE 'DROP ROLE $r';
		        END IF; END \$\$" >/dev/null 2>&1
	done
}
t15_cleanup() {
	local n
	unsubscribe_like 't15.%'
	for n in "${!SAVED[@]}"; do restore_setting "$n"; done
	[ ${#SAVED[@]} -gt 0 ] && q -c "SELECT pg_reload_conf()" >/dev/null
	drop_roles
	q -c "DROP SCHEMA IF EXISTS t15_dropme CASCADE" -c "DROP TABLE IF EXISTS public.t15_canary, public.t15_ran" \
	  -c "DROP SEQUENCE IF EXISTS public.t15_calls" >/dev/null
	rm -rf "$TMP15"
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

# Leftovers of an earlier run: settings an interrupted run left in
# postgresql.auto.conf (before consumer_setup records the Kafka properties),
# subscriptions, roles (cluster-wide).
leftover=0
if q -c "SELECT setting FROM pg_file_settings WHERE name = 'eventbus.nats_url' AND sourcefile LIKE '%/postgresql.auto.conf'" | grep -q t15user; then
	q -c "ALTER SYSTEM RESET eventbus.nats_url" >/dev/null; leftover=1
fi
if q -c "SELECT setting FROM pg_file_settings WHERE name = 'eventbus.kafka_properties' AND sourcefile LIKE '%/postgresql.auto.conf'" |
	grep -qE 't15Rack|enable\.idempotence|log\.queue|enable\.auto\.offset\.store|group\.id|partitioner|metadata\.broker|bootstrap|acks'; then
	q -c "ALTER SYSTEM RESET eventbus.kafka_properties" >/dev/null; leftover=1
fi
# (the reload restarts the dispatcher, perhaps after a long backoff)
[ $leftover = 1 ] && { reload; wait_until 90 dispatcher_running; }

consumer_setup
CONSUMER_CLEANUP="t15_cleanup"
unsubscribe_like 't15.%' >/dev/null
drop_roles

q >/dev/null <<'SQL'
DROP SCHEMA IF EXISTS t15_dropme CASCADE;
DROP TABLE IF EXISTS public.t15_canary, public.t15_ran;
DROP SEQUENCE IF EXISTS public.t15_calls;
CREATE TABLE public.t15_canary (who text, what text, at timestamptz DEFAULT pg_catalog.clock_timestamp());
GRANT INSERT ON public.t15_canary TO PUBLIC;
CREATE TABLE public.t15_ran (sub text, who text, event_id uuid);
GRANT INSERT ON public.t15_ran TO PUBLIC;
-- Non-transactional: counts handler calls even when the handler then fails.
CREATE SEQUENCE public.t15_calls;
GRANT USAGE ON SEQUENCE public.t15_calls TO PUBLIC;

CREATE OR REPLACE FUNCTION public.t15_h_ok(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
CREATE OR REPLACE FUNCTION public.t15_h_fail(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_catalog.nextval('public.t15_calls');
  RAISE EXCEPTION 't15 deliberate failure' USING ERRCODE = 'EB015';
END $$;
CREATE OR REPLACE FUNCTION public.t15_h_drop(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
CREATE OR REPLACE FUNCTION public.t15_h_ctl(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.t15_ran VALUES ('ctl', current_user, e.event_id); END $$;
CREATE OR REPLACE FUNCTION public.t15_h_orphan(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.t15_ran VALUES ('orphan', current_user, e.event_id); END $$;
CREATE SCHEMA t15_dropme;
CREATE FUNCTION t15_dropme.h(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;

CREATE ROLE t15_atk NOLOGIN;
CREATE ROLE t15_a NOLOGIN;
CREATE ROLE t15_b NOLOGIN;
CREATE ROLE t15_c NOLOGIN;
CREATE ROLE t15_mon NOLOGIN;
CREATE ROLE t15_plain NOLOGIN;
CREATE ROLE t15_d NOLOGIN;
CREATE ROLE t15_d2 NOLOGIN;
CREATE ROLE t15_e NOLOGIN;
GRANT t15_a TO t15_c;
GRANT pg_monitor TO t15_mon;
CREATE SCHEMA t15_atk AUTHORIZATION t15_atk;
SQL
grant_api t15_atk $API_FUNCS
for r in t15_a t15_b t15_c; do grant_api $r eventbus_subscribe eventbus_unsubscribe eventbus_replay_dead_letter eventbus_dead_letters; done
for r in t15_d t15_e; do grant_api $r eventbus_subscribe; done

# The attacker's objects, created by the attacker.  Comparison operators give
# the right answer (so nothing breaks visibly), privilege functions say yes.
{
	echo "SET ROLE t15_atk;"
	cat <<'SQL'
CREATE FUNCTION t15_atk.trap(what text) RETURNS void LANGUAGE plpgsql SECURITY INVOKER AS $f$
BEGIN
  RAISE WARNING 't15-trap: % ran as %', what, current_user;
  BEGIN
    INSERT INTO public.t15_canary (who, what) VALUES (current_user, what);
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  BEGIN
    EXECUTE 'ALTER ROLE t15_atk SUPERUSER';
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
END $f$;
SQL
	n=0
	# OPERATOR LEFT RIGHT RESULT EXPRESSION(a, b)
	while read -r op l r res expr; do
		n=$((n + 1))
		cat <<SQL
CREATE FUNCTION t15_atk.op$n(a $l, b $r) RETURNS $res LANGUAGE plpgsql AS \$f\$
BEGIN PERFORM t15_atk.trap('$op($l,$r)'); RETURN $expr; END \$f\$;
CREATE OPERATOR t15_atk.$op (LEFTARG = $l, RIGHTARG = $r, FUNCTION = t15_atk.op$n);
SQL
	done <<'OPS'
= text text boolean pg_catalog.texteq(a, b)
= name name boolean pg_catalog.nameeq(a, b)
= bigint bigint boolean pg_catalog.int8eq(a, b)
= integer integer boolean pg_catalog.int4eq(a, b)
= oid oid boolean pg_catalog.oideq(a, b)
= regprocedure regprocedure boolean pg_catalog.oideq(a::pg_catalog.oid, b::pg_catalog.oid)
= uuid uuid boolean pg_catalog.uuid_eq(a, b)
< timestamptz timestamptz boolean pg_catalog.timestamptz_lt(a, b)
+ integer integer integer pg_catalog.int4pl(a, b)
+ bigint bigint bigint pg_catalog.int8pl(a, b)
- bigint bigint bigint pg_catalog.int8mi(a, b)
- timestamptz interval timestamptz pg_catalog.timestamptz_mi_interval(a, b)
|| text text text pg_catalog.textcat(a, b)
OPS
	for f in now clock_timestamp statement_timestamp transaction_timestamp; do
		echo "CREATE FUNCTION t15_atk.$f() RETURNS timestamptz LANGUAGE plpgsql AS \$f\$ BEGIN PERFORM t15_atk.trap('$f()'); RETURN pg_catalog.$f(); END \$f\$;"
	done
	for sig in "name, name, text" "name, oid, text" "oid, name, text" "oid, oid, text" "name, text" "oid, text"; do
		echo "CREATE FUNCTION t15_atk.pg_has_role($sig) RETURNS boolean LANGUAGE plpgsql AS \$f\$ BEGIN PERFORM t15_atk.trap('pg_has_role($sig)'); RETURN true; END \$f\$;"
	done
	for sig in "name, text, text" "name, oid, text" "oid, text, text" "oid, oid, text" "text, text" "oid, text"; do
		echo "CREATE FUNCTION t15_atk.has_function_privilege($sig) RETURNS boolean LANGUAGE plpgsql AS \$f\$ BEGIN PERFORM t15_atk.trap('has_function_privilege($sig)'); RETURN true; END \$f\$;"
	done
	cat <<'SQL'
CREATE FUNCTION t15_atk.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS $f$ BEGIN PERFORM t15_atk.trap('pg_notify(text,text)'); END $f$;
CREATE FUNCTION t15_atk.cnt_sf(bigint) RETURNS bigint LANGUAGE plpgsql AS $f$
BEGIN PERFORM t15_atk.trap('count(*)'); RETURN pg_catalog.int8inc($1); END $f$;
CREATE FUNCTION t15_atk.cnt_ff(bigint) RETURNS bigint LANGUAGE plpgsql AS $f$
BEGIN PERFORM t15_atk.trap('count(*)'); RETURN $1; END $f$;
CREATE AGGREGATE t15_atk.count(*) (SFUNC = t15_atk.cnt_sf, STYPE = bigint, FINALFUNC = t15_atk.cnt_ff, INITCOND = '0');
-- The attacker's own handlers; the role default makes the pool run them
-- (and anything it does in their GUC nest) with the shadowing search_path.
CREATE FUNCTION t15_atk.h_ok(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $f$ BEGIN NULL; END $f$;
CREATE FUNCTION t15_atk.h_fail(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN RAISE EXCEPTION 't15 attacker handler fails'; END $f$;
ALTER ROLE t15_atk SET search_path = t15_atk, pg_catalog;
SQL
} >"$TMP15/atk.sql"
out=$(q -f "$TMP15/atk.sql")
[ -z "$out" ] || { echo "$out" | sed 's/^/# /'; bail "could not create the attacker's objects"; }

H_OK=$(q -c "SELECT 'public.t15_h_ok(eventbus.envelope)'::regprocedure::oid")
H_FAIL=$(q -c "SELECT 'public.t15_h_fail(eventbus.envelope)'::regprocedure::oid")
H_DROP=$(q -c "SELECT 'public.t15_h_drop(eventbus.envelope)'::regprocedure::oid")
H_CTL=$(q -c "SELECT 'public.t15_h_ctl(eventbus.envelope)'::regprocedure::oid")
H_ORPHAN=$(q -c "SELECT 'public.t15_h_orphan(eventbus.envelope)'::regprocedure::oid")
H_SCHEMA=$(q -c "SELECT 't15_dropme.h(eventbus.envelope)'::regprocedure::oid")
HA_OK=$(q -c "SELECT 't15_atk.h_ok(eventbus.envelope)'::regprocedure::oid")
HA_FAIL=$(q -c "SELECT 't15_atk.h_fail(eventbus.envelope)'::regprocedure::oid")
is "$(canary_count)" "0" "setup: canary empty, attacker's operators, functions and handlers in place"

nats_stream "T15_$run" "t15.*.$run" || bail "could not create the NATS stream"
T_ATK="t15.atk.$run"; T_DL="t15.dl.$run"; T_TAKE="t15.take.$run"; T_UNSUB="t15.unsub.$run"
T_RESUB="t15.resub.$run"; T_DROPROLE="t15.droprole.$run"; T_DROPFN="t15.dropfn.$run"
T_DROPSCHEMA="t15.dropschema.$run"; T_ORPHAN="t15.orphan.$run"; T_BOWN="t15.bown.$run"; T_VICTIM="t15.victim.$run"

# A's subscriptions (one per attack, so a successful attack does not spoil the next).
ids=$(as_role t15_a "SELECT eventbus_subscribe('$T_DL', $H_FAIL::regprocedure, 'nats', 1),
                            eventbus_subscribe('$T_TAKE', $H_OK::regprocedure, 'nats', 3),
                            eventbus_subscribe('$T_UNSUB', $H_OK::regprocedure, 'nats', 3),
                            eventbus_subscribe('$T_RESUB', $H_OK::regprocedure, 'nats', 3),
                            eventbus_subscribe('$T_DROPFN', $H_DROP::regprocedure, 'nats', 3),
                            eventbus_subscribe('$T_DROPSCHEMA', $H_SCHEMA::regprocedure, 'nats', 3),
                            eventbus_subscribe('$T_ORPHAN', $H_CTL::regprocedure, 'nats', 3),
                            eventbus_subscribe('$T_VICTIM', $H_OK::regprocedure, 'nats', 3)")
IFS='|' read -r S_DL S_TAKE S_UNSUB S_RESUB S_DROPFN S_DROPSCHEMA S_CTL S_VICTIM <<<"$ids"
ok "$([[ $ids =~ ^[0-9]+(\|[0-9]+){7}$ ]]; echo $?)" "setup: t15_a subscribed 8 handlers ($ids)"
S_DROPROLE=$(as_role t15_d "SELECT eventbus_subscribe('$T_DROPROLE', $H_OK::regprocedure, 'nats', 3)")
S_ORPHAN=$(as_role t15_e "SELECT eventbus_subscribe('$T_ORPHAN', $H_ORPHAN::regprocedure, 'nats', 3)")
ok "$([[ $S_DROPROLE =~ ^[0-9]+$ && $S_ORPHAN =~ ^[0-9]+$ ]]; echo $?)" "setup: t15_d and t15_e subscribed ($S_DROPROLE, $S_ORPHAN)"
# Without these grants DROP ROLE would fail for them anyway (2BP01 for the privileges).
revoke_api t15_d eventbus_subscribe
revoke_api t15_e eventbus_subscribe
# The API functions live in the extension's schema, which the attacker's
# search_path leaves out: its calls name it.
X=$(q -c "SELECT quote_ident(extnamespace::regnamespace::text) FROM pg_extension WHERE extname = 'eventbus'")

# ---------------------------------------------------------------------------
# 1. shadowing, first part: the attacker subscribes its handlers and publishes
# ---------------------------------------------------------------------------
shadow_is "SELECT $X.eventbus_subscribe('$T_ATK', $HA_OK::regprocedure, 'nats', 1)" "ok|0|0" \
	"1 shadow: eventbus_subscribe (new subscription) uses none of the caller's operators/functions"
shadow_is "SELECT $X.eventbus_subscribe('$T_ATK', $HA_FAIL::regprocedure, 'nats', 1)" "ok|0|0" \
	"1 shadow: eventbus_subscribe (second handler) uses none of the caller's operators/functions"
S_ATK_OK=$(sub_id "$T_ATK" "$HA_OK"); S_ATK_FAIL=$(sub_id "$T_ATK" "$HA_FAIL")
if ! [[ $S_ATK_OK =~ ^[0-9]+$ && $S_ATK_FAIL =~ ^[0-9]+$ ]]; then   # keep going without the shadowing path
	as_role t15_atk "SET search_path = pg_catalog" "SELECT $X.eventbus_subscribe('$T_ATK', $HA_OK::regprocedure, 'nats', 1),
	                        $X.eventbus_subscribe('$T_ATK', $HA_FAIL::regprocedure, 'nats', 1)" >/dev/null
	S_ATK_OK=$(sub_id "$T_ATK" "$HA_OK"); S_ATK_FAIL=$(sub_id "$T_ATK" "$HA_FAIL")
fi
shadow_is "SELECT $X.eventbus_publish('$T_ATK', 'atk-1', 'T15Atk', '{}', 'nats')" "ok|0|0" \
	"1 shadow: eventbus_publish uses none of the caller's operators/functions"
shadow_is "SELECT component FROM $X.eventbus_status()" "ok|0|0" \
	"1 shadow: eventbus_status() uses none of the caller's operators/functions"
shadow_is "SELECT id FROM $X.eventbus_dead_letters()" "ok|0|0" \
	"1 shadow: eventbus_dead_letters() uses none of the caller's operators/functions"
shadow_is "SELECT $X.eventbus_subscribe('$T_VICTIM', $H_OK::regprocedure, 'nats', 9)" "42501|0|0" \
	"1 shadow: taking over A's subscription with pg_has_role()/= shadowed: 42501, nothing ran"
shadow_is "SELECT $X.eventbus_unsubscribe('$T_VICTIM', $H_OK::regprocedure, 'nats')" "42501|0|0" \
	"1 shadow: unsubscribing A's subscription with pg_has_role()/= shadowed: 42501, nothing ran"
is "$(sub_row "$S_VICTIM")" "t15_a|3" "1 shadow: A's subscription untouched (owner t15_a, max_attempts 3)"

# A's dead letter (attacks 5, 6): one event to the always-failing handler.
ok "$([[ $(q -c "SELECT eventbus_publish('$T_DL', 'dl-1', 'T15Dl', '{}', 'nats') IS NOT NULL") = t ]]; echo $?)" \
	"setup: published one event for A's failing handler (max_attempts 1)"

# ---------------------------------------------------------------------------
# 2. takeover
# ---------------------------------------------------------------------------
is "$(sqlstate_of "SET ROLE t15_b" "SELECT eventbus_subscribe('$T_TAKE', $H_OK::regprocedure, 'nats', 7)")" "42501" \
	"2 takeover: B subscribing A's (topic, transport, handler) fails with 42501"
is "$(sub_row "$S_TAKE")" "t15_a|3" "2 takeover: the subscription is still owned by t15_a, max_attempts unchanged"
out=$(as_role t15_b "SELECT eventbus_subscribe('$T_BOWN', $H_OK::regprocedure, 'nats', 2)" \
	"SELECT eventbus_unsubscribe('$T_BOWN', $H_OK::regprocedure, 'nats')")
ok "$([[ $(head -1 <<<"$out") =~ ^[0-9]+$ && $(tail -1 <<<"$out") = t ]]; echo $?)" "2 takeover: control: B can subscribe and unsubscribe a subscription of its own"

# ---------------------------------------------------------------------------
# 3. unsubscribe of another role's subscription
# ---------------------------------------------------------------------------
is "$(sqlstate_of "SET ROLE t15_b" "SELECT eventbus_unsubscribe('$T_UNSUB', $H_OK::regprocedure, 'nats')")" "42501" \
	"3 unsubscribe: B unsubscribing A's subscription fails with 42501"
is "$(sub_row "$S_UNSUB")" "t15_a|3" "3 unsubscribe: the subscription is still there, owned by t15_a"
is "$(as_role1 t15_c "SELECT eventbus_unsubscribe('$T_UNSUB', $H_OK::regprocedure, 'nats')")|$(sub_count "$S_UNSUB")" "t|0" \
	"3 unsubscribe: C, a member of A, can unsubscribe it"
S_UNSUB2=$(as_role t15_a "SELECT eventbus_subscribe('$T_UNSUB', $H_OK::regprocedure, 'nats', 3)")
is "$(q -c "SELECT eventbus_unsubscribe('$T_UNSUB', $H_OK::regprocedure, 'nats')")|$(q -c "SELECT count(*) FROM eventbus.subscriptions WHERE topic = '$T_UNSUB'")" "t|0" \
	"3 unsubscribe: a superuser can unsubscribe A's subscription ($S_UNSUB2)"

# ---------------------------------------------------------------------------
# 4. resubscribe keeps the owner
# ---------------------------------------------------------------------------
is "$(as_role1 t15_a "SELECT eventbus_subscribe('$T_RESUB', $H_OK::regprocedure, 'nats', 5)")|$(sub_row "$S_RESUB")" "$S_RESUB|t15_a|5" \
	"4 resubscribe: by the owner: same id, max_attempts 5, owner t15_a"
is "$(as_role1 t15_c "SELECT eventbus_subscribe('$T_RESUB', $H_OK::regprocedure, 'nats', 6)")|$(sub_row "$S_RESUB")" "$S_RESUB|t15_a|6" \
	"4 resubscribe: by C (member of A): max_attempts 6, owner still t15_a"
is "$(q -c "SELECT eventbus_subscribe('$T_RESUB', $H_OK::regprocedure, 'nats', 9)")|$(sub_row "$S_RESUB")" "$S_RESUB|t15_a|9" \
	"4 resubscribe: by a superuser: max_attempts 9, owner still t15_a"

# ---------------------------------------------------------------------------
# dead letters: A's, and the attacker's (handled by the pool with the
# attacker's role default search_path)
# ---------------------------------------------------------------------------
dl_ready() {
	[ "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE subscription_id IN ($S_DL, ${S_ATK_FAIL:-0})")" -ge 2 ] &&
	[ "$(q -c "SELECT count(*) FROM eventbus.inbox WHERE subscription_id = ${S_ATK_OK:-0} AND outcome = 'handled'")" -ge 1 ]
}
pool0=$(canary_count)
wait_until 60 dl_ready
ok $? "setup: A's and the attacker's events dead-lettered, the attacker's other handler ran"
DL_A=$(q -c "SELECT min(id) FROM eventbus.dead_letters WHERE subscription_id = $S_DL")
DL_ATK=$(q -c "SELECT min(id) FROM eventbus.dead_letters WHERE subscription_id = ${S_ATK_FAIL:-0}")
: "${DL_A:=0}" "${DL_ATK:=0}"
is "$(( $(canary_count) - pool0 ))" "0" "1 shadow: the pool ran the attacker's handlers (role default search_path = t15_atk, pg_catalog) without running any shadowing object"

# ---------------------------------------------------------------------------
# 1. shadowing, second part: the attacker's own dead letter and subscriptions
# ---------------------------------------------------------------------------
shadow_is "SELECT id FROM $X.eventbus_dead_letters($S_ATK_FAIL)" "ok|0|0" \
	"1 shadow: eventbus_dead_letters(own subscription) uses none of the caller's operators/functions"
shadow_is "SELECT $X.eventbus_replay_dead_letter($DL_ATK)" "ok|0|0" \
	"1 shadow: eventbus_replay_dead_letter(own dead letter) uses none of the caller's operators/functions"
shadow_is "SELECT $X.eventbus_replay_dead_letter($DL_A)" "42501|0|0" \
	"1 shadow: replaying A's dead letter with pg_has_role()/= shadowed: 42501, nothing ran"
shadow_is "SELECT id FROM $X.eventbus_dead_letters($S_DL)" "42501|0|0" \
	"1 shadow: reading A's dead letters with pg_has_role()/= shadowed: 42501, nothing ran"
shadow_is "SELECT $X.eventbus_subscribe('$T_ATK', $HA_FAIL::regprocedure, 'nats', 2)" "ok|0|0" \
	"1 shadow: eventbus_subscribe (update of its own) uses none of the caller's operators/functions"
shadow_is "SELECT $X.eventbus_unsubscribe('$T_ATK', $HA_OK::regprocedure, 'nats')" "ok|0|0" \
	"1 shadow: eventbus_unsubscribe (its own) uses none of the caller's operators/functions"
shadow_is "SELECT $X.eventbus_unsubscribe('$T_ATK', $HA_FAIL::regprocedure, 'nats')" "ok|0|0" \
	"1 shadow: eventbus_unsubscribe (its own, with a dead letter) uses none of the caller's operators/functions"
is "$(q -c "SELECT rolsuper FROM pg_roles WHERE rolname = 't15_atk'")" "f" "1 shadow: t15_atk is still not a superuser"
is "$(canary_count)" "0" "1 shadow: canary empty: no shadowing object ran, under any role"
is "$(q -c "SELECT count(*) FROM public.t15_canary c JOIN pg_roles r ON r.rolname = c.who WHERE r.rolsuper")" "0" \
	"1 shadow: in particular none ran as a superuser"
c=$(canary_count)
[ "$c" = 0 ] || q -c "SELECT who || ' ran ' || what || ' x' || count(*) FROM public.t15_canary GROUP BY who, what ORDER BY 1 LIMIT 8" | sed 's/^/#     canary: /'

# ---------------------------------------------------------------------------
# 5. reading others' dead letters and eventbus's tables
# ---------------------------------------------------------------------------
is "$(sqlstate_of "SET ROLE t15_b" "SELECT id FROM eventbus_dead_letters($S_DL)")" "42501" \
	"5 read: B: eventbus_dead_letters(A's subscription) fails with 42501"
is "$(as_role1 t15_b "SELECT count(*) FROM eventbus_dead_letters() WHERE subscription = $S_DL")" "0" \
	"5 read: B: eventbus_dead_letters() (all it may see) has none of A's"
is "$(as_role1 t15_a "SELECT count(*) FROM eventbus_dead_letters($S_DL)")|$(as_role1 t15_c "SELECT count(*) FROM eventbus_dead_letters($S_DL)")" "1|1" \
	"5 read: control: A and C (member of A) see A's dead letter"
for t in dead_letters subscriptions inbox outbox quarantine aggregate_versions; do
	is "$(sqlstate_of "SET ROLE t15_b" "SELECT * FROM eventbus.$t LIMIT 1")" "42501" "5 read: B: SELECT * FROM eventbus.$t fails with 42501"
done

# ---------------------------------------------------------------------------
# 6. replay of another role's dead letter
# ---------------------------------------------------------------------------
dl_state() { q -c "SELECT attempts || '|' || (replayed_at IS NULL) || '|' || error_sqlstate FROM eventbus.dead_letters WHERE id = $DL_A"; }
before=$(dl_state); calls=$(fail_calls)
is "$(sqlstate_of "SET ROLE t15_b" "SELECT eventbus_replay_dead_letter($DL_A)")" "42501" \
	"6 replay: B replaying A's dead letter fails with 42501"
is "$(dl_state)|$(fail_calls)" "$before|$calls" "6 replay: the dead letter is unchanged ($before) and the handler did not run"
calls=$(fail_calls)
is "$(as_role t15_c "SELECT eventbus_replay_dead_letter($DL_A)" | grep -x '[tf]')|$(fail_calls)" "f|$((calls + 1))" \
	"6 replay: control: C (member of A) may replay it (the handler ran, as A, and failed again)"

# ---------------------------------------------------------------------------
# 7. eventbus_status()
# ---------------------------------------------------------------------------
is "$(sqlstate_of "SET ROLE t15_plain" "SELECT * FROM eventbus_status()")" "42501" \
	"7 status: a plain role cannot execute eventbus_status() (42501)"
is "$(as_role1 t15_mon "SELECT count(*) FROM eventbus_status() WHERE component = 'launcher'")" "3" \
	"7 status: a pg_monitor member can (launcher rows)"
is "$(as_role1 t15_mon "SELECT count(*) FROM eventbus_status() WHERE component IN ('subscription $S_DL', 'subscription $S_TAKE', 'subscription $S_DROPROLE')")" "0" \
	"7 status: ... but sees no subscription row of roles it is not a member of"
q -c "GRANT t15_a TO t15_mon" >/dev/null
is "$(as_role1 t15_mon "SELECT count(*) FROM eventbus_status() WHERE component IN ('subscription $S_DL', 'subscription $S_TAKE', 'subscription $S_DROPROLE')")" "2" \
	"7 status: after GRANT t15_a TO t15_mon it sees A's subscription rows (and still not D's)"
q -c "REVOKE t15_a FROM t15_mon" >/dev/null
is "$(q -c "SELECT count(*) FROM eventbus_status() WHERE component IN ('subscription $S_DL', 'subscription $S_TAKE', 'subscription $S_DROPROLE')")" "3" \
	"7 status: a superuser sees them all"

# ---------------------------------------------------------------------------
# 8. secret settings hidden from a plain role
# ---------------------------------------------------------------------------
for g in $SECRET_GUCS; do
	is "$(sqlstate_of "SET ROLE t15_plain" "SHOW $g")|$(sqlstate_of "SET ROLE t15_plain" "SELECT current_setting('$g')")|$(as_role1 t15_plain "SELECT count(*) FROM pg_settings WHERE name = '$g'")" \
		"42501|42501|0" "8 settings: $g: SHOW and current_setting() fail with 42501, no pg_settings row, for a plain role"
done

# ---------------------------------------------------------------------------
# 11. properties eventbus sets itself cannot be set
# ---------------------------------------------------------------------------
save_setting eventbus.kafka_properties
KPROPS=$(q -c "SHOW eventbus.kafka_properties")
# What a reload would put in effect (no reload here: it would restart the dispatcher).
file_value() { q -c "SELECT coalesce(string_agg(setting, ','), '<none>') FROM pg_file_settings WHERE name = 'eventbus.kafka_properties' AND applied"; }
KFILE=$(file_value)
for v in 'enable.idempotence=false' 'log.queue=false' 'enable.auto.offset.store=true' 'group.id=x' 'partitioner=random' \
         'bootstrap.servers=127.0.0.1:1' 'acks=0' 'request.required.acks=0' 'enable.auto.commit=true' 'auto.offset.reset=latest' \
         'enable.partition.eof=true' 'message.timeout.ms=1' 'fetch.wait.max.ms=50; enable.idempotence =false'; do
	name=${v##*;}; name=${name%%=*}; name=${name// /}
	r=$(err_of "ALTER SYSTEM SET eventbus.kafka_properties = '$v'")
	st=${r%%$'\t'*}; txt=${r#*$'\t'}
	named=no; [[ $txt == *"$name"* ]] && named=yes
	is "$st|$named" "22023|yes" "11 mandatory: ALTER SYSTEM SET eventbus.kafka_properties = '$v' fails with 22023 naming $name"
done
r=$(err_of "ALTER SYSTEM SET eventbus.kafka_properties = 'metadata.broker.list=127.0.0.1:1'")
is "${r%%$'\t'*}" "22023" "11 mandatory: 'metadata.broker.list' (librdkafka's alias of bootstrap.servers) is refused too"
is "$(q -c "SHOW eventbus.kafka_properties")|$(file_value)" "$KPROPS|$KFILE" \
	"11 mandatory: the value in effect (SHOW) and the one the configuration files would apply at a reload (pg_file_settings) are unchanged"
restore_setting eventbus.kafka_properties

# ---------------------------------------------------------------------------
# 10. Kafka property values never echoed; '\;' is a literal semicolon
#  9. NATS URL credentials never shown
# Both in one reload (and one to restore): every change of these settings
# restarts the dispatcher, after a backoff that doubles with each restart
# less than a minute after the previous one.  The log window is shared, so
# the Kafka check ignores 't15Secret' (the NATS password) when looking for
# 'Secret'.
# ---------------------------------------------------------------------------
kafka_since() { q -c "SELECT string_agg(coalesce(since::text, '-'), ',' ORDER BY component) FROM eventbus_status() WHERE transport = 'kafka' AND component IN ('launcher', 'dispatcher')"; }
kafka_connected() { [ "$(q -c "SELECT count(*) FROM eventbus_status() WHERE transport = 'kafka' AND component IN ('launcher', 'dispatcher') AND state = 'connected'")" = 2 ]; }
nats_rows_at() {   # nats_rows_at yes|no — both NATS rows connected with (yes) / without (no) credentials in use
	local cond="NOT LIKE '%@%'"
	[ "$1" = yes ] && cond="LIKE '%@%'"
	[ "$(q -c "SELECT count(*) FROM eventbus_status() WHERE transport = 'nats' AND component IN ('launcher', 'dispatcher')
	            AND state = 'connected' AND detail $cond")" = 2 ]
}
KAFKA_LEAK="regexp_replace(s::text, 't15Secret', '', 'g') ~ 't15Rack|Secret'"
save_setting eventbus.kafka_properties; save_setting eventbus.nats_url; save_setting log_min_messages
KPROPS=$(q -c "SHOW eventbus.kafka_properties")
NEWPROPS="${KPROPS:+$KPROPS;}client.rack=t15Rack\\;Secret"
PORT=$(nats_port)
off=$(log_size); since0=$(kafka_since)
q -c "ALTER SYSTEM SET log_min_messages = debug1" >/dev/null
is "$(sqlstate_of "ALTER SYSTEM SET eventbus.kafka_properties = '$NEWPROPS'")" "ok" \
	"10 kafka props: ALTER SYSTEM accepts '<stack value>;client.rack=t15Rack\\;Secret' (escaped semicolon)"
is "$(sqlstate_of "ALTER SYSTEM SET eventbus.nats_url = 'nats://t15user:t15Secret@127.0.0.1:$PORT'")" "ok" \
	"9 nats creds: ALTER SYSTEM SET eventbus.nats_url = 'nats://t15user:t15Secret@127.0.0.1:$PORT'"
reload
is "$(q -c "SHOW eventbus.kafka_properties")" "$NEWPROPS" "10 kafka props: in effect after the reload (SHOW as superuser)"
wait_until 30 '[ "$(kafka_since)" != "$since0" ]'
wait_until 45 'kafka_connected && nats_rows_at yes'
kafka_connected
ok $? "10 kafka props: the Kafka producer and consumer reconnect with it (launcher and dispatcher rows connected)"
nats_rows_at yes
ok $? "9 nats creds: launcher and dispatcher reconnect to NATS with the credentials (nats-server without auth accepts them)"
q -c "SELECT component || ' ' || transport || ': ' || state || ' ' || coalesce(detail, '') FROM eventbus_status() WHERE component IN ('launcher', 'dispatcher') AND transport IS NOT NULL" | sed 's/^/#     /'
is "$(q -c "SELECT count(*) FROM eventbus_status() s WHERE $KAFKA_LEAK")" "0" \
	"10 kafka props: no eventbus_status() row contains the property value"
is "$(q -c "SELECT count(*) FROM eventbus_status() s WHERE s::text ~ 't15Secret|t15user'")" "0" \
	"9 nats creds: no eventbus_status() row contains the user or the password (superuser)"
is "$(as_role1 t15_mon "SELECT count(*) FROM eventbus_status() s WHERE s::text ~ 't15Secret|t15user'")" "0" \
	"9 nats creds: nor for a pg_monitor member"
is "$(q -c "SELECT count(*) FROM eventbus_status() WHERE component = 'launcher' AND transport = 'nats' AND detail LIKE '%nats://***@127.0.0.1:$PORT%'")" "1" \
	"9 nats creds: the detail shows nats://***@127.0.0.1:$PORT"
is "$(sqlstate_of "SET ROLE t15_plain" "SHOW eventbus.nats_url")|$(sqlstate_of "SET ROLE t15_plain" "SHOW eventbus.kafka_properties")" "42501|42501" \
	"9/10: a plain role cannot SHOW them now either"
is "$(as_role t15_mon "SELECT current_setting('eventbus.nats_url')" | grep -c t15Secret)|$(as_role1 t15_mon "SELECT count(*) FROM pg_settings WHERE setting ~ 't15Secret|t15Rack'")" "0|0" \
	"9 nats creds: a pg_monitor member (pg_read_all_settings) cannot read the password or property values either"
since1=$(kafka_since)
restore_setting eventbus.kafka_properties; restore_setting eventbus.nats_url; restore_setting log_min_messages
reload
wait_until 30 '[ "$(kafka_since)" != "$since1" ]'
wait_until 45 'kafka_connected && nats_rows_at no'
ok $? "9/10: settings restored, Kafka and NATS reconnected (NATS without credentials)"
log_since "$off" >"$TMP15/log"
is "$(sed 's/t15Secret//g' "$TMP15/log" | grep -cE 't15Rack|Secret')" "0" \
	"10 kafka props: no server log line since (at debug1) contains the property value"
sed 's/t15Secret//g' "$TMP15/log" | grep -E 't15Rack|Secret' | head -3 | cut -c1-200 | sed 's/^/#     log: /'
is "$(grep -cE 't15Secret|t15user' "$TMP15/log")" "0" "9 nats creds: no server log line since contains the user or the password"
grep -E 't15Secret|t15user' "$TMP15/log" | head -3 | cut -c1-200 | sed 's/^/#     log: /'

# ---------------------------------------------------------------------------
# 12. DROP ROLE of a subscription owner
# ---------------------------------------------------------------------------
D_OID=$(role_oid t15_d)
r=$(err_of "DROP ROLE t15_d")
st=${r%%$'\t'*}; txt=${r#*$'\t'}
named=no; [[ $txt == *subscription* ]] && named=yes
is "$st|$named" "2BP01|yes" "12 drop role: DROP ROLE t15_d while it owns a subscription fails with 2BP01 (message mentions the subscription)"
is "$(q -c "SELECT role_id FROM eventbus.subscriptions WHERE id = $S_DROPROLE")|$(role_oid t15_d)" "$D_OID|$D_OID" \
	"12 drop role: the role and its subscription are still there"
is "$(sqlstate_of "REASSIGN OWNED BY t15_d TO t15_d2")|$(sub_row "$S_DROPROLE")" "ok|t15_d2|3" \
	"12 drop role: REASSIGN OWNED BY t15_d TO t15_d2 moves the subscription to t15_d2"
is "$(sqlstate_of "DROP OWNED BY t15_d2")|$(sub_count "$S_DROPROLE")" "ok|0" "12 drop role: DROP OWNED BY t15_d2 removes it"
is "$(sqlstate_of "DROP ROLE t15_d" "DROP ROLE t15_d2")|$(q -c "SELECT count(*) FROM pg_roles WHERE rolname IN ('t15_d', 't15_d2')")" "ok|0" \
	"12 drop role: then DROP ROLE succeeds"

# ---------------------------------------------------------------------------
# 13. DROP FUNCTION of a subscribed handler
# ---------------------------------------------------------------------------
r=$(err_of "DROP FUNCTION public.t15_h_drop(eventbus.envelope)")
st=${r%%$'\t'*}; txt=${r#*$'\t'}
named=no; [[ $txt == *subscription* ]] && named=yes
is "$st|$named" "2BP01|yes" "13 drop function: DROP FUNCTION of a subscribed handler fails with 2BP01 naming the subscription"
is "$(sub_row "$S_DROPFN")|$(q -c "SELECT count(*) FROM pg_proc WHERE oid = $H_DROP")" "t15_a|3|1" \
	"13 drop function: the function and the subscription are still there"
is "$(sqlstate_of "DROP FUNCTION public.t15_h_drop(eventbus.envelope) CASCADE")|$(sub_count "$S_DROPFN")" "ok|0" \
	"13 drop function: DROP FUNCTION ... CASCADE removes the subscription with it"
is "$(sqlstate_of "DROP SCHEMA t15_dropme CASCADE")|$(sub_count "$S_DROPSCHEMA")" "ok|0" \
	"13 drop function: DROP SCHEMA ... CASCADE removes the subscription of a handler in it"

# ---------------------------------------------------------------------------
# 14. a role dropped from another database
# ---------------------------------------------------------------------------
r=$(psql -X -A -t -q -v ON_ERROR_STOP=1 -v VERBOSITY=sqlstate -d postgres -c "DROP ROLE t15_e" 2>&1)
if [[ $r =~ ERROR:\ +([0-9A-Z]{5}) ]]; then st=${BASH_REMATCH[1]}; else st=ok; fi
if [ "$st" = 2BP01 ]; then
	ok 0 "14 orphan: DROP ROLE t15_e from database postgres refused (2BP01): nothing can run as a dropped role"
	is "$(sub_row "$S_ORPHAN")" "t15_e|3" "14 orphan: its subscription is intact"
	ok 0 "14 orphan: (nothing to unsubscribe)"
elif [ "$st" = ok ]; then
	q -c "SELECT eventbus_publish('$T_ORPHAN', 'o-1', 'T15Orphan', '{}', 'nats')" >/dev/null
	ran() { q -c "SELECT count(*) FROM public.t15_ran WHERE sub = '$1'"; }
	wait_until 30 '[ "$(ran ctl)" -ge 1 ]'
	sleep 1   # the orphan's delivery, if any, was dispatched with the control's
	is "$(ran ctl)|$(ran orphan)" "1|0" \
		"14 orphan: after DROP ROLE t15_e from database postgres, an event reaches the control handler but not the orphan's"
	is "$(q -c "SELECT state FROM eventbus_status() WHERE component = 'subscription $S_ORPHAN'")" "owner dropped" \
		"14 orphan: eventbus_status() shows the subscription as 'owner dropped'"
	is "$(q -c "SELECT eventbus_unsubscribe('$T_ORPHAN', $H_ORPHAN::regprocedure, 'nats')")|$(sub_count "$S_ORPHAN")" "t|0" \
		"14 orphan: a superuser can unsubscribe it"
else
	ok 1 "14 orphan: DROP ROLE t15_e from database postgres: unexpected $st"; ok 1 "14 orphan: -"; ok 1 "14 orphan: -"
fi

# ---------------------------------------------------------------------------
# end: nothing ran, nobody escalated
# ---------------------------------------------------------------------------
is "$(canary_count)" "0" "end: canary still empty (no shadowing object ran at any time, in any process)"
is "$(q -c "SELECT count(*) FROM pg_roles WHERE rolname LIKE 't15\_%' AND rolsuper")" "0" "end: no t15_* role is a superuser"
[ "$(canary_count)" = 0 ] || q -c "SELECT who || ' ran ' || what || ' x' || count(*) FROM public.t15_canary GROUP BY who, what ORDER BY 1 LIMIT 12" | sed 's/^/#     canary: /'

done_testing
