-- pgTAP: how eventbus_publish writes its outbox row.  While eventbus.outbox
-- is as the extension created it, the row goes into the table and its two
-- indexes directly (id from the identity sequence); once a superuser has
-- added a trigger, a CHECK or NOT NULL constraint, or changed the identity,
-- the INSERT statement runs instead and honours it.  A read-only
-- transaction still refuses the publish (the version's statement checks
-- it).  One transaction, rolled back: nothing here reaches a broker.
BEGIN;
SELECT plan(22);

CREATE TEMP TABLE t_ids AS SELECT 'ow-' || md5(random()::text) AS agg;
CREATE TEMP TABLE t_pub (n int, id uuid);
CREATE FUNCTION pg_temp.agg() RETURNS text LANGUAGE sql AS $$ SELECT agg FROM t_ids $$;
CREATE FUNCTION pg_temp.pub(n int, etype text DEFAULT 'Created', trace text DEFAULT NULL) RETURNS void
LANGUAGE sql AS $$
  INSERT INTO t_pub SELECT n, eventbus_publish('ow.orders', pg_temp.agg(), etype, jsonb_build_object('n', n), 'kafka',
                                               trace_id => trace)
$$;
-- The plan of a query (EXPLAIN), to show which index answers it.
CREATE FUNCTION pg_temp.plan_of(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE line text; plan text := '';
BEGIN
  FOR line IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP plan := plan || line || E'\n'; END LOOP;
  RETURN plan;
END $$;

-- 1. Written directly: every column as the statement would write it.
INSERT INTO t_pub SELECT 1, eventbus_publish('ow.orders', pg_temp.agg(), 'Created', '{"n":1}', 'kafka', NULL, 'tr-1', 'co-1', 42,
                                             '{"h":"v"}');
SELECT is((SELECT id FROM eventbus.outbox WHERE aggregate_id = pg_temp.agg()), currval('eventbus.outbox_id_seq'),
          'the row''s id is the identity sequence''s value');
SELECT is((SELECT row(transport, topic, event_type, event_version, trace_id, correlation_id, tenant_id, payload, headers,
                      attempts, last_error)::text
             FROM eventbus.outbox WHERE aggregate_id = pg_temp.agg()),
          row('kafka', 'ow.orders', 'Created', 1, 'tr-1', 'co-1', 42, '{"n": 1}'::jsonb, '{"h": "v"}'::jsonb, 0, NULL::text)::text,
          'every column holds what was published (attempts 0, last_error NULL)');
SELECT ok((SELECT occurred_at BETWEEN transaction_timestamp() AND clock_timestamp() FROM eventbus.outbox
            WHERE aggregate_id = pg_temp.agg()), 'occurred_at is the clock at the publish');
SELECT pg_temp.pub(2, trace => NULL);
SELECT is((SELECT row(trace_id, correlation_id, tenant_id, headers)::text FROM eventbus.outbox
            WHERE aggregate_id = pg_temp.agg() AND event_version = 2),
          row(NULL::text, NULL::text, NULL::int, NULL::jsonb)::text, 'optional fields left out are NULL');

-- Both indexes find the rows (the plans checked, so the counts do come from them).
SET LOCAL enable_seqscan = off;
SET LOCAL enable_bitmapscan = off;
SELECT matches(pg_temp.plan_of(format('SELECT count(*) FROM eventbus.outbox WHERE id = %s', currval('eventbus.outbox_id_seq'))),
               'outbox_pkey', 'the id look-up uses the primary key');
SELECT is((SELECT count(*) FROM eventbus.outbox WHERE id = currval('eventbus.outbox_id_seq')), 1::bigint,
          'the primary key finds the row written directly');
SELECT matches(pg_temp.plan_of(format('SELECT count(*) FROM eventbus.outbox WHERE transport = %L AND id + 0 >= %s',
                                      'kafka', currval('eventbus.outbox_id_seq') - 1)),
               'outbox_transport_id', 'the transport look-up uses outbox_transport_id');
SELECT is((SELECT count(*) FROM eventbus.outbox WHERE transport = 'kafka' AND id + 0 >= currval('eventbus.outbox_id_seq') - 1),
          2::bigint,
          'outbox_transport_id finds both rows written directly');
RESET enable_seqscan;
RESET enable_bitmapscan;

-- 2. A row trigger on the outbox: the statement runs, and fires it.
CREATE TABLE public.ow_fired (event_id uuid);
CREATE FUNCTION public.ow_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.ow_fired VALUES (NEW.event_id); RETURN NULL; END $$;
CREATE TRIGGER ow_count AFTER INSERT ON eventbus.outbox FOR EACH ROW EXECUTE FUNCTION public.ow_count();
SELECT pg_temp.pub(3);
SELECT pg_temp.pub(4);
SELECT is((SELECT array_agg(f.event_id ORDER BY t.n) FROM public.ow_fired f JOIN t_pub t ON t.id = f.event_id),
          (SELECT array_agg(id ORDER BY n) FROM t_pub WHERE n IN (3, 4)), 'with a trigger on the outbox, it fired once per event');
SELECT is((SELECT array_agg(event_version ORDER BY id) FROM eventbus.outbox WHERE aggregate_id = pg_temp.agg()),
          ARRAY[1, 2, 3, 4]::bigint[], 'versions continue through the statement');
DROP TRIGGER ow_count ON eventbus.outbox;
SELECT pg_temp.pub(5);
SELECT is((SELECT count(*) FROM public.ow_fired), 2::bigint, 'the trigger dropped, the row is written directly again');
SELECT is((SELECT event_version FROM eventbus.outbox WHERE event_id = (SELECT id FROM t_pub WHERE n = 5)), 5::bigint,
          'and gets the next version');

-- A read-only transaction still refuses the publish, and nothing is written.
SELECT throws_ok($$SELECT set_config('transaction_read_only', 'on', true), pg_temp.pub(6)$$, '25006', NULL,
                 'in a read-only transaction the publish is refused');
SELECT is((SELECT count(*) FROM eventbus.outbox WHERE aggregate_id = pg_temp.agg()), 5::bigint,
          'and no outbox row was written');

-- 3. A CHECK constraint on the outbox is honoured.
ALTER TABLE eventbus.outbox ADD CONSTRAINT ow_check CHECK (event_type <> 'Forbidden') NOT VALID;
SELECT throws_ok($$SELECT pg_temp.pub(6, 'Forbidden')$$, '23514', NULL, 'a CHECK constraint added to the outbox is enforced');
SELECT lives_ok($$SELECT pg_temp.pub(7, 'Allowed')$$, 'an event the constraint allows is published');
ALTER TABLE eventbus.outbox DROP CONSTRAINT ow_check;

-- 4. NOT NULL added to a column eventbus_publish may leave NULL is honoured.
DELETE FROM eventbus.outbox;        -- rolled back with the rest
ALTER TABLE eventbus.outbox ALTER COLUMN trace_id SET NOT NULL;
SELECT throws_ok($$SELECT pg_temp.pub(8)$$, '23502', NULL, 'NOT NULL added to trace_id: an event without one is refused');
SELECT lives_ok($$SELECT pg_temp.pub(9, trace => 'tr-9')$$, 'an event with a trace_id is published');
ALTER TABLE eventbus.outbox ALTER COLUMN trace_id DROP NOT NULL;

-- 5. The identity: a restarted sequence is followed, a new one too (the
-- extension's let go of first: it may not be dropped otherwise).
ALTER TABLE eventbus.outbox ALTER COLUMN id RESTART WITH 900000000;
SELECT pg_temp.pub(10);
SELECT is((SELECT id FROM eventbus.outbox WHERE event_id = (SELECT id FROM t_pub WHERE n = 10)), 900000000::bigint,
          'a restarted identity sequence gives the next id');
ALTER EXTENSION eventbus DROP SEQUENCE eventbus.outbox_id_seq;
ALTER TABLE eventbus.outbox ALTER COLUMN id DROP IDENTITY;
SELECT throws_ok($$SELECT pg_temp.pub(11)$$, '23502', NULL,
                 'without the identity the statement runs, and a row without an id is refused');
ALTER TABLE eventbus.outbox ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME eventbus.ow_seq START WITH 700000000);
SELECT isnt((SELECT pg_get_serial_sequence('eventbus.outbox', 'id')), 'eventbus.outbox_id_seq', 'the outbox has a new identity sequence');
SELECT pg_temp.pub(12);
SELECT is((SELECT id FROM eventbus.outbox WHERE event_id = (SELECT id FROM t_pub WHERE n = 12)), 700000000::bigint,
          'a new identity sequence is the one used (the cached one forgotten)');

SELECT * FROM finish();
ROLLBACK;
