-- pgTAP: eventbus_publish inside one transaction (rolled back at the end,
-- so nothing here reaches a broker).
BEGIN;
SELECT plan(25);

SELECT has_function('eventbus_publish', ARRAY['text','text','text','jsonb','text','bigint','text','text','integer','jsonb'],
                    'eventbus_publish has the contract signature');
SELECT volatility_is('eventbus_publish', ARRAY['text','text','text','jsonb','text','bigint','text','text','integer','jsonb'],
                     'volatile', 'eventbus_publish is VOLATILE');
SELECT has_table('eventbus', 'outbox', 'outbox table exists');
SELECT has_type('eventbus', 'envelope', 'envelope type exists');

-- A unique aggregate per run so versions start at 1.
CREATE TEMP TABLE t_ids AS SELECT 'tap-' || md5(random()::text) AS agg;

CREATE TEMP TABLE t_pub (n int, id uuid);
INSERT INTO t_pub SELECT 1, eventbus_publish('tap.orders', (SELECT agg FROM t_ids), 'Created', '{"n":1}', 'kafka');
INSERT INTO t_pub SELECT 2, eventbus_publish('tap.orders', (SELECT agg FROM t_ids), 'Updated', '{"n":2}', 'kafka');

SELECT is((SELECT array_agg(event_version ORDER BY id) FROM eventbus.outbox WHERE aggregate_id = (SELECT agg FROM t_ids)),
          ARRAY[1,2]::bigint[], 'versions start at 1 and increase per (topic, aggregate)');
SELECT is((SELECT substr(id::text, 15, 1) FROM t_pub WHERE n = 1), '7', 'event_id is a UUIDv7');
SELECT ok((SELECT (SELECT id FROM t_pub WHERE n = 1) < (SELECT id FROM t_pub WHERE n = 2)), 'event ids increase');
SELECT is((SELECT event_id FROM eventbus.outbox WHERE aggregate_id = (SELECT agg FROM t_ids) AND event_version = 1),
          (SELECT id FROM t_pub WHERE n = 1), 'returned event_id is the stored one');

-- Another topic has its own version sequence.
SELECT eventbus_publish('tap.invoices', (SELECT agg FROM t_ids), 'Created', '{}', 'nats');
SELECT is((SELECT event_version FROM eventbus.outbox WHERE topic = 'tap.invoices' AND aggregate_id = (SELECT agg FROM t_ids)),
          1::bigint, 'versions are per topic');

-- Explicit versions are kept; the next automatic one continues after the highest.
SELECT eventbus_publish('tap.orders', (SELECT agg FROM t_ids), 'Imported', '{}', 'kafka', event_version => 10);
SELECT eventbus_publish('tap.orders', (SELECT agg FROM t_ids), 'Updated', '{}', 'kafka');
SELECT is((SELECT array_agg(event_version ORDER BY id) FROM eventbus.outbox WHERE topic = 'tap.orders' AND aggregate_id = (SELECT agg FROM t_ids)),
          ARRAY[1,2,10,11]::bigint[], 'explicit event_version kept, automatic numbering continues after it');

-- Optional fields are stored.
SELECT eventbus_publish('tap.orders', (SELECT agg FROM t_ids) || '-x', 'Created', '{"a":[1,2]}', 'nats',
                        trace_id => 'tr-1', correlation_id => 'co-1', tenant_id => 42, headers => '{"source":"tap"}');
SELECT row_eq($$SELECT transport, trace_id, correlation_id, tenant_id, payload, headers FROM eventbus.outbox
                WHERE aggregate_id = (SELECT agg FROM t_ids) || '-x'$$,
              ROW('nats'::text, 'tr-1'::text, 'co-1'::text, 42, '{"a":[1,2]}'::jsonb, '{"source":"tap"}'::jsonb),
              'transport, trace, correlation, tenant, payload and headers stored');

-- default_transport decides when transport is NULL.
SET LOCAL eventbus.default_transport = 'nats';
SELECT eventbus_publish('tap.orders', (SELECT agg FROM t_ids) || '-d', 'Created', '{}');
SELECT is((SELECT transport FROM eventbus.outbox WHERE aggregate_id = (SELECT agg FROM t_ids) || '-d'), 'nats',
          'NULL transport uses eventbus.default_transport');

-- A rolled-back savepoint drops only its own events.
SAVEPOINT s1;
SELECT eventbus_publish('tap.orders', (SELECT agg FROM t_ids) || '-sp', 'Created', '{}', 'kafka');
ROLLBACK TO SAVEPOINT s1;
SELECT is((SELECT count(*) FROM eventbus.outbox WHERE aggregate_id = (SELECT agg FROM t_ids) || '-sp'), 0::bigint,
          'rolled-back savepoint leaves no outbox row');
SELECT is((SELECT count(*) FROM eventbus.outbox WHERE aggregate_id = (SELECT agg FROM t_ids)), 5::bigint,
          'events before the savepoint are kept');
SELECT is((SELECT count(*) FROM eventbus.aggregate_versions WHERE aggregate_id = (SELECT agg FROM t_ids) || '-sp'), 0::bigint,
          'rolled-back savepoint consumed no version');

-- Bad input: the SQLSTATE, and the transaction's other work is unaffected.
CREATE TEMP TABLE t_work (v int);
INSERT INTO t_work VALUES (1);
SELECT throws_ok($$SELECT eventbus_publish('tap.orders', NULL, 'Created', '{}')$$, '22004',
                 'aggregate_id must not be null', 'NULL aggregate_id: 22004');
SELECT throws_ok($$SELECT eventbus_publish('tap.orders', 'bad id', 'Created', '{}')$$, '22023',
                 'aggregate_id contains an invalid character', 'bad aggregate_id charset: 22023');
SELECT throws_ok($$SELECT eventbus_publish('tap.orders', repeat('x', 257), 'Created', '{}')$$, '22001',
                 'aggregate_id is too long', 'oversized aggregate_id: 22001');
SELECT throws_ok($$SELECT eventbus_publish('tap.orders', 'a', '', '{}')$$, '22023',
                 'event_type must not be empty', 'empty event_type: 22023');
SELECT throws_ok($$SELECT eventbus_publish('tap.orders', 'a', 'E', '{}', event_version => 0)$$, '22023',
                 'event_version must be greater than zero', 'event_version 0: 22023');
SELECT throws_ok($$SELECT eventbus_publish('tap.orders', 'a', 'E', NULL)$$, '22004',
                 'payload must not be null', 'NULL payload: 22004');
SELECT throws_ok($$SELECT eventbus_publish('tap orders', 'a', 'E', '{}')$$, '22023',
                 NULL, 'invalid topic: 22023');
SELECT throws_ok($$SELECT eventbus_publish('tap.orders', 'a', 'E', '{}', 'amqp')$$, '22023',
                 'unknown transport "amqp"', 'unknown transport: 22023');
SELECT is((SELECT count(*) FROM t_work), 1::bigint, 'work done before the errors is intact');
SELECT lives_ok($$SELECT eventbus_publish('tap.orders', (SELECT agg FROM t_ids) || '-after', 'Created', '{}', 'kafka')$$,
                'a valid publish after the errors succeeds in the same transaction');

SELECT * FROM finish();
ROLLBACK;
