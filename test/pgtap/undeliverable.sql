-- pgTAP: eventbus.undeliverable and its functions, inside one transaction
-- (rolled back at the end, so the relay never sees these rows).
BEGIN;
SELECT plan(21);

SELECT has_table('eventbus', 'undeliverable', 'undeliverable table exists');
SELECT has_function('eventbus_retry_undeliverable', ARRAY['bigint'], 'eventbus_retry_undeliverable(bigint) exists');
SELECT has_function('eventbus_discard_undeliverable', ARRAY['bigint', 'boolean'], 'eventbus_discard_undeliverable(bigint, boolean) exists');
SELECT has_function('eventbus_undeliverable', 'eventbus_undeliverable() exists');
SELECT ok(NOT has_function_privilege('public', 'eventbus_retry_undeliverable(bigint)', 'EXECUTE')
          AND NOT has_function_privilege('public', 'eventbus_discard_undeliverable(bigint, boolean)', 'EXECUTE')
          AND NOT has_function_privilege('public', 'eventbus_undeliverable()', 'EXECUTE'),
          'retry, discard and list are revoked from PUBLIC');

SELECT throws_ok('SELECT eventbus_retry_undeliverable(-1)', '42704', NULL, 'retry of an unknown id: 42704');
SELECT throws_ok('SELECT eventbus_discard_undeliverable(-1)', '42704', NULL, 'discard of an unknown id: 42704');
SELECT throws_ok('SELECT eventbus_discard_undeliverable(NULL)', '22004', NULL, 'discard of NULL: 22004');

CREATE TEMP TABLE t_before AS
  SELECT backlog, failed FROM eventbus_status() WHERE component = 'undeliverable' AND transport = 'kafka';

-- Two aggregates stuck: a failed event and two waiting behind it each.
INSERT INTO eventbus.undeliverable (id, event_id, transport, topic, aggregate_id, event_type, event_version,
                                    occurred_at, payload, attempts, error, failed_at, held_behind)
SELECT 9000000000 + a * 10 + v, gen_random_uuid(), 'kafka', 'tap.und', 'agg-' || a, 'T', v,
       now(), '{}', 1, CASE v WHEN 1 THEN 'Kafka: boom' ELSE 'waiting' END, now(),
       CASE v WHEN 1 THEN NULL ELSE 9000000000 + a * 10 + 1 END
  FROM generate_series(1, 2) a, generate_series(1, 3) v;

SELECT is((SELECT (s.backlog - b.backlog) || ' ' || (s.failed - b.failed) || ' ' || s.state
             FROM eventbus_status() s, t_before b WHERE s.component = 'undeliverable' AND s.transport = 'kafka'),
          '6 2 holding', 'status: 6 more undeliverable Kafka events, 2 of them failed');
SELECT is((SELECT count(*) FROM eventbus_undeliverable() WHERE topic = 'tap.und'),
          6::bigint, 'eventbus_undeliverable() lists them');

-- Retry of a waiting event moves its whole aggregate back, keeping the ids.
SELECT is(eventbus_retry_undeliverable(9000000012), 3::bigint, 'retry moves the aggregate''s 3 events');
SELECT is((SELECT array_agg(id ORDER BY id) FROM eventbus.outbox WHERE topic = 'tap.und'),
          ARRAY[9000000011, 9000000012, 9000000013]::bigint[], 'back in the outbox with their original ids');
SELECT is((SELECT last_error FROM eventbus.outbox WHERE id = 9000000011), 'Kafka: boom',
          'the failed event keeps its error as last_error');
SELECT is((SELECT count(*) FROM eventbus.undeliverable WHERE aggregate_id = 'agg-2'), 3::bigint,
          'the other aggregate stays');

-- Discarding the failed event alone lets the ones behind it go.
SELECT is(eventbus_discard_undeliverable(9000000021), 1::bigint, 'discard deletes the failed event');
SELECT is((SELECT array_agg(id ORDER BY id) FROM eventbus.outbox WHERE aggregate_id = 'agg-2'),
          ARRAY[9000000022, 9000000023]::bigint[], 'the events that waited behind it are back in the outbox');
SELECT is((SELECT count(*) FROM eventbus.undeliverable WHERE topic = 'tap.und'), 0::bigint, 'nothing left');

-- include_later: the event and the later ones of its aggregate.
INSERT INTO eventbus.undeliverable (id, event_id, transport, topic, aggregate_id, event_type, event_version,
                                    occurred_at, payload, error, failed_at, held_behind)
SELECT 9000000030 + v, gen_random_uuid(), 'nats', 'tap.und', 'agg-3', 'T', v, now(), '{}', 'x', now(),
       CASE v WHEN 1 THEN NULL ELSE 9000000031 END
  FROM generate_series(1, 3) v;
SELECT is(eventbus_discard_undeliverable(9000000032, include_later => true), 2::bigint,
          'discard with include_later deletes the event and the later one');
SELECT is((SELECT array_agg(id) FROM eventbus.undeliverable WHERE topic = 'tap.und'),
          ARRAY[9000000031]::bigint[], 'the earlier failed event stays');
SELECT is(eventbus_retry_undeliverable(NULL), (SELECT count(*) FROM eventbus.undeliverable),
          'retry of NULL moves every undeliverable event');
SELECT is((SELECT count(*) FROM eventbus.undeliverable), 0::bigint, 'none left');

SELECT * FROM finish();
ROLLBACK;
