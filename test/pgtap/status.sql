-- pgTAP: eventbus_status() shape and the launcher's rows.
BEGIN;
SELECT plan(6);

SELECT has_function('eventbus_status', 'eventbus_status() exists');
SELECT volatility_is('eventbus_status', 'volatile', 'eventbus_status is VOLATILE');
SELECT results_eq($$SELECT count(*) FROM eventbus_status() WHERE component = 'launcher'$$,
                  ARRAY[3::bigint], 'one launcher row plus one row per transport');
SELECT results_eq($$SELECT pid FROM eventbus_status() WHERE component = 'launcher' AND transport IS NULL$$,
                  $$SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbus launcher'$$,
                  'status shows the running launcher pid');
SELECT results_eq($$SELECT state FROM eventbus_status() WHERE component = 'launcher' AND transport IS NULL$$,
                  ARRAY['running'], 'launcher is running');
SELECT bag_eq($$SELECT transport FROM eventbus_status() WHERE transport IS NOT NULL$$,
              ARRAY['kafka', 'nats'], 'both transports reported');

SELECT * FROM finish();
ROLLBACK;
