-- eventbus 0.1.0 -> 0.2.0: metrics for monitoring systems; envelope.received_at; the outbox without its CHECKs, the inbox without its foreign key and CHECK.
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

-- The outbox loses its CHECKs, the inbox its foreign key and its CHECK (see
-- eventbus--0.2.0.sql); a trigger on eventbus.subscriptions deletes what the
-- cascade deleted.
ALTER TABLE eventbus.outbox DROP CONSTRAINT outbox_transport_check;
ALTER TABLE eventbus.outbox DROP CONSTRAINT outbox_event_version_check;
ALTER TABLE eventbus.inbox DROP CONSTRAINT inbox_subscription_id_fkey;
ALTER TABLE eventbus.inbox DROP CONSTRAINT inbox_outcome_check;

CREATE FUNCTION eventbus.forget_inbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  DELETE FROM eventbus.inbox i USING old_rows o WHERE i.subscription_id OPERATOR(pg_catalog.=) o.id;
  RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION eventbus.forget_inbox() FROM PUBLIC;
COMMENT ON FUNCTION eventbus.forget_inbox() IS
  'Trigger: deletes the inbox records of deleted subscriptions';
CREATE TRIGGER subscriptions_forget_inbox AFTER DELETE ON eventbus.subscriptions
  REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION eventbus.forget_inbox();
COMMENT ON TRIGGER subscriptions_forget_inbox ON eventbus.subscriptions IS
  'Deleting a subscription deletes its inbox records';

-- Room on each page of the version table, so that publishing an aggregate's
-- next event writes its row's new version to the same page (a HOT update)
-- instead of adding an index entry.  Pages written before keep their layout
-- until rewritten.
ALTER TABLE eventbus.aggregate_versions SET (fillfactor = 50);
