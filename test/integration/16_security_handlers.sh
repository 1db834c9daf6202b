#!/usr/bin/env bash
# Attacks on the background workers and on handler isolation.  Each attack
# must fail and leave nothing changed, as counted from the database.
#
#  A1  search_path redirect of the workers: schema t16evil shadows =, <, -,
#      ||, now(), clock_timestamp() ... with functions that return the right
#      result but count each call (a sequence: not rolled back) and record
#      who called (t16_canary); ALTER DATABASE <db> SET search_path =
#      t16evil, pg_catalog, public and the workers are made to reconnect.
#      Then every worker statement runs: publish on both transports (relay
#      reads and deletes the outbox), consume (inbox claim), a failing
#      handler (dead letter), a malformed message (quarantine), the inbox
#      prune at dispatcher start.  Same again with ALTER ROLE <the workers'
#      superuser> IN DATABASE <db> SET search_path.  The canary stays empty.
#  A2  session-level GUCs (set_config(..., false)) of t16a's handler are not
#      seen by t16b's handler on the same topic and aggregates (same pool
#      batches), on Kafka and NATS, 120 events each.
#  A3  the same with set_config(..., true) (SET LOCAL): same transaction.
#  A4  role defaults: ALTER ROLE t16b SET app.t16y, ALTER ROLE t16a IN
#      DATABASE SET app.t16y: each handler sees its own role's default on
#      every call; what a call sets never reaches the next call of that role.
#  A5  a handler creating a temp table: dead letter 42501, no temp table.
#  A6  a handler doing set_config('role'), SET ROLE, SET SESSION
#      AUTHORIZATION to the superuser, or subscribed by a role whose
#      defaults say role / session_authorization = the superuser (a handler
#      starts from its role's defaults, and the workers' session user is a
#      superuser): dead letter 42501, nothing written.
#  A7  a handler reading eventbus.subscriptions / inbox / dead_letters or
#      calling eventbus_status(): dead letter 42501, nothing written.
#  A8  replaying one dead letter twice: the second call fails (55000), the
#      handler's effect exists once.
#  A9  two sessions replaying one dead letter at the same time: one true,
#      one 55000, the effect exists once.
#  A10 replay isolation: the caller's SET app.t16x / work_mem and its temp table named
#      like the handler's (unqualified) target table do not reach the
#      handler; it runs as the subscribing role.
#  A11 a role dropped from another database while it owns a subscription:
#      its handler no longer runs (no effect, no dead letter), status says
#      'owner dropped', a superuser can unsubscribe it.
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
DB=$PGDATABASE
W=$(mktemp -d)
# This test's own sessions ignore the search_path it plants for the workers.
export PGOPTIONS='-c search_path=public'
BOOT=$(q -c "SELECT rolname FROM pg_roles WHERE oid = 10")   # the workers' role (bootstrap superuser)
NGUC=120        # events per transport for A2..A4 (12 aggregates x 10 versions)
NDENY=3         # events for A5..A7
REDIRECTED=0    # a search_path redirect may be in effect (exit must undo it)
LAP=$SECONDS
lap() { diag "$1: $((SECONDS - LAP)) s"; LAP=$SECONDS; }

drop_handlers() {
	q >/dev/null <<'SQL'
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname LIKE 't16\_h\_%' LOOP
    EXECUTE format('DROP FUNCTION %s', f);
  END LOOP;
END $$;
SQL
}

drop_roles() {
	q >/dev/null <<'SQL'
DO $$
DECLARE r text;
BEGIN
  FOR r IN SELECT rolname FROM pg_roles WHERE rolname IN ('t16a', 't16b', 't16c', 't16d', 't16e') LOOP
    EXECUTE format('DROP OWNED BY %I', r);
    EXECUTE format('DROP ROLE %I', r);
  END LOOP;
END $$;
SQL
}

undo_redirect() {
	q -c "ALTER DATABASE \"$DB\" RESET search_path" -c "ALTER ROLE \"$BOOT\" IN DATABASE \"$DB\" RESET search_path" >/dev/null
}

t16_cleanup() {
	if [ "$REDIRECTED" = 1 ]; then
		undo_redirect
		q -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type LIKE 'eventbus%'" >/dev/null
	fi
	unsubscribe_like 't16.%'
	drop_handlers
	drop_roles
	q -c "DROP SCHEMA IF EXISTS t16evil CASCADE" -c "DROP SCHEMA IF EXISTS t16a_schema CASCADE" >/dev/null
	rm -rf "$W"
}

consumer_sql_setup
consumer_setup
CONSUMER_CLEANUP="t16_cleanup"

# --- leftovers of an earlier run (roles are cluster-wide) -------------------
if [ "$(q -c "SELECT count(*) FROM pg_db_role_setting s WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND array_to_string(s.setconfig, ',') LIKE '%t16evil%'")" != 0 ]; then
	diag "an earlier run left the search_path redirect: undoing it"
	undo_redirect
	restart_workers || bail "workers did not come back"
