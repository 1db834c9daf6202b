-- pgTAP: the consumer API (eventbus_subscribe, eventbus_unsubscribe,
-- eventbus_replay_dead_letter) and its tables, inside one transaction that is
-- rolled back at the end.
BEGIN;
SELECT plan(60);

-- Shape ---------------------------------------------------------------------
SELECT has_function('eventbus_subscribe', ARRAY['text','regprocedure','text','integer'], 'eventbus_subscribe has the contract signature');
SELECT has_function('eventbus_unsubscribe', ARRAY['text','regprocedure','text'], 'eventbus_unsubscribe has the contract signature');
SELECT has_function('eventbus_replay_dead_letter', ARRAY['bigint'], 'eventbus_replay_dead_letter has the contract signature');
SELECT function_returns('eventbus_subscribe', ARRAY['text','regprocedure','text','integer'], 'bigint', 'eventbus_subscribe returns bigint');
SELECT function_returns('eventbus_unsubscribe', ARRAY['text','regprocedure','text'], 'boolean', 'eventbus_unsubscribe returns boolean');
SELECT function_returns('eventbus_replay_dead_letter', ARRAY['bigint'], 'boolean', 'eventbus_replay_dead_letter returns boolean');
SELECT volatility_is('eventbus_subscribe', ARRAY['text','regprocedure','text','integer'], 'volatile', 'eventbus_subscribe is VOLATILE');
SELECT volatility_is('eventbus_unsubscribe', ARRAY['text','regprocedure','text'], 'volatile', 'eventbus_unsubscribe is VOLATILE');
SELECT volatility_is('eventbus_replay_dead_letter', ARRAY['bigint'], 'volatile', 'eventbus_replay_dead_letter is VOLATILE');

SELECT has_table('eventbus', 'subscriptions', 'subscriptions table exists');
SELECT has_table('eventbus', 'inbox', 'inbox table exists');
SELECT has_table('eventbus', 'dead_letters', 'dead_letters table exists');
SELECT has_table('eventbus', 'quarantine', 'quarantine table exists');

CREATE FUNCTION pg_temp.missing_columns(rel regclass, cols text[]) RETURNS text[] LANGUAGE sql AS $$
  SELECT coalesce(array_agg(c ORDER BY c), '{}') FROM unnest(cols) c
   WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped)
$$;
SELECT is(pg_temp.missing_columns('eventbus.subscriptions', ARRAY['id','topic','transport','handler','role_id','max_attempts','created_at']),
          '{}'::text[], 'subscriptions has the contract columns');
SELECT is(pg_temp.missing_columns('eventbus.inbox', ARRAY['subscription_id','event_id','outcome','handled_at']),
          '{}'::text[], 'inbox has the contract columns');
SELECT is(pg_temp.missing_columns('eventbus.dead_letters', ARRAY['id','subscription_id','envelope','error_message','error_sqlstate','attempts','failed_at','replayed_at']),
          '{}'::text[], 'dead_letters has the contract columns');
SELECT is(pg_temp.missing_columns('eventbus.quarantine', ARRAY['id','transport','topic','kafka_partition','kafka_offset','stream_sequence','message_key','headers','raw','reason','received_at']),
          '{}'::text[], 'quarantine has the contract columns');
SELECT bag_has($$SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_type t JOIN pg_attribute a ON a.attrelid = t.typrelid
                  WHERE t.oid = 'eventbus.envelope'::regtype AND a.attnum > 0 AND NOT a.attisdropped$$,
               $$VALUES ('event_id', 'uuid'), ('topic', 'text'), ('aggregate_id', 'text'), ('event_type', 'text'),
                        ('event_version', 'bigint'), ('occurred_at', 'timestamp with time zone'), ('trace_id', 'text'),
                        ('correlation_id', 'text'), ('tenant_id', 'integer'), ('payload', 'jsonb'), ('headers', 'jsonb'),
                        ('transport', 'text')$$,
               'eventbus.envelope has the contract fields and types');
SELECT is((SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'eventbus.subscriptions'::regclass AND attname = 'handler'),
          'regprocedure', 'subscriptions.handler is a regprocedure');
