-- eventbus 0.1.0 -> 0.2.0: metrics for monitoring systems; envelope.received_at.
\echo Use "ALTER EXTENSION eventbus UPDATE TO '0.2.0'" to load this file. \quit

CREATE FUNCTION eventbus_metrics(
    OUT name            text,
    OUT kind            text,
    OUT transport       text,
    OUT subscription_id bigint,
    OUT worker          integer,
    OUT value           double precision)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'eventbus_metrics'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_metrics() IS
  'Counters (from server start) and gauges of eventbus, one row per metric and label set; read through the eventbus.metrics view';
REVOKE ALL ON FUNCTION eventbus_metrics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION eventbus_metrics() TO pg_monitor;

CREATE VIEW eventbus.metrics AS
  SELECT m.name, m.kind, m.transport, m.subscription_id, m.worker, m.value
    FROM @extschema@.eventbus_metrics() m;
COMMENT ON VIEW eventbus.metrics IS
  'eventbus counters and gauges for monitoring (readable by pg_monitor): name, kind (counter or gauge), labels (transport, subscription_id, worker) and value; docs/monitoring.md lists them';
GRANT SELECT ON eventbus.metrics TO pg_monitor;

-- Stored envelopes (dead letters) read NULL for the new attribute.
ALTER TYPE eventbus.envelope ADD ATTRIBUTE received_at timestamptz;
COMMENT ON TYPE eventbus.envelope IS 'An event as a handler receives it (received_at: when eventbus took the message from the broker client; NULL where no message was received)';