fi
unsubscribe_like 't16.%' >/dev/null
drop_handlers
drop_roles
q >/dev/null <<'SQL'
DROP SCHEMA IF EXISTS t16evil CASCADE;
DROP SCHEMA IF EXISTS t16a_schema CASCADE;
DROP TABLE IF EXISTS t16_canary, t16_seen, t16_effects, t16_target, t16_flags, t16_pgonly, t16_a1, t16_a1_sent, t16_sent;
DROP SEQUENCE IF EXISTS t16_canary_hits;
SQL

# --- roles, tables, handlers --------------------------------------------------
out=$(sed "s/@BOOT@/$BOOT/g" <<'SQL' | q
CREATE ROLE t16a NOLOGIN;
CREATE ROLE t16b NOLOGIN;
CREATE ROLE t16c NOLOGIN;
CREATE ROLE t16d NOLOGIN;
CREATE ROLE t16e NOLOGIN;
CREATE SCHEMA t16a_schema;

CREATE TABLE t16_sent (what text, transport text, aggregate_id text, version bigint, event_id uuid);
CREATE TABLE t16_a1_sent (phase text, transport text, event_id uuid);
CREATE TABLE t16_a1 (transport text, event_id uuid, sp text);
CREATE TABLE t16_seen (n bigserial, who text, transport text, event_id uuid, usr text,
                       sp text, x text, l text, wm text, y text);
CREATE TABLE t16_effects (n bigserial, kind text, transport text, event_id uuid, usr text);
CREATE TABLE t16_target (usr text, x text, wm text, event_id uuid);
CREATE TABLE t16_flags (name text PRIMARY KEY, fail boolean NOT NULL);
CREATE TABLE t16_pgonly (what text, event_id uuid);          -- only the superuser may write
CREATE TABLE t16_canary (n bigserial, what text, who text, pid int, btype text, app text);
CREATE SEQUENCE t16_canary_hits;
INSERT INTO t16_flags VALUES ('replay', true);
-- Granted to PUBLIC only: t16c must own nothing and hold no privilege here (A11).
GRANT INSERT ON t16_a1, t16_seen, t16_effects, t16_target, t16_canary TO PUBLIC;
GRANT USAGE ON SEQUENCE t16_seen_n_seq, t16_effects_n_seq, t16_canary_n_seq, t16_canary_hits TO PUBLIC;
GRANT SELECT ON t16_flags TO PUBLIC;

-- A1: no operator, no now() in their bodies (they may run with the planted path).
CREATE FUNCTION t16_h_a1(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t16_a1 (transport, event_id, sp) VALUES (e.transport, e.event_id, pg_catalog.current_setting('search_path'));
END $$;
CREATE FUNCTION t16_h_a1fail(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 't16 deliberate failure' USING ERRCODE = 'EB016';
END $$;

-- A2..A4: A records what it sees, then sets session-level and local settings.
CREATE FUNCTION t16_h_guc_a(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t16_seen (who, transport, event_id, usr, sp, x, l, wm, y)
  VALUES ('a', e.transport, e.event_id, current_user, current_setting('search_path'), current_setting('app.t16x', true),
          current_setting('app.t16l', true), current_setting('work_mem'), current_setting('app.t16y', true));
  PERFORM set_config('search_path', 't16a_schema, public', false);
  PERFORM set_config('app.t16x', 'from-a', false);
  PERFORM set_config('app.t16y', 'a-changed', false);
  PERFORM set_config('app.t16l', 'from-a-local', true);
  PERFORM set_config('work_mem', '1111kB', true);
END $$;
CREATE FUNCTION t16_h_guc_b(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t16_seen (who, transport, event_id, usr, sp, x, l, wm, y)
  VALUES ('b', e.transport, e.event_id, current_user, current_setting('search_path'), current_setting('app.t16x', true),
          current_setting('app.t16l', true), current_setting('work_mem'), current_setting('app.t16y', true));
  PERFORM set_config('app.t16y', 'b-changed', false);
END $$;

-- A5..A7: each tries something forbidden, then writes an effect.
CREATE FUNCTION t16_h_temp(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS t16_tmp (i int);
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('temp', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_setrole(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('role', '@BOOT@', false);
  INSERT INTO public.t16_pgonly VALUES ('setrole', e.event_id);
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('setrole', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_setrole_stmt(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  SET ROLE @BOOT@;
  INSERT INTO public.t16_pgonly VALUES ('setrole_stmt', e.event_id);
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('setrole_stmt', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_sessauth(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  SET SESSION AUTHORIZATION @BOOT@;
  INSERT INTO public.t16_pgonly VALUES ('sessauth', e.event_id);
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('sessauth', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_defrole(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t16_pgonly VALUES ('defrole', e.event_id);
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('defrole', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_defsess(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t16_pgonly VALUES ('defsess', e.event_id);
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('defsess', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_read_subs(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM count(*) FROM eventbus.subscriptions;
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('read_subs', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_read_inbox(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM count(*) FROM eventbus.inbox;
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('read_inbox', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_read_dead(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM count(*) FROM eventbus.dead_letters;
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('read_dead', e.transport, e.event_id, current_user);
END $$;
CREATE FUNCTION t16_h_status(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM count(*) FROM eventbus_status();
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('status', e.transport, e.event_id, current_user);
END $$;

-- A8..A10: fails until the flag is cleared; inserts into t16_target UNQUALIFIED.
CREATE FUNCTION t16_h_replay(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT fail FROM public.t16_flags WHERE name = 'replay') THEN
    RAISE EXCEPTION 't16 replay target not ready' USING ERRCODE = 'EB016';
  END IF;
  INSERT INTO t16_target (usr, x, wm, event_id) VALUES (current_user, current_setting('app.t16x', true), current_setting('work_mem'), e.event_id);
END $$;

-- A11: owned by the superuser (t16c owns nothing here); no current_user (a
-- dangling role id would make it fail rather than show the problem).
CREATE FUNCTION t16_h_dropped(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t16_effects (kind, transport, event_id) VALUES ('dropped', e.transport, e.event_id);
END $$;
CREATE FUNCTION t16_h_control(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.t16_effects (kind, transport, event_id, usr) VALUES ('control', e.transport, e.event_id, current_user);
END $$;

GRANT EXECUTE ON FUNCTION eventbus_subscribe(text, regprocedure, text, integer) TO t16a, t16b, t16c, t16d, t16e;
ALTER ROLE t16d SET role = '@BOOT@';
ALTER ROLE t16e SET session_authorization = '@BOOT@';
GRANT EXECUTE ON FUNCTION eventbus_replay_dead_letter(bigint) TO t16a;
SQL
)
[ -z "$out" ] || bail "setup failed: $out"
q -c "ALTER ROLE t16b SET app.t16y = 'b-default'" -c "ALTER ROLE t16a IN DATABASE \"$DB\" SET app.t16y = 'a-default'" >/dev/null
is "$(q -c "SELECT count(*) FROM pg_roles WHERE rolname IN ('t16a', 't16b', 't16c', 't16d', 't16e')")|$(q -c "SELECT count(*) FROM pg_proc WHERE proname LIKE 't16\_h\_%'")" \
	"5|17" "setup: roles t16a..t16e and the 17 handlers exist"

# Handlers named by oid (resolving names as the roles is not what this is about).
declare -A H
for h in a1 a1fail guc_a guc_b temp setrole setrole_stmt sessauth defrole defsess read_subs read_inbox read_dead status replay dropped control; do
	H[$h]=$(q -c "SELECT 't16_h_$h(eventbus.envelope)'::regprocedure::oid")
done
DENY=(temp setrole setrole_stmt sessauth read_subs read_inbox read_dead status)   # subscribed by t16a
NDENYSUBS=$((${#DENY[@]} + 2))                                                       # + defrole (t16d), defsess (t16e)

# --- every subscription at once (one Kafka rebalance) --------------------------
nats_stream "T16_$run" "t16.a1.nats.$run" "t16.guc.nats.$run" "t16.deny.nats.$run" "t16.replay.nats.$run" "t16.drop.nats.$run" ||
	bail "could not create the NATS stream"
ids=$(q -c "SELECT eventbus_subscribe('t16.a1.kafka.$run', ${H[a1]}::regprocedure, 'kafka', 5),
                   eventbus_subscribe('t16.a1.kafka.$run', ${H[a1fail]}::regprocedure, 'kafka', 1),
                   eventbus_subscribe('t16.a1.nats.$run', ${H[a1]}::regprocedure, 'nats', 5),
                   eventbus_subscribe('t16.a1.nats.$run', ${H[a1fail]}::regprocedure, 'nats', 1)")
IFS="|" read -r _ S_A1FAIL_kafka _ S_A1FAIL_nats <<<"$ids"
sel="SELECT eventbus_subscribe('t16.guc.kafka.$run', ${H[guc_a]}::regprocedure, 'kafka'), eventbus_subscribe('t16.guc.nats.$run', ${H[guc_a]}::regprocedure, 'nats')"
for h in "${DENY[@]}"; do sel="$sel, eventbus_subscribe('t16.deny.nats.$run', ${H[$h]}::regprocedure, 'nats', 2)"; done
sel="$sel, eventbus_subscribe('t16.replay.nats.$run', ${H[replay]}::regprocedure, 'nats', 1)"
ids_a=$(q -c "SET ROLE t16a" -c "$sel")
ids_b=$(q -c "SET ROLE t16b" -c "SELECT eventbus_subscribe('t16.guc.kafka.$run', ${H[guc_b]}::regprocedure, 'kafka'),
                                        eventbus_subscribe('t16.guc.nats.$run', ${H[guc_b]}::regprocedure, 'nats')")
S_DROP=$(q -c "SET ROLE t16c" -c "SELECT eventbus_subscribe('t16.drop.nats.$run', ${H[dropped]}::regprocedure, 'nats')")
S_DEFROLE=$(q -c "SET ROLE t16d" -c "SELECT eventbus_subscribe('t16.deny.nats.$run', ${H[defrole]}::regprocedure, 'nats', 2)")
S_DEFSESS=$(q -c "SET ROLE t16e" -c "SELECT eventbus_subscribe('t16.deny.nats.$run', ${H[defsess]}::regprocedure, 'nats', 2)")
S_CTRL=$(q -c "SELECT eventbus_subscribe('t16.drop.nats.$run', ${H[control]}::regprocedure, 'nats')")
q -c "REVOKE EXECUTE ON FUNCTION eventbus_subscribe(text, regprocedure, text, integer) FROM t16c" >/dev/null
ok "$([[ $ids =~ ^[0-9]+(\|[0-9]+){3}$ && $ids_a =~ ^[0-9]+(\|[0-9]+){10}$ && $ids_b =~ ^[0-9]+\|[0-9]+$ && $S_DROP =~ ^[0-9]+$ && $S_CTRL =~ ^[0-9]+$ && $S_DEFROLE =~ ^[0-9]+$ && $S_DEFSESS =~ ^[0-9]+$ ]]; echo $?)" \
	"setup: 21 subscriptions (superuser: $ids; t16a: $ids_a; t16b: $ids_b; t16c: $S_DROP; t16d: $S_DEFROLE; t16e: $S_DEFSESS; control: $S_CTRL)"
S_REPLAY=${ids_a##*|}

# =============================================================================
# A1: search_path redirect of the background workers
# =============================================================================
q >/dev/null <<'SQL'
CREATE SCHEMA t16evil;
GRANT USAGE ON SCHEMA t16evil TO PUBLIC;
-- Counts a call (the sequence survives a rollback) and records who made it;
-- the test's own psql sessions are not counted.
CREATE FUNCTION t16evil.canary(what text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF current_setting('application_name') = 'psql' THEN RETURN; END IF;
  PERFORM nextval('public.t16_canary_hits');
  BEGIN
    INSERT INTO public.t16_canary (what, who, pid, btype, app)
    SELECT what, current_user, pg_backend_pid(),
           (SELECT backend_type FROM pg_stat_activity WHERE pid = pg_backend_pid()), current_setting('application_name');
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
END $$;
DO $do$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM (VALUES
      ('eq_text', '=', 'text', 'text', 'boolean'), ('eq_int8', '=', 'bigint', 'bigint', 'boolean'),
      ('eq_int4', '=', 'integer', 'integer', 'boolean'), ('eq_uuid', '=', 'uuid', 'uuid', 'boolean'),
      ('eq_oid', '=', 'oid', 'oid', 'boolean'), ('eq_tid', '=', 'tid', 'tid', 'boolean'),
      ('eq_jsonb', '=', 'jsonb', 'jsonb', 'boolean'),
      ('lt_tstz', '<', 'timestamptz', 'timestamptz', 'boolean'), ('le_tstz', '<=', 'timestamptz', 'timestamptz', 'boolean'),
      ('gt_tstz', '>', 'timestamptz', 'timestamptz', 'boolean'), ('ge_tstz', '>=', 'timestamptz', 'timestamptz', 'boolean'),
      ('lt_int8', '<', 'bigint', 'bigint', 'boolean'), ('gt_int8', '>', 'bigint', 'bigint', 'boolean'),
      ('mi_tstz', '-', 'timestamptz', 'interval', 'timestamptz'), ('pl_tstz', '+', 'timestamptz', 'interval', 'timestamptz'),
      ('pl_int8', '+', 'bigint', 'bigint', 'bigint'), ('cat_text', '||', 'text', 'text', 'text')
    ) v (fn, op, lt, rt, ret)
  LOOP
    EXECUTE format('CREATE FUNCTION t16evil.%I(a %s, b %s) RETURNS %s LANGUAGE plpgsql VOLATILE'
                   ' SET search_path = pg_catalog, pg_temp'
                   ' AS $f$ BEGIN PERFORM t16evil.canary(%L); RETURN a %s b; END $f$',
                   r.fn, r.lt, r.rt, r.ret, r.op || '(' || r.lt || ',' || r.rt || ')', r.op);
    EXECUTE format('CREATE OPERATOR t16evil.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = t16evil.%I)', r.op, r.lt, r.rt, r.fn);
  END LOOP;
  FOR r IN SELECT * FROM (VALUES ('now'), ('clock_timestamp'), ('statement_timestamp'), ('transaction_timestamp')) v (fn) LOOP
    EXECUTE format('CREATE FUNCTION t16evil.%I() RETURNS timestamptz LANGUAGE plpgsql VOLATILE'
                   ' SET search_path = pg_catalog, pg_temp'
                   ' AS $f$ BEGIN PERFORM t16evil.canary(%L); RETURN pg_catalog.%I(); END $f$', r.fn, r.fn || '()', r.fn);
  END LOOP;
END $do$;
SQL
# The canary works (from a non-psql session) and the shadows return correct results.
probe=$(PGAPPNAME=t16probe PGOPTIONS='-c search_path=t16evil,pg_catalog,public' \
	q -c "SELECT ('a'::text = 'a') AND NOT ('a'::text = 'b') AND (2::bigint = 2::bigint) AND (now() - interval '1 minute' < clock_timestamp())" \
	  -c "SELECT count(DISTINCT what) FROM t16_canary WHERE app = 't16probe'" | tr '\n' ' ')
is "$probe" "t 6 " "A1 setup: the planted =(text,text), =(bigint,bigint), now(), -, clock_timestamp(), < return correct results and record their callers"
q -c "TRUNCATE t16_canary" -c "SELECT setval('t16_canary_hits', 1, false)" >/dev/null

canary() { echo "$(q -c "SELECT count(*) FROM t16_canary")/$(q -c "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM t16_canary_hits")"; }

# a1_phase NAME — publish 5 events per transport, a malformed message per
# transport; wait for relay, handler, dead letters and quarantine; assert.
a1_phase() {
	local ph=$1 tr
	q -c "INSERT INTO t16_a1_sent SELECT '$ph', tr, eventbus_publish('t16.a1.' || tr || '.$run', '$ph-' || g, 'T16A1', jsonb_build_object('g', g), tr)
	        FROM generate_series(1, 5) g, unnest(ARRAY['kafka', 'nats']) tr" >/dev/null
	printf 'bad-%s\tnot json {t16 %s\n' "$ph" "$ph" | kafka_produce "t16.a1.kafka.$run"
	printf 'not json {t16 %s\n' "$ph" | nats_produce "t16.a1.nats.$run"
	a1_done() {
		outbox_empty &&
		[ "$(q -c "SELECT count(*) FROM t16_a1 h JOIN t16_a1_sent s USING (event_id) WHERE s.phase = '$ph'")" -ge 10 ] &&
		[ "$(q -c "SELECT count(*) FROM eventbus.dead_letters d JOIN t16_a1_sent s ON s.event_id = (d.envelope).event_id
		            WHERE s.phase = '$ph' AND d.subscription_id IN ($S_A1FAIL_kafka, $S_A1FAIL_nats)")" -ge 10 ] &&
		[ "$(q -c "SELECT count(*) FROM eventbus.quarantine WHERE topic LIKE 't16.a1.%.$run' AND convert_from(raw, 'UTF8') = 'not json {t16 $ph'")" -ge 2 ]
	}
	wait_until 90 a1_done
	ok $? "A1 $ph: published on both transports, relayed (outbox drained), consumed, dead-lettered, quarantined"
	is "$(q -c "SELECT count(*) || '/' || count(DISTINCT h.event_id) FROM t16_a1 h JOIN t16_a1_sent s USING (event_id) WHERE s.phase = '$ph'")" \
		"10/10" "A1 $ph: the 10 events were handled once each (inbox claims)"
	is "$(q -c "SELECT count(*) || ' ' || coalesce(string_agg(DISTINCT d.error_sqlstate, ','), '-') FROM eventbus.dead_letters d JOIN t16_a1_sent s ON s.event_id = (d.envelope).event_id
	             WHERE s.phase = '$ph' AND d.subscription_id IN ($S_A1FAIL_kafka, $S_A1FAIL_nats)")" "10 EB016" \
		"A1 $ph: the failing handler's 10 events were dead-lettered"
	is "$(q -c "SELECT string_agg(transport, ',' ORDER BY transport) FROM eventbus.quarantine WHERE topic LIKE 't16.a1.%.$run' AND convert_from(raw, 'UTF8') = 'not json {t16 $ph'")" \
		"kafka,nats" "A1 $ph: the malformed message of each transport was quarantined"
	is "$(q -c "SELECT count(*) FILTER (WHERE sp LIKE 't16evil, pg_catalog, public%') || '/' || count(*) FROM t16_a1 h JOIN t16_a1_sent s USING (event_id) WHERE s.phase = '$ph'")" \
		"10/10" "A1 $ph: precondition: the reconnected workers got the planted setting (handlers start from it)"
	is "$(canary)" "0/0" "A1 $ph: no eventbus worker statement called a planted operator or function (canary rows/calls)"
	if [ "$(q -c "SELECT count(*) FROM t16_canary")" != 0 ]; then
		q -c "SELECT what || ' by ' || who || ' in ' || coalesce(btype, '?') || ': ' || count(*) FROM t16_canary GROUP BY what, who, btype ORDER BY 1" |
			while read -r l; do diag "  canary: $l"; done
	fi
}

REDIRECTED=1
q -c "ALTER DATABASE \"$DB\" SET search_path = t16evil, pg_catalog, public" >/dev/null
lap "setup"
restart_workers
ok $? "A1 database: eventbus workers reconnected after ALTER DATABASE $DB SET search_path = t16evil, pg_catalog, public"
lap "A1 database: restart"
a1_phase database
lap "A1 database: drive"

undo_redirect
q -c "ALTER ROLE \"$BOOT\" IN DATABASE \"$DB\" SET search_path = t16evil, pg_catalog, public" >/dev/null
restart_workers
ok $? "A1 role: eventbus workers reconnected after ALTER ROLE $BOOT IN DATABASE $DB SET search_path = t16evil, pg_catalog, public"
lap "A1 role: restart"
a1_phase role
lap "A1 role: drive"

undo_redirect
restart_workers
ok $? "A1: settings reset, eventbus workers reconnected with the normal search_path"
REDIRECTED=0
q -c "DROP SCHEMA t16evil CASCADE" >/dev/null
lap "A1 reset: restart"

# =============================================================================
# Produce everything for A2..A11 (before the drop: A11 produces later)
# =============================================================================
q >/dev/null <<SQL
INSERT INTO t16_sent SELECT 'guc', tr, 'g-' || a, v, gen_random_uuid()
  FROM unnest(ARRAY['kafka', 'nats']) tr, generate_series(1, 12) a, generate_series(1, $((NGUC / 12))) v;
INSERT INTO t16_sent SELECT 'deny', 'nats', 'd-' || a, 1, gen_random_uuid() FROM generate_series(1, $NDENY) a;
INSERT INTO t16_sent SELECT 'replay', 'nats', 'r-' || a, 1, gen_random_uuid() FROM generate_series(1, 3) a;
INSERT INTO t16_sent SELECT 'drop', 'nats', 'x-' || a, 1, gen_random_uuid() FROM generate_series(1, 4) a;
SQL
rc=0
for tr in kafka nats; do
	produce_sql $tr "t16.guc.$tr.$run" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T16Guc', version, '{}')
	                                      FROM t16_sent WHERE what = 'guc' AND transport = '$tr' ORDER BY version, aggregate_id" || rc=1
done
for w in deny replay; do
	produce_sql nats "t16.$w.nats.$run" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T16Event', version, '{}')
	                                       FROM t16_sent WHERE what = '$w' ORDER BY aggregate_id" || rc=1
done
ok $rc "produced $NGUC events per transport (A2-A4), $NDENY (A5-A7) and 3 (A8-A10) on NATS"

# =============================================================================
# A2..A4: settings do not leak between handler calls; role defaults apply
# =============================================================================
guc_done() {
	[ "$(q -c "SELECT count(DISTINCT (who, transport, event_id)) FROM t16_seen")" -ge $((4 * NGUC)) ]
}
wait_until 90 guc_done
ok $? "A2: both roles' handlers ran for all $NGUC events on both transports"
sleep 1
for tr in kafka nats; do
	seen="FROM t16_seen WHERE transport = '$tr'"
	is "$(q -c "SELECT count(*) || '/' || count(DISTINCT event_id) || ' ' || string_agg(DISTINCT usr, ',') $seen AND who = 'b'")|$(q -c "SELECT count(*) || '/' || count(DISTINCT event_id) || ' ' || string_agg(DISTINCT usr, ',') $seen AND who = 'a'")" \
		"$NGUC/$NGUC t16b|$NGUC/$NGUC t16a" "A2 $tr: each handler handled all $NGUC events once, as its own role"
	is "$(q -c "SELECT count(*) $seen AND who = 'b' AND (sp LIKE '%t16a_schema%' OR coalesce(x, '') = 'from-a')")" "0" \
		"A2 $tr: t16b's handler never saw t16a's session-level search_path / app.t16x"
	is "$(q -c "SELECT count(*) $seen AND who = 'b' AND (coalesce(l, '') = 'from-a-local' OR wm = '1111kB')")" "0" \
		"A3 $tr: t16b's handler never saw t16a's SET LOCAL app.t16l / work_mem"
	is "$(q -c "SELECT count(*) FILTER (WHERE who = 'b' AND y IS DISTINCT FROM 'b-default') || '/' || count(*) FILTER (WHERE who = 'a' AND y IS DISTINCT FROM 'a-default') $seen")" \
		"0/0" "A4 $tr: every call saw its own role's default app.t16y (t16b: ALTER ROLE SET, t16a: ALTER ROLE IN DATABASE SET)"
	is "$(q -c "SELECT count(*) $seen AND who = 'a' AND (sp LIKE '%t16a_schema%' OR coalesce(x, '') = 'from-a' OR coalesce(l, '') = 'from-a-local' OR wm = '1111kB')")" "0" \
		"A4 $tr: what t16a's handler set never reached its own next call"
done
diag "t16b saw: $(q -c "SELECT string_agg(DISTINCT format('sp=%s x=%s l=%s wm=%s y=%s', sp, x, l, wm, y), '; ') FROM (SELECT * FROM t16_seen WHERE who = 'b' LIMIT 500) s")"

lap "A2-A4"
# =============================================================================
# A5..A7: forbidden operations in handlers
# =============================================================================
deny_done() {   # every (handler, event) has an outcome: handled or dead-lettered
	[ "$(q -c "SELECT count(*) FROM eventbus.inbox i JOIN eventbus.subscriptions s ON s.id = i.subscription_id
	            WHERE s.topic = 't16.deny.nats.$run'")" -ge $((NDENY * NDENYSUBS)) ]
}
wait_until 60 deny_done
ok $? "A5-A7: each of the $NDENYSUBS handlers finished with each of its $NDENY events (handled or dead-lettered)"
sleep 1
dl_of() {   # dl_of HANDLER — "count sqlstates attempts" of its dead letters
	q -c "SELECT count(*) || ' ' || coalesce(string_agg(DISTINCT d.error_sqlstate, ','), '-') || ' ' || coalesce(string_agg(DISTINCT d.attempts::text, ','), '-')
	        FROM eventbus.dead_letters d JOIN eventbus.subscriptions s ON s.id = d.subscription_id
	       WHERE s.topic = 't16.deny.nats.$run' AND s.handler = ${H[$1]}::regprocedure"
}
effects_of() { q -c "SELECT count(*) FROM t16_effects WHERE kind = '$1'"; }
is "$(dl_of temp)" "$NDENY 42501 2" "A5: CREATE TEMP TABLE in a handler: $NDENY dead letters, SQLSTATE 42501, after max_attempts = 2"
is "$(effects_of temp)|$(q -c "SELECT count(*) FROM pg_class WHERE relname = 't16_tmp' AND relpersistence = 't'")" "0|0" \
	"A5: nothing after it was written, and no temp table exists in any backend"
for h in setrole setrole_stmt sessauth; do
	is "$(dl_of $h)" "$NDENY 42501 2" "A6 $h: $NDENY dead letters, SQLSTATE 42501"
	is "$(effects_of $h)" "0" "A6 $h: nothing after it was written"
done
for h in defrole defsess; do
	is "$(dl_of $h)" "$NDENY 42501 2" "A6 $h: subscribed by a role whose default $([ $h = defrole ] && echo role || echo session_authorization) is $BOOT: $NDENY dead letters, SQLSTATE 42501 (not run as $BOOT)"
	is "$(effects_of $h)" "0" "A6 $h: nothing written"
done
is "$(q -c "SELECT count(*) FROM t16_pgonly")" "0" "A6: the superuser-only table stays empty"
for h in read_subs read_inbox read_dead status; do
	is "$(dl_of $h)" "$NDENY 42501 2" "A7 $h: $NDENY dead letters, SQLSTATE 42501"
	is "$(effects_of $h)" "0" "A7 $h: nothing after it was written"
done

lap "A5-A7"
# =============================================================================
# A8..A10: replay
# =============================================================================
replay_dl_done() { [ "$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE subscription_id = $S_REPLAY")" -ge 3 ]; }
wait_until 60 replay_dl_done
ok $? "A8-A10: the 3 replay events were dead-lettered while the target was not ready"
q -c "UPDATE t16_flags SET fail = false WHERE name = 'replay'" >/dev/null
dl_for() { q -c "SELECT d.id FROM eventbus.dead_letters d JOIN t16_sent s ON s.event_id = (d.envelope).event_id WHERE d.subscription_id = $S_REPLAY AND s.aggregate_id = '$1'"; }
ev_for() { q -c "SELECT event_id FROM t16_sent WHERE what = 'replay' AND aggregate_id = '$1'"; }
target_rows() { q -c "SELECT count(*) FROM public.t16_target WHERE event_id = '$1'"; }

# A8: twice in a row
DL=$(dl_for r-1); EV=$(ev_for r-1)
is "$(q -c "SET ROLE t16a" -c "SELECT eventbus_replay_dead_letter($DL)")" "t" "A8: t16a replays its dead letter: true"
is "$(target_rows "$EV")" "1" "A8: the handler's effect exists once"
is "$(sqlstate_of "SET ROLE t16a" "SELECT eventbus_replay_dead_letter($DL)")" "55000" "A8: replaying it again fails with 55000"
is "$(target_rows "$EV")|$(q -c "SELECT replayed_at IS NOT NULL FROM eventbus.dead_letters WHERE id = $DL")" "1|t" \
	"A8: still exactly once, the dead letter marked replayed"

# A9: two sessions at once (the first holds its transaction open)
DL=$(dl_for r-2); EV=$(ev_for r-2)
( PGAPPNAME=t16r1 psql -X -A -t -q -v ON_ERROR_STOP=1 -v VERBOSITY=sqlstate -c "SET ROLE t16a" -c "BEGIN" \
	-c "SELECT eventbus_replay_dead_letter($DL)" -c "SELECT pg_sleep(3)" -c "COMMIT" >"$W/r1.out" 2>"$W/r1.err" ) &
bg=$!
first_sleeping() { [ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 't16r1' AND query LIKE 'SELECT pg_sleep%'")" = 1 ]; }
wait_until 20 first_sleeping
ok $? "A9: the first session replayed inside its transaction and holds it open"
second=$(PGAPPNAME=t16r2 sqlstate_of "SET ROLE t16a" "SELECT eventbus_replay_dead_letter($DL)")
wait $bg
first=$(grep -E '^[tf]$' "$W/r1.out" | head -1)
is "$first|$second" "t|55000" "A9: one call returned true, the concurrent one failed with 55000"
is "$(target_rows "$EV")" "1" "A9: the handler's effect exists exactly once"

# A10: the caller's settings and temp table do not reach the handler
DL=$(dl_for r-3); EV=$(ev_for r-3)
out=$(psql -X -A -t -q -v ON_ERROR_STOP=1 -c "SET app.t16x = 'caller'" -c "SET work_mem = '2222kB'" \
	-c "CREATE TEMP TABLE t16_target (usr text, x text, wm text, event_id uuid)" -c "GRANT INSERT ON pg_temp.t16_target TO t16a" \
	-c "SELECT eventbus_replay_dead_letter($DL)" -c "SELECT count(*) FROM pg_temp.t16_target" \
	-c "SELECT current_setting('app.t16x') || ' ' || current_setting('work_mem')" 2>&1 | tr '\n' ' ')
is "$out" "t 0 caller 2222kB " "A10: replay by the superuser returns true; nothing went into the caller's temp table t16_target; the caller keeps its settings"
is "$(q -c "SELECT count(*) || ' ' || coalesce(string_agg(usr, ','), '-') FROM public.t16_target WHERE event_id = '$EV'")" "1 t16a" \
	"A10: the handler's row is in public.t16_target, written as t16a"
is "$(q -c "SELECT coalesce(string_agg(coalesce(x, ''), ','), '-') FROM public.t16_target WHERE event_id = '$EV'")" "" \
	"A10: the handler did not see the caller's SET app.t16x = 'caller' (it saw none)"
is "$(q -c "SELECT coalesce(string_agg(wm, ','), '-') FROM public.t16_target WHERE event_id = '$EV'")" "$(q -c "SHOW work_mem")" \
	"A10: the handler did not see the caller's SET work_mem = '2222kB' (it saw the server default)"
lap "A8-A10"

# =============================================================================
# A11: the owner dropped from another database
# =============================================================================
out=$(qdb postgres -c "DROP ROLE t16c")
is "$out" "" "A11: DROP ROLE t16c from database postgres succeeds (t16c owns nothing in $DB)"
produce_sql nats "t16.drop.nats.$run" "SELECT aggregate_id, t_env(event_id, aggregate_id, 'T16Drop', version, '{}') FROM t16_sent WHERE what = 'drop' ORDER BY aggregate_id"
control_done() { [ "$(effects_of control)" -ge 4 ]; }
wait_until 60 control_done
ok $? "A11: 4 events produced after the drop reached the control subscription on the topic"
sleep 2
is "$(effects_of dropped)|$(q -c "SELECT count(*) FROM eventbus.dead_letters WHERE subscription_id = $S_DROP")" "0|0" \
	"A11: the dropped role's handler did not run (no effect, no dead letter under a dangling role)"
is "$(q -c "SELECT state FROM eventbus_status() WHERE component = 'subscription $S_DROP'")" "owner dropped" \
	"A11: eventbus_status() shows the subscription as 'owner dropped'"
is "$(q -c "SELECT eventbus_unsubscribe('t16.drop.nats.$run', ${H[dropped]}::regprocedure, 'nats')")|$(q -c "SELECT count(*) FROM eventbus.subscriptions WHERE id = $S_DROP")" \
	"t|0" "A11: a superuser unsubscribes it"
lap "A11"

done_testing