SELECT is((SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'eventbus.quarantine'::regclass AND attname = 'raw'),
          'bytea', 'quarantine.raw is bytea');

-- Helpers: SQLSTATE / message of a statement ('ok' when it succeeds).
CREATE FUNCTION pg_temp.state_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE sql; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$;
CREATE FUNCTION pg_temp.message_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE sql; RETURN '';
EXCEPTION WHEN OTHERS THEN RETURN SQLERRM; END $$;

-- Handlers, good and bad.
CREATE FUNCTION tap_sub_ok(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE FUNCTION tap_sub_ok2(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE FUNCTION tap_sub_text(e text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE FUNCTION tap_sub_two(e eventbus.envelope, x integer) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE FUNCTION tap_sub_int(e eventbus.envelope) RETURNS integer LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;
CREATE FUNCTION tap_sub_noarg() RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE FUNCTION tap_sub_secret(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
REVOKE EXECUTE ON FUNCTION tap_sub_secret(eventbus.envelope) FROM PUBLIC;

-- Wrong handler signatures: 42883 or 42P13, message names the handler.
SELECT ok(pg_temp.state_of($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_text(text)', 'kafka')$$) IN ('42883', '42P13'),
          'handler taking text instead of eventbus.envelope: 42883/42P13');
SELECT ok(pg_temp.message_of($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_text(text)', 'kafka')$$) LIKE '%tap_sub_text%',
          '... the message names the handler');
SELECT ok(pg_temp.state_of($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_two(eventbus.envelope,integer)', 'kafka')$$) IN ('42883', '42P13'),
          'handler with two arguments: 42883/42P13');
SELECT ok(pg_temp.message_of($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_two(eventbus.envelope,integer)', 'kafka')$$) LIKE '%tap_sub_two%',
          '... the message names the handler');
SELECT ok(pg_temp.state_of($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_int(eventbus.envelope)', 'kafka')$$) IN ('42883', '42P13'),
          'handler not returning void: 42883/42P13');
SELECT ok(pg_temp.message_of($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_int(eventbus.envelope)', 'kafka')$$) LIKE '%tap_sub_int%',
          '... the message names the handler');
SELECT ok(pg_temp.state_of($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_noarg()', 'kafka')$$) IN ('42883', '42P13'),
          'handler without arguments: 42883/42P13');

-- Invalid arguments: 22023.
SELECT throws_ok($$SELECT eventbus_subscribe('', 'tap_sub_ok(eventbus.envelope)', 'kafka')$$, '22023', NULL, 'empty topic: 22023');
SELECT throws_ok($$SELECT eventbus_subscribe('bad topic!', 'tap_sub_ok(eventbus.envelope)', 'kafka')$$, '22023', NULL, 'topic with invalid characters: 22023');
SELECT throws_ok(format('SELECT eventbus_subscribe(%L, %L, %L)', repeat('t', 250), 'tap_sub_ok(eventbus.envelope)', 'kafka'), '22023', NULL,
                 'topic of 250 characters: 22023');
SELECT throws_ok($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)', 'rabbitmq')$$, '22023', NULL, 'unknown transport: 22023');
-- The topic rules of the transport, as at publish: a subscription that could never see an event is refused.
SELECT throws_ok($$SELECT eventbus_subscribe('hz..bad', 'tap_sub_ok(eventbus.envelope)', 'nats')$$, '22023', NULL, 'NATS subject with an empty token: 22023');
SELECT throws_ok($$SELECT eventbus_subscribe('.hz', 'tap_sub_ok(eventbus.envelope)', 'nats')$$, '22023', NULL, 'NATS subject starting with a dot: 22023');
SELECT throws_ok($$SELECT eventbus_subscribe('..', 'tap_sub_ok(eventbus.envelope)', 'kafka')$$, '22023', NULL, 'Kafka topic ..: 22023');
SELECT throws_ok($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)', 'kafka', 0)$$, '22023', NULL, 'max_attempts 0: 22023');
SELECT throws_ok($$SELECT eventbus_subscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)', 'kafka', -1)$$, '22023', NULL, 'max_attempts -1: 22023');
SELECT is((SELECT count(*) FROM eventbus.subscriptions WHERE topic IN ('', 'bad topic!', 'tap.sub.orders', repeat('t', 250))), 0::bigint,
          'failed calls created no subscription');

-- Subscribe, idempotently.
CREATE TEMP TABLE tap_ids (name text PRIMARY KEY, id bigint);
INSERT INTO tap_ids VALUES ('a', eventbus_subscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)', 'kafka'));
INSERT INTO tap_ids VALUES ('a again', eventbus_subscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)', 'kafka'));
SET LOCAL eventbus.default_transport = 'kafka';
INSERT INTO tap_ids VALUES ('a default', eventbus_subscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)'));
INSERT INTO tap_ids VALUES ('nats', eventbus_subscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)', 'nats', 3));
INSERT INTO tap_ids VALUES ('other handler', eventbus_subscribe('tap.sub.orders', 'tap_sub_ok2(eventbus.envelope)', 'kafka'));

SELECT ok((SELECT id FROM tap_ids WHERE name = 'a') IS NOT NULL, 'eventbus_subscribe returns an id');
SELECT is((SELECT id FROM tap_ids WHERE name = 'a again'), (SELECT id FROM tap_ids WHERE name = 'a'),
          'subscribing the same (topic, transport, handler) again returns the same id');
SELECT is((SELECT id FROM tap_ids WHERE name = 'a default'), (SELECT id FROM tap_ids WHERE name = 'a'),
          'NULL transport means eventbus.default_transport (same subscription)');
SELECT is((SELECT count(*) FROM eventbus.subscriptions WHERE topic = 'tap.sub.orders'), 3::bigint,
          'three subscriptions: kafka and nats for one handler, kafka for another');
SELECT is((SELECT count(DISTINCT id) FROM tap_ids WHERE name IN ('a', 'nats', 'other handler')), 3::bigint,
          'another transport or another handler is another subscription');
SELECT row_eq(format($$SELECT topic, transport, handler, role_id, max_attempts FROM eventbus.subscriptions WHERE id = %s$$,
                     (SELECT id FROM tap_ids WHERE name = 'a')),
              ROW('tap.sub.orders'::text, 'kafka'::text, 'tap_sub_ok(eventbus.envelope)'::regprocedure,
                  (SELECT oid FROM pg_roles WHERE rolname = current_user), 5),
              'row: topic, transport, handler, the calling role, max_attempts default 5');
SELECT is((SELECT max_attempts FROM eventbus.subscriptions WHERE id = (SELECT id FROM tap_ids WHERE name = 'nats')), 3,
          'max_attempts stored');

-- Privileges.
CREATE ROLE tap_sub_nobody NOLOGIN;
CREATE ROLE tap_sub_app NOLOGIN;
GRANT EXECUTE ON FUNCTION eventbus_subscribe(text, regprocedure, text, integer) TO tap_sub_app;
SELECT ok(NOT has_function_privilege('tap_sub_nobody', 'eventbus_subscribe(text,regprocedure,text,integer)', 'EXECUTE'),
          'EXECUTE on eventbus_subscribe is not granted to PUBLIC');
-- Handlers are passed by oid below, so that resolving their names (schema
-- eventbus) is not what is tested.
SELECT format('SELECT eventbus_subscribe(%L, %s::regprocedure, %L)', 'tap.sub.priv', 'tap_sub_ok(eventbus.envelope)'::regprocedure::oid, 'kafka') AS sub_ok,
       format('SELECT eventbus_subscribe(%L, %s::regprocedure, %L)', 'tap.sub.priv', 'tap_sub_secret(eventbus.envelope)'::regprocedure::oid, 'kafka') AS sub_secret
\gset
SET LOCAL ROLE tap_sub_nobody;
SELECT pg_temp.state_of(:'sub_ok') AS nobody_state \gset
SET LOCAL ROLE tap_sub_app;
SELECT pg_temp.state_of(:'sub_secret') AS secret_state \gset
SELECT pg_temp.state_of(:'sub_ok') AS app_state \gset
RESET ROLE;
SELECT is(:'nobody_state'::text, '42501', 'a role without EXECUTE on eventbus_subscribe gets 42501');
SELECT is(:'secret_state'::text, '42501', 'subscribing a handler the caller may not EXECUTE: 42501');
SELECT is(:'app_state'::text, 'ok', 'a role granted EXECUTE subscribes its handler');
SELECT is((SELECT role_id FROM eventbus.subscriptions WHERE topic = 'tap.sub.priv'), (SELECT oid FROM pg_roles WHERE rolname = 'tap_sub_app'),
          'the subscription records the subscribing role (under SET ROLE)');
SELECT is((SELECT count(*) FROM eventbus.subscriptions WHERE topic = 'tap.sub.priv'), 1::bigint, 'only the permitted call created a subscription');

-- Unsubscribe.  Inbox records (as the pool writes them) for the subscription
-- that goes and for one that stays.
INSERT INTO eventbus.inbox (subscription_id, event_id, outcome)
SELECT s.id, gen_random_uuid(), 'handled' FROM eventbus.subscriptions s, generate_series(1, 3)
 WHERE s.topic = 'tap.sub.orders';
SELECT is(eventbus_unsubscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)', 'kafka'), true, 'unsubscribe an existing subscription: true');
SELECT is(eventbus_unsubscribe('tap.sub.orders', 'tap_sub_ok(eventbus.envelope)', 'kafka'), false, 'unsubscribe it again: false');
SELECT is((SELECT count(*) FROM eventbus.subscriptions WHERE id = (SELECT id FROM tap_ids WHERE name = 'a')), 0::bigint, 'its row is gone');
SELECT is((SELECT count(*) FROM eventbus.inbox WHERE subscription_id = (SELECT id FROM tap_ids WHERE name = 'a')), 0::bigint,
          'its inbox records are gone');
SELECT is((SELECT count(*) FROM eventbus.inbox i JOIN eventbus.subscriptions s ON s.id = i.subscription_id WHERE s.topic = 'tap.sub.orders'),
          (SELECT 3 * count(*) FROM eventbus.subscriptions WHERE topic = 'tap.sub.orders'), 'the inbox records of the other subscriptions stay');
SELECT is(eventbus_unsubscribe('tap.sub.orders', 'tap_sub_ok2(eventbus.envelope)'), true, 'unsubscribe with NULL transport uses default_transport');
SELECT is((SELECT count(*) FROM eventbus.subscriptions WHERE topic = 'tap.sub.orders'), 1::bigint, 'the nats subscription remains');

-- Dropping a subscribed handler (CASCADE) removes its subscription, and
-- with it the subscription's inbox records.
CREATE FUNCTION tap_sub_drop(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
INSERT INTO tap_ids VALUES ('drop', eventbus_subscribe('tap.sub.drop', 'tap_sub_drop(eventbus.envelope)', 'nats'));
INSERT INTO eventbus.inbox (subscription_id, event_id, outcome) SELECT id, gen_random_uuid(), 'handled' FROM tap_ids WHERE name = 'drop';
DROP FUNCTION tap_sub_drop(eventbus.envelope) CASCADE;
SELECT is((SELECT count(*) FROM eventbus.inbox WHERE subscription_id = (SELECT id FROM tap_ids WHERE name = 'drop'))
          + (SELECT count(*) FROM eventbus.subscriptions WHERE id = (SELECT id FROM tap_ids WHERE name = 'drop')), 0::bigint,
          'DROP FUNCTION ... CASCADE of a handler removes its subscription and its inbox records');

-- The trigger function runs as the extension's owner: no other role may
-- execute it, so none can attach it to a table of its own.
SELECT is(has_function_privilege('public', 'eventbus.forget_inbox()', 'EXECUTE'), false, 'PUBLIC may not execute eventbus.forget_inbox()');
SET LOCAL ROLE tap_sub_app;
CREATE TEMP TABLE tap_own (x int);
SELECT throws_ok($$CREATE TRIGGER tap_own_forget AFTER DELETE ON tap_own FOR EACH STATEMENT EXECUTE FUNCTION eventbus.forget_inbox()$$,
                 '42501', NULL, 'a role cannot attach eventbus.forget_inbox() to a table of its own: 42501');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
