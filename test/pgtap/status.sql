-- pgTAP: eventbus_status() shape and the rows of each eventbus process.
BEGIN;
SELECT plan(10);

SELECT has_function('eventbus_status', 'eventbus_status() exists');
SELECT volatility_is('eventbus_status', 'volatile', 'eventbus_status is VOLATILE');
SELECT results_eq($$SELECT count(*) FROM eventbus_status() WHERE component = 'launcher'$$,
                  ARRAY[3::bigint], 'one launcher row plus one row per transport');
SELECT results_eq($$SELECT pid FROM eventbus_status() WHERE component = 'launcher' AND transport IS NULL$$,
                  $$SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbus launcher'$$,
                  'status shows the running launcher pid');
SELECT results_eq($$SELECT state FROM eventbus_status() WHERE component = 'launcher' AND transport IS NULL$$,
                  ARRAY['running'], 'launcher is running');
SELECT bag_eq($$SELECT transport FROM eventbus_status() WHERE component = 'launcher' AND transport IS NOT NULL$$,
              ARRAY['kafka', 'nats'], 'launcher reports both transports');
SELECT results_eq($$SELECT pid FROM eventbus_status() WHERE component = 'dispatcher' AND transport IS NULL$$,
                  $$SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbus dispatcher'$$,
                  'status shows the running dispatcher pid');
SELECT bag_eq($$SELECT transport FROM eventbus_status() WHERE component = 'dispatcher' AND transport IS NOT NULL$$,
              ARRAY['kafka', 'nats'], 'dispatcher reports its consumer connections');
SELECT results_eq($$SELECT count(*) FROM eventbus_status() WHERE component LIKE 'worker %'$$,
                  $$SELECT setting::bigint FROM pg_settings WHERE name = 'eventbus.workers'$$,
                  'one row per pool worker');
SELECT bag_eq($$SELECT pid FROM eventbus_status() WHERE component LIKE 'worker %'$$,
              $$SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbus worker'$$,
              'worker rows show the pool processes');

SELECT * FROM finish();
ROLLBACK;
