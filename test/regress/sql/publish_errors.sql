-- eventbus_publish: each bad input gets its SQLSTATE and a message naming
-- the field; nothing is written.
CREATE EXTENSION IF NOT EXISTS eventbus;

CREATE FUNCTION pg_temp.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE sql;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

SELECT pg_temp.try($$SELECT eventbus_publish(NULL, 'a-1', 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('', 'a-1', 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish(repeat('t', 250), 'a-1', 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders/eu', 'a-1', 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', NULL, 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', '', 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', repeat('a', 257), 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'order 1', 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'ordér-1', 'Created', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', NULL, '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', '', '{}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', NULL)$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', event_version => 0)$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', event_version => -5)$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', transport => 'rabbitmq')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', headers => '[1]')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', headers => '{"X-Event-ID": "x"}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', headers => '{"k": {"nested": 1}}')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', trace_id => E'a\nb')$$);
-- Valid input in a database the launcher does not serve is refused, not stranded.
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', transport => 'nats')$$);

SELECT count(*) AS outbox_rows FROM eventbus.outbox;

-- Oversized payload.
SET eventbus.max_payload_bytes = 1024;
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', jsonb_build_object('blob', repeat('x', 2000)))$$);
RESET eventbus.max_payload_bytes;

-- Errors carry DETAIL and HINT where they help.
SELECT eventbus_publish('orders', 'order#1', 'Created', '{}');
SELECT eventbus_publish('orders', repeat('a', 300), 'Created', '{}');
SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', transport => 'sqs');
SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', transport => 'kafka');

-- Topics the target transport can never carry (22023).
SELECT pg_temp.try($$SELECT eventbus_publish('hz..bad', 'a-1', 'Created', '{}', transport => 'nats')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('.hz', 'a-1', 'Created', '{}', transport => 'nats')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('hz.', 'a-1', 'Created', '{}', transport => 'nats')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('.', 'a-1', 'Created', '{}', transport => 'nats')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('..', 'a-1', 'Created', '{}', transport => 'kafka')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('.', 'a-1', 'Created', '{}', transport => 'kafka')$$);
-- Valid elsewhere: '.hz' is a Kafka name, 'a.b' both (refused here only for the database).
SELECT pg_temp.try($$SELECT eventbus_publish('.hz', 'a-1', 'Created', '{}', transport => 'kafka')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('a.b', 'a-1', 'Created', '{}', transport => 'nats')$$);

-- Small as jsonb, too large as the envelope the relay sends (each chr(1) is
-- \u0001 in JSON text): 54000, for the transport's limit.
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', to_jsonb(repeat(chr(1), 300000)), transport => 'kafka')$$);
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', to_jsonb(repeat(chr(1), 300000)), transport => 'nats')$$);

-- Header limits: count, total size, name length.
SELECT pg_temp.try(format($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', headers => %L)$$,
       (SELECT jsonb_object_agg('h' || g, g) FROM generate_series(1, 65) g)));
SELECT pg_temp.try(format($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', headers => %L)$$,
       (SELECT jsonb_object_agg('h' || g, repeat('v', 1000)) FROM generate_series(1, 20) g)));
SELECT pg_temp.try(format($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', headers => %L)$$,
       jsonb_build_object(repeat('n', 257), 'v')));
SELECT pg_temp.try($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', headers => '{"k": null}')$$);
-- At the limits: passes validation (refused here only for the database).
SELECT pg_temp.try(format($$SELECT eventbus_publish('orders', 'a-1', 'Created', '{}', headers => %L)$$,
       (SELECT jsonb_object_agg('h' || g, g) FROM generate_series(1, 64) g)));

SELECT count(*) AS outbox_rows FROM eventbus.outbox;

-- DETAIL and HINT of the new errors.
\set VERBOSITY default
SELECT eventbus_publish('orders..eu', 'a-1', 'Created', '{}', transport => 'nats');
SELECT eventbus_publish('orders', 'a-1', 'Created', to_jsonb(repeat(chr(1), 300000)), transport => 'kafka');
SELECT eventbus_publish('orders', 'a-1', 'Created', to_jsonb(repeat(chr(1), 300000)), transport => 'nats');
