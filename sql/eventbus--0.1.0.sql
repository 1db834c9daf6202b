-- eventbus 0.1.0: transactional outbox for Kafka and NATS JetStream.
\echo Use "CREATE EXTENSION eventbus" to load this file. \quit

CREATE SCHEMA eventbus;
COMMENT ON SCHEMA eventbus IS 'eventbus internal tables and types';

CREATE TABLE eventbus.outbox (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid NOT NULL,
    transport      text NOT NULL CHECK (transport IN ('kafka', 'nats')),
    topic          text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    event_version  bigint NOT NULL CHECK (event_version > 0),
    occurred_at    timestamptz NOT NULL,
    trace_id       text,
    correlation_id text,
    tenant_id      integer,
    payload        jsonb NOT NULL,
    headers        jsonb,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text
);
CREATE INDEX outbox_transport_id ON eventbus.outbox (transport, id);
COMMENT ON TABLE eventbus.outbox IS
  'Committed events not yet acknowledged by their broker; the relay sends them in id order and deletes each row once acknowledged';
COMMENT ON COLUMN eventbus.outbox.id IS 'Send order: per (topic, aggregate) it follows commit order';
COMMENT ON COLUMN eventbus.outbox.attempts IS 'Failed delivery attempts so far';
COMMENT ON COLUMN eventbus.outbox.last_error IS 'Error of the last failed delivery attempt';
COMMENT ON SEQUENCE eventbus.outbox_id_seq IS 'Generates outbox ids (send order)';
SELECT pg_catalog.pg_extension_config_dump('eventbus.outbox', '');

CREATE TABLE eventbus.aggregate_versions (
    topic        text NOT NULL,
    aggregate_id text NOT NULL,
    version      bigint NOT NULL,
    PRIMARY KEY (topic, aggregate_id)
);
COMMENT ON TABLE eventbus.aggregate_versions IS
  'Last event_version published per (topic, aggregate); its row lock orders concurrent publishers of one aggregate';
SELECT pg_catalog.pg_extension_config_dump('eventbus.aggregate_versions', '');

CREATE TYPE eventbus.envelope AS (
    event_id       uuid,
    topic          text,
    aggregate_id   text,
    event_type     text,
    event_version  bigint,
    occurred_at    timestamptz,
    trace_id       text,
    correlation_id text,
    tenant_id      integer,
    payload        jsonb,
    headers        jsonb,
    transport      text
);
COMMENT ON TYPE eventbus.envelope IS 'An event as a handler receives it';

CREATE FUNCTION eventbus_publish(
    topic          text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    transport      text DEFAULT NULL,
    event_version  bigint DEFAULT NULL,
    trace_id       text DEFAULT NULL,
    correlation_id text DEFAULT NULL,
    tenant_id      integer DEFAULT NULL,
    headers        jsonb DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'eventbus_publish'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_publish(text, text, text, jsonb, text, bigint, text, text, integer, jsonb) IS
  'Publish an event when the calling transaction commits; returns its event_id (UUIDv7)';
REVOKE ALL ON FUNCTION eventbus_publish(text, text, text, jsonb, text, bigint, text, text, integer, jsonb) FROM PUBLIC;

CREATE FUNCTION eventbus_status(
    OUT component text,
    OUT pid       integer,
    OUT transport text,
    OUT state     text,
    OUT since     timestamptz,
    OUT detail    text,
    OUT backlog   bigint,
    OUT processed bigint,
    OUT failed    bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'eventbus_status'
LANGUAGE C VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_status() IS
  'eventbus processes, broker connection states, outbox backlog and counters';
